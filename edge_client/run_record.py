"""A training run's record: each step's cost, the live sets, the evaluations; its summary and run.json."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edge_client.kill_revive import Change
from edge_client.objective import Batch
from edge_client.session import StepStats


@dataclass
class RunRecord:
    """What `edge_client train` keeps of a run, checkpointed with it (so a resumed run's record continues)
    and written to OUT/run.json at the end (`edge_client report` plots it)."""

    before: dict | None = None                                  # the held-out metrics before training
    history: list[dict] = field(default_factory=list)           # one row per step
    live_history: list[dict] = field(default_factory=list)      # the live set at the start, then each change
    evals: list[dict] = field(default_factory=list)             # held-out metrics by step

    @classmethod
    def start(cls, before: dict | None, live: set[str]) -> RunRecord:
        """A new run's record: the evaluation before training (None: skipped) and the modules live at step 0."""
        return cls(before, [], [{"step": 0, "live": sorted(live), "killed": [], "revived": []}],
                   [{"step": 0, **before}] if before is not None else [])

    @classmethod
    def from_checkpoint(cls, state: dict) -> RunRecord:
        return cls(state["before"], state["history"], state["live_history"], state.get("evals", []))

    def checkpoint(self) -> dict:
        """The record's part of checkpoint.pt (plain data)."""
        return {"before": self.before, "history": self.history, "live_history": self.live_history,
                "evals": self.evals}

    @property
    def steps(self) -> int:
        return len(self.history)

    def add_step(self, loss: float, seconds: float, batch: Batch, stats: StepStats, live: int,
                 front: dict[str, float] | None = None) -> None:
        """One step's row: its loss, time, traffic and edge FLOPs (and the private front's figures, if any)."""
        self.history.append({
            "step": self.steps + 1, "loss": loss, "seconds": seconds, "tokens": batch.tokens,
            "bytes_sent": stats.bytes_sent, "bytes_received": stats.bytes_received, "messages": stats.messages,
            "site_exchanges": stats.sites, "live_modules": live,
            "adapter_flops": stats.edge_flops, "head_flops": stats.head_flops, "block_flops": stats.block_flops,
            "edge_flops": stats.edge_flops + stats.head_flops + stats.block_flops,
            "cloud_seconds": stats.cloud_seconds,
            **{"front_" + k: v for k, v in (front or {}).items()}})

    def add_change(self, change: Change, live: set[str]) -> None:
        """A Kill and Revive selection: the live set after it."""
        self.live_history.append({"step": change.step, "live": sorted(live), "killed": change.kill,
                                  "revived": change.revive})

    def add_eval(self, step: int, metrics: dict) -> None:
        self.evals.append({"step": step, **metrics})

    def totals(self) -> dict:
        """Per-step means of the run's cost (zero steps count as one, so an empty run gives zeros)."""
        n = max(self.steps, 1)
        h = self.history
        train = sum(r["seconds"] for r in h)
        return {"steps": self.steps, "train_seconds": train, "seconds_per_step": train / n,
                "bytes_sent_per_step": sum(r["bytes_sent"] for r in h) / n,
                "bytes_received_per_step": sum(r["bytes_received"] for r in h) / n,
                "edge_flops_per_step": sum(r["edge_flops"] for r in h) / n,
                "adapter_flops_per_step": sum(r["adapter_flops"] for r in h) / n,
                **self.front_summary()}

    def front_summary(self) -> dict:
        """With --front-privacy: how much of each step's tokens the device's own inverter read (trained on every
        earlier step's activations and tokens, so a cloud that knows all the plaintext before), over all steps
        and the last ten."""
        read = [r["front_inverter_accuracy"] for r in self.history if "front_inverter_accuracy" in r]
        if not read:
            return {}
        return {"front_inverter_accuracy": sum(read) / len(read),
                "front_inverter_accuracy_last10": sum(read[-10:]) / len(read[-10:])}

    def write(self, path: Path, config: dict, summary: dict, attestations: list[dict],
              warm_up: list[dict]) -> None:
        """OUT/run.json: the settings (no secrets), the summary, this record, and the verified claims of every
        attestation (the first, then one per reconnect or failover)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"config": config, "summary": summary, "history": self.history, "live_sets": self.live_history,
               "evals": self.evals, "attestations": attestations, **({"front_warm_up": warm_up} if warm_up else {})}
        path.write_text(json.dumps(doc, indent=2))
