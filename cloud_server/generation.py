"""Generation on the cloud: passes over one KV cache, the prompt first, then one position per token the edge picks."""
from __future__ import annotations

import logging
import time

import torch

from cloud_server.batching import final_message
from cloud_server.edge_link import EdgeLink
from cloud_server.edge_stream import EdgeStream
from cloud_server.errors import StepAborted, WrongMode
from cloud_server.inputs import InputDecoder
from cloud_server.served_model import ServedModel
from cloud_server.session import Session
from cloud_server.step_runner import StepRunner
from cloud_server.step_scope import StepKind, micro_batch, step_scope
from cloud_server.throughput import Throughput
from common.tensor_codec import WireError

log = logging.getLogger(__name__)


class Generation:
    """Serves Generate calls: every block on the cloud, the edge's adapters live, sampling on the edge."""

    def __init__(self, served: ServedModel, inputs: InputDecoder, groups: dict[str, tuple[str, ...]],
                 throughput: Throughput) -> None:
        self.served = served
        self.inputs = inputs
        self.groups = groups          # linear name -> the names sharing its input (StepRunner)
        self.throughput = throughput

    def run(self, stream: EdgeStream) -> None:
        """Generation passes over one KV cache, until the edge half-closes the stream."""
        session, start = stream.start()
        if session.federation is not None:
            raise WrongMode("generation runs in DLoRA mode: export the run's adapters (client and server side "
                            "together) and generate with them in a DLoRA session")
        if session.edge_layers:
            raise WrongMode(f"generation runs every block on the cloud; this session keeps blocks "
                            f"0..{session.edge_layers - 1} on the edge (edge_layers {session.edge_layers}): open one "
                            "without")
        if micro_batch(start)[1] > 1:
            raise WireError("generation is not pipelined: send the prompt as one call")
        hidden, mask = self.inputs.step_start(session, start)
        with step_scope(stream, session, start.step_id, StepKind.GENERATION, self.throughput) as scope:
            mask, passes, scope.waited = self._passes(stream, session, hidden, mask)
            scope.tokens = int(mask.sum())   # the prompt and every token generated after it
        log.info("session %s: generation of %d passes (a %d-position prompt, then one position per token) "
                 "in %.2f s of cloud compute", session.id[:8], passes, int(start.hidden.shape[1]),
                 scope.cloud_seconds)

    def _passes(self, stream: EdgeStream, session: Session, hidden: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, int, float]:
        """Run pass after pass; the final mask, the number of passes and the seconds spent waiting on the edge."""
        cache = self.served.new_cache()
        parked = dict(session.parked)
        wait = 0.0
        passes = 0
        try:
            while True:
                link = EdgeLink(session.sites, stream.receive, stream.send, session.wire, applied_here=parked)
                runner = StepRunner([link], False, self.groups)
                try:
                    last = self.served.extend(runner, hidden, mask, cache)
                finally:
                    runner.release()
                    link.error = None  # the error holds frames that hold the graph
                wait += link.wait_seconds
                passes += 1
                stream.send(final_message(last, session.wire))
                stream.extend_deadline()
                t_wait = time.perf_counter()
                try:
                    msg = stream.receive()
                except StepAborted:  # the edge half-closed: generation is over
                    return mask, passes, wait
                wait += time.perf_counter() - t_wait
                hidden, mask = self.inputs.next_embedding(session, msg, mask)
        finally:
            del cache
