"""PEFT interop: `edge_client export` output loads in Hugging Face PEFT with the distributed model's logits."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from edge_client import peft_format

from helpers import connect, rel_err

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "edge_client", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


@pytest.fixture
def trained_run(kind, servers, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"count {i}:", "completion": f" {i + 1}"}) for i in range(16)))
    out = tmp_path / "run"
    res = cli("train", "--server", servers[kind], "--data", str(data), "--steps", "3", "--batch-size", "4",
              "--rank", "4", "--lr", "0.05", "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    return out


def test_export_loads_in_peft_with_equal_logits(kind, servers, model_dirs, trained_run, tmp_path, cache):
    import peft
    from transformers import AutoModelForCausalLM

    out = tmp_path / "export"
    res = cli("export", str(trained_run), "--out", str(out), "--base-model", str(model_dirs[kind]))
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dirs[kind])

    base = AutoModelForCausalLM.from_pretrained(model_dirs[kind], dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, out).eval()
    adapters, _ = peft_format.load(out)
    assert any(float(a.lora_B.abs().sum()) > 0 for a in adapters.values()), "training left every B at zero"

    edge = connect(servers[kind], cache)
    try:
        batch = edge.batch()
        with torch.no_grad():
            h, _ = edge.session.forward(edge.edge.embed(batch.input_ids), batch.attention_mask, adapters)
            ours = edge.edge.logits(h)
            theirs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
        mask = batch.attention_mask
        assert rel_err(ours[mask], theirs[mask]) <= 1e-5
        with model.disable_adapter(), torch.no_grad():
            without = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
        assert rel_err(without[mask], theirs[mask]) > 1e-4, "the adapters changed nothing: the test cannot fail"
    finally:
        edge.session.close()


def test_export_from_checkpoint_equals_final(trained_run, tmp_path):
    a = tmp_path / "final"
    b = tmp_path / "ckpt"
    assert cli("export", str(trained_run), "--out", str(a)).returncode == 0
    assert cli("export", str(trained_run), "--out", str(b), "--from-checkpoint").returncode == 0
    fa, _ = peft_format.load(a)
    fb, _ = peft_format.load(b)
    assert fa.keys() == fb.keys()
    for n in fa:
        assert torch.equal(fa[n].lora_B, fb[n].lora_B) and torch.equal(fa[n].lora_A, fb[n].lora_A)


@pytest.mark.parametrize("kind", ["llama"])
def test_generate_cli_with_trained_adapters(kind, servers, trained_run, tmp_path):
    res = cli("generate", "--server", servers[kind], "--adapters", str(trained_run), "--prompt", "count 3:",
              "--max-new-tokens", "5", "--cache", str(tmp_path / "c"))
    assert res.returncode == 0, res.stderr
    assert "tokens in" in res.stderr and "site exchanges" in res.stderr
    base = cli("generate", "--server", servers[kind], "--prompt", "count 3:", "--max-new-tokens", "5",
               "--cache", str(tmp_path / "c"))
    assert base.returncode == 0, base.stderr
    assert "0 site exchanges" in base.stderr  # no adapters: nothing to exchange


def test_bad_adapter_dirs_get_clear_errors(servers, tmp_path):
    res = cli("export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "neither adapter_model.safetensors nor checkpoint.pt" in res.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": true}')
    (bad / "adapter_model.safetensors").write_bytes(b"")
    res = cli("generate", "--server", servers["llama"], "--adapters", str(bad), "--prompt", "hi")
    assert res.returncode == 2 and "use_dora is not supported" in res.stderr
