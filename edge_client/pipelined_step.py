"""A pipelined training step: its batch cut into micro-batches, each a stream of its own, all in flight at once.

While one micro-batch's site exchange is on the wire, the cloud computes another's blocks and this device
another's adapters. The step answers as one StepStream does (open, finish, abandon, drain, its state, stats,
gradients and cut gradient), so the autograd Function that drives a step does not know the difference. The
cloud takes the parts as one step of the session (StepStart.micro_batch and micro_batches); a part that fails
fails the step, which the caller replays whole, every part again.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import grpc
import torch

from edge_client.errors import CloudError
from edge_client.step_stream import StepState, StepStats, StepStream

_T = TypeVar("_T")


def row_bounds(batch: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) rows of each of `parts` micro-batches of `batch` rows, as even as they go (at most
    `batch` parts: a part has a row at least)."""
    parts = max(1, min(parts, batch))
    edges = [round(i * batch / parts) for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


class PipelinedStep:
    """The parts of one training step, one StepStream each (made by CloudSession.open_step)."""

    def __init__(self, streams: list[StepStream], bounds: list[tuple[int, int]]) -> None:
        if len(streams) != len(bounds) or len(streams) < 2:
            raise ValueError("a pipelined step has two parts or more, one stream each")
        self.streams = streams
        self.bounds = bounds
        self.step_id = streams[0].step_id
        self._stats: StepStats | None = None

    # -- what a StepStream answers ------------------------------------------------
    @property
    def state(self) -> StepState:
        """PAUSED or DONE once every part is; FAILED or ABANDONED as soon as one part is; else OPEN."""
        states = {s.state for s in self.streams}
        for bad in (StepState.FAILED, StepState.ABANDONED):
            if bad in states:
                return bad
        return states.pop() if len(states) == 1 else StepState.OPEN

    @property
    def stats(self) -> StepStats:
        """The step's cost: the parts' bytes, messages, exchanges, FLOPs and cloud compute added up."""
        if self._stats is not None:
            return self._stats
        out = StepStats()
        for part in (s.stats for s in self.streams):
            for name in ("bytes_sent", "bytes_received", "messages", "sites", "edge_flops", "cloud_seconds"):
                setattr(out, name, getattr(out, name) + getattr(part, name))
            out.batch_sessions = max(out.batch_sessions, part.batch_sessions)
        return out

    @property
    def grads(self) -> dict[int, torch.Tensor]:
        """id(parameter) -> its gradient: the parts' added up in part order, so a replay adds up the same."""
        out: dict[int, torch.Tensor] = {}
        for s in self.streams:
            for key, g in s.exchange.grads.items():
                out[key] = out[key] + g if key in out else g
        return out

    @property
    def cut_grad(self) -> torch.Tensor | None:
        cuts = [s.cut_grad for s in self.streams]
        return None if any(c is None for c in cuts) else torch.cat([c for c in cuts if c is not None])

    def expect_cut_grad(self, shape: tuple[int, ...]) -> None:
        for s, (a, b) in zip(self.streams, self.bounds):
            s.expect_cut_grad((b - a,) + tuple(shape[1:]))

    def open(self) -> torch.Tensor:
        """Every part's forward pass at once: the final hidden state of the whole batch."""
        return torch.cat(self._all([s.open for s in self.streams]))

    def finish(self, grad: torch.Tensor) -> None:
        """Every part's backward at once, each with its rows of dL/d(final hidden)."""
        self._all([partial(s.finish, grad[a:b]) for s, (a, b) in zip(self.streams, self.bounds)])
        self._stats = self.stats

    def abandon(self, reason: str) -> None:
        for s in self.streams:
            s.abandon(reason)

    def drain(self) -> None:
        for s in self.streams:
            s.drain()

    # -- running the parts -----------------------------------------------------------
    def _all(self, calls: list[Callable[[], _T]]) -> list[_T]:
        """Run the calls at once, one thread each; results in order. The first to fail abandons the others
        (their calls then end, cancelled), and once all have ended the most telling failure is raised: the
        first that is not a cancellation (NOT_FOUND from a replica that lost the session must reach the
        retry layer, which then opens a new session), else the first."""
        results: list = [None] * len(calls)
        failures: list[tuple[int, BaseException]] = []
        lock = threading.Lock()

        def run(i: int) -> None:
            try:
                results[i] = calls[i]()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                with lock:
                    failures.append((i, exc))
                    first = len(failures) == 1
                if first:
                    self.abandon(f"micro-batch {i} of the step failed")

        threads = [threading.Thread(target=run, args=(i,), name=f"dlora-part-{i}", daemon=True)
                   for i in range(1, len(calls))]
        for t in threads:
            t.start()
        run(0)   # the first part in this thread
        for t in threads:
            t.join()
        if failures:
            causes = [exc for i, exc in failures if not _echo(exc, self.streams[i])]
            raise (causes or [exc for _, exc in failures])[0]
        return results


def _echo(exc: BaseException, stream: StepStream) -> bool:
    """A part's failure that only echoes another's: its call cancelled (by the abandon, or by a proxy that
    reset the streams when the cloud refused one), or its finish refused because it had been abandoned."""
    cancelled = isinstance(exc, CloudError) and exc.code == grpc.StatusCode.CANCELLED
    return cancelled or stream.state is StepState.ABANDONED
