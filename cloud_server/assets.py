"""What the edge downloads once: tokenizer files, model config, the edge weights and the probe.

The edge weights are the embedding, the final norm and (unless tied to the
embedding) the LM head, stored under their names in the full model so the
edge can place them into a model skeleton built from config.json. Buffers
travel too, persistent or not: a skeleton built on the meta device has no
values for them (Gemma's embedding scale is such a buffer).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from cloud_server.device_map import readable
from common import edge_assets, edge_probe
from common.model_parts import backbone, final_norm_name

if TYPE_CHECKING:
    from transformers import PreTrainedModel


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


def build(model: PreTrainedModel, model_dir: Path, probe: dict[str, torch.Tensor], dtype: torch.dtype) -> list[Asset]:
    """Pack the edge's share of `model` (call before the cloud strips it).

    `probe` is `edge_probe.capture(model)`; `dtype` the cloud's, which sets how
    closely the edge must reproduce it.
    """
    norm = backbone(model).get_submodule(final_norm_name(model))
    norm_path = _module_path(model, norm)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    emb_path = _module_path(model, emb)
    tied = head is not None and head.weight is emb.weight
    head_path = _module_path(model, head) if head is not None else ""
    parts = {emb_path: emb, norm_path: norm}
    if head is not None and not tied:
        parts[head_path] = head
    # readable: under a device map these parts may be offloaded.
    tensors = {f"{prefix}.{key}": _portable(t) for prefix, mod in parts.items()
               for key, t in readable(mod, module_tensors(mod))}
    manifest = edge_assets.Manifest(embedding=emb_path, final_norm=norm_path, lm_head=head_path, tied_lm_head=tied)
    files: dict[str, bytes] = {
        edge_assets.CONFIG: model.config.to_json_string().encode(),
        edge_assets.MANIFEST: manifest.to_json(),
        edge_assets.WEIGHTS: save_safetensors(tensors),
        edge_assets.PROBE: save_safetensors(edge_probe.for_edge(probe), metadata={
            edge_assets.PROBE_DTYPE_KEY: str(dtype).removeprefix("torch.")}),
    }
    for name in edge_assets.TOKENIZER_FILES:
        p = model_dir / name
        if p.exists():
            files[name] = p.read_bytes()
    return [make_asset(n, d) for n, d in sorted(files.items())]


def module_tensors(module: nn.Module):
    """Every parameter and buffer of `module`, persistent or not, by name."""
    yield from module.named_parameters()
    yield from module.named_buffers()


def _portable(t: torch.Tensor) -> torch.Tensor:
    # Floats travel as fp32, whatever the cloud computes in; integer buffers keep their type.
    return (t.detach().float() if t.is_floating_point() else t.detach()).cpu().contiguous()


def make_asset(name: str, data: bytes) -> Asset:
    return Asset(name, data, hashlib.sha256(data).hexdigest())


# Bumped when what the assets hold changes, so edges do not reuse an older cache.
_FORMAT = b"dlora-edge-assets-2"


def digest(assets: list[Asset]) -> str:
    """What identifies the served model to an edge (and names its asset cache).

    The probe is left out: it is computed, and may differ in its last bits
    between two runs of the same model (another device or thread count), which
    must not make a restarted server look like a different model.
    """
    h = hashlib.sha256(_FORMAT + b"\0")
    for a in assets:
        if a.name != edge_assets.PROBE:
            h.update(a.name.encode() + b"\0" + a.sha256.encode())
    return h.hexdigest()
