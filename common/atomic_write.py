"""Files and directories written whole or not at all: written beside the target, fsynced, renamed over it.

A reader, or a process taking over after a crash or a power cut, sees the old
content or the new, never half of either: the rename is atomic, and the data
and then the rename are fsynced before the writer moves on.
"""
from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _temporary_name(path: Path) -> Path:
    # Hidden, and unique per process and call: concurrent writers of one target never share a temporary file.
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextmanager
def replacing(path: Path | str) -> Iterator[Path]:
    """A temporary path beside `path` for the caller to write a file to; once the block ends it
    is fsynced and renamed over `path`. If the block raises, it is removed and `path` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes(path: Path | str, data: bytes) -> None:
    """Write `data` to `path` whole (see `replacing`)."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path | str, text: str) -> None:
    """Write `text` to `path` as UTF-8, whole (see `replacing`)."""
    write_bytes(path, text.encode("utf-8"))


@contextmanager
def replacing_dir(path: Path | str) -> Iterator[Path]:
    """A temporary directory beside `path` for the caller to fill; once the block ends its files are
    fsynced and it takes the place of `path` (an old `path` is removed first: a crash in between
    leaves no directory, never a partial one). If the block raises, it is removed and `path` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    tmp.mkdir()
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                _fsync(Path(root) / name)
            _fsync_dir(Path(root))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def _fsync(path: Path) -> None:
    # fsync flushes the file's data whichever descriptor asks, so writers that take a path
    # (torch.save, safetensors) need not hand over theirs.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)
