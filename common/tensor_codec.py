"""Encode torch tensors into wire `Tensor` messages and decode them back, with checks.

Decoding never trusts the sender: dtype, shape, byte length and finiteness are
checked, and a mismatch raises `WireError` with a message that names the tensor.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from common.wire import dlora_pb2 as pb


class WireError(ValueError):
    """A message from the peer is malformed; the text says what is wrong."""


_TO_WIRE: dict[torch.dtype, int] = {
    torch.float32: pb.FLOAT32,
    torch.float16: pb.FLOAT16,
    torch.bfloat16: pb.BFLOAT16,
    torch.bool: pb.BOOL,
}
_FROM_WIRE: dict[int, torch.dtype] = {v: k for k, v in _TO_WIRE.items()}
_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def encode(t: torch.Tensor, dtype: torch.dtype | None = None) -> pb.Tensor:
    """Serialise `t` (cast to `dtype` if given) as little-endian row-major bytes."""
    t = t.detach()
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    t = t.contiguous().cpu()
    if t.dtype == torch.bfloat16:
        # numpy has no bfloat16: ship its bit pattern as int16.
        raw = t.view(torch.int16).numpy().tobytes()
    else:
        raw = t.numpy().tobytes()
    return pb.Tensor(dtype=_TO_WIRE[t.dtype], shape=list(t.shape), data=raw)


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
    Floating tensors must be finite unless `finite=False`.
    """
    dtype = torch_dtype(msg.dtype)
    if dtypes is not None and dtype not in dtypes:
        allowed = ", ".join(dtype_name(d) for d in dtypes)
        raise WireError(f"{name}: dtype {dtype_name(dtype)} not allowed here (expected {allowed})")
    got_shape = tuple(int(s) for s in msg.shape)
    if any(s < 0 for s in got_shape):
        raise WireError(f"{name}: negative dimension in shape {list(got_shape)}")
    if shape is not None and got_shape != tuple(shape):
        raise WireError(f"{name}: shape {list(got_shape)} does not match expected {list(shape)}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    # Python integers: a hostile shape cannot overflow into a small product.
    numel = math.prod(got_shape)
    if len(msg.data) != numel * itemsize:
        raise WireError(
            f"{name}: {len(msg.data)} bytes for shape {list(got_shape)} of "
            f"{dtype_name(dtype)} (expected {numel * itemsize})"
        )
    if dtype == torch.bfloat16:
        arr = np.frombuffer(msg.data, dtype=np.int16)
        t = torch.from_numpy(arr.copy()).view(torch.bfloat16)
    elif dtype == torch.bool:
        t = torch.from_numpy(np.frombuffer(msg.data, dtype=np.bool_).copy())
    else:
        # copy(): protobuf bytes are immutable and torch wants writable memory.
        t = torch.from_numpy(np.frombuffer(msg.data, dtype=torch.empty((), dtype=dtype).numpy().dtype).copy())
    t = t.reshape(got_shape)
    if finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise WireError(f"{name}: contains NaN or Inf")
    return t
