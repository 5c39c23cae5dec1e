"""The gRPC service: one method per RPC of proto/dlora.proto, each a thin layer over the module that does the work.

Handlers raise; every exception becomes the call's status in one place
(errors.py, applied to each handler by server.py). Inputs are checked in
inputs.py, streamed calls run in edge_stream.py, SplitLoRA in splitlora.py,
generation in generation.py and DLoRA steps in batching.py.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import grpc

from cloud_server.assets import Asset, digest
from cloud_server.attestation import Attester
from cloud_server.auth import Authenticator
from cloud_server.batching import BatchingConfig, StepBatcher, StepJob
from cloud_server.edge_link import EdgeLink
from cloud_server.edge_stream import EdgeStream, InFlight
from cloud_server.errors import Draining, LaggedBehind, NotAttested, WrongMode
from cloud_server.federation import Federations
from cloud_server.generation import Generation
from cloud_server.inputs import InputDecoder
from cloud_server.limits import ServerLimits
from cloud_server.metrics import Metrics
from cloud_server.parsing import Undecodable
from cloud_server.recorder import MessageRecorder
from cloud_server.served_model import ServedModel
from cloud_server.session import Session, SessionManager
from cloud_server.splitlora import SplitLoRA
from cloud_server.step_scope import StepKind, micro_batch, step_scope
from cloud_server.throughput import Throughput
from common.site_types import SiteSpec
from common.tensor_codec import WireError
from common.wire import dlora_pb2 as pb
from common.wire import dlora_pb2_grpc as pb_grpc
from common.wire_format import WireFormat

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
SERVICE = pb.DESCRIPTOR.services_by_name["DLoRA"]
SERVICE_NAME = SERVICE.full_name  # "dlora.v1.DLoRA"
MODES = {pb.DLORA: "dlora", pb.SPLITLORA: "splitlora"}

EdgeMessages = Iterator[pb.EdgeMessage | Undecodable]


class DLoRAService(pb_grpc.DLoRAServicer):
    """The DLoRA service of one server: its model, sessions, federations and limits."""

    def __init__(self, served: ServedModel, limits: ServerLimits, auth: Authenticator | None = None,
                 modes: tuple[str, ...] = ("dlora", "splitlora"), batching: BatchingConfig | None = None,
                 recorder: MessageRecorder | None = None, state_dir: Path | None = None,
                 attester: Attester | None = None) -> None:
        self.served = served
        self.attester = attester  # None: --attestation none, and Attest is refused
        self.recorder = recorder  # writes every edge message to disk: privacy audits only
        self.modes = modes
        self.metrics = Metrics()
        self.federations = Federations(state_dir, on_round=self.metrics.rounds.inc)
        self.limits = limits
        self.auth = auth or Authenticator()
        self.sessions = SessionManager(limits.max_sessions, limits.max_sessions_per_client)
        self.metrics.watch_sessions(self.sessions)
        self.throughput = Throughput(self.metrics)
        self.batcher = StepBatcher(served, batching or BatchingConfig(), could_join=self.sessions.between_steps)
        self.inputs = InputDecoder(served, limits.max_batch_tokens)
        self.splitlora = SplitLoRA(served, self.federations, self.inputs, limits, self.batcher.groups,
                                   self.throughput)
        self.generation = Generation(served, self.inputs, self.batcher.groups, self.throughput)
        self.draining = threading.Event()
        self.inflight = InFlight()
        self.message_limit = limits.message_bytes(served.max_site_width(served.sites(sorted(served.linear_names))))

    def _caller(self, context: grpc.ServicerContext) -> str:
        if self.draining.is_set():
            raise Draining("the server is shutting down; retry against its replacement")
        return self.auth.identify(context)

    # -- attestation ---------------------------------------------------------
    def Attest(self, request: pb.AttestRequest, context: grpc.ServicerContext) -> pb.AttestReply:
        # No identity check: the evidence is public, and an attesting edge sends no token before it checks out.
        if self.attester is None:
            raise NotAttested("this cloud_server runs without attestation (--attestation none): it has no TEE "
                              "evidence to give; drop --attestation-policy to use it anyway")
        if self.draining.is_set():
            raise Draining("the server is shutting down; retry against its replacement")
        return self.attester.attest(request.nonce)

    # -- sessions ------------------------------------------------------------
    def OpenSession(self, request: pb.OpenSessionRequest, context: grpc.ServicerContext) -> pb.OpenSessionReply:
        owner = self._caller(context)
        wire = WireFormat.from_message(request)
        mode = MODES.get(request.mode)
        if mode is None:
            raise WireError(f"unknown session mode {request.mode}")
        if mode not in self.modes:
            raise WrongMode(f"this server runs {' and '.join(self.modes)} sessions, not {mode}")
        targets = list(request.target_modules) or self.served.default_targets
        sites = self.served.sites(targets)
        prepare = None
        if mode == "splitlora":
            if request.edge_layers:
                raise WireError("edge_layers is a DLoRA option; a SplitLoRA session sets split.cut_layer")
            sites, prepare = self.splitlora.session_sites(request.split, targets, sites, request.resume)
        elif request.edge_layers:
            prepare = self._edge_layers(request.edge_layers)
        if len(request.client_key) > 64:
            raise WireError("a client key has at most 64 characters")
        session = self.sessions.open(owner, request.client_name[:64], sites, wire, prepare,
                                     client_key=request.client_key)
        try:
            return self._open_reply(session, sites, wire)
        except Exception:
            # Never leave a session nobody knows about.
            self.sessions.close(session.id, owner, reason="closed: its reply failed", by_edge=False)
            raise

    def _open_reply(self, session: Session, sites: list[SiteSpec], wire: WireFormat) -> pb.OpenSessionReply:
        meta = self.served.meta
        reply = pb.OpenSessionReply(
            session_id=session.id,
            model=pb.ModelInfo(name=meta.name, model_type=meta.model_type, num_layers=meta.num_layers,
                               hidden_size=meta.hidden_size, vocab_size=meta.vocab_size,
                               assets_sha256=digest(self._assets(session))),
            sites=[pb.Site(index=s.index, layer=s.layer, modules=[
                pb.ModuleInfo(name=m.name, in_features=m.in_features, out_features=m.out_features)
                for m in s.modules]) for s in sites],
            limits=pb.Limits(max_message_bytes=self.message_limit,
                             max_batch_tokens=self.limits.max_batch_tokens,
                             max_sessions=self.limits.max_sessions),
            device=str(self.served.device),
            edge_layers=session.edge_layers,
        )
        wire.fill_reply(reply)
        return reply

    def _edge_layers(self, layers: int) -> Callable[[Session], None]:
        """DLoRA with blocks [0, layers) on the edge: the session's steps start at block `layers`."""
        total = self.served.meta.num_layers
        if not 0 < layers < total:
            raise WireError(f"edge_layers must be in 0..{total - 1} for this {total}-block model, got {layers}")
        # Built (and checked against the probe) now, so a split this family cannot serve fails at open.
        self.served.view(layers)

        def prepare(session: Session) -> None:
            session.edge_layers = layers

        return prepare

    def _assets(self, session: Session) -> list[Asset]:
        if not session.blocks_on_edge:
            return self.served.assets
        return self.served.assets + [self.served.block_asset(session.blocks_on_edge)]

    def CloseSession(self, request: pb.CloseSessionRequest, context: grpc.ServicerContext) -> pb.CloseSessionReply:
        # Identified even while draining: closing must still work then.
        session = self.sessions.close(request.session_id, self.auth.identify(context))
        return pb.CloseSessionReply(steps=session.steps, forwards=session.forwards)

    def GetEdgeAssets(self, request: pb.EdgeAssetsRequest, context: grpc.ServicerContext) -> Iterator[pb.AssetChunk]:
        session = self.sessions.get(request.session_id, self._caller(context))
        assets = self._assets(session)
        return _chunks(assets)

    # -- parking (Kill and Revive) -------------------------------------------------
    def ParkAdapters(self, request: pb.ParkRequest, context: grpc.ServicerContext) -> pb.ParkReply:
        session = self.sessions.get(request.session_id, self._caller(context))
        if session.federation is not None:
            raise WrongMode("parking adapters (Kill and Revive) is a DLoRA-mode feature; this is a SplitLoRA session")
        park, unpark = self.inputs.park_request(session, request)
        with session.exclusive():
            # Set semantics, so a retried request (reply lost) is harmless.
            for name in unpark:
                session.parked.pop(name, None)
            session.parked.update(park)
            session.last_used = time.monotonic()
        total = len(session.module_names)
        if park or unpark:
            log.info("session %s: parked %d, unparked %d -> %d/%d modules live at %d/%d sites",
                     session.id[:8], len(park), len(unpark), total - len(session.parked), total,
                     session.live_sites(), len(session.sites))
        return pb.ParkReply(parked=len(session.parked), live=total - len(session.parked),
                            live_sites=session.live_sites())

    # -- SplitLoRA aggregation ------------------------------------------------
    def Aggregate(self, request: pb.AggregateRequest, context: grpc.ServicerContext) -> pb.AggregateReply:
        return self.splitlora.aggregate(self.sessions.get(request.session_id, self._caller(context)), request)

    def GetServerAdapters(self, request: pb.ServerAdaptersRequest,
                          context: grpc.ServicerContext) -> pb.ServerAdaptersReply:
        return self.splitlora.server_adapters(self.sessions.get(request.session_id, self._caller(context)))

    # -- steps ---------------------------------------------------------------
    def TrainStep(self, request_iterator: EdgeMessages, context: grpc.ServicerContext) -> Iterator[pb.CloudMessage]:
        return self._serve_stream(request_iterator, context, partial(self._run_step, train=True))

    def Forward(self, request_iterator: EdgeMessages, context: grpc.ServicerContext) -> Iterator[pb.CloudMessage]:
        return self._serve_stream(request_iterator, context, partial(self._run_step, train=False))

    def Generate(self, request_iterator: EdgeMessages, context: grpc.ServicerContext) -> Iterator[pb.CloudMessage]:
        return self._serve_stream(request_iterator, context, self.generation.run)

    def _serve_stream(self, requests: EdgeMessages, context: grpc.ServicerContext,
                      body: Callable[[EdgeStream], None]) -> Iterator[pb.CloudMessage]:
        """Run `body(stream)` against the edge's stream, counted in flight (a drain waits for it)."""
        stream = EdgeStream(requests, context, self._caller(context), self.sessions, self.limits.step_timeout)
        with self.inflight:
            yield from stream.serve(body)

    def _run_step(self, stream: EdgeStream, train: bool) -> None:
        """A training step or a forward: DLoRA's batched with other sessions', SplitLoRA's with its federation."""
        session, start = stream.start()
        if session.federation is not None:
            self.splitlora.run_step(stream, session, start, train)
            return
        hidden, mask = self.inputs.step_start(session, start)
        kind = StepKind.TRAIN if train else StepKind.FORWARD
        part = micro_batch(start)
        with step_scope(stream, session, start.step_id, kind, self.throughput, part) as scope:
            link = EdgeLink(session.sites, stream.receive, stream.send, session.wire,
                            applied_here=dict(session.parked),
                            credit=stream.credit)
            # Alone, or batched with other sessions' steps that arrive together; an edge
            # that once lagged behind its batch runs alone from then on, and a pipelined step's
            # parts run alone, so that one computes while another's exchange is on the wire.
            job = StepJob(link, hidden, mask, train, solo=session.solo or part[1] > 1, cut=session.edge_layers)
            try:
                self.batcher.run(job)
            except LaggedBehind:
                session.solo = True
                raise
            scope.tokens, scope.cloud_seconds, scope.batch_sessions = int(mask.sum()), job.cloud_seconds, \
                job.cohort_size

    # -- lifecycle -----------------------------------------------------------
    def reap_forever(self, stop: threading.Event, report_every: float = 60.0) -> None:
        """Free sessions idle longer than the limit, and log throughput, until `stop` is set."""
        interval = min(max(self.limits.idle_timeout / 4, 0.5), 30.0, report_every)
        last_report = time.monotonic()
        while not stop.wait(interval):
            self.sessions.reap_idle(self.limits.idle_timeout)
            if time.monotonic() - last_report >= report_every:
                self.throughput.report(time.monotonic() - last_report, len(self.sessions))
                last_report = time.monotonic()

    def drain(self, grace: float) -> bool:
        """Refuse new work and wait up to `grace` seconds for in-flight steps. True if all finished."""
        self.draining.set()
        return self.inflight.wait_idle(grace)


def _chunks(assets: list[Asset]) -> Iterator[pb.AssetChunk]:
    """The assets in chunks of at most 1 MiB, each with its file's size and digest."""
    for asset in assets:
        size = len(asset.data)
        for off in range(0, max(size, 1), _CHUNK):
            yield pb.AssetChunk(path=asset.name, size=size, sha256=asset.sha256, offset=off,
                                data=asset.data[off:off + _CHUNK])
