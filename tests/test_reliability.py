"""Reliability and security against real server processes on 127.0.0.1."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from cloud_server import launch
from common.wire import dlora_pb2 as pb
from common.wire import dlora_pb2_grpc as pb_grpc
from deploy.local import free_port
from edge_client.errors import CloudError
from edge_client.session import CloudSession, Credentials, RetryPolicy

from certs import make_pki
from helpers import RawStep, assert_step_exact, cli, connect, expect_error, kr_trainer, run_raw, start_msg

ALICE, BOB = "a" * 24, "b" * 24


@pytest.fixture(scope="module")
def token_server(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    (root / "tokens").write_text(f"# client token\nalice {ALICE}\nbob {BOB}\n")
    with launch.start(["--model", str(model_dirs["llama"]), "--tokens", str(root / "tokens")],
                      root / "server.log", timeout=300) as server:
        yield server.address


def test_tokens_and_session_binding(token_server, tmp_path):
    channel = grpc.insecure_channel(token_server)
    stub = pb_grpc.DLoRAStub(channel)
    expect_error(lambda: stub.OpenSession(pb.OpenSessionRequest()), grpc.StatusCode.UNAUTHENTICATED, "needs a token")
    expect_error(lambda: stub.OpenSession(pb.OpenSessionRequest(), metadata=(("authorization", "Bearer " + "x" * 24),)),
                 grpc.StatusCode.UNAUTHENTICATED, "invalid token")
    expect_error(lambda: stub.OpenSession(pb.OpenSessionRequest(), metadata=(("authorization", ALICE),)),
                 grpc.StatusCode.UNAUTHENTICATED, "malformed")
    alice = connect(token_server, tmp_path / "c", credentials=Credentials(token=ALICE))
    try:
        sid = alice.session.session_id
        bob = (("authorization", f"Bearer {BOB}"),)
        # Bob holds Alice's session id, and still cannot touch her session.
        expect_error(lambda: list(stub.GetEdgeAssets(pb.EdgeAssetsRequest(session_id=sid), metadata=bob)),
                     grpc.StatusCode.NOT_FOUND)
        expect_error(lambda: stub.ParkAdapters(pb.ParkRequest(session_id=sid), metadata=bob), grpc.StatusCode.NOT_FOUND)
        expect_error(lambda: stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=bob),
                     grpc.StatusCode.NOT_FOUND)

        def bob_step():
            raw = RawStep(stub, metadata=bob)
            raw.send(start_msg(sid))
            try:
                raw.recv()
            finally:
                raw.close()
        expect_error(bob_step, grpc.StatusCode.NOT_FOUND, "unknown session")
        # Alice's session is untouched and works.
        assert alice.step(1, alice.batch()) > 0
    finally:
        alice.session.close()
        channel.close()


def test_sessions_per_client_quota(model_dirs, tmp_path):
    """One client cannot take every slot: past its quota it is refused, others still get in."""
    (tmp_path / "tokens").write_text(f"alice {ALICE}\nbob {BOB}\n")
    args = ["--model", str(model_dirs["llama"]), "--tokens", str(tmp_path / "tokens"),
            "--max-sessions", "4", "--max-sessions-per-client", "2"]
    with launch.start(args, tmp_path / "s.log", timeout=300) as server:
        channel = grpc.insecure_channel(server.address)
        stub = pb_grpc.DLoRAStub(channel)
        alice, bob = (("authorization", f"Bearer {ALICE}"),), (("authorization", f"Bearer {BOB}"),)
        held = [stub.OpenSession(pb.OpenSessionRequest(), metadata=alice).session_id for _ in range(2)]
        expect_error(lambda: stub.OpenSession(pb.OpenSessionRequest(), metadata=alice),
                     grpc.StatusCode.RESOURCE_EXHAUSTED, "already holds 2 sessions")
        assert stub.OpenSession(pb.OpenSessionRequest(), metadata=bob).session_id
        # Closing one of Alice's sessions gives her the slot back.
        stub.CloseSession(pb.CloseSessionRequest(session_id=held[0]), metadata=alice)
        assert stub.OpenSession(pb.OpenSessionRequest(), metadata=alice).session_id
        channel.close()


def test_tls_and_mutual_tls(model_dirs, tmp_path):
    pki = make_pki(tmp_path / "pki")
    tls = ["--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"])]
    fast = RetryPolicy(retries=0)
    with launch.start(["--model", str(model_dirs["llama"]), *tls], tmp_path / "tls.log", timeout=300) as server:
        good = connect(server.address, tmp_path / "c", credentials=Credentials.from_files(ca=pki["ca"]))
        assert good.step(1, good.batch()) > 0
        good.session.close()
        with pytest.raises(CloudError, match="no cloud_server answers"):
            CloudSession(server.address, timeout=3, retry=fast)          # plaintext against TLS
    with launch.start(["--model", str(model_dirs["llama"]), *tls, "--tls-client-ca", str(pki["ca"])],
                      tmp_path / "mtls.log", timeout=300) as server:
        with pytest.raises(CloudError):
            CloudSession(server.address, timeout=3, retry=fast, credentials=Credentials.from_files(ca=pki["ca"]))
        creds = Credentials.from_files(ca=pki["ca"], cert=pki["client_cert"], key=pki["client_key"])
        good = connect(server.address, tmp_path / "c", credentials=creds)
        assert good.step(1, good.batch()) > 0
        good.session.close()


def test_plaintext_on_a_network_address_is_refused():
    res = subprocess.run([sys.executable, "-m", "cloud_server", "--host", "0.0.0.0", "--port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "refusing plaintext on non-loopback address 0.0.0.0" in res.stderr


def test_limits(model_dirs, tmp_path):
    args = ["--model", str(model_dirs["llama"]), "--idle-timeout", "1.5", "--step-timeout", "1",
            "--max-message-mb", "0.05", "--max-batch-tokens", "64"]
    with launch.start(args, tmp_path / "s.log", timeout=300) as server:
        channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 1 << 24)])
        stub = pb_grpc.DLoRAStub(channel)
        sid = stub.OpenSession(pb.OpenSessionRequest()).session_id
        # Over the message size: refused by gRPC before our code runs.
        expect_error(lambda: run_raw(stub, start_msg(sid, b=8, t=60)), grpc.StatusCode.RESOURCE_EXHAUSTED)
        # Over the batch-token limit.
        expect_error(lambda: run_raw(stub, start_msg(sid, b=5, t=13)), grpc.StatusCode.RESOURCE_EXHAUSTED, "64 tokens")
        # An edge that stops answering mid-step runs into the step deadline.
        raw = RawStep(stub)
        raw.send(start_msg(sid))
        assert raw.recv().WhichOneof("kind") == "site_input"
        expect_error(raw.recv, grpc.StatusCode.DEADLINE_EXCEEDED, "step deadline")
        raw.close()
        # An idle session is freed.
        time.sleep(3.5)
        expect_error(lambda: run_raw(stub, start_msg(sid)), grpc.StatusCode.NOT_FOUND)
        channel.close()


def test_server_killed_mid_step_then_restarted(model_dirs, tmp_path):
    port = free_port()
    args = ["--model", str(model_dirs["llama"]), "--port", str(port)]
    # Reference: the same ten steps, uninterrupted.
    with launch.start(args, tmp_path / "ref.log", timeout=300):
        ref, ref_batches = kr_trainer(f"127.0.0.1:{port}", tmp_path)
        for b in ref_batches:
            ref.train_step(b)
        ref.session.close()
    server = launch.start(args, tmp_path / "a.log", timeout=300)
    trainer, batches_ = kr_trainer(f"127.0.0.1:{port}", tmp_path)
    restarted: dict[str, launch.ServerProcess] = {}
    real_loss = trainer.loss

    def loss_that_kills(hidden, batch):
        # Step 5, between forward and backward: the server dies, and comes back 2 s later.
        if trainer.step_id == 5 and "server" not in restarted:
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait()
            restarted["server"] = None

            def restart():
                time.sleep(2)
                restarted["server"] = launch.start(args, tmp_path / "b.log", timeout=300)
            threading.Thread(target=restart, daemon=True).start()
        return real_loss(hidden, batch)

    trainer.loss = loss_that_kills
    try:
        for b in batches_:
            trainer.train_step(b)
        assert trainer.session.reconnects >= 1
        assert trainer.live != set(trainer.adapters)    # parked adapters were re-parked
        for name, ad in trainer.adapters.items():
            for w in ("lora_A", "lora_B"):
                got, want = getattr(ad, w), getattr(ref.adapters[name], w)
                assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), f"{name}.{w}"
        trainer.session.close()
    finally:
        for s in (server, restarted.get("server")):
            if s:
                s.stop()


def test_lost_session_is_reopened_without_backoff(model_dirs, tmp_path, caplog):
    """A restarted server answers NOT_FOUND for the old session: it is up, so the edge
    opens a new session at once (no backoff wait) and the step it retries is exact."""
    port = free_port()
    args = ["--model", str(model_dirs["llama"]), "--port", str(port)]
    with launch.start(args, tmp_path / "a.log", timeout=300):
        # Any backoff logs "retry 1/3 in ... s", which the test rules out below.
        edge = connect(f"127.0.0.1:{port}", tmp_path / "cache", retry=RetryPolicy(retries=3, backoff=0.05))
        edge.step(1, edge.batch())
        old = edge.session.session_id
    with launch.start(args, tmp_path / "b.log", timeout=300):
        for ad in edge.adapters.values():
            ad.zero_grad()
        try:
            # The channel saw server A die and may still be in gRPC's reconnect backoff:
            # an UNAVAILABLE then would rightly back off. Wait until it reaches server B.
            grpc.channel_ready_future(edge.session.channel).result(timeout=30)
            with caplog.at_level("WARNING", logger="edge_client.session"):
                assert_step_exact(edge, model_dirs["llama"], edge.batch(), step_id=2)
            assert edge.session.reconnects == 1 and edge.session.session_id != old
            assert not [r for r in caplog.records if "(NOT_FOUND)" in r.getMessage() and "retry" in r.getMessage()], \
                caplog.text
            assert "opening a new one now" in caplog.text
        finally:
            edge.session.close()


def test_checkpoint_resume_equals_uninterrupted(servers, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(f'{{"text": "item {i}", "label": "{"red" if i % 2 else "blue"}"}}' for i in range(40)))
    common = ["edge_client", "train", "--server", servers["llama"], "--data", str(data), "--batch-size", "4",
              "--eval-limit", "4", "--rank", "2", "--policy", "kr", "--period", "2", "--warmup-steps", "2",
              "--budget", "0.34", "--no-progress"]
    full = cli(*common, "--steps", "8", "--checkpoint-every", "4", "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    part = cli(*common, "--steps", "4", "--out", str(tmp_path / "part"))
    assert part.returncode == 0, part.stderr
    assert not list((tmp_path / "part").glob("*.part"))      # written atomically
    resumed = cli(*common, "--steps", "8", "--resume", "--out", str(tmp_path / "part"))
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "part" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k
    changed = cli(*[a if a != "kr" else "random" for a in common], "--steps", "8", "--resume",
                  "--out", str(tmp_path / "part"))
    assert changed.returncode == 2 and "--resume with different settings" in changed.stderr
    missing = cli(*common, "--steps", "8", "--resume", "--out", str(tmp_path / "none"))
    assert missing.returncode == 2 and "no checkpoint" in missing.stderr


EDGE_THAT_HANGS = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{tests!r}, {root!r}]  # helpers, and deploy/ it imports (not an installed package)
    from helpers import connect
    edge = connect({address!r}, __import__("pathlib").Path({cache!r}))
    batch = edge.batch()
    def hang(h):
        print("mid-step", flush=True)
        time.sleep(600)
    edge.train(1, batch, hang)
""")


