"""Anatomy of Hugging Face causal LMs: where the blocks, the final norm and the heads are.

Both sides need the same answers: the cloud to strip the final norm from the
blocks it runs, the edge to build only the embedding, final norm and LM head.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import cast

import torch
from torch import nn

# Attribute names of the final norm after the last block, across HF families.
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")

# Default LoRA targets, by what a family calls its attention input projections.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "c_attn", "query_key_value", "Wqkv", "qkv_proj")

_SUPPORTED_HELP = "see docs/architectures.md"


class UnsupportedModel(ValueError):
    """This model's layout does not fit DLoRA's split; the text names the family and what is missing."""


def family(model: nn.Module) -> str:
    """The model's family as Hugging Face names it (config.model_type), for messages."""
    return str(getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__)


def backbone(model: nn.Module) -> nn.Module:
    """The module that holds the transformer blocks and the final norm (model.model, or OPT's model.decoder).

    The cloud calls it with `inputs_embeds`, so whatever it adds itself (learned
    positions, rotary tables) stays on the cloud, as in the full model.
    """
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    if inner is None:
        raise UnsupportedModel(f"{family(model)}: cannot find the decoder stack ({type(model).__name__} has no "
                               f"'{prefix}' attribute); {_SUPPORTED_HELP}")
    layers = num_layers(model.config)
    if not _has_blocks(inner, layers):
        # One level down, as in OPT (model.decoder.layers).
        nested = [c for c in inner.children() if _has_blocks(c, layers)]
        if len(nested) != 1:
            raise UnsupportedModel(f"{family(model)}: cannot find the {layers} transformer blocks under "
                                   f"{type(inner).__name__}; {_SUPPORTED_HELP}")
        inner = nested[0]
    return inner


def _has_blocks(module: nn.Module, layers: int) -> bool:
    return any(isinstance(c, nn.ModuleList) and len(c) == layers for c in module.children())


def final_norm_name(model: nn.Module) -> str:
    """Attribute name of the final norm on the backbone."""
    inner = backbone(model)
    for name in _FINAL_NORM_NAMES:
        if isinstance(getattr(inner, name, None), nn.Module):
            return name
    raise UnsupportedModel(
        f"{family(model)}: no final norm after the last block ({type(inner).__name__} has none of "
        f"{', '.join(_FINAL_NORM_NAMES)}); the edge applies the final norm and LM head, so DLoRA needs one; "
        f"{_SUPPORTED_HELP}")


def check_layout(model: nn.Module) -> None:
    """Refuse layouts whose edge parts would not be embedding -> blocks -> final norm -> LM head.

    A linear projection beside the blocks (OPT-350m's project_in/project_out)
    sits between the embedding or the head and the blocks, where neither side
    would apply it.
    """
    inner = backbone(model)
    extra = [n for n, c in inner.named_children() if is_linear(c)]
    if extra:
        raise UnsupportedModel(
            f"{family(model)}: projections {extra} sit between the blocks and the embedding or LM head "
            f"(for OPT: word_embed_proj_dim differs from hidden_size); DLoRA supports only models whose "
            f"embedding output enters block 0 and whose last block feeds the final norm; {_SUPPORTED_HELP}")
    final_norm_name(model)


def logit_transform(config) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What a family's causal-LM head does to the logits after the LM head, if anything.

    Gemma2/3 soft-cap the final logits (cap * tanh(logits / cap)); Cohere
    scales them. The edge must do the same, or training is silently wrong (the
    edge's probe check refuses a family that does something not listed here).
    """
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        return lambda logits: torch.tanh(logits / cap) * cap
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        return lambda logits: logits * scale
    return None


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 style Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D stores W as [in, out]
        w = cast(torch.Tensor, module.weight)
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
    """How many transformer blocks `config` describes."""
    return int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))
