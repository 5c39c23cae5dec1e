"""Encode torch tensors into wire `Tensor` messages and decode them back, with checks.

Decoding never trusts the sender: dtype, shape, byte length and finiteness are
checked, and a mismatch raises `WireError` with a message that names the tensor.

int8 and int4 are quantised wire formats for floating tensors: each group of
values along the last dimension (int8: a whole row, one token's vector; int4:
32 values) is sent as integers and one float32 scale, the group's absolute
maximum / 127 (int8) or / 7 (int4). Rounding to nearest errs by at most half a
scale per element; stochastic rounding errs by less than one scale but is
unbiased, which gradients summed over many tokens want. Decoding gives float32.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from common.wire import dlora_pb2 as pb


class WireError(ValueError):
    """A message from the peer is malformed; the text says what is wrong."""


# Error texts travel back in gRPC trailers (a 16 KiB hard limit: beyond it the
# peer sees RESOURCE_EXHAUSTED instead of our status) and land in server logs,
# so whatever they quote of the peer's input is cut to this many characters.
MAX_QUOTE = 300
# No tensor of the protocol has more than 4 dimensions; far more is hostile
# (a million dimensions would make the element count a million-digit product).
MAX_DIMS = 16


def clip(text: str, limit: int = MAX_QUOTE) -> str:
    """`text`, cut to `limit` characters plus a note of how many were dropped."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…({len(text) - limit} more characters)"


def shape_text(shape: Sequence[int], most: int = 8) -> str:
    """A shape for an error message: `[2, 5, 32]`, or its first dimensions and the count."""
    dims = list(shape)
    if len(dims) <= most:
        return str(dims)
    return f"[{', '.join(str(d) for d in dims[:most])}, …] ({len(dims)} dimensions)"


# torch has int4 at runtime but its type stubs do not declare it; this is the one place it is named.
INT4: torch.dtype = torch.int4  # type: ignore[attr-defined]  # absent from torch's stubs, present at runtime

_TO_WIRE: dict[torch.dtype, pb.DType] = {
    torch.float32: pb.FLOAT32,
    torch.float16: pb.FLOAT16,
    torch.bfloat16: pb.BFLOAT16,
    torch.bool: pb.BOOL,
    torch.int8: pb.INT8,
    INT4: pb.INT4,  # a marker only: int4 values travel packed two per byte
}
_FROM_WIRE: dict[int, torch.dtype] = {v: k for k, v in _TO_WIRE.items()}
_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8,
          "int4": INT4}
# Quantised dtypes: the largest magnitude of a value, and the values per scale (0: a row).
_LEVELS = {torch.int8: 127, INT4: 7}
_GROUP = {torch.int8: 0, INT4: 32}
# The dtypes activations and gradients may take on the wire, by name (the CLIs' choices).
WIRE_DTYPES = tuple(_NAMES)
# How each dtype's bytes are read with numpy. numpy has no bfloat16: its bit
# pattern travels and is checked as int16.
_NUMPY: dict[torch.dtype, type[np.generic]] = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.bfloat16: np.int16,
    torch.bool: np.bool_,
    torch.int8: np.int8,
    INT4: np.uint8,  # two values per byte
}
# Exponent field of a bfloat16 bit pattern; all ones means Inf or NaN.
_BF16_EXPONENT = 0x7F80


