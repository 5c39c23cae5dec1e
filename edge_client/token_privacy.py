"""Token privacy by metric differential privacy: each private token swapped, on the device, for a noisy neighbour.

The mechanism (Feyisetan et al. 2020, "Privacy- and Utility-Preserving Textual
Analysis via Calibrated Multivariate Perturbations"): for a real token w, take
its row phi(w) of the model's input-embedding table (R^d), add noise z whose
density is proportional to exp(-epsilon * ||z||_2), and release the vocabulary
token whose row is nearest (L2) to phi(w) + z. Only released token ids are
embedded and sent, so the activations the cloud sees are post-processing of
the release and inherit its guarantee.

Guarantee (d_chi-privacy): for any two tokens w, w' and any released token o,

    P[o | w] <= exp(epsilon * ||phi(w) - phi(w')||_2) * P[o | w'].

Units: epsilon multiplies an L2 distance between embedding rows, so it is
"privacy loss per unit of embedding distance", not a dimensionless budget like
the epsilon of label privacy. The same epsilon means very different things in
different models: what counts is epsilon times the typical distance between
rows (see `distance_scale`). Tokens whose rows are close are hard to tell
apart; far-apart tokens are protected only weakly. The guarantee is per token
occurrence: a sequence of n tokens (or a token seen again in a later epoch with
fresh noise) composes to the sum of the per-token losses.

Sampling z: a direction uniform on the unit sphere (a normalised Gaussian) times
a radius drawn from Gamma(shape=d, scale=1/epsilon), which is exactly the
radial law of the density exp(-epsilon * ||z||) in R^d.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

# A [rows, V] float32 distance block for SmolLM2 (V = 49,152) is 192 KiB a row:
# 64 MiB keeps ~340 queries a chunk, large enough for fast matmuls and far
# below the ~200 MB a single [N, V] block over a long batch would reach.
DEFAULT_CHUNK_BYTES = 64 * 2**20


def check_epsilon(epsilon: float) -> float:
    """`epsilon` as a float, or a ValueError naming what is wrong with it."""
    try:
        value = float(epsilon)
    except (TypeError, ValueError):
        raise ValueError(f"token-privacy epsilon must be a number, got {epsilon!r}") from None
    # A zero or negative epsilon has no noise law; nan/inf would silently
    # release nothing useful or everything unprotected.
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"token-privacy epsilon must be finite and > 0, got {epsilon!r}")
    return value


def noise(shape_rows: int, dim: int, epsilon: float, generator: torch.Generator) -> Tensor:
    """`shape_rows` independent draws in R^`dim` from the density proportional to exp(-epsilon * ||z||_2)."""
    epsilon = check_epsilon(epsilon)
    if shape_rows < 0 or dim < 1:
        raise ValueError(f"noise needs rows >= 0 and dim >= 1, got {shape_rows} x {dim}")
    # float64 so the radius of a long-tailed draw and the normalisation of the
    # direction lose nothing before the result is cast for the table search.
    direction = torch.randn(shape_rows, dim, generator=generator, dtype=torch.float64)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-300)
    # Gamma(d, 1) for integer d is half a chi-square with 2d degrees of freedom:
    # public, generator-driven torch ops, exact, with no private Gamma sampler.
    chi2 = torch.randn(shape_rows, 2 * dim, generator=generator, dtype=torch.float64).square().sum(dim=1)
    radius = 0.5 * chi2 / epsilon
    return (direction * radius[:, None]).to(torch.float32)


def nearest_rows(points: Tensor, table: Tensor, max_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
    """Index of the row of `table` [V, d] nearest (L2) to each row of `points` [n, d], chunked over points."""
    if points.ndim != 2 or table.ndim != 2 or points.shape[1] != table.shape[1]:
        raise ValueError(f"nearest_rows needs [n, d] points and a [V, d] table, got {tuple(points.shape)} "
                         f"and {tuple(table.shape)}")
    table = table.detach().to(torch.float32)
    points = points.to(torch.float32)
    sq = table.square().sum(dim=1)                                  # ||e||^2, once
    # argmin ||p - e||^2 = argmin (||e||^2 - 2 p.e): ||p||^2 is the same for every e.
    rows = max(1, max_bytes // (4 * table.shape[0]))
    out = torch.empty(points.shape[0], dtype=torch.long)
    for start in range(0, points.shape[0], rows):
        block = torch.addmm(sq[None, :], points[start:start + rows], table.T, alpha=-2.0)
        out[start:start + rows] = block.argmin(dim=1)
    return out


def perturb(input_ids: Tensor, attention_mask: Tensor, embedding: Tensor, epsilon: float,
            generator: torch.Generator, keep: Tensor | None = None,
            max_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
    """`input_ids` with every real position (mask true, `keep` false) replaced by its released token.

    Padding and `keep` positions come back exactly as they were. `embedding` is
    the model's input-embedding table [V, d], the same metric the guarantee is
    stated in. Noise is drawn only for the replaced positions, in row-major
    order, so one generator state gives one result.
    """
    epsilon = check_epsilon(epsilon)
    if input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask "
                         f"{tuple(attention_mask.shape)} differ in shape")
    if embedding.ndim != 2:
        raise ValueError(f"embedding must be a [vocab, dim] table, got {tuple(embedding.shape)}")
    replace = attention_mask.bool()
    if keep is not None:
        if keep.shape != input_ids.shape:
            raise ValueError(f"keep {tuple(keep.shape)} must match input_ids {tuple(input_ids.shape)}")
        replace = replace & ~keep.bool()
    out = input_ids.clone()
    ids = input_ids[replace].long()
    if ids.numel() == 0:
        return out
    vocab, dim = embedding.shape
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"token ids must lie in [0, {vocab}) at real positions, "
                         f"got [{int(ids.min())}, {int(ids.max())}]")
    table = embedding.detach().to(torch.float32)
    noisy = table[ids] + noise(ids.numel(), dim, epsilon, generator)
    out[replace] = nearest_rows(noisy, table, max_bytes).to(out.dtype)
    return out


def kept_fraction(original: Tensor, released: Tensor, attention_mask: Tensor | None = None) -> float:
    """Share of real positions whose released token is the original one (nan when there are none)."""
    real = torch.ones_like(original, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    n = int(real.sum())
    return float((original[real] == released[real]).sum()) / n if n else float("nan")


def generator_for(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """A generator fixed by (seed, step, salt): a resumed run replays the very same noise at each step."""
    # Hashed rather than added, so (seed, step) pairs never collide
    # (seed=1, step=2 and seed=2, step=1 would otherwise share noise).
    digest = hashlib.sha256(f"dlora-token-privacy:{int(seed)}:{int(step)}:{int(salt)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def distance_scale(embedding: Tensor, sample: int = 2048, seed: int = 0,
                   max_bytes: int = DEFAULT_CHUNK_BYTES) -> dict:
    """The table's geometry, to put epsilon in context: nearest-neighbour distances and row norms of sampled tokens.

    epsilon * median_nn_distance is the privacy loss between a typical token
    and its closest other token; epsilon * median_norm is the order of the loss
    between two unrelated tokens.
    """
    table = embedding.detach().to(torch.float32)
    vocab = table.shape[0]
    if vocab < 2:
        raise ValueError("distance_scale needs at least 2 rows")
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(vocab, generator=g)[:min(sample, vocab)]
    rows = table[idx]
    sq = table.square().sum(dim=1)
    per = max(1, max_bytes // (4 * vocab))
    nn = torch.empty(len(idx), dtype=torch.long)
    for start in range(0, len(idx), per):
        block = torch.addmm(sq[None, :], rows[start:start + per], table.T, alpha=-2.0)
        # "Distinct token": the row itself is excluded; an identical copy under
        # another id still counts (it is a real, zero-distance neighbour).
        block[torch.arange(block.shape[0]), idx[start:start + per]] = float("inf")
        nn[start:start + per] = block.argmin(dim=1)
    # Exact distances for the chosen neighbours: the expanded form above loses
    # precision for small distances, which is what this reports.
    dist = (rows - table[nn]).norm(dim=1)
    norms = rows.norm(dim=1)
    return {
        "vocab": vocab,
        "dim": table.shape[1],
        "sampled": len(idx),
        "median_nn_distance": float(dist.median()),
        "p10_nn_distance": float(dist.quantile(0.10)),
        "p90_nn_distance": float(dist.quantile(0.90)),
        "duplicate_fraction": float((dist == 0).float().mean()),
        "median_norm": float(norms.median()),
    }
