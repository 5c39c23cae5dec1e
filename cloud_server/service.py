"""The gRPC service: sessions, edge assets, parking and the streamed remote steps."""
from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import torch
from google.protobuf import message_factory
from google.protobuf.message import Message

from common import tensor_codec as codec
from common.lora import LoRAAdapter
from common.settings import setting
from common.tensor_codec import WireError, clip
from common.wire import dlora_pb2 as pb
from common.wire_format import WireFormat
from common.wire import dlora_pb2_grpc as pb_grpc
from cloud_server import assets as edge_assets
from cloud_server.auth import Authenticator, Unauthenticated
from cloud_server.federation import Federation, FederationClosed, FederationMismatch, Federations, SplitSettings
from cloud_server.federation_state import StateError
from cloud_server.recorder import MessageRecorder
from cloud_server.served_model import ServedModel
from cloud_server.session import (Session, SessionBusy, SessionManager, SessionNotFound,
                                  StepOutOfOrder, TooManySessions)
from cloud_server.batching import BatchingConfig, StepBatcher, StepJob, final_message
from cloud_server.step_runner import EdgeLink, StepAbandoned, StepAborted, StepRunner

log = logging.getLogger(__name__)

_DONE = object()
_EOF = object()
_CHUNK = 1 << 20
MAX_PARKED_RANK = 256
FIRST_MESSAGE_SECONDS = 10.0
GENERATION_TOKEN_SECONDS = 60.0   # the edge picks a token in milliseconds; an idle stream is abandoned
CLOSE_GRACE_SECONDS = 5.0        # how long a finished step waits for the edge to close its side of the stream
MAX_GRPC_MESSAGE = (1 << 31) - 1  # gRPC's size options are int32
SERVICE = pb.DESCRIPTOR.services_by_name["DLoRA"]
SERVICE_NAME = SERVICE.full_name  # "dlora.v1.DLoRA"


class LimitExceeded(Exception):
    pass


class StepTimeout(Exception):
    pass


class LaggedBehind(StepTimeout):
    """An edge answered too slowly for the joint batch it was in."""


class Draining(Exception):
    pass


class WrongMode(Exception):
    """The call does not fit the session's mode (or the server's)."""


MODES = {pb.DLORA: "dlora", pb.SPLITLORA: "splitlora"}


@dataclass
class ServerLimits:
    max_sessions: int = setting(8, "most edge sessions open at once")
    max_sessions_per_client: int = setting(0, "most sessions one client identity (its token or certificate) may "
                                              "hold, so one client cannot take every slot; 0: no limit besides "
                                              "--max-sessions")
    max_batch_tokens: int = setting(16384, "largest batch x sequence length one step may carry")
    max_message_mb: float = setting(0.0, "largest gRPC message in MiB; 0 derives it from --max-batch-tokens so "
                                         "the largest site tensor fits")
    idle_timeout: float = setting(600.0, "seconds without a call before a session is freed")
    step_timeout: float = setting(300.0, "seconds one step may spend waiting on its edge (from its forward to the "
                                         "end of its backward); the cloud's own compute is not interrupted")

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.max_batch_tokens < 1:
            raise ValueError("--max-sessions and --max-batch-tokens must be positive")
        if self.max_sessions_per_client < 0 or self.max_message_mb < 0:
            raise ValueError("--max-sessions-per-client and --max-message-mb must not be negative (0: automatic)")
        if min(self.idle_timeout, self.step_timeout) <= 0:
            raise ValueError("--idle-timeout and --step-timeout must be positive")


