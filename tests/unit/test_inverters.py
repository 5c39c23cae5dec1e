"""Learned inverters (bench/inverters.py) on a tiny random Llama: they learn the way back, and only from real pairs."""
from __future__ import annotations

import pytest
import torch

from bench.inverters import Inverter, activations, fit_mlp, fit_ridge, nearest

VOCAB, HIDDEN, SEQ = 256, 64, 32
CHANCE = 1 / VOCAB


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on a shared 2-core machine, two spinning OpenMP threads made this file 20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    """A 2-block random Llama; initializer_range 0.07 makes block 0 mix enough that the
    untrained nearest-neighbour lookup misses a third of the tokens at depth 1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=128, max_position_embeddings=128,
                         initializer_range=0.07, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def depth1(tiny):
    """Depth-1 activations of 400 "public" random sequences, and of 200 different held-out ones."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (600, SEQ), generator=gen)
    hidden = activations(tiny, ids, torch.ones_like(ids), depth=1)
    flat = hidden.reshape(-1, SEQ, HIDDEN)
    train = (flat[:400].reshape(-1, HIDDEN), ids[:400].reshape(-1))
    held = (flat[400:].reshape(-1, HIDDEN), ids[400:].reshape(-1))
    return train, held, tiny.get_input_embeddings().weight.detach()


def test_activations_are_hf_hidden_states_and_respect_the_mask(tiny):
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    with torch.no_grad():
        want = tiny(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for depth in (0, 1):
        got = activations(tiny, ids, mask, depth, batch_size=2)
        assert got.shape == (3, 10, HIDDEN) and got.dtype == torch.float32
        torch.testing.assert_close(got, want[depth], rtol=0, atol=1e-6)
    # Causal attention: the real positions of the padded row are those of the row alone.
    alone = activations(tiny, ids[1:2, :6], mask[1:2, :6], 1)
    torch.testing.assert_close(activations(tiny, ids, mask, 1)[1, :6], alone[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="depth"):
        activations(tiny, ids, mask, 3)


def test_nearest_reads_the_embedding_output_exactly(tiny):
    ids = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(3))
    hidden = activations(tiny, ids, torch.ones_like(ids), depth=0).reshape(-1, HIDDEN)
    table = tiny.get_input_embeddings().weight.detach()
    for cosine in (False, True):
        assert torch.equal(nearest(hidden, table, cosine=cosine), ids.reshape(-1))


def test_learned_inverters_recover_held_out_tokens(depth1):
    (X, y), (Xh, yh), table = depth1
    baseline = float((nearest(Xh, table, cosine=False) == yh).float().mean())
    ridge = fit_ridge(X, y, table)
    mlp = fit_mlp(X, y, table, seconds=float("inf"), max_steps=300)
    for inv in (ridge, mlp):
        assert isinstance(inv, Inverter)
        acc = inv.accuracy(Xh, yh)
        # Measured: nearest ~0.66, ridge ~0.89, mlp ~0.94 on sequences the fit never saw.
        assert acc > 0.8, f"{inv.name} recovered only {acc:.3f} of held-out tokens"
        assert acc > baseline + 0.1, f"{inv.name} ({acc:.3f}) learned little over nearest ({baseline:.3f})"


def test_shuffled_labels_stay_near_chance(depth1):
    (X, y), (Xh, yh), table = depth1
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(4))]
    for inv in (fit_ridge(X, shuffled, table), fit_mlp(X, shuffled, table, seconds=float("inf"), max_steps=300)):
        acc = inv.accuracy(Xh, yh)
        assert acc < 10 * CHANCE, f"{inv.name} with shuffled labels scored {acc:.3f} (chance {CHANCE:.4f})"


def test_mlp_is_deterministic_given_seed_and_steps(depth1):
    (X, y), (Xh, _), table = depth1
    first, second = (fit_mlp(X[:2048], y[:2048], table, seconds=float("inf"), max_steps=20, seed=7)
                     for _ in range(2))
    assert torch.equal(first.predict(Xh), second.predict(Xh))
    with pytest.raises(ValueError, match="budget"):
        fit_mlp(X, y, table, seconds=float("inf"))
