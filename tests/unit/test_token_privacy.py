"""Token privacy (metric DP): the noise law, the d_chi guarantee on a tiny vocabulary, and perturb's contract."""
from __future__ import annotations

import math

import pytest
import torch

from edge_client import token_privacy as tp

N = 20_000


def radius_ks(radii: torch.Tensor, dim: int, epsilon: float) -> float:
    """Kolmogorov-Smirnov distance between the radii and Gamma(dim, 1/epsilon) (no scipy: torch's gammainc)."""
    r = radii.double().sort().values
    cdf = torch.special.gammainc(torch.tensor(float(dim), dtype=torch.float64), epsilon * r)
    n = len(r)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - cdf
    below = cdf - torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(above, below).max())


def ks_critical(n: int, alpha: float = 1e-3) -> float:
    return math.sqrt(-math.log(alpha / 2) / 2) / math.sqrt(n)


def moments_match(radii: torch.Tensor, dim: int, epsilon: float) -> bool:
    """Mean and variance of the radii within 5 standard errors of Gamma(dim, 1/epsilon)'s."""
    r = radii.double()
    n = len(r)
    mean, var = dim / epsilon, dim / epsilon**2
    mean_se = math.sqrt(var / n)
    # Standard error of a sample variance: var * sqrt((2 + excess kurtosis) / n); Gamma's excess kurtosis is 6/k.
    var_se = var * math.sqrt((2 + 6 / dim) / n)
    return abs(float(r.mean()) - mean) < 5 * mean_se and abs(float(r.var()) - var) < 5 * var_se


@pytest.mark.parametrize("dim", [2, 16])
@pytest.mark.parametrize("epsilon", [0.5, 3.0])
def test_radius_is_gamma_d_over_epsilon(dim, epsilon):
    radii = tp.noise(N, dim, epsilon, torch.Generator().manual_seed(dim)).norm(dim=1)
    crit = ks_critical(N)
    assert radius_ks(radii, dim, epsilon) < crit
    assert moments_match(radii, dim, epsilon)
    # The same statistics reject a 1.5x-wrong epsilon (either way): they discriminate.
    for wrong in (epsilon * 1.5, epsilon / 1.5):
        assert radius_ks(radii, dim, wrong) > 5 * crit
        assert not moments_match(radii, dim, wrong)
    # And a wrong shape (the noise of a different dimension at the same mean) is caught too.
    assert radius_ks(radii, dim + 2, epsilon * (dim + 2) / dim) > crit


def isotropic(directions: torch.Tensor) -> bool:
    """Mean of unit directions near 0 and their second moment near I/d, within 5 standard errors."""
    n, d = directions.shape
    u = directions.double()
    mean_ok = bool((u.mean(dim=0).abs() < 5 / math.sqrt(d * n)).all())
    second = u.T @ u / n
    # Var of u_i^2 on the sphere: 3/(d(d+2)) - 1/d^2; of u_i u_j: 1/(d(d+2)).
    diag_se = math.sqrt((3 / (d * (d + 2)) - 1 / d**2) / n)
    off_se = math.sqrt(1 / (d * (d + 2)) / n)
    eye = torch.eye(d, dtype=torch.float64)
    diag_ok = bool(((second.diagonal() - 1 / d).abs() < 5 * diag_se).all())
    off_ok = bool(((second - torch.diag(second.diagonal())).abs() < 5 * off_se + eye).all())
    return mean_ok and diag_ok and off_ok


@pytest.mark.parametrize("dim", [2, 16])
def test_direction_is_isotropic(dim):
    z = tp.noise(N, dim, 1.0, torch.Generator().manual_seed(100 + dim))
    assert isotropic(z / z.norm(dim=1, keepdim=True))
    # The check notices a stretched axis or a drift: it can fail.
    stretched = z * torch.tensor([1.3] + [1.0] * (dim - 1))
    assert not isotropic(stretched / stretched.norm(dim=1, keepdim=True))
    drifted = z / z.norm(dim=1, keepdim=True) + 0.05
    assert not isotropic(drifted / drifted.norm(dim=1, keepdim=True))


