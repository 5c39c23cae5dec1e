"""Encode torch tensors into wire `Tensor` messages and decode them back, with checks.

Decoding never trusts the sender: dtype, shape, byte length and finiteness are
checked, and a mismatch raises `WireError` with a message that names the tensor.

int8 is a quantised wire format for floating tensors: each row (every dimension
but the last: one token's vector) is sent as int8 values and one float32 scale,
its absolute maximum / 127, so the error per element is at most half a scale.
Decoding gives float32 back.
"""
from __future__ import annotations

import math
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


_TO_WIRE: dict[torch.dtype, int] = {
    torch.float32: pb.FLOAT32,
    torch.float16: pb.FLOAT16,
    torch.bfloat16: pb.BFLOAT16,
    torch.bool: pb.BOOL,
    torch.int8: pb.INT8,
}
_FROM_WIRE: dict[int, torch.dtype] = {v: k for k, v in _TO_WIRE.items()}
_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
# The dtypes activations and gradients may take on the wire, by name (the CLIs' choices).
WIRE_DTYPES = tuple(_NAMES)
# How each dtype's bytes are read with numpy. numpy has no bfloat16: its bit
# pattern travels and is checked as int16.
_NUMPY: dict[torch.dtype, type] = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.bfloat16: np.int16,
    torch.bool: np.bool_,
    torch.int8: np.int8,
}
# Exponent field of a bfloat16 bit pattern; all ones means Inf or NaN.
_BF16_EXPONENT = 0x7F80


def dtype_from_name(name: str) -> torch.dtype:
    """'fp32' / 'fp16' / 'bf16' -> torch dtype."""
    try:
        return _NAMES[name]
    except KeyError:
        raise ValueError(f"unknown wire dtype {name!r}; choose one of {sorted(_NAMES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _NAMES.items()}.get(dtype, str(dtype))


def wire_dtype(dtype: torch.dtype) -> int:
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


def encode_into(out: pb.Tensor, t: torch.Tensor, dtype: torch.dtype | None = None) -> pb.Tensor:
    """Fill `out` (e.g. a field of the message being built) with `t`, cast to `dtype` if given.

    Writing into the enclosing message's own field saves the copy that
    assigning a finished `Tensor` into a message makes (megabytes per site).
    """
    t = t.detach()
    if dtype == torch.int8 and t.is_floating_point():
        return _quantise_into(out, t)
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


def _quantise_into(out: pb.Tensor, t: torch.Tensor) -> pb.Tensor:
    """int8 with one scale per row: round to nearest of x / (absmax / 127)."""
    rows = t.float().cpu().reshape(-1, t.shape[-1] if t.dim() else 1)
    scale = rows.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale is exact
    q = torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    out.Clear()
    out.dtype = pb.INT8
    out.shape.extend(t.shape)
    out.data = q.numpy().tobytes()
    out.scales = scale.numpy().astype("<f4").tobytes()
    return out


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
    if len(data) != numel * itemsize:
        raise WireError(
            f"{name}: {len(data)} bytes for shape {shape_text(got_shape)} of "
            f"{dtype_name(dtype)} (expected {numel * itemsize})"
        )
    values = np.frombuffer(data, dtype=_NUMPY[dtype])  # a read-only view, no copy yet
    if dtype == torch.int8:
        return _dequantise(msg, values, got_shape, name)
    if finite and dtype.is_floating_point and not _all_finite(values, dtype):
        raise WireError(f"{name}: contains NaN or Inf")
    # copy(): `data` is immutable, and the caller may write into the tensor
    # (autograd accumulates gradients in place into buffers it owns).
    t = torch.from_numpy(values.copy())
    if dtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    return t.reshape(got_shape)


def _dequantise(msg: pb.Tensor, values: np.ndarray, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """float32 from int8 values and their per-row scales, the scales checked like any float data."""
    width = shape[-1] if shape else 1
    rows = len(values) // width if width else 0
    scales = msg.scales
    if len(scales) != rows * 4:
        raise WireError(f"{name}: {len(scales)} bytes of int8 scales for {rows} rows (expected {rows * 4})")
    scale = np.frombuffer(scales, dtype="<f4")
    if not np.isfinite(scale).all() or (scale < 0).any():
        raise WireError(f"{name}: int8 scales must be finite and not negative")
    out = values.reshape(rows, width).astype(np.float32) * scale[:, None]
    return torch.from_numpy(out).reshape(shape)
