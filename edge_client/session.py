"""The edge's side of a DLoRA session: open it, fetch assets, park adapters, run remote steps with retries.

A step is one bidirectional gRPC stream (step_stream.StepStream).
"""
from __future__ import annotations

import logging
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import torch

from common import lora_wire
from common import tensor_codec as codec
from common.lora import LoRAAdapter
from common.routing import AFFINITY_HEADER, affinity
from common.settings import setting
from common.site_types import ModuleSpec, SiteSpec
from common.wire import dlora_pb2 as pb
from common.wire import dlora_pb2_grpc as pb_grpc
from common.wire_format import WireFormat
from edge_client import asset_download
from edge_client.attestation import policy as attestation
from edge_client.attestation.client import AttestedCloud, attest
from edge_client.attestation.policy import Policy
from edge_client.errors import CloudError, rpc_error
from edge_client.pipelined_step import PipelinedStep, row_bounds
from edge_client.step_stream import StepStats, StepStream

if TYPE_CHECKING:  # the settings import this module
    from common.lora import LoRAConfig
    from edge_client.remote_model import RemoteConfig

__all__ = ["CloudSession", "Credentials", "RetryPolicy", "SplitOptions", "StepStats"]

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
    # Set: the cloud must prove with TEE evidence that it runs what this policy allows before anything
    # else is sent (token included); its TLS certificate is then pinned, not checked against `ca`.
    attestation: Policy | None = None

    @classmethod
    def from_files(cls, token: str | None = None, ca: Path | None = None, cert: Path | None = None,
                   key: Path | None = None, server_name: str | None = None,
                   attestation_policy: Path | None = None) -> Credentials:
        if bool(cert) != bool(key):
            raise ValueError("a client certificate and its key go together")
        if cert and not (ca or attestation_policy):
            raise ValueError("mutual TLS needs the server's CA too (or an attestation policy, which pins the "
                             "server's certificate)")
        read = lambda p: p.read_bytes() if p else None  # noqa: E731
        policy = attestation.load(attestation_policy) if attestation_policy else None
        return cls(token or None, read(ca), read(cert), read(key), server_name, policy)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


@dataclass
class RetryPolicy:
    retries: int = setting(8, "attempts after a failed step or a full server, with exponential backoff; the "
                              "session is re-opened and killed adapters parked again if the server restarted",
                           group="connection and recovery")
    backoff: float = setting(0.5, "first wait in seconds; doubles each time", cli=False)
    max_backoff: float = setting(30.0, "longest wait in seconds", cli=False)

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("--retries and the backoff times must not be negative")

    def delay(self, attempt: int) -> float:
        base = min(self.backoff * (2 ** attempt), self.max_backoff)
        return base * (0.8 + 0.4 * random.random())  # jitter: restarted servers are not stampeded


@dataclass(frozen=True)
class SplitOptions:
    """SplitLoRA as this edge asks for it: where the model is cut and how the federation trains (sent as
    the proto's SplitConfig; the cloud's federation keeps the agreed FederationSettings)."""

    cut_layer: int = 4
    federation: str = "default"
    clients: int = 1
    rank: int = 8
    alpha: float = 16.0
    lr: float = 2e-3
    seed: int = 0


