"""`make soak`: many edges against the cloud with faults mixed in, checked at the end; it stops by itself.

--edges `edge_client train` processes (DLoRA, DLoRA + Kill and Revive, `--network wan` with its int8 wire,
Kill and Revive and 4 pipelined micro-batches, and one-client SplitLoRA federations) train a tiny random
Llama (2 layers: the soak tests faults, not speed; every process shares the 2 cores) against --replicas
cloud_server replicas behind HAProxy (deploy/local.py), with cross-session batching off so that each edge's
result is exact. Some edges reach HAProxy through the delay proxy (bench/netem.py), which can cut their
connections. Faults, in --rounds rounds on a schedule seeded by --seed, at shares of the edges' median
progress:

- an edge stalled (SIGSTOP) past the server's step deadline, then let go (SIGCONT);
- SIGKILL of a replica, restarted 3 s later on its port and state directory;
- the replicas filled with abandoned sessions (opened, never closed), just before
- an edge killed (SIGKILL) and started again with --resume, which meets a full server and waits for a
  slot (the abandoned sessions free after the servers' --idle-timeout, 120 s);
- the delay proxy cutting every connection through it;
- a burst of hostile calls (random bytes, bad messages, unknown sessions) at HAProxy.

Checked at the end: every edge finished; no step was applied twice (each run's history holds steps 1..N
once); each edge's adapters equal a fault-free replay of its settings on a fresh cloud, exactly; each
replica's RSS stays bounded (its second half's peak within 10% + 64 MB of its first half's); no call was
answered INTERNAL or UNKNOWN (replica logs, edge logs, the hostile burst); an edge waited for a full
server. Prints one table and writes
results.json and soak.png (RSS and step latency over time) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import report
from bench.netem import DelayProxy, Link

ROOT = Path(__file__).resolve().parent.parent
LABELS = ("sport", "tech")
# Every mode's flags; Kill and Revive with short periods, so parking and reviving happen often.
KR = ["--budget", "0.34", "--revive", "0.5", "--period", "5", "--warmup-steps", "5", "--unit", "module"]
MODES = {
    "dlora": [],
    "dlora-kr": ["--policy", "kr", *KR],
    "wan": ["--network", "wan", *KR],
    "splitlora": ["--mode", "splitlora", "--cut-layer", "1", "--aggregate-every", "5", "--clients", "1"],
}
BAD_STATUS = re.compile(r"\b(INTERNAL|UNKNOWN)\b")


@dataclass
class Edge:
    index: int
    mode: str
    out: Path
    via_proxy: bool
    args: list[str]
    proc: subprocess.Popen | None = None
    faults: list[str] = field(default_factory=list)

    @property
    def log(self) -> Path:
        return self.out.parent / f"{self.out.name}.log"

    def start(self, resume: bool = False) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge_client", "train", *self.args,
                                          *(["--resume"] if resume else [])], cwd=ROOT, stdout=log,
                                         stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                         preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    """An edge dies with the soak (Linux: PR_SET_PDEATHSIG), never left training after an interrupted run."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def write_data(path: Path) -> Path:
    rng = random.Random(0)
    words = {"sport": ["match", "goal", "team", "score"], "tech": ["phone", "chip", "code", "screen"]}
    rows = []
    for i in range(96):
        label = LABELS[i % 2]
        rows.append({"text": " ".join(rng.choice(words[label]) for _ in range(6)), "label": label})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def edge_args(e: int, mode: str, address: str, data: Path, out: Path, steps: int) -> list[str]:
    return ["--server", address, "--data", str(data), "--steps", str(steps), "--batch-size", "4", "--eval-limit", "8",
            "--no-eval-before", "--checkpoint-every", "5", "--retries", "40", "--timeout", "60", "--seed", str(e),
            "--name", f"soak-{e}", "--federation", f"soak-{e}", "--out", str(out), "--no-progress", *MODES[mode]]


