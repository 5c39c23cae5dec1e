"""Cross-session batching: concurrent steps of different edges run as one batch, and each edge
still gets exactly what it would get alone (DESIGN.md section 2's exactness, per edge)."""
from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from cloud_server import launch
from common import tensor_codec as codec
from common.wire import dlora_pb2 as pb
from common.wire import dlora_pb2_grpc as pb_grpc
from edge_client.data import Example

from helpers import EXAMPLES, RawStep, concurrently, connect, reference_loss, reference_model, rel_err, start_msg

TOL = 1e-5
LONG = [Example("the striker scored twice in the second half and the home crowd " * 3, " sport"),
        Example("a short one", " tech")]


@pytest.fixture(scope="module")
def batching_servers(model_dirs, tmp_path_factory):
    """Servers whose batches wait long enough that concurrent test steps always meet."""
    logs = tmp_path_factory.mktemp("logs")
    procs = {}
    try:
        for kind in ("llama", "gpt2"):
            procs[kind] = launch.start(["--model", str(model_dirs[kind]), "--device", "cpu",
                                        "--batch-window-ms", "5000"], logs / f"batching-{kind}.log", timeout=300)
        yield {kind: p.address for kind, p in procs.items()}
    finally:
        for p in procs.values():
            p.stop()


@pytest.fixture
def batching_server(batching_servers):
    return batching_servers["llama"]


def _train(edge, batch):
    def run():
        return edge.train(1, batch)
    return run


def test_concurrent_edges_share_a_batch_and_each_is_exact(kind, batching_servers, model_dirs, tmp_path):
    # Three edges that differ in everything a batch must keep apart: sequence length, batch size,
    # adapters, target modules and parked (Kill and Revive) adapters. GPT-2's learned positions
    # would expose padding in the wrong place; Llama's rotary ones are relative.
    address = batching_servers[kind]
    other_targets = ["q_proj"] if kind == "llama" else ["c_attn", "c_fc"]
    edges = [connect(address, tmp_path / "c0", seed=0),
             connect(address, tmp_path / "c1", seed=1, targets=other_targets),
             connect(address, tmp_path / "c2", seed=2)]
    batches = [edges[0].batch(EXAMPLES), edges[1].batch(LONG), edges[2].batch(EXAMPLES[2:4])]
    assert len({b.input_ids.shape[1] for b in batches}) == 3
    first_site = edges[2].session.sites[0]
    parked = [m.name for m in first_site.modules]
    edges[2].session.park({n: edges[2].adapters[n] for n in parked}, [])
    try:
        results = concurrently([_train(e, b) for e, b in zip(edges, batches)])
        for r in results:
            if isinstance(r, BaseException):
                raise r
        for i, (edge, batch, (loss, stats)) in enumerate(zip(edges, batches, results)):
            assert stats.batch_sessions == 3, f"edge {i} ran alone: the test did not exercise batching"
            model, ref = reference_model(model_dirs[kind], edge.adapters)
            frozen = parked if i == 2 else []
            for n in frozen:
                ref[n].requires_grad_(False)
            ref_loss = reference_loss(model, batch)
            ref_loss.backward()
            assert abs(loss - ref_loss.item()) <= TOL * abs(ref_loss.item()), f"edge {i} loss"
            for name, ad in edge.adapters.items():
                for w in ("lora_A", "lora_B"):
                    got, want = getattr(ad, w).grad, getattr(ref[name], w).grad
                    if name in frozen:
                        assert got is None and want is None, name
                        continue
                    assert want is not None and want.norm() > 0
                    assert rel_err(got, want) <= TOL, f"edge {i} {name}.{w}: {rel_err(got, want):.2e}"
    finally:
        for e in edges:
            e.session.close()


def test_forwards_batch_too_and_a_lone_edge_never_waits(batching_server, tmp_path):
    edges = [connect(batching_server, tmp_path / f"c{i}", seed=i) for i in range(2)]
    batches = [edges[0].batch(EXAMPLES), edges[1].batch(LONG)]

    def fwd(edge, batch):
        return lambda: edge.session.forward(edge.edge.embed(batch.input_ids), batch.attention_mask, edge.adapters)

    try:
        results = concurrently([fwd(e, b) for e, b in zip(edges, batches)])
        for r in results:
            assert not isinstance(r, BaseException), r
            assert r[1].batch_sessions == 2
        # Edge 1 leaves; edge 0 is now alone: it must not wait out the 5 s window,
        # and its result equals what it got inside the batch.
        edges[1].session.close()
        t0 = time.perf_counter()
        alone, stats = fwd(edges[0], batches[0])()
        assert stats.batch_sessions == 1
        assert time.perf_counter() - t0 < 4.0, "a lone session waited for the batching window"
        assert rel_err(results[0][0], alone) <= TOL
    finally:
        edges[0].session.close()


