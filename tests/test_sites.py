"""Sites are found by measuring which linears share an input."""
from __future__ import annotations

import torch

from cloud_server.served_model import ServedModel


def test_llama_groups_qkv_per_layer(model_dirs):
    served = ServedModel(str(model_dirs["llama"]))
    sites = served.sites(["q_proj", "k_proj", "v_proj"])
    assert [s.layer for s in sites] == [0, 1]
    assert [m.name.rsplit(".", 1)[1] for m in sites[0].modules] == ["q_proj", "k_proj", "v_proj"]
    assert [(m.in_features, m.out_features) for m in sites[0].modules] == [(32, 32), (32, 16), (32, 16)]
    # gate and up share the post-attention input; o_proj and down_proj stand alone
    groups = [[n.rsplit(".", 1)[1] for n in g] for g in served.groups[:4]]
    assert groups == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    assert served.default_targets == ["q_proj", "k_proj", "v_proj"]


def test_gpt2_conv1d_sites(model_dirs):
    served = ServedModel(str(model_dirs["gpt2"]))
    assert served.default_targets == ["c_attn"]
    sites = served.sites(["c_attn"])
    assert len(sites) == 2 and sites[0].modules[0].out_features == 96


def test_taps_are_transparent_outside_a_step(model_dirs):
    from transformers import AutoModelForCausalLM

    served = ServedModel(str(model_dirs["llama"]))
    ref = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.float32).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    emb = ref.get_input_embeddings()(ids)
    with torch.no_grad():
        got = served.inner(inputs_embeds=emb, use_cache=False).last_hidden_state
    assert got.shape == (1, 4, 32)
    assert torch.allclose(ref.model.norm(got), ref.model(inputs_embeds=emb).last_hidden_state, atol=1e-6)