def test_noise_is_reproducible_and_shaped():
    a = tp.noise(5, 7, 2.0, torch.Generator().manual_seed(3))
    b = tp.noise(5, 7, 2.0, torch.Generator().manual_seed(3))
    assert a.shape == (5, 7) and a.dtype == torch.float32 and torch.equal(a, b)
    assert tp.noise(0, 7, 2.0, torch.Generator()).shape == (0, 7)


# A tiny vocabulary on a line: distances 1 (0-1), 1.5 (1-2) and 2.5 (0-2).
TINY = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.5, 0.0]])
PAIR_DIST = torch.cdist(TINY, TINY)
SAMPLES = 60_000


def release_counts(epsilon: float, seed: int) -> torch.Tensor:
    """counts[w, o]: how often token w was released as o, over SAMPLES runs of the real perturb."""
    ids = torch.arange(3).repeat_interleave(SAMPLES)[None]
    out = tp.perturb(ids, torch.ones_like(ids), TINY, epsilon, torch.Generator().manual_seed(seed))
    counts = torch.zeros(3, 3)
    counts.index_put_((ids[0], out[0]), torch.ones(ids.shape[1]), accumulate=True)
    return counts


def worst_excess(counts: torch.Tensor, epsilon: float) -> tuple[float, float]:
    """(largest log-ratio excess over the bound, in standard errors; largest log ratio / bound)."""
    worst_z, worst_share = -math.inf, 0.0
    for w in range(3):
        for w2 in range(3):
            if w == w2:
                continue
            bound = epsilon * float(PAIR_DIST[w, w2])
            for o in range(3):
                a, b = float(counts[w, o]), float(counts[w2, o])
                assert a > 50 and b > 50, "too few samples to estimate the ratio"
                log_ratio = math.log(a / b)           # same SAMPLES for both tokens
                se = math.sqrt(1 / a + 1 / b)         # delta method on log counts
                worst_z = max(worst_z, (log_ratio - bound) / se)
                worst_share = max(worst_share, log_ratio / bound)
    return worst_z, worst_share


def test_dp_ratio_holds_and_is_nearly_tight():
    epsilon = 1.5
    counts = release_counts(epsilon, seed=11)
    z, share = worst_excess(counts, epsilon)
    assert z < 4.5, f"P[o|w]/P[o|w'] exceeds exp(eps*d) by {z:.1f} standard errors"
    # Not trivially satisfied: outputs really depend on the input, and some
    # ratio uses most of its allowance.
    assert share > 0.75
    assert (counts.diagonal() / SAMPLES > 0.4).all() and (counts / SAMPLES < 0.3).any()


def test_dp_ratio_check_catches_too_little_noise():
    # A mechanism run at 1.5x the claimed epsilon must break the claimed bound:
    # the check above would fail if noise were under-scaled by that much.
    epsilon = 1.5
    z, share = worst_excess(release_counts(1.5 * epsilon, seed=12), epsilon)
    assert z > 6 and share > 1.1


def small_table(vocab: int = 64, dim: int = 8) -> torch.Tensor:
    return torch.randn(vocab, dim, generator=torch.Generator().manual_seed(5))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 64, (3, 12), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0          # right padding
    mask[1, :4] = 0          # left padding
    ids[mask == 0] = 0       # the pad id, itself a vocabulary token
    return ids, mask


