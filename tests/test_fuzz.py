"""Fuzzing the message decoding: no input may raise anything but a clear WireError,
and random messages on a real server get a status, never a crash or a hang."""
from __future__ import annotations

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import tensor_codec as codec
from common.tensor_codec import WireError
from common.wire import dlora_pb2 as pb
from common.wire import dlora_pb2_grpc as pb_grpc

tensors = st.builds(
    lambda dtype, shape, data, scales, group: pb.Tensor(dtype=dtype, shape=shape, data=data, scales=scales,
                                                        group=group),
    st.integers(-3, 9), st.lists(st.integers(-4, 12), max_size=4), st.binary(max_size=600),
    st.one_of(st.just(b""), st.binary(max_size=64)), st.integers(-3, 40))
QUANTISED = (pb.INT8, pb.INT4)


@settings(max_examples=400, deadline=None)
@given(msg=tensors, finite=st.booleans())
def test_decode_only_raises_wire_errors(msg, finite):
    try:
        t = codec.decode(msg, name="t", finite=finite)
    except WireError as exc:
        assert len(str(exc)) <= 400, str(exc)  # messages end up in gRPC trailers (16 KiB at most)
        return
    assert list(t.shape) == list(msg.shape)
    if msg.dtype in QUANTISED:   # float32 from one byte (int8) or half a byte (int4) a value
        assert t.dtype == torch.float32 and (not finite or bool(torch.isfinite(t).all()))
        assert len(msg.data) == (t.numel() if msg.dtype == pb.INT8 else (t.numel() + 1) // 2)
    else:
        assert t.numel() * t.element_size() == len(msg.data)


@settings(max_examples=60, deadline=None)
@given(dims=st.integers(codec.MAX_DIMS + 1, 10**5), name_len=st.integers(0, 10**5))
def test_decode_messages_stay_short(dims, name_len):
    """A huge shape or name must not make an error message of the same size."""
    msg = pb.Tensor(dtype=pb.FLOAT32, shape=[1] * dims)
    for shape in (None, (2, 3)):
        with pytest.raises(WireError) as info:
            codec.decode(msg, name="n" * name_len, shape=shape)
        assert len(str(info.value)) <= 400, str(info.value)[:500]


@given(text=st.text(max_size=2000), limit=st.integers(1, 500))
def test_clip_keeps_short_text_and_says_what_it_cut(text, limit):
    out = codec.clip(text, limit)
    if len(text) <= limit:
        assert out == text
    else:
        assert out.startswith(text[:limit]) and out.endswith(f"({len(text) - limit} more characters)")


def test_missing_tensor_is_named_not_an_unknown_dtype():
    with pytest.raises(WireError, match="hidden states: missing"):
        codec.decode(pb.StepStart().hidden, name="hidden states")


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=3000))
def test_random_bytes_parse_or_fail_cleanly(raw):
    try:
        msg = pb.EdgeMessage.FromString(raw)
    except DecodeError:
        return
    kind = msg.WhichOneof("kind")
    inner = getattr(msg, kind) if kind else None
    for field in ("hidden", "attention_mask", "grad", "grad_input"):
        if inner is not None and inner.DESCRIPTOR.fields_by_name.get(field) and inner.HasField(field):
            try:
                codec.decode(getattr(inner, field), name=field)
            except WireError:
                pass


starts = st.builds(
    lambda sid, step, hidden, mask: pb.EdgeMessage(start=pb.StepStart(session_id=sid, step_id=step,
                                                                     hidden=hidden, attention_mask=mask)),
    st.sampled_from(["", "valid"]), st.integers(-5, 5), tensors, tensors)


@pytest.fixture(scope="module")
def fuzz_stub(servers):
    channel = grpc.insecure_channel(servers["gpt2"])
    stub = pb_grpc.DLoRAStub(channel)
    sid = stub.OpenSession(pb.OpenSessionRequest(client_name="fuzz")).session_id
    yield stub, sid
    stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
    channel.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=starts)
def test_server_answers_random_steps_with_a_status(fuzz_stub, first):
    stub, sid = fuzz_stub
    if first.start.session_id == "valid":
        first.start.session_id = sid
    try:
        for _ in stub.TrainStep(iter([first]), timeout=20):
            pass
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED,
                              grpc.StatusCode.ALREADY_EXISTS), exc
        assert exc.details() and len(exc.details()) <= 1024
    # the server still serves
    probe = stub.OpenSession(pb.OpenSessionRequest()).session_id
    stub.CloseSession(pb.CloseSessionRequest(session_id=probe))
