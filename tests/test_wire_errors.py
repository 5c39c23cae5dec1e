"""Bad input on the wire gets a clear gRPC error, and the server keeps serving."""
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

from helpers import HIDDEN, RawStep, connect, expect_error, reference_loss, reference_model, run_raw, start_msg


@pytest.fixture
def stub(servers):
    channel = grpc.insecure_channel(servers["llama"])
    yield pb_grpc.DLoRAStub(channel)
    channel.close()


@pytest.fixture
def session_id(stub):
    sid = stub.OpenSession(pb.OpenSessionRequest(client_name="raw")).session_id
    yield sid
    try:
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
    except grpc.RpcError:
        pass


def test_unknown_session_is_not_found(stub):
    expect_error(lambda: run_raw(stub, start_msg("f" * 32)), grpc.StatusCode.NOT_FOUND, "unknown session")
    expect_error(lambda: list(stub.GetEdgeAssets(pb.EdgeAssetsRequest(session_id="nope"))),
                 grpc.StatusCode.NOT_FOUND, "unknown session")
    expect_error(lambda: stub.CloseSession(pb.CloseSessionRequest(session_id="nope")),
                 grpc.StatusCode.NOT_FOUND)


def test_bad_start_messages(stub, session_id):
    bad = {
        "wrong hidden size": start_msg(session_id, h=HIDDEN + 1),
        "wrong rank": start_msg(session_id, hidden=codec.encode(torch.randn(2, HIDDEN))),
        "wrong dtype": start_msg(session_id, hidden=codec.encode(torch.randn(2, 5, HIDDEN), torch.float16)),
        "truncated": start_msg(session_id, hidden=pb.Tensor(dtype=pb.FLOAT32, shape=[2, 5, HIDDEN],
                                                            data=b"\0" * (2 * 5 * HIDDEN * 4 - 3))),
        "nan": start_msg(session_id, hidden=codec.encode(torch.full((2, 5, HIDDEN), float("nan")))),
        "inf": start_msg(session_id, hidden=codec.encode(torch.full((2, 5, HIDDEN), float("inf")))),
        "mask shape": start_msg(session_id, mask=codec.encode(torch.ones(2, 4, dtype=torch.bool))),
        "mask dtype": start_msg(session_id, mask=codec.encode(torch.ones(2, 5))),
        "empty mask row": start_msg(session_id, mask=codec.encode(torch.tensor([[True] * 5, [False] * 5]))),
        "unknown dtype": start_msg(session_id, hidden=pb.Tensor(dtype=99, shape=[1], data=b"\0" * 4)),
        "huge shape": start_msg(session_id, hidden=pb.Tensor(dtype=pb.FLOAT32, shape=[1] * 10**5)),
    }
    for what, msg in bad.items():
        detail = expect_error(lambda msg=msg: run_raw(stub, msg), grpc.StatusCode.INVALID_ARGUMENT)
        assert detail and len(detail) <= 400, what
    # A tensor left out is named as missing (its all-default message reads as dtype code 0).
    expect_error(lambda: run_raw(stub, start_msg(session_id, hidden=pb.Tensor())), grpc.StatusCode.INVALID_ARGUMENT,
                 "hidden states: missing (no tensor was sent)")
    expect_error(lambda: run_raw(stub, start_msg(session_id, mask=pb.Tensor())), grpc.StatusCode.INVALID_ARGUMENT,
                 "attention mask: missing (no tensor was sent)")
    not_start = pb.EdgeMessage(final_grad=pb.FinalGrad(grad=codec.encode(torch.zeros(1))))
    expect_error(lambda: run_raw(stub, not_start), grpc.StatusCode.INVALID_ARGUMENT, "must begin with a start")


def test_sequence_longer_than_the_model_is_refused(stub, session_id):
    # the tiny models have 256 positions
    expect_error(lambda: run_raw(stub, start_msg(session_id, b=1, t=257)),
                 grpc.StatusCode.RESOURCE_EXHAUSTED, "257 exceeds the model's 256 positions")


def test_oversize_batch_is_resource_exhausted(stub, session_id):
    # the fixture server allows 4096 tokens per step
    expect_error(lambda: run_raw(stub, start_msg(session_id, b=64, t=65)),
                 grpc.StatusCode.RESOURCE_EXHAUSTED, "exceeds", "4096")


