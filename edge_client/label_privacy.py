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

import math
import random
from collections.abc import Sequence

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
    out = []
    for y in labels:
        if rng.random() < keep:
            out.append(y)
        else:
            out.append(rng.choice([other for other in label_set if other != y]))
    return out


def privatise(train: Dataset, epsilon: float, seed: int) -> Dataset:
    """The training set with every label released by randomised response (completions follow)."""
    if not train.is_classification or any(ex.label is None for ex in train.examples):
        raise ValueError("--label-epsilon needs text/label data: prompt/completion records have no label to protect")
    noisy = randomise([ex.label for ex in train.examples], train.labels, epsilon, seed)
    return Dataset([Example(ex.prompt, " " + y, y) for ex, y in zip(train.examples, noisy)], train.labels)
