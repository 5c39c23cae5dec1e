"""The edge's share of the model: tokenizer, embedding, final norm and LM head.

The modules are built from the downloaded config.json on the meta device, so
the transformer blocks never take memory here; only the three edge parts are
materialised and filled from edge_weights.safetensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

_MANIFEST = "edge_manifest.json"
_WEIGHTS = "edge_weights.safetensors"


class EdgeModel(nn.Module):
    """Embedding lookup in, final norm + LM head out. Frozen; only LoRA trains."""

    def __init__(self, embedding: nn.Module, final_norm: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.embedding = embedding
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.requires_grad_(False)

    @classmethod
    def from_assets(cls, path: Path) -> "EdgeModel":
        from transformers import AutoConfig, AutoModelForCausalLM

        manifest = json.loads((path / _MANIFEST).read_text())
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        weights = load_file(path / _WEIGHTS)
        parts = {}
        for role in ("embedding", "final_norm"):
            parts[role] = _materialise(skeleton.get_submodule(manifest[role]), manifest[role], weights)
        if manifest["tied_lm_head"]:
            head = skeleton.get_submodule(manifest["lm_head"])
            head.to_empty(device="cpu")
            head.weight = parts["embedding"].weight
            if getattr(head, "bias", None) is not None:
                nn.init.zeros_(head.bias)
            parts["lm_head"] = head
        else:
            parts["lm_head"] = _materialise(skeleton.get_submodule(manifest["lm_head"]), manifest["lm_head"], weights)
        return cls(parts["embedding"], parts["final_norm"], parts["lm_head"]).eval()

    @property
    def hidden_size(self) -> int:
        return int(self.embedding.weight.shape[1])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm then LM head, for hidden states of any leading shape."""
        return self.lm_head(self.final_norm(hidden)).float()

    def token_logits(self, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the given vocabulary entries only: C columns of the LM head."""
        bias = getattr(self.lm_head, "bias", None)
        w = self.lm_head.weight[token_ids]
        return F.linear(self.final_norm(hidden), w, None if bias is None else bias[token_ids]).float()

    def head_flops(self, positions: int, columns: int | None = None) -> int:
        """Analytic forward FLOPs of norm + LM head over `positions` rows (all or `columns` columns)."""
        vocab, hidden = self.lm_head.weight.shape
        return 2 * positions * (columns or vocab) * hidden + 5 * positions * hidden


def _materialise(module: nn.Module, prefix: str, weights: dict[str, torch.Tensor]) -> nn.Module:
    module.to_empty(device="cpu")
    state = {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")}
    missing, unexpected = module.load_state_dict(state, strict=False)
    # Non-persistent buffers are fine to lack; parameters are not.
    params = {n for n, _ in module.named_parameters()}
    if params & set(missing) or unexpected:
        raise ValueError(f"edge weights for {prefix} do not fit: missing {missing}, unexpected {unexpected}")
    return module


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok
