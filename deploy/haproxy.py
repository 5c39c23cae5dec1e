"""HAProxy in front of N cloud_server replicas: consistent hashing on x-dlora-affinity, gRPC health checks.

Run it (from the repository root; HAProxy 2.6 or later on PATH):

    python -m deploy.haproxy --bind 127.0.0.1:50550 --backend 127.0.0.1:50561 --backend 127.0.0.1:50562
    python -m deploy.haproxy --backend h1:50551,h2:50551 --print          # only print the config
    make lb BACKENDS=127.0.0.1:50561,127.0.0.1:50562                       # the same, from make

It writes the config (--config-out) and runs `haproxy -W -db -f FILE` in the foreground (exec: signals
go straight to HAProxy). The committed configs of deploy/compose.yml and deploy/k8s/ are rendered here
too (`--preset compose|k8s`, `make deploy-configs`); tests/test_deploy.py checks that they never drift.

What the config does, and why:

* The frontend speaks HTTP/2 cleartext (h2c, gRPC's prior-knowledge mode) in `mode http`, so HAProxy
  sees each call and its metadata. Every call carries `x-dlora-affinity` (the edge sets it: its
  federation's name for SplitLoRA, a per-client key for DLoRA); `balance hdr(x-dlora-affinity)` with
  `hash-type consistent` sends all calls with one value to one replica, and when a replica goes, only
  its own keys move. A call without the header goes round-robin.
* A replica that dies is detected by connect failures within `timeout connect` (retried, then
  redispatched to another replica: `retries`, `option redispatch 1`) and marked DOWN after `fall`
  failed health checks `inter` apart. The health check is a real gRPC call,
  grpc.health.v1.Health/Check for service dlora.v1.DLoRA, written as raw HTTP/2 bytes
  (`health_check_bytes()`): a replica that is up but NOT_SERVING (loading, draining) fails it too.
* `timeout client` and `timeout server` are long (1 h): a training step's stream can be silent for a
  long time while the other side computes, and `timeout server` is what would kill it. Sessions of a
  replica that is marked DOWN are not shut down (no `on-marked-down shutdown-sessions`): a flapping
  check must not kill steps that still work.
* Each reply carries `x-dlora-replica: <server name>` (--replica-header), for debugging affinity.

`--passthrough` is the layout for attested replicas (cloud_server --attestation): TLS must end inside
the replica whose evidence names its key, so HAProxy forwards TCP (`mode tcp`) without reading it.
It then cannot see x-dlora-affinity: `balance source` hashes the client's address instead (consistent,
so a replica that goes takes only its own clients along). The health check is the same gRPC call
inside TLS (`tcp-check connect ssl alpn h2`, `verify none`: what the replica proves is checked by
the edge, not here). There is no x-dlora-replica header: HAProxy cannot write into the stream.
"""
from __future__ import annotations

import argparse
import os
import shutil
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.routing import AFFINITY_HEADER  # the edge sets it; the contract lives once, in common/

HEALTH_SERVICE = "dlora.v1.DLoRA"
HEALTH_PATH = "/grpc.health.v1.Health/Check"
BACKEND = "cloud"       # the backend's name in the config (and in `show stat`)
FRONTEND = "dlora"

# -- the gRPC health check as raw HTTP/2 bytes -----------------------------------------------------------
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS = 0x0, 0x1, 0x4
END_STREAM, END_HEADERS = 0x1, 0x4


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    """One HTTP/2 frame: 24-bit length, type, flags, 31-bit stream id, payload (RFC 9113 section 4.1)."""
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer with an N-bit prefix (RFC 7541 section 5.1); `first` holds the bits above it."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def _hpack_string(text: str) -> bytes:
    """A string literal without Huffman coding (H bit 0)."""
    raw = text.encode("ascii")
    return _hpack_int(len(raw), 7) + raw


def hpack_literal(name: str, value: str) -> bytes:
    """A header field as a literal without indexing, with a literal name (RFC 7541 section 6.2.2,
    first byte 0x00): no dynamic table, no static-table lookups, no Huffman; every decoder takes it."""
    return b"\x00" + _hpack_string(name) + _hpack_string(value)


def _protobuf_string_field(number: int, text: str) -> bytes:
    raw = text.encode("utf-8")
    assert len(raw) < 128, "a one-byte length is all a service name needs"
    return bytes([number << 3 | 2, len(raw)]) + raw


def health_check_request(service: str = HEALTH_SERVICE) -> bytes:
    """grpc.health.v1.HealthCheckRequest{service} framed as one gRPC message (uncompressed flag,
    4-byte length, protobuf)."""
    message = _protobuf_string_field(1, service) if service else b""
    return b"\x00" + struct.pack(">I", len(message)) + message


