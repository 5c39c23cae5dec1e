"""A SplitLoRA federation's durable state, in-process: what a replica that takes over must find."""
from __future__ import annotations

import pytest
import torch

from cloud_server.federation import Federation, FederationLost, FederationMismatch, Federations, FederationSettings
from cloud_server.federation_state import StateError, StateFile
from cloud_server.sites import ModuleSpec, SiteSpec

SETTINGS = FederationSettings(cut_layer=1, clients=2, rank=2, alpha=4.0, lr=1e-2, seed=0, targets=("q_proj",))
SITES = [SiteSpec(0, 1, (ModuleSpec("layers.1.q_proj", 6, 5),)), SiteSpec(1, 2, (ModuleSpec("layers.2.q_proj", 6, 5),))]


def federation(tmp_path, settings: FederationSettings = SETTINGS, name: str = "f") -> Federation:
    return Federation(name, settings, SITES, torch.device("cpu"), torch.float32, StateFile(tmp_path, "owner", name))


def fake_step(fed: Federation, member: str, step_id: int, scale: float) -> torch.Tensor | None:
    """What the service does for one training step, with a gradient that depends on the weights."""
    with fed.hold():
        answered = fed.begin_step(member, step_id)
        if answered is not None:
            return answered
        x = torch.full((3, 6), scale)
        loss = sum((a(x) ** 2).sum() + a.lora_A.sum() for a in fed.adapters.values())
        loss.backward()
        cut = torch.full((3, 6), float(loss.detach()))
        fed.end_step(member, step_id, cut)
        return cut


def weights(fed: Federation) -> dict[str, torch.Tensor]:
    return {f"{n}.{i}": t for n, ab in fed.snapshot().items() for i, t in enumerate(ab)}


def test_a_replica_taking_over_continues_bit_for_bit(tmp_path):
    """Replica 1 runs 3 steps and dies (its memory is gone); replica 2 loads the file and runs 2 more:
    exactly what one replica running all 5 computes, optimizer moments and waiting update included."""
    alone = federation(tmp_path / "alone")
    for i in range(5):
        fake_step(alone, "m", i, 0.1 * (i + 1))
    first = federation(tmp_path / "shared")
    for i in range(3):
        fake_step(first, "m", i, 0.1 * (i + 1))
    assert first.pending == ("m", 2)
    second = federation(tmp_path / "shared")     # a fresh process: holding it loads the file
    for i in range(3, 5):
        fake_step(second, "m", i, 0.1 * (i + 1))
    a, b = weights(alone), weights(second)
    assert all(torch.equal(a[k], b[k]) for k in a) and second.updates == alone.updates == 5


def test_replayed_steps_never_count_twice(tmp_path):
    fed = federation(tmp_path)
    first = fake_step(fed, "a", 0, 0.5)
    again = fake_step(fed, "a", 0, 0.5)          # the reply was lost: recomputed from the same state
    assert torch.equal(first, again) and fed.updates == 0 and fed.pending == ("a", 0)
    fake_step(fed, "b", 0, 0.7)                  # another member steps: a's update is applied
    assert fed.updates == 1
    assert torch.equal(fake_step(fed, "a", 0, 99.0), first)   # the kept answer, nothing recomputed
    assert fed.updates == 1 and fed.pending == ("b", 0)
    with pytest.raises(FederationMismatch, match="older than this client's last step"):
        with fed.hold():
            fed.begin_step("b", -1)


def test_a_failed_replay_keeps_the_waiting_update(tmp_path):
    fed = federation(tmp_path)
    fake_step(fed, "a", 0, 0.5)
    grads = [p.grad.clone() for p in fed.params]
    with fed.hold():
        fed.begin_step("a", 0)                   # the replay starts, then its stream dies
        fed.abort_step()
    assert all(torch.equal(p.grad, g) for p, g in zip(fed.params, grads))


