"""Label attacks of a curious cloud beyond the named-label solve: its own head on the forward, and clustering.

A cloud that runs every block computes the final hidden state itself, so it
can apply the public norm and head and read the model's own prediction (the
forward leak). And whatever the edge's head is, the final-hidden gradients and
hidden states of one class sit together: grouping them gives the labels up to
their names (scored with the best mapping of groups to labels, the attacker's
best case), and the public model classifying the text the cloud recovered
names the groups (scored as it is, no mapping given).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor

# Above this many classes, the best mapping is found greedily (the exact search is C! permutations).
_EXACT_MAPPING_UP_TO = 8


@dataclass
class LabelEvidence:
    """What the cloud gathered at the loss positions of every recorded step, with the truth to score it."""

    grads: list[Tensor] = field(default_factory=list)      # [H] final-hidden gradient, norm weight divided out
    hidden: list[Tensor] = field(default_factory=list)     # [H] final hidden state (before the final norm)
    zero_shot: list[int] = field(default_factory=list)     # the public model's label for the recovered text
    truth: list[int] = field(default_factory=list)         # the true class index

    def add(self, grad: Tensor, hidden: Tensor, zero_shot: int, truth: int) -> None:
        self.grads.append(grad.float())
        self.hidden.append(hidden.float())
        self.zero_shot.append(zero_shot)
        self.truth.append(truth)


def kmeans(X: Tensor, k: int, seed: int = 0, restarts: int = 10, iters: int = 50) -> Tensor:
    """Cluster index of each row of X (cosine geometry: rows normalised), the best of `restarts` by inertia."""
    X = torch.nn.functional.normalize(X.double(), dim=-1)
    gen = torch.Generator().manual_seed(seed)
    best: tuple[float, Tensor] | None = None
    for _ in range(restarts):
        centres = _plus_plus(X, k, gen)
        for _ in range(iters):
            assign = torch.cdist(X, centres).argmin(dim=1)
            moved = torch.stack([X[assign == c].mean(0) if (assign == c).any() else centres[c] for c in range(k)])
            if torch.allclose(moved, centres):
                break
            centres = moved
        assign = torch.cdist(X, centres).argmin(dim=1)
        inertia = float((X - centres[assign]).pow(2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, assign)
    assert best is not None
    return best[1]


def _plus_plus(X: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding: each next centre drawn with probability by its squared distance to the chosen."""
    chosen = [int(torch.randint(len(X), (1,), generator=gen))]
    for _ in range(1, k):
        d = torch.cdist(X, X[chosen]).min(dim=1).values.pow(2)
        if float(d.sum()) == 0:
            chosen.append(int(torch.randint(len(X), (1,), generator=gen)))
            continue
        chosen.append(int(torch.multinomial(d / d.sum(), 1, generator=gen)))
    return X[chosen].clone()


def best_mapping_accuracy(assign: Tensor, truth: Tensor, k: int) -> float:
    """Accuracy of the cluster assignment under the mapping of clusters to labels that scores best."""
    counts = torch.zeros(k, k, dtype=torch.long)
    counts.index_put_((assign, truth), torch.ones_like(assign), accumulate=True)
    if k <= _EXACT_MAPPING_UP_TO:
        best = max(sum(int(counts[c, perm[c]]) for c in range(k)) for perm in itertools.permutations(range(k)))
    else:  # greedy: the largest remaining cell first
        best, used_c, used_l = 0, set(), set()
        for flat in counts.flatten().argsort(descending=True).tolist():
            c, lab = divmod(flat, k)
            if c not in used_c and lab not in used_l:
                best += int(counts[c, lab])
                used_c.add(c)
                used_l.add(lab)
    return best / max(len(truth), 1)


def named_by_majority(assign: Tensor, votes: Tensor, k: int) -> Tensor:
    """Each cluster named by the most common vote among its members (the public model's zero-shot labels)."""
    names = torch.zeros(k, dtype=torch.long)
    for c in range(k):
        members = votes[assign == c]
        if len(members):
            names[c] = torch.bincount(members, minlength=k).argmax()
    return names[assign]


def score(evidence: LabelEvidence, classes: int, seed: int = 0) -> dict[str, float]:
    """Rates of every clustering attack on what was gathered over a variant's recorded steps."""
    if not evidence.truth:
        return {}
    truth = torch.tensor(evidence.truth)
    votes = torch.tensor(evidence.zero_shot)
    out = {"label_zero_shot_text": float((votes == truth).float().mean())}
    for name, rows in (("grad", evidence.grads), ("hidden", evidence.hidden)):
        assign = kmeans(torch.stack(rows), classes, seed=seed)
        out[f"label_cluster_{name}_best_map"] = best_mapping_accuracy(assign, truth, classes)
        out[f"label_cluster_{name}_named"] = float((named_by_majority(assign, votes, classes) == truth).float().mean())
    return out
