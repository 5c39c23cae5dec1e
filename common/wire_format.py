"""How a session's tensors travel, as agreed at OpenSession: dtypes, factors, rounding.

Activations (hidden states, site inputs, adapter outputs) and gradients
(dL/dy, dL/dx, the final and cut gradients) each have a wire dtype. In a
factorised session an adapter's output may travel as its rank-r factors
(`down` = scale * A x, [tokens, r], and `up` = B, [out, r]) and the cloud
multiplies them out; in the backward pass it answers with dL/d(down) =
dL/dy B and dL/dB = dL/dy^T down, so only r numbers per token cross in
either direction instead of out_features. In exact arithmetic that is the same
step: y = B (scale A x) either way. Both sides read this module, so they agree
on what is sent where.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common import tensor_codec as codec
from common.wire import dlora_pb2 as pb

# The dtypes a session may choose for activations and for gradients.
SUPPORTED = tuple(codec.dtype_from_name(name) for name in codec.WIRE_DTYPES)

# The most calls a pipelined step may be cut into (StepStart.micro_batches; each part holds a server thread).
MAX_MICRO_BATCHES = 16


@dataclass(frozen=True)
class WireFormat:
    act: torch.dtype = torch.float32       # activations
    grad: torch.dtype = torch.float32      # gradients
    factorised: bool = False               # adapter outputs may travel as rank-r factors
    stochastic: bool = False               # quantised gradients round stochastically

    @classmethod
    def named(cls, act: str = "fp32", grad: str | None = None, factorised: bool = False,
              stochastic: bool = False) -> WireFormat:
        """From the CLI's names: grad None or '' means the same as `act`."""
        a = codec.dtype_from_name(act)
        return cls(a, codec.dtype_from_name(grad) if grad else a, factorised, stochastic)

    # -- negotiation -----------------------------------------------------------
    def fill_request(self, req: pb.OpenSessionRequest) -> None:
        req.wire_dtype = codec.wire_dtype(self.act)
        req.grad_dtype = codec.wire_dtype(self.grad)
        req.factorised = self.factorised
        req.stochastic_rounding = self.stochastic

    @classmethod
    def from_message(cls, msg: pb.OpenSessionRequest | pb.OpenSessionReply) -> WireFormat:
        """What a request asks for (or a reply agreed to); raises WireError for an unsupported dtype."""
        act = codec.torch_dtype(msg.wire_dtype or pb.FLOAT32)
        grad = codec.torch_dtype(msg.grad_dtype) if msg.grad_dtype else act
        for which, dtype in (("wire", act), ("gradient", grad)):
            if dtype not in SUPPORTED:
                raise codec.WireError(f"{which} dtype {codec.dtype_name(dtype)} is not supported; use one of "
                                      f"{', '.join(codec.WIRE_DTYPES)}")
        return cls(act, grad, bool(msg.factorised), bool(msg.stochastic_rounding))

    def fill_reply(self, reply: pb.OpenSessionReply) -> None:
        reply.wire_dtype = codec.wire_dtype(self.act)
        reply.grad_dtype = codec.wire_dtype(self.grad)
        reply.factorised = self.factorised
        reply.stochastic_rounding = self.stochastic

    def __str__(self) -> str:
        act, grad = codec.dtype_name(self.act), codec.dtype_name(self.grad)
        text = act if act == grad else f"{act} activations, {grad} gradients"
        if self.stochastic and self.grad in (torch.int8, codec.INT4):
            text += " (stochastic rounding)"
        return text + (", factorised" if self.factorised else "")

    # -- tensors ---------------------------------------------------------------
    def put_act(self, out: pb.Tensor, t: torch.Tensor) -> pb.Tensor:
        return codec.encode_into(out, t, self.act)

    def put_grad(self, out: pb.Tensor, t: torch.Tensor) -> pb.Tensor:
        return codec.encode_into(out, t, self.grad, stochastic=self.stochastic)

    def factors_pay(self, tokens: int, rank: int, out_features: list[int]) -> bool:
        """Whether a site's outputs are smaller as factors: tokens x r + out x r per module
        against tokens x out. Not for one-token generation passes, where B would dominate."""
        if not self.factorised:
            return False
        return sum(rank * (tokens + o) for o in out_features) < sum(tokens * o for o in out_features)


def factor_output(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """y = down upᵀ: [..., r] x [out, r] -> [..., out]."""
    return down @ up.T


def factor_grads(dy: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/d(down), dL/d(up)) from dL/dy for y = down upᵀ, in float32."""
    dy = dy.float()
    d_down = dy @ up.float()
    d_up = dy.reshape(-1, dy.shape[-1]).T @ down.float().reshape(-1, down.shape[-1])
    return d_down, d_up
