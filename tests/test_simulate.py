"""Non-IID shards and `make simulate`: N real edge processes against one real cloud_server."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from edge_client.data import DataError
from edge_client.shards import make_shards


@pytest.fixture
def labelled(tmp_path):
    rows = [{"text": f"item {i}", "label": lab} for lab in ("a", "b", "c", "d") for i in range(60)]
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[::4]))
    return train, test


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_shards_partition_the_data_with_label_skew(labelled, tmp_path):
    train, test = labelled
    parts = make_shards(train, test, tmp_path / "s", clients=4, alpha=0.3, seed=1, min_train=10)
    shards = [read(tmp_path / "s" / f"client{i}" / "train.jsonl") for i in range(4)]
    texts = [r["text"] + r["label"] for s in shards for r in s]
    assert sorted(texts) == sorted(r["text"] + r["label"] for r in read(train))  # a partition: nothing lost or doubled
    assert [p["train"] for p in parts] == [len(s) for s in shards]
    # Label skew: some client's most common label holds well over the 25% of an even mix.
    assert max(max(Counter(r["label"] for r in s).values()) / len(s) for s in shards) > 0.5
    assert (tmp_path / "s" / "labels.txt").read_text().strip() == "a,b,c,d"
    again = make_shards(train, test, tmp_path / "t", clients=4, alpha=0.3, seed=1, min_train=10)
    assert again == [p | {"dir": p["dir"].replace("/s/", "/t/")} for p in parts]  # seeded


def test_impossible_shards_are_refused(labelled, tmp_path):
    with pytest.raises(DataError, match="could not give each of 50 clients"):
        make_shards(*labelled, tmp_path / "s", clients=50, min_train=32)
    with pytest.raises(DataError, match="alpha must be > 0"):
        make_shards(*labelled, tmp_path / "s", clients=2, alpha=0)


def test_simulate_runs_every_client(model_dirs, tmp_path):
    out = tmp_path / "sim"
    res = subprocess.run([sys.executable, "-m", "bench.simulate", "--model", str(model_dirs["llama"]),
                          "--clients", "2", "--steps", "2", "--eval-limit", "4", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith(("| client0", "| client1"))]
    assert len(rows) == 2 and "FAILED" not in res.stdout
    for i in range(2):
        summary = json.loads((out / f"client{i}" / "run.json").read_text())["summary"]
        assert summary["steps"] == 2 and summary["data"].endswith(f"client{i}/train.jsonl")
