"""A run's record (edge_client/run_record.py): rows, totals, checkpoint round trip and run.json."""
from __future__ import annotations

import json

import torch

from edge_client.kill_revive import Change
from edge_client.objective import Batch
from edge_client.run_record import RunRecord
from edge_client.session import StepStats


def batch(tokens: int) -> Batch:
    ids = torch.zeros(1, tokens, dtype=torch.long)
    one = torch.zeros(1, dtype=torch.long)
    return Batch(ids, torch.ones_like(ids, dtype=torch.bool), one, one, one)


def stats(sent: int, received: int) -> StepStats:
    s = StepStats()
    s.bytes_sent, s.bytes_received, s.edge_flops, s.head_flops, s.block_flops = sent, received, 10, 5, 1
    return s


def test_totals_are_per_step_means_and_the_record_survives_a_checkpoint(tmp_path):
    rec = RunRecord.start({"accuracy": 0.5, "examples": 4}, {"b", "a"})
    assert rec.live_history == [{"step": 0, "live": ["a", "b"], "killed": [], "revived": []}]
    assert rec.evals == [{"step": 0, "accuracy": 0.5, "examples": 4}]
    rec.add_step(1.0, 2.0, batch(4), stats(100, 300), live=2, front={"inverter_accuracy": 0.25})
    rec.add_change(Change(step=1, kill=["b"], revive=[]), {"a"})
    again = RunRecord.from_checkpoint(json.loads(json.dumps(rec.checkpoint())))   # plain data
    again.add_step(0.5, 4.0, batch(4), stats(300, 100), live=1, front={"inverter_accuracy": 0.75})
    assert [r["step"] for r in again.history] == [1, 2]
    assert again.history[0]["edge_flops"] == 16 and again.history[1]["front_inverter_accuracy"] == 0.75
    t = again.totals()
    assert (t["steps"], t["seconds_per_step"], t["bytes_sent_per_step"], t["bytes_received_per_step"]) == \
        (2, 3.0, 200, 200)
    assert t["front_inverter_accuracy"] == 0.5 and again.live_history[-1]["live"] == ["a"]
    again.add_eval(2, {"accuracy": 0.75, "examples": 4})
    again.write(tmp_path / "out" / "run.json", {"steps": 2}, {"after": 0.75}, [], [])
    doc = json.loads((tmp_path / "out" / "run.json").read_text())
    assert doc["config"] == {"steps": 2} and len(doc["history"]) == 2 and doc["evals"][-1]["step"] == 2
    assert "front_warm_up" not in doc


def test_an_empty_run_totals_zero():
    t = RunRecord.start(None, set()).totals()
    assert t["steps"] == 0 and t["seconds_per_step"] == 0 and "front_inverter_accuracy" not in t
