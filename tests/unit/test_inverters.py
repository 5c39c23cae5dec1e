"""Learned inverters (bench/inverters.py) on a tiny random Llama: they learn the way back, and only from real pairs."""
from __future__ import annotations

import pytest
import torch

from bench.inverters import Inverter, activations, fit_known_plaintext, fit_mlp, fit_ridge, nearest

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


def test_known_plaintext_reads_a_front_the_public_inverter_cannot(tiny, depth1):
    """Activations from a changed ("private") front: a random rotation of depth-1 activations. The public-trained
    ridge reads few of them; refitted with the public pairs plus 5% known private pairs, it reads them back."""
    (X, y), (Xh, yh), table = depth1
    gen = torch.Generator().manual_seed(5)
    rotation, _ = torch.linalg.qr(torch.randn(HIDDEN, HIDDEN, generator=gen))
    private = Xh @ rotation
    known = torch.zeros(len(yh), dtype=torch.bool)
    known[: len(yh) // 20] = True
    public_only = fit_ridge(X, y, table).accuracy(private[~known], yh[~known])
    fitted = fit_known_plaintext(X, y, private[known], yh[known], table, seconds=float("inf"), seed=0,
                                 max_steps=20)
    assert public_only < 0.2
    assert fitted["ridge"].accuracy(private[~known], yh[~known]) > public_only + 0.4


def test_known_positions_are_the_template_and_the_first_sequences():
    from bench.privacy import known_positions
    from edge_client.objective import Batch

    prefix, suffix = [5, 6, 7], [8, 9]
    rows = [prefix + [20 + i, 30 + i, 40 + i][: 1 + i % 3] + suffix for i in range(4)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.bool)
    batch = Batch(ids, mask, torch.arange(4), mask.sum(1) - 1, ids[torch.arange(4), mask.sum(1) - 1])
    known = known_positions([batch], sequences=1)[0]
    flat_ids = ids[mask]
    expected = torch.cat([torch.tensor([True] * len(rows[0]))] + [
        torch.tensor([t in prefix + suffix for t in r]) for r in rows[1:]])
    assert torch.equal(known, expected), (flat_ids[known], flat_ids[expected])


@pytest.mark.parametrize("source", ["bbc", "tweets"])
def test_public_sources_split_by_text_alone(source):
    from bench.inverters import public_texts

    train, held = (set(public_texts(10 ** 9, seed=s, split=part, source=source)) for s, part in
                   ((0, "train"), (1, "heldout")))
    assert train and held and not train & held
    assert set(public_texts(10 ** 9, seed=5, split="train", source=source)) == train
    with pytest.raises(ValueError, match="unknown public source"):
        public_texts(1, source="wiki")


def test_each_task_is_attacked_with_the_other_corpus():
    from bench.privacy import public_source

    assert public_source("bbc") == "tweets" and public_source("tweets") == "bbc"
