"""One remote step on the cloud: frozen blocks locally, live adapters on the edges.

Each target linear of the served model is wrapped in a `SiteTap`. Outside a
step it is the plain frozen linear. Inside a step (a thread-local `StepRunner`
is active) the first tap of a site ships the site input to the edge, receives
the outputs of every live module there, and each tap adds its module's output
to the frozen projection. `_RemoteSites` is the autograd node for that
exchange: its backward ships dL/dy to the edge and returns the edge's dL/dx.
In a factorised session the edge may answer with each output's rank-r
factors instead; the link multiplies them out, keeps them, and in the
backward pass sends their gradients instead of dL/dy (common/wire_format.py).

A step may carry several edges at once (cross-session batching, see
batching.py): their batches are stacked into one, the frozen blocks run once,
and at each site every edge gets its own rows. All edges are sent their
inputs before any reply is awaited, so a site costs the slowest edge's round
trip, not the sum. An edge that fails mid-step is dropped from the rest of the
step (its rows get no adapter output); the others finish normally.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from common import lora_wire
from common import tensor_codec as codec
from common.model_parts import UnsupportedModel
from common.site_types import SiteSpec
from common.tensor_codec import WireError
from common.wire import dlora_pb2 as pb
from common.wire_format import WireFormat, factor_grads, factor_output

_active = threading.local()


class Receive(Protocol):
    """How a link waits for its edge's next message (edge_stream.EdgeStream.receive)."""

    def __call__(self, within: float | None = None) -> pb.EdgeMessage: ...


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
        # Under a device map the base linear's hook may compute y on another device than x's.
        return y if delta is None else y + delta.to(y.device)


def install_taps(model: nn.Module, names: list[str]) -> None:
    """Wrap each named linear of `model` in a SiteTap, in place (idempotent)."""
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        mod = getattr(parent, leaf)
        if not isinstance(mod, SiteTap):
            setattr(parent, leaf, SiteTap(mod, name))


@contextmanager
def active(runner: StepRunner) -> Iterator[None]:
    _active.runner = runner
    try:
        yield
    finally:
        _active.runner = None


@dataclass
class EdgeLink:
    """One edge's side of a step: its sites, its parked adapters and its message stream."""

    sites: list[SiteSpec]
    receive: Receive
    send: Callable[[pb.CloudMessage], None]
    wire: WireFormat
    # Killed modules' adapters, applied here, frozen, with no traffic.
    parked: Mapping[str, nn.Module] = field(default_factory=dict)
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
            self.live = {s.index: [i for i, m in enumerate(s.modules) if m.name not in self.parked]
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


class _RemoteSites(torch.autograd.Function):
    """Autograd node of one site exchange with one or more edges.

    Inputs: an anchor that requires grad, the runner, the (edge, site) pairs
    and each pair's input rows. Outputs: every live module's output, edge by edge.
    """

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, runner: StepRunner, remote: list[tuple[int, int]],
                *xs: torch.Tensor):
        ctx.runner, ctx.remote = runner, remote
        ctx.shapes = [x.shape for x in xs]
        outs = runner.exchange_forward(remote, list(xs))
        ctx.counts = [len(o) for o in outs]
        return tuple(t for o in outs for t in o)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        per_edge, at = [], 0
        for n in ctx.counts:
            per_edge.append(list(grads[at:at + n]))
            at += n
        want = [bool(ctx.needs_input_grad[3 + j]) for j in range(len(ctx.remote))]
        dxs = ctx.runner.exchange_backward(ctx.remote, per_edge, want, ctx.shapes)
        return (None, None, None, *dxs)


@dataclass
class _GroupCache:
    x: torch.Tensor
    xs: list[torch.Tensor]                       # each edge's rows of x
    remote: dict[int, dict[str, torch.Tensor]]   # edge -> live module -> output
    batched: torch.Tensor                        # x as [B, T, in], however the family shaped it
    pending: set[str] = field(default_factory=set)  # the group's linears that have not run yet


