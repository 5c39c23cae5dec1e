"""SplitLoRA federations: server-side adapters shared by a group of clients, and FedAvg.

Clients that open a SplitLoRA session with the same federation name share one
set of server-side adapters on the blocks after the cut; the cloud trains them
with AdamW, one client step at a time. Every `I` steps each client sends its
client-side adapters and example count; once every expected client of the
round has sent them, all get back the example-weighted average (FedAvg).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from common.lora import LoRAAdapter
from cloud_server.sites import SiteSpec

log = logging.getLogger(__name__)


class FederationMismatch(ValueError):
    """A client asked to join a federation with different settings, or is out of step with it."""


class FederationClosed(Exception):
    """The server is shutting down while a client waits for a round."""


@dataclass(frozen=True)
class SplitSettings:
    cut_layer: int
    clients: int
    rank: int
    alpha: float
    lr: float
    seed: int
    targets: tuple[str, ...]


@dataclass
class _Round:
    number: int
    submissions: dict[str, tuple[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = field(default_factory=dict)
    result: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    averaged: int = 0


class Federation:
    def __init__(self, name: str, settings: SplitSettings, server_sites: list[SiteSpec],
                 device: torch.device, dtype: torch.dtype) -> None:
        self.name = name
        self.settings = settings
        self.server_sites = server_sites
        gen = torch.Generator().manual_seed(settings.seed)
        self.adapters: dict[str, LoRAAdapter] = {}
        for site in server_sites:
            for m in site.modules:
                ad = LoRAAdapter(m.in_features, m.out_features, settings.rank, settings.alpha / settings.rank)
                with torch.no_grad():  # PEFT's init (Kaiming-uniform A, B = 0), from the federation's seed
                    bound = 1.0 / m.in_features ** 0.5
                    ad.lora_A.copy_(torch.rand(ad.lora_A.shape, generator=gen) * 2 * bound - bound)
                # fp32 whatever the served dtype: AdamW's eps underflows in fp16.
                self.adapters[m.name] = ad.to(device=device)
        self.applied = {n: _Fp32(a) for n, a in self.adapters.items()}
        params = [p for a in self.adapters.values() for p in a.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
        self.updates = 0
        # One server-side step at a time: the adapters are shared.
        self.lock = threading.Lock()
        self.members: set[str] = set()
        self._rounds: dict[int, _Round] = {}
        self._done = 0                      # last round that was averaged
        self._cancelled = False
        self._cond = threading.Condition()

    # -- server-side training ------------------------------------------------
    def apply_update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1

    def discard_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def snapshot(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        with self.lock:  # not in the middle of an update
            return {n: (a.lora_A.detach().float().cpu().clone(), a.lora_B.detach().float().cpu().clone())
                    for n, a in self.adapters.items()}

    # -- FedAvg ----------------------------------------------------------------
    def aggregate(self, session_id: str, number: int, examples: int,
                  adapters: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  timeout: float) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
        """Submit this client's adapters for round `number`; wait for the average.

        Rounds run in order: the one after the last averaged round is open; the
        last averaged one answers retries (a lost reply) with its result.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            if number < self._done or number > self._done + 1:
                raise FederationMismatch(
                    f"federation {self.name!r} is at aggregation round {self._done + 1}, not {number}: clients must "
                    "join before the first round and aggregate on the same schedule (--aggregate-every, --steps)")
            rnd = self._rounds.setdefault(number, _Round(number))
            if rnd.result is None:
                if rnd.submissions:
                    _check_same_shapes(next(iter(rnd.submissions.values()))[1], adapters)
                rnd.submissions[session_id] = (examples, adapters)  # a retry replaces its own entry
            while rnd.result is None:
                if self._cancelled:
                    raise FederationClosed("the server is shutting down")
                # Wait for the expected clients, but never for ones that have left.
                if len(rnd.submissions) >= min(self.settings.clients, max(len(self.members), 1)):
                    self._finish(rnd)
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    # Stragglers do not hold the others forever: average who came.
                    log.warning("federation %r round %d: %d of %d clients after %.0f s; averaging those",
                                self.name, number, len(rnd.submissions), self.settings.clients, timeout)
                    self._finish(rnd)
                    break
                self._cond.wait(min(left, 1.0))
            return rnd.result, rnd.averaged

    def leave(self, session_id: str) -> None:
        with self._cond:
            self.members.discard(session_id)
            self._cond.notify_all()

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def _finish(self, rnd: _Round) -> None:
        rnd.result = fedavg(list(rnd.submissions.values()))
        rnd.averaged = len(rnd.submissions)
        log.info("federation %r round %d: averaged the client-side adapters of %d clients (%d examples)",
                 self.name, rnd.number, rnd.averaged, sum(e for e, _ in rnd.submissions.values()))
        rnd.submissions.clear()
        self._done = rnd.number
        for old in [n for n in self._rounds if n < rnd.number]:
            del self._rounds[old]
        self._cond.notify_all()


class _Fp32(torch.nn.Module):
    """Applies an fp32 adapter to activations of any dtype (fp16/bf16 serving)."""

    def __init__(self, adapter: LoRAAdapter) -> None:
        super().__init__()
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(x.float()).to(x.dtype)


def fedavg(submissions: list[tuple[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]]
           ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Example-weighted average of every client's A and B, in float64, returned as float32."""
    total = float(sum(n for n, _ in submissions))
    out = {}
    for name in submissions[0][1]:
        a = sum(n * ads[name][0].double() for n, ads in submissions) / total
        b = sum(n * ads[name][1].double() for n, ads in submissions) / total
        out[name] = (a.float(), b.float())
    return out


def _check_same_shapes(ref: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       got: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    if ref.keys() != got.keys():
        raise FederationMismatch("these adapters name other modules than the round's first client's")
    for n, (a, b) in got.items():
        if a.shape != ref[n][0].shape or b.shape != ref[n][1].shape:
            raise FederationMismatch(f"{n}: shapes {list(a.shape)}/{list(b.shape)} differ from the round's "
                                     f"{list(ref[n][0].shape)}/{list(ref[n][1].shape)} (every client needs the same rank)")


class Federations:
    """The federations of one server, by name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[tuple[str, str], Federation] = {}

    def join(self, owner: str, name: str, session_id: str, settings: SplitSettings, make) -> Federation:
        """Federations belong to one identity: another owner's same name is another federation."""
        with self._lock:
            fed = self._by_name.get((owner, name))
            if fed is None:
                fed = self._by_name[(owner, name)] = make()
                log.info("federation %r created: cut layer %d, %d clients per round, server-side LoRA rank %d "
                         "on %d modules", name, settings.cut_layer, settings.clients, settings.rank,
                         len(fed.adapters))
            elif fed.settings != settings:
                diff = [f"{k} {getattr(fed.settings, k)!r} (asked {getattr(settings, k)!r})"
                        for k in settings.__dataclass_fields__ if getattr(fed.settings, k) != getattr(settings, k)]
                raise FederationMismatch(f"federation {name!r} already runs with {', '.join(diff)}")
            fed.members.add(session_id)
            return fed

    def leave(self, owner: str, name: str, session_id: str) -> None:
        with self._lock:
            fed = self._by_name.get((owner, name))
            if fed is None:
                return
            fed.leave(session_id)
            if not fed.members:
                del self._by_name[(owner, name)]
                log.info("federation %r closed: its last client left after %d server-side updates", name, fed.updates)

    def cancel_all(self) -> None:
        """Shutdown: release every client waiting for a round."""
        with self._lock:
            feds = list(self._by_name.values())
        for fed in feds:
            fed.cancel()