def test_a_failing_edge_does_not_fail_its_batch(batching_server, model_dirs, tmp_path):
    """One edge of a batch answers with a wrong-shaped output: it gets INVALID_ARGUMENT, the other
    edge's step completes and is still exact."""
    good = connect(batching_server, tmp_path / "good", seed=3)
    batch = good.batch(EXAMPLES)
    channel = grpc.insecure_channel(batching_server)
    stub = pb_grpc.DLoRAStub(channel)
    sid = stub.OpenSession(pb.OpenSessionRequest(client_name="bad")).session_id

    def bad_edge():
        step = RawStep(stub)
        step.send(start_msg(sid, b=1, t=3))
        try:
            while True:
                msg = step.recv()
                if msg.WhichOneof("kind") == "site_input":
                    wrong = [codec.encode(torch.zeros(1, 3, 7)) for _ in msg.site_input.live]
                    step.send(pb.EdgeMessage(site_outputs=pb.SiteOutputs(site=msg.site_input.site, outputs=wrong)))
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
        finally:
            step.close()

    try:
        (loss, stats), (code, details) = concurrently([_train(good, batch), bad_edge])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "shape" in details
        assert stats.batch_sessions == 2
        model, ref = reference_model(model_dirs["llama"], good.adapters)
        ref_loss = reference_loss(model, batch)
        ref_loss.backward()
        assert abs(loss - ref_loss.item()) <= TOL * abs(ref_loss.item())
        for name, ad in good.adapters.items():
            assert rel_err(ad.lora_A.grad, ref[name].lora_A.grad) <= TOL, name
    finally:
        good.session.close()
        channel.close()


def test_long_sequences_do_not_make_short_ones_pay_for_padding(batching_server, tmp_path):
    """A cohort admits a member only while padding stays under 1.5x the real tokens."""
    edges = [connect(batching_server, tmp_path / f"c{i}", seed=i) for i in range(2)]
    batches = [edges[0].batch(LONG[:1]), edges[1].batch(EXAMPLES[2:3])]   # one long row, one short row
    lengths = [b.input_ids.shape[1] for b in batches]
    assert 2 * max(lengths) > 1.5 * sum(lengths), lengths
    try:
        results = concurrently([_train(e, b) for e, b in zip(edges, batches)])
        for r in results:
            assert not isinstance(r, BaseException), r
            assert r[1].batch_sessions == 1
    finally:
        for e in edges:
            e.session.close()


def _stalling_edge(stub, sid: str) -> tuple:
    """A raw edge that starts a step and never answers; returns its gRPC error."""
    step = RawStep(stub)
    step.send(start_msg(sid, b=2, t=5))
    try:
        while True:
            step.recv()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    finally:
        step.close()


def test_a_lagging_edge_is_dropped_and_then_runs_alone(model_dirs, tmp_path):
    """An edge that stops answering holds its batch back at most --batch-lag-timeout; the
    others finish (exactly), and from then on the laggard is never batched again."""
    args = ["--model", str(model_dirs["llama"]), "--device", "cpu", "--batch-window-ms", "5000",
            "--batch-lag-timeout", "1", "--step-timeout", "20"]
    with launch.start(args, tmp_path / "lag.log", timeout=300) as server:
        good = connect(server.address, tmp_path / "good", seed=4)
        batch = good.batch(EXAMPLES)
        channel = grpc.insecure_channel(server.address)
        stub = pb_grpc.DLoRAStub(channel)
        sid = stub.OpenSession(pb.OpenSessionRequest(client_name="laggard")).session_id
        try:
            t0 = time.perf_counter()
            (loss, stats), (code, details) = concurrently([_train(good, batch), lambda: _stalling_edge(stub, sid)])
            assert time.perf_counter() - t0 < 15, "the batch waited for the laggard's whole step deadline"
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "batched" in details, details
            assert stats.batch_sessions == 2
            model, ref = reference_model(model_dirs["llama"], good.adapters)
            ref_loss = reference_loss(model, batch)
            assert abs(loss - ref_loss.item()) <= TOL * abs(ref_loss.item())
            # Next time the laggard runs alone: the good edge is not batched with it.
            for ad in good.adapters.values():
                ad.zero_grad()
            step2 = lambda: good.train(2, batch)  # noqa: E731
            stalled = threading.Thread(target=_stalling_edge, args=(stub, sid), daemon=True)
            stalled.start()
            time.sleep(0.5)
            _, stats2 = step2()
            assert stats2.batch_sessions == 1
        finally:
            good.session.close()
            channel.close()
