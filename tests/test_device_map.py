"""`cloud_server --device-map`: a model placed by accelerate, part of it offloaded, trains exactly.

A CPU-only host has one execution device, so what runs here is accelerate's
offload path: block 0 is mapped to "disk", so its weights stay in the
checkpoint's safetensors (meta tensors in the model) and accelerate's hooks
load them onto the CPU before each of its modules' forwards and drop them
after; block 1 and the rest sit on the CPU. Taps wrap linears that carry
those hooks, parked adapters and SplitLoRA's server-side adapters act on
their outputs, SplitLoRA edges download block 0 from the offloaded weights,
and generation keeps a KV cache through them. With the whole model on the
disk, the edge's parts (embedding, final norm, LM head) are read from there
too. Moving tensors between several GPUs is the same code, not run here.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cloud_server import launch
from cloud_server.device_map import resolve

from helpers import (
    check_generation_matches_full_recompute,
    check_parked_modules_exact,
    check_split_equals_centralized,
    check_step_exact,
    cli,
    connect,
)

BLOCKS = {"llama": "model.layers", "gpt2": "transformer.h"}


def offload_map(kind: str, path) -> str:
    """Block 0 on the disk, block 1 on the CPU; the rest left out (it goes on the map's first GPU, else the CPU)."""
    blocks = BLOCKS[kind]
    path.write_text(json.dumps({f"{blocks}.0": "disk", f"{blocks}.1": "cpu"}))
    return str(path)


@pytest.fixture(scope="module")
def offloaded(model_dirs, tmp_path_factory):
    """Starts, on first use, a real server per tiny model with offload_map: offloaded(kind) -> (address, log)."""
    root = tmp_path_factory.mktemp("device-map")
    procs: dict[str, launch.ServerProcess] = {}

    def server(kind: str) -> tuple[str, Path]:
        log = root / f"{kind}.log"
        if kind not in procs:
            procs[kind] = launch.start(["--model", str(model_dirs[kind]), "--device-map",
                                        offload_map(kind, root / f"{kind}.json")], log, timeout=300,
                                       env={"DLORA_CACHE": str(root / "cache")})
        return procs[kind].address, log

    try:
        yield server
    finally:
        for p in procs.values():
            p.stop()


def test_a_step_with_offloaded_blocks_matches_in_process(kind, offloaded, model_dirs, cache):
    address, log = offloaded(kind)
    # The map took effect: block 0's modules carry accelerate's offload hooks.
    assert "modules are offloaded" in log.read_text()
    edge = connect(address, cache)
    try:
        check_step_exact(edge, model_dirs[kind], edge.batch(), tol=1e-5)
    finally:
        edge.session.close()


def test_parked_adapters_and_generation_under_the_map(offloaded, model_dirs, cache):
    """Kill and Revive parks block 0's site, the offloaded one; generation's KV cache runs through it."""
    address, _ = offloaded("llama")
    check_parked_modules_exact(address, model_dirs["llama"], cache)
    check_generation_matches_full_recompute(address, model_dirs["llama"], cache)


def test_splitlora_under_the_map(offloaded, model_dirs, tmp_path):
    """The edge runs block 0 from weights the cloud reads out of its offload; the cloud's view
    from the cut trains server-side adapters."""
    check_split_equals_centralized(offloaded("llama")[0], model_dirs["llama"], tmp_path)


def test_offloaded_edge_parts_ship_the_same_assets(model_dirs, tmp_path, monkeypatch):
    """The whole model on the disk, embedding, final norm and LM head too: the probe and the
    weights edges download (SplitLoRA's block 0 included) are those of the model in memory."""
    from cloud_server.served_model import ServedModel

    monkeypatch.setenv("DLORA_CACHE", str(tmp_path))
    plain, offloaded = (ServedModel(str(model_dirs["llama"]), device_map=m) for m in (None, {"": "disk"}))
    assert offloaded.device == torch.device("cpu")
    assert [(a.name, a.sha256) for a in offloaded.assets] == [(a.name, a.sha256) for a in plain.assets]
    assert offloaded.block_asset(1).sha256 == plain.block_asset(1).sha256


@pytest.mark.parametrize("content, message", [
    (None, "cannot read it"),
    ("{not json", "not JSON"),
    ("[0, 1]", "not a JSON object"),
    ('{"model.layer.0": "cpu"}', "no module named 'model.layer.0'"),
    ('{"model.layers.0": "gpu7"}', "'gpu7' is not a device"),
    ('{"model.layers.0": true}', "True is not a device"),
    ('{"model.layers.0": "meta"}', "'meta' is not a device"),
])
def test_bad_maps_are_refused_with_the_fix(content, message, model_dirs, tmp_path):
    path = tmp_path / "map.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match="--device-map") as err:
        resolve(str(path), model_dirs["llama"], torch.float32)
    assert message in str(err.value)
    assert "e.g." in str(err.value) or "use a GPU index" in str(err.value)  # says what to write instead


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU index is valid on a CUDA host")
def test_a_gpu_this_host_lacks_is_refused(model_dirs):
    with pytest.raises(ValueError, match="0 cuda devices here"):
        resolve({"model.layers.0": 0}, model_dirs["llama"], torch.float32)


def test_auto_fills_this_host(model_dirs):
    """'auto': the tiny model fits on the first GPU, or on a host without one, the CPU; nothing offloaded."""
    dmap = resolve("auto", model_dirs["llama"], torch.float32)
    assert dmap and set(dmap.values()) == ({0} if torch.cuda.is_available() else {"cpu"})


def test_cloud_server_exits_2_on_a_bad_map(model_dirs, tmp_path):
    bad = tmp_path / "map.json"
    bad.write_text('{"model.layers.9": "cpu"}')
    res = cli("cloud_server", "--model", str(model_dirs["llama"]), "--device-map", str(bad), timeout=120)
    assert res.returncode == 2, res.stderr
    assert f"cloud_server: --device-map {bad}: this model has no module named 'model.layers.9'" in res.stderr
    from cloud_server.cli import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(["--device", "cpu", "--device-map", "auto"])
    assert exit_.value.code == 2
