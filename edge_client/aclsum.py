"""ACLSum (`aclsum` on PyPI): 250 ACL papers, each summarised in one sentence per aspect, as prompt/completion pairs.

The package's code is never imported (its __init__ pulls in `datasets`): its JSONL files are found through
`importlib.util.find_spec` and read as data. Its records hold Python-literal dicts as strings, so they are
parsed with `ast.literal_eval`, which evaluates literals only, never code.
"""
from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

from common.atomic_write import write_text

ASPECTS = ("challenge", "approach", "outcome")
TEMPLATE = "Title: {title}\nAbstract: {abstract}\n\nIn one sentence, the {aspect} of this paper:"
MAX_ABSTRACT_WORDS = 50      # the abstract's first words: prompt and summary fit the default --max-length 128


class AclSumError(ValueError):
    """The package is missing or a record is malformed; the text names the file and the fix."""


def package_dir() -> Path:
    spec = importlib.util.find_spec("aclsum")
    if spec is None or not spec.submodule_search_locations:
        raise AclSumError("this task needs the PyPI package aclsum: pip install --no-deps aclsum==0.1.2 (or run "
                          "`make install`)")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset"


def _literal(path: Path, n: int, rec: dict, key: str) -> dict:
    value = rec.get(key)
    try:
        got = ast.literal_eval(value) if isinstance(value, str) else value
    except (ValueError, SyntaxError):
        raise AclSumError(f"{path}:{n}: {key!r} is not a literal dict") from None
    if not isinstance(got, dict):
        raise AclSumError(f"{path}:{n}: {key!r} is not a dict")
    return got


def pairs(path: Path) -> list[dict]:
    """Each paper of one split as three {"prompt", "completion"} records, one per aspect."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        summary, sentences = _literal(path, n, rec, "summary"), _literal(path, n, rec, "sentences")
        abstract = " ".join(" ".join(sentences.get("abstract", [])).split()[:MAX_ABSTRACT_WORDS])
        for aspect in ASPECTS:
            target = str(summary.get(aspect, "")).strip()
            if target and abstract:
                prompt = TEMPLATE.format(title=str(rec.get("title", "")).strip(), abstract=abstract, aspect=aspect)
                rows.append({"prompt": prompt, "completion": " " + target})
    return rows


def write_task(cache: Path, source: Path | None = None) -> tuple[Path, Path]:
    """The package's own split as train (its train and validation papers) and test JSONL, written once."""
    src = source or package_dir()
    out = cache / "data" / "aclsum"
    train_p, test_p = out / "train.jsonl", out / "test.jsonl"
    if train_p.exists() and test_p.exists():
        return train_p, test_p
    train = pairs(src / "train.jsonl") + pairs(src / "val.jsonl")
    test = pairs(src / "test.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    for p, part in ((train_p, train), (test_p, test)):
        write_text(p, "".join(json.dumps(r) + "\n" for r in part))
    return train_p, test_p
