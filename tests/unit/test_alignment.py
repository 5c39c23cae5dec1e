"""Unpaired alignment (bench/alignment.py) on a tiny random Llama: a fitted front nears a secret one."""
from __future__ import annotations

import pytest
import torch

from bench.alignment import FrontShape, coral, fit_front, mmd, moment_gap, unit_rms
from bench.inverters import activations
from common.lora import inject, seeded_adapters

VOCAB, HIDDEN, SEQ = 256, 64, 24
NAMES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=128, max_position_embeddings=128,
                         initializer_range=0.07, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def shape_of(model) -> FrontShape:
    shapes = {}
    for name in NAMES:
        linear = model.get_submodule(name)
        shapes[name] = (linear.in_features, linear.out_features)
    return FrontShape(shapes, rank=4, scale=2.0)


@pytest.fixture(scope="module")
def secret(tiny):
    """The edge's front: block 0 with adapters the cloud never sees (B far from its zero start)."""
    import copy

    model = copy.deepcopy(tiny)
    adapters = seeded_adapters(shape_of(tiny).shapes, 4, 2.0, seed=7)
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for a in adapters.values():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=gen) * 0.3)
    inject(model, adapters)
    return model


def batches(seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(2, VOCAB, (8, SEQ), generator=gen)
        yield ids, torch.ones_like(ids)


def observed(model, seed: int, n: int = 64) -> torch.Tensor:
    ids = torch.randint(2, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    return activations(model, ids, torch.ones_like(ids), depth=1).reshape(-1, HIDDEN)


def test_mmd_and_moment_gap_are_zero_only_for_the_same_distribution():
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(400, 8, generator=gen), torch.randn(400, 8, generator=gen)
    shifted = Y + 1.0
    assert float(mmd(X, X, 1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(mmd(X, shifted, 1.0)) > 10 * float(mmd(X, Y, 1.0))
    assert float(moment_gap(X, shifted)) > 10 * float(moment_gap(X, Y))


def test_coral_gives_the_target_mean_and_covariance():
    gen = torch.Generator().manual_seed(1)
    source = torch.randn(2000, 6, generator=gen) @ torch.randn(6, 6, generator=gen) + 3.0
    target = torch.randn(2000, 6, generator=gen) @ torch.randn(6, 6, generator=gen) - 1.0
    mapped = coral(source, source, target, eps=0.0)
    torch.testing.assert_close(mapped.mean(0), target.mean(0), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cov(mapped.T), torch.cov(target.T), atol=1e-3, rtol=1e-3)


def test_fitted_front_moves_public_activations_towards_the_secret_front(tiny, secret):
    target = observed(secret, seed=1)
    fitted, notes = fit_front(tiny, shape_of(tiny), target, 1, batches(2), steps=120, lr=1e-2, sample=512,
                              log_every=0)
    assert notes["distance_after"] < notes["distance_before"]
    # On fresh sequences, never used to fit: the fitted front's activations are nearer the secret front's.
    fresh = unit_rms(observed(secret, seed=3))
    def distance(model) -> float:
        got = unit_rms(observed(model, seed=4))
        return float(mmd(got, fresh, 1.0) + moment_gap(got, fresh))
    assert distance(fitted) < 0.5 * distance(tiny)
    # The public model itself is untouched (the cloud fits a copy).
    assert type(tiny.get_submodule(NAMES[0])).__name__ == "Linear"
