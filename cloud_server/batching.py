"""Cross-session batching: DLoRA steps of different edges that arrive together run as one batch.

Serving systems batch requests so one accelerator serves many users; here the
requests are training steps (and forwards) of different sessions. The first
step to arrive leads a cohort: it waits up to `window` seconds for the other
sessions that are between steps, then stacks every member's batch into one
(shorter sequences padded at the end), runs the frozen blocks once, and at each
site sends every member its own rows (see step_runner.StepRunner). Rows never
mix inside a block (attention stays within a row, everything else is per
position), so each member gets the result it would have got alone.

Training steps and forwards form separate cohorts. A lone session never waits:
a cohort closes as soon as no other session could join it.
"""
from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cloud_server.edge_link import EdgeLink
from cloud_server.served_model import ServedModel
from cloud_server.step_runner import StepRunner
from common.settings import setting
from common.wire import dlora_pb2 as pb
from common.wire_format import WireFormat


@dataclass
class StepJob:
    """One session's step, handed to the batcher by that session's stream thread."""

    link: EdgeLink
    hidden: torch.Tensor     # [b, T, H] on the serving device
    mask: torch.Tensor       # [b, T], 1 = real position
    train: bool
    solo: bool = False       # never batched (its edge once lagged behind a joint batch)
    # Blocks [0, cut) ran on the edge (DLoRA edge_layers): the step starts at block
    # `cut`, and a training step returns dL/d(hidden) to the edge.
    cut: int = 0
    cloud_seconds: float = 0.0
    cohort_size: int = 1
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def tokens(self) -> int:
        return int(self.hidden.shape[0] * self.hidden.shape[1])


@dataclass
class _Cohort:
    train: bool
    jobs: list[StepJob]
    cut: int = 0             # members share the block they start at


BATCHING = ("batching: steps of different edges that arrive together run as one batch through the frozen "
            "blocks, so one accelerator serves many edges")


@dataclass
class BatchingConfig:
    window_ms: float = setting(100.0, "how long a step waits for other sessions' steps to join its batch; it waits "
                                      "only while some session is between steps, so a lone edge never waits. 0 "
                                      "turns batching off", flag="--batch-window-ms", group=BATCHING)
    max_tokens: int = setting(65536, "largest joint batch: sessions x batch x longest sequence",
                              flag="--max-cohort-tokens", group=BATCHING)
    max_members: int = setting(16, "most sessions in one joint batch", flag="--max-cohort-sessions", group=BATCHING)
    lag_timeout: float = setting(30.0, "seconds a batched edge may take to answer one exchange; a slower edge is "
                                       "dropped from its batch (its step fails and is retried) and runs alone from "
                                       "then on, so it cannot hold the others back", flag="--batch-lag-timeout",
                                 group=BATCHING)
    # A member with long sequences must not make short ones pay for its padding.
    max_padding: float = setting(1.5, "padded tokens in a joint batch at most this many times the real ones",
                                 flag="--max-cohort-padding", group=BATCHING)

    def __post_init__(self) -> None:
        if self.window_ms < 0 or self.max_tokens < 1 or self.max_members < 1:
            raise ValueError("--batch-window-ms must not be negative; --max-cohort-tokens and --max-cohort-sessions "
                             "must be positive")
        if self.lag_timeout <= 0 or self.max_padding < 1:
            raise ValueError("--batch-lag-timeout must be positive and --max-cohort-padding at least 1")

    @property
    def window(self) -> float:
        """The batching window in seconds."""
        return self.window_ms / 1000


