"""What a curious cloud learns from what really crosses the wire: messages recorded by a real server, attacked."""
from __future__ import annotations

import pytest
import torch

from cloud_server import launch, recorder
from common import tensor_codec as codec
from common.wire import dlora_pb2 as pb
from edge_client.objective import encode
from helpers import EXAMPLES, connect


def nearest_tokens(hidden: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The attack on embedding outputs: each position's nearest row of the public embedding table (L2)."""
    return torch.cdist(hidden.reshape(-1, hidden.shape[-1]), table).argmin(dim=1).reshape(hidden.shape[:-1])


@pytest.fixture(scope="module")
def recorded_step(model_dirs, tmp_path_factory):
    """One DLoRA training step of the test examples, recorded by the server that ran it."""
    root = tmp_path_factory.mktemp("record")
    with launch.start(["--model", str(model_dirs["llama"]), "--record-dir", str(root / "wire")],
                      root / "server.log", timeout=300) as server:
        edge = connect(server.address, root / "cache")
        try:
            batch = edge.batch()
            edge.step(1, batch)
        finally:
            edge.session.close()
    return root / "wire", batch, edge.tokenizer


def test_every_call_is_recorded(recorded_step):
    wire, _, _ = recorded_step
    for method in ("OpenSession", "GetEdgeAssets", "TrainStep", "CloseSession"):
        assert recorder.calls(wire, method), method
    kinds = [pb.EdgeMessage.FromString(m).WhichOneof("kind") for m in recorder.read(recorder.calls(wire, "TrainStep")[0])]
    assert kinds[0] == "start" and {"site_outputs", "final_grad", "site_grad_input"} <= set(kinds)


def test_nearest_neighbour_recovers_the_input_but_no_label(recorded_step, model_dirs):
    """At edge_layers 0 the first activations are embedding rows: the attack reads the text
    back (so this harness can fail), but the label, never sent, is not among them."""
    from transformers import AutoModelForCausalLM

    wire, batch, tokenizer = recorded_step
    table = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).get_input_embeddings().weight.detach()
    first = pb.EdgeMessage.FromString(next(recorder.read(recorder.calls(wire, "TrainStep")[0]))).start
    hidden = codec.decode(first.hidden, name="hidden")
    mask = codec.decode(first.attention_mask, name="mask")
    got = nearest_tokens(hidden, table)
    assert torch.equal(mask, batch.attention_mask)
    assert float((got == batch.input_ids)[mask].float().mean()) == 1.0  # every token of the input comes back
    for row, ex in enumerate(EXAMPLES):
        prompt, completion = encode(tokenizer, ex.prompt, ex.completion, 64)
        assert got[row][mask[row]].tolist() == prompt + completion[:-1], f"row {row}: more than the prompt was sent"


def test_recording_stops_at_its_limit(tmp_path, caplog):
    rec = recorder.MessageRecorder(tmp_path / "wire", limit_bytes=100)
    msg = pb.CloseSessionRequest(session_id="x" * 40)  # 42 bytes, 46 with its length
    call = rec.call("CloseSession")
    for _ in range(3):
        call.add(msg)
    kept = list(recorder.read(recorder.calls(tmp_path / "wire", "CloseSession")[0]))
    assert kept == [msg.SerializeToString()] * 2  # the third would pass 100 bytes
    assert "message recording stopped" in caplog.text
