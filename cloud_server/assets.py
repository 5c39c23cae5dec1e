"""What the edge downloads once: tokenizer files, model config and the edge weights.

The edge weights are the embedding, the final norm and (unless tied to the
embedding) the LM head, stored under their names in the full model's state
dict so the edge can place them into a model skeleton built from config.json.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save as save_safetensors
from torch import nn

from common.model_parts import backbone, final_norm_name

MANIFEST = "edge_manifest.json"
WEIGHTS = "edge_weights.safetensors"
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
)


@dataclass
class Asset:
    name: str
    data: bytes
    sha256: str


def _module_path(model: nn.Module, module: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is module:
            return name
    raise ValueError("module not found in model")


def build(model: nn.Module, model_dir: Path) -> list[Asset]:
    """Pack the edge's share of `model` (call before the cloud strips it)."""
    inner_prefix = getattr(model, "base_model_prefix")
    norm_path = f"{inner_prefix}.{final_norm_name(model)}"
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    emb_path = _module_path(model, emb)
    tied = head is not None and head.weight is emb.weight
    head_path = _module_path(model, head) if head is not None else ""
    parts = {emb_path: emb, norm_path: backbone(model).get_submodule(final_norm_name(model))}
    if head is not None and not tied:
        parts[head_path] = head
    tensors = {}
    for prefix, mod in parts.items():
        for key, t in mod.state_dict().items():
            tensors[f"{prefix}.{key}"] = t.detach().float().cpu().contiguous()
    manifest = {
        "embedding": emb_path,
        "final_norm": norm_path,
        "lm_head": head_path,
        "tied_lm_head": tied,
    }
    files: dict[str, bytes] = {
        "config.json": model.config.to_json_string().encode(),
        MANIFEST: json.dumps(manifest, indent=2).encode(),
        WEIGHTS: save_safetensors(tensors),
    }
    for name in _TOKENIZER_FILES:
        p = model_dir / name
        if p.exists():
            files[name] = p.read_bytes()
    return [make_asset(n, d) for n, d in sorted(files.items())]


def make_asset(name: str, data: bytes) -> Asset:
    return Asset(name, data, hashlib.sha256(data).hexdigest())


def digest(assets: list[Asset]) -> str:
    h = hashlib.sha256()
    for a in assets:
        h.update(a.name.encode() + b"\0" + a.sha256.encode())
    return h.hexdigest()
