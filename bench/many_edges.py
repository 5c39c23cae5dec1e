"""`make bench-edges`: aggregate training throughput of 1, 2, 4, 8 and 16 concurrent edges on one cloud.

Each edge is its own process (one torch thread) training LoRA on BBC News
against one cloud_server on 127.0.0.1. All edges start together and train
freely; the aggregate is every edge's real (unpadded) tokens over the wall
time from the first measured step to the last. Run once with cross-session
batching (the server default) and once with it off (--batch-window-ms 0), so
the table shows what batching adds to plain concurrency. Writes
bench/out/edges/results.json.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import report
from cloud_server import launch
from cloud_server.model_store import cache_root


def _worker(address: str, assets: str, batch_size: int, max_length: int, warmup: int, steps: int, seed: int,
            ready, start, out) -> None:
    """One edge: open a session, wait for the start signal, train, report its timings."""
    torch.set_num_threads(1)
    from bench.step_time import remote_step
    from common.lora import LoRAConfig
    from edge_client import data as datasets
    from edge_client.objective import make_batch
    from edge_client.remote_model import DLoRAModelForCausalLM, RemoteConfig
    from edge_client.session import CloudSession

    try:
        # The Python API's model on the assets the parent fetched once (every worker would fetch them again).
        lora, remote = LoRAConfig(r=8, lora_alpha=16.0), RemoteConfig(server=address, seed=seed)
        model = DLoRAModelForCausalLM(CloudSession.from_config(remote, lora), Path(assets), lora, remote)
        train_path, _ = datasets.bbc_news(cache_root())
        examples = datasets.load(train_path, datasets.BBC_TEMPLATE).examples
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ready.put(seed)
        start.wait()
        rows, t_start = [], None
        for step in range(1, warmup + steps + 1):
            at = (seed * 97 + step * batch_size) % (len(examples) - batch_size)
            batch = make_batch(model.tokenizer, examples[at:at + batch_size], max_length)
            if step == warmup + 1:
                t_start = time.perf_counter()
            _, stats = remote_step(model, batch, opt)
            if step > warmup:
                rows.append({"tokens": int(batch.attention_mask.sum()), "batch_sessions": stats.batch_sessions})
        out.put({"seed": seed, "start": t_start, "end": time.perf_counter(), "rows": rows})
        model.close()
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        out.put({"seed": seed, "error": f"{type(exc).__name__}: {exc}"})


def measure(address: str, assets: Path, clients: int, args) -> dict:
    ctx = mp.get_context("spawn")
    ready, out, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_worker, args=(address, str(assets), args.batch_size, args.max_length,
                                               args.warmup, args.steps, seed, ready, start, out))
             for seed in range(clients)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=600)
    start.set()
    results = [out.get(timeout=args.steps * 600) for _ in procs]
    for p in procs:
        p.join(60)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"{len(errors)} edge(s) failed; first: {errors[0]}")
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(row["tokens"] for r in results for row in r["rows"])
    sessions = [row["batch_sessions"] for r in results for row in r["rows"]]
    return {"clients": clients, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "mean_batch_sessions": statistics.fmean(sessions),
            "s_per_step": statistics.fmean((r["end"] - r["start"]) / len(r["rows"]) for r in results)}


def edges_table(rows: list[dict], first: int) -> str:
    """The Markdown table of every row, each against `first` edges with the same batching window."""
    headers = ["edges", "batching", "aggregate tokens/s", "vs 1 edge", "sessions per batch", "s/step per edge"]
    cells = []
    for row in rows:
        one = next(r for r in rows if r["clients"] == first and r["window_ms"] == row["window_ms"])
        label = f"window {row['window_ms']:g} ms" if row["window_ms"] else "off"
        cells.append([row["clients"], label, f"{row['tokens_per_s']:.0f}",
                      f"{row['tokens_per_s'] / one['tokens_per_s']:.2f}x", f"{row['mean_batch_sessions']:.1f}",
                      f"{row['s_per_step']:.2f}"])
    return report.table(headers, cells)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model the cloud serves (default: %(default)s)")
    p.add_argument("--device", default="auto", help="the cloud's device (default: %(default)s)")
    p.add_argument("--clients", default="1,2,4,8,16", help="concurrent edge counts (default: %(default)s)")
    p.add_argument("--windows", default="100,0",
                   help="batching windows in ms to compare; 0 is batching off (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per edge step (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per example (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps per edge (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="measured steps per edge (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench/out/edges"))
    args = p.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    windows = [float(w) for w in args.windows.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for window in windows:
        server_args = ["--model", args.model, "--device", args.device, "--max-sessions", str(max(counts) + 1),
                       "--batch-window-ms", f"{window:g}", "--max-cohort-sessions", str(max(counts))]
        with launch.start(server_args, args.out / f"cloud_server_w{window:g}.log") as server:
            from edge_client.session import CloudSession
            with CloudSession(server.address) as probe:
                assets = probe.fetch_assets(args.out / "assets")
            for n in counts:
                print(f"[{time.strftime('%H:%M:%S')}] window {window:g} ms, {n} edge(s) ...", flush=True)
                row = measure(server.address, assets, n, args) | {"window_ms": window}
                rows.append(row)
                print(f"    {row['tokens_per_s']:.0f} tokens/s, {row['mean_batch_sessions']:.1f} sessions per batch, "
                      f"{row['s_per_step']:.2f} s/step", flush=True)
    print()
    print(f"{args.model} on {args.device}, {torch.get_num_threads()} CPU threads here; each edge: batch "
          f"{args.batch_size} x up to {args.max_length} tokens, {args.steps} measured steps after "
          f"{args.warmup} warm-up")
    print(edges_table(rows, counts[0]))
    report.write_json(args.out / "results.json", {"args": vars(args) | {"out": str(args.out)}, "rows": rows})
    print(f"\nwritten to {args.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