def test_a_stale_session_leaving_does_not_remove_a_member_that_moved(tmp_path):
    """After a failover the old replica may reap the member's old session: the member stays."""
    old, new = federation(tmp_path), federation(tmp_path)
    old.join("a", "session-on-old")
    old.join("b", "b-session")
    new.join("a", "session-on-new")              # a re-opened its session on the other replica
    old.leave("a", "session-on-old")
    assert federation(tmp_path).store.exists()
    with new.hold():
        assert new.members == {"a": "session-on-new", "b": "b-session"}
    new.leave("a", "session-on-new")
    new.leave("b", "b-session")
    assert not new.store.exists()                # every member left: the federation is over


def test_rounds_survive_a_replica(tmp_path):
    """A member whose aggregation reply was lost asks the next replica, which answers from the file."""
    fed = federation(tmp_path, FederationSettings(**{**SETTINGS.__dict__, "clients": 1}))
    ad = {"layers.0.q_proj": (torch.ones(2, 6), torch.ones(5, 2))}
    fed.join("a", "s1")
    result, n = fed.aggregate("a", 1, 3, ad, timeout=5)
    other = federation(tmp_path, FederationSettings(**{**SETTINGS.__dict__, "clients": 1}))
    again, m = other.aggregate("a", 1, 3, ad, timeout=5)
    assert m == n == 1 and all(torch.equal(again[k][i], result[k][i]) for k in result for i in (0, 1))
    with pytest.raises(FederationMismatch, match="at aggregation round 2"):
        other.aggregate("a", 3, 3, ad, timeout=5)


def test_bad_state_is_refused_by_name(tmp_path):
    fed = federation(tmp_path)
    fake_step(fed, "a", 0, 0.5)
    other = federation(tmp_path, FederationSettings(**{**SETTINGS.__dict__, "lr": 0.5}))
    with pytest.raises(FederationMismatch, match=r"saved with lr 0.01 \(asked 0.5\)"):
        other.join("b", "s")
    fed.store.path.write_bytes(b"not a torch file")
    with pytest.raises(StateError, match="unreadable.*move it away"):
        federation(tmp_path).join("b", "s")
    torch.save({"version": 99}, fed.store.path)
    with pytest.raises(StateError, match="not version 1"):
        federation(tmp_path).join("b", "s")


def test_a_resuming_member_never_gets_a_fresh_federation(tmp_path):
    make = lambda store: Federation("f", SETTINGS, SITES, torch.device("cpu"), torch.float32, store)  # noqa: E731
    with pytest.raises(FederationLost, match="no state of federation 'f'"):
        Federations(None).join("o", "f", "a", "s", SETTINGS, make, resume=True)
    feds = Federations(tmp_path)
    fed = feds.join("o", "f", "a", "s", SETTINGS, make)
    fake_step(fed, "a", 0, 0.5)
    assert Federations(tmp_path).join("o", "f", "a", "s2", SETTINGS, make, resume=True).pending == ("a", 0)


def test_a_member_the_server_dropped_finds_its_federation_again(tmp_path):
    """The last member's session closed by the server (its edge vanished mid-step, a connection cut; found by
    `make soak`) keeps the state, so the member's --resume carries on; only its own CloseSession ends it."""
    make = lambda store: Federation("f", SETTINGS, SITES, torch.device("cpu"), torch.float32, store)  # noqa: E731
    feds = Federations(tmp_path)
    fed = feds.join("o", "f", "a", "s1", SETTINGS, make)
    fake_step(fed, "a", 0, 0.5)
    before = weights(fed)
    feds.leave("o", "f", "a", "s1", by_edge=False)
    again = feds.join("o", "f", "a", "s2", SETTINGS, make, resume=True)
    assert again is not fed and again.updates == fed.updates
    assert all(torch.equal(before[k], v) for k, v in weights(again).items())
    feds.leave("o", "f", "a", "s2", by_edge=True)
    with pytest.raises(FederationLost):
        Federations(tmp_path).join("o", "f", "a", "s3", SETTINGS, make, resume=True)
