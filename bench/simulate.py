"""`make simulate`: one cloud_server and N edge clients as local processes on 127.0.0.1.

Each client is its own `edge_client train` process on its own non-IID shard of
BBC News (label skew, Dirichlet alpha), as the docker-compose simulation runs
them in containers. Prints a per-client table: data mix, held-out accuracy
before and after on the client's own test shard, bytes per step and steps.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from bench import report
from cloud_server import launch
from edge_client import data
from edge_client.shards import make_shards

_STEP = re.compile(r"step (\d+)/(\d+)")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=3, help="edge clients, one process each (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="Dirichlet label skew; small = more skew (default: %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="training steps per client (default: %(default)s)")
    p.add_argument("--eval-limit", type=int, default=100,
                   help="held-out examples per client, 0 for all (default: %(default)s)")
    p.add_argument("--model", default="smollm2-135m", help="model the cloud serves (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs/simulate"),
                   help="shards, logs and runs (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shards and of the clients (default: %(default)s)")
    p.add_argument("--train-args", default="", help="extra arguments for every client, e.g. '--policy kr'")
    return p.parse_args()


def start_clients(args, address: str, shards: list[dict], labels: str) -> list[tuple[subprocess.Popen, Path]]:
    procs = []
    for s in shards:
        c = s["client"]
        log = args.out / f"client{c}.log"
        cmd = [sys.executable, "-m", "edge_client", "train", "--server", address,
               "--data", str(Path(s["dir"]) / "train.jsonl"), "--test", str(Path(s["dir"]) / "test.jsonl"),
               "--labels", labels, "--steps", str(args.steps), "--eval-limit", str(args.eval_limit),
               "--seed", str(args.seed + c), "--out", str(args.out / f"client{c}"), "--name", f"client{c}",
               "--no-progress", *args.train_args.split()]
        procs.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w")), log))  # noqa: SIM115
    return procs


def watch(procs: list[tuple[subprocess.Popen, Path]], steps: int) -> list[int]:
    """A progress bar over all clients' steps (read from their logs) until every client exits."""
    bar = tqdm(total=steps * len(procs), desc="clients' steps", unit="step", disable=not sys.stderr.isatty())
    done = [0] * len(procs)
    while True:
        for i, (_, log) in enumerate(procs):
            found = _STEP.findall(log.read_text(errors="replace"))
            done[i] = int(found[-1][0]) if found else 0
        bar.n = sum(done)
        bar.refresh()
        codes = [p.poll() for p, _ in procs]
        if all(c is not None for c in codes):
            bar.close()
            return codes  # type: ignore[return-value]
        time.sleep(2)


def main() -> int:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train, test = data.bbc_news(Path.home() / ".cache" / "dlora")
    shards = make_shards(train, test, args.out / "shards", args.clients, args.alpha, args.seed)
    labels = (args.out / "shards" / "labels.txt").read_text().strip()
    t0 = time.time()
    print(f"starting cloud_server on {args.model} (log: {args.out / 'cloud_server.log'})", flush=True)
    with launch.start(["--model", args.model, "--max-sessions", str(max(8, args.clients))],
                      args.out / "cloud_server.log") as server:
        print(f"cloud_server at {server.address}; {args.clients} clients x {args.steps} steps "
              f"(logs: {args.out}/client*.log)", flush=True)
        procs = start_clients(args, server.address, shards, labels)
        try:
            codes = watch(procs, args.steps)
        finally:  # Ctrl-C: no client is left behind, retrying against a stopped server
            for p, _ in procs:
                if p.poll() is None:
                    p.terminate()
    print()
    print(f"{args.model}, BBC News in {args.clients} non-IID shards (Dirichlet alpha {args.alpha}), "
          f"{args.steps} steps each, all clients at once; {time.time() - t0:.0f} s in all")
    rows = [client_row(s, code, args.out) for s, code in zip(shards, codes)]
    print(report.table(["client", "train examples (top labels)", "held-out acc before -> after", "MB/step", "steps",
                        "s/step"], rows))
    return 1 if any(row[2].startswith("FAILED") for row in rows) else 0


def client_row(shard: dict, code: int, out: Path) -> list[str]:
    """One client's table row: its shard, and its run's accuracy and costs, or where its log says why it failed."""
    c = shard["client"]
    run = out / f"client{c}" / "run.json"
    top = ", ".join(f"{k} {v}" for k, v in sorted(shard["labels"].items(), key=lambda kv: -kv[1])[:2])
    if code != 0 or not run.exists():
        return [f"client{c}", f"{shard['train']} ({top})", f"FAILED (exit {code}; see {out}/client{c}.log)", "", "", ""]
    sm = json.loads(run.read_text())["summary"]
    mb = (sm["bytes_sent_per_step"] + sm["bytes_received_per_step"]) / 1e6
    return [f"client{c}", f"{shard['train']} ({top})",
            f"{sm['before']['accuracy']:.1%} -> {sm['after']['accuracy']:.1%} ({sm['after']['examples']})",
            f"{mb:.1f}", str(sm["steps"]), f"{sm['seconds_per_step']:.2f}"]


if __name__ == "__main__":
    sys.exit(main())
