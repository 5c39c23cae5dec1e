"""LoRA adapters: the math both sides agree on, and an in-process injector.

An adapter computes `scale * B(A x)` with A: [r, in], B: [out, r] and
scale = alpha / r, in the same order of operations as Hugging Face PEFT, so
the distributed step and an in-process model give bit-for-bit comparable
results.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.settings import setting

# The target that asks for every linear of the blocks (PEFT's spelling); both sides read it.
ALL_LINEAR = "all-linear"


@dataclass
class LoRAConfig:
    """Hyper-parameters of the adapters the edge trains (PEFT's LoraConfig says r, lora_alpha,
    target_modules, lora_dropout, use_rslora)."""

    r: int = setting(8, "LoRA rank r", aliases=("--rank",))
    lora_alpha: float = setting(16.0, "LoRA alpha; scale = alpha / r", aliases=("--alpha",))
    target_modules: list[str] = setting(list, "comma-separated linears to adapt, e.g. q_proj,v_proj, or all-linear; "
                                              "none: the server's default", aliases=("--targets",))
    lora_dropout: float = setting(0.0, "LoRA dropout on each adapter's input, in training")
    use_rslora: bool = setting(False, "rank-stabilised scale alpha / sqrt(r) instead of alpha / r")

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

    @property
    def scale(self) -> float:
        return self.lora_alpha / (self.r ** 0.5 if self.use_rslora else self.r)


class LoRAAdapter(nn.Module):
    """The trainable pair (A, B) of one adapted linear."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        # PEFT's default: A ~ Kaiming-uniform, B = 0, so the adapted model
        # starts out equal to the frozen one.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def from_weights(cls, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> LoRAAdapter:
        """An adapter holding copies of A [r, in] and B [out, r]."""
        ad = cls(lora_a.shape[1], lora_b.shape[0], lora_a.shape[0], scale)
        with torch.no_grad():
            ad.lora_A.copy_(lora_a)
            ad.lora_B.copy_(lora_b)
        return ad

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """scale * A x: the rank-r half of the output, which `forward` multiplies by B."""
        return F.linear(x, self.lora_A) * self.scale

    @torch.no_grad()
    def weight_norm(self) -> float:
        """||scale * B A||_F from r x r products, without forming B A."""
        a, b = self.lora_A.double(), self.lora_B.double()
        sq = torch.trace((b.T @ b) @ (a @ a.T)).clamp_min(0.0)
        return float(abs(self.scale) * sq.sqrt())

    def flops(self, tokens: int, down_only: bool = False) -> int:
        """Multiply-adds x2 of one forward over `tokens` rows (scale included); `down_only`:
        of scale * A x alone (a factorised exchange leaves B's product to the cloud)."""
        r, i, o = self.rank, self.in_features, self.out_features
        if down_only:
            return 2 * tokens * r * i + tokens * r
        return 2 * tokens * r * (i + o) + tokens * o


class LoRALinear(nn.Module):
    """A frozen linear plus an adapter, for the in-process reference model."""

    def __init__(self, base: nn.Module, adapter: LoRAAdapter, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()  # PEFT's lora_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.adapter(self.dropout(x))


def seeded_adapters(shapes: dict[str, tuple[int, int]], rank: int, scale: float, seed: int) -> dict[str, LoRAAdapter]:
    """Fresh adapters for {name: (in, out)}, A drawn as PEFT draws it (uniform in +-1/sqrt(in),
    which is Kaiming-uniform with a = sqrt(5)) from a generator of its own, B = 0: the same
    seed gives the same adapters whatever torch's global RNG has done. The edge's adapters and
    a SplitLoRA federation's server-side ones both start here."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (fin, fout) in shapes.items():
        ad = LoRAAdapter(fin, fout, rank, scale)
        with torch.no_grad():
            bound = 1.0 / fin ** 0.5
            ad.lora_A.copy_(torch.rand(ad.lora_A.shape, generator=gen) * 2 * bound - bound)
        out[name] = ad
    return out


def inject(model: nn.Module, adapters: dict[str, LoRAAdapter], dropout: float = 0.0) -> None:
    """Replace each named linear of `model` by base + adapter, in place."""
    for name, adapter in adapters.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), adapter, dropout))


def peft_key(name: str, which: str) -> str:
    """State-dict key that Hugging Face PEFT uses for an adapter matrix."""
    return f"base_model.model.{name}.lora_{which}.weight"


def adapters_state(adapters: dict[str, LoRAAdapter]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name, ad in adapters.items():
        state[peft_key(name, "A")] = ad.lora_A.detach().cpu().contiguous()
        state[peft_key(name, "B")] = ad.lora_B.detach().cpu().contiguous()
    return state


def load_adapters_state(adapters: dict[str, LoRAAdapter], state: dict[str, torch.Tensor]) -> None:
    """Copy matrices from a PEFT-keyed state dict into `adapters`, checking shapes."""
    for name, ad in adapters.items():
        for which, param in (("A", ad.lora_A), ("B", ad.lora_B)):
            key = peft_key(name, which)
            if key not in state:
                raise KeyError(f"adapter file has no tensor {key}")
            if tuple(state[key].shape) != tuple(param.shape):
                raise ValueError(f"{key}: shape {tuple(state[key].shape)} != {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(state[key])
