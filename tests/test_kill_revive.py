"""Kill and Revive: the selection rules, parking on a real server (exactness with parked modules is
test_equivalence.py)."""
from __future__ import annotations

import json

import grpc
import pytest
import torch

from common import tensor_codec as codec
from common.lora import LoRAAdapter
from common.wire import dlora_pb2 as pb
from common.wire import dlora_pb2_grpc as pb_grpc
from edge_client.kill_revive import KRConfig, Selector

from helpers import cli


def fake_adapters(n: int) -> dict[str, LoRAAdapter]:
    """Adapters whose norm is proportional to what `grow` adds to B (A is all ones)."""
    out = {f"m{i}": LoRAAdapter(4, 4, 2, 1.0) for i in range(n)}
    for a in out.values():
        torch.nn.init.ones_(a.lora_A)
    return out


def grow(adapters: dict[str, LoRAAdapter], amounts: dict[str, float]) -> None:
    """Move each module's norm by roughly the given amount."""
    with torch.no_grad():
        for name, amount in amounts.items():
            adapters[name].lora_B.add_(amount)


def test_kr_kills_to_budget_and_revives_the_longest_killed():
    ads = fake_adapters(8)
    sel = Selector(list(ads), KRConfig(policy="kr", budget=0.5, revive=0.25, period=2, warmup_steps=2))
    sel.start(ads)
    assert sel.after_step(1, ads) is None                      # warm-up: all live
    grow(ads, {f"m{i}": 0.1 * (i + 1) for i in range(8)})       # m7 moved most, m0 least
    ch = sel.after_step(2, ads)
    assert ch is not None and ch.revive == []                   # nothing killed yet to revive
    assert sel.live == {"m4", "m5", "m6", "m7"}                 # budget 0.5 of 8 = top 4
    assert ch.kill == ["m0", "m1", "m2", "m3"]
    assert sel.after_step(3, ads) is None                       # between periods
    grow(ads, {"m4": 0.01, "m5": 1.0, "m6": 2.0, "m7": 3.0})
    ch = sel.after_step(4, ads)
    # revive 0.25 x 4 live slots = 1 slot for the longest-killed (ties: model order -> m0)
    assert ch.revive == ["m0"] and ch.kill == ["m4"]
    assert sel.live == {"m0", "m5", "m6", "m7"}
    grow(ads, {"m0": 5.0, "m5": 0.0, "m6": 2.0, "m7": 3.0})
    ch = sel.after_step(6, ads)
    # the revived m0 moved most and stays; m5 stalled and is killed; m1 is next to revive
    assert "m0" in sel.live and "m5" in ch.kill and ch.revive == ["m1"]
    assert len(sel.live) == 4


def test_baseline_policies():
    for policy in ("all", "random", "static"):
        ads = fake_adapters(16)
        sel = Selector(list(ads), KRConfig(policy=policy, budget=0.25, period=3, warmup_steps=3, seed=1))
        sel.start(ads)
        grow(ads, {f"m{i}": 0.1 * i for i in range(16)})
        changes = [sel.after_step(t, ads) for t in range(1, 13)]
        if policy == "all":
            assert all(c is None for c in changes) and len(sel.live) == 16
        elif policy == "static":
            assert [i + 1 for i, c in enumerate(changes) if c] == [3]   # chosen once after warm-up
            assert sel.live == {"m12", "m13", "m14", "m15"}
        else:
            assert len(sel.live) == 4
            assert all(changes[t - 1] is None for t in (1, 2, 4, 5, 7, 8, 10, 11))


def test_static_without_warmup_still_selects():
    ads = fake_adapters(8)
    sel = Selector(list(ads), KRConfig(policy="static", budget=0.25, period=2, warmup_steps=0))
    sel.start(ads)
    grow(ads, {f"m{i}": 0.1 * i for i in range(8)})
    changes = [sel.after_step(t, ads) for t in range(1, 7)]
    assert sum(c is not None for c in changes) == 1 and sel.live == {"m6", "m7"}


def test_bad_kr_config():
    for kw in ({"policy": "magic"}, {"budget": 0.0}, {"budget": 1.5}, {"revive": 1.0}, {"period": 0}):
        with pytest.raises(ValueError):
            KRConfig(**kw)


