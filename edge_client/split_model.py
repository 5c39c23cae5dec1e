"""SplitLoRA's edge model: the embedding and the first `cut` blocks, with client-side LoRA.

Built from the downloaded config with only `cut` blocks, so the device holds
exactly its share: embedding, blocks [0, cut), final norm and LM head. The
backbone's own final norm is bypassed (the output is the cut-layer activation
the cloud continues from); the real final norm sits in the head, after the
cloud's blocks.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from common import edge_assets
from common.lora import LoRAAdapter, inject
from common.model_parts import backbone, final_norm_name, logit_transform
from edge_client.edge_model import EdgeModel


class FrontModel(nn.Module):
    def __init__(self, model: nn.Module, head: EdgeModel, cut: int) -> None:
        super().__init__()
        self.model = model
        self.head = head
        self.cut = cut

    @classmethod
    def from_assets(cls, path: Path, cut: int) -> FrontModel:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path)
        total = int(config.num_hidden_layers)
        if not 0 < cut < total:
            raise ValueError(f"--cut-layer must be in 1..{total - 1} for this {total}-block model, got {cut}")
        config = copy.deepcopy(config)
        config.num_hidden_layers = cut
        model = AutoModelForCausalLM.from_config(config).float()
        weights = load_file(path / edge_assets.WEIGHTS)
        blocks = path / edge_assets.blocks_file(cut)
        if not blocks.exists():
            raise ValueError(f"the edge assets in {path} hold no weights for blocks 0..{cut - 1}")
        weights.update(load_file(blocks))
        manifest = edge_assets.Manifest.read(path)
        # Non-persistent buffers travel too (for the meta-built EdgeModel); this model,
        # built on the CPU, computed its own, so the state dict does not take them.
        transient = {n for n, _ in model.named_buffers()} - model.state_dict().keys()
        missing, unexpected = model.load_state_dict({k: v for k, v in weights.items() if k not in transient},
                                                    strict=False)
        params = {n for n, _ in model.named_parameters()}
        tied = {manifest.lm_head + ".weight"} if manifest.tied_lm_head else set()
        if (params & set(missing)) - tied or unexpected:
            raise ValueError(f"edge weights do not fit a {cut}-block model: missing "
                             f"{sorted(set(missing) & params)[:3]}, unexpected {unexpected[:3]}")
        model.requires_grad_(False).eval()
        inner = backbone(model)
        norm_attr = final_norm_name(model)
        head = EdgeModel(model.get_input_embeddings(), getattr(inner, norm_attr), model.get_output_embeddings(),
                         logit_transform(config))
        head.verify(path, getattr(config, "model_type", "unknown"))
        setattr(inner, norm_attr, nn.Identity())  # the cut-layer activation leaves un-normed
        return cls(model, head, cut)

    def add_adapters(self, adapters: dict[str, LoRAAdapter], dropout: float = 0.0) -> None:
        inject(self.model, adapters, dropout)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Activations after block cut - 1: [B, T, H]."""
        return backbone(self.model)(input_ids=input_ids, attention_mask=mask.long(), use_cache=False).last_hidden_state

    def block_params(self) -> int:
        return sum(p.numel() for n, p in backbone(self.model).named_parameters()
                   if ".lora_" not in n and "embed" not in n and "wte" not in n and "wpe" not in n)

    def flops(self, batch: int, seq: int, train: bool) -> int:
        """Analytic FLOPs of the frozen blocks: 2 x params x tokens for the linears plus
        4 x T^2 x H per block for attention; training adds a backward for the
        input gradients only (the blocks are frozen), about the same again."""
        hidden = self.head.hidden_size
        fwd = 2 * self.block_params() * batch * seq + 4 * self.cut * batch * seq * seq * hidden
        return 2 * fwd if train else fwd
