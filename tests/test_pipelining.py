"""Pipelined steps (--micro-batches M): the batch's parts in flight at once give the unpipelined step's loss and
adapter gradients (fp32 wire, 1e-5), with parked adapters, edge layers, other sessions batching beside it and a
step retried after the server died between forward and backward."""
from __future__ import annotations

import signal
import threading
import time

import pytest
import torch

from cloud_server import launch
from common.wire import dlora_pb2 as pb
from deploy.local import free_port
from edge_client.pipelined_step import PipelinedStep, row_bounds
from edge_client.session import RetryPolicy

from helpers import EXAMPLES, connect, reference_loss, reference_model, rel_err

TOL = 1e-5
ROWS = EXAMPLES + [EXAMPLES[0], EXAMPLES[2]]   # 6 rows: parts of 3 x 2, or uneven ones


def edge_grads(edge) -> dict[str, torch.Tensor]:
    return {f"{n}.{w}": getattr(a, w).grad for n, a in edge.adapters.items() for w in ("lora_A", "lora_B")
            if getattr(a, w).grad is not None}


def assert_exact(edge, model_dir, batch, loss: float) -> None:
    """The edge's loss and every adapter gradient it has against one in-process step (the master test)."""
    model, ref = reference_model(model_dir, edge.adapters)
    ref_loss = reference_loss(model, batch)
    ref_loss.backward()
    want = float(ref_loss.detach())
    assert abs(loss - want) <= TOL * abs(want), (loss, want)
    got = edge_grads(edge)
    assert got, "no adapter got a gradient"
    for key, g in got.items():
        name, w = key.rsplit(".", 1)
        err = rel_err(g, getattr(ref[name], w).grad)
        assert err < TOL, f"{key}: relative error {err:.2e}"


def test_row_bounds_cover_the_batch_evenly():
    assert row_bounds(6, 3) == [(0, 2), (2, 4), (4, 6)]
    assert row_bounds(4, 3) == [(0, 1), (1, 3), (3, 4)]
    assert row_bounds(2, 8) == [(0, 1), (1, 2)]          # at most one part per row
    assert row_bounds(5, 1) == [(0, 5)]


@pytest.mark.parametrize("parts,settings,park", [
    (2, {}, False),
    (3, {"factorised": False}, False),
    (4, {}, True),                        # uneven parts (6 rows in 4), Kill and Revive's parked adapters
    (2, {"edge_layers": 1}, False),       # the cut gradient comes back in parts
], ids=["2-factorised", "3-full-width", "4-parked", "2-edge-layers"])
def test_pipelined_step_equals_in_process(parts, settings, park, servers, model_dirs, cache):
    edge = connect(servers["llama"], cache, micro_batches=parts, **settings)
    try:
        if park:
            names = sorted(edge.model.remote_adapters)[::2]
            edge.model.park({n: edge.adapters[n] for n in names}, [])
        batch = edge.batch(ROWS)
        loss, stats = edge.train(1, batch)
        assert_exact(edge, model_dirs["llama"], batch, loss)
        step = edge.model._pending   # the step's streams: one per part, each a call of its own
        assert isinstance(step, PipelinedStep) and len(step.streams) == parts
        assert stats.messages == sum(s.stats.messages for s in step.streams) > 0
        if park:
            assert not set(names) & set(edge_grads(edge))   # parked: no gradient, no traffic
    finally:
        edge.session.close()


def test_beside_a_batching_neighbour_both_stay_exact(servers, model_dirs, cache):
    """A pipelined edge and a plain one stepping at once on a server that batches sessions: each its own step."""
    from helpers import concurrently

    edges = [connect(servers["llama"], cache, micro_batches=3, seed=1), connect(servers["llama"], cache, seed=2)]
    try:
        batches = [e.batch(ROWS) for e in edges]
        for _ in range(2):   # twice: the second pair meets in the batcher's window
            for e in edges:
                for a in e.adapters.values():
                    a.zero_grad(set_to_none=True)
            losses = concurrently([lambda e=e, b=b: e.train(1 + e.model.steps, b)[0] for e, b in zip(edges, batches)])
            for e, b, loss in zip(edges, batches, losses):
                assert_exact(e, model_dirs["llama"], b, loss)
    finally:
        for e in edges:
            e.session.close()


