"""Test helpers: an edge set up against a server, and the in-process reference model."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from common.lora import LoRAAdapter, LoRAConfig, adapters_state, inject, load_adapters_state
from edge_client.data import Example
from edge_client.objective import Batch, completion_loss, make_batch
from edge_client.remote_model import DLoRAModelForCausalLM, RemoteConfig
from edge_client.session import CloudSession, StepStats

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
    session = CloudSession(address, targets=targets, credentials=credentials, retry=retry, wire=remote.wire_format(),
                           timeout=remote.timeout, edge_layers=remote.edge_layers)
    try:
        model = DLoRAModelForCausalLM(session, session.fetch_assets(cache), LoRAConfig(r=4, lora_alpha=8.0), remote)
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


def check_step_exact(edge: Edge, model_dir: Path, batch: Batch, step_id: int = 1, tol: float = 1e-5) -> dict[str, float]:
    """One distributed training step against the same step in one process (the master test):
    the loss and every A/B gradient within `tol`, relative. Returns the worst errors."""
    loss = edge.step(step_id, batch)
    model, ref = reference_model(model_dir, edge.adapters)
    ref_loss = reference_loss(model, batch)
    ref_loss.backward()
    worst = {"loss": abs(loss - ref_loss.item()) / abs(ref_loss.item())}
    assert worst["loss"] <= tol, f"loss {loss} against {ref_loss.item()} in one process"
    worst["gradients"] = check_grads(edge.adapters, ref, tol)
    return worst


def check_grads(adapters: dict[str, LoRAAdapter], ref: dict[str, LoRAAdapter], tol: float, what: str = "") -> float:
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
    from edge_client.session import SplitOptions
    from edge_client.trainer import EdgeTrainer, TrainConfig

    cfg = TrainConfig(server=address, mode="splitlora", cut_layer=1, aggregate_every=aggregate_every,
                      clients=clients, federation=federation, r=4, lora_alpha=8.0, lr=1e-2, steps=steps, seed=0,
                      cache=cache, progress=False)
    split = SplitOptions(cfg.cut_layer, federation, clients, cfg.r, cfg.lora_alpha, cfg.lr)
    trainer = EdgeTrainer(cfg, CloudSession(address, split=split, retry=retry))
    trainer.train_examples, trainer.label_ids = 4 + seed, None   # FedAvg weights differ; the LM loss
    picks = [[(seed + i) % 4, (seed + i + 1) % 4] for i in range(steps)]
    return trainer, [make_batch(trainer.tokenizer, [EXAMPLES[j] for j in p], 64) for p in picks]


def split_state(trainer) -> dict[str, torch.Tensor]:
    """Everything a SplitLoRA run trained: client-side and server-side A and B, by name."""
    out = {f"{n}.{w}": getattr(a, w).detach().clone() for n, a in trainer.adapters.items() for w in ("lora_A", "lora_B")}
    server, _, updates = trainer.session.server_adapters()
    out |= {f"{n}.{w}": t for n, ab in server.items() for w, t in zip(("lora_A", "lora_B"), ab)}
    out["updates"] = torch.tensor(float(updates))
    return out


def check_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert rel_err(got[k], want[k]) <= tol, f"{k}: relative error {rel_err(got[k], want[k]):.2e}"
