"""GPU evidence for Attest: from every NVIDIA GPU in confidential-computing mode, through NVIDIA's own code.

The evidence is what NVIDIA's attestation SDK (nv-attestation-sdk) sends a remote verifier: its
`attest_gpu_remote.get_evidence` is `verifier.cc_admin.collect_gpu_evidence_remote` of nv-local-gpu-verifier,
which this module calls directly (the SDK's wrapper turns every error into an empty list, which a server must
not send as "no GPUs"). Per GPU: the attestation certificate chain (PEM) and the SPDM measurement report
made for the nonce, through NVML (nvidia-ml-py).

Everything here only reads: the confidential-computing state, the GPU count, the certificates and a report.
It never sets a mode, a setting or the GPUs' ready state (NVIDIA's local verifier sets that after its own
check; here the operator does it, e.g. `nvidia-smi conf-compute -srs 1`).
"""
from __future__ import annotations

import base64
import logging
import secrets
import threading
from types import ModuleType
from typing import Any

from cloud_server.attestation import EvidenceError
from common.attestation import NONCE_BYTES
from common.nvidia_verifier import quiet_import
from common.wire import dlora_pb2 as pb

log = logging.getLogger(__name__)

_INSTALL = "pip install 'dlora[gpu-attestation]' (NVIDIA's nv-local-gpu-verifier and nvidia-ml-py)"
# The host side, which this server never touches: NVIDIA's gpu-admin-tools switch the mode.
_CC_ON = ("switch it on from the host with NVIDIA's gpu-admin-tools (nvidia_gpu_tools.py --set-cc-mode=on "
          "--reset-after-cc-mode-switch) and pass the GPU to this confidential VM; cloud_server never changes "
          "GPU modes")


class NvidiaGpus:
    """A GpuCollector (cloud_server.attestation): `gpus(nonce)` gives one GpuEvidence per GPU.

    `nvml` and `cc_admin` default to the modules `pynvml` (nvidia-ml-py) and `verifier.cc_admin`
    (nv-local-gpu-verifier), imported when first needed."""

    def __init__(self, nvml: Any = None, cc_admin: Any = None) -> None:
        self._nvml = nvml
        self._cc_admin = cc_admin
        self._lock = threading.Lock()   # NVIDIA's collector keeps its device handles in class attributes
        self.count = 0

    def check(self) -> int:
        """At start: NVML is there, it sees GPUs, confidential computing is on (not in DevTools mode), and one
        round of evidence can be made; the number of GPUs, or EvidenceError saying what is missing."""
        nvml = self._nvml_module()
        try:
            nvml.nvmlInit()
        except Exception as exc:
            raise EvidenceError(f"GPU attestation: NVML does not start ({_nvml_error(exc)}): is the NVIDIA driver "
                                "installed and loaded in this VM (libnvidia-ml.so.1)? Or run with "
                                "--gpu-attestation off") from None
        try:
            count = int(nvml.nvmlDeviceGetCount())
            state = nvml.nvmlSystemGetConfComputeState()
        except Exception as exc:
            raise EvidenceError(f"GPU attestation: NVML cannot tell the confidential-computing state "
                                f"({_nvml_error(exc)}): a driver without confidential computing (R535 or "
                                "later needed)?") from None
        if count == 0:
            raise EvidenceError("GPU attestation: NVML sees no NVIDIA GPU in this VM; pass one through or run with "
                                "--gpu-attestation off")
        if getattr(state, "ccFeature", 0) != getattr(nvml, "NVML_CC_SYSTEM_FEATURE_ENABLED", 1):
            raise EvidenceError(f"GPU attestation: confidential-computing mode is off on this system's {count} GPU(s); "
                                f"{_CC_ON}")
        if getattr(state, "devToolsMode", 0) != getattr(nvml, "NVML_CC_SYSTEM_DEVTOOLS_MODE_OFF", 0):
            raise EvidenceError("GPU attestation: the GPUs are in confidential-computing DevTools mode (their "
                                f"protections relaxed for debugging), which edges must not trust; {_CC_ON}")
        try:
            ready = nvml.nvmlSystemGetConfComputeGpusReadyState()
        except Exception:
            ready = None
        if ready == getattr(nvml, "NVML_CC_ACCEPTING_CLIENT_REQUESTS_FALSE", 0):
            log.warning("GPU attestation: the GPUs are not in the ready state, so CUDA work is refused; this server "
                        "does not set it (after your own check: nvidia-smi conf-compute -srs 1)")
        self.count = count
        evidence = self(secrets.token_bytes(NONCE_BYTES))   # fails here, at start, rather than at an edge's Attest
        log.info("GPU attestation: %d GPU(s) in confidential-computing mode (%s)", len(evidence),
                 ", ".join(sorted({g.arch for g in evidence})))
        return count

    def __call__(self, nonce: bytes) -> list[pb.GpuEvidence]:
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"a GPU attestation nonce has {NONCE_BYTES} bytes, got {len(nonce)}")
        cc_admin = self._cc_admin_module()
        with self._lock:
            try:
                # ppcie_mode=True: refuse a protected-PCIe (multi-GPU) system, which needs NVIDIA's PPCIe verifier.
                found = cc_admin.collect_gpu_evidence_remote(nonce.hex(), ppcie_mode=True)
            except Exception as exc:
                raise EvidenceError(f"GPU attestation: NVIDIA's collector failed: {_chain(exc)}") from None
        out = []
        for index, gpu in enumerate(found):
            try:
                out.append(pb.GpuEvidence(certificate_chain=base64.b64decode(gpu["certificate"], validate=True),
                                          attestation_report=base64.b64decode(gpu["evidence"], validate=True),
                                          arch=str(gpu["arch"])))
            except (KeyError, TypeError, ValueError) as exc:
                raise EvidenceError(f"GPU attestation: NVIDIA's collector gave GPU {index} in an unknown form "
                                    f"({type(exc).__name__}: {exc})") from None
        if not out:
            raise EvidenceError("GPU attestation: NVIDIA's collector found no GPU")
        if self.count and len(out) != self.count:
            raise EvidenceError(f"GPU attestation: evidence for {len(out)} GPU(s), NVML saw {self.count}")
        return out

    def _nvml_module(self) -> Any:
        if self._nvml is None:
            self._nvml = _load("pynvml", "nvidia-ml-py")
        return self._nvml

    def _cc_admin_module(self) -> Any:
        if self._cc_admin is None:
            self._cc_admin = _load("verifier.cc_admin", "nv-local-gpu-verifier")
        return self._cc_admin


def _load(module: str, dist: str) -> ModuleType:
    try:
        return quiet_import(module)
    except ModuleNotFoundError:
        raise EvidenceError(f"GPU attestation needs {dist}, which is not installed: {_INSTALL}; or run with "
                            "--gpu-attestation off") from None
    except Exception as exc:   # its pinned dependencies missing or replaced
        raise EvidenceError(f"GPU attestation: {dist} does not load ({type(exc).__name__}: {exc}); {_INSTALL}") \
            from None


def _nvml_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _chain(exc: BaseException) -> str:
    """NVIDIA's collector wraps its errors: name each one, outermost first."""
    parts, seen = [], 0
    cur: BaseException | None = exc
    while cur is not None and seen < 4:
        parts.append(f"{type(cur).__name__}: {cur}".strip())
        cur, seen = cur.__cause__, seen + 1
    return " <- ".join(parts)