def health_check_bytes(service: str = HEALTH_SERVICE, authority: str = "localhost") -> bytes:
    """What the check sends on a fresh connection: the client preface, an empty SETTINGS frame, the
    HEADERS of a POST to Health/Check on stream 1 and one DATA frame with the request that ends it."""
    fields = [(":method", "POST"), (":scheme", "http"), (":path", HEALTH_PATH), (":authority", authority),
              ("content-type", "application/grpc"), ("te", "trailers")]
    block = b"".join(hpack_literal(n, v) for n, v in fields)
    return (PREFACE + _frame(SETTINGS, 0, 0, b"")
            + _frame(HEADERS, END_HEADERS, 1, block)
            + _frame(DATA, END_STREAM, 1, health_check_request(service)))


# The reply's last frame: the trailers (grpc-status) as HEADERS that end stream 1. Once they are in,
# the whole reply is.
TRAILERS_HEADER = bytes([HEADERS, END_STREAM | END_HEADERS]) + struct.pack(">I", 1)
# HealthCheckResponse{status: SERVING} is the protobuf 08 01 (field 1, varint 1; NOT_SERVING is 08 02,
# SERVICE_UNKNOWN 08 03). Matched with its whole DATA frame: length 7, no flags, stream 1, the gRPC
# prefix (uncompressed, length 2) and the message. gRPC servers do not compress unless the client
# offers an encoding, and this request offers none.
SERVING_DATA_FRAME = _frame(DATA, 0, 1, b"\x00" + struct.pack(">I", 2) + b"\x08\x01")


def health_check_rules(service: str = HEALTH_SERVICE, authority: str = "localhost", tls: bool = False) -> list[str]:
    """The tcp-check rules: send the call, wait for the reply's trailers, then require SERVING in what
    came before them. `min-recv 0` makes the second expect conclusive at once (no waiting for more
    bytes), so NOT_SERVING, an unknown service or an error status fail the check as soon as the
    reply is complete, not after `timeout check`. `tls`: the same bytes inside TLS (passthrough)."""
    label = service or "the server"
    return [
        "option tcp-check",
        "tcp-check connect ssl alpn h2" if tls else "tcp-check connect",
        (f"tcp-check send-binary {health_check_bytes(service, authority).hex()} "
         f"comment \"grpc.health.v1.Health/Check {label}\""),
        f"tcp-check expect binary {TRAILERS_HEADER.hex()} comment \"reply complete (trailers on stream 1)\"",
        f"tcp-check expect min-recv 0 binary {SERVING_DATA_FRAME.hex()} comment \"{label} is SERVING\"",
    ]


# -- the config ------------------------------------------------------------------------------------------
DEFAULTS: dict[str, Any] = {
    "bind": "127.0.0.1:50550",
    "affinity_header": AFFINITY_HEADER,
    "hash_type": "consistent sdbm avalanche",
    "timeout_connect": "2s",
    "timeout_client": "1h",
    "timeout_server": "1h",
    "timeout_check": "2s",
    "check_inter": "1s",
    "fall": 2,
    "rise": 2,
    "retries": 2,
    "health_service": HEALTH_SERVICE,
    "health_authority": "localhost",
    "h2_window": 1 << 20,
    "maxconn": 4096,
    "weight": 100,
    "replica_header": "x-dlora-replica",
}


def server_names(count: int, prefix: str = "cloud") -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