def test_bad_park_requests(servers):
    channel = grpc.insecure_channel(servers["llama"])
    stub = pb_grpc.DLoRAStub(channel)
    sid = stub.OpenSession(pb.OpenSessionRequest()).session_id
    name = "model.layers.0.self_attn.k_proj"   # in 32, out 16

    def park(a, b, n=name, scale=1.0):
        return pb.ParkRequest(session_id=sid, park=[pb.ParkedAdapter(name=n, lora_A=codec.encode(a),
                                                                     lora_B=codec.encode(b), scale=scale)])
    cases = {
        "not a module of this session": park(torch.zeros(2, 32), torch.zeros(16, 2), n="model.layers.0.mlp.up_proj"),
        "lora_A": park(torch.zeros(2, 31), torch.zeros(16, 2)),
        "shape": park(torch.zeros(2, 32), torch.zeros(16, 3)),
        "NaN": park(torch.zeros(2, 32), torch.full((16, 2), float("nan"))),
        "scale": park(torch.zeros(2, 32), torch.zeros(16, 2), scale=float("inf")),
        "not modules of this session": pb.ParkRequest(session_id=sid, unpark=["model.layers.0.mlp.up_proj"]),
    }
    try:
        for needle, req in cases.items():
            with pytest.raises(grpc.RpcError) as info:
                stub.ParkAdapters(req)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in info.value.details(), needle
        with pytest.raises(grpc.RpcError) as info:
            stub.ParkAdapters(pb.ParkRequest(session_id="x" * 32))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        ok = stub.ParkAdapters(park(torch.zeros(2, 32), torch.zeros(16, 2)))
        assert ok.parked == 1 and ok.live == 5 and ok.live_sites == 2
    finally:
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
        channel.close()


def test_train_with_kr_logs_live_sets(servers, jsonl, tmp_path):
    out = tmp_path / "kr"
    res = cli("edge_client", "train", "--server", servers["llama"], "--data", str(jsonl), "--steps", "8",
              "--batch-size", "4", "--eval-limit", "4", "--policy", "kr", "--budget", "0.34", "--revive", "0.5",
              "--period", "2", "--warmup-steps", "2", "--unit", "module", "--eval-every", "4", "--out", str(out),
              "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "step 8/8: loss" in res.stderr  # without a bar, a log line every 10 steps and at the end
    log = json.loads((out / "run.json").read_text())
    assert [e["step"] for e in log["evals"]] == [0, 4, 8]
    assert log["evals"][-1]["accuracy"] == log["summary"]["after"]["accuracy"]
    hist, lives = log["history"], log["live_sets"]
    assert [e["step"] for e in lives] == [0, 2, 4, 6, 8]
    assert all(len(e["live"]) == 2 for e in lives[1:])          # round(0.34 x 6 modules) = 2
    assert hist[0]["live_modules"] == 6 and hist[3]["live_modules"] == 2
    assert hist[3]["bytes_sent"] < hist[0]["bytes_sent"]
    assert hist[3]["adapter_flops"] < hist[0]["adapter_flops"]
    assert any(e["revived"] for e in lives[2:])
    rep = cli("edge_client", "report", str(out), timeout=120)
    assert rep.returncode == 0, rep.stderr
    for name in ("loss.png", "bytes.png", "live.png", "accuracy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert cli("edge_client", "report", str(tmp_path), timeout=120).returncode == 2


def test_site_units_kill_whole_sites():
    ads = fake_adapters(6)
    units = {"s0": ["m0", "m1", "m2"], "s1": ["m3", "m4", "m5"]}
    sel = Selector(list(ads), KRConfig(policy="kr", budget=0.5, revive=0.0, period=1, warmup_steps=1), units)
    sel.start(ads)
    grow(ads, {"m0": 0.1, "m1": 0.1, "m2": 0.1, "m3": 0.5, "m4": 0.0, "m5": 0.0})  # s0 moved 0.3, s1 0.5
    ch = sel.after_step(1, ads)
    assert ch.kill == ["m0", "m1", "m2"] and sel.live == {"m3", "m4", "m5"}


def test_budget_is_a_cap():
    assert Selector([f"m{i}" for i in range(90)], KRConfig(policy="kr")).budget_count == 11   # 11.25
    assert Selector([f"m{i}" for i in range(30)], KRConfig(policy="kr")).budget_count == 3    # 3.75
    assert Selector(["a", "b"], KRConfig(policy="kr", budget=0.1)).budget_count == 1
