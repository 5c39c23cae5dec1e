"""The edge's side of a DLoRA session: open it, fetch assets, run remote steps.

A step is one bidirectional gRPC stream. The edge sends the embedded batch,
then answers the cloud: adapter outputs for each site input, the gradient of
the final hidden state, and dL/dx for each site's output gradients.
"""
from __future__ import annotations

import hashlib
import logging
import queue
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from common import tensor_codec as codec
from common.lora import LoRAAdapter
from common.tensor_codec import WireError
from common.wire import dlora_pb2 as pb
from common.wire import dlora_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_BOOTSTRAP_MESSAGE_BYTES = 16 << 20
_SERVICE = pb.DESCRIPTOR.services_by_name["DLoRA"].full_name
_STEP_METHODS = ("TrainStep", "Forward", "Generate")


def _serialised(raw: bytes) -> bytes:
    """Step messages are serialised by `_stream` already (it needs their size first)."""
    return raw


def _sized_reply(raw: bytes) -> tuple[int, pb.CloudMessage]:
    """A cloud message with its wire size; ByteSize() would serialise it all over again."""
    return len(raw), pb.CloudMessage.FromString(raw)


class CloudError(RuntimeError):
    """The cloud refused a call; the text carries its status and reason."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


# Failures worth another try: the server is down or restarting, lost our
# session (a restart), timed out, or aborted the step while shutting down.
# (RESOURCE_EXHAUSTED is not: an oversize batch stays oversize.)
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED}


@dataclass
class Credentials:
    """How the edge proves who it is and checks who the server is."""

    token: str | None = None          # bearer token, sent on every call
    ca: bytes | None = None           # CA that signed the server's certificate: enables TLS
    cert: bytes | None = None         # client certificate chain, for mutual TLS
    key: bytes | None = None          # client private key, for mutual TLS
    server_name: str | None = None    # name to check in the server certificate, if not the host

    @classmethod
    def from_files(cls, token: str | None = None, ca: Path | None = None, cert: Path | None = None,
                   key: Path | None = None, server_name: str | None = None) -> "Credentials":
        if bool(cert) != bool(key):
            raise ValueError("a client certificate and its key go together")
        if cert and not ca:
            raise ValueError("mutual TLS needs the server's CA too")
        read = lambda p: p.read_bytes() if p else None  # noqa: E731
        return cls(token or None, read(ca), read(cert), read(key), server_name)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


@dataclass
class RetryPolicy:
    retries: int = 8                  # further attempts after a retryable failure
    backoff: float = 0.5              # first wait in seconds; doubles each time
    max_backoff: float = 30.0

    def delay(self, attempt: int) -> float:
        base = min(self.backoff * (2 ** attempt), self.max_backoff)
        return base * (0.8 + 0.4 * random.random())  # jitter: restarted servers are not stampeded


@dataclass(frozen=True)
class SplitOptions:
    """SplitLoRA: where the model is cut and how the federation trains (see SplitConfig in the proto)."""

    cut_layer: int = 4
    federation: str = "default"
    clients: int = 1
    rank: int = 8
    alpha: float = 16.0
    lr: float = 2e-3
    seed: int = 0


@dataclass(frozen=True)
class SiteModule:
    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class SiteInfo:
    index: int
    layer: int
    modules: tuple[SiteModule, ...]


@dataclass
class StepStats:
    """What one step cost the edge."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0
    sites: int = 0            # site exchanges in the forward pass
    edge_flops: int = 0       # analytic, adapters only (fwd + bwd)
    head_flops: int = 0       # final norm + LM head (filled in by the trainer)
    block_flops: int = 0      # SplitLoRA: the frozen blocks the edge runs (filled in by the trainer)
    cloud_seconds: float = 0.0
    batch_sessions: int = 1   # sessions whose steps the cloud ran as one batch with this one


def _rpc_error(exc: grpc.RpcError) -> CloudError:
    code = exc.code() if hasattr(exc, "code") else None
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name if code is not None else "UNKNOWN"
    return CloudError(f"cloud refused the call ({name}): {detail}", code)