class Throughput:
    """Work done since the last report, for the server's periodic log line."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {"steps": 0, "forwards": 0, "generations": 0, "tokens": 0, "cloud_seconds": 0.0,
                        "batched": 0, "cohort_members": 0, "batchable": 0}

    def add(self, **counts: float) -> None:
        with self._lock:
            for k, v in counts.items():
                self._counts[k] += v

    def take(self) -> dict[str, float]:
        with self._lock:
            counts = dict(self._counts)
            for k in self._counts:
                self._counts[k] = 0
        return counts


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status a failed call answers with."""
    mapping = [
        (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
        (SessionNotFound, grpc.StatusCode.NOT_FOUND),
        (SessionBusy, grpc.StatusCode.FAILED_PRECONDITION),
        (StepOutOfOrder, grpc.StatusCode.ALREADY_EXISTS),
        (TooManySessions, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (StepTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
        (Draining, grpc.StatusCode.UNAVAILABLE),
        (FederationClosed, grpc.StatusCode.UNAVAILABLE),
        (WrongMode, grpc.StatusCode.FAILED_PRECONDITION),
        (FederationMismatch, grpc.StatusCode.FAILED_PRECONDITION),
        (StateError, grpc.StatusCode.FAILED_PRECONDITION),
        (WireError, grpc.StatusCode.INVALID_ARGUMENT),
        (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
        (StepAborted, grpc.StatusCode.CANCELLED),
        (StepAbandoned, grpc.StatusCode.CANCELLED),
    ]
    # Clipped: messages may quote the client's input, and trailers over 16 KiB
    # reach the client as RESOURCE_EXHAUSTED instead of this status.
    for cls, code in mapping:
        if isinstance(exc, cls):
            return code, clip(str(exc))
    return grpc.StatusCode.INTERNAL, clip(f"internal error: {type(exc).__name__}: {exc}")


def _names(names: list[str], most: int = 4) -> str:
    """Client-chosen names for an error message: a few, each clipped, and how many more."""
    shown = ", ".join(repr(clip(n, 60)) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


class Undecodable:
    """Stands in for a request whose bytes do not parse as its message type.

    grpcio answers a deserializer that raises with INTERNAL and logs a
    traceback; with this sentinel the handler answers INVALID_ARGUMENT instead.
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def _lenient_parser(cls: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    """A request deserializer that never raises."""
    prefix = f"Error parsing message with type '{cls.DESCRIPTOR.full_name}': "

    def parse(data: bytes) -> Message | Undecodable:
        try:
            return cls.FromString(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or anything else hostile bytes provoke
            reason = str(exc).removeprefix(prefix) or type(exc).__name__
            return Undecodable(f"could not decode {cls.DESCRIPTOR.name} ({len(data)} bytes): {clip(reason, 100)}")

    return parse


def _refuse(context: grpc.ServicerContext, method: str, detail: str) -> None:
    log.warning("%s refused (INVALID_ARGUMENT): %s", method, detail)
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, detail)


def _single_request(behavior: Callable, method: str) -> Callable:
    """Serve a unary-request method from a request stream: exactly one decodable message.

    Registered as a stream, so a call that closes without its message gets
    INVALID_ARGUMENT here rather than grpcio's UNIMPLEMENTED.
    """
    def handle(requests: Iterator, context: grpc.ServicerContext):
        request = next(requests, None)
        if request is None:
            # (Also seen after gRPC itself refused an oversized message: that call already has its status.)
            _refuse(context, method, f"{method} needs one request message and got none")
        if isinstance(request, Undecodable):
            _refuse(context, method, str(request))
        return behavior(request, context)

    return handle


def _recorded(behavior: Callable, method: str, recorder: MessageRecorder, streams_replies: bool) -> Callable:
    """Serve `behavior`, writing each message of the call to the recorder: requests as they
    arrive, replies as they leave."""
    def handle(requests: Iterator, context: grpc.ServicerContext):
        record = recorder.call(method)

        def tee() -> Iterator:
            for msg in requests:
                if not isinstance(msg, Undecodable):
                    record.add(msg)
                yield msg

        if not streams_replies:
            reply = behavior(tee(), context)
            record.add_reply(reply)
            return reply
        return _replies_recorded(behavior(tee(), context), record)

    return handle


def _replies_recorded(replies: Iterator[Message], record) -> Iterator[Message]:
    for reply in replies:
        record.add_reply(reply)
        yield reply


def method_handlers(service: "DLoRAService") -> dict[str, grpc.RpcMethodHandler]:
    """The service's handlers, built from the proto's service descriptor like the
    generated `add_DLoRAServicer_to_server`, but with requests parsed leniently."""
    handlers = {}
    for method in SERVICE.methods:
        parse = _lenient_parser(message_factory.GetMessageClass(method.input_type))
        serialize = message_factory.GetMessageClass(method.output_type).SerializeToString
        behavior = getattr(service, method.name)
        if not method.client_streaming:
            behavior = _single_request(behavior, method.name)
        if service.recorder is not None:
            behavior = _recorded(behavior, method.name, service.recorder, method.server_streaming)
        # Every method takes a request stream (see _single_request); replies as the proto says.
        make = grpc.stream_stream_rpc_method_handler if method.server_streaming else \
            grpc.stream_unary_rpc_method_handler
        handlers[method.name] = make(behavior, request_deserializer=parse, response_serializer=serialize)
    return handlers


class DLoRAService(pb_grpc.DLoRAServicer):
    def __init__(self, served: ServedModel, limits: ServerLimits, auth: Authenticator | None = None,
                 modes: tuple[str, ...] = ("dlora", "splitlora"), batching: BatchingConfig | None = None,
                 recorder: MessageRecorder | None = None, state_dir: Path | None = None) -> None:
        self.served = served
        self.recorder = recorder  # writes every edge message to disk: privacy audits only
        self.modes = modes
        self.federations = Federations(state_dir)
        self.limits = limits
        self.auth = auth or Authenticator()
        self.sessions = SessionManager(limits.max_sessions, limits.max_sessions_per_client)
        self.throughput = Throughput()
        self.batcher = StepBatcher(served, batching or BatchingConfig(), could_join=self.sessions.between_steps)
        self.assets_digest = edge_assets.digest(served.assets)
        self.draining = threading.Event()
        self._inflight = 0
        self._inflight_lock = threading.Condition()
        all_sites = served.sites(sorted(served.linear_names))
        width = served.max_site_width(all_sites)
        # Largest tensor in one message (fp32) plus room for framing, unless the operator set it.
        derived = limits.max_batch_tokens * width * 4 + (1 << 20)
        self.message_limit = min(int(limits.max_message_mb * (1 << 20)) or derived, MAX_GRPC_MESSAGE)

    def _caller(self, context: grpc.ServicerContext) -> str:
        try:
            if self.draining.is_set():
                raise Draining("the server is shutting down; retry against its replacement")
            return self.auth.identify(context)
        except (Unauthenticated, Draining) as exc:
            context.abort(*_status(exc))
            raise  # unreachable: abort raises

    # -- sessions ------------------------------------------------------------
    def OpenSession(self, request: pb.OpenSessionRequest, context: grpc.ServicerContext) -> pb.OpenSessionReply:
        owner = self._caller(context)
        try:
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
                sites, prepare = self._split_session(request.split, targets, sites, request.resume)
            elif request.edge_layers:
                prepare = self._edge_layers(request.edge_layers)
            if len(request.client_key) > 64:
                raise WireError("a client key has at most 64 characters")
            session = self.sessions.open(owner, request.client_name[:64], sites, wire, prepare,
                                         client_key=request.client_key)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            context.abort(*_status(exc))
        try:
            return self._open_reply(session, sites, wire)
        except Exception as exc:  # noqa: BLE001 - never leave a session nobody knows about
            self.sessions.close(session.id, owner, reason="closed: its reply failed")
            context.abort(*_status(exc))
            raise

    def _open_reply(self, session: Session, sites, wire: WireFormat) -> pb.OpenSessionReply:
        meta = self.served.meta
        reply = pb.OpenSessionReply(
            session_id=session.id,
            model=pb.ModelInfo(name=meta.name, model_type=meta.model_type, num_layers=meta.num_layers,
                               hidden_size=meta.hidden_size, vocab_size=meta.vocab_size,
                               assets_sha256=edge_assets.digest(self._assets(session))),
            sites=[pb.Site(index=s.index, layer=s.layer, modules=[
                pb.ModuleInfo(name=m.name, in_features=m.in_features, out_features=m.out_features)
                for m in s.modules]) for s in sites],
            limits=pb.Limits(max_message_bytes=self.message_limit,
                             max_batch_tokens=self.limits.max_batch_tokens,
                             max_sessions=self.limits.max_sessions),
            device=str(self.served.device),
            edge_layers=session.cut if session.federation is None else 0,
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
            session.cut = layers

        return prepare

    def _split_session(self, split: pb.SplitConfig, targets: list[str], sites, resume: bool):
        """SplitLoRA: the client-side sites, and a hook that joins the session to its federation."""
        layers = self.served.meta.num_layers
        if not 0 < split.cut_layer < layers:
            raise WireError(f"cut layer must be in 1..{layers - 1} for this {layers}-block model, got {split.cut_layer}")
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
        settings = SplitSettings(split.cut_layer, split.clients, split.rank, split.alpha, split.lr, split.seed,
                                 tuple(sorted(targets)))

        def prepare(session: Session) -> None:
            fed = self.federations.join(session.owner, name, session.client_key, session.id, settings,
                                        lambda store: Federation(name, settings,
                                                                 [s for s in sites if s.layer >= split.cut_layer],
                                                                 self.served.device, self.served.dtype, store),
                                        resume)
            session.cut, session.federation = split.cut_layer, fed
            session.on_close.append(lambda: self.federations.leave(session.owner, name, session.client_key,
                                                                   session.id))

        return [s for s in sites if s.layer < split.cut_layer], prepare

    def _assets(self, session: Session) -> list:
        if not session.cut:
            return self.served.assets
        return self.served.assets + [self.served.block_asset(session.cut)]

    def CloseSession(self, request: pb.CloseSessionRequest, context: grpc.ServicerContext) -> pb.CloseSessionReply:
        owner = self.auth_only(context)
        try:
            session = self.sessions.close(request.session_id, owner)
        except Exception as exc:  # noqa: BLE001
            context.abort(*_status(exc))
        return pb.CloseSessionReply(steps=session.steps, forwards=session.forwards)

    def auth_only(self, context: grpc.ServicerContext) -> str:
        """Identify the caller even while draining (closing must still work then)."""
        try:
            return self.auth.identify(context)
        except Unauthenticated as exc:
            context.abort(*_status(exc))
            raise

    def GetEdgeAssets(self, request: pb.EdgeAssetsRequest, context: grpc.ServicerContext) -> Iterator[pb.AssetChunk]:
        owner = self._caller(context)
        try:
            session = self.sessions.get(request.session_id, owner)
            assets = self._assets(session)
        except Exception as exc:  # noqa: BLE001
            context.abort(*_status(exc))
        for asset in assets:
            size = len(asset.data)
            for off in range(0, max(size, 1), _CHUNK):
                yield pb.AssetChunk(path=asset.name, size=size, sha256=asset.sha256, offset=off,
                                    data=asset.data[off:off + _CHUNK])

    # -- parking (Kill and Revive) -------------------------------------------------
    def ParkAdapters(self, request: pb.ParkRequest, context: grpc.ServicerContext) -> pb.ParkReply:
        owner = self._caller(context)
        try:
            session = self.sessions.get(request.session_id, owner)
            if session.federation is not None:
                raise WrongMode("parking adapters (Kill and Revive) is a DLoRA-mode feature; this is a SplitLoRA session")
            park = {p.name: self._decode_parked(session, p) for p in request.park}
            unpark = set(request.unpark)
            if len(park) != len(request.park) or len(unpark) != len(request.unpark):
                raise WireError("a module is named twice in one park request")
            if park.keys() & unpark:
                raise WireError(f"modules both parked and unparked: {_names(sorted(park.keys() & unpark))}")
            unknown = sorted(unpark - session.module_names)
            if unknown:
                raise WireError(f"cannot unpark {_names(unknown)}: not modules of this session")
            on_edge = sorted(n for n in park.keys() | unpark if self._layer_of(session, n) < session.cut)
            if on_edge:
                raise WireError(f"cannot park or unpark {_names(on_edge)}: they sit in blocks "
                                f"0..{session.cut - 1}, which run on the edge (edge_layers {session.cut})")
            with session.exclusive():
                # Set semantics, so a retried request (reply lost) is harmless.
                for name in unpark:
                    session.parked.pop(name, None)
                session.parked.update(park)
                session.last_used = time.monotonic()
        except Exception as exc:  # noqa: BLE001
            context.abort(*_status(exc))
        total = len(session.module_names)
        if park or unpark:
            log.info("session %s: parked %d, unparked %d -> %d/%d modules live at %d/%d sites",
                     session.id[:8], len(park), len(unpark), total - len(session.parked), total,
                     session.live_sites(), len(session.sites))
        return pb.ParkReply(parked=len(session.parked), live=total - len(session.parked),
                            live_sites=session.live_sites())

    @staticmethod
    def _layer_of(session: Session, name: str) -> int:
        return next((s.layer for s in session.sites for m in s.modules if m.name == name), -1)

    def _decode_parked(self, session: Session, p: pb.ParkedAdapter) -> LoRAAdapter:
        spec = next((m for s in session.sites for m in s.modules if m.name == p.name), None)
        if spec is None:
            raise WireError(f"cannot park {_names([p.name])}: not a module of this session")
        a_shape = tuple(p.lora_A.shape)
        max_rank = min(MAX_PARKED_RANK, spec.in_features, spec.out_features)
        if len(a_shape) != 2 or not 1 <= a_shape[0] <= max_rank:
            raise WireError(f"{p.name}: lora_A must be [r, {spec.in_features}] with 1 <= r <= "
                            f"{max_rank}, got {codec.shape_text(a_shape)}")
        r = a_shape[0]
        a = codec.decode(p.lora_A, name=f"{p.name} lora_A", shape=(r, spec.in_features), dtypes=[torch.float32])
        b = codec.decode(p.lora_B, name=f"{p.name} lora_B", shape=(spec.out_features, r), dtypes=[torch.float32])
        if not (abs(p.scale) < 1e6 and p.scale == p.scale):
            raise WireError(f"{p.name}: scale {p.scale} is not a sane finite number")
        adapter = LoRAAdapter(spec.in_features, spec.out_features, r, p.scale)
        with torch.no_grad():
            adapter.lora_A.copy_(a)
            adapter.lora_B.copy_(b)
        return adapter.requires_grad_(False).to(device=self.served.device, dtype=self.served.dtype)

    # -- steps ---------------------------------------------------------------
    def TrainStep(self, request_iterator: Iterator[pb.EdgeMessage], context: grpc.ServicerContext):
        return self._serve_stream(request_iterator, context, self._run_train_step)

    def Forward(self, request_iterator: Iterator[pb.EdgeMessage], context: grpc.ServicerContext):
        return self._serve_stream(request_iterator, context, self._run_forward)

    def Generate(self, request_iterator: Iterator[pb.EdgeMessage], context: grpc.ServicerContext):
        return self._serve_stream(request_iterator, context, self._run_generate)

    def _serve_stream(self, requests: Iterator[pb.EdgeMessage], context: grpc.ServicerContext, body):
        """Run `body(owner, receive, send, holder, extend_deadline)` against one edge stream."""
        owner = self._caller(context)
        # The model's forward calls out to the edge from deep inside the blocks,
        # so it runs in a worker thread; this generator relays its messages. A
        # pump thread reads the edge's stream so the worker can wait with a deadline.
        out: queue.Queue = queue.Queue()
        # Bounded: a client that floods the stream is held back by gRPC flow
        # control instead of filling the server's memory.
        inbox: queue.Queue = queue.Queue(maxsize=2)
        finished = threading.Event()
        request_closed = threading.Event()   # the edge closed its side of the stream (or it broke)
        gone = threading.Event()
        context.add_callback(gone.set)  # the RPC ended: cancelled by the edge, timed out, or done
        deadline = [time.monotonic() + self.limits.step_timeout]

        def extend_deadline() -> None:
            # Generation: each token gets its own (short) deadline.
            deadline[0] = time.monotonic() + min(self.limits.step_timeout, GENERATION_TOKEN_SECONDS)

        def offer(item) -> bool:
            """Put into the bounded inbox, giving up once the step is over."""
            while not finished.is_set():
                try:
                    inbox.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False

        def pump() -> None:
            try:
                for msg in requests:
                    if not offer(msg):
                        return
            except Exception:  # noqa: BLE001 - a cancelled stream ends like a closed one
                pass
            request_closed.set()
            offer(_EOF)

        first = [True]

        def receive(within: float | None = None) -> pb.EdgeMessage:
            """The edge's next message. `within`: seconds this one exchange may take
            (a joint batch drops an edge that lags the others by more)."""
            # The opening message must come quickly: idle streams must not hold handler threads.
            opening, first[0] = first[0], False
            limit = min(deadline[0], time.monotonic() + FIRST_MESSAGE_SECONDS) if opening else deadline[0]
            lag_limit = within is not None and time.monotonic() + within < limit
            if lag_limit:
                limit = time.monotonic() + within
            while True:
                try:
                    # In slices: an edge whose stream ended is noticed within a slice even
                    # if gRPC never ends the request iterator the pump reads.
                    item = inbox.get(timeout=max(min(limit - time.monotonic(), 0.5), 0.0))
                    break
                except queue.Empty:
                    if gone.is_set() and inbox.empty():
                        raise StepAborted("the edge's stream ended in the middle of a step") from None
                    if time.monotonic() < limit:
                        continue
                if lag_limit:
                    raise LaggedBehind(f"this edge took more than {within:.0f} s to answer one exchange while "
                                       "its step was batched with other edges' steps; it was dropped from the "
                                       "batch and its steps now run alone (retry the step)")
                raise StepTimeout(f"the step did not finish within the server's step deadline of "
                                  f"{self.limits.step_timeout:.0f} s (or its first message within "
                                  f"{FIRST_MESSAGE_SECONDS:.0f} s)")
            if item is _EOF:
                if opening:  # nothing started, nothing to clean up: a malformed call, not a vanished edge
                    raise WireError("the stream ended before its start message")
                raise StepAborted("the edge closed the stream in the middle of a step")
            if isinstance(item, Undecodable):
                # Raised where the step waits for the message, so its usual clean-up runs.
                raise WireError(str(item))
            if item.WhichOneof("kind") == "abandon":
                # Raised where the step waits, like a failure: the step's tensors go, the session stays.
                raise StepAbandoned(clip(f"the edge abandoned the step: {item.abandon.reason or 'no reason given'}"))
            return item

        def credit(seconds: float) -> None:
            # Time a joint batch spent waiting on *other* edges is not this edge's to pay.
            deadline[0] += seconds

        receive.credit = credit  # type: ignore[attr-defined]

        def work() -> None:
            holder: dict[str, Session] = {}
            try:
                body(owner, receive, out.put, holder, extend_deadline)
                out.put(_DONE)
            except BaseException as exc:  # noqa: BLE001 - reported to the edge as a status
                code, detail = _status(exc)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("step failed")
                elif isinstance(exc, StepAbandoned):
                    session = holder.get("session")
                    log.info("session %s: %s; its step is freed", session.id[:8] if session else "?", detail)
                else:
                    log.warning("step refused (%s): %s", code.name, detail)
                if isinstance(exc, StepAborted) and "session" in holder:
                    # The edge vanished mid-step: free what its session holds.
                    try:
                        self.sessions.close(holder["session"].id, owner, reason="closed: its edge vanished mid-step")
                    except SessionNotFound:
                        pass
                out.put(exc)

        with self._inflight_lock:
            self._inflight += 1
        try:
            threading.Thread(target=pump, name="dlora-pump", daemon=True).start()
            threading.Thread(target=work, name="dlora-step", daemon=True).start()
            while True:
                item = out.get()
                # The status goes once the edge has closed its side. gRPC resets a stream the client
                # still sends on after its trailers, and HAProxy 2.6 turns that reset into CANCELLED
                # towards the edge, at times before the last messages reach it.
                if item is _DONE:
                    request_closed.wait(CLOSE_GRACE_SECONDS)
                    return
                if isinstance(item, BaseException):
                    code, detail = _status(item)
                    # (A failed step's status does not wait: StepFailed already carries it.)
                    yield pb.CloudMessage(failed=pb.StepFailed(code=code.value[0], detail=detail))
                    context.abort(code, detail)
                yield item
        finally:
            finished.set()
            with self._inflight_lock:
                self._inflight -= 1
                self._inflight_lock.notify_all()

    def _run_train_step(self, owner: str, receive, send, holder: dict, _extend) -> None:
        self._run_step(owner, receive, send, True, holder)

    def _run_forward(self, owner: str, receive, send, holder: dict, _extend) -> None:
        self._run_step(owner, receive, send, False, holder)

    def _open_stream(self, owner: str, receive, holder: dict) -> tuple[Session, pb.StepStart]:
        first = receive()
        if first.WhichOneof("kind") != "start":
            raise WireError("a step must begin with a start message")
        session = self.sessions.get(first.start.session_id, owner)
        holder["session"] = session
        return session, first.start

    def _run_step(self, owner: str, receive, send, train: bool, holder: dict) -> None:
        session, start = self._open_stream(owner, receive, holder)
        if session.federation is not None:
            return self._run_split_step(session, start, receive, send, train)
        hidden, mask = self._decode_inputs(session, start)
        with session.step(start.step_id, train):
            link = EdgeLink(session.sites, receive, send, session.wire, parked=dict(session.parked),
                            credit=receive.credit)
            # Alone, or batched with other sessions' steps that arrive together; an edge
            # that once lagged behind its batch runs alone from then on.
            job = StepJob(link, hidden, mask, train, solo=session.solo, cut=session.cut)
            try:
                self.batcher.run(job)
            except LaggedBehind:
                session.solo = True
                raise
            session.tokens += int(mask.sum())
            session.cloud_seconds += job.cloud_seconds
            self.throughput.add(**{"steps" if train else "forwards": 1}, tokens=int(mask.sum()),
                                cloud_seconds=job.cloud_seconds, batched=int(job.cohort_size > 1),
                                cohort_members=job.cohort_size, batchable=1)
        # Sent once the session is free again, so the edge's next call never finds it busy.
        send(pb.CloudMessage(end=pb.StepEnd(step_id=start.step_id, cloud_seconds=job.cloud_seconds,
                                                batch_sessions=job.cohort_size)))

    def _run_split_step(self, session: Session, start: pb.StepStart, receive, send, train: bool) -> None:
        """SplitLoRA: blocks [cut, L) with the federation's trainable adapters, then dL/d(cut)."""
        fed: Federation = session.federation  # type: ignore[assignment]
        hidden, mask = self._decode_inputs(session, start)
        t0 = time.perf_counter()
        with session.step(start.step_id, train), self._federation_lock(fed):
            # A replayed step already applied (and stepped past by others) gets the answer it had.
            answered = fed.begin_step(session.client_key, start.step_id) if train else fed.settle()
            fresh = train and answered is None
            # Every site after the cut is served here, by the federation's adapters: no site exchange.
            link = EdgeLink(fed.server_sites, receive, send, session.wire, parked=fed.applied)
            runner = StepRunner([link], fresh, self.batcher.groups)
            try:
                if fresh:
                    hidden.requires_grad_(True)
                final = self.served.run(runner, hidden, mask, cut=session.cut)
                send(final_message(final, session.wire))
                if train:
                    msg = link.expect("final_grad")
                    grad = codec.decode(msg.final_grad.grad, name="final hidden gradient",
                                        shape=tuple(final.shape), dtypes=[session.wire.grad])
                    if fresh:
                        final.backward(grad.to(device=final.device, dtype=final.dtype))
                        answered = hidden.grad
            except BaseException:
                if train:
                    fed.abort_step()
                raise
            finally:
                runner.release()
                link.error = None  # the error holds frames that hold the graph: drop the back-reference
                final = None
            if fresh:
                # Its update applies when the federation's next step begins; saved before the edge hears of it.
                fed.end_step(session.client_key, start.step_id, answered)
            if train:
                reply = pb.CloudMessage()
                session.wire.put_grad(reply.cut_grad.grad, answered)
                send(reply)
            cloud = time.perf_counter() - t0 - link.wait_seconds
            session.tokens += int(mask.sum())
            session.cloud_seconds += cloud
            self.throughput.add(**{"steps" if train else "forwards": 1}, tokens=int(mask.sum()), cloud_seconds=cloud)
        send(pb.CloudMessage(end=pb.StepEnd(step_id=start.step_id, cloud_seconds=cloud)))

    @contextmanager
    def _federation_lock(self, fed: Federation):
        """One server-side step at a time per federation, waiting at most a step deadline."""
        try:
            with fed.hold(self.limits.step_timeout):
                yield
        except TimeoutError as exc:
            raise StepTimeout(str(exc)) from None

    # -- SplitLoRA aggregation ------------------------------------------------
    def Aggregate(self, request: pb.AggregateRequest, context: grpc.ServicerContext) -> pb.AggregateReply:
        owner = self._caller(context)
        try:
            session = self.sessions.get(request.session_id, owner)
            fed: Federation = self._federation(session)
            if request.round < 1 or not 1 <= request.examples <= 1 << 40:
                raise WireError("aggregation needs round >= 1 and 1 <= examples <= 2^40")
            own = {m.name: m for s in session.sites for m in s.modules}
            adapters = {}
            for w in request.adapters:
                spec = own.get(w.name)
                if spec is None or w.name in adapters:
                    raise WireError(f"{_names([w.name])} is not a client-side module of this session, "
                                    "or is named twice")
                r = w.lora_A.shape[0] if len(w.lora_A.shape) == 2 else 0
                if not 1 <= r <= MAX_PARKED_RANK:
                    raise WireError(f"{w.name}: lora_A must be [r, {spec.in_features}] with 1 <= r <= {MAX_PARKED_RANK}")
                adapters[w.name] = (
                    codec.decode(w.lora_A, name=f"{w.name} lora_A", shape=(r, spec.in_features), dtypes=[torch.float32]),
                    codec.decode(w.lora_B, name=f"{w.name} lora_B", shape=(spec.out_features, r), dtypes=[torch.float32]))
            if adapters.keys() != own.keys():
                raise WireError(f"aggregation needs every client-side module; missing {sorted(own.keys() - adapters.keys())[:3]}")
            session.last_used = time.monotonic()
            avg, n = fed.aggregate(session.client_key, request.round, request.examples, adapters,
                                   self.limits.step_timeout)
        except Exception as exc:  # noqa: BLE001
            context.abort(*_status(exc))
        return pb.AggregateReply(round=request.round, clients=n, adapters=_weights(avg))

    def GetServerAdapters(self, request: pb.ServerAdaptersRequest, context: grpc.ServicerContext):
        owner = self._caller(context)
        try:
            fed = self._federation(self.sessions.get(request.session_id, owner))
        except Exception as exc:  # noqa: BLE001
            context.abort(*_status(exc))
        s = fed.settings
        return pb.ServerAdaptersReply(adapters=_weights(fed.snapshot()), scale=s.alpha / s.rank, updates=fed.updates)

    @staticmethod
    def _federation(session: Session) -> Federation:
        if session.federation is None:
            raise WrongMode("this is a DLoRA session; aggregation and server-side adapters belong to SplitLoRA")
        return session.federation  # type: ignore[return-value]

    def _run_generate(self, owner: str, receive, send, holder: dict, extend_deadline) -> None:
        """Generation passes over one KV cache, until the edge half-closes the stream."""
        session, start = self._open_stream(owner, receive, holder)
        if session.federation is not None:
            raise WrongMode("generation runs in DLoRA mode: export the run's adapters (client and server side "
                            "together) and generate with them in a DLoRA session")
        if session.cut:
            raise WrongMode(f"generation runs every block on the cloud; this session keeps blocks "
                            f"0..{session.cut - 1} on the edge (edge_layers {session.cut}): open one without")
        hidden, mask = self._decode_inputs(session, start)
        t0 = time.perf_counter()
        wait = 0.0
        passes = 0
        with session.step(start.step_id, train=False):
            cache = self.served.new_cache()
            parked = dict(session.parked)
            try:
                while True:
                    link = EdgeLink(session.sites, receive, send, session.wire, parked=parked)
                    runner = StepRunner([link], False, self.batcher.groups)
                    try:
                        last = self.served.extend(runner, hidden, mask, cache)
                    finally:
                        runner.release()
                        link.error = None  # the error holds frames that hold the graph
                    wait += link.wait_seconds
                    passes += 1
                    session.tokens += int(mask[:, -hidden.shape[1]:].sum())
                    send(final_message(last, session.wire))
                    extend_deadline()
                    t_wait = time.perf_counter()
                    try:
                        msg = receive()
                    except StepAborted:  # the edge half-closed: generation is over
                        break
                    wait += time.perf_counter() - t_wait
                    hidden, mask = self._next_embedding(session, msg, mask)
            finally:
                del cache
        cloud = time.perf_counter() - t0 - wait
        session.cloud_seconds += cloud
        self.throughput.add(generations=1, tokens=int(mask.sum()), cloud_seconds=cloud)
        log.info("session %s: generation of %d passes (a %d-position prompt, then one position per token) "
                 "in %.2f s of cloud compute", session.id[:8], passes, int(start.hidden.shape[1]), cloud)
        send(pb.CloudMessage(end=pb.StepEnd(step_id=start.step_id, cloud_seconds=cloud)))

    def _next_embedding(self, session: Session, msg: pb.EdgeMessage,
                    mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if msg.WhichOneof("kind") != "next_embedding":
            raise WireError(f"expected a next_embedding message from the edge, got {msg.WhichOneof('kind') or 'nothing'}")
        batch, length = mask.shape
        if self.served.max_positions and length + 1 > self.served.max_positions:
            raise LimitExceeded(f"generation reached the model's {self.served.max_positions} positions")
        if batch * (length + 1) > self.limits.max_batch_tokens:
            raise LimitExceeded(f"batch x length = {batch * (length + 1)} exceeds this server's "
                                f"limit of {self.limits.max_batch_tokens} tokens")
        h = codec.decode(msg.next_embedding.hidden, name="next embedding",
                         shape=(batch, 1, self.served.meta.hidden_size), dtypes=[session.wire.act])
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=mask.device)], dim=1)
        return h.to(device=self.served.device, dtype=self.served.dtype), mask

    def _decode_inputs(self, session: Session, start: pb.StepStart) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.served.meta.hidden_size
        codec.require(start.hidden, "hidden states")  # named as missing, not as a shape [] mismatch
        shape = tuple(start.hidden.shape)
        if len(shape) != 3 or shape[2] != h:
            raise WireError(f"hidden states must have shape [batch, seq, {h}], got {codec.shape_text(shape)}")
        if shape[0] < 1 or shape[1] < 1:
            raise WireError(f"empty batch: hidden shape {codec.shape_text(shape)}")
        if self.served.max_positions and shape[1] > self.served.max_positions:
            raise LimitExceeded(f"sequence length {shape[1]} exceeds the model's {self.served.max_positions} positions")
        if shape[0] * shape[1] > self.limits.max_batch_tokens:
            raise LimitExceeded(f"batch x sequence = {shape[0] * shape[1]} exceeds this server's "
                                f"limit of {self.limits.max_batch_tokens} tokens per step")
        hidden = codec.decode(start.hidden, name="hidden states", shape=shape, dtypes=[session.wire.act])
        mask = codec.decode(start.attention_mask, name="attention mask", shape=shape[:2], dtypes=[torch.bool])
        if not bool(mask.any(dim=1).all()):
            raise WireError("every row of the attention mask needs at least one real position")
        dev = self.served.device
        return hidden.to(device=dev, dtype=self.served.dtype), mask.to(device=dev, dtype=torch.long)

    # -- lifecycle -----------------------------------------------------------
    def reap_forever(self, stop: threading.Event, report_every: float = 60.0) -> None:
        """Free sessions idle longer than the limit, and log throughput, until `stop` is set."""
        interval = min(max(self.limits.idle_timeout / 4, 0.5), 30.0, report_every)
        last_report = time.monotonic()
        while not stop.wait(interval):
            self.sessions.reap_idle(self.limits.idle_timeout)
            if time.monotonic() - last_report >= report_every:
                self.log_throughput(time.monotonic() - last_report)
                last_report = time.monotonic()

    def log_throughput(self, seconds: float) -> None:
        c = self.throughput.take()
        if not (c["steps"] or c["forwards"] or c["generations"]):
            return  # an idle server stays quiet
        batched = ""
        if c["batched"]:
            # cohort_members counts, per step, how many sessions shared its batch.
            batched = (f"; {c['batched']:.0f} steps batched with other sessions' "
                       f"(mean {c['cohort_members'] / max(c['batchable'], 1):.1f} sessions per batch)")
        log.info("last %.0f s: %d training steps, %d forwards, %d generations, %d tokens (%.0f tokens/s), "
                 "cloud compute %.1f s (%.0f%% busy)%s; %d sessions open",
                 seconds, c["steps"], c["forwards"], c["generations"], c["tokens"], c["tokens"] / seconds,
                 c["cloud_seconds"], 100 * c["cloud_seconds"] / seconds, batched, len(self.sessions))

    def drain(self, grace: float) -> bool:
        """Refuse new work and wait up to `grace` seconds for in-flight steps. True if all finished."""
        self.draining.set()
        end = time.monotonic() + grace
        with self._inflight_lock:
            while self._inflight and time.monotonic() < end:
                self._inflight_lock.wait(timeout=end - time.monotonic())
            return self._inflight == 0


def _weights(adapters: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[pb.LoRAWeights]:
    return [pb.LoRAWeights(name=n, lora_A=codec.encode(a, torch.float32), lora_B=codec.encode(b, torch.float32))
            for n, (a, b) in adapters.items()]


@dataclass
class TLSFiles:
    cert: bytes
    key: bytes
    client_ca: bytes | None = None    # set: clients must present a certificate signed by it


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    service: DLoRAService
    health: object
    stop_reaper: threading.Event = field(default_factory=threading.Event)

    def shutdown(self, grace: float) -> None:
        from grpc_health.v1 import health_pb2

        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        finished = self.service.drain(grace)
        self.service.federations.cancel_all()
        log.info("in-flight steps %s", "finished" if finished else f"aborted after {grace:.0f} s")
        self.stop_reaper.set()
        self.server.stop(grace=1.0).wait()
        self.service.sessions.close_all("closed: server shut down")


def make_server(service: DLoRAService, host: str, port: int, tls: TLSFiles | None = None,
                workers: int | None = None, stats_every: float = 60.0) -> RunningServer:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    size = service.message_limit
    opts = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]
    # Each in-flight step holds one handler thread (plus its worker and pump threads).
    workers = workers or max(16, 2 * service.limits.max_sessions + 8)
    # Beyond the pool, calls are refused (RESOURCE_EXHAUSTED) rather than queued without bound.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dlora-rpc"),
                         options=opts, maximum_concurrent_rpcs=workers)
    # Not pb_grpc.add_DLoRAServicer_to_server: its deserializers raise on bad bytes (INTERNAL and a traceback).
    handlers = method_handlers(service)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        creds = grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.client_ca,
                                            require_client_auth=tls.client_ca is not None)
        bound = server.add_secure_port(address, creds)
    if bound == 0:
        raise OSError(f"could not bind {address}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(server, bound, service, health_servicer)
    threading.Thread(target=service.reap_forever, args=(running.stop_reaper, stats_every), name="dlora-reaper",
                     daemon=True).start()
    return running
