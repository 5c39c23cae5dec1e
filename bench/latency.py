"""`make bench-latency`: step time on a WAN, from round trips and bytes measured on loopback.

A step of DLoRA is a chain of sequential round trips (2 per live site plus 2)
carrying its bytes; SplitLoRA needs 2 round trips per step. So on a link of
round-trip time RTT and bandwidth B:

    step time ~= loopback step time + round trips x RTT + bytes / B

This bench measures each variant's loopback step time, bytes and round trips
on SmolLM2 + BBC News, fills in the model for every link in the grid, and
checks it by running steps through a user-space delay proxy (bench/netem.py)
wherever a step is predicted to take at most --measure-below seconds.

Pipelined variants (`--micro-batches M`) cut each step's batch into M parts in
flight at once, so the link's time overlaps the two sides' compute: their step
is not the sum above but nearer its floor, max(loopback step, the busier
direction's bytes / B) (the link is full duplex). The
second table gives each measured step against that floor and against the
variant's own loopback step (the goal: <= 1.4x at 50 ms, 10 Mbit/s).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench import report
from bench.netem import DelayProxy, Link
from cloud_server import launch
from edge_client.kill_revive import KRConfig
from edge_client.objective import make_batch
from edge_client.trainer import EdgeTrainer, TrainConfig, batches, load_splits, open_session

# KR at its steady state from the second step on: one selection after step 1, none after.
VARIANTS = {
    "dlora (all 30 sites)": {},
    "dlora + KR site units (3 sites)": {"kr": KRConfig(policy="kr", unit="site", warmup_steps=1, period=10_000)},
    "splitlora, cut 4": {"mode": "splitlora", "cut_layer": 4},
    # `--network wan`: int8 on the wire, factorised, KR with site units.
    "dlora --network wan (3 sites)": {"wire_dtype": "int8",
                                      "kr": KRConfig(policy="kr", unit="site", warmup_steps=1, period=10_000)},
    # The same, pipelined: each step's 8 rows in 2, 4 or 8 micro-batches in flight at once.
    **{f"dlora --network wan + {m} micro-batches": {
        "wire_dtype": "int8", "micro_batches": m,
        "kr": KRConfig(policy="kr", unit="site", warmup_steps=1, period=10_000)} for m in (2, 4, 8)},
}
LINKS = [Link(1, 100), Link(10, 100), Link(50, 100), Link(1, 10), Link(10, 10), Link(50, 10)]


def measure(address: str, name: str, steps: int, cache: Path, settings: dict | None = None) -> dict:
    """Mean step time, bytes and round trips over `steps` steps after one warm step, for
    VARIANTS[name] (or, given, `settings`: TrainConfig fields)."""
    settings = VARIANTS[name] if settings is None else settings
    cfg = TrainConfig.of(server=address, cache=cache, progress=False, seed=0, client_name=f"bench-{name}"[:64],
                         federation=f"latency-{time.time_ns()}", **settings)
    train, _, _ = load_splits(cfg)
    with open_session(cfg) as session:
        trainer = EdgeTrainer(cfg, session)
        trainer.train_examples = len(train.examples)
        trainer.set_objective(train)
        it = batches(train.examples, cfg.batch_size, cfg.remote.seed)
        rows = []
        for i in range(steps + 1):
            batch = make_batch(trainer.tokenizer, next(it), cfg.max_length)
            t0 = time.perf_counter()
            _, stats, _ = trainer.train_step(batch)
            if i:
                rows.append((time.perf_counter() - t0, stats))
    n = len(rows)
    live_sites = sum(s.sites for _, s in rows) / n
    return {"seconds": sum(t for t, _ in rows) / n,
            "bytes": sum(s.bytes_sent + s.bytes_received for _, s in rows) / n,
            "bytes_sent": sum(s.bytes_sent for _, s in rows) / n,
            "bytes_received": sum(s.bytes_received for _, s in rows) / n,
            # start -> ... -> end: one round trip per site each way, plus the final hidden and its gradient.
            "round_trips": 2 * live_sites + 2}


def predict(base: dict, link: Link) -> float:
    return base["seconds"] + base["round_trips"] * link.rtt_ms / 1000 + base["bytes"] / link.bytes_per_second


def from_run(path: Path) -> dict:
    """Loopback figures of a finished training run (its run.json), after any warm-up."""
    doc = json.loads(path.read_text())
    kr = doc["config"]["kr"]
    warm = kr["warmup_steps"] + 1 if kr["policy"] != "all" else 1
    rows = [h for h in doc["history"] if h["step"] > warm] or doc["history"]
    n = len(rows)
    return {"seconds": sum(h["seconds"] for h in rows) / n,
            "bytes": sum(h["bytes_sent"] + h["bytes_received"] for h in rows) / n,
            "round_trips": 2 * sum(h["site_exchanges"] for h in rows) / n + 2}


def floor(base: dict, link: Link) -> float:
    """The least a step can take on `link` when the link overlaps the compute: the loopback step, or the
    time of the busier direction's bytes on the link (it is full duplex, as the proxy's), whichever is longer."""
    busier = max(base.get("bytes_sent", base["bytes"]), base.get("bytes_received", 0.0))
    return max(base["seconds"], busier / link.bytes_per_second)


def print_overlap(results: dict) -> None:
    """Each measured link cell against its floor and its variant's own loopback step."""
    headers = ["variant", "loopback s"]
    links = [(c["rtt_ms"], c["mbit"]) for c in next(iter(results.values()))["links"]]
    for rtt, mbit in links:
        headers += [f"{rtt:g} ms, {mbit:g} Mbit/s: measured s", "floor s", "x loopback"]
    rows = []
    for name, r in results.items():
        b = r["loopback"]
        row = [name, f"{b['seconds']:.2f}"]
        for c in r["links"]:
            if c["measured"] is None:
                row += ["—", f"{c['floor']:.2f}", "—"]
            else:
                row += [f"{c['measured']:.2f}", f"{c['floor']:.2f}", f"{c['measured'] / b['seconds']:.2f}"]
        rows.append(row)
    print(report.table(headers, rows))


