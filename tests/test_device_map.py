"""`cloud_server --device-map`: maps are resolved or refused with the fix, and offloaded edge parts ship unchanged.

That a server with block 0 offloaded to disk trains (DLoRA and SplitLoRA), parks and generates exactly like
in-process is test_equivalence.py's `offload-*` cases.
"""
from __future__ import annotations

import pytest
import torch

from cloud_server.device_map import resolve

from helpers import cli


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