def test_perturb_leaves_padding_and_kept_positions():
    table = small_table()
    ids, mask = batch()
    keep = torch.zeros_like(mask, dtype=torch.bool)
    keep[2, :3] = True
    out = tp.perturb(ids, mask, table, 0.01, tp.generator_for(1, 0), keep=keep)
    assert out.shape == ids.shape and out.dtype == ids.dtype
    assert torch.equal(out[mask == 0], ids[mask == 0])
    assert torch.equal(out[keep], ids[keep])
    changed = (out != ids) & mask.bool() & ~keep
    assert changed.sum() > 0.6 * (mask.bool() & ~keep).sum()
    assert torch.equal(ids, batch()[0]), "perturb must not modify its input"


def test_perturb_reproducible_per_step():
    table = small_table()
    ids, mask = batch()
    a = tp.perturb(ids, mask, table, 0.5, tp.generator_for(7, 3))
    b = tp.perturb(ids, mask, table, 0.5, tp.generator_for(7, 3))
    c = tp.perturb(ids, mask, table, 0.5, tp.generator_for(7, 4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Hashed, not summed: swapping seed and step gives different noise.
    x = torch.randn(8, generator=tp.generator_for(3, 7))
    assert not torch.equal(x, torch.randn(8, generator=tp.generator_for(7, 3)))
    assert not torch.equal(x, torch.randn(8, generator=tp.generator_for(3, 7, salt=1)))


def test_large_epsilon_keeps_tokens_tiny_epsilon_changes_most():
    table = small_table()
    ids, mask = batch()
    assert torch.equal(tp.perturb(ids, mask, table, 1e6, tp.generator_for(0, 0)), ids)
    long_ids = torch.randint(0, 64, (4, 256), generator=torch.Generator().manual_seed(8))
    out = tp.perturb(long_ids, torch.ones_like(long_ids), table, 1e-3, tp.generator_for(0, 1))
    assert tp.kept_fraction(long_ids, out) < 0.2
    assert tp.kept_fraction(long_ids, long_ids) == 1.0


def test_nearest_rows_chunked_matches_cdist():
    table = torch.randn(300, 16, generator=torch.Generator().manual_seed(9))
    points = torch.randn(50, 16, generator=torch.Generator().manual_seed(10)) * 2
    expected = torch.cdist(points, table).argmin(dim=1)
    for max_bytes in (1, 4 * 300 * 7, tp.DEFAULT_CHUNK_BYTES):   # one row, 7 rows, all at once
        assert torch.equal(tp.nearest_rows(points, table, max_bytes), expected)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), "abc", None])
def test_bad_epsilon_is_a_clear_error(bad):
    ids, mask = batch()
    with pytest.raises(ValueError, match="epsilon"):
        tp.perturb(ids, mask, small_table(), bad, tp.generator_for(0, 0))
    with pytest.raises(ValueError, match="epsilon"):
        tp.noise(3, 2, bad, torch.Generator())


def test_out_of_range_ids_and_shape_mismatch_rejected():
    ids, mask = batch()
    ids[2, 5] = 64
    with pytest.raises(ValueError, match="token ids"):
        tp.perturb(ids, mask, small_table(), 1.0, tp.generator_for(0, 0))
    with pytest.raises(ValueError, match="differ in shape"):
        tp.perturb(ids, mask[:, :5], small_table(), 1.0, tp.generator_for(0, 0))


def test_distance_scale_on_a_known_grid():
    # Points of a 10 x 10 integer grid: every nearest neighbour is at distance 1.
    grid = torch.stack(torch.meshgrid(torch.arange(10.0), torch.arange(10.0), indexing="ij"), -1).reshape(-1, 2)
    scale = tp.distance_scale(grid, sample=50, max_bytes=4 * 100 * 3)
    assert scale["median_nn_distance"] == pytest.approx(1.0)
    assert scale["duplicate_fraction"] == 0.0
    assert scale["vocab"] == 100 and scale["dim"] == 2 and scale["sampled"] == 50
    assert 3 < scale["median_norm"] < 10
    dup = tp.distance_scale(torch.cat([grid, grid[:1]]), sample=200)
    assert dup["duplicate_fraction"] == pytest.approx(2 / 101)
