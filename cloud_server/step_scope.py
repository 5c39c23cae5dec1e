"""One step's life on the cloud, for DLoRA, SplitLoRA and generation alike: the session's step, its accounting,
and the StepEnd that tells the edge it is over."""
from __future__ import annotations

import enum
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.tensor_codec import WireError
from common.wire import dlora_pb2 as pb
from common.wire_format import MAX_MICRO_BATCHES

if TYPE_CHECKING:
    from cloud_server.edge_stream import EdgeStream
    from cloud_server.session import Session
    from cloud_server.throughput import Throughput


class StepKind(enum.Enum):
    """What a step call does; the value is its counter in the throughput report."""

    TRAIN = "steps"
    FORWARD = "forwards"
    GENERATION = "generations"

    @property
    def train(self) -> bool:
        return self is StepKind.TRAIN


def micro_batch(start: pb.StepStart) -> tuple[int, int]:
    """(part, parts) of a step's call: (0, 1) unless the edge pipelines the step."""
    parts, part = start.micro_batches or 1, start.micro_batch
    if not 1 <= parts <= MAX_MICRO_BATCHES or not 0 <= part < parts:
        raise WireError(f"micro-batch {part} of {start.micro_batches}: a step is cut into 1 to "
                        f"{MAX_MICRO_BATCHES} micro-batches, each numbered from 0")
    return part, parts


@dataclass
class StepScope:
    """What the body of `step_scope` tells it about the step it ran."""

    tokens: int = 0                       # real positions the step computed
    waited: float = 0.0                   # seconds spent waiting on the edge: not cloud compute
    cloud_seconds: float | None = None    # a batched step's share of its cohort's time; else measured
    batch_sessions: int = 0               # sessions whose steps shared this one's batch; 0: not batchable


@contextmanager
def step_scope(stream: EdgeStream, session: Session, step_id: int, kind: StepKind,
               throughput: Throughput, part: tuple[int, int] = (0, 1)) -> Iterator[StepScope]:
    """Run the body as the session's one step (session.step), then count it and send StepEnd.

    Cloud seconds are the step's wall time less the time spent waiting on the edge, unless the
    body set them (a joint batch shares its time by tokens). StepEnd goes once the session is free
    again, so the edge's next call never finds it busy; a step that raised sends none. A pipelined
    step's `part` (index, parts) is one call of several: each counts its tokens, the first the step.
    """
    scope = StepScope()
    t0 = time.perf_counter()
    with session.step(step_id, kind.train, *part):
        yield scope
        wall = time.perf_counter() - t0
        if scope.cloud_seconds is None:
            scope.cloud_seconds = max(wall - scope.waited, 0.0)
        session.tokens += scope.tokens
        session.cloud_seconds += scope.cloud_seconds
        throughput.step(kind.value, kind.name.lower(), wall, scope.cloud_seconds, scope.tokens, scope.batch_sessions,
                        counted=part[0] == 0)
    stream.send(pb.CloudMessage(end=pb.StepEnd(step_id=step_id, cloud_seconds=scope.cloud_seconds,
                                               batch_sessions=scope.batch_sessions or 1)))
