"""The private front's adversary and privacy term (edge_client/private_front.py), on small in-process tensors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from edge_client.private_front import FrontGuard, PrivateFrontConfig
from edge_client.trainer import TrainConfig

V, H = 96, 24


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V, H, generator=g)
    tokens = torch.randint(V, (8, 12), generator=g)
    return table, tokens


def _retrained_accuracy(front: nn.Module, table: torch.Tensor, tokens: torch.Tensor, steps: int = 300) -> float:
    """A fresh inverter trained long on the front's final outputs: what a patient adversary reads."""
    guard = FrontGuard(PrivateFrontConfig(front_privacy=1.0, front_inverter_steps=1, front_negatives=0), table, 1)
    with torch.no_grad():
        h = front(table[tokens]).flatten(0, 1)
    for _ in range(steps):
        guard.fit(h, tokens.flatten())
    return guard.fit(h, tokens.flatten())


def test_the_inverter_learns_to_read_a_fixed_front():
    table, tokens = _setup()
    front = nn.Linear(H, H)
    assert _retrained_accuracy(front, table, tokens) > 0.9


def test_the_privacy_term_evades_a_fixed_inverter_but_a_retrained_one_reads_the_front_again():
    """What the term does, and its limit. Against an inverter that stops learning, the front soon moves where it
    reads little; a fresh inverter trained on the moved front reads it all again: a linear front stays
    invertible, so the term alone only evades an adversary that does not adapt (docs/privacy.md)."""
    table, tokens = _setup()
    front = nn.Linear(H, H)
    guard = FrontGuard(PrivateFrontConfig(front_privacy=1.0, front_negatives=0), table, 0)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    with torch.no_grad():
        h = front(table[tokens])
    for _ in range(300):
        guard.fit(h.flatten(0, 1), tokens.flatten())
    fixed = PrivateFrontConfig(front_privacy=1.0, front_negatives=0, front_inverter_steps=0)
    guard.cfg = fixed
    before = guard.fit(h.flatten(0, 1), tokens.flatten())
    opt = torch.optim.Adam(front.parameters(), lr=1e-2)
    for _ in range(100):
        out = guard.attach(front(table[tokens]), tokens, mask)
        opt.zero_grad()
        out.sum().mul(0).backward()  # no task: only the privacy term trains the front
        opt.step()
    with torch.no_grad():
        evaded = guard.fit(front(table[tokens]).flatten(0, 1), tokens.flatten())
    assert before > 0.9 and evaded < 0.2, (before, evaded)
    assert _retrained_accuracy(front, table, tokens) > 0.9


def test_attach_is_the_identity_forward_and_adds_the_weighted_term_backward():
    table, tokens = _setup()
    mask = torch.ones_like(tokens, dtype=torch.bool)
    x = table[tokens].clone().requires_grad_(True)
    grads = []
    for weight in (0.5, 1.0):
        guard = FrontGuard(PrivateFrontConfig(front_privacy=weight, front_inverter_steps=0), table, 7)
        out = guard.attach(x, tokens, mask)
        assert torch.equal(out, x)
        x.grad = None
        (out * 3.0).sum().backward()
        grads.append(x.grad.clone())
    task = torch.full_like(x, 3.0)
    # Same draws (seed 7), no inverter update: the term's gradient doubles with its weight.
    assert torch.allclose(grads[1] - task, 2 * (grads[0] - task), atol=1e-6)
    assert (grads[0] - task).abs().sum() > 0


def test_bad_settings_name_the_flag():
    with pytest.raises(ValueError, match="--front-privacy"):
        PrivateFrontConfig(front_privacy=-1.0)
    with pytest.raises(ValueError, match="--front-negatives"):
        PrivateFrontConfig(front_negatives=-1)
    with pytest.raises(ValueError, match="--front-inverter-lr"):
        PrivateFrontConfig(front_inverter_lr=0.0)
    on = PrivateFrontConfig(front_privacy=1.0)
    with pytest.raises(ValueError, match="--edge-layers K"):
        TrainConfig.of(private_front=on)
    with pytest.raises(ValueError, match="FedAvg sends the front's adapters"):
        TrainConfig.of(private_front=on, mode="splitlora", cut_layer=2)
    assert TrainConfig.of(edge_layers=1, private_front=on).remote.private_front.enabled


def test_the_guard_state_round_trips():
    """A resumed run's guard: the same inverter, optimizer moments and candidate draws."""
    table, tokens = _setup()
    mask = torch.ones_like(tokens, dtype=torch.bool)
    cfg = PrivateFrontConfig(front_privacy=1.0, front_negatives=16)
    a = FrontGuard(cfg, table, 3)
    a.attach(table[tokens], tokens, mask)
    b = FrontGuard(cfg, table, 99)
    b.load_state_dict(a.state_dict())
    for (name, p), q in zip(a.inverter.named_parameters(), b.inverter.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(a.optimizer.state_dict()["state"][0]["exp_avg"], b.optimizer.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(a._candidates(tokens.flatten())[0], b._candidates(tokens.flatten())[0])