def test_bad_site_outputs(stub, session_id):
    def outputs(shape_fn, dtype=torch.float32):
        def reply(site_input: pb.SiteInput) -> pb.EdgeMessage:
            x = codec.decode(site_input.x, name="x")
            outs = [codec.encode(torch.zeros(shape_fn(x)), dtype) for _ in site_input.live]
            return pb.EdgeMessage(site_outputs=pb.SiteOutputs(site=site_input.site, outputs=outs))
        return reply

    expect_error(lambda: run_raw(stub, start_msg(session_id), outputs(lambda x: (2, 5, 7))),
                 grpc.StatusCode.INVALID_ARGUMENT, "output of model.layers.0.self_attn.q_proj", "shape")
    expect_error(lambda: run_raw(stub, start_msg(session_id), outputs(lambda x: (2, 5, 32), torch.bfloat16)),
                 grpc.StatusCode.INVALID_ARGUMENT, "dtype")

    def too_few(site_input):
        return pb.EdgeMessage(site_outputs=pb.SiteOutputs(site=site_input.site, outputs=[]))
    expect_error(lambda: run_raw(stub, start_msg(session_id), too_few), grpc.StatusCode.INVALID_ARGUMENT,
                 "outputs for 3 live")

    def wrong_site(site_input):
        return pb.EdgeMessage(site_outputs=pb.SiteOutputs(site=site_input.site + 1))
    expect_error(lambda: run_raw(stub, start_msg(session_id), wrong_site), grpc.StatusCode.INVALID_ARGUMENT,
                 "expected site 0")

    def wrong_kind(site_input):
        return pb.EdgeMessage(final_grad=pb.FinalGrad())
    expect_error(lambda: run_raw(stub, start_msg(session_id), wrong_kind), grpc.StatusCode.INVALID_ARGUMENT,
                 "expected a site_outputs message")


def test_bad_factors(stub, session_id):
    """Factorised outputs are checked like any tensor: only in a session that agreed to them,
    never with full outputs beside them, with a rank below the output width, shapes that agree."""
    opened = stub.OpenSession(pb.OpenSessionRequest(client_name="raw", factorised=True))
    factorised = opened.session_id
    widths = {s.index: [m.out_features for m in s.modules] for s in opened.sites}
    try:
        def factors(rank=2, up_rows=None, down_rows=None, both=False, nan=False):
            def reply(site_input: pb.SiteInput) -> pb.EdgeMessage:
                x = codec.decode(site_input.x, name="x")
                msg = pb.EdgeMessage()
                msg.site_outputs.site = site_input.site
                for slot in site_input.live:
                    down = torch.zeros(*x.shape[:-1], down_rows or rank)
                    if nan:
                        down[0, 0, 0] = float("nan")
                    pair = msg.site_outputs.factors.add()
                    codec.encode_into(pair.down, down)
                    out = widths[site_input.site][slot]
                    codec.encode_into(pair.up, torch.zeros(up_rows or out, rank))
                    if both:
                        codec.encode_into(msg.site_outputs.outputs.add(), torch.zeros(*x.shape[:-1], out))
                return msg
            return reply

        bad = grpc.StatusCode.INVALID_ARGUMENT
        expect_error(lambda: run_raw(stub, start_msg(session_id), factors()), bad,
                     "did not agree to a factorised exchange")
        expect_error(lambda: run_raw(stub, start_msg(factorised), factors(both=True)), bad, "both outputs and factors")
        expect_error(lambda: run_raw(stub, start_msg(factorised), factors(rank=HIDDEN)), bad,  # q_proj: 32 wide
                     "up factor of model.layers.0.self_attn.q_proj", f"1 <= r < {HIDDEN}")
        expect_error(lambda: run_raw(stub, start_msg(factorised), factors(up_rows=7)), bad, "up factor", "shape")
        expect_error(lambda: run_raw(stub, start_msg(factorised), factors(down_rows=3)), bad, "down factor", "shape")
        expect_error(lambda: run_raw(stub, start_msg(factorised), factors(nan=True)), bad, "down factor", "NaN")
        # And a well-formed factorised answer goes through to the next site.
        raw = RawStep(stub)
        raw.send(start_msg(factorised))
        first = raw.recv().site_input
        raw.send(factors()(first))
        assert raw.recv().site_input.site == first.site + 1
        raw.close()  # mid-step: the cloud then closes the session itself ("its edge vanished")
    finally:
        try:
            stub.CloseSession(pb.CloseSessionRequest(session_id=factorised))
        except grpc.RpcError as exc:  # already closed by that half-close, or not yet: either is fine
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc


