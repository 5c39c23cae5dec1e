"""A stand-in for the kernel's configfs-tsm report directory, for real cloud_server processes in tests.

The kernel makes a report when `outblob` is read; a plain directory cannot, so this process watches DIR:
for each entry a cloud_server makes and writes `inblob` into, it writes `provider`, `generation`, a report
signed by a throw-away vendor chain (tests/snp_chain.py, tests/tdx_chain.py) over that inblob, and for
SEV-SNP the certificate table as `auxblob`. The chain's root (and TDX collateral) go to --out, for the
test's policy and the server's --attestation-collateral. Stops by itself after --lifetime seconds.

    python tests/tsm_double.py --dir D --kind sev-snp --measurement HEX --out S
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

PROVIDERS = {"sev-snp": "sev_guest", "tdx": "tdx_guest"}


class Signer:
    def __init__(self, kind: str, measurement: bytes) -> None:
        self.kind = kind
        self.measurement = measurement
        if kind == "sev-snp":
            from snp_chain import SnpTestChain

            self.snp = SnpTestChain()
            self.root_pem = self.snp.ark_pem
        else:
            from tdx_chain import TdxTestChain

            self.tdx = TdxTestChain()
            self.root_pem = self.tdx.root_pem

    def outputs(self, inblob: bytes) -> dict[str, bytes]:
        if self.kind == "sev-snp":
            return {"outblob": self.snp.report(inblob, self.measurement), "auxblob": self.snp.auxblob()}
        return {"outblob": self.tdx.quote(inblob, self.measurement)}

    def collateral(self) -> bytes | None:
        return self.tdx.collateral() if self.kind == "tdx" else None


def _write(path: Path, data: bytes) -> None:
    """Whole or not at all: the server may read at any moment."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def serve(root: Path, signer: Signer, provider: str, lifetime: float) -> None:
    done: set[str] = set()
    deadline = time.monotonic() + lifetime
    while time.monotonic() < deadline:
        for entry in root.iterdir():
            inblob = entry / "inblob"
            if entry.name in done or not inblob.exists():
                continue
            data = inblob.read_bytes()
            if len(data) != 64:   # written but not flushed yet: look again next round
                continue
            _write(entry / "provider", provider.encode() + b"\n")
            _write(entry / "generation", b"1\n")
            outputs = signer.outputs(data)
            for name in ("auxblob", "outblob"):   # outblob last: the server reads once it is there
                if name in outputs:
                    _write(entry / name, outputs[name])
            done.add(entry.name)
        time.sleep(0.01)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, required=True, help="the directory cloud_server --tsm-dir points at")
    p.add_argument("--kind", choices=list(PROVIDERS), required=True)
    p.add_argument("--measurement", required=True, help="hex: the launch measurement (SEV-SNP) or MRTD (TDX)")
    p.add_argument("--out", type=Path, required=True, help="where root.pem (and collateral.json) are written")
    p.add_argument("--provider", default=None, help="provider to claim (default: the kind's own)")
    p.add_argument("--lifetime", type=float, default=900.0, help="seconds before it stops by itself")
    args = p.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    signer = Signer(args.kind, bytes.fromhex(args.measurement))
    (args.out / "root.pem").write_bytes(signer.root_pem)
    collateral = signer.collateral()
    if collateral is not None:
        (args.out / "collateral.json").write_bytes(collateral)
    print("tsm-double ready", flush=True)
    serve(args.dir, signer, args.provider or PROVIDERS[args.kind], args.lifetime)
    return 0


if __name__ == "__main__":
    sys.exit(main())
