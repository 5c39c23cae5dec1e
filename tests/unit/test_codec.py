"""The tensor codec: exact round trips and refusal of malformed tensors."""
from __future__ import annotations

import math

import numpy as np
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
    assert codec.dtype_from_name("int8") == torch.int8
    assert codec.dtype_from_name("int4") == torch.int4
    with pytest.raises(ValueError, match="unknown wire dtype"):
        codec.dtype_from_name("int2")


FLOATS = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 4, -1])
def test_non_finite_is_refused_in_every_float_dtype(dtype, bad, where):
    t = torch.randn(3, 5).to(dtype)
    t.view(-1)[where] = bad
    with pytest.raises(WireError, match="NaN or Inf"):
        codec.decode(codec.encode(t), name="t")
    assert codec.decode(codec.encode(t), name="t", finite=False).view(-1)[where].isfinite().item() is False


@pytest.mark.parametrize("bits", [0x7F81, 0xFFC1, 0x7FFF, 0xFF80])
def test_bf16_nan_payloads_and_negative_inf_are_refused(bits):
    # NaNs with any payload bits: the check looks at the exponent, not at one pattern.
    raw = bits.to_bytes(2, "little") + bytes(2)
    with pytest.raises(WireError, match="NaN or Inf"):
        codec.decode(pb.Tensor(dtype=pb.BFLOAT16, shape=[2], data=raw), name="t")


@pytest.mark.parametrize("dtype", FLOATS)
def test_finite_extremes_pass(dtype):
    info = torch.finfo(dtype)
    t = torch.tensor([info.max, -info.max, info.tiny, info.tiny / 4, -0.0, 0.0], dtype=dtype)
    bits = torch.int32 if dtype == torch.float32 else torch.int16  # -0.0 and subnormals bit for bit
    assert torch.equal(codec.decode(codec.encode(t), name="t").view(bits), t.view(bits))


@pytest.mark.parametrize("dtype", FLOATS + [torch.bool])
def test_decoded_tensor_is_writable_and_owns_its_memory(dtype):
    # Autograd may accumulate into a decoded gradient in place: it must not be
    # (or alias) the message's immutable bytes.
    t = torch.ones(2, 3, dtype=dtype)
    msg = codec.encode(t)
    back = codec.decode(msg, name="t")
    as_numpy = back.view(torch.int16) if dtype == torch.bfloat16 else back  # numpy has no bfloat16
    assert as_numpy.numpy().flags.writeable
    back.zero_()
    assert torch.equal(codec.decode(msg, name="t"), t)


def test_encode_into_a_field_equals_encode():
    t = torch.randn(2, 3)
    outer = pb.EdgeMessage()
    codec.encode_into(outer.site_outputs.outputs.add(), t, torch.float16)
    codec.encode_into(outer.site_outputs.outputs.add(), t.T)  # non-contiguous
    assert outer.site_outputs.outputs[0] == codec.encode(t, torch.float16)
    assert torch.equal(codec.decode(outer.site_outputs.outputs[1], name="t"), t.T)
    again = outer.site_outputs.outputs[0]
    codec.encode_into(again, torch.zeros(4))  # refilling replaces, never appends to the shape
    assert list(again.shape) == [4] and again.dtype == pb.FLOAT32


@pytest.mark.parametrize("shape", [(2, 5, 32), (7, 3), (4,), ()])
def test_int8_rows_round_to_within_half_a_scale(shape):
    """int8: one scale per row (absmax / 127); every value within half its row's scale; zeros exact."""
    t = torch.randn(shape) * torch.logspace(-3, 2, shape[0] if shape else 1).reshape(
        (-1,) + (1,) * (len(shape) - 1) if shape else ())
    msg = codec.encode(t, torch.int8)
    assert msg.dtype == pb.INT8 and len(msg.data) == t.numel()
    back = codec.decode(msg, name="t", shape=shape, dtypes=[torch.int8])
    assert back.dtype == torch.float32 and back.shape == t.shape
    rows = t.reshape(-1, t.shape[-1] if t.dim() else 1)
    half_scale = rows.abs().amax(dim=1, keepdim=True) / 127 / 2
    assert bool(((back.reshape(rows.shape) - rows).abs() <= half_scale * (1 + 1e-5) + 1e-12).all())
    zeros = codec.decode(codec.encode(torch.zeros(3, 4), torch.int8), name="z", dtypes=[torch.int8])
    assert torch.equal(zeros, torch.zeros(3, 4))
    # A quarter of the bytes of fp32, plus 4 per row.
    assert msg.ByteSize() < codec.encode(t).ByteSize() / 3 + 4 * rows.shape[0] + 16


def test_int8_scales_are_checked():
    msg = codec.encode(torch.randn(3, 8), torch.int8)
    short = pb.Tensor()
    short.CopyFrom(msg)
    short.scales = msg.scales[:-4]
    with pytest.raises(codec.WireError, match="bytes of int8 scales for 3 rows"):
        codec.decode(short, name="x", dtypes=[torch.int8])
    bad = pb.Tensor()
    bad.CopyFrom(msg)
    bad.scales = np.array([1.0, float("nan"), 1.0], dtype="<f4").tobytes()
    with pytest.raises(codec.WireError, match="finite"):
        codec.decode(bad, name="x", dtypes=[torch.int8])
    with pytest.raises(codec.WireError, match="not allowed"):
        codec.decode(msg, name="x", dtypes=[torch.float32])


