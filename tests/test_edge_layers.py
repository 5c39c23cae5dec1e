"""DLoRA with --edge-layers K: the first K blocks and their adapters run on the edge, and a step
still equals the in-process step (the master test), batched or alone."""
from __future__ import annotations

import grpc
import pytest
import torch

from bench.tiny_models import save_tiny
from cloud_server import launch, recorder
from common import tensor_codec as codec
from common.lora import LoRAAdapter, inject
from common.wire import dlora_pb2 as pb
from common.wire import dlora_pb2_grpc as pb_grpc
from edge_client.errors import CloudError
from edge_client.objective import make_batch
from edge_client.session import CloudSession
from edge_client.trainer import EdgeTrainer, TrainConfig

from helpers import EXAMPLES, concurrently, reference_loss, rel_err, train_alongside

TOL = 1e-5
LAYERS = {"llama": 4, "gpt2": 3}


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """Tiny models with room for 1 and 2 edge layers, served with a batching window
    long enough that concurrent test steps meet, and a recording of every edge message."""
    root = tmp_path_factory.mktemp("deep")
    procs, dirs = {}, {}
    try:
        for kind, layers in LAYERS.items():
            dirs[kind] = save_tiny(kind, root / kind, seed=1, layers=layers)
            procs[kind] = launch.start(["--model", str(dirs[kind]), "--device", "cpu", "--batch-window-ms", "3000",
                                        "--record-dir", str(root / f"{kind}-wire")], root / f"{kind}.log",
                                       timeout=300)
        yield {kind: (p.address, dirs[kind], root / f"{kind}-wire") for kind, p in procs.items()}
    finally:
        for p in procs.values():
            p.stop()


def _trainer(address: str, tmp_path, edge_layers: int, **kw) -> tuple[CloudSession, EdgeTrainer]:
    settings = {"r": 4, "lora_alpha": 8.0, "lr": 1e-2, "seed": 3} | kw
    cfg = TrainConfig(server=address, edge_layers=edge_layers, cache=tmp_path / "cache", progress=False, **settings)
    session = CloudSession(address, edge_layers=edge_layers)
    trainer = EdgeTrainer(cfg, session)
    trainer.label_ids = None  # the language-model loss, as Hugging Face computes it
    return session, trainer


