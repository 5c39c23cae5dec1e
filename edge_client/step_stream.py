"""One step's bidirectional stream with the cloud, held open from forward to backward.

The edge sends the step's start (the first hidden state and the mask), then
answers the cloud: adapter outputs at each site in the forward pass, the
gradient of the final hidden state, and dL/dx for each site's output gradients
in the backward pass. The stream can stop after the final hidden state and
resume when the caller's loss is backpropagated (`open`, then `finish`), or
be abandoned, which frees the step on the cloud and keeps the session.
"""
from __future__ import annotations

import enum
import logging
import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import torch

from common import lora_wire
from common import tensor_codec as codec
from common.lora import LoRAAdapter
from common.tensor_codec import WireError
from common.wire import dlora_pb2 as pb
from edge_client.errors import CloudError, rpc_error, step_failed

if TYPE_CHECKING:  # session.py imports this module
    from edge_client.session import CloudSession

log = logging.getLogger(__name__)


class StepState(enum.Enum):
    """Where a step's stream is: OPEN -> (PAUSED, between forward and backward) -> DONE | FAILED | ABANDONED."""

    OPEN = "open"             # in the forward pass, or answering the backward
    PAUSED = "paused"         # a training step after its final hidden state, waiting for `finish`
    DONE = "done"             # the cloud's end message arrived
    FAILED = "failed"         # the call broke, or the cloud failed the step
    ABANDONED = "abandoned"   # given up by the edge; the cloud frees it

    @property
    def ended(self) -> bool:
        return self in (StepState.DONE, StepState.FAILED, StepState.ABANDONED)


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