@pytest.mark.parametrize("dtype", [torch.int8, torch.int4])
@pytest.mark.parametrize("shape", [(0,), (2, 0, 8), (3, 0)])
def test_quantised_empty_tensors_round_trip(dtype, shape):
    msg = codec.encode(torch.empty(shape), dtype)
    assert msg.data == b"" and msg.scales == b""
    assert codec.decode(msg, name="e", shape=shape, dtypes=[dtype]).shape == shape


def test_stochastic_rounding_leaves_the_global_rng_alone():
    grads = torch.linspace(-1, 1, 160).reshape(4, 40)
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    codec.encode_into(pb.Tensor(), grads, torch.int4, stochastic=True)
    assert torch.equal(torch.rand(3), want)


@pytest.mark.parametrize("shape", [(2, 5, 64), (3, 70), (5,), (1, 1, 1), ()])
def test_int4_groups_round_to_within_half_a_scale(shape):
    """int4: two values per byte, one scale per 32 values of a row (absmax / 7); a row whose
    width is not a multiple of 32 ends in a shorter group; an odd count pads the last byte."""
    t = torch.randn(shape) * (torch.rand(shape) * 100) if shape else torch.tensor(-3.5)
    msg = codec.encode(t, torch.int4)
    numel = t.numel()
    width = t.shape[-1] if t.dim() else 1
    groups = -(-width // 32)
    assert msg.dtype == pb.INT4 and msg.group == 32 and len(msg.data) == (numel + 1) // 2
    assert len(msg.scales) == 4 * (numel // width) * groups
    back = codec.decode(msg, name="t", shape=shape, dtypes=[torch.int4])
    assert back.dtype == torch.float32 and back.shape == t.shape
    rows = torch.nn.functional.pad(t.reshape(-1, width), (0, groups * 32 - width))
    half = (rows.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 7 / 2).expand(-1, 32)
    half = half.reshape(rows.shape)[:, :width]
    assert bool(((back.reshape(-1, width) - t.reshape(-1, width)).abs() <= half * (1 + 1e-5) + 1e-12).all())


def test_int4_is_five_bits_a_value():
    t = torch.randn(8, 128, 576)
    """4 bits a value and a 32-bit scale per 32 values."""
    assert codec.encode(t, torch.int4).ByteSize() < codec.encode(t).ByteSize() * (5 / 32) * 1.001


def test_stochastic_rounding_is_unbiased_and_nearest_is_not():
    """A value a third of the way between two levels: nearest always rounds it the same way,
    stochastic rounding lands on either neighbour with the right odds, so the mean is kept."""
    rows = torch.full((20_000, 2), 1.0 / 3.0)
    rows[:, 1] = 1.0                                             # absmax 1: the scale is 1 / levels
    torch.manual_seed(0)
    for dtype, levels in ((torch.int4, 7), (torch.int8, 127)):
        nearest = codec.decode(codec.encode(rows, dtype), name="n", dtypes=[dtype])[:, 0]
        stoch = codec.decode(codec.encode_into(pb.Tensor(), rows, dtype, stochastic=True), name="s",
                             dtypes=[dtype])[:, 0]
        low = math.floor(levels / 3) / levels
        assert torch.unique(nearest).numel() == 1, dtype
        assert sorted(torch.unique(stoch).tolist()) == pytest.approx([low, low + 1 / levels]), dtype
        assert abs(stoch.mean().item() - 1 / 3) < 1e-3 * 7 / levels + 2e-4, dtype
    assert abs(nearest.mean().item() - 1 / 3) > 1e-3   # int8: 42/127 is off by 1/381


def test_quantised_groups_and_nibbles_are_checked():
    msg = codec.encode(torch.randn(3, 40), torch.int4)
    for field, value, needle in (("scales", msg.scales[:-4], "bytes of int4 scales for 3 rows of 2 groups"),
                                 ("group", -1, "negative quantisation group"),
                                 ("data", msg.data[:-1], "bytes for shape")):
        bad = pb.Tensor()
        bad.CopyFrom(msg)
        setattr(bad, field, value)
        with pytest.raises(codec.WireError, match=needle):
            codec.decode(bad, name="x", dtypes=[torch.int4])
    huge = pb.Tensor()
    huge.CopyFrom(msg)
    huge.scales = np.full(6, 3e38, dtype="<f4").tobytes()
    with pytest.raises(codec.WireError, match="overflow float32"):
        codec.decode(huge, name="x", dtypes=[torch.int4])
    # A peer may choose its own group: one scale per row decodes as well.
    whole = pb.Tensor()
    whole.CopyFrom(msg)
    whole.group = 0
    whole.scales = np.ones(3, dtype="<f4").tobytes()
    assert codec.decode(whole, name="x", dtypes=[torch.int4]).abs().max() <= 8