class StepRunner:
    """The taps' view of one step: the joint batch of one or more edges.

    Edge i owns rows `rows[i]` of the joint batch and the first `lengths[i]`
    positions (shorter sequences are padded at the end, which no real
    position attends to under the causal mask).
    """

    def __init__(self, links: list[EdgeLink], train: bool, groups: dict[str, tuple[str, ...]],
                 batch_sizes: list[int] | None = None, lengths: list[int] | None = None,
                 lag_timeout: float | None = None) -> None:
        self.links = links
        for link in links:
            # Alone, an edge has its whole step deadline; batched, it must keep up with the others.
            link.within = lag_timeout if len(links) > 1 else None
            link.keep_factors = train
        self.train = train
        self.groups = groups                 # linear name -> the names sharing its input
        sizes = batch_sizes or [0] * len(links)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.rows = [slice(s, s + b) for s, b in zip(starts, sizes)]
        self.lengths = lengths or [0] * len(links)
        # One entry per group of linears sharing an input, until all of them ran. Not
        # just the last group: Falcon's parallel block feeds one tensor to the
        # attention's query_key_value and the MLP's dense_h_to_4h, with the attention's
        # dense running in between, and a site must be exchanged once per step.
        self._caches: dict[tuple[str, ...], _GroupCache] = {}
        # (rows, positions) of the joint batch in the current pass; ServedModel sets it.
        self.batch_shape: tuple[int, int] | None = None
        self._anchor: torch.Tensor | None = None

    @property
    def alone(self) -> bool:
        return len(self.links) == 1

    def part(self, i: int, t: torch.Tensor) -> torch.Tensor:
        """Edge i's rows and positions of a joint tensor [B, T, ...]."""
        if self.alone:
            return t
        return t[self.rows[i], :self.lengths[i]]

    def joint(self, pieces: list[torch.Tensor | None], like: torch.Tensor, width: int) -> torch.Tensor:
        """Stack per-edge tensors back into the joint batch (zeros where an edge has none)."""
        if self.alone and pieces[0] is not None:
            return pieces[0]
        full = [like.new_zeros(r.stop - r.start, like.shape[1], width) if p is None else
                torch.nn.functional.pad(p, (0, 0, 0, like.shape[1] - p.shape[1]))
                for p, r in zip(pieces, self.rows)]
        return torch.cat(full)

    # -- forward -----------------------------------------------------------
    def adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        group = self.groups.get(name, (name,))
        cache = self._caches.get(group)
        if cache is None or cache.x is not x:
            cache = self._run_group(group, x)
        cache.pending.discard(name)
        if not cache.pending:
            del self._caches[group]  # every linear of the group has its output: free it
        pieces: list[torch.Tensor | None] = []
        width = 0
        for i, link in enumerate(self.links):
            piece = cache.remote.get(i, {}).get(name)
            parked = link.parked.get(name)
            if piece is None and parked is not None and link.error is None:
                # Frozen, but still part of the graph: dL/dx flows through it. It sits on the
                # served model's first device; under a device map, this block may be elsewhere.
                at = next(parked.parameters()).device
                piece = parked(cache.xs[i].to(at)).to(x.device)
            if piece is not None:
                width = piece.shape[-1]
            pieces.append(piece)
        if width == 0:
            return None
        return self.joint(pieces, cache.batched, width).reshape(*x.shape[:-1], width)

    def as_batch(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as [B, T, in]. Some families flatten the positions before a linear
        (OPT's MLP runs on [B*T, H]); edges always see [B, T, in]."""
        if x.dim() == 3 or self.batch_shape is None:
            return x
        rows, positions = self.batch_shape
        if x.dim() != 2 or x.shape[0] != rows * positions:
            raise UnsupportedModel(f"a target linear got input of shape {list(x.shape)}, not one row per token of "
                                   f"the [{rows}, {positions}] batch; it cannot be adapted remotely")
        return x.reshape(rows, positions, x.shape[-1])

    def _run_group(self, group: tuple[str, ...], x: torch.Tensor) -> _GroupCache:
        batched = self.as_batch(x)
        xs = [self.part(i, batched) for i in range(len(self.links))]
        remote = [(i, site) for i, link in enumerate(self.links)
                  if link.error is None and (site := link.live_site(group)) is not None]
        outs: dict[int, dict[str, torch.Tensor]] = {}
        if remote:
            rx = [xs[i] for i, _ in remote]
            if self.train and torch.is_grad_enabled():
                if self._anchor is None:
                    # Makes every adapter output require grad even where x does
                    # not (the first block), so backward reaches every site.
                    self._anchor = torch.zeros((), requires_grad=True)
                flat = list(_RemoteSites.apply(self._anchor, self, remote, *rx))
            else:
                flat = [t for o in self.exchange_forward(remote, rx) for t in o]
            for i, site in remote:
                names = self.links[i].live_names(site)
                outs[i] = dict(zip(names, flat[:len(names)]))
                flat = flat[len(names):]
        self._caches[group] = _GroupCache(x=x, xs=xs, remote=outs, batched=batched, pending=set(group))
        return self._caches[group]

    def exchange_forward(self, remote: list[tuple[int, int]], xs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Send every edge its site input, then collect the replies."""
        for (i, site), x in zip(remote, xs):
            self.guard(i, self.links[i].send_site_input, site, x)
        got = self.collect([i for i, _ in remote],
                           lambda k: self.links[remote[k][0]].receive_site_outputs(remote[k][1], xs[k]))
        outs = [g if g is not None else self.links[i].zero_outputs(site, x)
                for g, (i, site), x in zip(got, remote, xs)]
        self.raise_if_all_failed()
        return outs

    # -- backward ----------------------------------------------------------
    def exchange_backward(self, remote: list[tuple[int, int]], grads: list[list[torch.Tensor]],
                          want: list[bool], shapes: list[torch.Size]) -> list[torch.Tensor | None]:
        for (i, site), g, w in zip(remote, grads, want):
            self.guard(i, self.links[i].send_site_grads, site, g, w)
        got = self.collect([i for i, _ in remote],
                           lambda k: self.links[remote[k][0]].receive_site_grad_input(remote[k][1], shapes[k], want[k]))
        dxs: list[torch.Tensor | None] = []
        for dx, g, w, shape in zip(got, grads, want, shapes):
            if dx is None and w:
                dx = g[0].new_zeros(shape)
            dxs.append(None if dx is None else dx.to(device=g[0].device, dtype=g[0].dtype))
        self.raise_if_all_failed()
        return dxs

    def collect(self, members: list[int], fn: Callable[[int], object]) -> list:
        """fn(k) for the k-th of `members`, in turn, each guarded. The time spent
        blocked on one edge is credited to the deadlines of those still to come:
        a slow edge must not make the others in its batch run out of time."""
        results = []
        for k, i in enumerate(members):
            t0 = time.perf_counter()
            results.append(self.guard(i, fn, k))
            if not self.alone:
                waited = time.perf_counter() - t0
                for j in members[k + 1:]:
                    credit = self.links[j].credit
                    if credit is not None:
                        credit(waited)
        return results

    # -- failures ----------------------------------------------------------
    def guard(self, i: int, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) as edge i's part; a failure drops that edge from the step, not the others."""
        link = self.links[i]
        if link.error is not None:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported to that edge at the end of the step
            link.error = exc
            return None

    def raise_if_all_failed(self) -> None:
        first = self.links[0].error
        if first is not None and all(link.error is not None for link in self.links):
            raise first

    def release(self) -> None:
        """Drop the step's tensors. The cache holds outputs whose autograd node
        refers back to this runner; left alone, that cycle keeps a whole step's
        activations alive after the step."""
        self._caches.clear()
        self._anchor = None
        for link in self.links:
            link.forget_factors()
