"""One remote step on the cloud: frozen blocks locally, live adapters on the edge.

Each target linear of the served model is wrapped in a `SiteTap`. Outside a
step it is the plain frozen linear. Inside a step (a thread-local `StepRunner`
is active) the first tap of a site ships the site input to the edge, receives
the outputs of every live module there, and each tap adds its module's output
to the frozen projection. `_RemoteSite` is the autograd node for that exchange:
its backward ships dL/dy to the edge and returns the edge's dL/dx.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from common import tensor_codec as codec
from common.tensor_codec import WireError
from common.wire import dlora_pb2 as pb
from cloud_server.sites import SiteSpec

_active = threading.local()


class StepAborted(Exception):
    """The edge closed the stream or broke the protocol; the message says how."""


class SiteTap(nn.Module):
    """A frozen target linear that adds a remote adapter's output during a step."""

    def __init__(self, base: nn.Module, name: str) -> None:
        super().__init__()
        self.base = base
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        runner: StepRunner | None = getattr(_active, "runner", None)
        if runner is None:
            return y
        delta = runner.adapter_output(self.name, x)
        return y if delta is None else y + delta


def install_taps(model: nn.Module, names: list[str]) -> None:
    """Wrap each named linear of `model` in a SiteTap, in place (idempotent)."""
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        mod = getattr(parent, leaf)
        if not isinstance(mod, SiteTap):
            setattr(parent, leaf, SiteTap(mod, name))


@contextmanager
def active(runner: "StepRunner") -> Iterator[None]:
    _active.runner = runner
    try:
        yield
    finally:
        _active.runner = None


class _RemoteSite(torch.autograd.Function):
    """Autograd node of one site exchange. Inputs: x, an anchor that requires grad."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, anchor: torch.Tensor, runner: "StepRunner", site: int):  # type: ignore[override]
        ctx.runner, ctx.site = runner, site
        return tuple(runner.exchange_forward(site, x))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        want_dx = bool(ctx.needs_input_grad[0])
        dx = ctx.runner.exchange_backward(ctx.site, list(grads), want_dx)
        return dx, None, None, None


@dataclass
class _SiteCache:
    x: torch.Tensor
    outputs: dict[str, torch.Tensor]


@dataclass
class StepRunner:
    """Drives one step's message exchange with the edge (one per step, one thread)."""

    sites: list[SiteSpec]
    receive: Callable[[], pb.EdgeMessage]
    send: Callable[[pb.CloudMessage], None]
    wire_dtype: torch.dtype
    train: bool
    # Killed modules' adapters, applied here, frozen, with no traffic.
    parked: dict[str, nn.Module] = field(default_factory=dict)
    live: dict[int, list[int]] = field(default_factory=dict)  # site -> slots the edge computes
    _by_module: dict[str, int] = field(default_factory=dict)
    _cache: dict[int, _SiteCache] = field(default_factory=dict)
    _anchor: torch.Tensor | None = None
    wait_seconds: float = 0.0

    def __post_init__(self) -> None:
        for site in self.sites:
            for m in site.modules:
                self._by_module[m.name] = site.index
        if not self.live:
            self.live = {s.index: [i for i, m in enumerate(s.modules) if m.name not in self.parked]
                         for s in self.sites}

    # -- forward -----------------------------------------------------------
    def adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        parked = self.parked.get(name)
        if parked is not None:
            # Frozen, but still part of the graph: dL/dx flows through it.
            return parked(x)
        site = self._by_module.get(name)
        if site is None or not self.live.get(site):
            return None
        cached = self._cache.get(site)
        if cached is None or cached.x is not x:
            cached = self._run_site(site, x)
        return cached.outputs.get(name)

    def _run_site(self, site: int, x: torch.Tensor) -> _SiteCache:
        names = [self.sites[site].modules[i].name for i in self.live[site]]
        if self.train and torch.is_grad_enabled():
            if self._anchor is None:
                # Makes every adapter output require grad even where x does
                # not (the first block), so backward reaches every site.
                self._anchor = torch.zeros((), requires_grad=True)
            outs = _RemoteSite.apply(x, self._anchor, self, site)
        else:
            outs = self.exchange_forward(site, x)
        cache = _SiteCache(x=x, outputs=dict(zip(names, outs)))
        self._cache[site] = cache
        return cache

    def exchange_forward(self, site: int, x: torch.Tensor) -> list[torch.Tensor]:
        spec = self.sites[site]
        live = self.live[site]
        self.send(pb.CloudMessage(site_input=pb.SiteInput(
            site=site, x=codec.encode(x, self.wire_dtype), live=live)))
        reply = self._expect("site_outputs").site_outputs
        if reply.site != site:
            raise WireError(f"site outputs for site {reply.site}, expected site {site}")
        if len(reply.outputs) != len(live):
            raise WireError(f"site {site}: {len(reply.outputs)} outputs for {len(live)} live modules")
        lead = tuple(x.shape[:-1])
        outs = []
        for slot, msg in zip(live, reply.outputs):
            mod = spec.modules[slot]
            t = codec.decode(msg, name=f"output of {mod.name}", shape=lead + (mod.out_features,),
                             dtypes=[self.wire_dtype])
            outs.append(t.to(device=x.device, dtype=x.dtype))
        return outs

    # -- backward ----------------------------------------------------------
    def exchange_backward(self, site: int, grads: list[torch.Tensor], want_dx: bool) -> torch.Tensor | None:
        x = self._cache[site].x
        self.send(pb.CloudMessage(site_grad_outputs=pb.SiteGradOutputs(
            site=site, grad_outputs=[codec.encode(g, self.wire_dtype) for g in grads],
            want_grad_input=want_dx)))
        reply = self._expect("site_grad_input").site_grad_input
        if reply.site != site:
            raise WireError(f"grad input for site {reply.site}, expected site {site}")
        if not want_dx:
            return None
        dx = codec.decode(reply.grad_input, name=f"grad input of site {site}", shape=tuple(x.shape),
                          dtypes=[self.wire_dtype])
        return dx.to(device=x.device, dtype=x.dtype)

    def release(self) -> None:
        """Drop the step's tensors. The cache holds outputs whose autograd node
        refers back to this runner; left alone, that cycle keeps a whole step's
        activations alive after the step."""
        self._cache.clear()
        self._anchor = None

    # -- messages ----------------------------------------------------------
    def _expect(self, kind: str) -> pb.EdgeMessage:
        t0 = time.perf_counter()
        try:
            msg = self.receive()
        finally:
            self.wait_seconds += time.perf_counter() - t0
        got = msg.WhichOneof("kind")
        if got != kind:
            raise WireError(f"expected a {kind} message from the edge, got {got or 'an empty message'}")
        return msg

    def expect(self, kind: str) -> pb.EdgeMessage:
        return self._expect(kind)
