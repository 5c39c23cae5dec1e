"""N cloud_server replicas and HAProxy in front of them, as local processes (`make scale-local`, tests).

Run it (from the repository root, HAProxy 2.6+ installed):

    make scale-local                                   # 2 replicas, the LB on 127.0.0.1:50550, state in runs/state
    make scale-local REPLICAS=3 LB_PORT=50600 SERVER_ARGS="--model ./my-llama --device cpu"
    python -m deploy.local --replicas 2 --lb-port 50550 --state-dir runs/state --server-args "--device cpu"

Each replica is `python -m cloud_server --port 0 --state-dir DIR ...` on 127.0.0.1; once all listen,
HAProxy (deploy/haproxy.py's config) starts in front and the launcher prints

    DLoRA load balancer listening on 127.0.0.1:50550 (2 replicas: 127.0.0.1:41801, 127.0.0.1:39113)

Edges connect to that address (`--server 127.0.0.1:50550`). Logs go to --log-dir (runs/scale-local):
one file per replica and haproxy.log. It prints each replica's UP/DOWN change as HAProxy sees it;
Ctrl-C or SIGTERM stops HAProxy, then the replicas.

From Python (tests, the failover test):

    with Cluster(replicas=2, server_args=["--model", path, "--device", "cpu"], state_dir=tmp) as c:
        c.address                 # "127.0.0.1:PORT" of the load balancer
        c.replicas[0].port        # a replica's own port (kept across restarts)
        c.route("fed-a")          # which replica HAProxy sends key "fed-a" to (by index)
        c.kill(0)                 # SIGKILL replica 0
        c.wait_state(0, "DOWN")   # until HAProxy's health checks mark it DOWN; returns the seconds waited
        c.start(0)                # start it again on the same port
        c.server_states()         # {"cloud0": "UP", "cloud1": "UP"}, from HAProxy's `show stat`
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from common import ready_line
from deploy import haproxy as lb

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is Python 3.11+

LB_READY = "DLoRA load balancer listening on "


def _die_with_parent() -> None:
    """In the child: SIGTERM when the parent dies, so a killed test never leaves processes behind."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux/glibc: rely on close()
        pass


