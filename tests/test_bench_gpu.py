"""`make bench-gpu` works before a GPU is lent: its --smoke mode runs the whole script on the CPU."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_gpu_smoke_writes_every_figure(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["smoke"] and [r["wire"] for r in doc["steps"]] == ["fp32+full", "fp32", "int8", "int8+m4"]
    for row in doc["steps"]:
        assert row["in_process_s"] > 0 and row["distributed_s"] > 0 and row["bytes_per_step"] > 0
    full, fp32, int8, parts = (r["bytes_per_step"] for r in doc["steps"])
    assert int8 < fp32 < full                     # factors, then int8, move fewer bytes
    assert parts > int8                           # 4 micro-batches: their own messages and factors
    assert [r["clients"] for r in doc["edges"]] == [1, 2] and all(r["tokens_per_s"] > 0 for r in doc["edges"])
    assert "| concurrent edges |" in (tmp_path / "table.md").read_text()


def test_bench_gpu_refuses_a_host_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device" in done.stderr