class CloudSession:
    """A session with a cloud_server; owns the gRPC channel."""

    def __init__(self, target: str, *, wire_dtype: str = "fp32", targets: list[str] | None = None,
                 client_name: str = "edge", timeout: float = 600.0, credentials: Credentials | None = None,
                 retry: RetryPolicy | None = None, split: SplitOptions | None = None, edge_layers: int = 0) -> None:
        self.target = target
        self.split = split
        # DLoRA: blocks [0, edge_layers) run here; steps send their output and get its gradient back.
        self.edge_layers = edge_layers
        self.timeout = timeout
        self.wire_dtype = codec.dtype_from_name(wire_dtype)
        self.targets = targets or []
        self.client_name = client_name
        self.credentials = credentials or Credentials()
        self.retry = retry or RetryPolicy()
        self.channel: grpc.Channel | None = None
        self.closed = False
        self.reconnects = 0
        # Killed modules whose frozen copy the cloud applies; the edge keeps
        # the master copies so it can park them again on a new session.
        self.parked_adapters: dict[str, LoRAAdapter] = {}
        self._needs_repark = False
        self._open()

    @property
    def parked(self) -> set[str]:
        return set(self.parked_adapters)

    def _channel(self, size: int) -> grpc.Channel:
        opts = self._options(size)
        c = self.credentials
        if c.ca is None:
            return grpc.insecure_channel(self.target, options=opts)
        if c.server_name:
            opts.append(("grpc.ssl_target_name_override", c.server_name))
        creds = grpc.ssl_channel_credentials(root_certificates=c.ca, private_key=c.key, certificate_chain=c.cert)
        return grpc.secure_channel(self.target, creds, options=opts)

    def _open(self) -> None:
        boot = self._channel(_BOOTSTRAP_MESSAGE_BYTES)
        try:
            grpc.channel_ready_future(boot).result(timeout=min(self.timeout, 30.0))
        except grpc.FutureTimeoutError:
            boot.close()
            raise CloudError(f"no cloud_server answers at {self.target} (is it running?)",
                             grpc.StatusCode.UNAVAILABLE) from None
        try:
            req = pb.OpenSessionRequest(client_name=self.client_name, wire_dtype=codec.wire_dtype(self.wire_dtype),
                                        target_modules=self.targets, edge_layers=self.edge_layers)
            if self.split is not None:
                sp = self.split
                req.mode = pb.SPLITLORA
                req.split.CopyFrom(pb.SplitConfig(cut_layer=sp.cut_layer, federation=sp.federation,
                                                  clients=sp.clients, rank=sp.rank, alpha=sp.alpha, lr=sp.lr,
                                                  seed=sp.seed))
            reply = pb_grpc.DLoRAStub(boot).OpenSession(req, timeout=self.timeout, metadata=self.credentials.metadata())
        except grpc.RpcError as exc:
            raise _rpc_error(exc) from None
        finally:
            boot.close()
        if reply.edge_layers != self.edge_layers:
            raise CloudError(f"the server at {self.target} does not run blocks from edge_layers "
                             f"{self.edge_layers} (an older cloud_server?); it answered {reply.edge_layers}")
        sites = [SiteInfo(s.index, s.layer, tuple(SiteModule(m.name, m.in_features, m.out_features)
                                                  for m in s.modules)) for s in reply.sites]
        if self.channel is not None and (sites != self.sites or reply.model.assets_sha256 != self.model.assets_sha256):
            raise CloudError(f"the server at {self.target} now serves a different model; cannot resume this session")
        self.session_id = reply.session_id
        self.model = reply.model
        self.limits = reply.limits
        self.device = reply.device
        self.sites = sites
        if self.channel is not None:
            self.channel.close()
        # Message limits follow what the server announced for the largest site tensor.
        self.channel = self._channel(self.limits.max_message_bytes)
        self.stub = pb_grpc.DLoRAStub(self.channel)
        # The step streams carry megabytes per message: each is serialised once,
        # and its size comes from that serialisation instead of a second one.
        self.step_rpcs = {name: self.channel.stream_stream(f"/{_SERVICE}/{name}", request_serializer=_serialised,
                                                           response_deserializer=_sized_reply)
                          for name in _STEP_METHODS}

    def reopen(self) -> None:
        """A new session on the same server (after a restart), with the killed adapters parked again."""
        if self.split is not None:
            # The server-side adapters lived in the lost session's federation.
            raise CloudError(f"the cloud at {self.target} lost this SplitLoRA session (restarted?) and with it the "
                             "server-side adapters; SplitLoRA runs cannot be resumed", grpc.StatusCode.NOT_FOUND)
        old = self.session_id
        self._open()
        self.reconnects += 1
        self._needs_repark = bool(self.parked_adapters)
        log.warning("reconnected to %s as session %s (was %s)", self.target, self.session_id[:8], old[:8])
        try:  # the old session may still exist (a network blip): free its slot
            self.stub.CloseSession(pb.CloseSessionRequest(session_id=old), timeout=10,
                                   metadata=self.credentials.metadata())
        except grpc.RpcError:
            pass

    def _ensure_parked(self) -> None:
        """After a reconnect, park the killed adapters again before anything else."""
        if self._needs_repark:
            self._park_rpc(self.parked_adapters, [])
            self._needs_repark = False
            log.warning("parked %d killed adapters again on session %s", len(self.parked_adapters),
                        self.session_id[:8])

    def _with_retries(self, what: str, attempt_fn, params: list[torch.Tensor] = ()):
        """Run attempt_fn, retrying retryable failures with exponential backoff.

        Gradients in `params` are restored before each retry, so a step that
        died half-way never counts twice. A lost session (the server restarted)
        is re-opened; a merely unreachable server is retried on the same session.
        """
        saved = [None if p.grad is None else p.grad.clone() for p in params]
        reopened = False
        for attempt in range(self.retry.retries + 1):
            try:
                self._ensure_parked()
                return attempt_fn()
            except CloudError as exc:
                if exc.code not in RETRYABLE or attempt == self.retry.retries:
                    raise
                lost = exc.code == grpc.StatusCode.NOT_FOUND
                if lost and self.split is not None:
                    self.reopen()  # raises: a lost SplitLoRA session cannot be resumed
                for p, g in zip(params, saved):
                    p.grad = None if g is None else g.clone()
                # A server that answers NOT_FOUND is up but lost the session (it
                # restarted): re-open at once, the first time. Only an unreachable or
                # busy server, or one that loses session after session, is waited for.
                if lost and not reopened:
                    reopened = True
                    if self._reopened(what):
                        continue
                wait = self.retry.delay(attempt)
                log.warning("%s failed (%s); retry %d/%d in %.1f s", what, exc, attempt + 1, self.retry.retries, wait)
                time.sleep(wait)
                if lost and reopened:
                    self._reopened(what)
        raise AssertionError("unreachable")

    def _reopened(self, what: str) -> bool:
        """Re-open a lost session; False if the server could not be reached (back off, then retry)."""
        log.warning("%s: the cloud no longer knows session %s (restarted?); opening a new one now",
                    what, self.session_id[:8])
        try:
            self.reopen()
        except CloudError as again:
            if again.code not in RETRYABLE:
                raise
            log.warning("reconnecting failed: %s", again)
            return False
        return True

    @staticmethod
    def _options(size: int) -> list[tuple[str, int]]:
        return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]

    @property
    def module_names(self) -> list[str]:
        return [m.name for s in self.sites for m in s.modules]

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return {m.name: (m.in_features, m.out_features) for s in self.sites for m in s.modules}

    # -- assets --------------------------------------------------------------
    def fetch_assets(self, cache_dir: Path) -> Path:
        """Download the edge assets into cache_dir/<digest>, verified; reuse them if present."""
        dest = cache_dir / self.model.assets_sha256[:16]
        if (dest / ".complete").exists():
            return dest
        dest.mkdir(parents=True, exist_ok=True)
        files: dict[str, tuple[bytearray, str, int]] = {}
        try:
            for chunk in self.stub.GetEdgeAssets(pb.EdgeAssetsRequest(session_id=self.session_id),
                                                 timeout=self.timeout, metadata=self.credentials.metadata()):
                buf, _, _ = files.setdefault(chunk.path, (bytearray(), chunk.sha256, chunk.size))
                if chunk.offset != len(buf):
                    raise CloudError(f"asset {chunk.path}: chunk at offset {chunk.offset}, expected {len(buf)}")
                buf.extend(chunk.data)
        except grpc.RpcError as exc:
            raise _rpc_error(exc) from None
        for name, (buf, sha, size) in files.items():
            if Path(name).name != name:
                raise CloudError(f"asset name {name!r} is not a plain file name")
            if len(buf) != size or hashlib.sha256(buf).hexdigest() != sha:
                raise CloudError(f"asset {name} failed its SHA-256 check; refusing to use it")
            tmp = dest / (name + ".part")
            tmp.write_bytes(bytes(buf))
            tmp.replace(dest / name)
        (dest / ".complete").write_text(self.model.assets_sha256)
        return dest

    # -- Kill and Revive ----------------------------------------------------------
    def park(self, kill: dict[str, LoRAAdapter], revive: list[str]) -> tuple[int, int]:
        """Upload killed adapters once (the cloud applies them frozen), unpark revived ones.

        Returns (bytes sent, bytes received).
        """
        sizes = self._with_retries("parking adapters", lambda: self._park_rpc(kill, revive))
        for name in revive:
            self.parked_adapters.pop(name, None)
        self.parked_adapters.update(kill)
        return sizes

    def _park_rpc(self, kill: dict[str, LoRAAdapter], revive: list[str]) -> tuple[int, int]:
        req = pb.ParkRequest(session_id=self.session_id, unpark=revive, park=[
            pb.ParkedAdapter(name=name, lora_A=codec.encode(ad.lora_A, torch.float32),
                             lora_B=codec.encode(ad.lora_B, torch.float32), scale=ad.scale)
            for name, ad in kill.items()])
        try:
            reply = self.stub.ParkAdapters(req, timeout=self.timeout, metadata=self.credentials.metadata())
        except grpc.RpcError as exc:
            raise _rpc_error(exc) from None
        return req.ByteSize(), reply.ByteSize()

    # -- steps ---------------------------------------------------------------
    def train_step(self, step_id: int, hidden: torch.Tensor, mask: torch.Tensor,
                   adapters: dict[str, LoRAAdapter],
                   loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, StepStats]:
        """Forward and backward through the cloud; adapter grads accumulate in `adapters`.

        `loss_fn` maps the final hidden state [B, T, H] to a scalar loss. With
        edge_layers, `hidden` is the output of the edge's blocks; if it requires
        grad, the cloud's dL/d(hidden) is backpropagated into them once the step
        has succeeded (so a retried attempt never adds it twice).
        """
        params = [p for a in adapters.values() for p in (a.lora_A, a.lora_B)]
        return self._with_retries(f"step {step_id}", lambda: self._step(
            self.step_rpcs["TrainStep"], step_id, hidden, mask, adapters, loss_fn), params)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor,
                adapters: dict[str, LoRAAdapter]) -> tuple[torch.Tensor, StepStats]:
        """Forward only: the final hidden state [B, T, H] (before the final norm)."""
        return self._with_retries("forward", lambda: self._step(self.step_rpcs["Forward"], 0, hidden, mask,
                                                                adapters, None))

    def generate(self, hidden: torch.Tensor, mask: torch.Tensor, adapters: dict[str, LoRAAdapter],
                 next_embedding: Callable[[torch.Tensor], torch.Tensor | None]) -> StepStats:
        """Generation on the cloud's per-stream KV cache.

        After each pass `next_embedding` gets the final hidden state of the last
        position [B, 1, H] and returns the embedding of the chosen tokens
        [B, 1, H], or None to stop. Not retried: a half-done generation cannot
        be replayed without re-running the caller's sampling.
        """
        self._ensure_parked()

        def on_final(exchange: _EdgeExchange, msg: pb.FinalHidden) -> bool:
            lead = (hidden.shape[0], 1)
            h = codec.decode(msg.hidden, name="final hidden state", shape=lead + (hidden.shape[2],),
                             dtypes=[self.wire_dtype]).float()
            nxt = next_embedding(h)
            if nxt is None:
                exchange.close_stream()
                return True
            exchange.lead = lead
            exchange.send(pb.EdgeMessage(next_embedding=pb.NextEmbedding(hidden=codec.encode(nxt, self.wire_dtype))))
            return True

        # No overall deadline: the cloud bounds each token's wait instead.
        _, stats = self._stream(self.step_rpcs["Generate"], 0, hidden, mask, adapters, False, on_final, timeout=None)
        return stats

    # -- SplitLoRA ---------------------------------------------------------------
    def split_step(self, step_id: int, cut: torch.Tensor, mask: torch.Tensor,
                   loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, StepStats, torch.Tensor]:
        """The cloud's blocks after the cut, forward and backward: (loss, stats, dL/d cut)."""
        def attempt():
            got: dict[str, torch.Tensor] = {}

            def on_final(exchange: _EdgeExchange, msg: pb.FinalHidden):
                exchange.on_cut_grad = lambda g: got.__setitem__("grad", codec.decode(
                    g.grad, name="cut-layer gradient", shape=tuple(cut.shape), dtypes=[self.wire_dtype]).float())
                return exchange.final(msg, loss_fn, tuple(cut.shape))

            loss, stats = self._stream(self.step_rpcs["TrainStep"], step_id, cut.detach(), mask, {}, True, on_final)
            if "grad" not in got:
                raise CloudError("the cloud ended a SplitLoRA step without the cut-layer gradient")
            return loss, stats, got["grad"]

        return self._with_retries(f"step {step_id}", attempt)

    def aggregate(self, round_: int, examples: int, adapters: dict[str, LoRAAdapter]) -> tuple[int, int, int]:
        """FedAvg: send this client's adapters, load the federation's average into them.

        Returns (clients averaged, bytes sent, bytes received).
        """
        req = pb.AggregateRequest(session_id=self.session_id, round=round_, examples=examples, adapters=[
            pb.LoRAWeights(name=n, lora_A=codec.encode(a.lora_A, torch.float32),
                           lora_B=codec.encode(a.lora_B, torch.float32)) for n, a in adapters.items()])

        def attempt():
            try:
                return self.stub.Aggregate(req, timeout=self.timeout, metadata=self.credentials.metadata())
            except grpc.RpcError as exc:
                raise _rpc_error(exc) from None

        reply = self._with_retries(f"aggregation round {round_}", attempt)
        if {w.name for w in reply.adapters} != set(adapters):
            raise CloudError("the aggregation reply does not name this client's adapters")
        for w in reply.adapters:
            ad = adapters[w.name]
            with torch.no_grad():
                ad.lora_A.copy_(codec.decode(w.lora_A, name=f"{w.name} lora_A", shape=tuple(ad.lora_A.shape)))
                ad.lora_B.copy_(codec.decode(w.lora_B, name=f"{w.name} lora_B", shape=tuple(ad.lora_B.shape)))
        return reply.clients, req.ByteSize(), reply.ByteSize()

    def server_adapters(self) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, int]:
        """The federation's server-side adapters: ({name: (A, B)}, scale, updates)."""
        try:
            reply = self.stub.GetServerAdapters(pb.ServerAdaptersRequest(session_id=self.session_id),
                                                timeout=self.timeout, metadata=self.credentials.metadata())
        except grpc.RpcError as exc:
            raise _rpc_error(exc) from None
        out = {w.name: (codec.decode(w.lora_A, name=f"{w.name} lora_A"), codec.decode(w.lora_B, name=f"{w.name} lora_B"))
               for w in reply.adapters}
        return out, reply.scale, reply.updates

    def _step(self, rpc, step_id, hidden, mask, adapters, loss_fn):
        train = loss_fn is not None
        got: dict[str, torch.Tensor] = {}

        def on_final(exchange: _EdgeExchange, msg: pb.FinalHidden):
            if train and self.edge_layers:
                exchange.on_cut_grad = lambda g: got.__setitem__("grad", codec.decode(
                    g.grad, name="gradient of the edge blocks' output", shape=tuple(hidden.shape),
                    dtypes=[self.wire_dtype]).float())
            return exchange.final(msg, loss_fn, tuple(hidden.shape))

        result, stats = self._stream(rpc, step_id, hidden.detach(), mask, adapters, train, on_final)
        if train and self.edge_layers:
            if "grad" not in got:
                raise CloudError("the cloud ended the step without the gradient of the edge blocks' output")
            if hidden.requires_grad:
                hidden.backward(got["grad"])
        return result, stats

    def _stream(self, rpc, step_id, hidden, mask, adapters, train, on_final, timeout: float | None = -1.0):
        """One bidirectional stream: send the start, answer the cloud until it ends."""
        stats = StepStats()
        outbox: queue.SimpleQueue = queue.SimpleQueue()

        def send(msg: pb.EdgeMessage) -> None:
            raw = msg.SerializeToString()
            if len(raw) > self.limits.max_message_bytes:
                raise WireError(f"a {len(raw)}-byte message exceeds the server's limit of "
                                f"{self.limits.max_message_bytes} bytes; use a smaller batch or sequence")
            stats.bytes_sent += len(raw)
            stats.messages += 1
            outbox.put(raw)

        def requests() -> Iterator[bytes]:
            while (raw := outbox.get()) is not None:
                yield raw

        first = pb.EdgeMessage()
        first.start.session_id, first.start.step_id = self.session_id, step_id
        codec.encode_into(first.start.hidden, hidden, self.wire_dtype)
        codec.encode_into(first.start.attention_mask, mask.bool())
        send(first)
        exchange = _EdgeExchange(self, adapters, send, stats, train, tuple(hidden.shape[:2]),
                                 close_stream=lambda: outbox.put(None))
        result = None
        responses = rpc(requests(), timeout=self.timeout if timeout == -1.0 else timeout,
                        metadata=self.credentials.metadata())
        try:
            for size, msg in responses:
                stats.bytes_received += size
                stats.messages += 1
                kind = msg.WhichOneof("kind")
                if kind == "site_input":
                    exchange.forward(msg.site_input)
                elif kind == "final_hidden":
                    result = on_final(exchange, msg.final_hidden)
                elif kind == "site_grad_outputs":
                    exchange.backward(msg.site_grad_outputs)
                elif kind == "cut_grad":
                    exchange.on_cut_grad(msg.cut_grad)
                elif kind == "end":
                    stats.cloud_seconds = msg.end.cloud_seconds
                    stats.batch_sessions = msg.end.batch_sessions or 1
                    break
                else:
                    raise WireError(f"unexpected message {kind!r} from the cloud")
        except grpc.RpcError as exc:
            raise _rpc_error(exc) from None
        except BaseException:
            responses.cancel()
            raise
        finally:
            outbox.put(None)
        if result is None:
            raise CloudError("the cloud ended the step without sending the final hidden state")
        return result, stats

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.stub.CloseSession(pb.CloseSessionRequest(session_id=self.session_id), timeout=30,
                                   metadata=self.credentials.metadata())
        except grpc.RpcError as exc:
            log.warning("closing the session failed: %s", _rpc_error(exc))
        finally:
            self.channel.close()

    def __enter__(self) -> "CloudSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unexpected_cut_grad(_msg) -> None:
    raise WireError("the cloud sent a cut-layer gradient in a DLoRA step")


