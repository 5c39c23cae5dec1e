"""The probe that proves the edge's parts compute what the cloud's full model computes.

Before the cloud splits its model, it runs the whole model once on a fixed
probe input and records the embedding output, the last block's output (the
input of the final norm) and the logits. The probe ships with the edge
assets (common/edge_assets.py names its file).

- The cloud checks that its own split path (blocks run from the embedding
  output, final norm removed) reproduces the last block's output.
- The edge checks that its embedding reproduces the embedding output and that
  its final norm + LM head (+ the family's logit post-processing) turn the
  last block's output into the logits.

Either mismatch refuses the model with a message naming its family, so an
architecture nobody tested is refused instead of trained silently wrong.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from common.model_parts import UnsupportedModel, backbone, family, final_norm_name

_ROWS, _POSITIONS = 2, 32
_LONGEST_WINDOW = 1024  # sliding windows up to this long are exceeded by the probe, so they take effect
_SHIPPED = 4            # positions of the last hidden state and logits the edge gets (logits are [.., vocab])
_TOLERANCE = {torch.float32: 1e-4}  # same fp32 ops on both paths: any real difference is far larger
_LOW_PRECISION_TOLERANCE = 3e-2     # a bf16/fp16 cloud rounds where the fp32 edge does not


def tolerance(dtype: torch.dtype) -> float:
    """Largest relative error the checks accept for a cloud running in `dtype`."""
    return _TOLERANCE.get(dtype, _LOW_PRECISION_TOLERANCE)


def probe_length(config) -> int:
    """Positions in the probe: past the sliding window where one is short enough to
    afford, so sliding-window attention differs from full attention within it."""
    window = getattr(config, "sliding_window", None)
    length = _POSITIONS
    if isinstance(window, int) and 0 < window <= _LONGEST_WINDOW:
        length = max(length, window + 8)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(length, int(limit)) if limit else length


def _input_embeddings(model: nn.Module) -> nn.Module:
    """`model.get_input_embeddings()` of a Hugging Face model (nn.Module's stubs type any
    attribute as a Tensor or a Module, so the method is named here with its real type)."""
    return cast(Callable[[], nn.Module], model.get_input_embeddings)()


@torch.no_grad()
def capture(model: nn.Module) -> dict[str, torch.Tensor]:
    """Run the whole (unsplit) model on the probe input; tensors as fp32 on the CPU.

    Holds the full last hidden state (for the cloud's own checks); `for_edge`
    takes what ships.
    """
    param = next(model.parameters())
    vocab = int(cast(torch.Tensor, _input_embeddings(model).weight).shape[0])
    shape = (_ROWS, probe_length(model.config))
    # An embedding accelerate offloaded has its weight on the meta device; its hook moves the ids.
    device = param.device if param.device.type != "meta" else torch.device("cpu")
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0)).to(device)
    norm = backbone(model).get_submodule(final_norm_name(model))
    seen: list[torch.Tensor] = []
    handle = norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    finally:
        handle.remove()
    if len(seen) != 1:
        raise UnsupportedModel(f"{family(model)}: the final norm ran {len(seen)} times in one forward; DLoRA "
                               "needs it once, after the last block")
    probe = {"input_ids": ids, "embeds": _input_embeddings(model)(ids), "final_hidden": seen[0],
             "logits": logits}
    return {k: (v.float() if v.is_floating_point() else v).cpu().contiguous() for k, v in probe.items()}


def for_edge(probe: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The probe's last positions only: logits are [rows, positions, vocab], megabytes each."""
    return {k: v[:, -_SHIPPED:].contiguous() for k, v in probe.items()}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))


def check(what: str, got: torch.Tensor, want: torch.Tensor, tol: float, model_type: str) -> None:
    """Refuse the model if `got` is not `want` within `tol` (relative, in norm)."""
    if tuple(got.shape) != tuple(want.shape):
        raise UnsupportedModel(f"{model_type}: the {what} has shape {list(got.shape)}, the cloud's model "
                               f"gives {list(want.shape)}; this architecture is not supported")
    err = rel_err(got, want)
    if not err <= tol:  # `not <=` also catches NaN
        raise UnsupportedModel(
            f"{model_type}: the {what} differs from the cloud's full model by {err:.1e} (relative; at most "
            f"{tol:.0e} allowed). DLoRA would train this model silently wrong, so it refuses it: the family "
            "does something its split does not reproduce. See docs/architectures.md.")


def check_edge(embed, logits, probe: dict[str, torch.Tensor], cloud_dtype: torch.dtype, model_type: str) -> None:
    """The edge's embedding and head against the probe (`embed`, `logits`: the edge's functions)."""
    tol = tolerance(cloud_dtype)
    with torch.no_grad():
        check("edge's embedding output", embed(probe["input_ids"]), probe["embeds"], tol, model_type)
        check("edge's output of the final norm + LM head (the logits)", logits(probe["final_hidden"]),
              probe["logits"], tol, model_type)
