"""`make bench-gpu`: every GPU figure in one run, written to bench/results/gpu/.

The first thing to run on a GPU host. On one CUDA device with the embedded
SmolLM2-135M it measures:
- the distributed step (the cloud on the GPU, this process the edge, over
  127.0.0.1) against the in-process LoRA step on the same GPU, for fp32 with
  whole adapter outputs, fp32 factorised, int8 factorised, and int8 in 4
  pipelined micro-batches (the wire of `--network wan`): median seconds,
  ratio and bytes per step;
- aggregate training tokens/s of 1 to 16 concurrent edges (separate
  processes) on one CUDA cloud, with cross-session batching on.
It is sized to finish within 8 minutes on one GPU. `--smoke` runs the same
code on a tiny Llama on the CPU (a test calls it), so the script is known to
work before a GPU is lent.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bench import report
from bench.many_edges import measure
from bench.step_time import bench_model
from cloud_server import launch
from cloud_server.model_store import ensure_default_model


def edge_rows(model_dir: Path, device: str, counts: list[int], edge: SimpleNamespace, tmp: Path) -> list[dict]:
    """Aggregate tokens/s of `counts` concurrent edges on one cloud, batching on (its default window)."""
    from edge_client.session import CloudSession

    args = ["--model", str(model_dir), "--device", device, "--max-sessions", str(max(counts) + 1),
            "--max-cohort-sessions", str(max(counts))]
    rows = []
    with launch.start(args, tmp / "edges.log", timeout=900) as server:
        with CloudSession(server.address) as probe:
            assets = probe.fetch_assets(tmp / "assets")
        for n in counts:
            print(f"[{time.strftime('%H:%M:%S')}] {n} concurrent edge(s) ...", flush=True)
            rows.append(measure(server.address, assets, n, edge))
            print(f"    {rows[-1]['tokens_per_s']:.0f} tokens/s, {rows[-1]['mean_batch_sessions']:.1f} sessions "
                  "per batch", flush=True)
    return rows


def tables(device_name: str, steps: list[dict], edges: list[dict]) -> str:
    intro = (f"Device: {device_name}. Step: batch 8 x up to 128 tokens, median of {steps[0]['reps']} steps; the "
             "edge is this process, on the CPU, over 127.0.0.1.")
    step_table = report.table(
        ["model", "wire", "in-process s", "distributed s", "ratio", "MB/step"],
        [[r["model"], r["wire"], f"{r['in_process_s']:.4f}", f"{r['distributed_s']:.4f}", f"{r['ratio']:.2f}x",
          f"{r['bytes_per_step'] / 1e6:.1f}"] for r in steps])
    one = edges[0]["tokens_per_s"] if edges else 1.0
    edge_table = report.table(
        ["concurrent edges", "aggregate tokens/s", "vs 1 edge", "sessions per batch", "s/step per edge"],
        [[r["clients"], f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s'] / one:.2f}x",
          f"{r['mean_batch_sessions']:.1f}", f"{r['s_per_step']:.2f}"] for r in edges])
    return "\n".join([intro, "", step_table, "", edge_table]) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="a tiny Llama on the CPU with few steps and edges: checks the script, measures nothing")
    p.add_argument("--wires", default="fp32+full,fp32,int8,int8+m4",
                   help="wires of the step rows: a dtype, factorised, or DTYPE+full for whole adapter outputs, "
                        "DTYPE+mM for M pipelined micro-batches (default: %(default)s)")
    p.add_argument("--edges", default=None, help="concurrent edge counts (default: 1,2,4,8,16; smoke: 1,2)")
    p.add_argument("--reps", type=int, default=None, help="measured steps per row (default: 5; smoke: 2)")
    p.add_argument("--out", type=Path, default=Path("bench/results/gpu"),
                   help="where results.json and table.md go (default: %(default)s)")
    args = p.parse_args()
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        p.error("no CUDA device here: make bench-gpu is for a GPU host (use --smoke to check the script on a CPU)")
    device = "cpu" if smoke else "cuda"
    counts = [int(c) for c in (args.edges or ("1,2" if smoke else "1,2,4,8,16")).split(",")]
    reps = args.reps or (2 if smoke else 5)
    wires = [w for w in args.wires.split(",") if w]
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if smoke:
            from bench.tiny_models import save_tiny
            label, model_dir = "tiny-llama (2 layers, h=32)", save_tiny("llama", tmp / "tiny")
        else:
            label, model_dir = "SmolLM2-135M (30 layers, h=576)", ensure_default_model()
        steps = []
        for wire in wires:
            print(f"[{time.strftime('%H:%M:%S')}] step time, {wire} wire ...", flush=True)
            steps.append(bench_model(label, model_dir, 8, 128, 1 if smoke else 2, reps, wire, tmp, device=device))
        edge = SimpleNamespace(batch_size=4, max_length=64, warmup=1, steps=2 if smoke else 3)
        edges = edge_rows(model_dir, device, counts, edge, tmp)
    name = "CPU (smoke)" if smoke else torch.cuda.get_device_name(0)
    text = tables(name, steps, edges)
    doc = {"device": name, "smoke": smoke, "seconds": time.monotonic() - started, "steps": steps, "edges": edges}
    report.write_json(args.out / "results.json", doc)
    (args.out / "table.md").write_text(text)
    print("\n" + text + f"\nwritten to {args.out} in {doc['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
