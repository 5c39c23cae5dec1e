"""An attested cloud_server on TDX, end to end: its configfs-tsm stand-in signs quotes with a throw-away DCAP
chain (tests/tdx_chain.py); an edge with a TDX policy trains exactly, and one whose MRTD policy fails sends nothing."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from cloud_server import launch
from edge_client.attestation import policy as attestation
from edge_client.attestation.errors import AttestationFailed
from edge_client.session import Credentials

from helpers import EXAMPLES, assert_step_exact, connect, tsm_double

MRTD = bytes(range(48))


@pytest.fixture(scope="module")
def tsm(tmp_path_factory):
    """The configfs-tsm stand-in signing TDX quotes: (its report directory, the directory with root and collateral)."""
    with tsm_double(tmp_path_factory.mktemp("tsm-tdx"), "tdx", MRTD.hex()) as dirs:
        yield dirs


@pytest.fixture(scope="module")
def attested(model_dirs, tsm, tmp_path_factory):
    """A TDX-attested cloud_server on the tiny Llama: its address and log."""
    log = tmp_path_factory.mktemp("attested-tdx-logs") / "server.log"
    args = ["--model", str(model_dirs["llama"]), "--device", "cpu", "--attestation", "tdx", "--tsm-dir",
            str(tsm[0]), "--attestation-collateral", str(tsm[1] / "collateral.json"), "--gpu-attestation", "off"]
    with launch.start(args, log, timeout=300) as server:
        yield server.address, log


def write_policy(path: Path, chain: Path, mrtd: str = MRTD.hex()) -> Path:
    path.write_text(f'tee = "tdx"\n[tdx]\nmrtd = ["{mrtd}"]\nroot = "{chain / "root.pem"}"\n')
    return path


def test_tdx_attested_edge_trains_and_a_wrong_mrtd_sends_nothing(attested, tsm, tmp_path, model_dirs, cache):
    address, log = attested
    creds = Credentials(attestation=attestation.load(write_policy(tmp_path / "policy.toml", tsm[1])))
    edge = connect(address, cache, credentials=creds)
    try:
        claims = edge.session.attestations[0]
        assert claims["tee"] == "tdx" and claims["cpu"]["mrtd"] == MRTD.hex()
        assert claims["cpu"]["tcb_status"] == "UpToDate" and claims["cpu"]["debug"] is False
        assert_step_exact(edge, model_dirs["llama"], edge.batch(EXAMPLES[:2]))
    finally:
        edge.session.close()
    before = log.read_text().count("opened by")
    wrong = Credentials(attestation=attestation.load(write_policy(tmp_path / "wrong.toml", tsm[1], "ab" * 48)))
    with pytest.raises(AttestationFailed) as failed:
        connect(address, cache, credentials=wrong)
    assert failed.value.check == "tdx.mrtd" and re.search("abab", failed.value.detail)
    assert log.read_text().count("opened by") == before
