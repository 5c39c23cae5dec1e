"""The architecture matrix: every family a server loads trains exactly like in-process, or is refused at load."""
from __future__ import annotations

import pytest
import torch

from bench.tiny_models import FAMILIES, save_tiny
from cloud_server import launch
from cloud_server.served_model import ServedModel
from common.model_parts import UnsupportedModel, is_linear, layer_index
from edge_client.edge_model import EdgeModel

from helpers import (
    EXAMPLES,
    check_generation_matches_full_recompute,
    check_grads,
    check_split_equals_centralized,
    connect,
    reference_loss,
    reference_model,
    rel_err,
)

TOL = 1e-5
# Families DLoRA refuses, with words the refusal must contain: the family and what is missing.
REFUSED = {"opt-proj": ("opt", "project_in", "word_embed_proj_dim")}
SUPPORTED = [f for f in FAMILIES if f not in REFUSED]


def all_linear_targets(model_dir) -> list[str]:
    """Leaf names of every linear inside the blocks: attention and MLP sites alike."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m) and layer_index(n) >= 0})


@pytest.fixture(scope="module", params=SUPPORTED)
def family_server(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model_dir = save_tiny(request.param, root / "model")
    with launch.start(["--model", str(model_dir), "--device", "cpu"], root / "server.log", timeout=300) as server:
        yield request.param, model_dir, server.address


def test_family_trains_exactly(family_server, tmp_path):
    """The master test on every supported family, with every linear of the blocks adapted:
    loss and every A/B gradient of step 1 within 1e-5, then weights after 3 AdamW steps."""
    kind, model_dir, address = family_server
    edge = connect(address, tmp_path / "cache", targets=all_linear_targets(model_dir))
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
                worst["gradients"] = check_grads(edge.adapters, ref, TOL, what=f"{kind} ")
            opt.step()
            ref_opt.step()
        for name, ad in edge.adapters.items():
            for w in ("lora_A", "lora_B"):
                err = rel_err(getattr(ad, w).detach(), getattr(ref[name], w).detach())
                worst["weights"] = max(worst["weights"], err)
                assert err <= TOL, f"{kind} {name}.{w} after 3 AdamW steps: {err:.1e}"
        # Shown with `pytest -s`: the figures behind the README's architecture table.
        print(f"\n{kind}: {len(edge.adapters)} adapted linears; worst relative error: " +
              ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    finally:
        edge.session.close()


def test_family_splitlora_is_exact(family_server, tmp_path):
    """SplitLoRA on every supported family: the edge runs block 0 (learned positions,
    scaled embeddings and all), the cloud the rest with its own adapters."""
    _, model_dir, address = family_server
    check_split_equals_centralized(address, model_dir, tmp_path)


def test_family_generates_exactly(family_server, tmp_path):
    """Generation on every supported family: the cloud's KV cache (sliding windows,
    Gemma2's hybrid cache) gives the tokens and logits of a full re-run per token."""
    _, model_dir, address = family_server
    check_generation_matches_full_recompute(address, model_dir, tmp_path / "cache")


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_family_is_refused_at_load(kind, tmp_path):
    model_dir = save_tiny(kind, tmp_path / "model")
    log = tmp_path / "server.log"
    with pytest.raises(RuntimeError, match="exited with 2"):
        launch.start(["--model", str(model_dir), "--device", "cpu"], log, timeout=300)
    text = log.read_text()
    assert "Traceback" not in text, text
    for word in REFUSED[kind]:
        assert word in text, text


@pytest.fixture(scope="module")
def probe_assets(tmp_path_factory):
    """Edge assets of Gemma and Gemma2, the two families an unchecked edge once trained silently wrong,
    and of Gemma 3, which scales its embedding the same way."""
    root = tmp_path_factory.mktemp("probe")
    out = {}
    for kind in ("gemma", "gemma2", "gemma3"):
        served = ServedModel(str(save_tiny(kind, root / kind)), device="cpu")
        out[kind] = root / f"{kind}-assets"
        out[kind].mkdir()
        for asset in served.assets:
            (out[kind] / asset.name).write_bytes(asset.data)
    return out


@pytest.mark.parametrize("kind", ["gemma", "gemma3"])
def test_probe_refuses_an_edge_without_the_embedding_scale(probe_assets, kind):
    """Gemma's and Gemma 3's sqrt(hidden) embedding scale lives in a non-persistent buffer, which a
    checkpoint does not carry: an edge that lost it must refuse to train."""
    edge = EdgeModel.from_assets(probe_assets[kind])  # the real edge passes its own check
    assert edge.embedding.embed_scale.item() == pytest.approx(32 ** 0.5)
    edge.embedding.embed_scale.fill_(1.0)
    with pytest.raises(UnsupportedModel, match=f"{kind}: the edge's embedding output differs"):
        edge.verify(probe_assets[kind], kind)


def test_probe_refuses_an_edge_without_logit_softcapping(probe_assets):
    """Gemma2 soft-caps the final logits after the LM head: an edge that skips it must refuse."""
    edge = EdgeModel.from_assets(probe_assets["gemma2"])
    edge.transform = None
    with pytest.raises(UnsupportedModel,
                       match=r"gemma2: the edge's output of the final norm \+ LM head \(the logits\) differs"):
        edge.verify(probe_assets["gemma2"], "gemma2")


def test_cloud_refuses_a_cut_view_that_does_not_reproduce_the_model(tmp_path):
    """Gemma2 picks each block's attention (sliding or full) by its index in the config's
    layer_types: a view from block 1 that kept block 0's entry must be refused."""
    import copy

    served = ServedModel(str(save_tiny("gemma2", tmp_path / "gemma2")), device="cpu")
    good = served.view(1)  # built and checked: the real view passes
    broken = copy.copy(good)
    broken.config = copy.deepcopy(good.config)
    broken.config.layer_types = served.inner.config.layer_types[:1]  # block 0's kind, not block 1's
    with pytest.raises(UnsupportedModel, match=r"gemma2: the cloud's output of blocks 1\.\.1 \(SplitLoRA at cut 1\)"):
        served._check_view(1, broken)


def test_cut_checks_ignore_other_sessions_steps(tmp_path):
    """A cut view is checked while other sessions' steps run through the same blocks:
    the check must read its own probe's activations, never theirs."""
    import threading

    served = ServedModel(str(save_tiny("llama", tmp_path / "llama", layers=4)), device="cpu")
    stop = threading.Event()

    def other_session() -> None:
        x, mask = torch.randn(3, 7, served.meta.hidden_size), torch.ones(3, 7, dtype=torch.long)
        with torch.no_grad():
            while not stop.is_set():
                served.inner(inputs_embeds=x, attention_mask=mask, use_cache=False)

    thread = threading.Thread(target=other_session)
    thread.start()
    try:
        for i in range(30):
            cut = 1 + i % 3
            served._check_view(cut, served._build_view(cut))
    finally:
        stop.set()
        thread.join()
