"""`make bench-tasks` end to end on a tiny model: every variant trains, the table and plots are written, and a
second invocation reuses the finished runs instead of training them again."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.tiny_models import save_tiny

ROOT = Path(__file__).resolve().parent.parent


def bench(model_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bench.tasks", "--models", str(model_dir), "--tasks", "bbc", "--steps", "3",
           "--batch-size", "2", "--eval-limit", "4", "--seeds", "0", "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_every_variant_then_reuse(tmp_path):
    model = save_tiny("llama", tmp_path / "models" / "llama", layers=4)   # SplitLoRA's cut 2 leaves 2 on the cloud
    out = tmp_path / "out"
    done = bench(model, out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    rows = {r["variant"]: r for r in doc["rows"]}
    assert list(rows) == ["zero-shot", "dlora", "dlora-kr", "wan", "splitlora-k2"]
    assert all(0.0 <= r["score"] <= 1.0 and r["examples"] == 4 for r in rows.values())
    assert rows["wan"]["mb_step"] < rows["dlora"]["mb_step"]          # int8 and KR send fewer bytes
    assert all(rows[v]["seconds_per_step"] > 0 and rows[v]["edge_peak_rss_mb"] > 0 for v in rows if v != "zero-shot")
    table = (out / "table.md").read_text()
    assert "| llama | bbc | dlora-kr |" in table and "bytes -" in table
    assert (out / "loss-llama-bbc.png").stat().st_size > 0
    again = bench(model, out)
    assert again.returncode == 0 and again.stdout.count("    reusing ") == 4
    assert json.loads((out / "results.json").read_text())["rows"] == doc["rows"]


def test_generative_task_scores_rouge_where_the_run_can_generate(tmp_path):
    model = save_tiny("llama", tmp_path / "models" / "llama", layers=4)
    out = tmp_path / "out"
    done = bench(model, out, "--tasks", "aclsum", "--variants", "dlora,splitlora-k2", "--eval-limit", "2",
                 "--max-length", "250")   # a byte tokenizer: summaries of up to 224 bytes
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert 0.0 <= rows["dlora"]["score"] <= 1.0 and 0.0 <= rows["zero-shot"]["score"] <= 1.0
    assert rows["splitlora-k2"]["score"] is None     # its blocks on the device: it cannot generate
    assert "| llama | aclsum | splitlora-k2 | — |" in (out / "table.md").read_text()
