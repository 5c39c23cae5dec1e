"""The Python API: DLoRAModelForCausalLM driven by Hugging Face's Trainer and by plain torch loops,
against the same training in one process with PEFT."""
from __future__ import annotations

import gc
import re
import time

import pytest
import torch
from peft import LoraConfig, get_peft_model

from edge_client.kill_revive import KillRevive, KRConfig
from edge_client.remote_model import DLoRAModelForCausalLM, lora_settings

from helpers import random_adapters, reference_greedy, reference_model, rel_err

TOL = 1e-5


def dataset(vocab: int, rows: int = 8, length: int = 12, seed: int = 0) -> list[dict]:
    """Token rows of varied lengths, right-padded, with labels on the second half of each row."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(rows):
        real = length - (i % 3)
        ids = torch.randint(3, vocab, (length,), generator=gen)
        mask = (torch.arange(length) < real).long()
        ids[real:] = 0
        labels = ids.clone()
        labels[: real // 2] = -100
        labels[real:] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def peft_twin(model_dir, model: DLoRAModelForCausalLM, config: LoraConfig):
    """PEFT's own model of the same base, with copies of `model`'s adapters."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # The cloud runs the frozen blocks without dropout; PEFT's base in train mode would drop (GPT-2: 0.1).
    for key, value in vars(base.config).items():
        if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop")):
            setattr(base.config, key, 0.0)
    for module in base.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    twin = get_peft_model(base, config)
    with torch.no_grad():
        for name, ad in model.adapters.items():
            layer = twin.get_submodule(f"base_model.model.{name}")
            layer.lora_A["default"].weight.copy_(ad.lora_A)
            layer.lora_B["default"].weight.copy_(ad.lora_B)
    return twin


def peft_weights(twin, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    layer = twin.get_submodule(f"base_model.model.{name}")
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def trainer_run(model, rows: list[dict], out_dir, accumulation: int = 1, callbacks=()):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out_dir), max_steps=3, per_device_train_batch_size=2,
                             gradient_accumulation_steps=accumulation, learning_rate=1e-2,
                             lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True, seed=0,
                             logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=list(callbacks))
    trainer.train()
    return trainer