@dataclass
class _EdgeExchange:
    """Per-step state: what the edge computed at each site, kept for backward."""

    session: CloudSession
    adapters: dict[str, LoRAAdapter]
    send: Callable[[pb.EdgeMessage], None]
    stats: StepStats
    train: bool
    lead: tuple[int, ...] = ()        # (batch, seq) of this step (of this pass, when generating)
    close_stream: Callable[[], None] = lambda: None
    on_cut_grad: Callable[[pb.CutGrad], None] = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.on_cut_grad is None:
            self.on_cut_grad = _unexpected_cut_grad
    saved: dict[int, tuple[torch.Tensor, list[torch.Tensor], list[LoRAAdapter]]] = field(default_factory=dict)

    def _site(self, index: int) -> SiteInfo:
        if not 0 <= index < len(self.session.sites):
            raise WireError(f"the cloud named site {index}, which this session does not have")
        return self.session.sites[index]

    def forward(self, msg: pb.SiteInput) -> None:
        site = self._site(msg.site)
        live = list(msg.live)
        if any(not 0 <= i < len(site.modules) for i in live):
            raise WireError(f"site {msg.site}: live module index out of range: {live}")
        parked = [site.modules[i].name for i in live if site.modules[i].name in self.session.parked]
        if parked:
            raise WireError(f"the cloud asked for parked modules {parked}; edge and cloud disagree on the live set")
        x = codec.decode(msg.x, name=f"input of site {msg.site}", dtypes=[self.session.wire_dtype],
                         shape=self.lead + (site.modules[0].in_features,))
        x = x.float()
        mods = [self.adapters[site.modules[i].name] for i in live]
        tokens = x.numel() // x.shape[-1]
        with torch.set_grad_enabled(self.train):
            if self.train:
                x.requires_grad_(True)
            ys = [m(x) for m in mods]
        if self.train:
            self.saved[msg.site] = (x, ys, mods)
        self.stats.sites += 1
        self.stats.edge_flops += sum(m.flops(tokens) for m in mods)
        # Built in place: a finished Tensor put into a message is copied again.
        reply = pb.EdgeMessage()
        reply.site_outputs.site = msg.site
        for y in ys:
            codec.encode_into(reply.site_outputs.outputs.add(), y, self.session.wire_dtype)
        self.send(reply)

    def final(self, msg: pb.FinalHidden, loss_fn, shape: tuple[int, ...]):
        h = codec.decode(msg.hidden, name="final hidden state", shape=shape,
                         dtypes=[self.session.wire_dtype]).float()
        if not self.train:
            return h
        h.requires_grad_(True)
        loss = loss_fn(h)
        loss.backward()
        reply = pb.EdgeMessage()
        codec.encode_into(reply.final_grad.grad, h.grad, self.session.wire_dtype)
        self.send(reply)
        return float(loss.detach())

    def backward(self, msg: pb.SiteGradOutputs) -> None:
        if msg.site not in self.saved:
            raise WireError(f"gradients for site {msg.site}, which had no forward in this step")
        x, ys, mods = self.saved.pop(msg.site)
        if len(msg.grad_outputs) != len(ys):
            raise WireError(f"site {msg.site}: {len(msg.grad_outputs)} gradients for {len(ys)} outputs")
        grads = [codec.decode(g, name=f"output gradient at site {msg.site}", shape=tuple(y.shape),
                              dtypes=[self.session.wire_dtype]).float() for g, y in zip(msg.grad_outputs, ys)]
        params = [p for m in mods for p in (m.lora_A, m.lora_B)]
        # Backward costs about twice the forward; dL/dx only where the cloud needs it.
        tokens = x.numel() // x.shape[-1]
        self.stats.edge_flops += 2 * sum(m.flops(tokens) for m in mods)
        inputs = params + ([x] if msg.want_grad_input else [])
        torch.autograd.backward(ys, grads, inputs=inputs)
        reply = pb.EdgeMessage()
        reply.site_grad_input.SetInParent()  # the kind is set even for site 0 without dL/dx
        reply.site_grad_input.site = msg.site
        if msg.want_grad_input:
            codec.encode_into(reply.site_grad_input.grad_input, x.grad, self.session.wire_dtype)
        self.send(reply)