def dtype_from_name(name: str) -> torch.dtype:
    """'fp32' / 'fp16' / 'bf16' / 'int8' / 'int4' -> torch dtype."""
    try:
        return _NAMES[name]
    except KeyError:
        raise ValueError(f"unknown wire dtype {name!r}; choose one of {sorted(_NAMES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _NAMES.items()}.get(dtype, str(dtype))


def wire_dtype(dtype: torch.dtype) -> pb.DType:
    return _TO_WIRE[dtype]


def torch_dtype(code: int) -> torch.dtype:
    try:
        return _FROM_WIRE[code]
    except KeyError:
        raise WireError(f"unknown dtype code {code}") from None


def require(msg: pb.Tensor, name: str) -> None:
    """Raise a WireError naming `name` if the peer sent no tensor, or one without a dtype.

    An absent message field reads as an all-default Tensor, whose dtype code 0
    would otherwise be reported as an unknown dtype rather than as missing.
    """
    if msg.dtype != pb.DTYPE_UNSPECIFIED:
        return
    if msg.ByteSize() == 0:
        raise WireError(f"{clip(name, 100)}: missing (no tensor was sent)")
    raise WireError(f"{clip(name, 100)}: unknown dtype code 0 (DTYPE_UNSPECIFIED: the sender set no dtype)")


def encode_into(out: pb.Tensor, t: torch.Tensor, dtype: torch.dtype | None = None, *,
                stochastic: bool = False) -> pb.Tensor:
    """Fill `out` (e.g. a field of the message being built) with `t`, cast to `dtype` if given.

    Writing into the enclosing message's own field saves the copy that
    assigning a finished `Tensor` into a message makes (megabytes per site).
    `stochastic` rounds quantised dtypes stochastically instead of to nearest.
    """
    t = t.detach()
    if dtype is not None and dtype in _LEVELS and t.is_floating_point():
        return _quantise_into(out, t, dtype, stochastic)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    t = t.contiguous().cpu()
    code = _TO_WIRE[t.dtype]
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)  # numpy has no bfloat16: ship its bit pattern
    out.Clear()
    out.dtype = code
    out.shape.extend(t.shape)
    # Little-endian row-major bytes (numpy's native order on the hosts we support).
    out.data = t.numpy().tobytes()
    return out


def _quantise_into(out: pb.Tensor, t: torch.Tensor, dtype: torch.dtype, stochastic: bool) -> pb.Tensor:
    """Integers with one float32 scale per group: x / (group absmax / levels), rounded."""
    levels, group = _LEVELS[dtype], _GROUP[dtype]
    width = t.shape[-1] if t.dim() else 1
    out.Clear()
    out.dtype = _TO_WIRE[dtype]
    out.shape.extend(t.shape)
    if t.numel() == 0:  # no values, no scales
        return out
    rows = t.float().cpu().reshape(-1, width)
    groups = _groups(width, group)
    if groups > 1:  # pad each row to whole groups (zeros: they change no absmax)
        rows = torch.nn.functional.pad(rows, (0, groups * group - width)).reshape(-1, group)
    scale = rows.abs().amax(dim=1) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale is exact
    scaled = rows / scale[:, None]
    if stochastic:  # floor(v + u), u ~ U[0, 1): v on average
        q = torch.floor(scaled + torch.rand(scaled.shape, generator=_ROUNDING))
    else:
        q = torch.round(scaled)
    q = q.clamp_(-levels, levels).to(torch.int8)
    if groups > 1:
        q = q.reshape(-1, groups * group)[:, :width]
    if dtype == INT4:
        nibbles = (q.reshape(-1) + 8).to(torch.uint8)
        if nibbles.numel() % 2:
            nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
        out.data = (nibbles[0::2] | (nibbles[1::2] << 4)).numpy().tobytes()
        out.group = group
    else:
        out.data = q.numpy().tobytes()
    out.scales = scale.numpy().astype("<f4").tobytes()
    return out


# Stochastic rounding draws from its own generator, so the caller's global torch RNG (their
# dropout, their sampling) is the same with or without it.
_ROUNDING = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