def _reference(model_dir, trainer: EdgeTrainer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    ref = {n: LoRAAdapter.from_weights(a.lora_A, a.lora_B, a.scale) for n, a in trainer.adapters.items()}
    inject(model, ref)
    opt = torch.optim.AdamW([p for a in ref.values() for p in a.parameters()], lr=trainer.cfg.lr, weight_decay=0.0)
    return model, ref, opt


@pytest.mark.parametrize("edge_layers", [1, 2])
def test_training_with_edge_layers_equals_in_process(kind, edge_layers, deep, tmp_path):
    """4 AdamW steps with blocks [0, K) on the edge: every loss, then every adapter, within 1e-5."""
    address, model_dir, _ = deep[kind]
    session, trainer = _trainer(address, tmp_path, edge_layers)
    with session:
        local = set(trainer.adapters) - set(trainer.remote)
        layer = {m.name: s.layer for s in session.sites for m in s.modules}
        assert local and all(layer[n] < edge_layers for n in local)
        assert trainer.remote and all(layer[n] >= edge_layers for n in trainer.remote)
        remote_sites = sum(s.layer >= edge_layers for s in session.sites)
        model, ref, opt = _reference(model_dir, trainer)
        for stats in train_alongside(trainer, model, opt, TOL):
            # Sites of the edge's blocks never cross the wire.
            assert stats.sites == remote_sites and stats.block_flops > 0
        for name, ad in trainer.adapters.items():
            for w in ("lora_A", "lora_B"):
                got, want = getattr(ad, w).detach(), getattr(ref[name], w).detach()
                assert rel_err(got, want) <= TOL, f"{name}.{w} after training: {rel_err(got, want):.2e}"
            assert ad.lora_B.abs().sum() > 0, f"{name} never trained"  # B starts at zero

        # Evaluation (forward only) sees the same model.
        batch = make_batch(trainer.tokenizer, EXAMPLES, 64)
        with torch.no_grad():
            logits = trainer.edge.logits(trainer.hidden(batch.input_ids, batch.attention_mask))
            expect = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
        mask = batch.attention_mask
        assert rel_err(logits[mask], expect[mask]) <= TOL


def test_the_cloud_receives_the_edge_blocks_output(deep, tmp_path):
    """What the recording holds: the output of block K - 1 (not the embedding), and no site of blocks < K."""
    address, _, wire = deep["llama"]
    session, trainer = _trainer(address, tmp_path, 2)
    with session:
        batch = make_batch(trainer.tokenizer, EXAMPLES, 64)
        with torch.no_grad():
            sent = trainer.first_hidden(batch.input_ids, batch.attention_mask)
            embedded = trainer.edge.embed(batch.input_ids)
        trainer.train_step(batch)
        sid = session.session_id
    calls = [c for c in recorder.calls(wire, "TrainStep")
             if pb.EdgeMessage.FromString(next(recorder.read(c))).start.session_id == sid]
    assert len(calls) == 1
    messages = [pb.EdgeMessage.FromString(m) for m in recorder.read(calls[0])]
    hidden = codec.decode(messages[0].start.hidden, name="hidden")
    assert rel_err(hidden, sent) <= 1e-6 and rel_err(hidden, embedded) > 0.1
    sites = {m.site_outputs.site for m in messages if m.WhichOneof("kind") == "site_outputs"}
    layer = {s.index: s.layer for s in session.sites}
    assert sites and min(layer[i] for i in sites) == 2


def test_concurrent_edges_with_the_same_edge_layers_share_a_batch(deep, tmp_path):
    """Two K = 1 edges batch together and each is exact; a K = 0 edge stepping at the same time
    starts at another block, so it runs in its own batch, exact too."""
    address, model_dir, _ = deep["llama"]
    sessions, trainers = zip(*[_trainer(address, tmp_path / str(i), k, seed=i)
                               for i, k in enumerate((1, 1, 0))])
    try:
        batches = [make_batch(t.tokenizer, [EXAMPLES[i], EXAMPLES[(i + 1) % 4]], 64) for i, t in enumerate(trainers)]
        refs = [_reference(model_dir, t) for t in trainers]  # before the step changes the adapters
        results = concurrently([lambda t=t, b=b: t.train_step(b) for t, b in zip(trainers, batches)])
        for trainer, batch, (model, ref, _), (loss, _, _) in zip(trainers, batches, refs, results):
            want = reference_loss(model, batch)
            want.backward()
            assert abs(loss - want.item()) <= TOL * abs(want.item())
            # B starts at zero, so this first step's gradient is on B (A's is zero on both sides).
            for name, ad in trainer.adapters.items():
                got, exp = ad.lora_B.grad, ref[name].lora_B.grad
                assert exp.norm() > 0 and rel_err(got, exp) <= TOL, f"{name}.lora_B"
        assert [r[1].batch_sessions for r in results] == [2, 2, 1]
    finally:
        for s in sessions:
            s.close()


def test_edge_layers_are_checked_and_edge_modules_cannot_be_parked(deep, tmp_path):
    address, _, _ = deep["llama"]
    with pytest.raises(CloudError, match="edge_layers must be in 0..3"):
        CloudSession(address, edge_layers=4)
    stub = pb_grpc.DLoRAStub(grpc.insecure_channel(address))
    with pytest.raises(grpc.RpcError) as err:
        stub.OpenSession(pb.OpenSessionRequest(mode=pb.SPLITLORA, edge_layers=1, split=pb.SplitConfig(
            cut_layer=1, clients=1, rank=4, alpha=8, lr=1e-2)), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "DLoRA option" in err.value.details()
    session, trainer = _trainer(address, tmp_path, 1)
    with session:
        front = next(n for n in trainer.adapters if n not in trainer.remote)
        with pytest.raises(CloudError, match="run on the edge"):
            session.park({front: trainer.adapters[front]}, [])
        back = next(iter(trainer.remote))
        session.park({back: trainer.remote[back]}, [])  # a module of the cloud's blocks parks as always
        with pytest.raises(CloudError, match="generation runs every block on the cloud"):
            session.generate(trainer.first_hidden(*_ids(trainer)).detach(), _ids(trainer)[1], {},
                             lambda h: None)


def _ids(trainer: EdgeTrainer):
    batch = make_batch(trainer.tokenizer, EXAMPLES[:1], 64)
    return batch.input_ids, batch.attention_mask
