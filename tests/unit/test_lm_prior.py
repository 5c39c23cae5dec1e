"""The language-model prior (bench/lm_prior.py): the public model's prediction mends an inverter's near misses."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from bench.inverters import Inverter
from bench.lm_prior import Prior, choose, decode

VOCAB = 32


class CountingLM(nn.Module):
    """A language model of text that counts: after token t comes t + 1 (mod VOCAB), with probability ~0.98."""

    def forward(self, input_ids: torch.Tensor, past_key_values=None, use_cache: bool = True):
        logits = torch.full((*input_ids.shape, VOCAB), -4.0)
        logits.scatter_(2, ((input_ids + 1) % VOCAB)[..., None], 4.0)
        seen = (past_key_values or 0) + input_ids.shape[1]   # the "cache" counts the tokens fed so far
        return SimpleNamespace(logits=logits, past_key_values=seen)


def counting(lengths: list[int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([(torch.randint(0, VOCAB, (1,), generator=gen) + torch.arange(n)) % VOCAB for n in lengths])


def near_misses(tokens: torch.Tensor, seed: int) -> torch.Tensor:
    """Scores [N, V] of an inverter that ranks the true token first on half the positions and a wrong one a hair
    above it on the others."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand((len(tokens), VOCAB), generator=gen) * 0.5
    scores[torch.arange(len(tokens)), tokens] = 1.0
    wrong = (tokens + 7) % VOCAB
    miss = torch.rand(len(tokens), generator=gen) < 0.5
    scores[torch.arange(len(tokens))[miss], wrong[miss]] = 1.05
    return scores


def test_decoding_mends_near_misses_and_weight_zero_is_the_inverter_alone():
    lengths = [12] * 20
    tokens = counting(lengths, seed=0)
    scores = near_misses(tokens, seed=1)
    top, candidates = scores.topk(5, dim=1)
    alone = decode(CountingLM(), candidates, top, lengths, Prior(temperature=20.0, weight=0.0, k=5))
    assert torch.equal(alone, scores.argmax(dim=1))
    assert 0.3 < float((alone == tokens).float().mean()) < 0.7
    mended = decode(CountingLM(), candidates, top, lengths, Prior(temperature=20.0, weight=1.0, k=5))
    right = (mended == tokens).reshape(20, 12)
    # A sequence's first token has nothing before it; after a right one the prior carries the next.
    assert float(right[:, 1:].float().mean()) > 0.9 and float(right.float().mean()) > 0.85


def test_choose_picks_a_prior_on_public_text_that_then_helps_on_other_text():
    lengths = [10] * 30
    public = counting(lengths, seed=2)
    inverter = Inverter("toy", lambda X: X.argmax(dim=1), score_fn=lambda X: X)
    prior, notes = choose(CountingLM(), inverter, near_misses(public, seed=3), public, lengths, k=5)
    assert prior.weight > 0 and notes["weight_0"] < 0.7 < notes[f"weight_{prior.weight:g}"]
    private = counting(lengths, seed=4)
    candidates, top = inverter.top(near_misses(private, seed=5), prior.k)
    got = decode(CountingLM(), candidates, top, lengths, prior)
    assert float((got == private).float().mean()) > 0.9
