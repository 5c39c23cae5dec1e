"""A SplitLoRA federation's durable state: one file per federation in a state directory that replicas share.

Each write goes to a temporary file that is fsynced and then renamed over the
old one (common/atomic_write.py), so a reader (or a replica taking over after
a crash) sees the last complete state or the one before it, never half of one.
Files are read with `torch.load(weights_only=True)`: tensors and plain
containers only, no code.
A replica notices that another one wrote the file since it last did (the
federation moved to it and back) by the file's identity, and reloads.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from common.atomic_write import replacing

log = logging.getLogger(__name__)

VERSION = 1


class StateError(ValueError):
    """A state file that cannot be used: unreadable, of another version, or of other settings."""


class StateFile:
    """Where one federation's state lives; `owner` and `name` together name the federation."""

    def __init__(self, state_dir: Path, owner: str, name: str) -> None:
        # A digest, not the name: names come from clients and may hold any character.
        digest = hashlib.sha256(f"{owner}\0{name}".encode()).hexdigest()[:32]
        self.path = Path(state_dir) / f"federation-{digest}.pt"
        self._lock_path = self.path.with_suffix(".lock")
        self._ours: tuple[int, int, int] | None = None   # identity of the file as we last wrote or read it

    def _identity(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def exists(self) -> bool:
        return self.path.exists()

    def changed(self) -> bool:
        """Whether someone else wrote (or removed) the file since we last wrote or read it."""
        return self._identity() != self._ours

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the federation across processes (replicas sharing the directory) for one operation."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def read(self) -> dict:
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem to the caller
            raise StateError(f"federation state {self.path} is unreadable ({type(exc).__name__}: "
                             f"{str(exc)[:200]}); move it away to start the federation afresh") from None
        if not isinstance(state, dict) or state.get("version") != VERSION:
            raise StateError(f"federation state {self.path} is not version {VERSION} state; move it away to start "
                             "the federation afresh")
        self._ours = self._identity()
        return state

    def write(self, state: dict) -> None:
        with replacing(self.path) as tmp:
            torch.save({"version": VERSION, **state}, tmp)
        self._ours = self._identity()

    def remove(self) -> None:
        # The lock file stays: another replica may be waiting on it.
        self.path.unlink(missing_ok=True)
        self._ours = None

