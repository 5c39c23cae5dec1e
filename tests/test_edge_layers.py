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
from edge_client.private_front import PrivateFrontConfig
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
    cfg = TrainConfig.of(server=address, edge_layers=edge_layers, cache=tmp_path / "cache", progress=False, **settings)
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


def _front_step(address, tmp_path, weight: float):
    """One real training step with the private front's term at `weight` (no inverter update, fixed draws):
    the loss and every adapter's gradient."""
    front = PrivateFrontConfig(front_privacy=weight, front_inverter_steps=0, front_negatives=64)
    session, trainer = _trainer(address, tmp_path / str(weight), 1,
                                **({"private_front": front} if weight else {}))
    with session:
        batch = make_batch(trainer.tokenizer, EXAMPLES, 64)
        loss, _, _ = trainer.train_step(batch)
        # B starts at zero, so a first step's gradient is all on B.
        return loss, {n: a.lora_B.grad.clone() for n, a in trainer.adapters.items()}, trainer


def test_the_private_front_term_trains_the_front_alone_and_in_proportion(deep, tmp_path):
    """The privacy term rides on the front's output: the task's loss and the cloud-side adapters' gradients are
    those of the plain step, and the front adapters' gradient grows by exactly the weight times the term's."""
    address, _, _ = deep["llama"]
    runs = {w: _front_step(address, tmp_path, w) for w in (0.0, 0.5, 1.0)}
    trainer = runs[1.0][2]
    front = [n for n in trainer.adapters if n not in trainer.remote]
    assert runs[0.5][0] == pytest.approx(runs[0.0][0], rel=TOL) == runs[1.0][0]
    for name in trainer.remote:
        assert rel_err(runs[1.0][1][name], runs[0.0][1][name]) <= TOL, name
    for name in front:
        g0, g5, g1 = (runs[w][1][name] for w in (0.0, 0.5, 1.0))
        assert (g1 - g0).norm() > 0, f"{name}: the term did not reach the front"
        assert rel_err(g1 - g0, 2 * (g5 - g0)) <= 1e-4, name


def test_the_front_warm_up_sends_nothing_and_moves_only_the_front(deep, tmp_path):
    address, _, wire = deep["llama"]
    front = PrivateFrontConfig(front_privacy=1.0, front_warmup_steps=3)
    session, trainer = _trainer(address, tmp_path, 1, private_front=front)
    with session:
        before = {n: a.lora_B.detach().clone() for n, a in trainer.adapters.items()}
        calls = len(recorder.calls(wire, "TrainStep"))
        history = trainer.model.warm_up_front([e.prompt for e in EXAMPLES] * 2, lr=1e-2, max_length=64,
                                              batch_size=4)
        assert len(history) == 3 and len(recorder.calls(wire, "TrainStep")) == calls
        moved = {n for n, a in trainer.adapters.items() if not torch.equal(a.lora_B, before[n])}
        assert moved == set(trainer.adapters) - set(trainer.remote)


def test_a_private_front_is_refused_where_it_would_be_sent(deep, tmp_path):
    from edge_client.remote_model import SplitLoRAModelForCausalLM

    address, _, _ = deep["llama"]
    front = PrivateFrontConfig(front_privacy=1.0)
    with pytest.raises(ValueError, match="FedAvg sends the front's adapters"):
        SplitLoRAModelForCausalLM.connect(address, cut_layer=1, federation="pf-refused", cache=tmp_path,
                                          private_front=front)
