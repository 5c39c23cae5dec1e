"""Failover behind a real HAProxy on 127.0.0.1: a replica dies mid-run and every edge ends as if it had not."""
from __future__ import annotations

import logging
import secrets
import threading
import time

import pytest

from deploy.local import Cluster

from helpers import HAPROXY, assert_same_state, split_state, split_trainer
from helpers import kr_trainer as _trainer

log = logging.getLogger(__name__)

pytestmark = pytest.mark.skipif(HAPROXY is None, reason="needs haproxy (apt-get install haproxy; .ci/run installs "
                                                        "it, and fails if it cannot)")

FEDERATION = "failover"
SPLIT_STEPS, DLORA_STEPS, KILL_AT = 6, 8, 4   # rounds after steps 2, 4, 6: two steps since the last


def keys_on(cluster: Cluster, replica: int, count: int) -> list[str]:
    """DLoRA client keys that HAProxy routes to `replica` now."""
    keys = []
    while len(keys) < count:
        key = secrets.token_hex(16)
        if cluster.route(key) == replica:
            keys.append(key)
    return keys


def run_edges(cluster: Cluster, tmp_path, dlora_keys: list[str], kill: bool) -> tuple[list[dict], dict]:
    """2 DLoRA edges and 2 SplitLoRA edges of one federation, all through the load balancer.

    The SplitLoRA edges step in a fixed order (A then B), so the shared server-side adapters see the
    same sequence of updates in every run; their FedAvg rounds run side by side, as they must. With
    `kill`, the federation's replica is SIGKILLed between edge A's forward and backward of step
    KILL_AT. The DLoRA edges pause half-way until then, so the dead replica holds a live session of one.
    """
    killed = threading.Event()
    timings: dict[str, float] = {}
    fed_replica = cluster.route(FEDERATION)
    retry = dict(retries=12, backoff=0.2, max_backoff=2.0)
    from edge_client.session import RetryPolicy

    splits = [split_trainer(cluster.address, tmp_path / "cache", FEDERATION, clients=2, seed=s, steps=SPLIT_STEPS,
                            aggregate_every=10 ** 6, retry=RetryPolicy(**retry)) for s in (0, 1)]
    for trainer, _ in splits:
        trainer.cfg.steps = 10 ** 6     # this test runs the FedAvg rounds itself, for both members at once
    dloras = [_trainer(cluster.address, tmp_path, client_key=k) for k in dlora_keys]
    a = splits[0][0]
    real_loss = a.loss

    def loss_that_kills(hidden, batch):
        if kill and a.step_id == KILL_AT and not killed.is_set():
            timings["kill"] = time.monotonic()
            cluster.kill(fed_replica)
            killed.set()
        return real_loss(hidden, batch)

    a.loss = loss_that_kills
    errors: list[BaseException] = []

    def caught(fn, *args) -> threading.Thread:
        def run() -> None:
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the test
                errors.append(exc)
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def dlora_edge(trainer, batches) -> None:
        for i, b in enumerate(batches[:DLORA_STEPS]):
            if i == DLORA_STEPS // 2 and kill:
                killed.wait(120)
            trainer.train_step(b)

    threads = [caught(dlora_edge, *d) for d in dloras]
    for step in range(SPLIT_STEPS):
        for trainer, batches in splits:
            trainer.train_step(batches[step])
            if step + 1 == KILL_AT and trainer is a and kill:
                timings["resumed"] = time.monotonic()   # the interrupted step completed on the other replica
        if step % 2 == 1:   # FedAvg every 2 steps: both members at once
            for t in [caught(t.model.aggregate, (step + 1) // 2, t.train_examples) for t, _ in splits]:
                t.join(120)
    for t in threads:
        t.join(300)
    if errors:
        raise errors[0]
    states = [split_state(t) for t, _ in splits]
    states += [{f"{n}.{w}": getattr(ad, w).detach().clone() for n, ad in t.adapters.items()
                for w in ("lora_A", "lora_B")} for t, _ in dloras]
    if kill:
        assert splits[0][0].session.reconnects >= 1 and splits[1][0].session.reconnects >= 1
        assert any(t.session.reconnects >= 1 for t, _ in dloras)   # one DLoRA edge lived on the dead replica
        assert all(t.live != set(t.adapters) for t, _ in dloras)   # parked adapters were re-parked
    for t, _ in splits + dloras:
        t.session.close()
    return states, timings


def test_a_replica_dies_mid_run_and_every_edge_ends_exactly(model_dirs, tmp_path):
    """2 replicas behind HAProxy, 4 edges: the federation's replica is killed mid-step, and every
    edge's adapters (and the federation's server-side ones) equal an uninterrupted run's within 1e-5.

    Cross-session batching is off (--batch-window-ms 0): a step batched with another edge's sums in
    another order, which moves results by ~1e-7, and the two runs would batch differently."""
    server_args = ["--model", str(model_dirs["llama"]), "--batch-window-ms", "0"]
    with Cluster(2, server_args, state_dir=tmp_path / "state", log_dir=tmp_path / "logs") as cluster:
        fed_replica = cluster.route(FEDERATION)
        other = 1 - fed_replica
        dlora_keys = keys_on(cluster, fed_replica, 1) + keys_on(cluster, other, 1)
        want, _ = run_edges(cluster, tmp_path, dlora_keys, kill=False)
        got, timings = run_edges(cluster, tmp_path, dlora_keys, kill=True)
        cluster.wait_state(fed_replica, "DOWN", timeout=15)   # its health checks fail (the edges went on before)
        assert cluster.route(FEDERATION) == other
    for g, w in zip(got, want):
        assert_same_state(g, w)
    assert want[0]["updates"].item() == 2 * SPLIT_STEPS
    log.warning("failover: the interrupted SplitLoRA step completed %.2f s after the kill",
                timings["resumed"] - timings["kill"])
    assert not list((tmp_path / "state").glob("federation-*.pt"))   # every member left: the state is gone
