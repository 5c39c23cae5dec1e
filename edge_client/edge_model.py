"""The edge's share of the model: tokenizer, embedding, final norm and LM head.

The modules are built from the downloaded config.json on the meta device, so
the transformer blocks never take memory here; only the three edge parts are
materialised, every parameter and buffer filled from the edge weights file.
Then the cloud's probe proves they compute what the cloud's full model does.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from common import edge_assets, edge_probe
from common.model_parts import logit_transform

log = logging.getLogger(__name__)


class EdgeModel(nn.Module):
    """Embedding lookup in, final norm + LM head out. Frozen; only LoRA trains."""

    def __init__(self, embedding: nn.Module, final_norm: nn.Module, lm_head: nn.Module,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.embedding = embedding
        self.final_norm = final_norm
        self.lm_head = lm_head
        # What the family's head does after the LM head (Gemma2's soft-capping), if anything.
        self.transform = transform
        self.requires_grad_(False)

    @classmethod
    def from_assets(cls, path: Path) -> EdgeModel:
        from transformers import AutoConfig, AutoModelForCausalLM

        manifest = edge_assets.Manifest.read(path)
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            # fp32 whatever the cloud computes in (config.json records its dtype): the
            # edge weights ship as fp32 and the edge's loss and adapters are fp32.
            skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        weights = load_file(path / edge_assets.WEIGHTS)
        parts = {}
        for role, where in (("embedding", manifest.embedding), ("final_norm", manifest.final_norm)):
            parts[role] = _materialise(skeleton.get_submodule(where), where, weights)
        if manifest.tied_lm_head:
            head = skeleton.get_submodule(manifest.lm_head)
            head.to_empty(device="cpu")
            head.weight = parts["embedding"].weight
            if getattr(head, "bias", None) is not None:
                nn.init.zeros_(head.bias)
            parts["lm_head"] = head
        else:
            parts["lm_head"] = _materialise(skeleton.get_submodule(manifest.lm_head), manifest.lm_head, weights)
        edge = cls(parts["embedding"], parts["final_norm"], parts["lm_head"], logit_transform(config)).eval()
        edge.verify(path, getattr(config, "model_type", "unknown"))
        return edge

    def verify(self, path: Path, model_type: str) -> None:
        """Refuse to run if these parts do not reproduce the cloud's model on its probe."""
        probe_file = path / edge_assets.PROBE
        if not probe_file.exists():
            log.warning("the cloud sent no %s (an older cloud_server): the edge's parts cannot be checked "
                        "against its model", edge_assets.PROBE)
            return
        with safe_open(probe_file, framework="pt") as f:
            named = getattr(torch, (f.metadata() or {}).get(edge_assets.PROBE_DTYPE_KEY, "float32"), None)
        cloud_dtype = named if isinstance(named, torch.dtype) else torch.float32
        edge_probe.check_edge(self.embed, self.logits, load_file(probe_file), cloud_dtype, model_type)

    @property
    def hidden_size(self) -> int:
        return int(self._weight(self.embedding).shape[1])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm then LM head, for hidden states of any leading shape."""
        return self._finish(self.lm_head(self.final_norm(hidden)).float())

    def token_logits(self, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the given vocabulary entries only: C columns of the LM head."""
        bias = getattr(self.lm_head, "bias", None)
        w = self._weight(self.lm_head)[token_ids]
        return self._finish(F.linear(self.final_norm(hidden), w, None if bias is None else bias[token_ids]).float())

    def _finish(self, logits: torch.Tensor) -> torch.Tensor:
        # Element-wise, so it applies to a subset of the columns as to all of them.
        return logits if self.transform is None else self.transform(logits)

    def head_flops(self, positions: int, columns: int | None = None) -> int:
        """Analytic forward FLOPs of norm + LM head over `positions` rows (all or `columns` columns)."""
        vocab, hidden = self._weight(self.lm_head).shape
        return 2 * positions * (columns or vocab) * hidden + 5 * positions * hidden

    @staticmethod
    def _weight(module: nn.Module) -> torch.Tensor:
        # nn.Module's __getattr__ is typed Tensor | Module; embedding and LM head weights are tensors.
        return cast(torch.Tensor, module.weight)


def _materialise(module: nn.Module, prefix: str, weights: dict[str, torch.Tensor]) -> nn.Module:
    """Give every parameter and buffer of a meta-device `module` its value from `weights`.

    Buffers count, non-persistent ones included: after to_empty() they hold
    garbage, and some carry real values (Gemma's embedding scale).
    """
    module.to_empty(device="cpu")
    state = {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")}
    own: dict[str, torch.Tensor] = dict(module.named_parameters())
    own.update(module.named_buffers())
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"edge weights for {prefix} do not fit its config: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}; delete the edge cache and download the assets again")
    with torch.no_grad():
        for name, t in own.items():
            if tuple(t.shape) != tuple(state[name].shape):
                raise ValueError(f"edge weight {prefix}.{name} has shape {list(state[name].shape)}, its config "
                                 f"wants {list(t.shape)}")
            t.copy_(state[name])
    return module


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok
