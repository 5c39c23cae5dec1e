"""`make bench-scale`: replicas behind HAProxy: throughput of 8 edges, failover time, the cost of durable state.

- throughput: 8 DLoRA edge processes (bench.many_edges' workers, one torch thread each) train on BBC News
  against 1 replica directly, 1 replica behind HAProxy, and 2 replicas behind HAProxy; aggregate tokens/s
  over the same measured steps. Each edge's key is random, so HAProxy's hash spreads them as it will.
- failover: 2 replicas behind HAProxy with a shared --state-dir; a SplitLoRA edge (a federation of one)
  and a DLoRA edge whose key routes to the same replica train in step. In the middle of a step the replica
  is SIGKILLed. Per edge: its normal step time, and the time from the kill to the end of the interrupted
  step (detection, retries, re-opening the session, restoring the federation or re-parking, the replay).
  Also how long HAProxy's health checks took to mark the replica DOWN (the edges do not wait for it: a
  failed connection is redispatched).
- durability: one server, the same SplitLoRA edge with and without --state-dir (every step writes the
  federation's state and fsyncs it): the median step time of each.

Writes bench/out/scale/results.json; docs/results/scale.md shows it.
"""
from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench import report
from bench.many_edges import measure
from bench.step_time import remote_step
from cloud_server import launch
from cloud_server.model_store import cache_root
from common.lora import LoRAConfig
from deploy.local import Cluster
from edge_client import data as datasets
from edge_client.objective import make_batch
from edge_client.remote_model import DLoRAModelForCausalLM, RemoteConfig
from edge_client.session import CloudSession, RetryPolicy, SplitOptions


def _edge(address: str, assets: Path, split: SplitOptions | None = None, key: str | None = None):
    retry = RetryPolicy(retries=20, backoff=0.2, max_backoff=2.0)
    lora, remote = LoRAConfig(r=8, lora_alpha=16.0), RemoteConfig(server=address)
    session = CloudSession.from_config(remote, lora, split=split, client_key=key, retry=retry)
    if split is not None:   # a SplitLoRA edge also needs the weights of its blocks [0, cut)
        assets = session.fetch_assets(assets.parent)
    model = DLoRAModelForCausalLM(session, assets, lora, remote)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def _batches(tokenizer, count: int, batch_size: int, max_length: int) -> list:
    train_path, _ = datasets.bbc_news(cache_root())
    exs = datasets.load(train_path, datasets.BBC_TEMPLATE).examples
    return [make_batch(tokenizer, exs[i * batch_size:(i + 1) * batch_size], max_length) for i in range(count)]


def throughput(args, server_args: list[str], out: Path) -> list[dict]:
    rows = []
    with launch.start(server_args, out / "direct.log") as server:
        with CloudSession(server.address) as probe:
            assets = probe.fetch_assets(out / "assets")
        print(f"[{time.strftime('%H:%M:%S')}] 1 replica, direct: {args.edges} edges ...", flush=True)
        rows.append(measure(server.address, assets, args.edges, args) | {"setup": "1 replica, direct"})
    for replicas in (1, 2):
        with Cluster(replicas, server_args, log_dir=out / f"cluster{replicas}") as cluster:
            print(f"[{time.strftime('%H:%M:%S')}] {replicas} replica(s) behind HAProxy: {args.edges} edges ...",
                  flush=True)
            row = measure(cluster.address, assets, args.edges, args)
            streams = {s["svname"]: int(s["stot"]) for s in cluster.stats()
                       if s["svname"] in {r.name for r in cluster.replicas}}
            rows.append(row | {"setup": f"{replicas} replica{'s' if replicas > 1 else ''} behind HAProxy",
                               "calls_per_replica": streams})
    for row in rows:
        print(f"    {row['setup']}: {row['tokens_per_s']:.0f} tokens/s, {row['s_per_step']:.2f} s/step per edge"
              + (f", calls per replica {row['calls_per_replica']}" if "calls_per_replica" in row else ""))
    return rows


def failover(args, server_args: list[str], out: Path, assets: Path) -> dict:
    federation = f"bench-{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory() as state, \
            Cluster(2, server_args, state_dir=state, log_dir=out / "failover") as cluster:
        victim = cluster.route(federation)
        key = next(k for k in iter(lambda: secrets.token_hex(16), None) if cluster.route(k) == victim)
        edges = {"splitlora": _edge(cluster.address, assets, SplitOptions(args.cut_layer, federation, 1, 8, 16.0)),
                 "dlora": _edge(cluster.address, assets, key=key)}
        batches = _batches(edges["dlora"][0].tokenizer, args.failover_steps, args.batch_size, args.max_length)
        times: dict[str, list[float]] = {name: [] for name in edges}
        ends: dict[str, float] = {}
        kill_at = args.failover_steps // 2
        killed: dict[str, float] = {}

        def kill_mid_step(delay: float) -> None:
            time.sleep(delay)
            killed["at"] = time.monotonic()
            cluster.kill(victim)
            killed["down_after"] = cluster.wait_state(victim, "DOWN", timeout=60)

        for i, batch in enumerate(batches):
            if i == kill_at:
                # Half-way through the slower edge's normal step.
                delay = 0.5 * max(statistics.median(t) for t in times.values())
                killer = threading.Thread(target=kill_mid_step, args=(delay,), daemon=True)
                killer.start()
            threads = []
            for name, (model, opt) in edges.items():
                def step(name=name, model=model, opt=opt, batch=batch) -> None:
                    t0 = time.monotonic()
                    remote_step(model, batch, opt)
                    times[name].append(time.monotonic() - t0)
                    ends[name] = time.monotonic()
                threads.append(threading.Thread(target=step))
                threads[-1].start()
            for t in threads:
                t.join()
            if i == kill_at:
                interrupted = {name: ends[name] - killed["at"] for name in edges}
        killer.join(60)
        result = {"normal_step_s": {n: statistics.median(t[:kill_at]) for n, t in times.items()},
                  "kill_to_step_end_s": interrupted,
                  "reconnects": {n: m.session.reconnects for n, (m, _) in edges.items()},
                  "haproxy_marked_down_after_s": killed["down_after"]}
        for model, _ in edges.values():
            model.close()
    print(f"    failover: {result}", flush=True)
    return result


def durability(args, server_args: list[str], out: Path, assets: Path) -> dict:
    result = {}
    for label, extra in (("memory", []), ("state-dir", ["--state-dir", str(out / "durable")])):
        with launch.start(server_args + extra, out / f"durability-{label}.log") as server:
            model, opt = _edge(server.address, assets, SplitOptions(args.cut_layer, f"d-{label}", 1, 8, 16.0))
            batches = _batches(model.tokenizer, args.durability_steps + 1, args.batch_size, args.max_length)
            times = []
            for batch in batches:
                t0 = time.perf_counter()
                remote_step(model, batch, opt)
                times.append(time.perf_counter() - t0)
            state = sorted((out / "durable").glob("federation-*.pt"))
            if state:
                result["state_file_bytes"] = state[0].stat().st_size
            model.close()
        result[label] = statistics.median(times[1:])   # the first step warms up
        print(f"    SplitLoRA step, federation in {label}: {result[label]:.3f} s (median of {len(times) - 1})")
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model the replicas serve (default: %(default)s)")
    p.add_argument("--edges", type=int, default=8,
                   help="concurrent edges for the throughput part (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per edge step (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per example (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps per edge (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="measured steps per edge (default: %(default)s)")
    p.add_argument("--cut-layer", type=int, default=4, help="SplitLoRA cut layer (default: %(default)s)")
    p.add_argument("--failover-steps", type=int, default=6, help="steps of the failover run (default: %(default)s)")
    p.add_argument("--durability-steps", type=int, default=5, help="measured steps per setting (default: %(default)s)")
    p.add_argument("--parts", default="throughput,failover,durability",
                   help="which parts to run (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench/out/scale"), help="results directory (default: %(default)s)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    server_args = ["--model", args.model, "--max-sessions", str(args.edges + 4)]
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "cpu_threads": torch.get_num_threads()}
    if "throughput" in parts:
        results["throughput"] = throughput(args, server_args, args.out)
    with launch.start(server_args, args.out / "assets.log") as server, CloudSession(server.address) as probe:
        assets = probe.fetch_assets(args.out / "assets")
    if "failover" in parts:
        results["failover"] = failover(args, server_args, args.out, assets)
    if "durability" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            results["durability"] = durability(args, server_args, Path(tmp), assets)
    report.write_json(args.out / "results.json", results)
    print(f"\nwritten to {args.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
