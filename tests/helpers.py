"""What several test files share: edges on a server, the in-process reference, raw wire steps, the CLI, and
assertion helpers (assert_*); whole tests live in the test modules."""
from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from common import tensor_codec as codec
from common.lora import LoRAAdapter, LoRAConfig, adapters_state, inject, load_adapters_state
from common.wire import dlora_pb2 as pb
from deploy import haproxy as lb
from edge_client import data as datasets
from edge_client.data import Example
from edge_client.kill_revive import KRConfig
from edge_client.objective import Batch, completion_loss, make_batch
from edge_client.remote_model import DLoRAModelForCausalLM, RemoteConfig
from edge_client.session import CloudSession, RetryPolicy, StepStats
from edge_client.trainer import EdgeTrainer, TrainConfig, batches, open_session

EXAMPLES = [
    Example("the match ended two nil", " sport"),
    Example("shares fell sharply on monday after the report", " business"),
    Example("a new phone", " tech"),
    Example("the minister said the vote", " politics"),
]


@dataclass
class Edge:
    """An edge on the Python API's model, with random adapters (B != 0) and the completion loss."""

    model: DLoRAModelForCausalLM

    @property
    def session(self) -> CloudSession:
        return self.model.session

    @property
    def edge(self):
        return self.model.edge

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def adapters(self) -> dict[str, LoRAAdapter]:
        return self.model.adapters

    def batch(self, examples=EXAMPLES, max_length: int = 64) -> Batch:
        return make_batch(self.tokenizer, examples, max_length)

    def train(self, step_id: int, batch: Batch,
              loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[float, StepStats]:
        """One forward and backward as step `step_id` (adapter grads accumulate): (loss, the step's stats)."""
        self.model.steps = step_id - 1
        hidden = self.model.final_hidden(batch.input_ids, batch.attention_mask)
        loss = loss_fn(hidden) if loss_fn is not None else completion_loss(hidden, batch, self.edge.logits)
        loss.backward()
        return float(loss.detach()), self.model.last_stats

    def step(self, step_id: int, batch: Batch) -> float:
        return self.train(step_id, batch)[0]


def random_adapters(shapes: dict[str, tuple[int, int]], rank: int = 4, alpha: float = 8.0,
                    seed: int = 0) -> dict[str, LoRAAdapter]:
    """Adapters with B != 0, so every gradient is non-trivial."""
    torch.manual_seed(seed)
    out = {}
    for name, (fin, fout) in shapes.items():
        ad = LoRAAdapter(fin, fout, rank, alpha / rank)
        torch.nn.init.normal_(ad.lora_B, std=0.2)
        out[name] = ad
    return out


def connect(address: str, cache: Path, seed: int = 0, targets: list[str] | None = None, credentials=None,
            retry=None, **settings) -> Edge:
    """An Edge with random_adapters(seed) of rank 4, alpha 8; `settings` are RemoteConfig's."""
    remote = RemoteConfig(server=address, **settings)
    lora = LoRAConfig(r=4, lora_alpha=8.0, target_modules=targets or [])
    session = CloudSession.from_config(remote, lora, credentials=credentials, retry=retry)
    try:
        model = DLoRAModelForCausalLM(session, session.fetch_assets(cache), lora, remote)
        model.load_adapters(random_adapters(session.module_shapes(), seed=seed), "the test's adapters")
    except BaseException:
        session.close()
        raise
    return Edge(model)


def reference_model(model_dir: Path, adapters: dict[str, LoRAAdapter]):
    """The same model in one process, with copies of the same adapters."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    ref = {n: LoRAAdapter(a.in_features, a.out_features, a.rank, a.scale) for n, a in adapters.items()}
    load_adapters_state(ref, adapters_state(adapters))
    inject(model, ref)
    return model, ref


def reference_loss(model, batch: Batch) -> torch.Tensor:
    """Hugging Face's own causal-LM loss on the whole sequences, labels only on the completion tokens.

    The edge never sends a sequence's last token (its output predicts nothing);
    the reference puts it back, so the equality also proves the cut is lossless.
    """
    rows = batch.input_ids.shape[0]
    ids = torch.cat([batch.input_ids, torch.zeros(rows, 1, dtype=batch.input_ids.dtype)], dim=1)
    mask = torch.cat([batch.attention_mask, torch.zeros(rows, 1, dtype=torch.bool)], dim=1)
    ids[batch.rows, batch.positions + 1] = batch.targets
    mask[batch.rows, batch.positions + 1] = True
    labels = torch.full_like(ids, -100)
    labels[batch.rows, batch.positions + 1] = batch.targets
    return model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_step_exact(edge: Edge, model_dir: Path, batch: Batch, step_id: int = 1,
                      tol: float = 1e-5) -> dict[str, float]:
    """One distributed training step against the same step in one process (the master test):
    the loss and every A/B gradient within `tol`, relative. Returns the worst errors."""
    loss = edge.step(step_id, batch)
    model, ref = reference_model(model_dir, edge.adapters)
    ref_loss = reference_loss(model, batch)
    ref_loss.backward()
    worst = {"loss": abs(loss - ref_loss.item()) / abs(ref_loss.item())}
    assert worst["loss"] <= tol, f"loss {loss} against {ref_loss.item()} in one process"
    worst["gradients"] = assert_grads_match(edge.adapters, ref, tol)
    return worst


def assert_grads_match(adapters: dict[str, LoRAAdapter], ref: dict[str, LoRAAdapter], tol: float,
                       what: str = "") -> float:
    """Every A/B gradient within `tol` of the reference's, none of those zero; the worst error."""
    assert len(adapters) > 0
    worst = 0.0
    for name, ad in adapters.items():
        for w in ("lora_A", "lora_B"):
            got, want = getattr(ad, w).grad, getattr(ref[name], w).grad
            assert want is not None and want.norm() > 0, f"{what}{name}.{w}: reference gradient is zero"
            worst = max(worst, rel_err(got, want))
            assert rel_err(got, want) <= tol, f"{what}{name}.{w}: relative error {rel_err(got, want):.2e}"
    return worst


def train_alongside(trainer, model, opt, tol: float = 1e-5) -> list:
    """4 steps of `trainer` (an EdgeTrainer) and of the in-process `model` with its optimizer `opt`,
    on the same batches: every loss within `tol`. Returns the trainer's step stats."""
    stats = []
    for step, idx in enumerate(([0, 1], [2, 3], [1, 2], [0, 3]), 1):
        batch = make_batch(trainer.tokenizer, [EXAMPLES[i] for i in idx], 64)
        loss, step_stats, _ = trainer.train_step(batch)
        opt.zero_grad()
        want = reference_loss(model, batch)
        want.backward()
        opt.step()
        assert abs(loss - want.item()) <= tol * abs(want.item()), f"step {step}: {loss} against {want.item()}"
        stats.append(step_stats)
    return stats


def split_trainer(address: str, cache: Path, federation: str, clients: int = 1, seed: int = 0,
                  steps: int = 6, aggregate_every: int = 2, retry=None):
    """A SplitLoRA edge trainer (cut 1, rank 4) of `federation` on the tiny task, and its `steps` batches:
    seed s trains on its own examples, so members of one federation differ."""
    cfg = TrainConfig.of(server=address, mode="splitlora", cut_layer=1, aggregate_every=aggregate_every,
                         clients=clients, federation=federation, r=4, lora_alpha=8.0, lr=1e-2, steps=steps, seed=0,
                         cache=cache, progress=False, **({"retry": retry} if retry is not None else {}))
    trainer = EdgeTrainer(cfg, open_session(cfg))
    trainer.train_examples, trainer.label_ids = 4 + seed, None   # FedAvg weights differ; the LM loss
    picks = [[(seed + i) % 4, (seed + i + 1) % 4] for i in range(steps)]
    return trainer, [make_batch(trainer.tokenizer, [EXAMPLES[j] for j in p], 64) for p in picks]


def split_state(trainer) -> dict[str, torch.Tensor]:
    """Everything a SplitLoRA run trained: client-side and server-side A and B, by name."""
    out = {f"{n}.{w}": getattr(a, w).detach().clone()
           for n, a in trainer.adapters.items() for w in ("lora_A", "lora_B")}
    server, _, updates = trainer.session.server_adapters()
    out |= {f"{n}.{w}": t for n, ab in server.items() for w, t in zip(("lora_A", "lora_B"), ab)}
    out["updates"] = torch.tensor(float(updates))
    return out


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert rel_err(got[k], want[k]) <= tol, f"{k}: relative error {rel_err(got[k], want[k]):.2e}"


def reference_greedy(model, prompt_ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding without any cache: the whole sequence is re-run for every token."""
    ids = torch.tensor([prompt_ids])
    out, logits = [], []
    with torch.no_grad():
        for _ in range(n):
            last = model(input_ids=ids).logits[:, -1]
            logits.append(last[0])
            tok = int(last.argmax(-1))
            out.append(tok)
            ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    return out, logits


def kr_trainer(address: str, tmp_path: Path, policy: str = "kr", client_key: str | None = None
               ) -> tuple[EdgeTrainer, list]:
    """An edge trainer on a tiny task; KR with short periods so parking is exercised."""
    rows = [datasets.Example(f"item {i} is {'red' if i % 2 else 'blue'}", " red" if i % 2 else " blue",
                             "red" if i % 2 else "blue") for i in range(32)]
    cfg = TrainConfig.of(server=address, r=2, lr=1e-2, batch_size=4, cache=tmp_path / "cache", progress=False,
                         kr=KRConfig(policy=policy, budget=0.34, revive=0.5, period=2, warmup_steps=2),
                         retry=RetryPolicy(retries=12, backoff=0.2, max_backoff=2.0))
    session = CloudSession.from_config(cfg.remote, cfg.lora, credentials=cfg.credentials, retry=cfg.retry,
                                       client_key=client_key)
    trainer = EdgeTrainer(cfg, session)
    trainer.set_objective(datasets.Dataset(rows, ["blue", "red"]))
    it = batches(rows, 4, seed=0)
    return trainer, [make_batch(trainer.tokenizer, next(it), 64) for _ in range(10)]


def concurrently(fns) -> list:
    """Run the callables at once (a barrier lines them up); return their results or raise the first error."""
    barrier = threading.Barrier(len(fns))
    results: list = [None] * len(fns)

    def go(i, fn):
        barrier.wait()
        try:
            results[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            results[i] = exc

    threads = [threading.Thread(target=go, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


# -- raw wire: TrainStep driven message by message -----------------------------------------------------------
HIDDEN = 32  # tiny models' hidden size


def start_msg(sid: str, step_id: int = 1, b: int = 2, t: int = 5, h: int = HIDDEN, **kw) -> pb.EdgeMessage:
    hidden = kw.pop("hidden", codec.encode(torch.randn(b, t, h)))
    mask = kw.pop("mask", codec.encode(torch.ones(b, t, dtype=torch.bool)))
    return pb.EdgeMessage(start=pb.StepStart(session_id=sid, step_id=step_id, hidden=hidden, attention_mask=mask))


class RawStep:
    """Drive TrainStep by hand: send what a test wants, see what the cloud answers."""

    def __init__(self, stub, rpc: str = "TrainStep", metadata=()) -> None:
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.responses = getattr(stub, rpc)(iter(self.q.get, None), timeout=30, metadata=metadata)

    def send(self, msg: pb.EdgeMessage) -> None:
        self.q.put(msg)

    def recv(self) -> pb.CloudMessage:
        msg = next(self.responses)
        if msg.WhichOneof("kind") != "failed":
            return msg
        # A failed step says so in the stream, then ends with the same status (see pb.StepFailed).
        try:
            next(self.responses)
        except grpc.RpcError as exc:
            assert exc.code().value[0] == msg.failed.code and exc.details() == msg.failed.detail, \
                f"StepFailed {msg.failed} and the status {exc.code()} disagree"
            raise
        raise AssertionError(f"the stream went on after StepFailed {msg.failed}")

    def close(self) -> None:
        self.q.put(None)


def expect_error(fn, code: grpc.StatusCode, *words: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    assert info.value.code() == code, info.value.details()
    for w in words:
        assert w in info.value.details(), info.value.details()
    return info.value.details()


def run_raw(stub, first: pb.EdgeMessage, reply=None):
    """Send `first`; answer the first site input with reply(site_input) if given; read to the end."""
    raw = RawStep(stub)
    raw.send(first)
    try:
        msg = raw.recv()
        if reply is not None and msg.WhichOneof("kind") == "site_input":
            raw.send(reply(msg.site_input))
        while True:
            raw.recv()
    finally:
        raw.close()


# -- the command lines and HAProxy -----------------------------------------------------------------------------
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=ENV)


try:
    HAPROXY: str | None = lb.find_haproxy()
except FileNotFoundError:
    HAPROXY = None


@contextmanager
def tsm_double(root: Path, kind: str, measurement_hex: str) -> Iterator[tuple[Path, Path]]:
    """tests/tsm_double.py running for a real cloud_server --tsm-dir: (its report directory, the directory it
    writes its chain's root.pem, and for TDX collateral.json, to)."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "tsm_double.py"), "--dir",
                             str(root / "report"), "--kind", kind, "--measurement", measurement_hex, "--out",
                             str(root / "chain"), "--lifetime", "1800"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "tsm-double ready"
        yield root / "report", root / "chain"
    finally:
        proc.terminate()
        proc.wait(10)
