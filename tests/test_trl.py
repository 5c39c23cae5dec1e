"""TRL's SFTTrainer drives DLoRAModelForCausalLM: it trains, and its adapters equal those SFTTrainer trains on the
same model in one process (same data order, same loss, same optimizer; fp32: SFTConfig defaults to bf16
autocast); what DLoRA cannot give is refused."""
from __future__ import annotations

import pytest
import torch

from helpers import connect, reference_model, rel_err

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

PAIRS = [(f"count {i}:", f" {i + 1}") for i in range(8)]


def sft(model, tokenizer, out, **settings):
    data = datasets.Dataset.from_list([{"prompt": p, "completion": c} for p, c in PAIRS])
    args = trl.SFTConfig(str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                         save_strategy="no", use_cpu=True, seed=0, data_seed=0, logging_steps=1,
                         disable_tqdm=True, bf16=False, **({"gradient_checkpointing": False} | settings))
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_sft_trainer_equals_in_process_sft(servers, model_dirs, cache, tmp_path):
    edge = connect(servers["llama"], cache)
    try:
        local, ref = reference_model(model_dirs["llama"], edge.adapters)
        start = {n: a.lora_B.detach().clone() for n, a in edge.adapters.items()}
        losses = sft(edge.model, edge.tokenizer, tmp_path / "dlora")
        want = sft(local, edge.tokenizer, tmp_path / "local")
        assert len(losses) == 3 and losses == pytest.approx(want, rel=1e-5)
        for name, a in edge.adapters.items():
            assert not torch.equal(a.lora_B, start[name]), f"{name} did not train"
            for w in ("lora_A", "lora_B"):
                err = rel_err(getattr(a, w).detach(), getattr(ref[name], w).detach())
                assert err < 1e-5, f"{name}.{w}: relative error {err:.2e}"
    finally:
        edge.session.close()


def test_what_dlora_cannot_give_is_refused(servers, cache, tmp_path):
    edge = connect(servers["llama"], cache)
    try:
        with pytest.raises(ValueError, match="gradient checkpointing does not apply"):
            sft(edge.model, edge.tokenizer, tmp_path / "gc", gradient_checkpointing=True)
    finally:
        edge.session.close()
