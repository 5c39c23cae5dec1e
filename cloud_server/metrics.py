"""Operator metrics in Prometheus' text format (prometheus_client), served by `cloud_server --metrics-port`.

Counts and timings only: no metric carries a token, an activation or a client's name.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from cloud_server.session import SessionManager

log = logging.getLogger(__name__)

# Step wall times run from a few milliseconds (a forward on a tiny model) to minutes (a slow link).
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
_SESSIONS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    """The server's metrics, in a registry of their own (several servers in one process never mix)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.steps = Counter("dlora_steps", "Steps run, by kind: train (training steps), forward (evaluation "
                             "forwards), generation (generate streams)", ["kind"], registry=r)
        self.tokens = Counter("dlora_tokens", "Real (unpadded) positions the cloud computed, by kind; "
                              "rate() of it is the tokens per second", ["kind"], registry=r)
        self.step_seconds = Histogram("dlora_step_seconds", "Wall time of a step on the cloud, from its start "
                                      "message to StepEnd, waits on the edge included", ["kind"], buckets=_SECONDS,
                                      registry=r)
        self.cloud_seconds = Histogram("dlora_cloud_compute_seconds", "Cloud compute of a step: its wall time "
                                       "less the waits on the edge, or its share of a joint batch's",
                                       ["kind"], buckets=_SECONDS, registry=r)
        self.batch_sessions = Histogram("dlora_joint_batch_sessions", "Sessions whose steps ran as one batch, "
                                        "observed once per batchable DLoRA step (1: it ran alone)",
                                        buckets=_SESSIONS, registry=r)
        self.received = Counter("dlora_received_bytes", "Bytes of request messages received, by method",
                                ["method"], registry=r)
        self.sent = Counter("dlora_sent_bytes", "Bytes of reply messages sent, by method", ["method"], registry=r)
        self.errors = Counter("dlora_errors", "Calls answered with an error, by method and gRPC status",
                              ["method", "code"], registry=r)
        self.rounds = Counter("dlora_federation_rounds", "SplitLoRA FedAvg rounds averaged", registry=r)

    def watch_sessions(self, sessions: SessionManager) -> None:
        """Report the sessions open by mode, read at each scrape."""
        self.registry.register(_OpenSessions(sessions))

    def step(self, kind: str, seconds: float, cloud_seconds: float, tokens: int, batch_sessions: int,
             counted: bool = True) -> None:
        """One step (or, `counted` False, a pipelined step's later part) of `kind` ended; `batch_sessions` 0:
        the step is not batchable."""
        if counted:
            self.steps.labels(kind).inc()
        self.tokens.labels(kind).inc(tokens)
        self.step_seconds.labels(kind).observe(seconds)
        self.cloud_seconds.labels(kind).observe(cloud_seconds)
        if batch_sessions:
            self.batch_sessions.observe(batch_sessions)

    def counting(self, method: str, parse: Callable[[bytes], object],
                 serialize: Callable[[object], bytes]) -> tuple[Callable[[bytes], object], Callable[[object], bytes]]:
        """`method`'s deserializer and serializer, counting the bytes each way."""
        received, sent = self.received.labels(method), self.sent.labels(method)

        def counted_parse(data: bytes) -> object:
            received.inc(len(data))
            return parse(data)

        def counted_serialize(msg: object) -> bytes:
            data = serialize(msg)
            sent.inc(len(data))
            return data

        return counted_parse, counted_serialize

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: a free port) in a daemon thread; returns the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = int(server.server_address[1])
        log.info("metrics: http://%s:%d/metrics (Prometheus text format)", host, bound)
        return bound


class _OpenSessions(Collector):
    def __init__(self, sessions: SessionManager) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("dlora_sessions_open", "Sessions open now, by mode", labels=["mode"])
        for mode, n in sorted(self.sessions.open_by_mode().items()):
            family.add_metric([mode], n)
        yield family
