"""SplitLoRA mode: split at a cut layer, server-side adapters on the cloud, FedAvg of client-side ones."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid

import grpc
import pytest
import torch
from safetensors.torch import load_file

from common import tensor_codec as codec
from common.wire import dlora_pb2 as pb
from common.wire import dlora_pb2_grpc as pb_grpc
from edge_client.errors import CloudError
from edge_client.objective import make_batch
from edge_client.session import CloudSession, RetryPolicy, SplitOptions
from edge_client.trainer import EdgeTrainer, TrainConfig

from helpers import EXAMPLES, assert_same_state, split_state, split_trainer


def _open(stub, federation: str, clients: int, cut: int = 1, rank: int = 4, lr: float = 1e-2) -> str:
    return stub.OpenSession(pb.OpenSessionRequest(client_name="t", mode=pb.SPLITLORA, split=pb.SplitConfig(
        cut_layer=cut, federation=federation, clients=clients, rank=rank, alpha=8.0, lr=lr)), timeout=30).session_id


def test_weighted_fedavg_is_exact(servers):
    channel = grpc.insecure_channel(servers["llama"])
    stub = pb_grpc.DLoRAStub(channel)
    fed = f"avg-{uuid.uuid4().hex}"
    ids = [_open(stub, fed, 3) for _ in range(3)]
    try:
        names = [m.name for s in stub.OpenSession(pb.OpenSessionRequest(mode=pb.SPLITLORA, split=pb.SplitConfig(
            cut_layer=1, federation=f"x-{fed}", clients=1, rank=4, alpha=8.0, lr=1e-2)), timeout=30).sites
            for m in s.modules]
        assert names
        gen = torch.Generator().manual_seed(0)
        weights = [1, 2, 5]
        subs = [{n: (torch.randn(3, 32, generator=gen), torch.randn(16 if "k_proj" in n or "v_proj" in n else 32, 3,
                                                                     generator=gen)) for n in names} for _ in ids]
        replies: list = [None] * 3

        def send(i: int) -> None:
            replies[i] = stub.Aggregate(pb.AggregateRequest(session_id=ids[i], round=1, examples=weights[i], adapters=[
                pb.LoRAWeights(name=n, lora_A=codec.encode(a), lora_B=codec.encode(b))
                for n, (a, b) in subs[i].items()]), timeout=60)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in replies:
            assert r.clients == 3 and r.round == 1
            got = {w.name: (codec.decode(w.lora_A, name="A"), codec.decode(w.lora_B, name="B")) for w in r.adapters}
            for n in names:
                for k in (0, 1):
                    want = (sum(w * s[n][k].double() for w, s in zip(weights, subs)) / sum(weights)).float()
                    assert torch.equal(got[n][k], want), n
                    assert not torch.equal(got[n][k], (sum(s[n][k] for s in subs) / 3))  # weighted, not plain
    finally:
        for sid in ids:
            stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=30)
        channel.close()


def test_split_sessions_refuse_what_does_not_fit(servers):
    channel = grpc.insecure_channel(servers["llama"])
    stub = pb_grpc.DLoRAStub(channel)
    fed = f"bad-{uuid.uuid4().hex}"
    sid = _open(stub, fed, 1)
    try:
        with pytest.raises(grpc.RpcError) as err:
            _open(stub, fed, 1, lr=0.5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "lr 0.01 (asked 0.5)" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            _open(stub, f"{fed}-2", 1, cut=2)  # the tiny model has 2 blocks: the cloud must keep one
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and \
            "cut layer must be in 1..1" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.ParkAdapters(pb.ParkRequest(session_id=sid, unpark=["x"]), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as err:
            stub.Aggregate(pb.AggregateRequest(session_id=sid, round=1, examples=3), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and \
            "every client-side module" in err.value.details()
    finally:
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=30)
        channel.close()
    with pytest.raises(CloudError, match="aggregation and server-side adapters belong to SplitLoRA"):
        with CloudSession(servers["llama"]) as dlora:
            dlora.server_adapters()


def test_two_clients_train_and_average(servers, tmp_path):
    """Two edge processes in one federation end with the same client-side adapters."""
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"count {i}:", "completion": f" {i + 1}"}) for i in range(24)))
    fed = f"cli-{uuid.uuid4().hex}"
    procs = [subprocess.Popen([sys.executable, "-m", "edge_client", "train", "--server", servers["gpt2"],
                               "--mode", "splitlora", "--cut-layer", "1", "--clients", "2", "--aggregate-every", "2",
                               "--federation", fed, "--data", str(data), "--steps", "3", "--batch-size", "4",
                               "--seed", str(i), "--out", str(tmp_path / f"c{i}"), "--no-progress"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    a, b = (load_file(tmp_path / f"c{i}" / "adapter_model.safetensors") for i in range(2))
    assert a.keys() == b.keys() and any(".h.0." in k for k in a) and any(".h.1." in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # client side: the last FedAvg; server side: shared
    run = json.loads((tmp_path / "c0" / "run.json").read_text())
    assert run["summary"]["mode"] == "splitlora" and run["summary"]["cut_layer"] == 1
    assert run["history"][0]["block_flops"] > 0 and run["history"][0]["site_exchanges"] == 0


def test_rounds_run_in_order_and_never_wait_for_absent_clients(servers):
    channel = grpc.insecure_channel(servers["llama"])
    stub = pb_grpc.DLoRAStub(channel)
    sid = _open(stub, f"order-{uuid.uuid4().hex}", clients=3)  # expects 3, but only 1 ever joins
    try:
        sites = stub.OpenSession(pb.OpenSessionRequest(mode=pb.SPLITLORA, split=pb.SplitConfig(
            cut_layer=1, federation=f"o2-{uuid.uuid4().hex}", clients=1, rank=4, alpha=8.0, lr=1e-2)), timeout=30).sites
        weights = [pb.LoRAWeights(name=m.name, lora_A=codec.encode(torch.ones(3, m.in_features)),
                                  lora_B=codec.encode(torch.ones(m.out_features, 3)))
                   for s in sites for m in s.modules]
        with pytest.raises(grpc.RpcError) as err:
            stub.Aggregate(pb.AggregateRequest(session_id=sid, round=2, examples=1, adapters=weights), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and \
            "at aggregation round 1" in err.value.details()
        t0 = time.monotonic()
        reply = stub.Aggregate(pb.AggregateRequest(session_id=sid, round=1, examples=4, adapters=weights), timeout=30)
        assert reply.clients == 1 and time.monotonic() - t0 < 10  # the only member: no wait for the other two
        again = stub.Aggregate(pb.AggregateRequest(session_id=sid, round=1, examples=4, adapters=weights), timeout=30)
        assert again.clients == 1  # a retried round (lost reply) gets the same answer
    finally:
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=30)
        channel.close()


def test_half_precision_server_keeps_server_side_adapters_finite(model_dirs, tmp_path):
    """The cloud serves fp16 weights; its trainable adapters stay fp32 (AdamW's eps underflows in fp16)."""
    from cloud_server import launch

    with launch.start(["--model", str(model_dirs["llama"]), "--device", "cpu", "--dtype", "fp16"],
                      tmp_path / "server.log") as server:
        cfg = TrainConfig.of(server=server.address, mode="splitlora", cut_layer=1, r=4, lora_alpha=8.0, lr=1e-2,
                             cache=tmp_path / "cache", progress=False)
        with CloudSession(server.address, split=SplitOptions(1, "fp16", 1, 4, 8.0, 1e-2)) as session:
            trainer = EdgeTrainer(cfg, session)
            trainer.train_examples = 4
            trainer.label_ids = None
            for step in range(3):
                loss, _, _ = trainer.train_step(make_batch(trainer.tokenizer, EXAMPLES, 64))
                assert loss == loss and abs(loss) < 1e4, f"step {step}: loss {loss}"
            server_side, _, updates = session.server_adapters()
            assert updates == 3
            for a, b in server_side.values():
                assert torch.isfinite(a).all() and torch.isfinite(b).all() and b.abs().sum() > 0


def test_restarted_server_without_state_stops_a_split_run_at_once(model_dirs, tmp_path, caplog):
    """Without --state-dir a restarted server lost the server-side adapters: the edge says so at
    once, without backing off, instead of training on from fresh ones."""
    from cloud_server import launch
    from deploy.local import free_port
    from edge_client.session import RetryPolicy

    args = ["--model", str(model_dirs["llama"]), "--port", str(free_port())]
    with launch.start(args, tmp_path / "a.log", timeout=300) as server:
        trainer, batches = split_trainer(server.address, tmp_path / "cache", f"r-{uuid.uuid4().hex}",
                                         retry=RetryPolicy(retries=3, backoff=0.05))
        trainer.train_step(batches[0])
    with launch.start(args, tmp_path / "b.log", timeout=300):
        grpc.channel_ready_future(trainer.session.channel).result(timeout=30)  # past gRPC's reconnect backoff
        with caplog.at_level("WARNING", logger="edge_client.session"), \
                pytest.raises(CloudError, match="holds no state of federation .* cannot resume"):
            trainer.train_step(batches[1])
    assert "retry 1/" not in caplog.text


def test_restarted_server_resumes_a_split_run_exactly(model_dirs, tmp_path):
    """With --state-dir a SplitLoRA run outlives its server: killed (SIGKILL) between a step's forward
    and backward and restarted 1 s later, the edge carries on by itself and ends where an uninterrupted
    run ends, within 1e-5: client-side and server-side adapters, and the count of server-side updates."""
    from cloud_server import launch
    from deploy.local import free_port

    def run(state: str, kill_at: int | None) -> dict[str, torch.Tensor]:
        args = ["--model", str(model_dirs["llama"]), "--port", str(free_port()), "--state-dir", str(tmp_path / state)]
        servers = [launch.start(args, tmp_path / f"{state}-0.log", timeout=300)]
        try:
            trainer, batches = split_trainer(servers[0].address, tmp_path / "cache", "restart",
                                             retry=RetryPolicy(retries=30, backoff=0.2, max_backoff=2.0))
            real_loss = trainer.loss

            def loss_that_kills(hidden, batch):
                if trainer.step_id == kill_at and len(servers) == 1:
                    servers[0].proc.kill()
                    servers[0].proc.wait()
                    threading.Timer(1.0, lambda: servers.append(
                        launch.start(args, tmp_path / f"{state}-1.log", timeout=300))).start()
                return real_loss(hidden, batch)

            trainer.loss = loss_that_kills
            for b in batches:
                trainer.train_step(b)
            assert trainer.session.reconnects == (0 if kill_at is None else 1)
            state_now = split_state(trainer)
            trainer.session.close()
            return state_now
        finally:
            time.sleep(0.1 if len(servers) > 1 or kill_at is None else 5)  # a restart in flight: let it land
            for s in servers:
                s.stop()

    want = run("ref", None)
    assert want["updates"].item() == 6
    assert_same_state(run("killed", 4), want)
    assert not list((tmp_path / "killed").glob("federation-*.pt"))  # the last member left: the state is gone
