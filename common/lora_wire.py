"""LoRA weights on the wire: one adapter's A and B as fp32 tensors (pb.LoRAWeights, pb.ParkedAdapter), both ways."""
from __future__ import annotations

import torch

from common import tensor_codec as codec
from common.lora import LoRAAdapter
from common.tensor_codec import WireError
from common.wire import dlora_pb2 as pb

# Adapters are exact on the wire: never quantised, whatever the session's activation dtype.
WEIGHT_DTYPE = torch.float32


def encode_into(msg: pb.LoRAWeights | pb.ParkedAdapter, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """Fill `msg` (a LoRAWeights or a ParkedAdapter) with one adapter's name, A [r, in] and B [out, r]."""
    msg.name = name
    codec.encode_into(msg.lora_A, a.detach(), WEIGHT_DTYPE)
    codec.encode_into(msg.lora_B, b.detach(), WEIGHT_DTYPE)


def weights(adapters: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[pb.LoRAWeights]:
    """{name: (A, B)} as LoRAWeights messages."""
    out = []
    for name, (a, b) in adapters.items():
        msg = pb.LoRAWeights()
        encode_into(msg, name, a, b)
        out.append(msg)
    return out


def adapter_weights(adapters: dict[str, LoRAAdapter]) -> list[pb.LoRAWeights]:
    """Adapters as LoRAWeights messages."""
    return weights({n: (ad.lora_A, ad.lora_B) for n, ad in adapters.items()})


def parked(adapters: dict[str, LoRAAdapter]) -> list[pb.ParkedAdapter]:
    """Adapters as ParkedAdapter messages (with their scale)."""
    out = []
    for name, ad in adapters.items():
        msg = pb.ParkedAdapter(scale=ad.scale)
        encode_into(msg, name, ad.lora_A, ad.lora_B)
        out.append(msg)
    return out


def decode(msg: pb.LoRAWeights | pb.ParkedAdapter, in_features: int | None = None,
           out_features: int | None = None, max_rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) from `msg`, checked: fp32, A [r, in_features] and B [out_features, r] with 1 <= r <= max_rank
    (a feature count or rank left None is not checked). Errors name the module and the tensor."""
    a_shape = tuple(msg.lora_A.shape)
    r = a_shape[0] if len(a_shape) == 2 else 0
    most = max_rank if max_rank is not None else r
    if in_features is not None and not 1 <= r <= most:
        raise WireError(f"{msg.name[:100]}: lora_A must be [r, {in_features}] with 1 <= r <= {most}, "
                        f"got {codec.shape_text(a_shape)}")
    a = codec.decode(msg.lora_A, name=f"{msg.name[:100]} lora_A",
                     shape=None if in_features is None else (r, in_features), dtypes=[WEIGHT_DTYPE])
    b = codec.decode(msg.lora_B, name=f"{msg.name[:100]} lora_B",
                     shape=None if out_features is None else (out_features, r), dtypes=[WEIGHT_DTYPE])
    return a, b


def copy_into(adapter: LoRAAdapter, msg: pb.LoRAWeights | pb.ParkedAdapter) -> None:
    """Overwrite `adapter`'s A and B with those in `msg`, which must have the adapter's very shapes."""
    a, b = decode(msg, adapter.in_features, adapter.out_features, max_rank=adapter.rank)
    if a.shape[0] != adapter.rank:
        raise WireError(f"{msg.name[:100]}: rank {a.shape[0]} on the wire, the adapter's is {adapter.rank}")
    with torch.no_grad():
        adapter.lora_A.copy_(a)
        adapter.lora_B.copy_(b)