def plan(edges: int) -> list[str]:
    """The modes of `edges` edges: two one-client SplitLoRA federations, the rest DLoRA, KR and wan in turn."""
    split = min(2, edges // 4)
    rest = ["dlora", "dlora-kr", "wan"]
    return [rest[i % 3] for i in range(edges - split)] + ["splitlora"] * split


class RSS:
    """Each replica's resident memory every second."""

    def __init__(self, cluster) -> None:
        self.cluster, self.samples, self.t0 = cluster, [], time.monotonic()
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            for r in self.cluster.replicas:
                pid = r.pid if r.alive else None
                if pid is None:
                    continue
                try:
                    text = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                found = re.search(r"VmRSS:\s+(\d+)", text)
                if found is None:   # a process just killed, not yet reaped, has no memory left to count
                    continue
                self.samples.append((time.monotonic() - self.t0, r.name, pid, int(found.group(1)) / 1024))

    def bounded(self) -> dict[str, dict]:
        """Per replica incarnation (pid): peak of each half, after a warm-up of 10 s, and whether it held."""
        out = {}
        for pid in sorted({s[2] for s in self.samples}):
            rows = [s for s in self.samples if s[2] == pid]
            warm = [s for s in rows if s[0] >= rows[0][0] + 10] or rows
            half = len(warm) // 2
            first, second = max(s[3] for s in warm[:max(half, 1)]), max(s[3] for s in warm[half:])
            out[f"{rows[0][1]} (pid {pid})"] = {"first_half_mb": first, "second_half_mb": second, "samples": len(rows),
                                                "held": second <= first * 1.10 + 64}
        return out


def hostile_burst(address: str, calls: int, seed: int) -> dict[str, int]:
    """`calls` hostile calls at `address`; their status codes, counted."""
    import grpc

    rng = random.Random(seed)
    counts: dict[str, int] = {}
    with grpc.insecure_channel(address) as channel:
        methods = ["TrainStep", "Forward", "Generate", "OpenSession", "ParkAdapters", "Aggregate", "CloseSession"]
        for _ in range(calls):
            method = rng.choice(methods)
            call = channel.stream_stream(f"/dlora.v1.DLoRA/{method}", request_serializer=lambda b: b,
                                         response_deserializer=lambda b: b)
            junk = [rng.randbytes(rng.choice([0, 1, 7, 64, 4096])) for _ in range(rng.randint(0, 3))]
            try:
                list(call(iter(junk), timeout=10))
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            counts[code] = counts.get(code, 0) + 1
    return counts


def fill_sessions(address: str, attempts: int) -> int:
    """Open sessions at `address` under random routing keys and abandon them, until the replicas refuse
    (RESOURCE_EXHAUSTED) several times in a row: a client that leaves its sessions behind, so that the next
    edge to open one meets a full server and must wait for --idle-timeout to free a slot. Returns how many
    were opened."""
    import secrets

    import grpc

    from common.routing import AFFINITY_HEADER
    from common.wire import dlora_pb2 as pb
    from common.wire import dlora_pb2_grpc as pb_grpc

    opened = refused = 0
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.DLoRAStub(channel)
        for _ in range(attempts):
            key = secrets.token_hex(8)
            try:
                stub.OpenSession(pb.OpenSessionRequest(client_name="abandoned", client_key=key), timeout=30,
                                 metadata=((AFFINITY_HEADER, key),))
                opened, refused = opened + 1, 0
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:   # a replica restarting: try again
                    time.sleep(1.0)
                    continue
                refused += 1
                if refused >= 8:
                    break
    return opened


def adapters_of(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


def progress(edges: list[Edge], steps: int) -> float:
    """The edges' median share of their steps done, from the line each logs every 10 steps."""
    done = []
    for e in edges:
        try:
            text = e.log.read_text()
        except OSError:
            text = ""
        found = re.findall(r"step (\d+)/\d+: loss", text)
        done.append(int(found[-1]) / steps if found else 0.0)
    done.sort()
    return done[len(done) // 2]


def run_edges(edges: list[Edge], schedule, deadline: float, steps: int) -> list[dict]:
    """Start every edge, fire the faults as their times come, wait for all to exit (or the deadline).

    `schedule` holds (share of the run, name, fire): a fault fires once the edges' median progress reaches
    its share. A fault still pending when the edges are done fires then. Returns what fired, when."""
    t0 = time.monotonic()
    for e in edges:
        e.start()
    pending = sorted(schedule, key=lambda f: f[0])
    fired: list[dict] = []

    def fire(now: float, share: float) -> None:
        frac, name, action = pending.pop(0)
        print(f"[{time.strftime('%H:%M:%S')}] t={now:.0f}s, {100 * share:.0f}% done: fault {name}", flush=True)
        action()
        fired.append({"at_seconds": now, "progress": share, "fault": name, "during_training": any(
            e.proc is not None and e.proc.poll() is None for e in edges)})

    # A killed edge is started again inside its fault, in this thread, so a poll never sees it gone.
    while any(e.proc is not None and e.proc.poll() is None for e in edges):
        now = time.monotonic() - t0
        if pending:
            share = progress(edges, steps)
            while pending and pending[0][0] <= share:
                fire(now, share)
        if now > deadline:
            for e in edges:
                if e.proc is not None and e.proc.poll() is None:
                    e.proc.kill()
            raise SystemExit(f"the soak ran past its deadline of {deadline:.0f} s; edges killed")
        time.sleep(0.5)
    while pending:
        fire(time.monotonic() - t0, 1.0)
    return fired


def main() -> int:
    from bench.tiny_models import save_tiny
    from deploy.local import Cluster

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edges", type=int, default=16, help="edge processes (default: %(default)s)")
    p.add_argument("--replicas", type=int, default=2,
                   help="cloud_server replicas behind HAProxy (default: %(default)s)")
    p.add_argument("--steps", type=int, default=500, help="training steps per edge (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of faults over the run, each with every kind of fault (default: %(default)s)")
    p.add_argument("--step-timeout", type=float, default=15.0,
                   help="the servers' step deadline; the stalled edge sleeps past it (default: %(default)s)")
    p.add_argument("--hostile", type=int, default=200, help="hostile calls in the burst (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault schedule (default: %(default)s)")
    p.add_argument("--deadline", type=float, default=3600.0, help="seconds the faulty run may take at most")
    p.add_argument("--spare-sessions", type=int, default=2,
                   help="session slots per replica beyond one per edge; the hostile burst's abandoned sessions "
                        "and killed edges' stale ones fill them, so edges meet a full server (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench/out/soak"), help="logs, runs and results")
    args = p.parse_args()
    if args.edges < 4:
        p.error("--edges must be at least 4 (one of each mode and a spare)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = save_tiny("llama", out / "model", words=LABELS)
    data = write_data(out / "train.jsonl")
    modes = plan(args.edges)
    server_args = ["--model", str(model), "--device", "cpu", "--batch-window-ms", "0", "--threads", "1",
                   "--step-timeout", str(args.step_timeout), "--max-sessions", str(args.edges + args.spare_sessions),
                   "--idle-timeout", "120"]
    rng = random.Random(args.seed)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    started = time.monotonic()

    # -- the faulty run ----------------------------------------------------------------------------------
    with Cluster(args.replicas, server_args, out / "state", log_dir=out / "logs") as cluster, \
            DelayProxy(cluster.address, Link(2, 1000)) as proxy:
        rss = RSS(cluster)
        edges = []
        for i, mode in enumerate(modes):
            via = i % 4 == 3   # a quarter of the edges through the delay proxy
            run = out / "runs" / f"edge{i:02d}-{mode}"
            edges.append(Edge(i, mode, run, via, edge_args(i, mode, proxy.address if via else cluster.address,
                                                            data, run, args.steps)))
        dlora = [e for e in edges if e.mode == "dlora" and not e.via_proxy]
        kr = [e for e in edges if e.mode == "dlora-kr" and not e.via_proxy]
        results["hostile"] = {}

        def stall(edge: Edge) -> None:
            if edge.proc is None or edge.proc.poll() is not None:
                return
            edge.faults.append("stalled")
            edge.proc.send_signal(signal.SIGSTOP)
            threading.Timer(args.step_timeout + 5, lambda: edge.proc.send_signal(signal.SIGCONT)).start()

        restarts: list[threading.Timer] = []

        def kill_replica(i: int) -> None:
            cluster.kill(i)
            for e in edges:
                e.faults.append("replica killed")
            restarts.append(threading.Timer(3.0, lambda: cluster.start(i)))
            restarts[-1].start()

        def kill_edge(edge: Edge) -> None:
            if edge.proc is None or edge.proc.poll() is not None:
                return
            edge.faults.append("killed")
            edge.proc.kill()
            edge.proc.wait()
            edge.start(resume=True)

        def cut() -> None:
            for e in edges:
                if e.via_proxy:
                    e.faults.append("connection cut")
            proxy.cut()

        def fill() -> None:
            n = fill_sessions(cluster.address, args.replicas * (args.edges + args.spare_sessions) + 16)
            results.setdefault("abandoned_sessions", []).append(n)

        def burst(seed: int) -> None:
            for code, n in hostile_burst(cluster.address, args.hostile, seed).items():
                results["hostile"][code] = results["hostile"].get(code, 0) + n

        schedule = []
        for k in range(args.rounds):
            lo, span = k / args.rounds, 1 / args.rounds
            stalled, killed, victim = rng.choice(dlora), rng.choice(kr), k % args.replicas
            for f, name, action in (
                    (0.10, f"stall edge {stalled.index} for {args.step_timeout + 5:.0f} s",
                     lambda e=stalled: stall(e)),
                    (0.25, f"SIGKILL replica {victim}, restart in 3 s", lambda i=victim: kill_replica(i)),
                    (0.36, "fill the replicas with abandoned sessions", fill),
                    (0.45, f"SIGKILL edge {killed.index}, then --resume", lambda e=killed: kill_edge(e)),
                    (0.60, "cut the delay proxy's connections", cut),
                    (0.75, f"{args.hostile} hostile calls", lambda s=args.seed * 100 + k: burst(s))):
                schedule.append((lo + span * (f + rng.uniform(-0.05, 0.05)), f"round {k + 1}: {name}", action))
        results["faults"] = run_edges(edges, schedule, args.deadline, args.steps)
        for timer in restarts:   # a restart still pending must not outlive the cluster
            timer.cancel()
            timer.join()
        rss.stop.set()
        results["faulty_seconds"] = time.monotonic() - started
        logs = {r.name: r.log_path.read_text() for r in cluster.replicas}

    # -- the fault-free replay -----------------------------------------------------------------------------
    print(f"[{time.strftime('%H:%M:%S')}] fault-free replay of every edge ...", flush=True)
    t_replay = time.monotonic()
    with Cluster(args.replicas, server_args, out / "replay-state", log_dir=out / "replay-logs") as clean:
        replays = [Edge(e.index, e.mode, out / "replay" / e.out.name, False,
                        edge_args(e.index, e.mode, clean.address, data, out / "replay" / e.out.name, args.steps))
                   for e in edges]
        run_edges(replays, [], args.deadline, args.steps)
    results["replay_seconds"] = time.monotonic() - t_replay

    # -- the checks ----------------------------------------------------------------------------------------
    rows, table = [], []
    for e, r in zip(edges, replays):
        finished = e.proc is not None and e.proc.returncode == 0 and r.proc is not None and r.proc.returncode == 0
        steps_once = exact = False
        if finished:
            history = json.loads((e.out / "run.json").read_text())["history"]
            steps_once = [h["step"] for h in history] == list(range(1, args.steps + 1))
            got, want = adapters_of(e.out), adapters_of(r.out)
            exact = got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
        bad = BAD_STATUS.findall(e.log.read_text())
        rows.append({"edge": e.index, "mode": e.mode, "via_proxy": e.via_proxy, "faults": e.faults,
                     "finished": finished, "steps_once": steps_once, "equals_replay": exact, "bad_status": len(bad)})
        kinds = {f: e.faults.count(f) for f in dict.fromkeys(e.faults)}
        table.append([e.index, e.mode + (" (proxy)" if e.via_proxy else ""),
                      ", ".join(f"{f} x{n}" if n > 1 else f for f, n in kinds.items()) or "—",
                      "yes" if finished else "NO", "yes" if steps_once else "NO", "yes" if exact else "NO",
                      len(bad)])
    memory = rss.bounded()
    server_bad = {name: len(BAD_STATUS.findall(text)) for name, text in logs.items()}
    hostile_bad = sum(n for code, n in results.get("hostile", {}).items() if code in ("INTERNAL", "UNKNOWN"))
    # An edge that met a full server waited for a slot (edge_client/session.py logs each wait).
    full_waits = sum(e.log.read_text().count("no session yet:") for e in edges)
    results["full_server_waits"] = full_waits
    checks = {"every edge finished": all(r["finished"] for r in rows),
              "no step applied twice": all(r["steps_once"] for r in rows),
              "adapters equal the fault-free replay": all(r["equals_replay"] for r in rows),
              # each round's killed edge resumes on replicas the abandoned sessions filled: it must have waited
              "an edge met a full server and waited": full_waits > 0 or not args.rounds,
              "replica RSS bounded": all(m["held"] for m in memory.values()),
              "no INTERNAL or UNKNOWN": not any(r["bad_status"] for r in rows) and not any(server_bad.values())
              and hostile_bad == 0}
    results |= {"edges": rows, "rss": memory, "server_bad_status": server_bad, "checks": checks,
                "rss_samples": rss.samples}
    print()
    print(report.table(["edge", "mode", "faults", "finished", "steps 1..N once", "= replay", "INTERNAL/UNKNOWN"],
                       table))
    print()
    print(report.table(["replica", "RSS first half MB", "second half MB", "bounded"],
                       [[k, f"{m['first_half_mb']:.0f}", f"{m['second_half_mb']:.0f}", "yes" if m["held"] else "NO"]
                        for k, m in memory.items()]))
    faults = results["faults"]
    print(f"\nfaults: {len(faults)} fired, {sum(f['during_training'] for f in faults)} while edges trained")
    print(f"hostile calls by status: {results.get('hostile')}")
    print(f"waits for a full server's free slot: {full_waits}")
    print(f"faulty run {results['faulty_seconds']:.0f} s, replay {results['replay_seconds']:.0f} s")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    report.write_json(out / "results.json", results)
    plot(results, edges, out / "soak.png")
    print(f"\nwritten to {out}/results.json and soak.png")
    return 0 if all(checks.values()) else 1


def plot(results: dict, edges: list[Edge], path: Path) -> None:
    """RSS of each replica incarnation and each edge's step time, over the faulty run."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for pid in sorted({s[2] for s in results["rss_samples"]}):
        rows = [s for s in results["rss_samples"] if s[2] == pid]
        top.plot([s[0] for s in rows], [s[3] for s in rows], label=f"{rows[0][1]} (pid {pid})")
    top.set_ylabel("replica RSS (MB)")
    top.legend(fontsize=7)
    for e in edges:
        try:
            history = json.loads((e.out / "run.json").read_text())["history"]
        except (OSError, ValueError, KeyError):
            continue
        t, xs = 0.0, []
        for h in history:
            t += h["seconds"]
            xs.append(t)
        bottom.plot(xs, [h["seconds"] for h in history], lw=0.8)
    bottom.set_ylabel("step seconds (each edge)")
    bottom.set_xlabel("seconds (replicas: since the run started; edges: their own training time)")
    bottom.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