def _groups(width: int, group: int) -> int:
    """Scales per row of `width` values with `group` values per scale (0: one per row)."""
    return 1 if group <= 0 or width == 0 else -(-width // group)


def encode(t: torch.Tensor, dtype: torch.dtype | None = None) -> pb.Tensor:
    """Serialise `t` (cast to `dtype` if given) as little-endian row-major bytes."""
    return encode_into(pb.Tensor(), t, dtype)


def _all_finite(values: np.ndarray, dtype: torch.dtype) -> bool:
    """No NaN or Inf among `values` (read with `_NUMPY[dtype]`).

    numpy's vectorised isfinite runs on the caller's thread; torch.isfinite(t).all()
    cost ~10x more per message and went through torch's thread pool, which stalls
    whenever the other core is busy (the edge and the cloud share cores on one host).
    """
    if dtype == torch.bfloat16:
        return not bool(np.any((values & _BF16_EXPONENT) == _BF16_EXPONENT))
    return bool(np.isfinite(values).all())


def decode(
    msg: pb.Tensor,
    *,
    name: str,
    shape: Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    finite: bool = True,
) -> torch.Tensor:
    """Decode and validate a wire tensor.

    `shape` is the expected shape (None: any), `dtypes` the allowed dtypes.
    Floating tensors must be finite unless `finite=False`. The result owns its
    memory and is writable (autograd may accumulate into a gradient in place).
    """
    require(msg, name)
    name = clip(name, 100)  # server-composed, but may embed a module name the peer chose
    dtype = torch_dtype(msg.dtype)
    if dtypes is not None and dtype not in dtypes:
        allowed = ", ".join(dtype_name(d) for d in dtypes)
        raise WireError(f"{name}: dtype {dtype_name(dtype)} not allowed here (expected {allowed})")
    if len(msg.shape) > MAX_DIMS:
        raise WireError(f"{name}: {len(msg.shape)} dimensions; at most {MAX_DIMS} are supported")
    got_shape = tuple(int(s) for s in msg.shape)
    if any(s < 0 for s in got_shape):
        raise WireError(f"{name}: negative dimension in shape {shape_text(got_shape)}")
    if shape is not None and got_shape != tuple(shape):
        raise WireError(f"{name}: shape {shape_text(got_shape)} does not match expected {shape_text(shape)}")
    # Read once: every access of a bytes field copies it out of the message.
    data = msg.data
    itemsize = np.dtype(_NUMPY[dtype]).itemsize
    # Python integers: a hostile shape cannot overflow into a small product.
    numel = math.prod(got_shape)
    expected = (numel + 1) // 2 if dtype == INT4 else numel * itemsize
    if len(data) != expected:
        raise WireError(
            f"{name}: {len(data)} bytes for shape {shape_text(got_shape)} of "
            f"{dtype_name(dtype)} (expected {expected})"
        )
    values: np.ndarray = np.frombuffer(data, dtype=_NUMPY[dtype])  # a read-only view, no copy yet
    if dtype in _LEVELS:
        return _dequantise(msg, values, got_shape, name, dtype, finite)
    if finite and dtype.is_floating_point and not _all_finite(values, dtype):
        raise WireError(f"{name}: contains NaN or Inf")
    # copy(): `data` is immutable, and the caller may write into the tensor
    # (autograd accumulates gradients in place into buffers it owns).
    t = torch.from_numpy(values.copy())
    if dtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    return t.reshape(got_shape)


def _dequantise(msg: pb.Tensor, values: np.ndarray, shape: tuple[int, ...], name: str,
                dtype: torch.dtype, finite: bool) -> torch.Tensor:
    """float32 from quantised values and their per-group scales, the scales checked like any float data."""
    width = shape[-1] if shape else 1
    numel = math.prod(shape)
    rows = numel // width if width else 0
    if msg.group < 0:
        raise WireError(f"{name}: negative quantisation group {msg.group}")
    groups = _groups(width, msg.group)
    scales = msg.scales
    if len(scales) != rows * groups * 4:
        raise WireError(f"{name}: {len(scales)} bytes of {dtype_name(dtype)} scales for {rows} rows of "
                        f"{groups} groups (expected {rows * groups * 4})")
    scale = np.frombuffer(scales, dtype="<f4")
    if not np.isfinite(scale).all() or (scale < 0).any():
        raise WireError(f"{name}: {dtype_name(dtype)} scales must be finite and not negative")
    if dtype == INT4:
        both = np.empty(values.size * 2, dtype=np.int8)
        both[0::2] = values & 0x0F
        both[1::2] = values >> 4
        values = both[:numel] - 8
    q = values.reshape(rows, width).astype(np.float32)
    with np.errstate(over="ignore"):  # an overflow is refused just below, by name
        if groups == 1:
            out = q * scale[:, None]
        else:
            group = msg.group
            padded = np.zeros((rows, groups * group), dtype=np.float32)
            padded[:, :width] = q
            out = (padded.reshape(-1, group) * scale[:, None]).reshape(rows, groups * group)[:, :width]
    if finite and not np.isfinite(out).all():  # a finite scale near float32's maximum, times 127
        raise WireError(f"{name}: {dtype_name(dtype)} values times their scales overflow float32")
    return torch.from_numpy(np.ascontiguousarray(out)).reshape(shape)