class CloudSession:
    """A session with a cloud_server; owns the gRPC channel."""

    # Set by _open (called from __init__), from the server's OpenSession reply.
    session_id: str
    model: pb.ModelInfo
    sites: list[SiteSpec]

    def __init__(self, target: str, *, wire: WireFormat | None = None, targets: list[str] | None = None,
                 client_name: str = "edge", timeout: float = 600.0, credentials: Credentials | None = None,
                 retry: RetryPolicy | None = None, split: SplitOptions | None = None, edge_layers: int = 0,
                 client_key: str | None = None) -> None:
        self.target = target
        self.split = split
        # DLoRA: blocks [0, edge_layers) run here; steps send their output and get its gradient back.
        self.edge_layers = edge_layers
        self.timeout = timeout
        self.wire = wire or WireFormat()
        self.targets = targets or []
        self.client_name = client_name
        self.credentials = credentials or Credentials()
        self.retry = retry or RetryPolicy()
        # Kept across re-opened sessions: a federation knows a returning member by it, and a load
        # balancer keeps a DLoRA client's calls on one replica by it. Random unless given.
        self.client_key = client_key or secrets.token_hex(16)
        self.channel: grpc.Channel | None = None
        self.closed = False
        self.reconnects = 0
        # Killed modules whose frozen copy the cloud applies; the edge keeps
        # the master copies so it can park them again on a new session.
        self.parked_adapters: dict[str, LoRAAdapter] = {}
        self._needs_repark = False
        # Attested mode: the replica this session's channels pin, and the claims of every attestation so far
        # (one per session opened: the first, then each reconnect or failover).
        self.attested: AttestedCloud | None = None
        self.attestations: list[dict] = []
        self._admitted()

    @classmethod
    def from_config(cls, remote: RemoteConfig, lora: LoRAConfig | None = None, *,
                    credentials: Credentials | None = None, retry: RetryPolicy | None = None,
                    split: SplitOptions | None = None, client_key: str | None = None) -> CloudSession:
        """The session the settings describe: `remote`'s server, wire, name, timeout and edge layers, and
        `lora`'s target modules (none: the server's default). The one way settings become a session, for
        the trainer, the Python API, `generate`, the benches and the tests alike."""
        targets = list(lora.target_modules) if lora is not None else []
        return cls(remote.server, wire=remote.wire_format(), targets=targets or None, client_name=remote.client_name,
                   timeout=remote.timeout, credentials=credentials, retry=retry, split=split,
                   edge_layers=remote.edge_layers, client_key=client_key)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Sent with every call: the credentials, and the key a load balancer routes by
        (the federation's name, so its members meet on one replica; else this client's key)."""
        key = affinity(self.client_key, self.split.federation if self.split is not None else None)
        return self.credentials.metadata() + ((AFFINITY_HEADER, key),)

    @property
    def parked(self) -> set[str]:
        return set(self.parked_adapters)

    def _channel(self, size: int) -> grpc.Channel:
        opts = self._options(size)
        c = self.credentials
        if self.attested is not None:
            opts.append(("grpc.ssl_target_name_override", self.attested.server_name))
            return grpc.secure_channel(self.target, self.attested.channel_credentials(c.key, c.cert), options=opts)
        if c.ca is None:
            return grpc.insecure_channel(self.target, options=opts)
        if c.server_name:
            opts.append(("grpc.ssl_target_name_override", c.server_name))
        creds = grpc.ssl_channel_credentials(root_certificates=c.ca, private_key=c.key, certificate_chain=c.cert)
        return grpc.secure_channel(self.target, creds, options=opts)

    def _attest(self) -> None:
        """Attest whichever replica `target` reaches now, before anything else is sent to it."""
        policy = self.credentials.attestation
        assert policy is not None
        try:
            self.attested = attest(self.target, policy, timeout=min(self.timeout, 60.0), cert=self.credentials.cert,
                                   key=self.credentials.key)
        except ConnectionError as exc:
            raise CloudError(str(exc), grpc.StatusCode.UNAVAILABLE) from None
        self.attestations.append(self.attested.claims)

    def _admitted(self) -> None:
        """Open a session, waiting out a full server (RESOURCE_EXHAUSTED from OpenSession): its slots free
        as other sessions close or idle out, as a killed edge's does after the server's --idle-timeout. Only
        here is that status worth waiting for; a step over the limits stays over them."""
        for attempt in range(self.retry.retries + 1):
            try:
                return self._open()
            except CloudError as exc:
                if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == self.retry.retries:
                    raise
                wait = self.retry.delay(attempt)
                log.warning("no session yet: %s; retry %d/%d in %.1f s", exc, attempt + 1, self.retry.retries, wait)
                time.sleep(wait)

    def _open(self) -> None:
        if self.credentials.attestation is not None:
            self._attest()
        boot = self._channel(_BOOTSTRAP_MESSAGE_BYTES)
        try:
            grpc.channel_ready_future(boot).result(timeout=min(self.timeout, 30.0))
        except grpc.FutureTimeoutError:
            boot.close()
            raise CloudError(f"no cloud_server answers at {self.target} (is it running?)",
                             grpc.StatusCode.UNAVAILABLE) from None
        try:
            req = pb.OpenSessionRequest(client_name=self.client_name, target_modules=self.targets,
                                        edge_layers=self.edge_layers, client_key=self.client_key)
            self.wire.fill_request(req)
            if self.split is not None:
                sp = self.split
                req.mode = pb.SPLITLORA
                req.resume = self.channel is not None   # re-opening: rejoin the federation as it was
                req.split.CopyFrom(pb.SplitConfig(cut_layer=sp.cut_layer, federation=sp.federation,
                                                  clients=sp.clients, rank=sp.rank, alpha=sp.alpha, lr=sp.lr,
                                                  seed=sp.seed))
            reply = pb_grpc.DLoRAStub(boot).OpenSession(req, timeout=self.timeout, metadata=self.metadata())
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None
        finally:
            boot.close()
        if reply.edge_layers != self.edge_layers:
            raise CloudError(f"the server at {self.target} does not run blocks from edge_layers "
                             f"{self.edge_layers} (an older cloud_server?); it answered {reply.edge_layers}")
        if WireFormat.from_message(reply) != self.wire:
            raise CloudError(f"the server at {self.target} agreed to a {WireFormat.from_message(reply)} wire, not the "
                             f"{self.wire} asked for (an older cloud_server?)")
        sites = [SiteSpec(s.index, s.layer, tuple(ModuleSpec(m.name, m.in_features, m.out_features)
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
        """A new session after a restart or a failover to another replica, with the killed adapters parked
        again; a SplitLoRA client rejoins its federation, which the cloud resumes from its state directory."""
        old = self.session_id
        self._admitted()
        self.reconnects += 1
        self._needs_repark = bool(self.parked_adapters)
        log.warning("reconnected to %s as session %s (was %s)", self.target, self.session_id[:8], old[:8])
        try:  # the old session may still exist (a network blip): free its slot
            self.stub.CloseSession(pb.CloseSessionRequest(session_id=old), timeout=10,
                                   metadata=self.metadata())
        except grpc.RpcError:
            pass

    def _ensure_parked(self) -> None:
        """After a reconnect, park the killed adapters again before anything else."""
        if self._needs_repark:
            self._park_rpc(self.parked_adapters, [])
            self._needs_repark = False
            log.warning("parked %d killed adapters again on session %s", len(self.parked_adapters),
                        self.session_id[:8])

    def with_retries(self, what: str, attempt_fn, params: Sequence[torch.Tensor] = ()):
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
                # Attested: a replica that cannot be reached may be gone for good (a failover lands on
                # another, with another key), so the session is opened again, attesting whatever answers.
                lost = exc.code == grpc.StatusCode.NOT_FOUND or (
                    self.credentials.attestation is not None and exc.code == grpc.StatusCode.UNAVAILABLE)
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
    def _options(size: int) -> list[tuple[str, int | str]]:
        return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]

    @property
    def module_names(self) -> list[str]:
        return [m.name for s in self.sites for m in s.modules]

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return {m.name: (m.in_features, m.out_features) for s in self.sites for m in s.modules}

    # -- assets --------------------------------------------------------------
    def fetch_assets(self, cache_dir: Path) -> Path:
        """Download the edge assets into cache_dir/<digest>, verified; reuse them if present."""
        return asset_download.fetch(self.stub, self.session_id, self.model.assets_sha256, cache_dir, self.timeout,
                                    self.metadata())

    # -- Kill and Revive ----------------------------------------------------------
    def park(self, kill: dict[str, LoRAAdapter], revive: list[str]) -> tuple[int, int]:
        """Upload killed adapters once (the cloud applies them frozen), unpark revived ones.

        Returns (bytes sent, bytes received).
        """
        sizes = self.with_retries("parking adapters", lambda: self._park_rpc(kill, revive))
        for name in revive:
            self.parked_adapters.pop(name, None)
        self.parked_adapters.update(kill)
        return sizes

    def _park_rpc(self, kill: dict[str, LoRAAdapter], revive: list[str]) -> tuple[int, int]:
        req = pb.ParkRequest(session_id=self.session_id, unpark=revive, park=lora_wire.parked(kill))
        try:
            reply = self.stub.ParkAdapters(req, timeout=self.timeout, metadata=self.metadata())
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None
        return req.ByteSize(), reply.ByteSize()

    # -- steps ---------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, mask: torch.Tensor,
                adapters: dict[str, LoRAAdapter]) -> tuple[torch.Tensor, StepStats]:
        """Forward only: the final hidden state [B, T, H] (before the final norm), and the call's stats."""
        def attempt():
            stream = StepStream(self, self.step_rpcs["Forward"], 0, hidden, mask, adapters, False,
                                self.timeout).start()
            return stream.open(), stream.stats

        return self.with_retries("forward", attempt)

    def generate(self, hidden: torch.Tensor, mask: torch.Tensor, adapters: dict[str, LoRAAdapter],
                 next_embedding: Callable[[torch.Tensor], torch.Tensor | None]) -> StepStats:
        """Generation on the cloud's per-stream KV cache.

        After each pass `next_embedding` gets the final hidden state of the last
        position [B, 1, H] and returns the embedding of the chosen tokens
        [B, 1, H], or None to stop. Not retried: a half-done generation cannot
        be replayed without re-running the caller's sampling.
        """
        self._ensure_parked()

        def on_final(exchange, msg: pb.FinalHidden) -> bool:
            lead = (hidden.shape[0], 1)
            h = codec.decode(msg.hidden, name="final hidden state", shape=lead + (hidden.shape[2],),
                             dtypes=[self.wire.act]).float()
            nxt = next_embedding(h)
            if nxt is None:
                exchange.close_stream()
                return True
            exchange.lead = lead
            reply = pb.EdgeMessage()
            self.wire.put_act(reply.next_embedding.hidden, nxt)
            exchange.send(reply)
            return True

        # No overall deadline: the cloud bounds each token's wait instead.
        stream = StepStream(self, self.step_rpcs["Generate"], 0, hidden, mask, adapters, False, None).start()
        stream.run(on_final)
        return stream.stats

    # -- SplitLoRA ---------------------------------------------------------------
    def aggregate(self, round_: int, examples: int, adapters: dict[str, LoRAAdapter]) -> tuple[int, int, int]:
        """FedAvg: send this client's adapters, load the federation's average into them.

        Returns (clients averaged, bytes sent, bytes received).
        """
        req = pb.AggregateRequest(round=round_, examples=examples, adapters=lora_wire.adapter_weights(adapters))

        def attempt():
            req.session_id = self.session_id  # a retry may run on a re-opened session
            try:
                return self.stub.Aggregate(req, timeout=self.timeout, metadata=self.metadata())
            except grpc.RpcError as exc:
                raise rpc_error(exc) from None

        reply = self.with_retries(f"aggregation round {round_}", attempt)
        if {w.name for w in reply.adapters} != set(adapters):
            raise CloudError("the aggregation reply does not name this client's adapters")
        for w in reply.adapters:
            lora_wire.copy_into(adapters[w.name], w)
        return reply.clients, req.ByteSize(), reply.ByteSize()

    def server_adapters(self) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, int]:
        """The federation's server-side adapters: ({name: (A, B)}, scale, updates)."""
        def attempt():
            try:
                return self.stub.GetServerAdapters(pb.ServerAdaptersRequest(session_id=self.session_id),
                                                   timeout=self.timeout, metadata=self.metadata())
            except grpc.RpcError as exc:
                raise rpc_error(exc) from None

        reply = self.with_retries("reading the server-side adapters", attempt)
        out = {w.name: lora_wire.decode(w) for w in reply.adapters}
        return out, reply.scale, reply.updates

    def decode_cut_grad(self, msg: pb.CutGrad, shape) -> torch.Tensor:
        return codec.decode(msg.grad, name="gradient of the edge blocks' output", shape=tuple(shape),
                            dtypes=[self.wire.grad]).float()

    def open_step(self, step_id: int, hidden: torch.Tensor, mask: torch.Tensor, adapters: dict[str, LoRAAdapter],
                  train: bool, dropout: float = 0.0, seed: int = 0,
                  micro_batches: int = 1) -> StepStream | PipelinedStep:
        """A step whose stream stays open after the forward pass, for a backward that comes later
        (`StepStream.finish`); gradients are collected in the stream, not added to `.grad`. With
        `micro_batches` > 1 (and as many rows), the batch's parts run as that many streams at once.
        Not retried here: the caller replays a failed step (see remote_model)."""
        self._ensure_parked()
        rpc = self.step_rpcs["TrainStep" if train else "Forward"]
        bounds = row_bounds(len(hidden), micro_batches)
        if len(bounds) == 1:
            return StepStream(self, rpc, step_id, hidden, mask, adapters, train, self.timeout, accumulate=False,
                              dropout=dropout, seed=seed).start()
        streams = []
        try:
            for i, (a, b) in enumerate(bounds):
                streams.append(StepStream(self, rpc, step_id, hidden[a:b], mask[a:b], adapters, train, self.timeout,
                                          accumulate=False, dropout=dropout, seed=seed,
                                          part=(i, len(bounds), a, len(hidden))).start())
        except BaseException:
            for s in streams:
                s.abandon("the step could not start all its micro-batches")
            raise
        return PipelinedStep(streams, bounds)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.stub.CloseSession(pb.CloseSessionRequest(session_id=self.session_id), timeout=30,
                                   metadata=self.metadata())
        except grpc.RpcError as exc:
            log.warning("closing the session failed: %s", rpc_error(exc))
        finally:
            assert self.channel is not None  # set by _open in __init__
            self.channel.close()

    def __enter__(self) -> CloudSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
