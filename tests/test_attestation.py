"""Attestation end to end: real cloud_server processes whose evidence comes from a configfs-tsm stand-in
(tests/tsm_double.py, signing with a throw-away AMD-shaped chain), real edges, HAProxy passing TLS through."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from cloud_server import launch
from common.wire import dlora_pb2 as pb
from common.wire import dlora_pb2_grpc as pb_grpc
from edge_client.attestation import policy as attestation
from edge_client.attestation.client import attest
from edge_client.attestation.errors import AttestationFailed
from edge_client.session import Credentials

from helpers import EXAMPLES, HAPROXY, assert_step_exact, cli, connect, tsm_double

MEASUREMENT = bytes(range(48)).hex()
OTHER = bytes(48).hex()
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def tsm(tmp_path_factory):
    """The configfs-tsm stand-in: (its report directory, the directory with its chain's root)."""
    with tsm_double(tmp_path_factory.mktemp("tsm"), "sev-snp", MEASUREMENT) as dirs:
        yield dirs


def attested_args(model_dir: Path, tsm_dir: Path) -> list[str]:
    return ["--model", str(model_dir), "--device", "cpu", "--attestation", "sev-snp", "--tsm-dir", str(tsm_dir),
            "--gpu-attestation", "off"]


@pytest.fixture(scope="module")
def attested(model_dirs, tsm, tmp_path_factory):
    """An attested cloud_server on the tiny Llama: its address."""
    log = tmp_path_factory.mktemp("attested-logs") / "server.log"
    with launch.start(attested_args(model_dirs["llama"], tsm[0]), log, timeout=300) as server:
        yield server.address, log


def write_policy(path: Path, chain: Path, measurement: str = MEASUREMENT, extra: str = "") -> Path:
    path.write_text(f'tee = "sev-snp"\n[sev-snp]\nmeasurements = ["{measurement}"]\n'
                    f'roots = ["{chain / "root.pem"}"]\n{extra}')
    return path


@pytest.fixture
def policy_file(tmp_path, tsm) -> Path:
    return write_policy(tmp_path / "policy.toml", tsm[1])


def test_attest_command_prints_what_the_cloud_proves(attested, policy_file):
    address, _ = attested
    done = cli("edge_client", "attest", "--server", address, "--policy", str(policy_file), timeout=120)
    assert done.returncode == 0, done.stderr
    claims = json.loads(done.stdout)
    assert claims["tee"] == "sev-snp" and claims["cpu"]["measurement"] == MEASUREMENT
    assert claims["settings"]["attestation"] == "sev-snp" and claims["settings"]["tls_key_origin"] == "generated"
    assert claims["settings"]["record_dir"] is None and claims["gpus"] == []
    assert "OK" in done.stderr


def test_attest_command_names_the_failed_check(attested, tmp_path, tsm):
    address, _ = attested
    wrong = write_policy(tmp_path / "wrong.toml", tsm[1], OTHER)
    done = cli("edge_client", "attest", "--server", address, "--policy", str(wrong), timeout=120)
    assert done.returncode == 1
    assert "sev-snp.measurement" in done.stderr and OTHER[:12] in done.stderr


def test_attested_edge_trains_exactly(attested, policy_file, model_dirs, cache):
    """An attested session is the same session: its step equals in-process training (1e-5)."""
    address, _ = attested
    creds = Credentials(attestation=attestation.load(policy_file))
    edge = connect(address, cache, credentials=creds)
    try:
        assert len(edge.session.attestations) == 1
        assert edge.session.attestations[0]["cpu"]["measurement"] == MEASUREMENT
        assert_step_exact(edge, model_dirs["llama"], edge.batch(EXAMPLES[:2]))
    finally:
        edge.session.close()


def test_failing_policy_sends_nothing(model_dirs, tmp_path, tsm, jsonl):
    """Against a recording, non-attested (plaintext) server: the edge stops at the TLS handshake, and the
    recording holds no call at all, not even Attest."""
    record = tmp_path / "record"
    with launch.start(["--model", str(model_dirs["llama"]), "--device", "cpu", "--record-dir", str(record)],
                      tmp_path / "server.log", timeout=300) as server:
        policy = write_policy(tmp_path / "policy.toml", tsm[1])
        done = cli("edge_client", "train", "--server", server.address, "--data", str(jsonl), "--test", str(jsonl),
                   "--steps", "1", "--out", str(tmp_path / "run"), "--attestation-policy", str(policy),
                   "--token", "a-token-that-must-not-leak-0123", timeout=300)
    assert done.returncode == 1, done.stderr
    assert "nothing was sent" in done.stderr and "tls.handshake" in done.stderr
    calls = sorted(p.name for p in record.rglob("*") if p.is_file())
    assert calls == [], calls
    assert b"a-token-that-must-not-leak" not in b"".join(p.read_bytes() for p in record.rglob("*") if p.is_file())


def test_failing_policy_opens_no_session_on_the_attested_server(attested, tmp_path, tsm, cache):
    address, log = attested
    before = log.read_text().count("opened by")
    creds = Credentials(attestation=attestation.load(write_policy(tmp_path / "p.toml", tsm[1], OTHER)))
    with pytest.raises(AttestationFailed) as failed:
        connect(address, cache, credentials=creds)
    assert failed.value.check == "sev-snp.measurement"
    assert log.read_text().count("opened by") == before


def test_policy_on_settings(attested, tmp_path, tsm):
    address, _ = attested
    rules = attestation.load(write_policy(tmp_path / "p.toml", tsm[1], extra='[settings]\nmode = "dlora"\n'))
    with pytest.raises(AttestationFailed) as failed:
        attest(address, rules)
    assert failed.value.check == "settings.mode" and "'any'" in failed.value.detail


class Relay(pb_grpc.DLoRAServicer):
    """A server in the middle with its own TLS key, handing on the attested server's evidence."""

    def __init__(self, upstream: str, cert_pem: bytes) -> None:
        self.upstream, self.cert_pem = upstream, cert_pem

    def Attest(self, request, context):
        from edge_client.attestation.client import AttestedCloud

        pinned = AttestedCloud(self.upstream, self.cert_pem, "dlora-attested", {})
        with grpc.secure_channel(self.upstream, pinned.channel_credentials(),
                                 options=[("grpc.ssl_target_name_override", "dlora-attested")]) as ch:
            return pb_grpc.DLoRAStub(ch).Attest(request, timeout=30)


def test_relayed_evidence_is_refused(attested, policy_file):
    """Evidence is bound to the TLS key the edge reaches: a relay with its own key cannot pass it on."""
    import ssl

    from cloud_server import tls_identity
    from edge_client.attestation.client import peer_certificate

    address, _ = attested
    upstream_pem = ssl.DER_cert_to_PEM_cert(peer_certificate(address, 10)).encode()
    ident = tls_identity.generate()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_DLoRAServicer_to_server(Relay(address, upstream_pem), server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(ident.key_pem, ident.cert_pem)]))
    server.start()
    try:
        with pytest.raises(AttestationFailed) as failed:
            attest(f"127.0.0.1:{port}", attestation.load(policy_file))
        assert failed.value.check == "binding.tls-key"
    finally:
        server.stop(0)


