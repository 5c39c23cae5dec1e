"""Taps: each target linear of the served model, wrapped so that it adds a remote adapter's output during a step.

Outside a step a tap is the plain frozen linear. Inside one (a thread-local
`StepRunner` is active, see `active`) it asks the runner for its module's
adapter output and adds it to the frozen projection.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from cloud_server.step_runner import StepRunner

_active = threading.local()


class SiteTap(nn.Module):
    """A frozen target linear that adds a remote adapter's output during a step."""

    def __init__(self, base: nn.Module, name: str) -> None:
        super().__init__()
        self.base = base
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        runner: StepRunner | None = getattr(_active, "runner", None)
        if runner is None:
            return y
        delta = runner.adapter_output(self.name, x)
        # Under a device map the base linear's hook may compute y on another device than x's.
        return y if delta is None else y + delta.to(y.device)


def install_taps(model: nn.Module, names: list[str]) -> None:
    """Wrap each named linear of `model` in a SiteTap, in place (idempotent)."""
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        mod = getattr(parent, leaf)
        if not isinstance(mod, SiteTap):
            setattr(parent, leaf, SiteTap(mod, name))


@contextmanager
def active(runner: StepRunner) -> Iterator[None]:
    _active.runner = runner
    try:
        yield
    finally:
        _active.runner = None
