"""A language-model prior: the cloud rescores its inverter's top candidates with the public model's own prediction.

An inverter reads each position alone. Text is not a bag of independent
tokens, and the cloud holds a language model, the public one, that knows how
text goes on. **Greedy decoding** under the prior: left to right, the cloud picks
each position among the inverter's top-k candidates by

    log softmax(temperature * inverter scores)[candidate] + weight * log p_LM(candidate | the tokens picked before)

(a beam of width 1; the public model runs once per position, with its cache). The temperature turns the
inverter's raw scores (cosines for the ridge map, logits for the MLP) into
log-probabilities; it and the weight are picked on public held-out text, which
the cloud has, never on the recording.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bench import inverters

# Temperatures tried on the inverter's raw scores (cosine scores need a large one, logits about 1).
_TEMPERATURES = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class Prior:
    """What the cloud picked on public held-out text: the inverter's temperature, the LM weight, the candidates."""

    temperature: float
    weight: float
    k: int = 10


def log_probs(scores: Tensor, temperature: float) -> Tensor:
    """Candidate scores as log-probabilities, normalised over the k candidates kept."""
    return torch.log_softmax(temperature * scores, dim=1)


def _sequences(lengths: list[int]) -> list[slice]:
    out, start = [], 0
    for n in lengths:
        out.append(slice(start, start + n))
        start += n
    return out


@torch.no_grad()
def decode(lm: nn.Module, candidates: Tensor, scores: Tensor, lengths: list[int], prior: Prior,
           batch_size: int = 32) -> Tensor:
    """The tokens read with the LM prior ([N]), from the inverter's candidates and raw scores ([N, k] each, rows of
    whole sequences of `lengths`, in order): left to right, each position picked among its candidates by its
    own log-probability plus `prior.weight` times the public model's, given the tokens already picked."""
    own = log_probs(scores[:, :prior.k].float(), prior.temperature)
    candidates = candidates[:, :prior.k]
    if prior.weight == 0:
        return candidates.gather(1, own.argmax(dim=1, keepdim=True))[:, 0]
    out = torch.empty(len(candidates), dtype=torch.long)
    spans = _sequences(lengths)
    for start in range(0, len(spans), batch_size):
        group = spans[start:start + batch_size]
        width = max(sp.stop - sp.start for sp in group)
        # Padded [B, width, k]; past a sequence's end its picks are never read (the attention is causal).
        cand = torch.zeros((len(group), width, prior.k), dtype=torch.long)
        mine = torch.zeros((len(group), width, prior.k))
        for r, sp in enumerate(group):
            cand[r, :sp.stop - sp.start] = candidates[sp]
            mine[r, :sp.stop - sp.start] = own[sp]
        picked = torch.empty((len(group), width), dtype=torch.long)
        picked[:, 0] = cand[:, 0].gather(1, mine[:, 0].argmax(dim=1, keepdim=True))[:, 0]
        past = None
        for t in range(1, width):
            step = lm(input_ids=picked[:, t - 1:t], past_key_values=past, use_cache=True)
            past = step.past_key_values
            lp = torch.log_softmax(step.logits[:, -1].float(), dim=-1).gather(1, cand[:, t])
            picked[:, t] = cand[:, t].gather(1, (mine[:, t] + prior.weight * lp).argmax(dim=1, keepdim=True))[:, 0]
        for r, sp in enumerate(group):
            out[sp] = picked[r, :sp.stop - sp.start]
    return out


def choose(lm: nn.Module, inverter: inverters.Inverter, X: Tensor, y: Tensor, lengths: list[int],
           k: int = 10) -> tuple[Prior, dict[str, float]]:
    """The temperature (least negative log-likelihood of the true token among the candidates kept, where it is
    kept) and the weight (best accuracy) on public held-out sequences; returns the prior and each weight's
    accuracy there."""
    candidates, scores = inverter.top(X, k)
    hit = candidates == y[:, None]
    kept = hit.any(dim=1)
    if not kept.any():
        raise ValueError(f"the {inverter.name} inverter's top {k} never holds the true token on the public text")

    def nll(t: float) -> float:
        return float(-log_probs(scores[kept], t)[hit[kept]].mean())

    temperature = min(_TEMPERATURES, key=nll)
    accuracy = {}
    for w in _WEIGHTS:
        got = decode(lm, candidates, scores, lengths, Prior(temperature, w, k))
        accuracy[f"weight_{w:g}"] = float((got == y).float().mean())
    weight = max(_WEIGHTS, key=lambda w: accuracy[f"weight_{w:g}"])
    return Prior(temperature, weight, k), accuracy | {"temperature": temperature, "weight": weight,
                                                              "top_k_holds_truth": float(kept.float().mean())}


def public_sequences(model: nn.Module, tokenizer, depth: int, count: int, source: str, seed: int = 0,
                     max_length: int = 128) -> tuple[Tensor, Tensor, list[int]]:
    """Held-out public texts at `depth`: activations [N, H], tokens [N] and each text's length, in text order."""
    texts = inverters.public_texts(count, seed=seed, split="heldout", source=source)
    seqs = inverters._tokenize(tokenizer, texts, max_length)
    X, y = inverters.text_dataset(model, tokenizer, texts, depth, max_length)
    return X, y, [len(s) for s in seqs]