def test_edge_killed_mid_step_frees_its_session(model_dirs, tmp_path):
    with launch.start(["--model", str(model_dirs["llama"]), "--max-sessions", "1"], tmp_path / "s.log",
                      timeout=300) as server:
        script = EDGE_THAT_HANGS.format(tests=str(Path(__file__).parent), root=str(Path(__file__).parent.parent),
                                        address=server.address, cache=str(tmp_path / "c"))
        edge = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert edge.stdout.readline().strip() == "mid-step"
        with pytest.raises(CloudError, match="RESOURCE_EXHAUSTED"):
            CloudSession(server.address, retry=RetryPolicy(retries=0))   # the only slot is taken
        edge.kill()
        edge.wait()
        deadline = time.monotonic() + 15
        while True:
            try:
                CloudSession(server.address, retry=RetryPolicy(retries=0)).close()
                break
            except CloudError:
                assert time.monotonic() < deadline, "the killed edge's session was never freed"
                time.sleep(0.2)


def test_a_full_server_is_waited_for(model_dirs, tmp_path):
    """A new session on a full server waits (with backoff) for a slot instead of failing: a killed edge's
    stale session holds its slot until --idle-timeout, and its resumed process must get in after it."""
    with launch.start(["--model", str(model_dirs["llama"]), "--max-sessions", "1"], tmp_path / "s.log",
                      timeout=300) as server:
        first = CloudSession(server.address, retry=RetryPolicy(retries=0))
        with pytest.raises(CloudError, match="RESOURCE_EXHAUSTED"):
            CloudSession(server.address, retry=RetryPolicy(retries=0))
        freed = threading.Timer(1.5, first.close)
        freed.start()
        second = CloudSession(server.address, retry=RetryPolicy(retries=6, backoff=0.3))
        freed.join()
        assert second.session_id != first.session_id
        second.close()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_sixteen_concurrent_edges(model_dirs, tmp_path):
    with launch.start(["--model", str(model_dirs["llama"]), "--max-sessions", "16"], tmp_path / "s.log",
                      timeout=300) as server:
        warm = connect(server.address, tmp_path / "c")
        for s in range(1, 4):
            warm.step(s, warm.batch())
        warm.session.close()
        baseline = _rss_mb(server.proc.pid)
        edges = [connect(server.address, tmp_path / "c", seed=i) for i in range(16)]
        errors: list[BaseException] = []

        def work(e) -> None:
            try:
                for s in range(1, 21):
                    e.step(s, e.batch())
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(e,)) for e in edges]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        peak = _rss_mb(server.proc.pid)
        for e in edges:
            e.session.close()
        assert not errors, errors[:3]
        assert all(not t.is_alive() for t in threads)
        time.sleep(1)
        after = _rss_mb(server.proc.pid)
        print(f"server RSS: baseline {baseline:.0f} MB, peak {peak:.0f} MB, after close {after:.0f} MB")
        assert after < baseline + 64, (baseline, peak, after)


def test_health_and_graceful_shutdown(model_dirs, tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = launch.start(["--model", str(model_dirs["llama"]), "--shutdown-grace", "2"], tmp_path / "s.log",
                          timeout=300)
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="dlora.v1.DLoRA")).status == \
        health_pb2.HealthCheckResponse.SERVING
    stub = pb_grpc.DLoRAStub(channel)
    sid = stub.OpenSession(pb.OpenSessionRequest()).session_id
    raw = RawStep(stub)
    raw.send(start_msg(sid))
    assert raw.recv().WhichOneof("kind") == "site_input"     # a step is in flight, waiting on the edge
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    with pytest.raises(grpc.RpcError) as info:
        raw.recv()
    assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    raw.close()
    assert server.proc.wait(30) == 0
    assert time.monotonic() - t0 < 15
    log = (tmp_path / "s.log").read_text()
    assert "shutting down" in log and "aborted after 2 s" in log and "stopped" in log
    channel.close()
