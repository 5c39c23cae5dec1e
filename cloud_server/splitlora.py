"""SplitLoRA on the cloud: sessions join a federation, steps train its server-side adapters, FedAvg rounds.

The edge runs blocks [0, cut) with its own adapters; the cloud runs the rest
with the federation's adapters (federation.py), so a step exchanges no sites:
the edge sends the cut activations, the cloud answers with the last hidden
state and, after the edge's loss, the gradient at the cut.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from cloud_server.batching import final_message
from cloud_server.edge_link import EdgeLink
from cloud_server.edge_stream import EdgeStream
from cloud_server.errors import StepTimeout, WrongMode
from cloud_server.federation import Federation, Federations, FederationSettings
from cloud_server.inputs import MAX_PARKED_RANK, InputDecoder
from cloud_server.limits import ServerLimits
from cloud_server.served_model import ServedModel
from cloud_server.session import Session
from cloud_server.step_runner import StepRunner
from cloud_server.step_scope import StepKind, micro_batch, step_scope
from cloud_server.throughput import Throughput
from common import lora_wire
from common.site_types import SiteSpec
from common.tensor_codec import WireError
from common.wire import dlora_pb2 as pb


def federation_of(session: Session) -> Federation:
    """The session's federation; a DLoRA session has none."""
    if session.federation is None:
        raise WrongMode("this is a DLoRA session; aggregation and server-side adapters belong to SplitLoRA")
    return session.federation


class SplitLoRA:
    """The server's SplitLoRA federations, and what their sessions ask of them."""

    def __init__(self, served: ServedModel, federations: Federations, inputs: InputDecoder, limits: ServerLimits,
                 groups: dict[str, tuple[str, ...]], throughput: Throughput) -> None:
        self.served = served
        self.federations = federations
        self.inputs = inputs
        self.limits = limits
        self.groups = groups          # linear name -> the names sharing its input (StepRunner)
        self.throughput = throughput

    # -- opening a session -----------------------------------------------------------
    def session_sites(self, split: pb.SplitConfig, targets: list[str], sites: list[SiteSpec],
                      resume: bool) -> tuple[list[SiteSpec], Callable[[Session], None]]:
        """The client-side sites, and a hook that joins the session to its federation."""
        layers = self.served.meta.num_layers
        if not 0 < split.cut_layer < layers:
            raise WireError(f"cut layer must be in 1..{layers - 1} for this {layers}-block model, "
                            f"got {split.cut_layer}")
        if not 1 <= split.clients <= self.limits.max_sessions:
            raise WireError(f"SplitLoRA clients must be in 1..{self.limits.max_sessions} (this server's session limit)")
        if split.rank < 1 or not 0 < split.alpha < 1e6 or not 0 < split.lr < 1:
            raise WireError("SplitLoRA needs rank >= 1, 0 < alpha < 1e6 and 0 < lr < 1")
        if len(split.federation) > 64:
            raise WireError("a federation name has at most 64 characters")
        if split.rank > MAX_PARKED_RANK:
            raise WireError(f"server-side rank {split.rank} exceeds this server's maximum of {MAX_PARKED_RANK}")
        # Built (and checked against the probe) now, so a cut this family cannot serve fails at open.
        self.served.view(split.cut_layer)
        name = split.federation or "default"
        settings = FederationSettings(split.cut_layer, split.clients, split.rank, split.alpha, split.lr, split.seed,
                                 tuple(sorted(targets)))
        server_sites = [s for s in sites if s.layer >= split.cut_layer]

        def prepare(session: Session) -> None:
            fed = self.federations.join(session.owner, name, session.client_key, session.id, settings,
                                        lambda store: Federation(name, settings, server_sites, self.served.device,
                                                                 self.served.dtype, store),
                                        resume)
            session.cut_layer, session.federation = split.cut_layer, fed
            session.on_close.append(lambda by_edge: self.federations.leave(session.owner, name, session.client_key,
                                                                           session.id, by_edge))

        return [s for s in sites if s.layer < split.cut_layer], prepare

    # -- steps ---------------------------------------------------------------------
    def run_step(self, stream: EdgeStream, session: Session, start: pb.StepStart, train: bool) -> None:
        """Blocks [cut, L) with the federation's trainable adapters, then dL/d(cut) back to the edge."""
        fed = federation_of(session)
        if micro_batch(start)[1] > 1:
            raise WrongMode("SplitLoRA steps are not pipelined (the federation's server-side update is one per "
                            "step); send each step as one call")
        hidden, mask = self.inputs.step_start(session, start)
        kind = StepKind.TRAIN if train else StepKind.FORWARD
        with step_scope(stream, session, start.step_id, kind, self.throughput) as scope, self._held(fed):
            # A replayed step already applied (and stepped past by others) gets the answer it had.
            answered: torch.Tensor | None = None
            if train:
                answered = fed.begin_step(session.client_key, start.step_id)
            else:
                fed.settle()   # a forward sees every step before it
            fresh = train and answered is None
            # Every site after the cut is served here, by the federation's adapters: no site exchange.
            link = EdgeLink(fed.server_sites, stream.receive, stream.send, session.wire,
                            applied_here=fed.applied)
            runner = StepRunner([link], fresh, self.groups)
            final: torch.Tensor | None = None
            try:
                if fresh:
                    hidden.requires_grad_(True)
                final = self.served.run(runner, hidden, mask, cut=session.cut_layer)
                stream.send(final_message(final, session.wire))
                if train:
                    grad = link.final_grad(final)
                    if fresh:
                        final.backward(grad)
                        answered = hidden.grad
            except BaseException:
                if train:
                    fed.abort_step()
                raise
            finally:
                runner.release()
                link.error = None  # the error holds frames that hold the graph: drop the back-reference
                final = None
            if train:
                if answered is None:
                    raise RuntimeError("a SplitLoRA training step ended without the gradient at its cut")
                if fresh:
                    # Its update applies when the federation's next step begins; saved before the edge hears of it.
                    fed.end_step(session.client_key, start.step_id, answered)
                reply = pb.CloudMessage()
                session.wire.put_grad(reply.cut_grad.grad, answered)
                stream.send(reply)
            scope.tokens, scope.waited = int(mask.sum()), link.wait_seconds

    @contextmanager
    def _held(self, fed: Federation) -> Iterator[None]:
        """One server-side step at a time per federation, waiting at most a step deadline."""
        try:
            with fed.hold(self.limits.step_timeout):
                yield
        except TimeoutError as exc:
            raise StepTimeout(str(exc)) from None

    # -- FedAvg and the server-side adapters ----------------------------------------------
    def aggregate(self, session: Session, request: pb.AggregateRequest) -> pb.AggregateReply:
        """Submit the session's client-side adapters for a round; the round's average once every client sent."""
        fed = federation_of(session)
        adapters = self.inputs.client_adapters(session, request)
        session.last_used = time.monotonic()
        avg, n = fed.aggregate(session.client_key, request.round, request.examples, adapters,
                               self.limits.step_timeout)
        return pb.AggregateReply(round=request.round, clients=n, adapters=lora_wire.weights(avg))

    @staticmethod
    def server_adapters(session: Session) -> pb.ServerAdaptersReply:
        """The federation's server-side adapters, every update applied."""
        fed = federation_of(session)
        s = fed.settings
        return pb.ServerAdaptersReply(adapters=lora_wire.weights(fed.snapshot()), scale=s.alpha / s.rank,
                                      updates=fed.updates)

