"""Anatomy of Hugging Face causal LMs: where the blocks, the final norm and the heads are.

Both sides need the same answers: the cloud to strip the final norm from the
blocks it runs, the edge to build only the embedding, final norm and LM head.
"""
from __future__ import annotations

import re

from torch import nn

# Attribute names of the final norm after the last block, across HF families.
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")

# Default LoRA targets, by what a family calls its attention input projections.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "c_attn", "query_key_value", "Wqkv")


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack (embedding, blocks, final norm) of a causal LM."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    if inner is None:
        raise ValueError(f"cannot find the decoder stack of {type(model).__name__}")
    return inner


def final_norm_name(model: nn.Module) -> str:
    """Attribute name of the final norm on the backbone."""
    inner = backbone(model)
    for name in _FINAL_NORM_NAMES:
        if isinstance(getattr(inner, name, None), nn.Module):
            return name
    raise ValueError(f"cannot find the final norm of {type(inner).__name__}")


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 style Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D stores W as [in, out]
        w = module.weight
        return int(w.shape[0]), int(w.shape[1])
    raise TypeError(f"{type(module).__name__} is not a linear layer LoRA can adapt")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


_LAYER_RE = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int:
    """Block index in a dotted module name, e.g. model.layers.3.self_attn.q_proj -> 3."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else -1


def blocks_name(inner: nn.Module, num_layers: int) -> str:
    """Attribute of the backbone that holds the transformer blocks (layers, h, ...)."""
    for name, child in inner.named_children():
        if isinstance(child, nn.ModuleList) and len(child) == num_layers:
            return name
    raise ValueError(f"cannot find the {num_layers} blocks of {type(inner).__name__}")


def num_layers(config) -> int:
    return int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))
