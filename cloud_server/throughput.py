"""Work done since the last report, for the server's periodic log line."""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cloud_server.metrics import Metrics

log = logging.getLogger(__name__)


class Throughput:
    """Counts of steps, forwards, generations, tokens and cloud seconds, taken and reset by each report; each
    step also goes to the Prometheus metrics, when given."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self._lock = threading.Lock()
        self._counts = {"steps": 0, "forwards": 0, "generations": 0, "tokens": 0, "cloud_seconds": 0.0,
                        "batched": 0, "cohort_members": 0, "batchable": 0}

    def add(self, **counts: float) -> None:
        with self._lock:
            for k, v in counts.items():
                self._counts[k] += v

    def step(self, counter: str, label: str, seconds: float, cloud_seconds: float, tokens: int,
             batch_sessions: int, counted: bool = True) -> None:
        """One step ended: `counter` is its count here ("steps", "forwards", "generations"), `label` its kind
        in the metrics; `batch_sessions` 0: not batchable. `counted` False: a pipelined step's later part
        (its tokens and time count, the step once)."""
        batching = ({"batched": int(batch_sessions > 1), "cohort_members": batch_sessions, "batchable": 1}
                    if batch_sessions else {})
        self.add(**{counter: int(counted)}, tokens=tokens, cloud_seconds=cloud_seconds, **batching)
        if self.metrics is not None:
            self.metrics.step(label, seconds, cloud_seconds, tokens, batch_sessions, counted)

    def take(self) -> dict[str, float]:
        with self._lock:
            counts = dict(self._counts)
            for k in self._counts:
                self._counts[k] = 0
        return counts

    def report(self, seconds: float, open_sessions: int) -> None:
        """Log the work of the last `seconds` (and reset the counts); an idle server stays quiet."""
        c = self.take()
        if not (c["steps"] or c["forwards"] or c["generations"]):
            return
        batched = ""
        if c["batched"]:
            # cohort_members counts, per step, how many sessions shared its batch.
            batched = (f"; {c['batched']:.0f} steps batched with other sessions' "
                       f"(mean {c['cohort_members'] / max(c['batchable'], 1):.1f} sessions per batch)")
        log.info("last %.0f s: %d training steps, %d forwards, %d generations, %d tokens (%.0f tokens/s), "
                 "cloud compute %.1f s (%.0f%% busy)%s; %d sessions open",
                 seconds, c["steps"], c["forwards"], c["generations"], c["tokens"], c["tokens"] / seconds,
                 c["cloud_seconds"], 100 * c["cloud_seconds"] / seconds, batched, open_sessions)