class StepStream:
    """One TrainStep, Forward or Generate call: `run` it whole, or `open` it and `finish` it later.

    `session` gives the stream its session id, sites, parked set, wire dtype and
    message limit. With `accumulate` False, adapter gradients are not added to
    `.grad` but collected in `grads` (by parameter), for an autograd Function to
    hand back. `dropout` drops site inputs before the adapters (PEFT's
    lora_dropout), with masks drawn from `seed` so a replayed step draws the same.
    `part` (index, parts, first row, the whole step's rows): this stream is one
    micro-batch of a pipelined step (pipelined_step.py), its rows [first row, ...)
    of the step's batch, whose dropout masks it draws as the whole batch would.
    """

    def __init__(self, session, rpc, step_id: int, hidden: torch.Tensor, mask: torch.Tensor,
                 adapters: dict[str, LoRAAdapter], train: bool, timeout: float | None, *,
                 accumulate: bool = True, dropout: float = 0.0, seed: int = 0,
                 part: tuple[int, int, int, int] | None = None) -> None:
        self.session = session
        self.step_id = step_id
        self.stats = StepStats()
        self.shape = tuple(hidden.shape)
        self.lead = self.shape[:2]
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        rows = (part[2], part[3]) if part is not None else (0, self.shape[0])
        self.exchange = _EdgeExchange(session, adapters, self.send, self.stats, train, self.lead,
                                      close_stream=self.close_requests, accumulate=accumulate, dropout=dropout,
                                      seed=seed * 1_000_003 + step_id, rows=rows)
        self.state = StepState.OPEN
        self.cut_grad: torch.Tensor | None = None
        self._first = pb.EdgeMessage()
        self._first.start.session_id, self._first.start.step_id = session.session_id, step_id
        if part is not None:
            self._first.start.micro_batch, self._first.start.micro_batches = part[0], part[1]
        session.wire.put_act(self._first.start.hidden, hidden.detach())
        codec.encode_into(self._first.start.attention_mask, mask.bool())
        self._call = (rpc, timeout)
        self._responses: Any = None

    def start(self) -> StepStream:
        """Send the step's start and open the call: the stream's first I/O, kept out of the constructor."""
        if self._responses is not None or self.state is not StepState.OPEN:
            raise RuntimeError(f"step {self.step_id}'s stream is already started")
        rpc, timeout = self._call
        self.send(self._first)
        self._responses = rpc(self._requests(), timeout=timeout, metadata=self.session.metadata())
        return self

    @property
    def grads(self) -> dict[int, torch.Tensor]:
        """With `accumulate` False: id(parameter) -> its gradient from this step."""
        return self.exchange.grads

    def expect_cut_grad(self, shape: tuple[int, ...]) -> None:
        """DLoRA with edge layers: keep dL/d(the start's hidden state), of `shape`, in `cut_grad` when the cloud
        sends it in the backward pass."""
        def keep(msg: pb.CutGrad) -> None:
            self.cut_grad = self.session.decode_cut_grad(msg, shape)

        self.cut_grad = None
        self.exchange.on_cut_grad = keep

    # -- the request side ----------------------------------------------------
    def send(self, msg: pb.EdgeMessage) -> None:
        raw = msg.SerializeToString()
        limit = self.session.limits.max_message_bytes
        if len(raw) > limit:
            raise WireError(f"a {len(raw)}-byte message exceeds the server's limit of {limit} bytes; use a "
                            "smaller batch or sequence")
        self.stats.bytes_sent += len(raw)
        self.stats.messages += 1
        self._outbox.put(raw)

    def close_requests(self) -> None:
        self._outbox.put(None)

    def _requests(self) -> Iterator[bytes]:
        while (raw := self._outbox.get()) is not None:
            yield raw

    # -- the reply side ------------------------------------------------------
    def run(self, on_final: Callable[[_EdgeExchange, pb.FinalHidden], object]):
        """The whole call: `on_final` handles the final hidden state; its result is returned."""
        result = self._pump(on_final)
        if result is _NO_FINAL:
            raise CloudError("the cloud ended the step without sending the final hidden state")
        return result

    def open(self) -> torch.Tensor:
        """Run the forward pass: the final hidden state [B, T, H] (before the final norm), fp32.

        A training stream then waits, open, for `finish` (or `abandon`)."""
        msg = self._pump(None, stop_at_final=True)
        if msg is _NO_FINAL:
            raise CloudError("the cloud ended the step without sending the final hidden state")
        hidden = codec.decode(msg.hidden, name="final hidden state", shape=self.shape,
                              dtypes=[self.session.wire.act]).float()
        if not self.exchange.train:
            self._pump(None)  # a forward-only call ends right after it
        return hidden

    def finish(self, grad: torch.Tensor) -> None:
        """Send dL/d(final hidden) and answer the cloud's backward until the step ends."""
        if self.state is not StepState.PAUSED:
            raise RuntimeError(f"step {self.step_id} is {self.state.value}; only an opened training step can "
                               "finish")
        self.state = StepState.OPEN
        reply = pb.EdgeMessage()
        self.session.wire.put_grad(reply.final_grad.grad, grad.detach())
        self.send(reply)
        self._pump(None)

    def abandon(self, reason: str) -> None:
        """Give the step up: the cloud frees it and keeps the session. Safe from any thread."""
        if self.state.ended:
            return
        self.state = StepState.ABANDONED
        msg = pb.EdgeMessage()
        msg.abandon.reason = reason[:200]
        self._outbox.put(msg.SerializeToString())
        self.close_requests()

    def drain(self) -> None:
        """After `abandon`: read the call to its end, so the cloud has freed the step when this returns."""
        if self._responses is None:   # never started (the cloud never heard of it), or read to its end
            return
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                log.warning("abandoning step %d: %s", self.step_id, rpc_error(exc))
        finally:
            self._responses = None

    def _pump(self, on_final, stop_at_final: bool = False):
        if self._responses is None:
            raise RuntimeError(f"step {self.step_id}'s stream was never started (StepStream.start)")
        result = _NO_FINAL
        try:
            for size, msg in self._responses:
                self.stats.bytes_received += size
                self.stats.messages += 1
                kind = msg.WhichOneof("kind")
                if kind == "site_input":
                    self.exchange.forward(msg.site_input)
                elif kind == "final_hidden":
                    if stop_at_final:
                        self.state = StepState.PAUSED if self.exchange.train else StepState.OPEN
                        return msg.final_hidden
                    result = on_final(self.exchange, msg.final_hidden)
                elif kind == "site_grad_outputs":
                    self.exchange.backward(msg.site_grad_outputs)
                elif kind == "cut_grad":
                    self.exchange.on_cut_grad(msg.cut_grad)
                elif kind == "failed":
                    raise step_failed(msg.failed)
                elif kind == "end":
                    self.stats.cloud_seconds = msg.end.cloud_seconds
                    self.stats.batch_sessions = msg.end.batch_sessions or 1
                    self.state = StepState.DONE
                    return result
                else:
                    raise WireError(f"unexpected message {kind!r} from the cloud")
        except grpc.RpcError as exc:
            self.state = StepState.FAILED
            raise rpc_error(exc) from None
        except BaseException:
            self.state = StepState.FAILED
            if self._responses is not None:
                self._responses.cancel()
            raise
        finally:
            if self.state is not StepState.PAUSED:
                self.close_requests()
            if self.state in (StepState.DONE, StepState.FAILED):
                # Let go of the gRPC call here, where it ended. Left to the cyclic garbage collector (the
                # stream and its exchange refer to each other), its __del__ runs wherever a collection
                # happens to start, and inside gRPC's own locked code (opening the next call) it deadlocks
                # on the call's condition: an edge hung for good, found by `make soak`.
                self._responses = None
        self.state = StepState.FAILED
        raise CloudError(f"the cloud ended step {self.step_id} before its end message")


