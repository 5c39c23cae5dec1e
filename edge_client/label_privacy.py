"""Label differential privacy by randomised response: each training label replaced once, before training.

With C labels and a privacy budget epsilon, each example keeps its label with
probability e^eps / (e^eps + C - 1) and otherwise takes one of the C - 1 other
labels, uniformly. Each label's release is then epsilon-differentially private
(for any two labels y, y', P[out | y] <= e^eps P[out | y']). Everything the
training computes from it, the gradients the cloud sees included, is
post-processing. Drawn once per example with a fixed seed, so repeated epochs
do not spend the budget again.
"""
from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence

import torch

from edge_client.data import Dataset, Example


def keep_probability(epsilon: float, classes: int) -> float:
    """Chance that randomised response keeps the true label: also the best chance anyone
    seeing only the released label has of guessing it right."""
    if classes < 2:
        raise ValueError("label privacy needs at least 2 labels")
    if not epsilon >= 0:
        raise ValueError(f"--label-epsilon must be >= 0, got {epsilon}")
    return 1.0 / (1.0 + (classes - 1) * math.exp(-epsilon))


def randomise(labels: Sequence[str], label_set: Sequence[str], epsilon: float, seed: int) -> list[str]:
    """Randomised response on each label of `labels`, drawn from `label_set`."""
    keep = keep_probability(epsilon, len(label_set))
    rng = random.Random(seed)
    return [_respond(y, label_set, keep, rng) for y in labels]


def _respond(y, label_set: Sequence, keep: float, rng: random.Random):
    """One randomised response: y with probability `keep`, else one of the others, uniformly."""
    if rng.random() < keep:
        return y
    return rng.choice([other for other in label_set if other != y])


def release_tokens(input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, label_ids: Sequence[int],
                   epsilon: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomised response on the class tokens of a causal-LM batch: (input_ids, labels) [B, T] where
    every label entry that is one of `label_ids` (the C class tokens) is released as above, and the
    same input position (Hugging Face's layout: labels[t] is input_ids[t]) carries the released token
    too, so neither the input the cloud sees nor the gradient it gets holds the true label.

    Each row's draw is keyed by (seed, the row's real tokens other than its labels), so the same
    example gets the same release in every epoch: the budget is spent once per example."""
    keep = keep_probability(epsilon, len(label_ids))
    members = torch.tensor(list(label_ids), dtype=labels.dtype)
    ids, out = input_ids.clone(), labels.clone()
    for row in range(labels.shape[0]):
        positions = torch.nonzero(torch.isin(labels[row], members)).flatten()
        context = mask[row].bool().clone()
        context[positions] = False
        key = hashlib.sha256(f"{seed}:".encode() + input_ids[row][context].cpu().numpy().tobytes()).digest()
        rng = random.Random(key)
        for pos in positions.tolist():
            released = _respond(int(labels[row, pos]), list(label_ids), keep, rng)
            if ids[row, pos] == labels[row, pos]:
                ids[row, pos] = released
            out[row, pos] = released
    return ids, out


def privatise(train: Dataset, epsilon: float, seed: int) -> Dataset:
    """The training set with every label released by randomised response (completions follow)."""
    if not train.is_classification or any(ex.label is None for ex in train.examples):
        raise ValueError("--label-epsilon needs text/label data: prompt/completion records have no label to protect")
    labels = [ex.label for ex in train.examples if ex.label is not None]  # all of them: checked above
    noisy = randomise(labels, train.labels, epsilon, seed)
    return Dataset([Example(ex.prompt, " " + y, y) for ex, y in zip(train.examples, noisy)], train.labels)
