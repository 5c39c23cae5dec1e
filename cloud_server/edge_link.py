"""One edge's side of a step on the cloud: its sites, the adapters applied here for it, and its message stream.

The link sends the edge each site's input, reads back its adapter outputs (or
their rank-r factors, which it multiplies out and keeps for the backward),
sends dL/dy (or the factors' gradients) in the backward pass and reads dL/dx;
it reads the edge's final-hidden gradient too. Time spent waiting on the edge
is counted, so a step's cloud seconds leave it out.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from common import lora_wire
from common import tensor_codec as codec
from common.site_types import SiteSpec
from common.tensor_codec import WireError
from common.wire import dlora_pb2 as pb
from common.wire_format import WireFormat, factor_grads, factor_output


class Receive(Protocol):
    """How a link waits for its edge's next message (edge_stream.EdgeStream.receive)."""

    def __call__(self, within: float | None = None) -> pb.EdgeMessage: ...


@dataclass
class EdgeLink:
    """One edge's side of a step: its sites, the adapters applied here for it, and its message stream."""

    sites: list[SiteSpec]
    receive: Receive
    send: Callable[[pb.CloudMessage], None]
    wire: WireFormat
    # Adapters the cloud applies itself, with no traffic: DLoRA's parked (killed) ones, frozen, or
    # SplitLoRA's server-side ones, trained here.
    applied_here: Mapping[str, nn.Module] = field(default_factory=dict)
    live: dict[int, list[int]] = field(default_factory=dict)  # site -> slots the edge computes
    # Pushes this edge's step deadline back (time a joint batch spent on other edges).
    credit: Callable[[float], None] | None = None
    within: float | None = None           # in a joint batch: the longest one exchange may take
    wait_seconds: float = 0.0
    error: BaseException | None = None    # set once the edge failed; it then gets no more traffic
    keep_factors: bool = False            # training: keep factorised outputs' factors for backward
    _site_of: dict[str, int] = field(default_factory=dict)
    _factors: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for site in self.sites:
            for m in site.modules:
                self._site_of[m.name] = site.index
        if not self.live:
            self.live = {s.index: [i for i, m in enumerate(s.modules) if m.name not in self.applied_here]
                         for s in self.sites}

    def live_site(self, group: tuple[str, ...]) -> int | None:
        """This edge's site for a group of linears sharing one input, if it computes any of them."""
        for name in group:
            site = self._site_of.get(name)
            if site is not None:
                return site if self.live.get(site) else None
        return None

    def live_names(self, site: int) -> list[str]:
        return [self.sites[site].modules[i].name for i in self.live[site]]

    def send_site_input(self, site: int, x: torch.Tensor) -> None:
        # Built in place: nesting a finished Tensor message would copy its megabytes once per level.
        msg = pb.CloudMessage()
        msg.site_input.site = site
        msg.site_input.live.extend(self.live[site])
        self.wire.put_act(msg.site_input.x, x)
        self.send(msg)

    def receive_site_outputs(self, site: int, x: torch.Tensor) -> list[torch.Tensor]:
        spec, live = self.sites[site], self.live[site]
        reply = self.expect("site_outputs").site_outputs
        if reply.site != site:
            raise WireError(f"site outputs for site {reply.site}, expected site {site}")
        lead = tuple(x.shape[:-1])
        if reply.factors:
            if reply.outputs:
                raise WireError(f"site {site}: both outputs and factors; send one or the other")
            return self._multiply_out(site, reply.factors, lead, x)
        if len(reply.outputs) != len(live):
            raise WireError(f"site {site}: {len(reply.outputs)} outputs for {len(live)} live modules")
        outs = []
        for slot, msg in zip(live, reply.outputs):
            mod = spec.modules[slot]
            t = codec.decode(msg, name=f"output of {mod.name}", shape=lead + (mod.out_features,),
                             dtypes=[self.wire.act])
            outs.append(t.to(device=x.device, dtype=x.dtype))
        return outs

    def _multiply_out(self, site: int, factors, lead: tuple[int, ...], x: torch.Tensor) -> list[torch.Tensor]:
        """Adapter outputs from their factors, y = down upᵀ (kept for backward when training)."""
        spec, live = self.sites[site], self.live[site]
        if not self.wire.factorised:
            raise WireError(f"site {site}: factors in a session that did not agree to a factorised exchange")
        if len(factors) != len(live):
            raise WireError(f"site {site}: {len(factors)} factor pairs for {len(live)} live modules")
        outs, kept = [], []
        for slot, f in zip(live, factors):
            mod = spec.modules[slot]
            codec.require(f.up, f"up factor of {mod.name}")
            rank = int(f.up.shape[-1]) if len(f.up.shape) == 2 else -1
            # A rank at or above out_features saves nothing; beyond it, only memory for a hostile peer.
            if not 1 <= rank < mod.out_features:
                raise WireError(f"up factor of {mod.name}: shape {codec.shape_text(f.up.shape)}; expected "
                                f"[{mod.out_features}, r] with 1 <= r < {mod.out_features}")
            up = codec.decode(f.up, name=f"up factor of {mod.name}", shape=(mod.out_features, rank),
                              dtypes=[lora_wire.WEIGHT_DTYPE])
            down = codec.decode(f.down, name=f"down factor of {mod.name}", shape=lead + (rank,),
                                dtypes=[self.wire.act]).float()
            up, down = up.to(x.device), down.to(x.device)
            outs.append(factor_output(down, up).to(dtype=x.dtype))
            kept.append((down, up))
        if self.keep_factors:
            self._factors[site] = kept
        return outs

    def zero_outputs(self, site: int, x: torch.Tensor) -> list[torch.Tensor]:
        lead = tuple(x.shape[:-1])
        return [x.new_zeros(lead + (self.sites[site].modules[i].out_features,)) for i in self.live[site]]

    def send_site_grads(self, site: int, grads: list[torch.Tensor], want_dx: bool) -> None:
        msg = pb.CloudMessage()
        msg.site_grad_outputs.site = site
        msg.site_grad_outputs.want_grad_input = want_dx
        factors = self._factors.pop(site, None)
        if factors is None:
            for g in grads:
                self.wire.put_grad(msg.site_grad_outputs.grad_outputs.add(), g)
        else:
            for g, (down, up) in zip(grads, factors):
                d_down, d_up = factor_grads(g, down, up)
                out = msg.site_grad_outputs.factor_grads.add()
                self.wire.put_grad(out.down, d_down)
                codec.encode_into(out.up, d_up, lora_wire.WEIGHT_DTYPE)
        self.send(msg)

    def receive_site_grad_input(self, site: int, x_shape: torch.Size, want_dx: bool) -> torch.Tensor | None:
        reply = self.expect("site_grad_input").site_grad_input
        if reply.site != site:
            raise WireError(f"grad input for site {reply.site}, expected site {site}")
        if not want_dx:
            return None
        return codec.decode(reply.grad_input, name=f"grad input of site {site}", shape=tuple(x_shape),
                            dtypes=[self.wire.grad])

    def final_grad(self, final: torch.Tensor) -> torch.Tensor:
        """The edge's dL/d(final hidden state) for `final` (this edge's rows), on its device and dtype."""
        msg = self.expect("final_grad")
        grad = codec.decode(msg.final_grad.grad, name="final hidden gradient", shape=tuple(final.shape),
                            dtypes=[self.wire.grad])
        return grad.to(device=final.device, dtype=final.dtype)

    def forget_factors(self) -> None:
        """Drop the factors kept for a backward that will not come (the step ended or failed)."""
        self._factors.clear()

    def take_error(self) -> BaseException | None:
        """The edge's failure, no longer held here: the exception's frames hold the
        step's graph, whose nodes hold this link, a cycle the collector cannot see."""
        err, self.error = self.error, None
        return err

    def expect(self, kind: str) -> pb.EdgeMessage:
        t0 = time.perf_counter()
        try:
            msg = self.receive(within=self.within) if self.within is not None else self.receive()
        finally:
            self.wait_seconds += time.perf_counter() - t0
        got = msg.WhichOneof("kind")
        if got != kind:
            raise WireError(f"expected a {kind} message from the edge, got {got or 'an empty message'}")
        return msg