_NO_FINAL = object()


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
    accumulate: bool = True           # add adapter gradients to .grad; else collect them in `grads`
    dropout: float = 0.0
    seed: int = 0
    rows: tuple[int, int] = (0, 0)    # this stream's first row in its step's batch, and that batch's rows
    grads: dict[int, torch.Tensor] = field(default_factory=dict)    # id(parameter) -> its gradient
    # site -> (its input, what was sent: outputs or down factors, the modules, whether factorised)
    saved: dict[int, tuple[torch.Tensor, list[torch.Tensor], list[LoRAAdapter], bool]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.on_cut_grad is None:
            self.on_cut_grad = _unexpected_cut_grad

    def _site(self, index: int):
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
        wire = self.session.wire
        x = codec.decode(msg.x, name=f"input of site {msg.site}", dtypes=[wire.act],
                         shape=self.lead + (site.modules[0].in_features,))
        x = x.float()
        mods = [self.adapters[site.modules[i].name] for i in live]
        tokens = x.numel() // x.shape[-1]
        factorised = bool(mods) and wire.factors_pay(tokens, mods[0].rank, [m.out_features for m in mods])
        with torch.set_grad_enabled(self.train):
            if self.train:
                x.requires_grad_(True)
            # Factorised: scale * A x only; the cloud multiplies by B (sent alongside).
            ys = [m.down(self._drop(x, msg.site, k)) if factorised else m(self._drop(x, msg.site, k))
                  for k, m in enumerate(mods)]
        if self.train:
            self.saved[msg.site] = (x, ys, mods, factorised)
        self.stats.sites += 1
        self.stats.edge_flops += sum(m.flops(tokens, down_only=factorised) for m in mods)
        # Built in place: a finished Tensor put into a message is copied again.
        reply = pb.EdgeMessage()
        reply.site_outputs.site = msg.site
        for y, m in zip(ys, mods):
            if factorised:
                pair = reply.site_outputs.factors.add()
                wire.put_act(pair.down, y)
                codec.encode_into(pair.up, m.lora_B, lora_wire.WEIGHT_DTYPE)
            else:
                wire.put_act(reply.site_outputs.outputs.add(), y)
        self.send(reply)

    def _drop(self, x: torch.Tensor, site: int, k: int) -> torch.Tensor:
        """LoRA dropout on one module's copy of the site input (training only); the mask is
        a function of (seed, step, site, module), so a replayed step draws the same one."""
        if not self.train or self.dropout == 0.0:
            return x
        keep = 1.0 - self.dropout
        gen = torch.Generator().manual_seed((self.seed * 65_537 + site) * 257 + k)
        # Drawn for the whole step's batch: a micro-batch takes its rows of the same mask.
        first, total = self.rows
        mask = torch.empty((max(total, len(x)),) + tuple(x.shape[1:]), dtype=x.dtype).bernoulli_(keep, generator=gen)
        return x * mask[first:first + len(x)] / keep

    def backward(self, msg: pb.SiteGradOutputs) -> None:
        if msg.site not in self.saved:
            raise WireError(f"gradients for site {msg.site}, which had no forward in this step")
        x, ys, mods, factorised = self.saved.pop(msg.site)
        grads, b_grads = self._output_grads(msg, ys, mods, factorised)
        # Factorised: B's gradient came from the cloud; autograd gives A's (and dL/dx) through A x.
        params = [p for m in mods for p in ((m.lora_A,) if factorised else (m.lora_A, m.lora_B))]
        # Backward costs about twice the forward; dL/dx only where the cloud needs it.
        tokens = x.numel() // x.shape[-1]
        self.stats.edge_flops += 2 * sum(m.flops(tokens, down_only=factorised) for m in mods)
        inputs = params + ([x] if msg.want_grad_input else [])
        if self.accumulate:
            torch.autograd.backward(ys, grads, inputs=inputs)
            for m, g in zip(mods, b_grads):
                m.lora_B.grad = g if m.lora_B.grad is None else m.lora_B.grad + g
            grad_x = x.grad
        else:
            got = torch.autograd.grad(ys, inputs, grads)
            for p, g in [*zip(params, got), *((m.lora_B, g) for m, g in zip(mods, b_grads))]:
                self.grads[id(p)] = self.grads[id(p)] + g if id(p) in self.grads else g
            grad_x = got[-1] if msg.want_grad_input else None
        reply = pb.EdgeMessage()
        reply.site_grad_input.SetInParent()  # the kind is set even for site 0 without dL/dx
        reply.site_grad_input.site = msg.site
        if msg.want_grad_input:
            assert grad_x is not None  # x was among the inputs differentiated, and the outputs depend on it
            self.session.wire.put_grad(reply.site_grad_input.grad_input, grad_x)
        self.send(reply)

    def _output_grads(self, msg: pb.SiteGradOutputs, ys: list[torch.Tensor], mods: list[LoRAAdapter],
                      factorised: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The gradients of what this edge sent at a site (outputs, or down factors), and
        for factors also dL/dB of each module, as the cloud computed them."""
        wire, site = self.session.wire, msg.site
        sent = msg.factor_grads if factorised else msg.grad_outputs
        if len(sent) != len(ys) or (msg.grad_outputs if factorised else msg.factor_grads):
            what = "factor gradients" if factorised else "output gradients"
            raise WireError(f"site {site}: expected {len(ys)} {what}, got {len(msg.grad_outputs)} output and "
                            f"{len(msg.factor_grads)} factor gradients")
        if not factorised:
            return [codec.decode(g, name=f"output gradient at site {site}", shape=tuple(y.shape),
                                 dtypes=[wire.grad]).float() for g, y in zip(sent, ys)], []
        downs = [codec.decode(g.down, name=f"down-factor gradient at site {site}", shape=tuple(y.shape),
                              dtypes=[wire.grad]).float() for g, y in zip(sent, ys)]
        ups = [codec.decode(g.up, name=f"up-factor gradient at site {site}", shape=tuple(m.lora_B.shape),
                            dtypes=[lora_wire.WEIGHT_DTYPE]) for g, m in zip(sent, mods)]
        return downs, ups
