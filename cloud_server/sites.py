"""Find the LoRA sites of a model: target linears grouped by the input they share.

Grouping is measured, not guessed from names: one probe forward records the
input tensor each linear receives, and linears fed the very same tensor
object (q, k and v in a Llama block) form one site. The cloud then sends that
input to the edge once per site.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from common.model_parts import backbone, is_linear, layer_index, linear_features
from common.site_types import ModuleSpec, SiteSpec

# The site types live in common/ (the edge holds the same ones); still importable from here.
__all__ = ["ModuleSpec", "SiteSpec", "linear_leaf_names", "linear_shapes", "probe_input_groups", "select_sites"]


def probe_input_groups(model: nn.Module, hidden_size: int) -> list[list[str]]:
    """All linears of the blocks, grouped by shared input, in call order."""
    inner = backbone(model)
    linears = {n: m for n, m in model.named_modules() if is_linear(m) and layer_index(n) >= 0}
    seen: list[tuple[str, torch.Tensor]] = []

    tokens = 3  # the probe below: one row of 3 positions

    def hook(name: str):
        def record(_mod: nn.Module, args: tuple) -> None:
            # Only linears that see every token, as [B, T, in] or flattened [B*T, in]:
            # one fed a routed subset (a mixture-of-experts expert) cannot be a site.
            if tuple(args[0].shape[:-1]) in ((1, tokens), (tokens,)):
                seen.append((name, args[0]))  # keep the tensor alive so identity is meaningful

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        param = next(model.parameters())
        embeds = torch.zeros(1, tokens, hidden_size, dtype=param.dtype, device=param.device)
        mask = torch.ones(1, tokens, dtype=torch.long, device=param.device)
        with torch.no_grad():
            inner(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, x in seen:
        for gx, names in groups:
            if gx is x:
                if name not in names:
                    names.append(name)
                break
        else:
            groups.append((x, [name]))
    return [names for _, names in groups]


def linear_shapes(model: nn.Module, groups: list[list[str]]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every grouped linear."""
    modules = dict(model.named_modules())
    return {n: linear_features(modules[n]) for names in groups for n in names}


def select_sites(
    shapes: dict[str, tuple[int, int]], groups: list[list[str]], targets: Iterable[str]
) -> list[SiteSpec]:
    """Sites for the linears whose leaf name is in `targets`."""
    wanted = set(targets)
    sites: list[SiteSpec] = []
    for names in groups:
        chosen = [n for n in names if n.rsplit(".", 1)[-1] in wanted]
        if not chosen:
            continue
        specs = tuple(ModuleSpec(n, *shapes[n]) for n in chosen)
        sites.append(SiteSpec(index=len(sites), layer=layer_index(chosen[0]), modules=specs))
    return sites


def linear_leaf_names(groups: list[list[str]]) -> set[str]:
    return {n.rsplit(".", 1)[-1] for names in groups for n in names}
