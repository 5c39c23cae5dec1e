"""What a curious cloud sees: every message of every call, recorded as it crossed the wire, for privacy audits.

Two files per call: `NNNNNN-Method.pb` holds the call's request messages (what
the edge sent) and `NNNNNN-Method.replies.pb` the cloud's replies (which the
cloud computed itself, so it knows them anyway: they pair each site input with
the edge's answer). Each message is a 4-byte little-endian length and its
bytes. Off unless `cloud_server --record-dir` is given; `bench/privacy.py`
attacks these files, so its figures come from what really crossed the wire.
"""
from __future__ import annotations

import itertools
import logging
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

from google.protobuf.message import Message

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("<I")


class CallRecord:
    """The messages of one call, appended as they arrive."""

    def __init__(self, recorder: MessageRecorder, path: Path) -> None:
        self._recorder = recorder
        self._path = path

    def add(self, msg: Message) -> None:
        """A request message, as the edge sent it."""
        self._write(self._path, msg)

    def add_reply(self, msg: Message) -> None:
        """A reply message, as the cloud sent it."""
        self._write(replies(self._path), msg)

    def _write(self, path: Path, msg: Message) -> None:
        data = msg.SerializeToString()
        if self._recorder.reserve(_LENGTH.size + len(data)):
            with open(path, "ab") as f:
                f.write(_LENGTH.pack(len(data)) + data)


class MessageRecorder:
    """Writes calls under `root` until `limit_bytes` are written, then stops (and says so once)."""

    def __init__(self, root: Path, limit_bytes: int) -> None:
        self.root = root
        self.limit_bytes = limit_bytes
        root.mkdir(parents=True, exist_ok=True)
        self._written = 0
        self._lock = threading.Lock()
        self._calls = itertools.count(1)
        self._full = False

    def call(self, method: str) -> CallRecord:
        return CallRecord(self, self.root / f"{next(self._calls):06d}-{method}.pb")

    def reserve(self, size: int) -> bool:
        """Whether `size` more bytes may be written."""
        with self._lock:
            if self._written + size > self.limit_bytes:
                if not self._full:
                    self._full = True
                    log.warning("message recording stopped: %s holds its limit of %.0f MiB (--record-limit-mb)",
                                self.root, self.limit_bytes / (1 << 20))
                return False
            self._written += size
            return True


def read(path: Path) -> Iterator[bytes]:
    """The messages of one recorded call, as bytes (parse with the method's request type)."""
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
        (size,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        yield data[offset:offset + size]
        offset += size


def replies(call: Path) -> Path:
    """The file of a recorded call's replies (read it with `read`, parse with the method's reply type)."""
    return call.with_name(call.name.removesuffix(".pb") + ".replies.pb")


def calls(root: Path, method: str) -> list[Path]:
    """The recorded calls of `method`, in arrival order."""
    return sorted(root.glob(f"*-{method}.pb"))