class StepBatcher:
    """Groups concurrent steps into cohorts and runs each cohort as one batch."""

    def __init__(self, served: ServedModel, config: BatchingConfig,
                 could_join: Callable[[], int] = lambda: 0) -> None:
        self.served = served
        self.config = config
        # How many sessions are between steps and might arrive within the window.
        self.could_join = could_join
        self.groups = {name: tuple(group) for group in served.groups for name in group}
        self._lock = threading.Condition()
        self._forming: list[_Cohort] = []

    def run(self, job: StepJob) -> None:
        """Run `job`'s step, alone or in a cohort; raises the job's own failure."""
        cohort = self._join(job)
        if cohort is not None:
            self._lead(cohort)
        job.done.wait()
        err = job.link.take_error()
        if err is not None:
            raise err

    def _join(self, job: StepJob) -> _Cohort | None:
        """Join a forming cohort (returns None) or open one and lead it."""
        with self._lock:
            if self.config.window > 0 and not job.solo:
                for forming in self._forming:
                    if forming.train == job.train and forming.cut == job.cut and self._fits(forming.jobs, job):
                        forming.jobs.append(job)
                        self._lock.notify_all()
                        return None
            cohort = _Cohort(job.train, [job], job.cut)
            if self.config.window > 0 and not job.solo:
                self._forming.append(cohort)
            return cohort

    def _fits(self, jobs: list[StepJob], job: StepJob) -> bool:
        members = jobs + [job]
        padded = sum(j.hidden.shape[0] for j in members) * max(j.hidden.shape[1] for j in members)
        return (len(members) <= self.config.max_members and padded <= self.config.max_tokens
                and padded <= self.config.max_padding * sum(j.tokens for j in members))

    def _lead(self, cohort: _Cohort) -> None:
        end = time.monotonic() + self.config.window
        with self._lock:
            while (cohort in self._forming and len(cohort.jobs) < self.config.max_members
                   and self.could_join() > 0 and time.monotonic() < end):
                self._lock.wait(timeout=min(end - time.monotonic(), 0.002))
            if cohort in self._forming:
                self._forming.remove(cohort)
        try:
            run_cohort(self.served, cohort.jobs, self.groups, self.config.lag_timeout)
        except BaseException as exc:  # noqa: BLE001 - the whole batch failed: every member hears why
            for job in cohort.jobs:
                if job.link.error is None:
                    # One copy per member: each is re-raised in its own thread.
                    job.link.error = copy.copy(exc) if len(cohort.jobs) > 1 else exc
        finally:
            for job in cohort.jobs:
                job.cohort_size = len(cohort.jobs)
                job.done.set()


def _stack(jobs: list[StepJob]) -> tuple[torch.Tensor, torch.Tensor]:
    """The members' batches as one, each padded at the end to the longest sequence."""
    if len(jobs) == 1:
        return jobs[0].hidden, jobs[0].mask
    length = max(j.hidden.shape[1] for j in jobs)
    pad = torch.nn.functional.pad
    hidden = torch.cat([pad(j.hidden, (0, 0, 0, length - j.hidden.shape[1])) for j in jobs])
    mask = torch.cat([pad(j.mask, (0, length - j.mask.shape[1])) for j in jobs])
    return hidden, mask


def run_cohort(served: ServedModel, jobs: list[StepJob], groups: dict[str, tuple[str, ...]],
               lag_timeout: float | None = None) -> None:
    """One step for every member: joint forward with the members' adapters, each
    member's final hidden states out, their gradients in, one joint backward."""
    t0 = time.perf_counter()
    train, cut = jobs[0].train, jobs[0].cut
    if train and cut:
        for job in jobs:  # each member's dL/d(hidden) goes back to its edge's blocks
            job.hidden.requires_grad_(True)
    hidden, mask = _stack(jobs)
    runner = StepRunner([j.link for j in jobs], train, groups,
                        [j.hidden.shape[0] for j in jobs], [j.hidden.shape[1] for j in jobs], lag_timeout)
    final: torch.Tensor | None = None
    try:
        final = served.run(runner, hidden, mask, cut=cut)
        for i, job in enumerate(jobs):
            part = runner.part(i, final)
            runner.guard(i, lambda job=job, part=part: job.link.send(final_message(part, job.link.wire)))
        if train:
            parts = [runner.part(i, final) for i in range(len(jobs))]
            grads = runner.collect(list(range(len(jobs))), lambda i: jobs[i].link.final_grad(parts[i]))
            runner.raise_if_all_failed()
            if final.requires_grad:
                final.backward(runner.joint(grads, final, final.shape[-1]))
            if cut:
                for i, job in enumerate(jobs):
                    runner.guard(i, lambda job=job: job.link.send(_cut_grad(job.hidden, job.link.wire)))
        runner.raise_if_all_failed()
    finally:
        runner.release()
        final = None  # an aborted step's graph goes with it
    # Cloud time is the step minus the time spent waiting on edges, shared by tokens.
    cloud = time.perf_counter() - t0 - sum(j.link.wait_seconds for j in jobs)
    total = sum(j.tokens for j in jobs)
    for job in jobs:
        job.cloud_seconds = max(cloud, 0.0) * job.tokens / total


def final_message(hidden: torch.Tensor, wire: WireFormat) -> pb.CloudMessage:
    msg = pb.CloudMessage()
    wire.put_act(msg.final_hidden.hidden, hidden)  # in place: no copy per nesting level
    return msg


def _cut_grad(hidden: torch.Tensor, wire: WireFormat) -> pb.CloudMessage:
    msg = pb.CloudMessage()
    # No gradient reached these rows only if the edge failed mid-step; it then gets nothing anyway.
    grad = hidden.grad if hidden.grad is not None else torch.zeros_like(hidden)
    wire.put_grad(msg.cut_grad.grad, grad)
    return msg
