"""Shared fixtures: tiny checkpoints on disk and real cloud_server processes on 127.0.0.1."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cloud_server import launch  # noqa: E402
from tiny_models import save_tiny  # noqa: E402


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