def render(backends: Sequence[str], bind: str = DEFAULTS["bind"], *, names: Sequence[str] | None = None,
           affinity_header: str = DEFAULTS["affinity_header"], hash_type: str = DEFAULTS["hash_type"],
           timeout_connect: str = DEFAULTS["timeout_connect"], timeout_client: str = DEFAULTS["timeout_client"],
           timeout_server: str = DEFAULTS["timeout_server"], timeout_check: str = DEFAULTS["timeout_check"],
           check_inter: str = DEFAULTS["check_inter"], fall: int = DEFAULTS["fall"], rise: int = DEFAULTS["rise"],
           retries: int = DEFAULTS["retries"], health_service: str = DEFAULTS["health_service"],
           health_authority: str = DEFAULTS["health_authority"], h2_window: int = DEFAULTS["h2_window"],
           maxconn: int = DEFAULTS["maxconn"], weight: int = DEFAULTS["weight"],
           replica_header: str = DEFAULTS["replica_header"],
           stats_socket: str | None = None, stats_bind: str | None = None, resolvers: bool = False,
           tls_pem: str | None = None, log: bool = True, passthrough: bool = False) -> str:
    """The HAProxy config for `backends` (HOST:PORT each; HOST may be a DNS name) behind `bind`.

    names: the servers' names (default cloud0, cloud1, ...). They also place the servers on the
      consistent-hash ring, so keep them stable: the same name for the same replica keeps its keys.
    stats_socket: a unix socket for the runtime API (`show stat`, `show servers state`, admin level).
    stats_bind: ADDR:PORT of an HTTP listener with the stats page (/stats), Prometheus metrics
      (/metrics) and /healthz (200 while at least one replica is UP, else 503).
    resolvers: resolve backend names at run time from /etc/resolv.conf (containers: a replica that
      comes back with a new address is found again); a name that does not resolve yet leaves its
      server without an address (down) instead of failing the start.
    tls_pem: certificate + key (one PEM file) for TLS on the frontend (ALPN h2); plaintext h2c without.
    passthrough: forward TCP to replicas that serve TLS themselves (attested ones), with affinity by the
      client's address; affinity_header, replica_header and tls_pem do not apply.
    """
    if passthrough and tls_pem:
        raise ValueError("passthrough forwards the replicas' own TLS; it cannot also end TLS at HAProxy (tls_pem)")
    backends = list(backends)
    if not backends:
        raise ValueError("at least one backend (HOST:PORT) is needed")
    names = list(names) if names is not None else server_names(len(backends))
    if len(names) != len(backends) or len(set(names)) != len(names):
        raise ValueError("one distinct name per backend")
    for b in backends:
        host, sep, port = b.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"backend {b!r} is not HOST:PORT")
    if not affinity_header or any(c.isspace() for c in affinity_header):
        raise ValueError(f"bad affinity header name {affinity_header!r}")
    if fall < 1 or rise < 1 or retries < 0 or h2_window < 65535 or maxconn < 1 or not 1 <= weight <= 256:
        raise ValueError("fall and rise must be >= 1, retries >= 0, h2 window >= 65535, maxconn >= 1, "
                         "weight 1..256")

    out: list[str] = [
        "# Rendered by deploy/haproxy.py (python -m deploy.haproxy --help); edit the renderer, not this file.",
        "global",
        f"    maxconn {maxconn}",
        # What a client may upload per stream before HAProxy acknowledges it: 64 KiB by default, about
        # 5 Mbit/s at 100 ms RTT, too little for a step's activations.
        f"    tune.h2.initial-window-size {h2_window}",
    ]
    if log:
        out.append("    log stdout format raw local0 info")
    if stats_socket:
        out.append(f"    stats socket {stats_socket} mode 600 level admin")
    out += [
        "",
        "defaults",
        f"    mode {'tcp' if passthrough else 'http'}",
        *(["    log global", f"    option {'tcplog' if passthrough else 'httplog'}", "    option dontlognull"]
          if log else []),
        f"    timeout connect {timeout_connect}",
        "    # A step's stream can be silent for long while the other side computes: client and server",
        "    # timeouts are long ('timeout server' is the one that would kill a silent stream).",
        f"    timeout client {timeout_client}",
        f"    timeout server {timeout_server}",
        f"    timeout check {timeout_check}",
        f"    retries {retries}",
        "    option redispatch 1",
    ]
    if resolvers:
        out += [
            "",
            "resolvers dns",
            "    parse-resolv-conf",
            "    hold valid 10s",
        ]
    tls = "" if passthrough else f" ssl crt {tls_pem} alpn h2" if tls_pem else " proto h2"
    out += [
        "",
        f"frontend {FRONTEND}",
        f"    bind {bind}{tls}",
        f"    default_backend {BACKEND}",
        "",
        f"backend {BACKEND}",
        # Passthrough cannot read the header: the client's address is the affinity key instead.
        "    balance source" if passthrough else f"    balance hdr({affinity_header})",
        f"    hash-type {hash_type}",
    ]
    out += [f"    {rule}" for rule in health_check_rules(health_service, health_authority, tls=passthrough)]
    if replica_header and not passthrough:
        out.append(f"    http-response set-header {replica_header} %s")
    # All replicas weigh the same; a larger weight only gives each more points on the hash ring, so
    # keys spread more evenly (measured over 600 keys: 45/55 at weight 1, 50/50 at 100). No
    # hash-balance-factor: bounded loads would move keys off their replica while it is busy.
    server_opts = f"check inter {check_inter} fall {fall} rise {rise} weight {weight}"
    # Passthrough: HAProxy opens TLS for its checks only, and trusts nothing of it (the edge attests).
    server_opts += " check-ssl verify none" if passthrough else " proto h2"
    if resolvers:
        server_opts += " resolvers dns resolve-prefer ipv4 init-addr last,libc,none"
    out.append(f"    default-server {server_opts}")
    out += [f"    server {n} {b}" for n, b in zip(names, backends)]
    if stats_bind:
        out += [
            "",
            "frontend stats",
            f"    bind {stats_bind}",
            "    monitor-uri /healthz",
            f"    monitor fail if {{ nbsrv({BACKEND}) lt 1 }}",
            "    http-request set-log-level silent",
            "    http-request use-service prometheus-exporter if { path /metrics }",
            "    stats enable",
            "    stats uri /stats",
            "    stats refresh 5s",
        ]
    return "\n".join(out) + "\n"


