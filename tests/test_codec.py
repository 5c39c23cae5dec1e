"""The tensor codec: exact round trips and refusal of malformed tensors."""
from __future__ import annotations

import pytest
import torch

from common import tensor_codec as codec
from common.tensor_codec import WireError
from common.wire import dlora_pb2 as pb


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.bool])
def test_round_trip_is_exact(dtype):
    t = (torch.randn(3, 4, 5) * 100).to(dtype) if dtype != torch.bool else torch.rand(3, 4) > 0.5
    back = codec.decode(codec.encode(t), name="t")
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_cast_on_encode_and_little_endian_bytes():
    t = torch.tensor([1.0, -2.5])
    msg = codec.encode(t, torch.float16)
    assert msg.dtype == pb.FLOAT16 and list(msg.shape) == [2]
    assert msg.data == bytes.fromhex("003c00c1")  # IEEE half 1.0 and -2.5, little-endian


def test_non_contiguous_input():
    t = torch.arange(12.0).view(3, 4).T
    assert torch.equal(codec.decode(codec.encode(t), name="t"), t)


@pytest.mark.parametrize("msg,needle", [
    (pb.Tensor(dtype=pb.FLOAT32, shape=[2], data=b"\0" * 7), "bytes"),
    (pb.Tensor(dtype=pb.FLOAT32, shape=[2, -1], data=b""), "negative"),
    (pb.Tensor(dtype=42, shape=[1], data=b"\0" * 4), "unknown dtype"),
    (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"\0" * 4), "unknown dtype"),
    # 2**32 x 2**32 wraps to 0 in int64: must not pass as an empty tensor
    (pb.Tensor(dtype=pb.FLOAT32, shape=[2**32, 2**32], data=b""), "bytes"),
])
def test_malformed_tensors_raise(msg, needle):
    with pytest.raises(WireError, match=needle):
        codec.decode(msg, name="t")


def test_expected_shape_dtype_and_finiteness():
    msg = codec.encode(torch.zeros(2, 3))
    with pytest.raises(WireError, match=r"shape \[2, 3\] does not match expected \[3, 2\]"):
        codec.decode(msg, name="t", shape=(3, 2))
    with pytest.raises(WireError, match="dtype fp32 not allowed"):
        codec.decode(msg, name="t", dtypes=[torch.float16])
    with pytest.raises(WireError, match="NaN or Inf"):
        codec.decode(codec.encode(torch.tensor([1.0, float("inf")])), name="t")
    assert codec.decode(codec.encode(torch.tensor([float("nan")])), name="t", finite=False).isnan().all()


def test_dtype_names():
    assert codec.dtype_from_name("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown wire dtype"):
        codec.dtype_from_name("int8")
