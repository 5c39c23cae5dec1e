"""The command lines a user runs: `edge_client train` end to end, errors and --help."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from helpers import cli


def test_train_end_to_end(servers, jsonl, tmp_path):
    out = tmp_path / "run"
    res = cli("edge_client", "train", "--server", servers["llama"], "--data", str(jsonl), "--steps", "3",
              "--batch-size", "4", "--eval-limit", "8", "--rank", "2", "--out", str(out), "--no-progress",
              "--name", "cli-test")
    assert res.returncode == 0, res.stderr
    assert "held-out accuracy: before" in res.stdout
    assert "wire per step: sent" in res.stdout
    log = json.loads((out / "run.json").read_text())
    s = log["summary"]
    assert s["steps"] == 3 and len(log["history"]) == 3
    assert 0.0 <= s["before"]["accuracy"] <= 1.0 and s["after"]["examples"] == 8
    assert s["bytes_sent_per_step"] > 0 and s["bytes_received_per_step"] > 0
    # sent per step is the start message + site outputs + grads: at least hidden + all q/k/v outputs
    assert all(h["site_exchanges"] == 2 for h in log["history"])
    weights = load_file(out / "adapter_model.safetensors")
    a = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = weights["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    assert a.shape == (2, 32) and b.shape == (16, 2)
    assert b.abs().sum() > 0  # trained: B starts at zero
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and sorted(cfg["target_modules"]) == ["k_proj", "q_proj", "v_proj"]


def test_train_with_every_privacy_option(servers, jsonl, tmp_path):
    """--edge-layers, --token-epsilon and --label-epsilon together, end to end: the run says
    what the cloud can still recover, trains the edge's block adapters too, and records the settings."""
    out = tmp_path / "run"
    res = cli("edge_client", "train", "--server", servers["llama"], "--data", str(jsonl), "--steps", "2",
              "--batch-size", "4", "--eval-limit", "4", "--rank", "2", "--out", str(out), "--no-progress",
              "--edge-layers", "1", "--token-epsilon", "50", "--label-epsilon", "2")
    assert res.returncode == 0, res.stderr
    assert "privacy: the cloud serving the model can read back" in res.stderr
    assert "the output of block 0 of the tokens --token-epsilon 50 released" in res.stderr
    log = json.loads((out / "run.json").read_text())
    assert log["summary"]["edge_layers"] == 1 and log["config"]["token_epsilon"] == 50.0
    assert all(h["site_exchanges"] == 1 and h["block_flops"] > 0 for h in log["history"])  # block 1's site only
    weights = load_file(out / "adapter_model.safetensors")
    assert weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].abs().sum() > 0
    bad = cli("edge_client", "train", "--server", servers["llama"], "--edge-layers", "1", "--mode", "splitlora")
    assert bad.returncode == 2 and "--edge-layers is a DLoRA option" in bad.stderr


def test_prompt_completion_data(servers, tmp_path):
    path = tmp_path / "gen.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"count {i}:", "completion": f" {i + 1}"}) for i in range(20)))
    res = cli("edge_client", "train", "--server", servers["gpt2"], "--data", str(path), "--steps", "2",
              "--batch-size", "4", "--out", str(tmp_path / "run"), "--no-progress", "--eval-new-tokens", "6")
    assert res.returncode == 0, res.stderr
    assert "held-out loss: before" in res.stdout and "held-out rouge_l: before" in res.stdout
    after = json.loads((tmp_path / "run" / "run.json").read_text())["summary"]["after"]
    assert 0.0 <= after["rouge_l"] <= 1.0 and after["examples"] == 4


def test_multiple_choice_data(servers, tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Is {i} even?", "choices": ["yes", "no", "maybe"],
                                          "answer": i % 2}) for i in range(20)))
    out = tmp_path / "run"
    res = cli("edge_client", "train", "--server", servers["llama"], "--data", str(path), "--steps", "2",
              "--batch-size", "4", "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "held-out accuracy: before" in res.stdout
    after = json.loads((out / "run.json").read_text())["summary"]["after"]
    assert after["examples"] == 4 and 0.0 <= after["accuracy"] <= 1.0


def test_clear_errors(servers, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "label": "a"}\n{oops\n')
    res = cli("edge_client", "train", "--server", servers["llama"], "--data", str(bad), "--no-progress")
    assert res.returncode == 2 and "bad.jsonl:2: not valid JSON" in res.stderr
    res = cli("edge_client", "train", "--steps", "0")
    assert res.returncode == 2 and "--steps must be at least 1" in res.stderr
    res = cli("cloud_server", "--model", str(tmp_path / "nowhere"), timeout=120)
    assert res.returncode == 2 and "not a Hugging Face model directory" in res.stderr


def test_unreachable_server(jsonl):
    res = cli("edge_client", "train", "--server", "127.0.0.1:9", "--data", str(jsonl), "--no-progress")
    assert res.returncode == 2 and "no cloud_server answers at 127.0.0.1:9" in res.stderr


def test_help():
    for args in (["cloud_server", "--help"], ["edge_client", "--help"], ["edge_client", "train", "--help"]):
        res = cli(*args, timeout=60)
        assert res.returncode == 0 and "usage:" in res.stdout
    assert "--wire-dtype" in cli("edge_client", "train", "--help", timeout=60).stdout


def test_run_log_never_holds_secrets():
    from edge_client.session import Credentials
    from edge_client.trainer import TrainConfig, public_config

    secret = "s3cret-token-0123456789"
    cfg = TrainConfig.of(credentials=Credentials(token=secret, ca=b"CA PEM", cert=b"CERT", key=b"PRIVATE KEY"))
    text = json.dumps(public_config(cfg))
    assert secret not in text and "PRIVATE KEY" not in text
    assert public_config(cfg)["credentials"] == {"token": "<set>", "tls": True, "client_certificate": True,
                                                 "server_name": None, "attestation_policy": None}


def test_network_presets_are_defaults_that_flags_override():
    """`--network wan` sets the wire and KR defaults bench-wire recommends; a flag given explicitly
    still wins, in any order; the Python API gets the same from TrainConfig.for_network."""
    from edge_client.cli import parse_args
    from edge_client.trainer import NETWORKS, TrainConfig

    lan = parse_args(["train"]).config
    assert (lan.network, lan.remote.wire_dtype, lan.remote.factorised, lan.kr.policy) == ("lan", "fp32", True, "all")
    wan = parse_args(["train", "--network", "wan"]).config
    assert wan.network == "wan" and wan.remote.wire_dtype == NETWORKS["wan"]["wire_dtype"] != "fp32"
    assert wan.kr.policy == NETWORKS["wan"]["policy"] == "kr"
    assert wan.remote.micro_batches == NETWORKS["wan"]["micro_batches"] == 4 and lan.remote.micro_batches == 1
    mixed = parse_args(["train", "--wire-dtype", "bf16", "--network=wan", "--policy", "random"]).config
    assert (mixed.remote.wire_dtype, mixed.kr.policy) == ("bf16", "random")
    api = TrainConfig.for_network("wan", steps=5)
    assert (api.remote.wire_dtype, api.kr.policy, api.steps) == (wan.remote.wire_dtype, "kr", 5)
    with pytest.raises(ValueError, match="unknown network 'moon'"):
        TrainConfig.for_network("moon")
    res = cli("edge_client", "train", "--network", "moon", timeout=60)
    assert res.returncode == 2 and "invalid choice: 'moon'" in res.stderr