def find_haproxy(name: str = "haproxy") -> str:
    """The haproxy binary: `name` on PATH, else in the sbin directories a user's PATH often lacks."""
    found = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    if found is None:
        raise FileNotFoundError(f"{name} not found; install HAProxy 2.6 or later (apt-get install haproxy)")
    return found


# -- presets: the committed configs of deploy/compose.yml and deploy/k8s/ --------------------------------
DEPLOY = Path(__file__).resolve().parent
K8S_NAMESPACE = "dlora"
K8S_REPLICAS = 2
COMPOSE_REPLICAS = 2
CLOUD_PORT = 50551
LB_PORT = 50550
STATS_PORT = 8404


def compose_config() -> str:
    """deploy/haproxy-compose.cfg: services cloud0, cloud1 on the compose network, found through
    Docker's DNS (again after a restart gives them new addresses)."""
    names = server_names(COMPOSE_REPLICAS)
    return render([f"{n}:{CLOUD_PORT}" for n in names], f"0.0.0.0:{LB_PORT}", names=names,
                  stats_bind=f"0.0.0.0:{STATS_PORT}", resolvers=True)


def k8s_config(namespace: str = K8S_NAMESPACE, replicas: int = K8S_REPLICAS,
               cluster_domain: str = "cluster.local") -> str:
    """deploy/k8s/haproxy.cfg: the StatefulSet's pods by their stable DNS names through the headless
    Service (POD.SERVICE.NAMESPACE.svc.DOMAIN; HAProxy's resolver uses no search domains, so fully
    qualified). A pod's name, not its address, is its place on the hash ring."""
    names = [f"dlora-cloud-{i}" for i in range(replicas)]
    return render([f"{n}.dlora-cloud.{namespace}.svc.{cluster_domain}:{CLOUD_PORT}" for n in names],
                  f"0.0.0.0:{LB_PORT}", names=names, stats_bind=f"0.0.0.0:{STATS_PORT}", resolvers=True)


PRESETS = {"compose": (compose_config, DEPLOY / "haproxy-compose.cfg"),
           "k8s": (k8s_config, DEPLOY / "k8s" / "haproxy.cfg")}