@pytest.mark.parametrize("flag", [["--record-dir", "REC"], ["--state-dir", "STATE"], ["--log-level", "DEBUG"],
                                  ["--allow-insecure-remote"]])
def test_attested_mode_refuses_exposing_settings(flag, tmp_path):
    args = [a.replace("REC", str(tmp_path / "r")).replace("STATE", str(tmp_path / "s")) for a in flag]
    done = subprocess.run([sys.executable, "-m", "cloud_server", "--attestation", "sev-snp", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "refuses" in done.stderr and args[0] in done.stderr


def test_attested_mode_needs_the_tee(tmp_path, model_dirs):
    done = subprocess.run([sys.executable, "-m", "cloud_server", "--model", str(model_dirs["llama"]), "--device",
                           "cpu", "--attestation", "sev-snp", "--tsm-dir", str(tmp_path / "none"), "--port", "0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "configfs-tsm" in done.stderr


def test_tdx_needs_collateral():
    done = subprocess.run([sys.executable, "-m", "cloud_server", "--attestation", "tdx"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "--attestation-collateral" in done.stderr


@pytest.mark.skipif(HAPROXY is None, reason="needs haproxy (apt-get install haproxy; .ci/run installs it)")
def test_passthrough_failover_attests_the_new_replica(model_dirs, tsm, tmp_path, cache):
    """TLS ends in the replicas; HAProxy forwards TCP. The edge attests the replica it reaches, and after
    that replica dies, the one it reaches next, before its next step."""
    from deploy.local import Cluster

    rules = attestation.load(write_policy(tmp_path / "p.toml", tsm[1]))
    with Cluster(2, attested_args(model_dirs["llama"], tsm[0]), lb_options={"passthrough": True, "fall": 1},
                 log_dir=tmp_path / "cluster") as cluster:
        edge = connect(cluster.address, cache, credentials=Credentials(attestation=rules))
        try:
            batch = edge.batch(EXAMPLES[:2])
            first = edge.step(1, batch)
            serving = _serving_replica(cluster)
            cluster.kill(serving)
            second = edge.step(2, batch)
            keys = [a["tls_key_sha256"] for a in edge.session.attestations]
            assert len(keys) == 2 and keys[0] != keys[1], keys
            assert edge.session.reconnects == 1 and first > 0 and second > 0
        finally:
            edge.session.close()


def _serving_replica(cluster) -> int:
    """The replica holding the session: the one whose log shows it opened."""
    for i, r in enumerate(cluster.replicas):
        if "opened by" in Path(r.log_path).read_text():
            return i
    raise AssertionError("no replica opened the session")


def test_concurrent_attestations_each_get_their_own_evidence(attested, policy_file):
    address, _ = attested
    rules = attestation.load(policy_file)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(attest(address, rules))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 4 and len({r.claims["cpu"]["report_data"] for r in results}) == 4


def test_non_attested_server_refuses_attest(servers):
    from cloud_server.tls_identity import ATTESTED_NAME  # noqa: F401 - the module loads without a TEE

    with grpc.insecure_channel(servers["llama"]) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.DLoRAStub(ch).Attest(pb.AttestRequest(nonce=bytes(32)), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--attestation none" in err.value.details()
