"""The equivalence matrix, placement x family: what a real cloud_server computes equals the same model in one process.

Each test is written once and parametrised by `placed`, a server of one placement and one family (ids such as
`cpu-llama`):

- `cpu`: the whole model on the CPU. The tiny Llama and GPT-2 are conftest's `servers`; every other family of
  the architecture matrix (docs/architectures.md) gets its own tiny random checkpoint and server.
- `offload`: `cloud_server --device-map`, block 0 mapped to "disk" and block 1 to the CPU. A CPU-only host has
  one execution device, so what runs is accelerate's offload path: block 0's weights stay in the checkpoint's
  safetensors (meta tensors in the model) and accelerate's hooks load them onto the CPU before each of its
  modules' forwards and drop them after. Taps wrap linears that carry those hooks, parked adapters and
  SplitLoRA's server-side adapters act on their outputs, SplitLoRA edges download block 0 from the offloaded
  weights, and generation keeps a KV cache through them. Moving tensors between several GPUs is the same code,
  not run here.

pytest groups a module-scoped param's tests, so at most one of the servers this module starts runs at a time.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bench.tiny_models import FAMILIES, save_tiny
from cloud_server import launch
from common.lora import LoRAAdapter, inject
from common.model_parts import is_linear, layer_index
from edge_client.generation import GenerateConfig, generate
from edge_client.trainer import EdgeTrainer, TrainConfig, open_session

from helpers import (
    EXAMPLES,
    assert_grads_match,
    assert_step_exact,
    connect,
    reference_greedy,
    reference_loss,
    reference_model,
    rel_err,
    train_alongside,
)

TOL = 1e-5
# Every family a server loads; test_architectures.py checks that the others are refused at load.
SUPPORTED = [f for f in FAMILIES if f != "opt-proj"]
EVERY_FAMILY = [f"cpu-{f}" for f in SUPPORTED]
BLOCKS = {"llama": "model.layers", "gpt2": "transformer.h"}


@dataclass(frozen=True)
class Placed:
    family: str
    address: str
    model_dir: Path


def offload_map(kind: str, path: Path) -> str:
    """Block 0 on the disk, block 1 on the CPU; the rest left out (it goes on the map's first GPU, else the CPU)."""
    blocks = BLOCKS[kind]
    path.write_text(json.dumps({f"{blocks}.0": "disk", f"{blocks}.1": "cpu"}))
    return str(path)


@pytest.fixture(scope="module")
def placed(request, model_dirs, tmp_path_factory):
    """The server of one `placement-family` param, started for it unless conftest's `servers` already has it."""
    placement, family = request.param.split("-", 1)
    if placement == "cpu" and family in model_dirs:
        yield Placed(family, request.getfixturevalue("servers")[family], model_dirs[family])
        return
    root = tmp_path_factory.mktemp(request.param)
    log = root / "server.log"
    if placement == "cpu":
        model_dir, args, env = save_tiny(family, root / "model"), ["--device", "cpu"], None
    elif placement == "offload":
        model_dir, env = model_dirs[family], {"DLORA_CACHE": str(root / "cache")}
        args = ["--device-map", offload_map(family, root / "map.json")]
    else:
        raise ValueError(f"no placement {placement!r}")
    with launch.start(["--model", str(model_dir), *args], log, timeout=300, env=env) as server:
        if placement == "offload":
            # The map took effect: block 0's modules carry accelerate's offload hooks.
            assert "modules are offloaded" in log.read_text()
        yield Placed(family, server.address, model_dir)


def all_linear_targets(model_dir) -> list[str]:
    """Leaf names of every linear inside the blocks: attention and MLP sites alike."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m) and layer_index(n) >= 0})


@pytest.mark.parametrize("placed", ["cpu-llama", "cpu-gpt2", "offload-llama", "offload-gpt2"], indirect=True)
def test_one_step_matches_in_process(placed, cache):
    """The master test (DESIGN.md section 2): loss and every A/B gradient of one distributed step within 1e-5
    of the same step in one process, the offloaded blocks' included."""
    edge = connect(placed.address, cache)
    try:
        assert_step_exact(edge, placed.model_dir, edge.batch(), tol=TOL)
    finally:
        edge.session.close()


@pytest.mark.parametrize("placed", EVERY_FAMILY, indirect=True)
def test_family_trains_exactly(placed, tmp_path):
    """The master test on every supported family, with every linear of the blocks adapted:
    loss and every A/B gradient of step 1 within 1e-5, then weights after 3 AdamW steps."""
    kind, model_dir = placed.family, placed.model_dir
    edge = connect(placed.address, tmp_path / "cache", targets=all_linear_targets(model_dir))
    worst = {"loss": 0.0, "gradients": 0.0, "weights": 0.0}
    try:
        model, ref = reference_model(model_dir, edge.adapters)
        opt = torch.optim.AdamW([p for a in edge.adapters.values() for p in a.parameters()], lr=1e-2)
        ref_opt = torch.optim.AdamW([p for a in ref.values() for p in a.parameters()], lr=1e-2)
        for step, idx in enumerate(([0, 1, 2, 3], [2, 3], [1, 0]), 1):
            batch = edge.batch([EXAMPLES[i] for i in idx])
            opt.zero_grad()
            ref_opt.zero_grad()
            loss = edge.step(step, batch)
            ref_loss = reference_loss(model, batch)
            ref_loss.backward()
            worst["loss"] = max(worst["loss"], abs(loss - ref_loss.item()) / abs(ref_loss.item()))
            assert worst["loss"] <= TOL, f"{kind} step {step}: loss"
            if step == 1:
                worst["gradients"] = assert_grads_match(edge.adapters, ref, TOL, what=f"{kind} ")
            opt.step()
            ref_opt.step()
        for name, ad in edge.adapters.items():
            for w in ("lora_A", "lora_B"):
                err = rel_err(getattr(ad, w).detach(), getattr(ref[name], w).detach())
                worst["weights"] = max(worst["weights"], err)
                assert err <= TOL, f"{kind} {name}.{w} after 3 AdamW steps: {err:.1e}"
        # Shown with `pytest -s`: the figures behind docs/architectures.md's table.
        print(f"\n{kind}: {len(edge.adapters)} adapted linears; worst relative error: " +
              ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    finally:
        edge.session.close()


@pytest.mark.parametrize("placed", [*EVERY_FAMILY, "offload-llama"], indirect=True)
def test_splitlora_equals_centralized(placed, tmp_path):
    """SplitLoRA with one client and I = 1 trains exactly what one process would: 4 steps at cut 1
    (FedAvg every step), then losses, client- and server-side adapters within 1e-5. The edge runs
    block 0 (learned positions, scaled embeddings and all; offloaded: from weights the cloud reads
    out of its offload), the cloud's view from the cut trains the server-side adapters."""
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig.of(server=placed.address, mode="splitlora", cut_layer=1, aggregate_every=1, clients=1,
                         federation=f"eq-{uuid.uuid4().hex}", r=4, lora_alpha=8.0, lr=1e-2, steps=4, seed=3,
                         cache=tmp_path / "cache", progress=False)
    with open_session(cfg) as session:
        trainer = EdgeTrainer(cfg, session)
        trainer.train_examples = 7
        trainer.label_ids = None  # the language-model loss, as Hugging Face computes it
        assert trainer.adapters and all(".0." in n for n in trainer.adapters)  # client side: block 0 only
        server, scale, updates = session.server_adapters()
        assert server and all(".1." in n for n in server) and updates == 0

        model = AutoModelForCausalLM.from_pretrained(placed.model_dir, dtype=torch.float32).eval()
        model.requires_grad_(False)
        ref = {n: LoRAAdapter.from_weights(a.lora_A, a.lora_B, a.scale) for n, a in trainer.adapters.items()}
        ref |= {n: LoRAAdapter.from_weights(a, b, scale) for n, (a, b) in server.items()}
        inject(model, ref)
        opt = torch.optim.AdamW([p for a in ref.values() for p in a.parameters()], lr=cfg.lr, weight_decay=0.0)

        for stats in train_alongside(trainer, model, opt, TOL):
            assert stats.sites == 0 and stats.block_flops > 0

        server, _, updates = session.server_adapters()
        assert updates == 4 and trainer.rounds == 4
        for name, ad in trainer.adapters.items():
            for w in ("lora_A", "lora_B"):
                got, want = getattr(ad, w).detach(), getattr(ref[name], w).detach()
                assert rel_err(got, want) <= TOL, f"client-side {name}.{w}: {rel_err(got, want):.2e}"
        for name, (a, b) in server.items():
            assert rel_err(a, ref[name].lora_A.detach()) <= TOL, f"server-side {name}.lora_A"
            assert rel_err(b, ref[name].lora_B.detach()) <= TOL, f"server-side {name}.lora_B"
            assert b.abs().sum() > 0  # trained: B starts at zero


NEW_TOKENS = 12


@pytest.mark.parametrize("placed", [*EVERY_FAMILY, "offload-llama"], indirect=True)
def test_generation_matches_full_recompute(placed, cache):
    """Greedy tokens and every logit the edge saw equal re-running the whole model per token: the
    cloud's KV cache (sliding windows, Gemma2's hybrid cache, offloaded blocks) loses nothing."""
    edge = connect(placed.address, cache)
    try:
        prompt = edge.tokenizer("the match ended")["input_ids"]
        seen: list[torch.Tensor] = []
        logits_fn = edge.edge.logits
        edge.edge.logits = lambda h: seen.append(logits_fn(h)[0]) or logits_fn(h)  # record what the edge saw
        result = generate(edge.session, edge.edge, edge.tokenizer, edge.adapters, prompt,
                          GenerateConfig(max_new_tokens=NEW_TOKENS, stop_at_eos=False))
        model, _ = reference_model(placed.model_dir, edge.adapters)
        want, want_logits = reference_greedy(model, prompt, NEW_TOKENS)
        assert result.token_ids == want
        for got, ref in zip(seen, want_logits):
            assert rel_err(got, ref) <= TOL
        # The KV cache: one pass per token, each site exchanging one position
        # after the prompt, so the bytes grow with prompt + new tokens, not with
        # their square.
        sites = len(edge.session.sites)
        assert result.stats.sites == NEW_TOKENS * sites
        width = edge.session.sites[0].modules[0].in_features
        positions = len(prompt) + NEW_TOKENS - 1
        assert result.stats.bytes_received <= 4 * width * positions * sites * 1.05 + 100 * result.stats.messages
    finally:
        edge.session.close()


@pytest.mark.parametrize("placed", ["cpu-llama", "cpu-gpt2", "offload-llama"], indirect=True)
def test_parked_modules_are_exact_and_cost_nothing(placed, cache):
    """Kill and Revive: parked modules (all of site 0's, offloaded or not, and one of site 1's where it has
    more) cost no round trip and fewer bytes and FLOPs, the step stays exact with them frozen, and reviving
    brings them back."""
    edge = connect(placed.address, cache, seed=3)
    try:
        batch = edge.batch()
        _, all_live = edge.train(1, batch)
        for a in edge.adapters.values():
            a.zero_grad()
        names = edge.session.module_names
        sites = edge.session.sites
        # Park every module of the first site and, on Llama, one module of the second.
        killed = [m.name for m in sites[0].modules] + ([sites[1].modules[1].name] if len(sites[1].modules) > 1 else [])
        sent, received = edge.session.park({n: edge.adapters[n] for n in killed}, [])
        assert sent > 0 and received > 0
        loss, stats = edge.train(2, batch)
        assert stats.sites == len(sites) - 1        # the all-parked site needs no round trip
        assert stats.bytes_sent + stats.bytes_received < all_live.bytes_sent + all_live.bytes_received
        assert stats.edge_flops < all_live.edge_flops
        model, ref = reference_model(placed.model_dir, edge.adapters)
        for n in killed:
            ref[n].requires_grad_(False)            # parked: frozen in the reference
        ref_loss = reference_loss(model, batch)
        ref_loss.backward()
        assert abs(loss - ref_loss.item()) <= TOL * abs(ref_loss.item())
        for n in names:
            for w in ("lora_A", "lora_B"):
                got, want = getattr(edge.adapters[n], w).grad, getattr(ref[n], w).grad
                if n in killed:
                    assert got is None and want is None, n
                else:
                    assert rel_err(got, want) <= TOL, f"{n}.{w}"
        # Reviving brings the module back onto the edge.
        edge.session.park({}, killed)
        _, back = edge.train(3, batch)
        assert back.sites == len(sites) and back.bytes_sent == all_live.bytes_sent
    finally:
        edge.session.close()
