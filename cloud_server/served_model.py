"""The model the cloud serves: frozen blocks with taps, its sites and edge assets."""
from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from cloud_server import assets
from cloud_server.device_map import execution_device, state_dict
from cloud_server.model_store import load_frozen, resolve_model_path
from cloud_server.sites import linear_leaf_names, linear_shapes, probe_input_groups, select_sites
from cloud_server.step_runner import StepRunner
from cloud_server.taps import active, install_taps
from common import edge_assets, edge_probe
from common.lora import ALL_LINEAR
from common.model_parts import (
    DEFAULT_TARGETS,
    UnsupportedModel,
    backbone,
    blocks_name,
    check_layout,
    final_norm_name,
    num_layers,
)
from common.site_types import SiteSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


@dataclass
class ModelMeta:
    name: str
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int


MAX_CACHED_CUTS = 2


class _NoPositions(nn.Module):
    """Stands in for a learned position table (GPT-2's wpe, OPT's embed_positions): adds nothing."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.dtype, self.device = dtype, device

    def forward(self, *_args, **_kwargs) -> torch.Tensor:
        # A scalar zero broadcasts onto the embeddings, whatever the family's call signature.
        return torch.zeros((), dtype=self.dtype, device=self.device)


# Learned position tables, by attribute name on the backbone; SplitLoRA edges add them before block 0.
_POSITION_TABLES = ("wpe", "embed_positions")


class ServedModel:
    """Loads a causal LM, keeps its blocks on the cloud and hands the rest to edges."""

    def __init__(self, spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 default_targets: list[str] | None = None,
                 device_map: str | dict[str, int | str] | None = None) -> None:
        """`device_map` ('auto', a JSON file's path or a map; see device_map.py) spreads the
        blocks over several devices instead of putting the model on `device`."""
        path = resolve_model_path(spec)
        self.dtype = dtype
        model = load_frozen(path, device, dtype, device_map)
        cfg = model.config
        # Where inputs enter and outputs leave, whatever devices the blocks between sit on.
        inner = backbone(model)
        self.device = (torch.device(device) if device_map is None else
                       execution_device(getattr(inner, blocks_name(inner, num_layers(cfg)))[0]))
        self.meta = ModelMeta(
            name=spec if spec != str(path) else path.name,
            model_type=getattr(cfg, "model_type", "unknown"),
            num_layers=num_layers(cfg),
            hidden_size=int(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0))),
            vocab_size=int(cfg.vocab_size),
        )
        # Learned position tables (GPT-2) cannot index past their end; RoPE models state a maximum too.
        self.max_positions = int(getattr(cfg, "n_positions", 0) or getattr(cfg, "max_position_embeddings", 0) or 0)
        check_layout(model)
        # What the edge needs is packed before the final norm leaves the cloud's copy.
        probe = edge_probe.capture(model)
        self.assets = assets.build(model, path, probe, dtype)
        self.inner = backbone(model)
        # The edge applies the final norm; the cloud returns the last block's output.
        self._norm_attr = final_norm_name(model)
        setattr(self.inner, self._norm_attr, nn.Identity())
        # The edge holds the embedding lookup and the LM head: the cloud keeps no copy.
        self._drop_edge_modules(model)
        self.groups = probe_input_groups(model, self.meta.hidden_size)
        self.linear_names = linear_leaf_names(self.groups)
        self.shapes = linear_shapes(model, self.groups)
        install_taps(model, [n for g in self.groups for n in g])
        self.model = model
        self._check_split(probe)
        self._probe_embeds = probe["embeds"]  # what the SplitLoRA cut checks need later (not the logits)
        self._refused_cuts: dict[int, str] = {}
        self.blocks_attr = blocks_name(self.inner, self.meta.num_layers)
        self._views: dict[int, nn.Module] = {0: self.inner}
        # Blocks [0, cut) for SplitLoRA edges, built on demand; only the most recent
        # cuts are kept, so clients asking for many cuts cannot pile up copies.
        self._block_assets: dict[int, assets.Asset] = {}
        self._views_lock = threading.Lock()
        self.default_targets = default_targets or [t for t in DEFAULT_TARGETS if t in self.linear_names]
        if not self.default_targets:
            raise ValueError(
                f"no default LoRA targets in this model; pass --targets from: {sorted(self.linear_names)}"
            )
        self.check_targets(self.default_targets)
        log.info("serving %s (%s, %d layers, hidden %d) on %s, default targets %s",
                 self.meta.name, self.meta.model_type, self.meta.num_layers, self.meta.hidden_size,
                 self.device, ",".join(self.default_targets))

    def _drop_edge_modules(self, model: PreTrainedModel) -> None:
        # Input embeddings are nn.Embedding or a subclass (Gemma's scaled one); transformers types them nn.Module.
        emb = cast(nn.Embedding, model.get_input_embeddings())
        # A 1-row stand-in keeps HF's bookkeeping (dtype/device queries) working.
        stub = nn.Embedding(1, emb.embedding_dim, device=self.device, dtype=self.dtype).requires_grad_(False)
        model.set_input_embeddings(stub)
        if model.get_output_embeddings() is not None:
            model.set_output_embeddings(nn.Identity())

    @torch.no_grad()
    def _check_split(self, probe: dict[str, torch.Tensor]) -> None:
        """The split path (blocks run from the embedding output, no final norm) must
        reproduce the full model's last block output, or this family is refused."""
        embeds = probe["embeds"].to(device=self.device, dtype=self.dtype)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
        out = self.inner(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        edge_probe.check("cloud's output of the last block, run from the embedding output", out.float().cpu(),
                         probe["final_hidden"], edge_probe.tolerance(self.dtype), self.meta.model_type)

    def check_targets(self, targets: list[str]) -> None:
        unknown = sorted(set(targets) - self.linear_names)
        if unknown:
            raise ValueError(f"unknown target modules {unknown}; this model has {sorted(self.linear_names)}")

    def sites(self, targets: list[str]) -> list[SiteSpec]:
        if ALL_LINEAR in targets:  # PEFT's spelling for every linear of the blocks
            targets = sorted(self.linear_names)
        self.check_targets(targets)
        return select_sites(self.shapes, self.groups, targets)

    def max_site_width(self, sites: list[SiteSpec]) -> int:
        widths = [sum(m.out_features for m in s.modules) for s in sites] + [
            max((m.in_features for s in sites for m in s.modules), default=0), self.meta.hidden_size]
        return max(widths)

    def run(self, runner: StepRunner, hidden: torch.Tensor, mask: torch.Tensor, cut: int = 0) -> torch.Tensor:
        """Blocks [cut, L) forward with remote adapters; returns the last block's output.

        cut = 0 (DLoRA): `hidden` is the embedding output. cut > 0 (SplitLoRA):
        `hidden` is the output of block cut - 1, which ran on the edge.
        """
        runner.batch_shape = (hidden.shape[0], hidden.shape[1])
        with active(runner), torch.set_grad_enabled(runner.train):
            out = self.view(cut)(inputs_embeds=hidden, attention_mask=mask, use_cache=False)
        # Under a device map the last block may sit elsewhere; callers expect self.device.
        return out.last_hidden_state.to(self.device)

    def view(self, cut: int) -> nn.Module:
        """The backbone without its first `cut` blocks, sharing every weight.

        A shallow copy with its own child list and config, so sessions with
        different cuts run side by side on the one set of weights. Built and
        checked once per cut, outside the lock: every step reads this, and the
        check runs the model twice.
        """
        view = self._views.get(cut)
        if view is not None:
            return view
        if cut in self._refused_cuts:
            raise UnsupportedModel(self._refused_cuts[cut])
        view = self._build_view(cut)
        try:
            self._check_view(cut, view)
        except UnsupportedModel as exc:
            self._refused_cuts[cut] = str(exc)
            raise
        with self._views_lock:
            return self._views.setdefault(cut, view)

    def _build_view(self, cut: int) -> nn.Module:
        """The view for `cut`, unchecked."""
        if not 0 < cut < self.meta.num_layers:
            raise ValueError(f"cut layer must be in 1..{self.meta.num_layers - 1}, got {cut}")
        # The backbone is a transformers model (LlamaModel, OPT's decoder, ...), config and all.
        view = cast("PreTrainedModel", copy.copy(self.inner))
        # An accelerate hook on the backbone (a device map entry for it) wraps the original's
        # forward in an instance attribute; the copy must run its own.
        view.__dict__.pop("forward", None)
        view._modules = dict(self.inner._modules)
        view._modules[self.blocks_attr] = nn.ModuleList(list(getattr(self.inner, self.blocks_attr))[cut:])
        config = copy.deepcopy(view.config)  # the shallow copy still shares the backbone's config
        view.config = config
        config.num_hidden_layers = self.meta.num_layers - cut
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list):
            # Per-block attention kinds (Gemma2's sliding/full), indexed by position in the view.
            config.layer_types = layer_types[cut:]
        for table in _POSITION_TABLES:
            if table in view._modules:
                # Learned positions (GPT-2, OPT) were added on the edge, before block 0.
                view._modules[table] = _NoPositions(self.dtype, self.device)
        return view

    @torch.no_grad()
    def _check_view(self, cut: int, view: nn.Module) -> None:
        """Fed block cut - 1's output from a full run on the probe, the view must give the
        full run's last block output, or SplitLoRA at this cut is refused for this family."""
        embeds = self._probe_embeds.to(device=self.device, dtype=self.dtype)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
        seen: list[torch.Tensor] = []
        me = threading.get_ident()

        def record(_m: nn.Module, _args: tuple, out) -> None:
            if threading.get_ident() == me:  # other sessions' steps run through the same block
                seen.append(out[0] if isinstance(out, tuple) else out)

        block = getattr(self.inner, self.blocks_attr)[cut - 1]
        hook = block.register_forward_hook(record)
        try:
            full = self.inner(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        finally:
            hook.remove()
        # Edges send block cut - 1's output to self.device, wherever that block ran.
        out = view(inputs_embeds=seen[0].to(self.device), attention_mask=mask, use_cache=False).last_hidden_state
        edge_probe.check(f"cloud's output of blocks {cut}..{self.meta.num_layers - 1} (SplitLoRA at cut {cut})",
                         out.float().cpu(), full.float().cpu(), edge_probe.tolerance(self.dtype),
                         self.meta.model_type)

    def block_asset(self, cut: int) -> assets.Asset:
        """Weights of blocks [0, cut) for a SplitLoRA edge, under their full-model names."""
        with self._views_lock:
            if cut in self._block_assets:
                self._block_assets[cut] = self._block_assets.pop(cut)  # most recently used last
                return self._block_assets[cut]
            asset = self._build_block_asset(cut)
            self._block_assets[cut] = asset
            while len(self._block_assets) > MAX_CACHED_CUTS:
                self._block_assets.pop(next(iter(self._block_assets)))
            return asset

    def _build_block_asset(self, cut: int) -> assets.Asset:
        """Blocks [0, cut) and the weights the edge needs before block 0 besides the embedding."""
        base = next(n for n, m in self.model.named_modules() if m is self.inner)
        prefix = f"{base}.{self.blocks_attr}"
        tensors = {}
        # Weights the edge needs before block 0 besides the embedding (GPT-2's position table).
        skip = {self.blocks_attr, self._norm_attr}
        for name, child in self.inner.named_children():
            if name in skip or child is self.model.get_input_embeddings():
                continue
            for key, t in state_dict(child).items():  # offloaded weights too
                tensors[f"{base}.{name}.{key}"] = t.detach().float().cpu().contiguous()
        for i, block in enumerate(list(getattr(self.inner, self.blocks_attr))[:cut]):
            for key, t in state_dict(block).items():
                # Taps wrap the target linears: their weights sit one level down.
                tensors[f"{prefix}.{i}.{key.replace('.base.', '.')}"] = t.detach().float().cpu().contiguous()
        return assets.make_asset(edge_assets.blocks_file(cut), save_safetensors(tensors))

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @torch.no_grad()
    def extend(self, runner: StepRunner, hidden: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        """One generation pass over the new positions `hidden` [B, n, H] with the
        KV cache of the earlier ones; `mask` [B, past + n] covers both. Returns
        the last block's output at the last position, [B, 1, H]."""
        new = hidden.shape[1]
        # Positions count real tokens only, so left-padded prompts line up.
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -new:]
        runner.batch_shape = (hidden.shape[0], hidden.shape[1])
        with active(runner):
            out = self.inner(inputs_embeds=hidden, attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True)
        return out.last_hidden_state[:, -1:].to(self.device)