@pytest.mark.parametrize("accumulation", [1, 2])
def test_hf_trainer_matches_peft(kind, servers, model_dirs, cache, tmp_path, accumulation):
    """Trainer on the remote model ends with the adapters Trainer gives PEFT's in-process model."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    with DLoRAModelForCausalLM.connect(servers[kind], config, cache=cache) as model:
        rows = dataset(model.config.vocab_size)
        twin = peft_twin(model_dirs[kind], model, config)
        trainer_run(model, rows, tmp_path / "remote", accumulation)
        trainer_run(twin, rows, tmp_path / "peft", accumulation)
        assert len(model.adapters) == len(list(n for n, _ in twin.named_parameters() if "lora_A" in n))
        for name, ad in model.adapters.items():
            want_a, want_b = peft_weights(twin, name)
            assert want_b.norm() > 0, f"{name}: PEFT's B did not train"
            assert rel_err(ad.lora_A.detach(), want_a) <= TOL, name
            assert rel_err(ad.lora_B.detach(), want_b) <= TOL, name


def test_torch_loop_with_accumulation_matches_in_process(servers, model_dirs, cache):
    """A plain loop: two forward/backward pairs per optimizer step, then AdamW, like the same loop in one process."""
    with DLoRAModelForCausalLM.connect(servers["llama"], LoraConfig(r=4, lora_alpha=8), cache=cache) as model:
        model.load_adapters(random_adapters(model.session.module_shapes()))
        ref, ref_adapters = reference_model(model_dirs["llama"], model.adapters)
        rows = dataset(model.config.vocab_size)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ref_opt = torch.optim.AdamW([p for a in ref_adapters.values() for p in a.parameters()], lr=1e-2)
        for step in range(2):
            for net, o in ((model, opt), (ref, ref_opt)):
                o.zero_grad()
                for micro in range(2):
                    batch = rows[4 * step + 2 * micro: 4 * step + 2 * micro + 2]
                    kw = {k: torch.stack([r[k] for r in batch]) for k in batch[0]}
                    (net(**kw).loss / 2).backward()
                o.step()
        for name, ad in model.adapters.items():
            assert rel_err(ad.lora_B.detach(), ref_adapters[name].lora_B.detach()) <= TOL, name
            assert rel_err(ad.lora_A.detach(), ref_adapters[name].lora_A.detach()) <= TOL, name


@pytest.mark.parametrize("how", ["graph dropped", "loss raised, next forward"])
def test_abandoned_forward_frees_the_step(how, servers, model_dirs, cache):
    """A forward whose backward never comes: the cloud frees the step, the session trains exactly afterwards."""
    with DLoRAModelForCausalLM.connect(servers["llama"], LoraConfig(r=4, lora_alpha=8), cache=cache) as model:
        model.load_adapters(random_adapters(model.session.module_shapes()))
        rows = dataset(model.config.vocab_size)
        kw = {k: torch.stack([r[k] for r in rows[:2]]) for k in rows[0]}
        session_id = model.session.session_id
        if how == "graph dropped":
            outputs = [model(**kw)]
            outputs.clear()   # the user drops the output before backward
            gc.collect()
            # The step's stream was given up by the finaliser: the session is free at once for a
            # call that does not go through the model (a park, which a busy session refuses).
            deadline = time.monotonic() + 10
            while True:
                try:
                    model.session.park({}, [])
                    break
                except Exception as exc:  # noqa: BLE001 - FAILED_PRECONDITION while the cloud frees it
                    assert "already running a step" in str(exc), exc
                    assert time.monotonic() < deadline, "the cloud never freed the abandoned step"
                    time.sleep(0.05)
        else:
            def users_loss():
                out = model(**kw)  # noqa: F841 - kept alive by the traceback, as in a real failure
                raise ZeroDivisionError("the user's loss code failed before backward")

            with pytest.raises(ZeroDivisionError):
                users_loss()
        # The next step trains exactly, on the same session.
        ref, ref_adapters = reference_model(model_dirs["llama"], model.adapters)
        model(**kw).loss.backward()
        ref(**kw).loss.backward()
        assert model.session.session_id == session_id
        for name, ad in model.adapters.items():
            assert rel_err(ad.lora_B.grad, ref_adapters[name].lora_B.grad) <= TOL, name


def test_backward_after_a_later_forward_is_refused(servers, cache):
    with DLoRAModelForCausalLM.connect(servers["llama"], LoraConfig(r=4, lora_alpha=8), cache=cache) as model:
        rows = dataset(model.config.vocab_size)
        kw = {k: torch.stack([r[k] for r in rows[:2]]) for k in rows[0]}
        first = model(**kw).loss
        second = model(**kw).loss
        with pytest.raises(RuntimeError, match="abandoned because another call reached the cloud"):
            first.backward()
        second.backward()   # the later step is whole
        assert all(ad.lora_B.grad is not None for ad in model.adapters.values())


def test_no_grad_uses_the_forward_path(servers, model_dirs, cache):
    with DLoRAModelForCausalLM.connect(servers["gpt2"], LoraConfig(r=4, lora_alpha=8), cache=cache) as model:
        model.load_adapters(random_adapters(model.session.module_shapes()))
        ref, _ = reference_model(model_dirs["gpt2"], model.adapters)
        kw = {k: torch.stack([r[k] for r in dataset(model.config.vocab_size)[:2]])
              for k in ("input_ids", "attention_mask")}
        steps = model.steps
        with torch.no_grad():
            got = model(**kw).logits
            want = ref(**kw).logits
        assert model.steps == steps                    # no training step was opened
        real = kw["attention_mask"].bool()
        assert rel_err(got[real], want[real]) <= TOL


def test_generate_equals_in_process_greedy(servers, model_dirs, cache):
    with DLoRAModelForCausalLM.connect(servers["llama"], LoraConfig(r=4, lora_alpha=8), cache=cache) as model:
        model.load_adapters(random_adapters(model.session.module_shapes()))
        ref, _ = reference_model(model_dirs["llama"], model.adapters)
        prompt = model.tokenizer("the match ended")["input_ids"]
        out = model.generate(torch.tensor([prompt]), max_new_tokens=10)
        got = out[0, len(prompt):].tolist()
        want, _ = reference_greedy(ref, prompt, 10)
        eos = model.tokenizer.eos_token_id
        got = [t for t in got if t != model.tokenizer.pad_token_id or t == eos]
        assert got == want[:len(got)] and (len(got) == 10 or want[len(got)] == eos)


def test_save_and_load_pretrained(servers, model_dirs, cache, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with DLoRAModelForCausalLM.connect(servers["gpt2"], LoraConfig(r=4, lora_alpha=8), cache=cache) as model:
        model.load_adapters(random_adapters(model.session.module_shapes()))
        model.save_pretrained(tmp_path / "adapters")
        ids = torch.stack([r["input_ids"] for r in dataset(model.config.vocab_size)[:2]])
        with torch.no_grad():
            logits = model(ids).logits
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dirs["gpt2"]),
                                           tmp_path / "adapters")
    with torch.no_grad():
        assert rel_err(logits, peft_model(input_ids=ids).logits) <= TOL
    with DLoRAModelForCausalLM.from_pretrained(tmp_path / "adapters", servers["gpt2"], cache=cache) as again:
        with torch.no_grad():
            assert rel_err(again(ids).logits, logits) <= TOL


def test_kill_revive_callback_parks_modules(servers, cache, tmp_path):
    """KR as a Trainer callback: at the selection step modules are parked on the cloud and stop changing."""
    with DLoRAModelForCausalLM.connect(servers["llama"], LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                                       cache=cache) as model:
        kr = KillRevive(model, KRConfig(policy="kr", budget=0.25, warmup_steps=1, period=100, unit="module"))
        trainer = trainer_run(model, dataset(model.config.vocab_size), tmp_path, callbacks=[kr.callback()])
        # Trainer's own checkpoint of this model holds the adapters, and only them.
        from safetensors.torch import load_file

        trainer.save_model(str(tmp_path / "saved"))
        saved = load_file(tmp_path / "saved" / "model.safetensors")
        assert len(saved) == 2 * len(model.adapters) and all(k.startswith("lora.") for k in saved)
        assert kr.steps == 3 and len(kr.changes) == 1
        killed = set(kr.changes[0].kill)
        assert killed and killed == model.session.parked
        assert len(kr.live) == max(1, int(0.25 * len(model.remote_adapters)))


def test_lora_config_fields_dlora_cannot_follow_are_refused():
    with pytest.raises(ValueError, match=re.escape("['use_dora']")):
        lora_settings(LoraConfig(use_dora=True))
    with pytest.raises(ValueError, match="regular expressions"):
        lora_settings(LoraConfig(target_modules=r".*proj"))
    s = lora_settings(LoraConfig(r=4, lora_alpha=16, target_modules=["self_attn.q_proj", "v_proj"], lora_dropout=0.1,
                                 use_rslora=True))
    assert (s.r, s.target_modules, s.lora_dropout, s.scale) == (4, ["q_proj", "v_proj"], 0.1, 8.0)


def test_splitlora_model_has_the_same_interface(servers, cache):
    """SplitLoRA as a model: blocks before the cut and their adapters here, the same forward/backward,
    and aggregate() for FedAvg."""
    from edge_client.remote_model import SplitLoRAModelForCausalLM

    with SplitLoRAModelForCausalLM.connect(servers["llama"], LoraConfig(r=4, lora_alpha=8), cut_layer=1,
                                           federation="api-test", cache=cache) as model:
        assert model.front is not None and not model.remote_adapters
        assert model.adapters and all(".0." in n for n in model.adapters)   # block 0's adapters only
        rows = dataset(model.config.vocab_size)
        kw = {k: torch.stack([r[k] for r in rows[:2]]) for k in rows[0]}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model(**kw).loss.backward()
        assert all(ad.lora_B.grad is not None and ad.lora_B.grad.norm() > 0 for ad in model.adapters.values())
        opt.step()
        clients, sent, received = model.aggregate(1, examples=2)
        assert clients == 1 and sent > 0 and received > 0
        with pytest.raises(ValueError, match="Kill and Revive"):
            KillRevive(model)