def test_bad_open_session_requests(stub):
    expect_error(lambda: stub.OpenSession(pb.OpenSessionRequest(target_modules=["nonexistent_proj"])),
                 grpc.StatusCode.INVALID_ARGUMENT, "unknown target modules")
    expect_error(lambda: stub.OpenSession(pb.OpenSessionRequest(wire_dtype=pb.BOOL)),
                 grpc.StatusCode.INVALID_ARGUMENT, "wire dtype")
    expect_error(lambda: stub.OpenSession(pb.OpenSessionRequest(grad_dtype=pb.BOOL)),
                 grpc.StatusCode.INVALID_ARGUMENT, "gradient dtype")
    expect_error(lambda: stub.OpenSession(pb.OpenSessionRequest(grad_dtype=99)),
                 grpc.StatusCode.INVALID_ARGUMENT, "unknown dtype code 99")
    expect_error(lambda: stub.OpenSession(pb.OpenSessionRequest(mode=7)),
                 grpc.StatusCode.INVALID_ARGUMENT, "unknown session mode 7")
    # Echoed in full, 10^4 names made trailers gRPC refused (RESOURCE_EXHAUSTED) instead of this status.
    many = [f"nope_{i}" for i in range(10_000)]
    detail = expect_error(lambda: stub.OpenSession(pb.OpenSessionRequest(target_modules=many)),
                          grpc.StatusCode.INVALID_ARGUMENT, "unknown target modules", "more characters")
    assert len(detail) <= 400


def test_undecodable_bytes_are_invalid_argument(servers):
    """grpcio alone answers bytes that do not parse with INTERNAL (and logs a traceback)."""
    channel = grpc.insecure_channel(servers["llama"])
    try:
        call = channel.unary_unary("/dlora.v1.DLoRA/OpenSession", request_serializer=None, response_deserializer=None)
        expect_error(lambda: call(b"\xff\xff"), grpc.StatusCode.INVALID_ARGUMENT, "could not decode OpenSessionRequest")
        step = channel.stream_stream("/dlora.v1.DLoRA/TrainStep", request_serializer=None, response_deserializer=None)
        expect_error(lambda: list(step(iter([b"\xff\xff"]))), grpc.StatusCode.INVALID_ARGUMENT,
                     "could not decode EdgeMessage")
        expect_error(lambda: list(step(iter([]))), grpc.StatusCode.INVALID_ARGUMENT, "ended before its start message")
    finally:
        channel.close()


def test_server_survives_bad_input_and_vanishing_edge(servers, model_dirs, cache, stub, session_id):
    # A malformed step leaves the session usable...
    expect_error(lambda: run_raw(stub, start_msg(session_id, h=3)), grpc.StatusCode.INVALID_ARGUMENT)
    # ...an edge that opens a step and disappears in the middle of it loses
    # its session (the server frees it)...
    raw = RawStep(stub)
    raw.send(start_msg(session_id))
    assert raw.recv().WhichOneof("kind") == "site_input"
    raw.responses.cancel()
    raw.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            run_raw(stub, start_msg(session_id, h=3))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                break
        time.sleep(0.1)
    else:
        pytest.fail("the vanished edge's session was not freed")
    # ...and a good edge on another session still gets exact results.
    edge = connect(servers["llama"], cache)
    try:
        batch = edge.batch()
        loss = edge.step(1, batch)
        model, _ = reference_model(model_dirs["llama"], edge.adapters)
        assert abs(loss - reference_loss(model, batch).item()) < 1e-5 * loss
    finally:
        edge.session.close()


def test_step_ids_never_go_back(servers, cache):
    edge = connect(servers["llama"], cache)
    try:
        batch = edge.batch()
        first = edge.step(1, batch)
        assert edge.step(1, batch) == first        # a replayed step (lost reply) is answered again
        edge.step(2, batch)
        with pytest.raises(Exception, match="ALREADY_EXISTS.*older than the last completed step 2"):
            edge.step(1, batch)
        edge.step(3, batch)
    finally:
        edge.session.close()


def test_session_limit_and_concurrent_sessions(model_dirs, tmp_path):
    with launch.start(["--model", str(model_dirs["llama"]), "--max-sessions", "3"], tmp_path / "s.log",
                      timeout=300) as server:
        edges = [connect(server.address, tmp_path / "c", seed=i) for i in range(3)]
        try:
            from edge_client.errors import CloudError
            from edge_client.session import CloudSession, RetryPolicy
            with pytest.raises(CloudError, match="RESOURCE_EXHAUSTED.*maximum of 3 sessions"):
                CloudSession(server.address, retry=RetryPolicy(retries=0))
            # Three edges step at the same time; each gets its own exact answer.
            batch = edges[0].batch()
            losses: dict[int, float] = {}
            errors: list[BaseException] = []

            def work(i: int) -> None:
                try:
                    for s in range(1, 4):
                        losses[i] = edges[i].step(s, batch)
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)

            threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not errors, errors
            for i, e in enumerate(edges):
                model, _ = reference_model(model_dirs["llama"], e.adapters)
                want = reference_loss(model, batch).item()
                assert abs(losses[i] - want) < 1e-5 * want, i
            assert len({round(v, 6) for v in losses.values()}) == 3  # different adapters, different losses
        finally:
            for e in edges:
                e.session.close()
        # Closed sessions free their slots.
        connect(server.address, tmp_path / "c").session.close()
