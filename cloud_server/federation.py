"""SplitLoRA federations: server-side adapters shared by a group of clients, FedAvg, and their durable state.

Clients that open a SplitLoRA session with the same federation name share one
set of server-side adapters on the blocks after the cut; the cloud trains them
with AdamW, one client step at a time. Every `I` steps each client sends its
client-side adapters and example count; once every expected client of the
round has sent them, all get back the example-weighted average (FedAvg).

A step's update is applied when the federation's next step begins (or someone
reads the adapters); until then its gradients are kept, and so is each
member's last answer. A replayed step (its reply was lost, or its replica
died) is recomputed from the very same state, or answered from what was kept:
no step counts twice and none is lost. With a state directory all of this is
written after every step and round (federation_state.py), and whichever
replica next receives a call of the federation carries on from it.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch

from cloud_server.federation_state import StateError, StateFile
from common.lora import LoRAAdapter, seeded_adapters
from common.site_types import SiteSpec

log = logging.getLogger(__name__)


class FederationMismatch(ValueError):
    """A client asked to join a federation with different settings, or is out of step with it."""


class FederationLost(FederationMismatch):
    """A client resumes a federation this server holds no state of."""


class FederationClosed(Exception):
    """The server is shutting down while a client waits for a round."""


@dataclass(frozen=True)
class FederationSettings:
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
    def __init__(self, name: str, settings: FederationSettings, server_sites: list[SiteSpec],
                 device: torch.device, dtype: torch.dtype, store: StateFile | None = None) -> None:
        self.name = name
        self.settings = settings
        self.server_sites = server_sites
        self.store = store
        # PEFT's init (Kaiming-uniform A, B = 0) from the federation's seed, as the edge draws its own.
        shapes = {m.name: (m.in_features, m.out_features) for site in server_sites for m in site.modules}
        fresh = seeded_adapters(shapes, settings.rank, settings.alpha / settings.rank, settings.seed)
        # fp32 whatever the served dtype: AdamW's eps underflows in fp16.
        self.adapters: dict[str, LoRAAdapter] = {n: ad.to(device=device) for n, ad in fresh.items()}
        self.applied = {n: _Fp32(a) for n, a in self.adapters.items()}
        self.params = [p for a in self.adapters.values() for p in a.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=0.0)
        self.updates = 0
        # The step whose update waits in the adapters' .grad, as (member, step id).
        self.pending: tuple[str, int] | None = None
        self.answers: dict[str, _Answer] = {}   # each member's last step: its id and the cut gradient sent
        self._step_kind = ""                    # what begin_step decided: "new", "replay" or "answered"
        self._saved_grads: list[torch.Tensor | None] | None = None
        # One server-side step at a time: the adapters are shared.
        self.lock = threading.Lock()
        self.members: dict[str, str] = {}      # member key -> its current session id (on any replica)
        self.local: set[str] = set()           # sessions of this federation on this replica
        self._rounds: dict[int, _Round] = {}
        self._done = 0                          # last round that was averaged
        self._cancelled = False
        self._cond = threading.Condition()
        self.on_round: Callable[[], object] | None = None   # set by Federations

    # -- holding the federation ------------------------------------------------
    @contextmanager
    def hold(self, timeout: float | None = None) -> Iterator[None]:
        """Exclusive use for one operation, across threads and (with a state directory) replicas;
        a state another replica wrote meanwhile is loaded first."""
        if not self.lock.acquire(timeout=-1 if timeout is None else timeout):  # 0: only if free now
            raise TimeoutError(f"another client of federation {self.name!r} held the server-side adapters for "
                               f"{timeout:.0f} s")
        try:
            if self.store is None:
                yield
                return
            with self.store.locked():
                if self.store.changed() and self.store.exists():
                    self.load_state(self.store.read())
                    log.info("federation %r: loaded its state (%d updates, round %d) from %s", self.name,
                             self.updates, self._done, self.store.path)
                yield
        finally:
            self.lock.release()

    # -- server-side training (call these holding the federation) ---------------
    def begin_step(self, member: str, step_id: int) -> torch.Tensor | None:
        """Before a training step of `member`: None to compute it, or the cut gradient already sent for it."""
        last = self.answers.get(member)
        if self.pending == (member, step_id):
            # Its update waits: recompute it from the same state (a failure puts the gradients back).
            self._step_kind, self._saved_grads = "replay", [p.grad for p in self.params]
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if last is not None and step_id <= last.step_id:
            if step_id < last.step_id:
                raise FederationMismatch(f"step id {step_id} is older than this client's last step {last.step_id}; "
                                         "training step ids must not go back")
            self._step_kind = "answered"   # applied, and others stepped since: the kept answer stands
            return last.cut_grad
        self.settle()
        self._step_kind = "new"
        return None

    def end_step(self, member: str, step_id: int, cut_grad: torch.Tensor) -> None:
        """The step's gradients are in .grad: its update waits for the next step; saved before the reply goes."""
        self.pending = (member, step_id)
        self._saved_grads, self._step_kind = None, ""
        self.answers[member] = _Answer(step_id, cut_grad.detach().cpu().clone())
        self.save()

    def abort_step(self) -> None:
        """A step failed half-way: drop its partial gradients, and put back those of an update that waits."""
        if self._step_kind == "replay":
            for p, g in zip(self.params, self._saved_grads or []):
                p.grad = g
        elif self._step_kind == "new":
            self.optimizer.zero_grad(set_to_none=True)
        self._saved_grads, self._step_kind = None, ""

    def settle(self) -> None:
        """Apply the update that waits, if any."""
        if self.pending is None:
            return
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        self.pending = None

    def snapshot(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The server-side adapters with every update applied."""
        with self.hold():
            self.settle()
            return {n: (a.lora_A.detach().float().cpu().clone(), a.lora_B.detach().float().cpu().clone())
                    for n, a in self.adapters.items()}

    # -- membership ----------------------------------------------------------------
    def join(self, member: str, session_id: str, restore: bool = False) -> None:
        """Add a session; `restore`: a federation new to this replica, whose saved state is loaded first.

        Otherwise it never waits for the step lock: sessions open under the server's session lock, and
        a step may hold the federation for seconds; that step's own save then records the member.
        """
        with self._cond:
            self.members[member] = session_id
            self.local.add(session_id)
        try:
            with self.hold(None if restore else 0):
                self.members[member] = session_id   # again: holding it may have loaded another replica's state
                self.save()
        except TimeoutError:
            pass

    def leave(self, member: str, session_id: str, by_edge: bool = True) -> bool:
        """A session closed (`by_edge`: its edge closed it); True once this replica holds none of the
        federation's sessions."""
        with self._cond:
            with self.hold():
                self.local.discard(session_id)
                # The member may have moved on to a session elsewhere (a failover): then it has not left.
                if self.members.get(member) == session_id:
                    del self.members[member]
                    if self.members or not by_edge:
                        # Closed by the server (the edge vanished mid-step, idled, or this replica shut
                        # down): the member may come back with --resume, so the state stays.
                        self.save()
                    elif self.store is not None:
                        self.store.remove()   # every member left cleanly: the federation is over
            self._cond.notify_all()
        return not self.local

    # -- FedAvg ----------------------------------------------------------------
    def aggregate(self, member: str, number: int, examples: int,
                  adapters: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  timeout: float) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
        """Submit this member's adapters for round `number`; wait for the average.

        Rounds run in order: the one after the last averaged round is open; the
        last averaged one answers retries (a lost reply) with its result.
        """
        deadline = time.monotonic() + timeout
        with self.hold(timeout):
            pass  # another replica may have moved the rounds on
        with self._cond:
            if number < self._done or number > self._done + 1:
                raise FederationMismatch(
                    f"federation {self.name!r} is at aggregation round {self._done + 1}, not {number}: clients must "
                    "join before the first round and aggregate on the same schedule (--aggregate-every, --steps)")
            rnd = self._rounds.setdefault(number, _Round(number))
            if rnd.result is None:
                if rnd.submissions:
                    _check_same_shapes(next(iter(rnd.submissions.values()))[1], adapters)
                rnd.submissions[member] = (examples, adapters)  # a retry replaces its own entry
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
            assert rnd.result is not None  # the loop only ends once the round is averaged
            return rnd.result, rnd.averaged

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
        if self.on_round is not None:
            self.on_round()
        for old in [n for n in self._rounds if n < rnd.number]:
            del self._rounds[old]
        with self.hold():
            self.save()   # a member whose reply is lost gets this round's result from any replica
        self._cond.notify_all()

    # -- durable state -------------------------------------------------------------
    def save(self) -> None:
        if self.store is not None:
            self.store.write(self.state_dict())

    def state_dict(self) -> dict:
        last = self._rounds.get(self._done)
        return {
            "name": self.name,
            "settings": dataclasses.asdict(self.settings),
            "adapters": {n: [a.lora_A.detach().cpu(), a.lora_B.detach().cpu()] for n, a in self.adapters.items()},
            "optimizer": self.optimizer.state_dict(),
            "updates": self.updates,
            "pending": None if self.pending is None else list(self.pending),
            "grads": [None if p.grad is None else p.grad.detach().cpu() for p in self.params],
            "answers": {m: [a.step_id, a.cut_grad] for m, a in self.answers.items()},
            "members": self.members.copy(),   # atomic under the GIL: joins do not take the step lock
            "round": self._done,
            "round_result": None if last is None or last.result is None else
            {n: list(ab) for n, ab in last.result.items()},
            "round_clients": 0 if last is None else last.averaged,
        }

    def load_state(self, state: dict) -> None:
        """Take over a saved state; refused (the federation untouched) unless it fits this federation."""
        try:
            saved = FederationSettings(**{**state["settings"], "targets": tuple(state["settings"]["targets"])})
            if saved != self.settings:
                raise FederationMismatch(f"federation {self.name!r} was saved with "
                                         f"{_differences(saved, self.settings)}")
            if state["adapters"].keys() != self.adapters.keys():
                raise StateError("its adapters name other modules")
            for n, (a, b) in state["adapters"].items():
                if a.shape != self.adapters[n].lora_A.shape or b.shape != self.adapters[n].lora_B.shape:
                    raise StateError(f"{n}: adapter shapes differ")
            grads = state["grads"]
            if len(grads) != len(self.params) or any(
                    g is not None and g.shape != p.shape for g, p in zip(grads, self.params)):
                raise StateError("its gradients do not fit the adapters")
            optimizer = torch.optim.AdamW(self.params, lr=self.settings.lr, weight_decay=0.0)
            optimizer.load_state_dict(state["optimizer"])
            answers = {str(m): _Answer(int(s), t) for m, (s, t) in state["answers"].items()}
            result = state["round_result"]
            rounds = {} if result is None else {state["round"]: _Round(
                int(state["round"]), result={n: (a, b) for n, (a, b) in result.items()},
                averaged=int(state["round_clients"]))}
            pending = None if state["pending"] is None else (str(state["pending"][0]), int(state["pending"][1]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, FederationMismatch):
                raise
            path = self.store.path if self.store else "state"
            raise StateError(f"federation state {path} does not fit federation {self.name!r} ({exc}); "
                             "move it away to start the federation afresh") from None
        with torch.no_grad():
            for n, (a, b) in state["adapters"].items():
                self.adapters[n].lora_A.copy_(a)
                self.adapters[n].lora_B.copy_(b)
        for p, g in zip(self.params, grads):
            p.grad = None if g is None else g.to(p.device)
        self.optimizer = optimizer
        self.updates = int(state["updates"])
        self.pending = pending
        self.answers = answers
        self.members = {str(k): str(v) for k, v in state["members"].items()}
        self._done = int(state["round"])
        self._rounds = rounds


@dataclass
class _Answer:
    step_id: int
    cut_grad: torch.Tensor


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
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in submissions[0][1]:
        # sum() starts from int 0, so its static type admits int; with at least one submission it is a tensor.
        a = cast(torch.Tensor, sum(n * ads[name][0].double() for n, ads in submissions)) / total
        b = cast(torch.Tensor, sum(n * ads[name][1].double() for n, ads in submissions)) / total
        out[name] = (a.float(), b.float())
    return out


def _check_same_shapes(ref: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       got: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    if ref.keys() != got.keys():
        raise FederationMismatch("these adapters name other modules than the round's first client's")
    for n, (a, b) in got.items():
        if a.shape != ref[n][0].shape or b.shape != ref[n][1].shape:
            raise FederationMismatch(f"{n}: shapes {list(a.shape)}/{list(b.shape)} differ from the round's "
                                     f"{list(ref[n][0].shape)}/{list(ref[n][1].shape)} "
                                     "(every client needs the same rank)")


def _differences(a: FederationSettings, b: FederationSettings) -> str:
    return ", ".join(f"{k} {getattr(a, k)!r} (asked {getattr(b, k)!r})"
                     for k in a.__dataclass_fields__ if getattr(a, k) != getattr(b, k))


class Federations:
    """The federations of one server, by owner and name; with a state directory, durable."""

    def __init__(self, state_dir: Path | None = None, on_round: Callable[[], object] | None = None) -> None:
        self.state_dir = state_dir
        self.on_round = on_round          # called once per round averaged here (the metrics count it)
        self._lock = threading.Lock()
        self._by_name: dict[tuple[str, str], Federation] = {}

    def join(self, owner: str, name: str, member: str, session_id: str, settings: FederationSettings,
             make, resume: bool = False) -> Federation:
        """Join (creating, or resuming from the state directory) the federation `name` of `owner`.

        Federations belong to one identity: another owner's same name is another federation.
        `make(store)` builds a fresh one. A `resume`d member never gets a fresh one: its run
        would silently go on from untrained server-side adapters.
        """
        with self._lock:
            fed = self._by_name.get((owner, name))
            if fed is None:
                store = StateFile(self.state_dir, owner, name) if self.state_dir is not None else None
                if resume and (store is None or not store.exists()):
                    raise FederationLost(
                        f"this server holds no state of federation {name!r} (it restarted without --state-dir, or "
                        "its replicas do not share one): the SplitLoRA run cannot resume; start it again")
                fed = make(store)
                fed.on_round = self.on_round
                fed.join(member, session_id, restore=True)
                self._by_name[(owner, name)] = fed
                log.info("federation %r %s: cut layer %d, %d clients per round, server-side LoRA rank %d on %d "
                         "modules", name, f"resumed at update {fed.updates}, round {fed._done}"
                         if fed.updates or fed._done else "created", settings.cut_layer, settings.clients,
                         settings.rank, len(fed.adapters))
                return fed
            if fed.settings != settings:
                raise FederationMismatch(f"federation {name!r} already runs with "
                                         f"{_differences(fed.settings, settings)}")
            fed.join(member, session_id)
            return fed

    def leave(self, owner: str, name: str, member: str, session_id: str, by_edge: bool = True) -> None:
        with self._lock:
            fed = self._by_name.get((owner, name))
            if fed is None:
                return
            if fed.leave(member, session_id, by_edge):
                del self._by_name[(owner, name)]
                log.info("federation %r: no client of it left on this server, after %d server-side updates",
                         name, fed.updates)

    def cancel_all(self) -> None:
        """Shutdown: release every client waiting for a round."""
        with self._lock:
            feds = list(self._by_name.values())
        for fed in feds:
            fed.cancel()