def _popen(cmd: list[str], **kwargs) -> subprocess.Popen:
    # The kernel signals when the forking *thread* ends, so only the main thread asks for PDEATHSIG.
    # A new session: a terminal's Ctrl-C reaches the launcher only, which stops everything in order.
    return subprocess.Popen(cmd, start_new_session=True,
                            preexec_fn=_die_with_parent  # noqa: PLW1509 - one prctl, no locks
                            if threading.current_thread() is threading.main_thread() else None, **kwargs)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (HAProxy cannot bind port 0 and report it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Replica:
    """One cloud_server process. `port` is 0 until its first start, then fixed: a restart reuses it, so
    HAProxy's server line for it stays right."""

    index: int
    name: str
    host: str
    log_path: Path
    port: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class Cluster:
    """`replicas` cloud_server processes on `host` and HAProxy in front of them.

    server_args: extra cloud_server arguments for every replica (--model, --device, ...).
    state_dir: passed as --state-dir to every replica (created if missing); None: not passed.
    lb_port: the load balancer's port; 0 picks a free one.
    log_dir: replica logs (cloud0.log, ...), haproxy.log and haproxy.cfg; default a new temporary
      directory, kept after close() for a post-mortem.
    lb_options: more keyword arguments of deploy.haproxy.render (check_inter, fall, timeout_connect, ...).
    """

    def __init__(self, replicas: int = 2, server_args: Sequence[str] = (), state_dir: str | Path | None = None, *,
                 host: str = "127.0.0.1", lb_port: int = 0, log_dir: str | Path | None = None,
                 ready_timeout: float = 300.0, haproxy: str = "haproxy", lb_options: dict | None = None) -> None:
        if replicas < 1:
            raise ValueError("at least one replica")
        self.server_args = list(server_args)
        self.state_dir = Path(state_dir).resolve() if state_dir is not None else None
        self.host = host
        self.lb_port = lb_port
        self.ready_timeout = ready_timeout
        self.haproxy_binary = lb.find_haproxy(haproxy)
        self.lb_options = dict(lb_options or {})
        self._tmp = tempfile.mkdtemp(prefix="dlora-lb-")  # short: a unix socket path has 108 bytes at most
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="dlora-cluster-"))
        self.stats_socket = os.path.join(self._tmp, "stats.sock")
        self.config_path = self.log_dir / "haproxy.cfg"
        self.replicas = [Replica(i, name, host, self.log_dir / f"{name}.log")
                         for i, name in enumerate(lb.server_names(replicas))]
        self.haproxy: subprocess.Popen | None = None

    # -- whole cluster --------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """The load balancer's HOST:PORT: what edges connect to."""
        return f"{self.host}:{self.lb_port}"

    def open(self, wait_up: bool = True) -> Self:
        """Start every replica (in parallel), then HAProxy; with wait_up, return once HAProxy has seen
        every replica pass a health check."""
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            if self.state_dir is not None:
                self.state_dir.mkdir(parents=True, exist_ok=True)
            waits = [self._spawn(r) for r in self.replicas]
            for wait in waits:
                wait()
            self._start_haproxy()
            if wait_up:
                for i in range(len(self.replicas)):
                    self.wait_state(i, "UP", timeout=30.0, checked=True)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop HAProxy, then every replica (SIGTERM, SIGKILL after 20 s)."""
        if self.haproxy is not None:
            _stop(self.haproxy, 10.0)
        for r in self.replicas:
            if r.proc is not None:
                _stop(r.proc, 20.0)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one replica ------------------------------------------------------------------------------------
    def kill(self, i: int) -> None:
        """SIGKILL replica i (as a crash would) and reap it."""
        proc = self.replicas[i].proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop(self, i: int, timeout: float = 20.0) -> int | None:
        """SIGTERM replica i (its graceful shutdown: NOT_SERVING, drain, exit); its exit status."""
        proc = self.replicas[i].proc
        return _stop(proc, timeout) if proc is not None else None

    def start(self, i: int) -> Replica:
        """Start replica i again (on the port it had), once it is not running; returns once it listens."""
        r = self.replicas[i]
        if r.alive:
            raise RuntimeError(f"{r.name} is running (pid {r.pid})")
        self._spawn(r)()
        return r

    # -- HAProxy's view -----------------------------------------------------------------------------------
    def haproxy_command(self, command: str, timeout: float = 5.0) -> str:
        """One command on HAProxy's runtime API (stats socket), e.g. 'show stat', 'show servers state'."""
        return haproxy_command(self.stats_socket, command, timeout)

    def stats(self) -> list[dict[str, str]]:
        """`show stat` as one dict per row (pxname, svname, status, check_status, scur, stot, ...)."""
        return haproxy_stats(self.stats_socket)

    def server_states(self) -> dict[str, str]:
        """Each replica's state as HAProxy has it: 'UP', 'DOWN', 'MAINT', ... (the first word of its
        status: 'UP 1/2', a server failing its checks but not yet down, is still 'UP')."""
        return {row["svname"]: row["status"].split(" ")[0] for row in self.stats()
                if row["pxname"] == lb.BACKEND and row["svname"] not in ("FRONTEND", "BACKEND")}

    def state(self, i: int) -> str:
        return self.server_states()[self.replicas[i].name]

    def wait_state(self, i: int, state: str, timeout: float = 10.0, checked: bool = False) -> float:
        """Wait until HAProxy reports replica i in `state` ('UP', 'DOWN'); the seconds it took.
        checked: for 'UP', also require a passed health check (at start every server is UP unchecked)."""
        name, t0 = self.replicas[i].name, time.monotonic()
        while True:
            row = next((r for r in self.stats() if r["pxname"] == lb.BACKEND and r["svname"] == name), None)
            if row is not None and row["status"].split(" ")[0] == state \
                    and (not checked or row["check_status"] == "L7OK"):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{name} not {state} after {timeout:.0f} s: {row}; see {self.log_dir}")
            time.sleep(0.1)

    def route(self, key: str, timeout: float = 5.0) -> int:
        """The replica (index) that HAProxy sends calls with `x-dlora-affinity: key` to right now: a gRPC
        health check through the load balancer, read from the reply's replica header."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        header = self.lb_options.get("replica_header", lb.DEFAULTS["replica_header"])
        if not header:
            raise RuntimeError("route() needs the replica header (lb_options replica_header)")
        with grpc.insecure_channel(self.address) as channel:
            _, call = health_pb2_grpc.HealthStub(channel).Check.with_call(
                health_pb2.HealthCheckRequest(service=lb.HEALTH_SERVICE), timeout=timeout,
                metadata=[(lb.AFFINITY_HEADER, key)])
        name = dict(call.initial_metadata())[header]
        return next(r.index for r in self.replicas if r.name == name)

    # -- internals ------------------------------------------------------------------------------------------
    def _spawn(self, r: Replica):
        """Start replica r; returns a function that waits for its ready line (and records its port)."""
        args = [*self.server_args]
        if self.state_dir is not None:
            args += ["--state-dir", str(self.state_dir)]
        args += ["--host", self.host, "--port", str(r.port)]  # last: these win over server_args
        log = open(r.log_path, "a")  # noqa: SIM115 - owned by the pump thread
        log.write(f"--- {time.strftime('%H:%M:%S')} starting {r.name}: cloud_server {shlex.join(args)}\n")
        log.flush()
        proc = r.proc = _popen([sys.executable, "-m", "cloud_server", *args], stdout=subprocess.PIPE, stderr=log,
                        text=True, cwd=Path(__file__).resolve().parent.parent)
        addresses: queue.Queue[str | None] = queue.Queue()   # the ready line's HOST:PORT; None: it exited

        def pump() -> None:
            ready = False
            for line in proc.stdout:  # type: ignore[union-attr]
                address = None if ready else ready_line.parse(line)
                if address is not None:
                    ready = True
                    addresses.put(address)
                log.write(line)
                log.flush()
            addresses.put(None)
            log.close()

        threading.Thread(target=pump, name=f"{r.name}-stdout", daemon=True).start()

        def wait() -> None:
            try:
                address = addresses.get(timeout=self.ready_timeout)
            except queue.Empty:
                proc.kill()
                raise RuntimeError(f"{r.name} was not ready within {self.ready_timeout:.0f} s; see {r.log_path}") \
                    from None
            if address is None:
                raise RuntimeError(f"{r.name} exited with {proc.wait()} before it was ready; see {r.log_path}")
            r.port = int(address.rpartition(":")[2])

        return wait

    def _start_haproxy(self) -> None:
        fixed = self.lb_port != 0
        for attempt in range(1 if fixed else 3):
            if not fixed:
                self.lb_port = free_port(self.host)
            config = lb.render([r.address for r in self.replicas], self.address,
                               names=[r.name for r in self.replicas], stats_socket=self.stats_socket,
                               **self.lb_options)
            self.config_path.write_text(config)
            log = open(self.log_dir / "haproxy.log", "a")  # noqa: SIM115 - closed below
            try:
                self.haproxy = _popen([self.haproxy_binary, "-W", "-db", "-f", str(self.config_path)],
                                      stdout=log, stderr=subprocess.STDOUT)
            finally:
                log.close()
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline:
                if self.haproxy.poll() is not None:
                    break
                with contextlib.suppress(OSError):
                    self.haproxy_command("show info", timeout=1.0)
                    with socket.create_connection((self.host, self.lb_port), timeout=1.0):
                        return
                time.sleep(0.05)
            _stop(self.haproxy, 5.0)
            if attempt == 2 or fixed:
                break
        raise RuntimeError(f"haproxy did not start on {self.address}; see {self.log_dir / 'haproxy.log'}")


def haproxy_command(stats_socket: str | Path, command: str, timeout: float = 5.0) -> str:
    """One command on the runtime API of the HAProxy listening on unix socket `stats_socket`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(stats_socket))
        s.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def haproxy_stats(stats_socket: str | Path) -> list[dict[str, str]]:
    """`show stat` of that HAProxy: one dict per proxy or server row, keyed by the CSV header."""
    text = haproxy_command(stats_socket, "show stat").lstrip("# ")
    return [row for row in csv.DictReader(io.StringIO(text)) if row.get("pxname")]