# -- command line -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="python -m deploy.haproxy",
        description="Render an HAProxy config for cloud_server replicas (consistent hashing on the "
                    f"{AFFINITY_HEADER} header, gRPC health checks) and run HAProxy in the foreground.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bind", default=d["bind"], help="ADDR:PORT the load balancer listens on (h2c)")
    p.add_argument("--backend", action="append", default=[], metavar="HOST:PORT[,HOST:PORT...]",
                   help="a cloud_server replica; repeat it or separate with commas")
    p.add_argument("--name", action="append", default=[], metavar="NAME[,NAME...]",
                   help="the replicas' server names, in --backend order (default cloud0, cloud1, ...): "
                        "their places on the hash ring")
    p.add_argument("--affinity-header", default=d["affinity_header"], help="the header hashed to pick a replica")
    p.add_argument("--hash-type", default=d["hash_type"], help="HAProxy hash-type (method, function, modifier)")
    p.add_argument("--timeout-connect", default=d["timeout_connect"],
                   help="connecting to a replica; short, so a dead one is noticed (and skipped) quickly")
    p.add_argument("--timeout-client", default=d["timeout_client"], help="longest silence from an edge")
    p.add_argument("--timeout-server", default=d["timeout_server"],
                   help="longest silence from a replica within a call (a step's stream waits while the edge "
                        "computes)")
    p.add_argument("--timeout-check", default=d["timeout_check"], help="longest wait for a health-check reply")
    p.add_argument("--check-inter", default=d["check_inter"], help="time between health checks")
    p.add_argument("--fall", type=int, default=d["fall"], help="failed checks that mark a replica DOWN")
    p.add_argument("--rise", type=int, default=d["rise"], help="passed checks that mark it UP again")
    p.add_argument("--retries", type=int, default=d["retries"],
                   help="connection attempts after a failed one (the last ones redispatched to another replica)")
    p.add_argument("--health-service", default=d["health_service"],
                   help="service name asked of grpc.health.v1.Health/Check; '' asks for the whole server")
    p.add_argument("--health-authority", default=d["health_authority"], help=":authority of the health check")
    p.add_argument("--h2-window", type=int, default=d["h2_window"],
                   help="HTTP/2 initial window size in bytes (how much an edge may upload before an "
                        "acknowledgement)")
    p.add_argument("--maxconn", type=int, default=d["maxconn"], help="most concurrent connections")
    p.add_argument("--weight", type=int, default=d["weight"],
                   help="every replica's weight (1..256): its points on the hash ring; higher spreads keys more "
                        "evenly")
    p.add_argument("--replica-header", default=d["replica_header"],
                   help="response header naming the replica that answered; '' for none")
    p.add_argument("--stats-socket", metavar="PATH", help="unix socket for HAProxy's runtime API (show stat)")
    p.add_argument("--stats-bind", metavar="ADDR:PORT",
                   help="HTTP listener with /stats, /metrics (Prometheus) and /healthz")
    p.add_argument("--resolvers", action="store_true",
                   help="re-resolve backend names at run time from /etc/resolv.conf (containers)")
    p.add_argument("--tls-pem", metavar="PEM", help="certificate and key (one PEM) for TLS on the frontend")
    p.add_argument("--passthrough", action="store_true",
                   help="forward TCP to replicas that serve TLS themselves (attested cloud_servers): affinity by "
                        "client address, health checks inside TLS; no header affinity, no --tls-pem")
    p.add_argument("--no-log", dest="log", action="store_false", help="no request log on stdout")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="print or write the committed config of deploy/compose.yml or deploy/k8s/ (with "
                        "--write: into its file) and ignore the other options")
    p.add_argument("--write", action="store_true", help="with --preset: write the preset's file")
    p.add_argument("--config-out", type=Path, default=Path("runs/lb/haproxy.cfg"), metavar="FILE",
                   help="where to write the config HAProxy runs")
    p.add_argument("--haproxy", default="haproxy", help="the haproxy binary")
    p.add_argument("--print", dest="print_only", action="store_true", help="print the config and exit")
    args = p.parse_args(argv)
    args.backend = [b for arg in args.backend for b in arg.split(",") if b]
    args.name = [n for arg in args.name for n in arg.split(",") if n]
    if not args.preset and not args.backend:
        p.error("give at least one --backend HOST:PORT (or --preset)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.preset:
        make, path = PRESETS[args.preset]
        if args.write:
            path.write_text(make())
            print(f"wrote {path}")
        else:
            sys.stdout.write(make())
        return 0
    try:
        config = render(args.backend, args.bind, names=args.name or None, affinity_header=args.affinity_header,
                        hash_type=args.hash_type, timeout_connect=args.timeout_connect,
                        timeout_client=args.timeout_client, timeout_server=args.timeout_server,
                        timeout_check=args.timeout_check, check_inter=args.check_inter, fall=args.fall,
                        rise=args.rise, retries=args.retries, health_service=args.health_service,
                        health_authority=args.health_authority, h2_window=args.h2_window, maxconn=args.maxconn,
                        weight=args.weight, replica_header=args.replica_header, stats_socket=args.stats_socket,
                        stats_bind=args.stats_bind, resolvers=args.resolvers, tls_pem=args.tls_pem, log=args.log,
                        passthrough=args.passthrough)
    except ValueError as exc:
        print(f"deploy.haproxy: {exc}", file=sys.stderr)
        return 2
    if args.print_only:
        sys.stdout.write(config)
        return 0
    try:
        binary = find_haproxy(args.haproxy)
    except FileNotFoundError as exc:
        print(f"deploy.haproxy: {exc}", file=sys.stderr)
        return 2
    args.config_out.parent.mkdir(parents=True, exist_ok=True)
    args.config_out.write_text(config)
    print(f"deploy.haproxy: {args.config_out}; load balancer on {args.bind} for {', '.join(args.backend)}",
          file=sys.stderr, flush=True)
    os.execv(binary, [binary, "-W", "-db", "-f", str(args.config_out)])
    return 0  # unreachable


if __name__ == "__main__":
    sys.exit(main())
