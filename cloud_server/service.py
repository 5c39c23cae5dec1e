"""The gRPC service: sessions, edge assets and the streamed remote steps."""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import torch

from common import tensor_codec as codec
from common.lora import LoRAAdapter
from common.tensor_codec import WireError
from common.wire import dlora_pb2 as pb
from common.wire import dlora_pb2_grpc as pb_grpc
from cloud_server import assets as edge_assets
from cloud_server.served_model import ServedModel
from cloud_server.session import (Session, SessionBusy, SessionManager, SessionNotFound,
                                  StepOutOfOrder, TooManySessions)
from cloud_server.step_runner import StepAborted, StepRunner

log = logging.getLogger(__name__)

_DONE = object()
_CHUNK = 1 << 20
_WIRE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_PARKED_RANK = 1024


class LimitExceeded(Exception):
    pass


@dataclass
class ServerLimits:
    max_sessions: int = 8
    max_batch_tokens: int = 16384
    max_message_bytes: int = 0  # 0: derived from the model so the largest site tensor fits


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status a failed call answers with."""
    mapping = [
        (SessionNotFound, grpc.StatusCode.NOT_FOUND),
        (SessionBusy, grpc.StatusCode.FAILED_PRECONDITION),
        (StepOutOfOrder, grpc.StatusCode.ALREADY_EXISTS),
        (TooManySessions, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (WireError, grpc.StatusCode.INVALID_ARGUMENT),
        (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
        (StepAborted, grpc.StatusCode.CANCELLED),
    ]
    for cls, code in mapping:
        if isinstance(exc, cls):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


class DLoRAService(pb_grpc.DLoRAServicer):
    def __init__(self, served: ServedModel, limits: ServerLimits) -> None:
        self.served = served
        self.limits = limits
        self.sessions = SessionManager(limits.max_sessions)
        self.assets_digest = edge_assets.digest(served.assets)
        all_sites = served.sites(sorted(served.linear_names))
        width = served.max_site_width(all_sites)
        if not limits.max_message_bytes:
            # Largest tensor in one message (fp32) plus room for framing.
            limits.max_message_bytes = limits.max_batch_tokens * width * 4 + (1 << 20)

    # -- sessions ------------------------------------------------------------
    def OpenSession(self, request: pb.OpenSessionRequest, context: grpc.ServicerContext) -> pb.OpenSessionReply:
        try:
            wire = codec.torch_dtype(request.wire_dtype or pb.FLOAT32)
            if wire not in _WIRE_DTYPES:
                raise WireError(f"wire dtype {codec.dtype_name(wire)} is not supported; use fp32, fp16 or bf16")
            targets = list(request.target_modules) or self.served.default_targets
            sites = self.served.sites(targets)
            session = self.sessions.open(request.client_name, sites, wire)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            context.abort(*_status(exc))
        meta = self.served.meta
        return pb.OpenSessionReply(
            session_id=session.id,
            model=pb.ModelInfo(name=meta.name, model_type=meta.model_type, num_layers=meta.num_layers,
                               hidden_size=meta.hidden_size, vocab_size=meta.vocab_size,
                               assets_sha256=self.assets_digest),
            sites=[pb.Site(index=s.index, layer=s.layer, modules=[
                pb.ModuleInfo(name=m.name, in_features=m.in_features, out_features=m.out_features)
                for m in s.modules]) for s in sites],
            limits=pb.Limits(max_message_bytes=self.limits.max_message_bytes,
                             max_batch_tokens=self.limits.max_batch_tokens,
                             max_sessions=self.limits.max_sessions),
            wire_dtype=codec.wire_dtype(wire),
            device=str(self.served.device),
        )

    def CloseSession(self, request: pb.CloseSessionRequest, context: grpc.ServicerContext) -> pb.CloseSessionReply:
        try:
            session = self.sessions.close(request.session_id)
        except Exception as exc:  # noqa: BLE001
            context.abort(*_status(exc))
        return pb.CloseSessionReply(steps=session.steps, forwards=session.forwards)

    def GetEdgeAssets(self, request: pb.EdgeAssetsRequest, context: grpc.ServicerContext) -> Iterator[pb.AssetChunk]:
        try:
            self.sessions.get(request.session_id)
        except Exception as exc:  # noqa: BLE001
            context.abort(*_status(exc))
        for asset in self.served.assets:
            size = len(asset.data)
            for off in range(0, max(size, 1), _CHUNK):
                yield pb.AssetChunk(path=asset.name, size=size, sha256=asset.sha256, offset=off,
                                    data=asset.data[off:off + _CHUNK])

    # -- parking (Kill and Revive) -------------------------------------------------
    def ParkAdapters(self, request: pb.ParkRequest, context: grpc.ServicerContext) -> pb.ParkReply:
        try:
            session = self.sessions.get(request.session_id)
            park = {p.name: self._decode_parked(session, p) for p in request.park}
            unpark = set(request.unpark)
            if len(park) != len(request.park) or len(unpark) != len(request.unpark):
                raise WireError("a module is named twice in one park request")
            if park.keys() & unpark:
                raise WireError(f"modules both parked and unparked: {sorted(park.keys() & unpark)}")
            with session.exclusive():
                missing = sorted(n for n in unpark if n not in session.parked)
                if missing:
                    raise WireError(f"cannot unpark modules that are not parked: {missing[:4]}")
                for name in unpark:
                    del session.parked[name]
                session.parked.update(park)
        except Exception as exc:  # noqa: BLE001
            context.abort(*_status(exc))
        total = len(session.module_names)
        if park or unpark:
            log.info("session %s: parked %d, unparked %d -> %d/%d modules live at %d/%d sites",
                     session.id[:8], len(park), len(unpark), total - len(session.parked), total,
                     session.live_sites(), len(session.sites))
        return pb.ParkReply(parked=len(session.parked), live=total - len(session.parked),
                            live_sites=session.live_sites())

    def _decode_parked(self, session: Session, p: pb.ParkedAdapter) -> LoRAAdapter:
        spec = next((m for s in session.sites for m in s.modules if m.name == p.name), None)
        if spec is None:
            raise WireError(f"cannot park {p.name!r}: not a module of this session")
        a_shape = tuple(p.lora_A.shape)
        if len(a_shape) != 2 or not 1 <= a_shape[0] <= MAX_PARKED_RANK:
            raise WireError(f"{p.name}: lora_A must be [r, {spec.in_features}] with 1 <= r <= "
                            f"{MAX_PARKED_RANK}, got {list(a_shape)}")
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
        return self._serve_step(request_iterator, context, train=True)

    def Forward(self, request_iterator: Iterator[pb.EdgeMessage], context: grpc.ServicerContext):
        return self._serve_step(request_iterator, context, train=False)

    def _serve_step(self, requests: Iterator[pb.EdgeMessage], context: grpc.ServicerContext, train: bool):
        # The model's forward calls out to the edge from deep inside the blocks,
        # so it runs in a worker thread; this generator relays its messages.
        out: queue.Queue = queue.Queue()

        def receive() -> pb.EdgeMessage:
            try:
                return next(requests)
            except StopIteration:
                raise StepAborted("the edge closed the stream in the middle of a step") from None
            except grpc.RpcError as exc:
                raise StepAborted(f"the edge's stream failed: {exc}") from None

        def work() -> None:
            try:
                self._run_step(receive, out.put, train)
                out.put(_DONE)
            except BaseException as exc:  # noqa: BLE001 - reported to the edge as a status
                if isinstance(exc, StepAborted) or _status(exc)[0] != grpc.StatusCode.INTERNAL:
                    log.warning("step refused: %s", exc)
                else:
                    log.exception("step failed")
                out.put(exc)

        threading.Thread(target=work, name="dlora-step", daemon=True).start()
        while True:
            item = out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                context.abort(*_status(item))
            yield item

    def _run_step(self, receive, send, train: bool) -> None:
        first = receive()
        if first.WhichOneof("kind") != "start":
            raise WireError("a step must begin with a start message")
        start = first.start
        session = self.sessions.get(start.session_id)
        t0 = time.perf_counter()
        hidden, mask = self._decode_inputs(session, start)
        with session.step(start.step_id, train):
            runner = StepRunner(session.sites, receive, send, session.wire_dtype, train, parked=dict(session.parked))
            final = self.served.run(runner, hidden, mask)
            send(pb.CloudMessage(final_hidden=pb.FinalHidden(hidden=codec.encode(final, session.wire_dtype))))
            if train:
                msg = runner.expect("final_grad")
                grad = codec.decode(msg.final_grad.grad, name="final hidden gradient",
                                    shape=tuple(final.shape), dtypes=[session.wire_dtype])
                if final.requires_grad:
                    final.backward(grad.to(device=final.device, dtype=final.dtype))
            cloud = time.perf_counter() - t0 - runner.wait_seconds
            session.tokens += int(mask.sum())
            session.cloud_seconds += cloud
            send(pb.CloudMessage(end=pb.StepEnd(step_id=start.step_id, cloud_seconds=cloud)))

    def _decode_inputs(self, session: Session, start: pb.StepStart) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.served.meta.hidden_size
        shape = tuple(start.hidden.shape)
        if len(shape) != 3 or shape[2] != h:
            raise WireError(f"hidden states must have shape [batch, seq, {h}], got {list(shape)}")
        if shape[0] < 1 or shape[1] < 1:
            raise WireError(f"empty batch: hidden shape {list(shape)}")
        if shape[0] * shape[1] > self.limits.max_batch_tokens:
            raise LimitExceeded(f"batch x sequence = {shape[0] * shape[1]} exceeds this server's "
                                f"limit of {self.limits.max_batch_tokens} tokens per step")
        hidden = codec.decode(start.hidden, name="hidden states", shape=shape, dtypes=[session.wire_dtype])
        mask = codec.decode(start.attention_mask, name="attention mask", shape=shape[:2], dtypes=[torch.bool])
        if not bool(mask.any(dim=1).all()):
            raise WireError("every row of the attention mask needs at least one real position")
        dev = self.served.device
        return hidden.to(device=dev, dtype=self.served.dtype), mask.to(device=dev, dtype=torch.long)


def make_server(service: DLoRAService, host: str, port: int, workers: int | None = None) -> tuple[grpc.Server, int]:
    size = service.limits.max_message_bytes
    opts = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]
    # Each in-flight step holds one handler thread (plus its worker thread).
    workers = workers or max(8, 2 * service.limits.max_sessions + 4)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dlora-rpc"),
                         options=opts)
    pb_grpc.add_DLoRAServicer_to_server(service, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    return server, bound
