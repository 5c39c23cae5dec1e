"""A session's LoRA sites as both sides hold them: the cloud finds them, the edge receives them in OpenSessionReply."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModuleSpec:
    """One adapted linear at a site, by its full module name, and its shape."""

    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class SiteSpec:
    """One input shared by target linears: the cloud sends it once, the edge answers for every module."""

    index: int
    layer: int
    modules: tuple[ModuleSpec, ...]