def test_a_step_retried_after_the_server_died_replays_every_part(model_dirs, tmp_path):
    """The server dies between forward and backward and comes back: the backward's retry replays the step's
    forward in all its parts on a new session, and the gradients are still the in-process step's."""
    port = free_port()
    args = ["--model", str(model_dirs["llama"]), "--port", str(port)]
    server = launch.start(args, tmp_path / "a.log", timeout=300)
    restarted: dict[str, launch.ServerProcess] = {}
    edge = connect(f"127.0.0.1:{port}", tmp_path / "cache", micro_batches=3,
                   retry=RetryPolicy(retries=20, backoff=0.2, max_backoff=1.0))
    try:
        batch = edge.batch(ROWS)

        def kill_then_loss(hidden):
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait()

            def restart():
                time.sleep(1)
                restarted["server"] = launch.start(args, tmp_path / "b.log", timeout=300)
            threading.Thread(target=restart, daemon=True).start()
            from edge_client.objective import completion_loss
            return completion_loss(hidden, batch, edge.edge.logits)

        loss, _ = edge.train(1, batch, kill_then_loss)
        assert edge.session.reconnects >= 1
        assert_exact(edge, model_dirs["llama"], batch, loss)
        edge.session.close()
    finally:
        for s in (server, restarted.get("server")):
            if s:
                s.stop()


def test_bad_part_numbers_and_pipelined_splitlora_are_refused(servers, cache):
    import grpc

    from common import tensor_codec as codec
    from common.wire import dlora_pb2_grpc as pb_grpc

    edge = connect(servers["llama"], cache)
    try:
        stub = pb_grpc.DLoRAStub(edge.session.channel)
        for part, parts in ((2, 2), (0, 99), (-1, 2)):
            msg = pb.EdgeMessage()
            msg.start.session_id, msg.start.step_id = edge.session.session_id, 7
            codec.encode_into(msg.start.hidden, torch.zeros(1, 2, edge.edge.embedding.weight.shape[1]))
            codec.encode_into(msg.start.attention_mask, torch.ones(1, 2, dtype=torch.bool))
            msg.start.micro_batch, msg.start.micro_batches = part, parts
            with pytest.raises(grpc.RpcError) as err:
                list(stub.TrainStep(iter([msg]), metadata=edge.session.metadata(), timeout=30))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "micro-batch" in err.value.details()
    finally:
        edge.session.close()
    with pytest.raises(ValueError, match="--micro-batches is a DLoRA option"):
        from edge_client.trainer import TrainConfig
        TrainConfig.of(mode="splitlora", cut_layer=1, micro_batches=2)
    with pytest.raises(ValueError, match="--micro-batches must be 1 to 16"):
        connect(servers["llama"], cache, micro_batches=17)


def test_a_failed_part_raises_the_cause_not_the_echoes():
    """When parts fail together (a replica that lost the session answers NOT_FOUND while a proxy resets the other
    streams, or a part is refused its finish because it was abandoned), the step raises the NOT_FOUND, which
    makes the retry layer open a new session at once (found by `make soak`)."""
    import grpc

    from edge_client.errors import CloudError
    from edge_client.pipelined_step import PipelinedStep
    from edge_client.step_stream import StepState

    class Part:
        """What PipelinedStep reads of a StepStream: its state, and abandon()."""

        step_id = 3

        def __init__(self) -> None:
            self.state = StepState.PAUSED

        def abandon(self, reason: str) -> None:
            if not self.state.ended:
                self.state = StepState.ABANDONED

    def fail(part: Part, code: grpc.StatusCode):
        def call():
            part.state = StepState.FAILED
            raise CloudError(f"cloud refused the call ({code.name})", code)
        return call

    def refused(part: Part):
        def call():
            part.abandon("the test's")
            raise RuntimeError("step 3 is abandoned; only an opened training step can finish")
        return call

    parts = [Part(), Part(), Part()]
    step = PipelinedStep(parts, [(0, 1), (1, 2), (2, 3)])  # type: ignore[arg-type]
    with pytest.raises(CloudError) as got:
        step._all([fail(parts[0], grpc.StatusCode.CANCELLED), refused(parts[1]),
                   fail(parts[2], grpc.StatusCode.NOT_FOUND)])
    assert got.value.code == grpc.StatusCode.NOT_FOUND
    parts = [Part(), Part()]
    step = PipelinedStep(parts, [(0, 1), (1, 2)])  # type: ignore[arg-type]
    with pytest.raises(CloudError) as only:
        step._all([fail(parts[0], grpc.StatusCode.CANCELLED), lambda: None])
    assert only.value.code == grpc.StatusCode.CANCELLED and parts[1].state is StepState.ABANDONED
