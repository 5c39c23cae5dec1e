"""Generation: parked adapters, sampling, a bad next embedding, the server's log. That the cloud's KV cache gives
the tokens and logits of re-running the whole model is test_equivalence.py."""
from __future__ import annotations

import re
import time

import grpc
import pytest
import torch

from common import tensor_codec as codec
from common.wire import dlora_pb2 as pb
from common.wire import dlora_pb2_grpc as pb_grpc
from edge_client.generation import GenerateConfig, choose, generate

from helpers import connect, reference_greedy, reference_model


def test_generation_with_parked_adapters(servers, model_dirs, cache):
    """Kill and Revive's parked adapters apply during generation too."""
    edge = connect(servers["llama"], cache)
    try:
        names = sorted(edge.adapters)
        edge.session.park({n: edge.adapters[n] for n in names[::2]}, [])
        live = {n: a for n, a in edge.adapters.items() if n not in edge.session.parked}
        prompt = edge.tokenizer("shares fell")["input_ids"]
        result = generate(edge.session, edge.edge, edge.tokenizer, live, prompt,
                          GenerateConfig(max_new_tokens=6, stop_at_eos=False))
        model, _ = reference_model(model_dirs["llama"], edge.adapters)
        assert result.token_ids == reference_greedy(model, prompt, 6)[0]
    finally:
        edge.session.close()


def test_sampling_is_seeded_and_respects_top_p():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    cfg = GenerateConfig(temperature=1.0, top_p=0.5, seed=0)
    draws = {int(choose(logits, cfg, torch.Generator().manual_seed(s))) for s in range(30)}
    assert draws == {1}  # the top token alone holds half the mass
    wide = {int(choose(logits, GenerateConfig(temperature=1.0), torch.Generator().manual_seed(s))) for s in range(60)}
    assert {1, 2} <= wide
    assert int(choose(logits, GenerateConfig(), torch.Generator())) == 1


def _raw_generate(address: str, messages: list[pb.EdgeMessage]):
    channel = grpc.insecure_channel(address)
    try:
        return list(pb_grpc.DLoRAStub(channel).Generate(iter(messages), timeout=30))
    finally:
        channel.close()


def test_bad_next_embedding_is_refused(servers, cache):
    edge = connect(servers["llama"], cache)
    try:
        # Park everything: the cloud then needs nothing from the edge but the tokens.
        edge.session.park(dict(edge.adapters), [])
        h = edge.session.model.hidden_size
        start = pb.EdgeMessage(start=pb.StepStart(session_id=edge.session.session_id,
                                                  hidden=codec.encode(torch.randn(1, 3, h)),
                                                  attention_mask=codec.encode(torch.ones(1, 3, dtype=torch.bool))))
        wrong = pb.EdgeMessage(next_embedding=pb.NextEmbedding(hidden=codec.encode(torch.randn(1, 2, h))))
        with pytest.raises(grpc.RpcError) as err:
            _raw_generate(servers["llama"], [start, wrong])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "next embedding" in err.value.details()
        # The session still serves a correct generation afterwards.
        ok = _raw_generate(servers["llama"], [start])
        assert [m.WhichOneof("kind") for m in ok] == ["final_hidden", "end"]
        assert list(ok[0].final_hidden.hidden.shape) == [1, 1, h]
    finally:
        edge.session.close()


def test_server_logs_sessions_and_throughput(model_dirs, tmp_path, cache):
    """The server's log says, in plain words, who connected and how much work it did."""
    from cloud_server import launch

    log = tmp_path / "server.log"
    with launch.start(["--model", str(model_dirs["llama"]), "--device", "cpu", "--stats-every", "1"], log) as server:
        edge = connect(server.address, cache)
        try:
            batch = edge.batch()
            edge.step(1, batch)
            generate(edge.session, edge.edge, edge.tokenizer, edge.adapters, [5, 6, 7],
                     GenerateConfig(max_new_tokens=3, stop_at_eos=False))
            time.sleep(2.5)
        finally:
            edge.session.close()
    text = log.read_text()
    assert "opened by 'edge'" in text
    assert "generation of 3 passes (a 3-position prompt" in text
    # The work may straddle two report windows on a loaded machine: add the windows up.
    windows = re.findall(r"last \d+ s: (\d+) training steps, (\d+) forwards, (\d+) generations, \d+ tokens "
                         r"\(\d+ tokens/s\)", text)
    assert windows and [sum(int(w[i]) for w in windows) for i in range(3)] == [1, 0, 1], windows
    assert re.search(r"of 'edge' closed by the edge: 1 steps, 1 forwards, \d+ tokens", text)