def parse_links(text: str) -> list[Link]:
    """'10/100,50/10' -> links of 10 ms RTT at 100 Mbit/s and 50 ms at 10 Mbit/s."""
    try:
        return [Link(float(r), float(m)) for r, m in (item.split("/") for item in text.split(",") if item)]
    except ValueError:
        raise SystemExit(f"--links takes RTT_MS/MBIT pairs, comma-separated (e.g. 10/100,50/10), got {text!r}") \
            from None


def print_table(title: str, results: dict) -> None:
    print(title)
    links = [(c["rtt_ms"], c["mbit"]) for c in next(iter(results.values()))["links"]]
    headers = ["variant", "MB/step", "round trips/step", "loopback s",
               *(f"{rtt:g} ms, {mbit:g} Mbit/s" for rtt, mbit in links)]
    rows = []
    for name, r in results.items():
        b = r["loopback"]
        cells = [f"{c['predicted']:.1f}" + (f" ({c['measured']:.1f})" if c["measured"] is not None else "")
                 for c in r["links"]]
        rows.append([name, f"{b['bytes'] / 1e6:.1f}", f"{b['round_trips']:.0f}", f"{b['seconds']:.2f}", *cells])
    print(report.table(headers, rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3,
                   help="measured steps per cell, after one warm step (default: %(default)s)")
    p.add_argument("--measure-below", type=float, default=20.0,
                   help="run a link through the delay proxy when its predicted step time is at most this many "
                        "seconds; longer cells are predicted only (default: %(default)s)")
    p.add_argument("--model", default="smollm2-135m", help="model the cloud serves (default: %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated variants to run (default: all of %(default)s)")
    p.add_argument("--links", default=",".join(f"{link.rtt_ms:g}/{link.mbit:g}" for link in LINKS),
                   help="comma-separated RTT_MS/MBIT links (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench/out/latency"))
    p.add_argument("--from-runs", nargs="+", type=Path, default=None, metavar="RUN_JSON",
                   help="only the calculation, from finished runs' run.json files (e.g. bench/out/modes/*/run.json); "
                        "nothing is trained")
    args = p.parse_args()
    links = parse_links(args.links)
    if args.from_runs:
        results = {}
        for path in args.from_runs:
            base = from_run(path)
            results[path.parent.name] = {"loopback": base, "links": [
                {"rtt_ms": link.rtt_ms, "mbit": link.mbit, "predicted": predict(base, link), "measured": None}
                for link in links]}
        print_table("seconds per training step on each link, predicted from the runs' loopback figures", results)
        return 0
    chosen = [v for v in args.variants.split(",") if v]
    if unknown := [v for v in chosen if v not in VARIANTS]:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    cache = Path.home() / ".cache" / "dlora"
    results = {}
    with launch.start(["--model", args.model], args.out / "cloud_server.log") as server:
        for name in chosen:
            print(f"[{time.strftime('%H:%M:%S')}] {name}: loopback ...", flush=True)
            base = measure(server.address, name, args.steps, cache)
            cells = []
            for link in links:
                cell = {"rtt_ms": link.rtt_ms, "mbit": link.mbit, "predicted": predict(base, link),
                        "floor": floor(base, link), "measured": None}
                if cell["predicted"] <= args.measure_below:
                    with DelayProxy(server.address, link) as proxy:
                        cell["measured"] = measure(proxy.address, name, args.steps, cache)["seconds"]
                    print(f"    {link.rtt_ms:g} ms, {link.mbit:g} Mbit/s: predicted {cell['predicted']:.2f} s, "
                          f"measured {cell['measured']:.2f} s", flush=True)
                cells.append(cell)
            results[name] = {"loopback": base, "links": cells}
    print()
    print_table(f"{args.model}, BBC News, batch 8, fp32 wire unless named, factorised; seconds per training step, "
                f"predicted (measured "
                f"through the delay proxy where predicted <= {args.measure_below:g} s)", results)
    print("\nmeasured against the floor, max(loopback step, the busier direction's bytes / bandwidth), and the "
          "variant's own loopback step")
    print_overlap(results)
    report.write_json(args.out / "results.json", {"args": {k: str(v) for k, v in vars(args).items()},
                                                  "results": results})
    print(f"\nwritten to {args.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
