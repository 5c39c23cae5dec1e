"""The cloud's side of remote attestation: evidence from the kernel's configfs-tsm (and the GPUs) for a nonce."""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from common.attestation import (
    TSM_PROVIDERS,
    TeeKind,
    canonical_settings,
    gpu_nonce,
    report_data,
    settings_digest,
)
from common.wire import dlora_pb2 as pb

log = logging.getLogger(__name__)

# Linux's configfs-tsm report interface (Documentation/ABI/testing/configfs-tsm): one interface for TDX
# quotes and SEV-SNP reports. Make a directory under it, write 64 bytes to `inblob`, read `outblob`.
DEFAULT_TSM_DIR = Path("/sys/kernel/config/tsm/report")


class EvidenceError(RuntimeError):
    """The TEE gave no usable evidence; the message names the file and what was found."""


@dataclass(frozen=True)
class TsmReport:
    provider: str
    outblob: bytes
    auxblob: bytes
    generation: int


class TsmReports:
    """Reports through one configfs-tsm directory. The kernel makes `outblob` when it is read; a
    user-space provider (the tests' stand-in for the kernel) may take a moment, so an empty one is
    read again until `timeout`."""

    def __init__(self, root: Path = DEFAULT_TSM_DIR, timeout: float = 10.0) -> None:
        self.root = root
        self.timeout = timeout
        self._lock = threading.Lock()   # one report at a time: `generation` then says ours was not overwritten

    def check(self) -> None:
        if not self.root.is_dir():
            raise EvidenceError(f"no configfs-tsm report directory at {self.root}: is this a TDX or SEV-SNP guest "
                                "with configfs mounted (mount -t configfs none /sys/kernel/config)?")

    def report(self, inblob: bytes) -> TsmReport:
        with self._lock:
            entry = self.root / f"dlora-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                entry.mkdir()
            except OSError as exc:
                raise EvidenceError(f"cannot make a report entry under {self.root}: {exc}") from None
            try:
                return self._read(entry, inblob)
            finally:
                _remove(entry)

    def _read(self, entry: Path, inblob: bytes) -> TsmReport:
        (entry / "inblob").write_bytes(inblob)
        outblob = self._outblob(entry)
        # The entry is ours and written once, so the kernel counts one write; more means another process wrote
        # inblob in between, and the report may hold its data instead of ours.
        generation = _read_int(entry / "generation")
        if generation != 1:
            raise EvidenceError(f"{entry}: inblob was written {generation} times, not once; try again")
        aux = entry / "auxblob"
        return TsmReport(provider=(entry / "provider").read_text().strip(), outblob=outblob,
                         auxblob=aux.read_bytes() if aux.exists() else b"", generation=generation)

    def _outblob(self, entry: Path) -> bytes:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                blob = (entry / "outblob").read_bytes()
            except FileNotFoundError:
                blob = b""
            except OSError as exc:   # the kernel answers a failed report with an I/O error
                raise EvidenceError(f"{entry / 'outblob'}: the TEE refused the report: {exc}") from None
            if blob:
                return blob
            if time.monotonic() > deadline:
                raise EvidenceError(f"{entry / 'outblob'} stayed empty for {self.timeout:.0f} s")
            time.sleep(0.02)


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except FileNotFoundError:
        return 0


def _remove(entry: Path) -> None:
    """configfs removes an entry with its attributes by rmdir; a plain directory needs its files gone first."""
    try:
        entry.rmdir()
    except OSError:
        shutil.rmtree(entry, ignore_errors=True)


GpuCollector = Callable[[bytes], list[pb.GpuEvidence]]


class Attester:
    """Answers Attest: evidence whose report data binds the edge's nonce, this server's TLS key and its
    effective settings."""

    def __init__(self, kind: TeeKind, tsm: TsmReports, settings: Mapping[str, object], spki_sha256: bytes,
                 collateral: bytes = b"", gpus: GpuCollector | None = None) -> None:
        if kind is TeeKind.NONE:
            raise ValueError("an Attester needs a TEE kind")
        self.kind = kind
        self.tsm = tsm
        self.settings_json = canonical_settings(settings)
        self.settings_sha256 = settings_digest(self.settings_json)
        self.spki_sha256 = spki_sha256
        self.collateral = collateral
        self.gpus = gpus

    def attest(self, nonce: bytes) -> pb.AttestReply:
        data = report_data(nonce, self.spki_sha256, self.settings_sha256)   # ValueError on a bad nonce
        report = self.tsm.report(data)
        expected = TSM_PROVIDERS[self.kind]
        if report.provider != expected:
            raise EvidenceError(f"configfs-tsm's provider is {report.provider!r}, not {expected!r}: this guest is "
                                f"not {self.kind.value} (--attestation)")
        reply = pb.AttestReply(tee=self.kind.value, provider=report.provider, report=report.outblob,
                               auxblob=report.auxblob, collateral=self.collateral, settings=self.settings_json,
                               tls_key_sha256=self.spki_sha256)
        if self.gpus is not None:
            reply.gpus.extend(self.gpus(gpu_nonce(nonce, self.spki_sha256, self.settings_sha256)))
        log.info("attestation: %s evidence for nonce %s…%s", self.kind.value, nonce[:4].hex(),
                 f" with {len(reply.gpus)} GPU(s)" if reply.gpus else "")
        return reply
