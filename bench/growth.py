"""`make bench-growth`: how a DLoRA step's cost grows with the model, SmolLM2 → Gemma 3 270M → Qwen2.5 0.5B.

Per model, all on this machine's CPU, fp32 wire, factorised, every served module live (rank 8, the
default q/k/v targets), batch 8 of BBC News at up to 128 tokens:
- the distributed step against the in-process LoRA step, side by side in each of --runs runs
  (bench/step_time.py's measurement), and the median of their ratios;
- bytes on the wire per step, sent + received;
- the edge's peak memory and compute per step, from a short `edge_client train` process of its own (so its
  RSS is the edge's alone), against the same kind of server.
Then a line fit of bytes per step on (blocks x (hidden + r x modules)): what the trend predicts for a
7-8B model (Llama 3 8B's shape) is printed with that arithmetic. Models that are not converted are
skipped with the command that converts them. Writes OUT/results.json and OUT/table.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import report
from bench.step_time import bench_model, over_runs
from cloud_server import launch
from cloud_server import model_registry as reg

MODELS = ("smollm2-135m", "gemma-3-270m", "qwen2.5-0.5b")
RANK, SITE_MODULES = 8, 3          # the default LoRA: rank 8 on q, k, v (one site per block)
# Llama 3 8B's shape, for the projection: 32 blocks, hidden 4096, vocab 128,256, untied head.
TARGET = {"name": "Llama 3 8B", "blocks": 32, "hidden": 4096, "vocab": 128_256, "params": 8.03e9}


def edge_run(name: str, cache: Path, steps: int, batch_size: int) -> dict:
    """The summary of a short `edge_client train` against a fresh server of `name`: the edge's own peak RSS,
    GFLOP and bytes per step."""
    out = cache / f"edge-{name}"
    with launch.start(["--model", name, "--device", "cpu"], cache / f"edge-{name}.log", timeout=1800) as server:
        cmd = [sys.executable, "-m", "edge_client", "train", "--server", server.address, "--data", "bbc",
               "--steps", str(steps), "--batch-size", str(batch_size), "--no-eval-before", "--eval-limit", "8",
               "--no-progress", "--out", str(out)]
        with open(cache / f"edge-{name}.train.log", "w") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"{name}: edge_client train failed (exit {rc}); see {cache / f'edge-{name}.train.log'}")
    return json.loads((out / "run.json").read_text())["summary"]


def shape(name: str) -> dict:
    m = reg.get(name)
    return {"blocks": m.block_count, "hidden": m.embedding_length}


def fit_bytes(rows: list[dict]) -> tuple[float, float]:
    """Least squares of bytes/step on blocks x (hidden + r x modules): a site's input and its gradient
    cross at full width, its factors at rank r. Returns (bytes per unit, intercept)."""
    xs = torch.tensor([r["blocks"] * (r["hidden"] + RANK * SITE_MODULES) for r in rows], dtype=torch.float64)
    ys = torch.tensor([r["bytes_per_step"] for r in rows], dtype=torch.float64)
    a = torch.stack([xs, torch.ones_like(xs)], 1)
    slope, intercept = torch.linalg.lstsq(a, ys[:, None]).solution[:, 0].tolist()
    return slope, intercept


def render(rows: list[dict], args, wall: float) -> str:
    lines = [f"CPU, {torch.get_num_threads()} torch threads, 127.0.0.1, fp32 wire, factorised, rank {RANK} on q/k/v, "
             f"batch {args.batch_size}; step times: median of {args.reps} steps after {args.warmup}, in the run "
             f"with the median ratio of {args.runs} (the ratio: their median, range in brackets); "
             f"edge columns from a {args.edge_steps}-step `edge_client train`; {wall / 60:.0f} min in all.", "",
             report.table(["model", "blocks", "hidden", "MB/step", "edge peak RSS GB", "edge GFLOP/step",
                           "in-process s", "distributed s", "ratio"],
                          [[r["model"], r["blocks"], r["hidden"], f"{r['bytes_per_step'] / 1e6:.1f}",
                            f"{r['edge_peak_rss_mb'] / 1024:.2f}", f"{r['edge_gflop_step']:.2f}",
                            f"{r['in_process_s']:.2f}", f"{r['distributed_s']:.2f}",
                            f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"]
                           for r in rows])]
    if len(rows) >= 2:
        slope, intercept = fit_bytes(rows)
        t = TARGET
        units = t["blocks"] * (t["hidden"] + RANK * SITE_MODULES)
        lines += ["", f"bytes/step ~ {slope:.1f} x blocks x (hidden + {RANK} x {SITE_MODULES}) "
                  f"+ {intercept / 1e6:.2f} MB "
                  f"(fit on {len(rows)} models); {t['name']} ({t['blocks']} blocks, hidden {t['hidden']}): "
                  f"{slope:.1f} x {units:,} = {(slope * units + intercept) / 1e6:.0f} MB per step at this batch; "
                  f"its embedding + untied head in fp32 on the edge: 2 x {t['vocab']:,} x {t['hidden']} x 4 B = "
                  f"{2 * t['vocab'] * t['hidden'] * 4 / 1e9:.1f} GB."]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated named models (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example at most (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (default: %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="timed steps per side (default: %(default)s)")
    p.add_argument("--runs", type=int, default=3,
                   help="runs per model, each with a fresh server; the ratio is their median (default: %(default)s)")
    p.add_argument("--edge-steps", type=int, default=3,
                   help="steps of the edge-memory run (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench/out/growth"), help="where results go")
    args = p.parse_args()
    start, rows = time.monotonic(), []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        for name in [m for m in args.models.split(",") if m]:
            model_dir = reg.converted_dir(reg.get(name))
            if not reg.is_converted(model_dir):
                print(f"skipping {name}: not converted (python -m cloud_server.model_registry install {name})")
                continue
            runs = []
            for i in range(args.runs):
                print(f"[{time.strftime('%H:%M:%S')}] {name}: distributed against in-process, run {i + 1}/"
                      f"{args.runs} ...", flush=True)
                runs.append(bench_model(name, model_dir, args.batch_size, args.max_length, args.warmup, args.reps,
                                        "fp32", cache))
                print(f"    {runs[-1]['distributed_s']:.2f} s against {runs[-1]['in_process_s']:.2f} s "
                      f"({runs[-1]['ratio']:.2f}x), {runs[-1]['bytes_per_step'] / 1e6:.1f} MB", flush=True)
            timing = over_runs(runs)
            print(f"[{time.strftime('%H:%M:%S')}] {name}: the edge's memory ...", flush=True)
            edge = edge_run(name, cache, args.edge_steps, args.batch_size)
            rows.append({**shape(name), **timing, "model": name, "edge_peak_rss_mb": edge["edge_peak_rss_mb"],
                         "edge_gflop_step": edge["edge_flops_per_step"] / 1e9,
                         "train_mb_step": (edge["bytes_sent_per_step"] + edge["bytes_received_per_step"]) / 1e6})
            report.write_json(args.out / "results.json", {"args": vars(args) | {"out": str(args.out)}, "rows": rows})
    if not rows:
        raise SystemExit("no model is converted: make models")
    text = render(rows, args, time.monotonic() - start)
    (args.out / "table.md").write_text(text + "\n")
    print()
    print(text)
    print(f"\nwritten to {args.out}/results.json and table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
