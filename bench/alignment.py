"""Unpaired alignment: the cloud fits its own front so that public text through it looks like what the edge sent.

A private front (--front-privacy) moves the activations the edge sends away from
what the public blocks give, so an inverter trained on public text through the
public blocks reads fewer tokens. But the cloud knows the front's shape: which
linears of blocks [0, K) carry adapters, their rank and scale (it serves the
module shapes). Without a single known token it can fit adapters of that shape
on its own copy of the blocks so that the distribution of public-text
activations through them matches the distribution of the activations it
recorded, then train its inverters through that fitted front.

- **front**: LoRA adapters of the edge front's shape, trained by Adam on a
  kernel two-sample distance (MMD, Gaussian kernels at three bandwidths around
  the median distance) plus the gap in mean and per-feature variance, between
  RMS-normalised activations of public text through the fitted front and of the
  recording (the device's own inverter reads RMS-normalised activations too).
- **linear**: no front at all, the recorded activations mapped onto the public
  ones by matching their mean and covariance (whitening, then colouring; CORAL),
  then read by the public inverters.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bench import inverters
from common.lora import inject, seeded_adapters
from common.model_parts import backbone

# Bandwidths, as multiples of the median pairwise distance: the kernel sees both near and far structure.
_BANDWIDTHS = (0.5, 1.0, 2.0)


@dataclass(frozen=True)
class FrontShape:
    """What the cloud knows of the edge's front: the adapted linears' (in, out) features, the rank and scale."""

    shapes: dict[str, tuple[int, int]]
    rank: int
    scale: float


def unit_rms(X: Tensor) -> Tensor:
    """Each row divided by its root mean square."""
    return X / X.pow(2).mean(-1, keepdim=True).clamp_min(1e-12).sqrt()


def _median_distance(X: Tensor, sample: int = 1024, seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(X), generator=gen)[:sample]
    d = torch.cdist(X[idx], X[idx])
    return float(d[d > 0].median())


def mmd(X: Tensor, Y: Tensor, bandwidth: float) -> Tensor:
    """Squared maximum mean discrepancy between the rows of X and Y, summed over Gaussian kernels (biased form)."""
    def kernel(A: Tensor, B: Tensor) -> Tensor:
        d2 = torch.cdist(A, B).pow(2)
        return sum(torch.exp(-d2 / (2 * (m * bandwidth) ** 2)) for m in _BANDWIDTHS)

    return kernel(X, X).mean() + kernel(Y, Y).mean() - 2 * kernel(X, Y).mean()


def moment_gap(X: Tensor, Y: Tensor) -> Tensor:
    """Squared gap of the per-feature means and standard deviations (per feature, summed)."""
    return (X.mean(0) - Y.mean(0)).pow(2).sum() + (X.std(0) - Y.std(0)).pow(2).sum()


def _hidden_with_grad(model: nn.Module, ids: Tensor, mask: Tensor, depth: int) -> Tensor:
    """The activation entering block `depth`, with the graph kept (inverters.activations runs without it)."""
    got: list[Tensor] = []

    def capture(module, args, kwargs):
        got.append(args[0] if args else kwargs["hidden_states"])
        raise inverters._Reached

    handle = inverters._cut_module(model, depth).register_forward_pre_hook(capture, with_kwargs=True)
    try:
        backbone(model)(input_ids=ids, attention_mask=mask, use_cache=False)
    except inverters._Reached:
        pass
    finally:
        handle.remove()
    if not got:
        raise RuntimeError(f"the forward pass never reached block {depth}")
    return got[0].float()


def public_batches(tokenizer, texts: list[str], batch_size: int, max_length: int,
                   seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Padded public batches, reshuffled every pass, forever."""
    seqs = inverters._tokenize(tokenizer, texts, max_length)
    pad = inverters._pad_id(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(seqs), generator=gen).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            group = [seqs[i] for i in order[start:start + batch_size]]
            width = max(len(s) for s in group)
            ids = torch.full((len(group), width), pad, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for r, s in enumerate(group):
                ids[r, :len(s)] = torch.tensor(s)
                mask[r, :len(s)] = 1
            yield ids, mask


def fit_front(model: nn.Module, shape: FrontShape, observed: Tensor, depth: int,
              data: Iterator[tuple[Tensor, Tensor]], steps: int = 300, lr: float = 2e-3, sample: int = 1024,
              seed: int = 0, log_every: int = 50) -> tuple[nn.Module, dict[str, float]]:
    """A copy of `model` whose blocks [0, depth) carry adapters of `shape`, fitted so that public batches
    (`data`: input ids and attention mask) through them match the distribution of `observed` ([N, H], the
    recorded activations entering block `depth`).

    Returns the model (frozen, eval mode) and notes: the distance before and after, steps and seconds."""
    if not shape.shapes:
        raise ValueError("fit_front needs the front's adapted linears; this front has none")
    fitted = copy.deepcopy(model)
    adapters = seeded_adapters(shape.shapes, shape.rank, shape.scale, seed)
    inject(fitted, adapters)
    fitted.requires_grad_(False)
    params = [p for a in adapters.values() for p in a.parameters()]
    for p in params:
        p.requires_grad_(True)
    fitted.eval()
    target = unit_rms(observed.float())
    bandwidth = _median_distance(target, seed=seed)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    notes: dict[str, float] = {"bandwidth": bandwidth}
    t0 = time.monotonic()
    for step in range(steps):
        ids, mask = next(data)
        pub = unit_rms(_hidden_with_grad(fitted, ids, mask, depth)[mask.bool()])
        pub = pub[torch.randperm(len(pub), generator=gen)[:sample]]
        obs = target[torch.randint(len(target), (sample,), generator=gen)]
        loss = mmd(pub, obs, bandwidth) + moment_gap(pub, obs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 0:
            notes["distance_before"] = float(loss.detach())
        if log_every and (step + 1) % log_every == 0:
            print(f"    alignment step {step + 1}/{steps}: distance {float(loss.detach()):.4f} "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)
    notes |= {"distance_after": float(loss.detach()), "steps": steps, "seconds": time.monotonic() - t0}
    fitted.requires_grad_(False)
    return fitted, notes


def coral(X: Tensor, source: Tensor, target: Tensor, eps: float = 1e-3) -> Tensor:
    """Rows of X (drawn like `source`) mapped so that `source` would have `target`'s mean and covariance."""
    def stats(A: Tensor) -> tuple[Tensor, Tensor]:
        A = A.double()
        mu = A.mean(0)
        C = torch.cov((A - mu).T)
        return mu, C + eps * C.diagonal().mean() * torch.eye(len(C), dtype=C.dtype)

    def power(C: Tensor, p: float) -> Tensor:
        evals, evecs = torch.linalg.eigh(C)
        return evecs @ torch.diag(evals.clamp_min(1e-12) ** p) @ evecs.T

    mu_s, C_s = stats(source)
    mu_t, C_t = stats(target)
    M = power(C_s, -0.5) @ power(C_t, 0.5)
    return ((X.double() - mu_s) @ M + mu_t).float()


def read_linear(observed: Tensor, public_X: Tensor, learned: dict[str, inverters.Inverter]) -> dict[str, Tensor]:
    """The public inverters' reading of `observed` after CORAL onto the public activations, in RMS-normalised
    space (each row's own RMS put back), per inverter."""
    rms = observed.float().pow(2).mean(-1, keepdim=True).clamp_min(1e-12).sqrt()
    mapped = coral(unit_rms(observed.float()), unit_rms(observed.float()), unit_rms(public_X.float())) * rms
    return {name: inv.predict(mapped) for name, inv in learned.items()}


def attack(model: nn.Module, tokenizer, shape: FrontShape, observed: Tensor, depth: int, source: str,
           public_tokens: int, seconds: float, seed: int = 0,
           steps: int = 300,
           inverter_steps: int | None = None) -> tuple[nn.Module, dict[str, inverters.Inverter], dict[str, float]]:
    """Fit a front to the recording (fit_front), then train the cloud's inverters on public text through it;
    returns the fitted model too."""
    texts = inverters.public_texts(4000, seed=seed + 1, source=source)  # others than the inverters' first ones
    data = public_batches(tokenizer, texts, batch_size=8, max_length=128, seed=seed)
    fitted, notes = fit_front(model, shape, observed, depth, data, steps=steps, seed=seed)
    learned, _, _ = inverters.train_inverters_and_data(fitted, tokenizer, depth, tokens=public_tokens,
                                                       seconds=seconds, seed=seed, source=source,
                                                       max_steps=inverter_steps)
    return fitted, learned, notes

