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

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cloud_server.edge_link import EdgeLink
from common.model_parts import UnsupportedModel


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
            here = link.applied_here.get(name)
            if piece is None and here is not None and link.error is None:
                # Frozen, but still part of the graph: dL/dx flows through it. It sits on the
                # served model's first device; under a device map, this block may be elsewhere.
                at = next(here.parameters()).device
                piece = here(cache.xs[i].to(at)).to(x.device)
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
