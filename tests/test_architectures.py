"""The architecture matrix's other half: the families a server refuses at load, and the checks that keep an edge
or a cut view from training silently wrong. That every family it loads trains, splits and generates exactly like
in-process is test_equivalence.py."""
from __future__ import annotations

import pytest
import torch

from bench.tiny_models import save_tiny
from cloud_server import launch
from cloud_server.served_model import ServedModel
from common.model_parts import UnsupportedModel
from edge_client.edge_model import EdgeModel

# Families DLoRA refuses, with words the refusal must contain: the family and what is missing
# (test_equivalence.py's SUPPORTED is the rest of bench.tiny_models.FAMILIES).
REFUSED = {"opt-proj": ("opt", "project_in", "word_embed_proj_dim")}


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
