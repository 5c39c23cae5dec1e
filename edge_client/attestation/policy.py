"""The edge's attestation policy: which TEE, which measurements, which roots and settings it accepts (a TOML file)."""
from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from common.attestation import TeeKind, TlsKeyOrigin
from edge_client.attestation.gpu import OCSP_SERVICE, RIM_SERVICE  # NVIDIA's, asked by default

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOTS = Path(__file__).parent / "roots"

# Settings an attested cloud must have whatever the policy says: each would let edge data out of the TEE.
# (cloud_server refuses them in attested mode too; the edge checks for itself.)
ALWAYS_REQUIRED: dict[str, object] = {"record_dir": None, "state_dir": None, "allow_insecure_remote": False}


class PolicyError(ValueError):
    """The policy file is malformed; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class MinTcb:
    bootloader: int = 0
    tee: int = 0
    snp: int = 0
    microcode: int = 0


@dataclass(frozen=True)
class SevSnpRules:
    measurements: tuple[bytes, ...]            # allowed launch digests (48 bytes each)
    trusted_roots: tuple[bytes, ...]           # PEM of the AMD ARKs to pin
    min_tcb: MinTcb = MinTcb()
    allow_debug: bool = False
    vmpl: int | None = None                    # required VMPL of the reporting guest, if set


@dataclass(frozen=True)
class TdxRules:
    mrtd: tuple[bytes, ...]                    # allowed MRTDs (48 bytes each)
    rtmrs: Mapping[int, tuple[bytes, ...]]     # RTMR index -> allowed values; an index left out is not checked
    trusted_root: bytes                        # PEM of Intel's SGX Root CA
    tcb_statuses: tuple[str, ...] = ("UpToDate",)
    allow_debug: bool = False


@dataclass(frozen=True)
class GpuPolicy:
    required: bool = False                     # true: the cloud must show at least one attested GPU
    drivers: tuple[str, ...] = ()              # allowed driver versions; empty: any NVIDIA's verifier accepts
    vbios: tuple[str, ...] = ()
    rim_dir: Path | None = None                # local RIM files (by NVIDIA's file id), tried before the service
    rim_service: str | None = RIM_SERVICE   # None: never fetch a RIM (then rim_dir must hold them)
    ocsp_service: str | None = OCSP_SERVICE  # None: no revocation check (the claims say so)
    check_measurements: bool = True            # False: no RIM comparison at all (the claims say so)
    count: int | None = None                   # the number of GPUs the cloud must prove; None: any number


@dataclass(frozen=True)
class Policy:
    tee: TeeKind
    source: str = "<policy>"
    sev_snp: SevSnpRules | None = None
    tdx: TdxRules | None = None
    gpu: GpuPolicy = GpuPolicy()
    # cloud_server settings that must have exactly these values (its --help names them; dashes or underscores).
    settings: Mapping[str, object] = field(default_factory=dict)

    def required_settings(self) -> dict[str, object]:
        out: dict[str, object] = {"attestation": self.tee.value, "tls_key_origin": TlsKeyOrigin.GENERATED.value}
        out.update(self.settings)
        out.update(ALWAYS_REQUIRED)
        return out


def load(path: Path) -> Policy:
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: not TOML: {exc}") from None
    return from_dict(doc, path.parent, str(path))


def from_dict(doc: Mapping[str, Any], base: Path = Path("."), source: str = "<policy>") -> Policy:
    where = _Where(source)
    known = {"tee", "sev-snp", "tdx", "gpu", "settings"}
    where.only(doc, known, "the top level")
    tee = TeeKind.parse(str(doc.get("tee", "")) or where.fail("tee", "name the TEE: tee = \"sev-snp\" or \"tdx\""))
    if tee is TeeKind.NONE:
        where.fail("tee", "an attestation policy needs a TEE: \"sev-snp\" or \"tdx\"")
    sev = tdx = None
    if tee is TeeKind.SEV_SNP:
        sev = _sev_snp(doc.get("sev-snp") or where.fail("sev-snp", "add a [sev-snp] table with measurements"), base,
                       where)
    else:
        tdx = _tdx(doc.get("tdx") or where.fail("tdx", "add a [tdx] table with mrtd"), base, where)
    settings = {str(k).replace("-", "_"): v for k, v in dict(doc.get("settings", {})).items()}
    return Policy(tee=tee, source=source, sev_snp=sev, tdx=tdx, gpu=_gpu(doc.get("gpu", {}), base, where),
                  settings=settings)


def _sev_snp(t: Mapping[str, Any], base: Path, where: _Where) -> SevSnpRules:
    where.only(t, {"measurements", "roots", "min-tcb", "allow-debug", "vmpl"}, "[sev-snp]")
    tcb = dict(t.get("min-tcb", {}))
    where.only(tcb, {"bootloader", "tee", "snp", "microcode"}, "[sev-snp] min-tcb")
    measurements = _hexes(t.get("measurements"), 48, "[sev-snp] measurements", where)
    roots = t.get("roots") or sorted(str(p) for p in ROOTS.glob("amd_*.pem"))
    if not roots:
        where.fail("[sev-snp] roots", "no AMD root certificates are shipped with this edge_client yet: list your "
                                      "ARK PEM files (AMD KDS: /vcek/v1/{Milan,Genoa,Turin}/cert_chain)")
    vmpl = t.get("vmpl")
    return SevSnpRules(measurements=measurements,
                       trusted_roots=tuple(_read(base, r, where) for r in roots),
                       min_tcb=MinTcb(**{k: int(v) for k, v in tcb.items()}),
                       allow_debug=bool(t.get("allow-debug", False)), vmpl=None if vmpl is None else int(vmpl))


def _tdx(t: Mapping[str, Any], base: Path, where: _Where) -> TdxRules:
    rtmr_keys = {f"rtmr{i}" for i in range(4)}
    where.only(t, {"mrtd", "root", "tcb-status", "allow-debug"} | rtmr_keys, "[tdx]")
    rtmrs = {int(k[4]): _hexes(t[k], 48, f"[tdx] {k}", where) for k in sorted(rtmr_keys) if k in t}
    statuses = tuple(str(s) for s in t.get("tcb-status", ["UpToDate"]))
    return TdxRules(mrtd=_hexes(t.get("mrtd"), 48, "[tdx] mrtd", where), rtmrs=rtmrs,
                    trusted_root=_read(base, t.get("root", str(ROOTS / "intel_sgx_root_ca.pem")), where),
                    tcb_statuses=statuses, allow_debug=bool(t.get("allow-debug", False)))


def _gpu(t: Mapping[str, Any], base: Path, where: _Where) -> GpuPolicy:
    where.only(t, {"required", "drivers", "vbios", "rim-dir", "rim-service", "ocsp", "measurements", "count"},
               "[gpu]")
    rim_dir = t.get("rim-dir")
    count = t.get("count")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
        where.fail("[gpu] count", f"{count!r}: give the number of GPUs the cloud must prove (1 or more)")
    return GpuPolicy(required=bool(t.get("required", False)), drivers=tuple(str(d) for d in t.get("drivers", [])),
                     vbios=tuple(str(v) for v in t.get("vbios", [])),
                     rim_dir=None if rim_dir is None else (base / str(rim_dir) if not Path(str(rim_dir)).is_absolute()
                                                           else Path(str(rim_dir))),
                     rim_service=_service(t.get("rim-service", True), RIM_SERVICE, "[gpu] rim-service", where),
                     ocsp_service=_service(t.get("ocsp", True), OCSP_SERVICE, "[gpu] ocsp", where),
                     check_measurements=bool(t.get("measurements", True)), count=count)


def _service(value: Any, default: str, key: str, where: _Where) -> str | None:
    """true: NVIDIA's service; false: none; a string: that https URL (a mirror or a PCCS-like cache)."""
    if value is True:
        return default
    if value is False:
        return None
    if isinstance(value, str) and value.startswith("https://"):
        return value
    where.fail(key, f"{str(value)[:40]!r}: give true (NVIDIA's service), false (none) or an https:// URL")


def _hexes(values: Any, size: int, key: str, where: _Where) -> tuple[bytes, ...]:
    if not values or not isinstance(values, list):
        where.fail(key, f"list the allowed values as hex strings of {size} bytes (docs/attestation.md "
                        "says how to compute them)")
    out = []
    for v in values:
        try:
            b = bytes.fromhex(str(v))
        except ValueError:
            where.fail(key, f"{str(v)[:20]!r}… is not hex")
        if len(b) != size:
            where.fail(key, f"a value has {len(b)} bytes, expected {size}")
        out.append(b)
    return tuple(out)


def _read(base: Path, name: str, where: _Where) -> bytes:
    path = Path(name) if Path(name).is_absolute() else base / name
    try:
        return path.read_bytes()
    except OSError as exc:
        where.fail("roots", f"cannot read {path}: {exc.strerror}")


@dataclass(frozen=True)
class _Where:
    source: str

    def fail(self, key: str, what: str) -> NoReturn:
        raise PolicyError(f"{self.source}: {key}: {what}")

    def only(self, table: Mapping[str, Any], known: set[str], name: str) -> None:
        unknown = sorted(set(table) - known)
        if unknown:
            self.fail(name, f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
