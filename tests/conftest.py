"""Shared fixtures: tiny checkpoints on disk, real cloud_server processes on 127.0.0.1, a labelled JSONL file."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

# Tests import helpers.py and certs.py from here, and bench/ and deploy/ (not installed packages) from the
# repository root, also under a bare `pytest` run from elsewhere.
sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]

from bench.tiny_models import save_tiny  # noqa: E402
from cloud_server import launch  # noqa: E402


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {kind: save_tiny(kind, root / kind) for kind in ("llama", "gpt2")}


@pytest.fixture(scope="session")
def servers(model_dirs, tmp_path_factory):
    """One real server per tiny model, started once for the whole run."""
    logs = tmp_path_factory.mktemp("logs")
    procs = {}
    try:
        for kind, path in model_dirs.items():
            procs[kind] = launch.start(["--model", str(path), "--device", "cpu", "--max-batch-tokens", "4096"],
                                       logs / f"{kind}.log", timeout=300)
        yield {kind: p.address for kind, p in procs.items()}
    finally:
        for p in procs.values():
            p.stop()


@pytest.fixture(params=["llama", "gpt2"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def jsonl(tmp_path) -> Path:
    """40 short sport/tech examples, alternating, as edge_client train reads them."""
    rng = random.Random(0)
    words = {"sport": ["goal", "match", "team"], "tech": ["phone", "chip", "code"]}
    path = tmp_path / "train.jsonl"
    with path.open("w") as f:
        for i in range(40):
            label = "sport" if i % 2 else "tech"
            f.write(json.dumps({"text": " ".join(rng.choice(words[label]) for _ in range(6)), "label": label}) + "\n")
    return path
