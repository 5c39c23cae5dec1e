"""Multiple-choice tasks read straight from BIG-bench's PyPI sdist, as untrusted bytes.

The `bigbench` sdist (358 MB of JSON tasks) cannot be installed: its build needs a
direct-URL dependency PyPI refuses. So it is never installed or imported: the one
pinned archive is downloaded once from PyPI's file host into the cache, its size and
SHA-256 must equal the values committed here, and only the named tasks' `task.json`
members are read from it (no extraction to disk). An offline machine can place the
archive at the cached path itself (the error says where).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tarfile
import time
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from common.atomic_write import write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Archive:
    """A pinned file on PyPI's file host: other bytes are another file."""

    filename: str
    url: str
    size: int
    sha256: str


BIGBENCH = Archive(
    "bigbench-1.0.0.tar.gz",
    "https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
    "bigbench-1.0.0.tar.gz",
    358249635, "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2")
TASK_PATH = "bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json"
HELD_OUT = 5           # one example in five, by the CRC-32 of its question: the split never depends on a seed
MAX_TASK_BYTES = 64 << 20   # a task.json larger than this is not one of the tasks named here


class BigBenchError(ValueError):
    """The archive is missing, altered, or lacks the task; the text names the file and the fix."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check(path: Path, archive: Archive = BIGBENCH) -> Path:
    """`path` if its size and SHA-256 are the pinned ones, else a BigBenchError naming both."""
    size = path.stat().st_size
    if size != archive.size:
        raise BigBenchError(f"{path}: {size} bytes, expected {archive.size} ({archive.filename}); delete it to "
                            "download it again")
    digest = _sha256(path)
    if digest != archive.sha256:
        raise BigBenchError(f"{path}: SHA-256 {digest[:16]}…, expected {archive.sha256[:16]}… ({archive.filename}); "
                            "delete it to download it again")
    return path


def download(dest: Path, archive: Archive = BIGBENCH, timeout: float = 60.0) -> Path:
    """Fetch the archive into dest (through a .part file, renamed only once checked), logging progress."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (%.0f MB, once) from %s", archive.filename, archive.size / 1e6, archive.url)
    start, last = time.monotonic(), 0.0
    try:
        with urllib.request.urlopen(archive.url, timeout=timeout) as src, part.open("wb") as out:
            done = 0
            while block := src.read(1 << 20):
                out.write(block)
                done += len(block)
                if time.monotonic() - last > 10:
                    last = time.monotonic()
                    log.info("  %s: %.0f / %.0f MB", archive.filename, done / 1e6, archive.size / 1e6)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise BigBenchError(f"cannot download {archive.url} ({exc}); on an offline machine, place "
                            f"{archive.filename} (SHA-256 {archive.sha256}) at {dest}") from None
    try:
        check(part, archive)
    except BigBenchError:
        part.unlink()   # other bytes than the pinned ones: nothing of them is kept
        raise
    os.replace(part, dest)
    log.info("%s: %.0f MB in %.0f s, SHA-256 checked", archive.filename, archive.size / 1e6, time.monotonic() - start)
    return dest


def archive_path(cache: Path) -> Path:
    """The checked archive in cache/downloads, downloaded first if absent."""
    path = cache / "downloads" / BIGBENCH.filename
    return check(path) if path.exists() else download(path)


def read_task(archive: Path, name: str) -> dict:
    """The task's task.json, read from the archive without extracting anything."""
    member = TASK_PATH.format(name=name)
    with tarfile.open(archive, "r:gz") as tf:
        try:
            info = tf.getmember(member)
        except KeyError:
            raise BigBenchError(f"{archive} has no task {name!r} ({member})") from None
        if not info.isfile() or info.size > MAX_TASK_BYTES:
            raise BigBenchError(f"{archive}: {member} is not a task file of at most {MAX_TASK_BYTES >> 20} MB")
        f = tf.extractfile(info)
        assert f is not None  # a regular file, checked above
        return json.loads(f.read().decode("utf-8"))


def multiple_choice(task: dict, template: str) -> list[dict]:
    """The task's examples as {"prompt", "choices", "answer"} records: choices in the file's order, the one
    scored 1 the answer. Examples without exactly one right choice are dropped (none in the named tasks)."""
    rows = []
    for ex in task.get("examples", []):
        scores = ex.get("target_scores") or {}
        right = [i for i, s in enumerate(scores.values()) if s == 1]
        question = str(ex.get("input", "")).strip()
        if len(scores) < 2 or len(right) != 1 or not question:
            continue
        rows.append({"prompt": template.replace("{text}", question), "choices": [str(c) for c in scores],
                     "answer": right[0]})
    return rows


def write_task(cache: Path, name: str, template: str, archive: Path | None = None) -> tuple[Path, Path]:
    """Write the task as train/test JSONL once (test: one question in HELD_OUT by CRC-32)."""
    out = cache / "data" / f"bigbench-{name}"
    train_p, test_p = out / "train.jsonl", out / "test.jsonl"
    if train_p.exists() and test_p.exists():
        return train_p, test_p
    rows = multiple_choice(read_task(archive or archive_path(cache), name), template)
    if not rows:
        raise BigBenchError(f"the BIG-bench task {name!r} has no multiple-choice examples")
    held = [r for r in rows if zlib.crc32(r["prompt"].encode("utf-8")) % HELD_OUT == 0]
    kept = [r for r in rows if zlib.crc32(r["prompt"].encode("utf-8")) % HELD_OUT != 0]
    random.Random(0).shuffle(kept)
    out.mkdir(parents=True, exist_ok=True)
    for p, part in ((train_p, kept), (test_p, held)):
        write_text(p, "".join(json.dumps(r) + "\n" for r in part))
    return train_p, test_p
