"""What edges send, checked against their session and this server's limits, and decoded onto the serving device.

Every message here comes from a client the server does not trust: a check
fails with a WireError (INVALID_ARGUMENT) or LimitExceeded (RESOURCE_EXHAUSTED)
that names the field, never with a shape error from deep inside torch.
"""
from __future__ import annotations

import torch

from cloud_server.errors import LimitExceeded
from cloud_server.served_model import ServedModel
from cloud_server.session import Session
from common import lora_wire
from common import tensor_codec as codec
from common.lora import LoRAAdapter
from common.tensor_codec import WireError, clip
from common.wire import dlora_pb2 as pb

MAX_PARKED_RANK = 256   # highest LoRA rank an edge may send (parked or aggregated adapters) or ask the server for


def names(given: list[str], most: int = 4) -> str:
    """Client-chosen names for an error message: a few, each clipped, and how many more."""
    shown = ", ".join(repr(clip(n, 60)) for n in given[:most])
    return shown + (f" and {len(given) - most} more" if len(given) > most else "")


class InputDecoder:
    """Decodes one server's requests: its model fixes the widths, its limits the sizes."""

    def __init__(self, served: ServedModel, max_batch_tokens: int) -> None:
        self.served = served
        self.max_batch_tokens = max_batch_tokens

    # -- steps -----------------------------------------------------------------
    def step_start(self, session: Session, start: pb.StepStart) -> tuple[torch.Tensor, torch.Tensor]:
        """A step's hidden states [batch, seq, hidden] and attention mask [batch, seq] (as 0/1 longs)."""
        h = self.served.meta.hidden_size
        codec.require(start.hidden, "hidden states")  # named as missing, not as a shape [] mismatch
        shape = tuple(start.hidden.shape)
        if len(shape) != 3 or shape[2] != h:
            raise WireError(f"hidden states must have shape [batch, seq, {h}], got {codec.shape_text(shape)}")
        if shape[0] < 1 or shape[1] < 1:
            raise WireError(f"empty batch: hidden shape {codec.shape_text(shape)}")
        if self.served.max_positions and shape[1] > self.served.max_positions:
            raise LimitExceeded(f"sequence length {shape[1]} exceeds the model's {self.served.max_positions} positions")
        if shape[0] * shape[1] > self.max_batch_tokens:
            raise LimitExceeded(f"batch x sequence = {shape[0] * shape[1]} exceeds this server's "
                                f"limit of {self.max_batch_tokens} tokens per step")
        hidden = codec.decode(start.hidden, name="hidden states", shape=shape, dtypes=[session.wire.act])
        mask = codec.decode(start.attention_mask, name="attention mask", shape=shape[:2], dtypes=[torch.bool])
        if not bool(mask.any(dim=1).all()):
            raise WireError("every row of the attention mask needs at least one real position")
        dev = self.served.device
        return hidden.to(device=dev, dtype=self.served.dtype), mask.to(device=dev, dtype=torch.long)

    def next_embedding(self, session: Session, msg: pb.EdgeMessage,
                       mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Generation: the next token's embedding [batch, 1, hidden], and the mask grown by its position."""
        if msg.WhichOneof("kind") != "next_embedding":
            got = msg.WhichOneof("kind") or "nothing"
            raise WireError(f"expected a next_embedding message from the edge, got {got}")
        batch, length = mask.shape
        if self.served.max_positions and length + 1 > self.served.max_positions:
            raise LimitExceeded(f"generation reached the model's {self.served.max_positions} positions")
        if batch * (length + 1) > self.max_batch_tokens:
            raise LimitExceeded(f"batch x length = {batch * (length + 1)} exceeds this server's "
                                f"limit of {self.max_batch_tokens} tokens")
        h = codec.decode(msg.next_embedding.hidden, name="next embedding",
                         shape=(batch, 1, self.served.meta.hidden_size), dtypes=[session.wire.act])
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=mask.device)], dim=1)
        return h.to(device=self.served.device, dtype=self.served.dtype), mask

    # -- parking (Kill and Revive) -----------------------------------------------
    def park_request(self, session: Session, request: pb.ParkRequest) -> tuple[dict[str, LoRAAdapter], set[str]]:
        """The adapters to park (frozen, on the serving device) and the names to unpark."""
        park = {p.name: self._parked(session, p) for p in request.park}
        unpark = set(request.unpark)
        if len(park) != len(request.park) or len(unpark) != len(request.unpark):
            raise WireError("a module is named twice in one park request")
        if park.keys() & unpark:
            raise WireError(f"modules both parked and unparked: {names(sorted(park.keys() & unpark))}")
        unknown = sorted(unpark - session.module_names)
        if unknown:
            raise WireError(f"cannot unpark {names(unknown)}: not modules of this session")
        on_edge = sorted(n for n in park.keys() | unpark if _layer_of(session, n) < session.edge_layers)
        if on_edge:
            raise WireError(f"cannot park or unpark {names(on_edge)}: they sit in blocks "
                            f"0..{session.edge_layers - 1}, which run on the edge (edge_layers "
                            f"{session.edge_layers})")
        return park, unpark

    def _parked(self, session: Session, p: pb.ParkedAdapter) -> LoRAAdapter:
        spec = next((m for s in session.sites for m in s.modules if m.name == p.name), None)
        if spec is None:
            raise WireError(f"cannot park {names([p.name])}: not a module of this session")
        max_rank = min(MAX_PARKED_RANK, spec.in_features, spec.out_features)
        a, b = lora_wire.decode(p, spec.in_features, spec.out_features, max_rank)
        if not (abs(p.scale) < 1e6 and p.scale == p.scale):
            raise WireError(f"{p.name}: scale {p.scale} is not a sane finite number")
        adapter = LoRAAdapter.from_weights(a, b, p.scale)
        return adapter.requires_grad_(False).to(device=self.served.device, dtype=self.served.dtype)

    # -- SplitLoRA aggregation ------------------------------------------------------
    @staticmethod
    def client_adapters(session: Session, request: pb.AggregateRequest) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """An aggregation's client-side adapters, (A, B) in fp32 for every client-side module of the session."""
        if request.round < 1 or not 1 <= request.examples <= 1 << 40:
            raise WireError("aggregation needs round >= 1 and 1 <= examples <= 2^40")
        own = {m.name: m for s in session.sites for m in s.modules}
        adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for w in request.adapters:
            spec = own.get(w.name)
            if spec is None or w.name in adapters:
                raise WireError(f"{names([w.name])} is not a client-side module of this session, "
                                "or is named twice")
            adapters[w.name] = lora_wire.decode(w, spec.in_features, spec.out_features, MAX_PARKED_RANK)
        if adapters.keys() != own.keys():
            missing = sorted(own.keys() - adapters.keys())[:3]
            raise WireError(f"aggregation needs every client-side module; missing {missing}")
        return adapters


def _layer_of(session: Session, name: str) -> int:
    return next((s.layer for s in session.sites for m in s.modules if m.name == name), -1)