def _stop(proc: subprocess.Popen, timeout: float) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


# -- command line ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m deploy.local",
        description="Run N cloud_server replicas on 127.0.0.1 and HAProxy in front of them (consistent "
                    "hashing on x-dlora-affinity, gRPC health checks) until Ctrl-C or SIGTERM.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--replicas", type=int, default=2, help="cloud_server processes")
    p.add_argument("--lb-port", type=int, default=50550, help="the load balancer's port; 0 picks a free one")
    p.add_argument("--host", default="127.0.0.1", help="address of the replicas and the load balancer")
    p.add_argument("--state-dir", type=Path, default=Path("runs/state"),
                   help="--state-dir of every replica: where SplitLoRA federations keep their state")
    p.add_argument("--server-args", default="", help="more cloud_server arguments for every replica, as one "
                                                    "shell-quoted string, e.g. \"--model ./m --device cpu\"")
    p.add_argument("--log-dir", type=Path, default=Path("runs/scale-local"),
                   help="replica logs (cloud0.log, ...), haproxy.log and haproxy.cfg")
    p.add_argument("--stats-bind", metavar="ADDR:PORT",
                   help="also serve HAProxy's /stats page, /metrics and /healthz here")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds a replica may take to load")
    p.add_argument("--haproxy", default="haproxy", help="the haproxy binary")
    args = p.parse_args(argv)
    if args.replicas < 1:
        p.error("--replicas must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    options = {"stats_bind": args.stats_bind} if args.stats_bind else {}
    try:
        cluster = Cluster(args.replicas, shlex.split(args.server_args), args.state_dir, host=args.host,
                          lb_port=args.lb_port, log_dir=args.log_dir, ready_timeout=args.ready_timeout,
                          haproxy=args.haproxy, lb_options=options)
    except FileNotFoundError as exc:
        print(f"deploy.local: {exc}", file=sys.stderr)
        return 2
    print(f"starting {args.replicas} cloud_server replicas (logs: {args.log_dir}/cloud*.log)", flush=True)
    try:
        cluster.open()
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"deploy.local: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"{LB_READY}{cluster.address} ({len(cluster.replicas)} replicas: "
              f"{', '.join(r.address for r in cluster.replicas)})", flush=True)
        last = cluster.server_states()
        while not stop.wait(1.0):
            if cluster.haproxy is not None and cluster.haproxy.poll() is not None:
                print(f"deploy.local: haproxy exited with {cluster.haproxy.returncode}; see "
                      f"{args.log_dir / 'haproxy.log'}", file=sys.stderr)
                return 1
            with contextlib.suppress(OSError):
                now = cluster.server_states()
                for name, state in now.items():
                    if last.get(name) != state:
                        r = next(r for r in cluster.replicas if r.name == name)
                        print(f"{time.strftime('%H:%M:%S')} {name} ({r.address}) is {state}"
                              + ("" if r.alive or r.proc is None else f" (exited with {r.proc.returncode})"),
                              flush=True)
                last = now
        print("stopping: HAProxy, then the replicas", flush=True)
        return 0
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
