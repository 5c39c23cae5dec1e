"""Kill and Revive (DESIGN.md section 3) and the baseline selection policies.

A policy decides, every `period` steps after a warm-up, which LoRA modules stay
live (trained on the edge, with traffic) and which are killed (parked frozen on
the cloud, no traffic, no edge compute). Policies:

  all     every module live at every step (no KR)
  random  budget x M modules drawn at random each period
  static  the top budget x M modules by norm movement, chosen once after warm-up
  kr      Kill and Revive: keep the modules whose norm moves most, and hand
          revive x budget x M of the live slots back to the modules killed
          longest ago, so they are re-measured
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from common.lora import LoRAAdapter
from common.settings import setting

POLICIES = ("all", "random", "static", "kr")


KR_GROUP = ("Kill and Revive: which adapters stay live (trained here, with traffic); killed ones are parked frozen "
            "on the cloud")


@dataclass
class KRConfig:
    policy: str = setting("all", "'all' keeps every module live; 'kr' is Kill and Revive; 'random' and 'static' are "
                                 "baselines at the same budget", choices=list(POLICIES), group=KR_GROUP)
    budget: float = setting(0.125, "share of units live after warm-up (a cap: rounded down)", group=KR_GROUP)
    revive: float = setting(0.25, "share of the live slots given to revived units", group=KR_GROUP)
    period: int = setting(10, "steps between selections", group=KR_GROUP)
    warmup_steps: int = setting(20, "steps with every module live", group=KR_GROUP)
    # Traffic is paid per site, so site units buy more bytes per slot (DESIGN.md section 3).
    unit: str = setting("site", "what is killed and revived as one: a site (the linears sharing an input, e.g. "
                                "q, k, v of a block; traffic is per site) or a module (one linear)",
                        choices=["site", "module"], group=KR_GROUP)
    seed: int = setting(0, "seed of the random policy", cli=False)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if not 0.0 <= self.revive < 1.0:
            raise ValueError(f"revive must be in [0, 1), got {self.revive}")
        if self.period < 1 or self.warmup_steps < 0:
            raise ValueError("period must be >= 1 and warmup_steps >= 0")
        if self.unit not in ("module", "site"):
            raise ValueError(f"unit must be 'module' or 'site', got {self.unit!r}")


@dataclass
class Change:
    """One selection update: which modules to park and which to bring back."""

    step: int
    kill: list[str]
    revive: list[str]
    scores: dict[str, float] = field(default_factory=dict)
    bytes_sent: int = 0        # the parking call's traffic
    bytes_received: int = 0


class Selector:
    """Tracks the live set; `after_step` returns a Change at selection points.

    `units` maps a unit name to its modules; by default every module is its own unit.
    """

    def __init__(self, names: list[str], cfg: KRConfig, units: dict[str, list[str]] | None = None) -> None:
        self.cfg = cfg
        self.names = list(names)
        self.units = units or {n: [n] for n in names}
        self.order = {u: i for i, u in enumerate(self.units)}
        self.live_units: set[str] = set(self.units)
        self.killed_at: dict[str, int] = {}     # unit -> step it was killed
        self.ref_norm: dict[str, float] = {}    # module -> norm at the start of its live window
        self.rng = random.Random(cfg.seed)
        self.chosen = False                     # static: the one selection is made
        # The budget is a cap on the live share, so it rounds down (at least one unit).
        self.budget_count = max(1, int(cfg.budget * len(self.units) + 1e-9))

    @property
    def live(self) -> set[str]:
        return {m for u in self.live_units for m in self.units[u]}

    def state_dict(self) -> dict:
        return {"live_units": sorted(self.live_units, key=self.order.__getitem__), "killed_at": dict(self.killed_at),
                "ref_norm": dict(self.ref_norm), "rng": self.rng.getstate(), "chosen": self.chosen}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state["live_units"]) - set(self.units)
        if unknown:
            raise ValueError(f"checkpoint names units this run does not have: {sorted(unknown)[:3]}")
        self.live_units = set(state["live_units"])
        self.killed_at = dict(state["killed_at"])
        self.ref_norm = dict(state["ref_norm"])
        self.rng.setstate(tuple(state["rng"][:1]) + (tuple(state["rng"][1]),) + tuple(state["rng"][2:]))
        self.chosen = state.get("chosen", False)

    def start(self, adapters: dict[str, LoRAAdapter]) -> None:
        self.ref_norm = {n: adapters[n].weight_norm() for n in self.names}

    def is_update(self, step: int) -> bool:
        # Selections at warm-up end, then every period. A live module's window
        # starts at its last selection (or step 0, or its revival): the first
        # window is the warm-up, every later one a period.
        c = self.cfg
        return c.policy != "all" and step >= c.warmup_steps and (step - c.warmup_steps) % c.period == 0

    def after_step(self, step: int, adapters: dict[str, LoRAAdapter]) -> Change | None:
        if not self.is_update(step):
            return None
        norms = {m: adapters[m].weight_norm() for m in self.live}
        # A unit's score: how far its modules' norms moved over the window.
        scores = {u: sum(abs(norms[m] - self.ref_norm[m]) for m in self.units[u]) for u in self.live_units}
        new_live = self._select(step, scores)
        if new_live is None:
            return None
        killed = sorted(self.live_units - new_live, key=self.order.__getitem__)
        revived = sorted(new_live - self.live_units, key=self.order.__getitem__)
        for u in killed:
            self.killed_at[u] = step
        for u in revived:
            self.killed_at.pop(u, None)
        self.live_units = new_live
        # Every live module starts a new measurement window now.
        for m in self.live:
            self.ref_norm[m] = norms[m] if m in norms else adapters[m].weight_norm()
        return Change(step, [m for u in killed for m in self.units[u]],
                      [m for u in revived for m in self.units[u]], scores)

    def _select(self, step: int, scores: dict[str, float]) -> set[str] | None:
        k = self.budget_count
        policy = self.cfg.policy
        if policy == "random":
            return set(self.rng.sample(list(self.units), k))
        if policy == "static":
            if self.chosen:
                return None
            self.chosen = True
            return set(_top(scores, k, self.order))
        # kr: revived slots go to the units killed longest ago (ties: model order).
        dead = sorted(self.killed_at, key=lambda u: (self.killed_at[u], self.order[u]))
        n_revive = min(round(self.cfg.revive * k), len(dead))
        keep = _top(scores, k - n_revive, self.order)
        return set(keep) | set(dead[:n_revive])


def _top(scores: dict[str, float], k: int, order: dict[str, int]) -> list[str]:
    """The k highest scores; ties go to the unit earlier in the model."""
    return sorted(scores, key=lambda n: (-scores[n], order[n]))[:k]


class KillRevive:
    """Kill and Revive attached to a DLoRAModelForCausalLM: call `step()` after each optimizer step
    (or hand `callback()` to a Hugging Face Trainer). At each selection it parks the killed
    modules on the cloud and brings the revived ones back; a parked module gets no gradient,
    so the optimizer leaves it alone."""

    def __init__(self, model, config: KRConfig | None = None) -> None:
        self.model = model
        self.config = config or KRConfig(policy="kr")
        managed = model.remote_adapters
        if not managed:
            raise ValueError("Kill and Revive manages the adapters of the cloud's blocks, and this model has none "
                             "(a SplitLoRA model trains every adapter; DLoRA with edge_layers below the last block "
                             "has some)")
        units = None
        if self.config.unit == "site":
            units = {f"site{s.index}": [m.name for m in s.modules] for s in model.session.sites
                     if s.modules[0].name in managed}
        self.selector = Selector(list(managed), self.config, units)
        self.selector.start(managed)
        self.steps = 0
        self.changes: list[Change] = []

    @property
    def live(self) -> set[str]:
        return self.selector.live

    def step(self) -> Change | None:
        """One optimizer step done: at a selection point, kill and revive; returns the change, if any."""
        self.steps += 1
        change = self.selector.after_step(self.steps, self.model.remote_adapters)
        if change is not None:
            change.bytes_sent, change.bytes_received = self.model.park(
                {n: self.model.remote_adapters[n] for n in change.kill}, change.revive)
            self.changes.append(change)
        return change

    def state_dict(self) -> dict:
        return {"steps": self.steps, "selector": self.selector.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the selector's state, and the killed modules parked again on the cloud."""
        self.steps = state["steps"]
        self.selector.load_state_dict(state["selector"])
        remote = self.model.remote_adapters
        killed = {n: remote[n] for n in remote if n not in self.selector.live and n not in self.model.session.parked}
        if killed:
            self.model.park(killed, [])

    def callback(self):
        """A transformers.TrainerCallback that calls `step()` at the end of every optimizer step."""
        from transformers import TrainerCallback

        kr = self

        class KillReviveCallback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                kr.step()

        return KillReviveCallback()
