"""The attestation contract both sides share: TEE kinds, the nonce, and what the evidence's report data binds."""
from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping

NONCE_BYTES = 32
REPORT_DATA_BYTES = 64   # TDX and SEV-SNP both carry 64 bytes of caller data in their signed report
_REPORT_DOMAIN = b"dlora-attest-v1\0"
_GPU_DOMAIN = b"dlora-gpu-attest-v1\0"


class TeeKind(str, enum.Enum):
    """The CPU trusted execution environment a cloud_server runs in."""

    NONE = "none"
    TDX = "tdx"
    SEV_SNP = "sev-snp"

    @classmethod
    def parse(cls, name: str) -> TeeKind:
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"unknown TEE kind {name!r}; choose one of {', '.join(k.value for k in cls)}") from None


# What the kernel's configfs-tsm `provider` file names for each kind (Documentation/ABI/testing/configfs-tsm).
TSM_PROVIDERS = {TeeKind.TDX: "tdx_guest", TeeKind.SEV_SNP: "sev_guest"}


class TlsKeyOrigin(str, enum.Enum):
    """Where the attested server's TLS key came from: made inside the TEE at start, or read from a file."""

    GENERATED = "generated"   # never left the TEE: a relaying operator cannot terminate the edge's TLS
    FILE = "file"             # whoever wrote the file holds it too


def canonical_settings(settings: Mapping[str, object]) -> bytes:
    """The bytes the settings digest is taken over: sorted keys, no spaces, UTF-8."""
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def settings_digest(settings_json: bytes) -> bytes:
    return hashlib.sha256(settings_json).digest()


def spki_digest(spki_der: bytes) -> bytes:
    """SHA-256 of a TLS certificate's SubjectPublicKeyInfo: the key, whatever certificate wraps it."""
    return hashlib.sha256(spki_der).digest()


def _check(nonce: bytes, spki_sha256: bytes, settings_sha256: bytes) -> None:
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"an attestation nonce has {NONCE_BYTES} bytes, got {len(nonce)}")
    if len(spki_sha256) != 32 or len(settings_sha256) != 32:
        raise ValueError("the TLS key and settings digests are SHA-256 (32 bytes each)")


def report_data(nonce: bytes, spki_sha256: bytes, settings_sha256: bytes) -> bytes:
    """The 64 bytes the CPU evidence must carry: the nonce itself (freshness: no replay), then SHA-256 over
    the TLS key the edge reaches (no relay through another server) and the effective settings (no evidence
    obtained under other settings). The nonce travels in the clear so a mismatch can be named."""
    _check(nonce, spki_sha256, settings_sha256)
    return nonce + key_and_settings(spki_sha256, settings_sha256)


def key_and_settings(spki_sha256: bytes, settings_sha256: bytes) -> bytes:
    """The second half of the report data."""
    return hashlib.sha256(_REPORT_DOMAIN + spki_sha256 + settings_sha256).digest()


def gpu_nonce(nonce: bytes, spki_sha256: bytes, settings_sha256: bytes) -> bytes:
    """The 32-byte nonce the GPU evidence is made for: the same three things, under another domain."""
    _check(nonce, spki_sha256, settings_sha256)
    return hashlib.sha256(_GPU_DOMAIN + nonce + spki_sha256 + settings_sha256).digest()
