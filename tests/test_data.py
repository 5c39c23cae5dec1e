"""Data loading: both JSONL formats, clear errors, deterministic splits, the BBC default."""
from __future__ import annotations

import json

import pytest

from edge_client import data
from edge_client.data import DataError


def write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_classification_records(tmp_path):
    ds = data.load(write(tmp_path / "d.jsonl", [{"text": "goal!", "label": "sport"},
                                                 {"text": "stocks", "label": "business"}]))
    assert ds.labels == ["business", "sport"]
    assert ds.examples[0].completion == " sport"
    assert "goal!" in ds.examples[0].prompt and "business, sport" in ds.examples[0].prompt


def test_prompt_completion_records(tmp_path):
    ds = data.load(write(tmp_path / "d.jsonl", [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}]))
    assert not ds.is_classification and ds.examples[0].completion == " 4"


@pytest.mark.parametrize("rows,needle", [
    (["{not json"], "d.jsonl:1: not valid JSON"),
    (["[1, 2]"], "must be a JSON object"),
    ([{"text": "x"}], "expected"),
    ([{"text": "x", "label": ""}], "expected"),
    ([{"text": "x", "label": "a"}, {"prompt": "p", "completion": "c"}], "mixes"),
    ([], "no records"),
])
def test_bad_files(tmp_path, rows, needle):
    with pytest.raises(DataError, match=needle):
        data.load(write(tmp_path / "d.jsonl", rows))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.load(tmp_path / "absent.jsonl")


def test_unknown_test_label(tmp_path):
    with pytest.raises(DataError, match=r"labels \['weather'\]"):
        data.load(write(tmp_path / "t.jsonl", [{"text": "rain", "label": "weather"}]), labels=["sport"])


def test_split_is_stratified_and_deterministic():
    exs = [data.Example(f"t{i}", " a" if i % 2 else " b", "a" if i % 2 else "b") for i in range(100)]
    tr1, te1 = data.split(exs, 0.2, seed=3)
    tr2, te2 = data.split(exs, 0.2, seed=3)
    assert te1 == te2 and tr1 == tr2
    assert len(te1) == 20 and sum(e.label == "a" for e in te1) == 10
    assert not set(te1) & set(tr1)


def test_bbc_news_default(tmp_path):
    train, test = data.bbc_news(tmp_path)
    tr, te = data.load(train, data.BBC_TEMPLATE), data.load(test, data.BBC_TEMPLATE)
    assert tr.labels == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(tr.examples) + len(te.examples) == 2225
    assert abs(len(te.examples) - 445) <= 5
