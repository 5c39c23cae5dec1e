"""`edge_client train`: fine-tune LoRA adapters on private data against a cloud_server."""
from __future__ import annotations

import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from common.atomic_write import replacing
from common.lora import LoRAConfig, adapters_state, load_adapters_state
from common.settings import from_values, setting
from edge_client import data as datasets
from edge_client import label_privacy, leakage, private_front
from edge_client.kill_revive import Change, KillRevive, KRConfig
from edge_client.objective import (
    Batch,
    classify,
    completion_loss,
    encode,
    label_loss,
    label_token_ids,
    make_batch,
    multiple_choice,
    rouge_l,
    secret_label_tokens,
)
from edge_client.remote_model import DLoRAModelForCausalLM, RemoteConfig, check_front
from edge_client.run_record import RunRecord
from edge_client.session import CloudSession, Credentials, RetryPolicy, SplitOptions, StepStats

log = logging.getLogger(__name__)

# `--network` presets: defaults for the settings that decide what a step costs on the link
# (flags given explicitly still win). 'wan' is bench-wire's recommendation, and 4 micro-batches
# bench-latency's: 40% off the step at 50 ms / 10 Mbit/s, none lost on loopback (docs/results).
NETWORKS: dict[str, dict[str, object]] = {
    "lan": {},
    "wan": {"wire_dtype": "int8", "policy": "kr", "micro_batches": 4},
}

SPLIT_GROUP = ("SplitLoRA mode: split federated fine-tuning: this device runs the embedding and the first "
               "--cut-layer blocks with its own adapters, the cloud runs the rest with server-side adapters it "
               "trains; client-side adapters are averaged (FedAvg, weighted by examples) across the federation's "
               "clients")


@dataclass
class TrainConfig:
    """`edge_client train`: the job's settings, composed with the cloud's and the adapters' (`remote`,
    `lora`: the parts the Python API takes too). Each field is declared once, with its help; the command
    line is generated from it, flat (common/settings.py), and `TrainConfig.of(...)` takes the same flat
    names in Python."""

    remote: RemoteConfig = setting(RemoteConfig, "the cloud, the wire and what this device keeps to itself")
    lora: LoRAConfig = setting(LoRAConfig, "the adapters")
    data: Path | None = setting(None, "training JSONL file, or a named offline task: " + ", ".join(datasets.TASKS)
                                + "; off: bbc, the BBC News topic set")
    test: Path | None = setting(None, "held-out JSONL file; off: hold out --test-fraction of --data")
    labels: list[str] | None = setting(None, "comma-separated label set of text/label data, when this device's "
                                             "data may lack some labels; off: the labels found in --data")
    test_fraction: float = setting(0.2, "held-out share when no --test")
    template: str | None = setting(None, "prompt template for text/label data, with {text} and {labels}; off: a "
                                         "short classification instruction")
    steps: int = setting(60, "optimizer steps")
    batch_size: int = setting(8, "examples per step")
    lr: float = setting(2e-3, "AdamW learning rate")
    max_length: int = setting(128, "tokens per example; longer prompts are cut")
    eval_every: int = setting(0, "evaluate on held-out data every N steps too, for the accuracy curve of "
                                 "'edge_client report'; 0: before and after training only")
    eval_before: bool = setting(True, "skip the held-out evaluation before training")
    eval_limit: int = setting(200, "held-out examples to evaluate, 0 for all")
    eval_batch_size: int = setting(16, "held-out examples per forward")
    eval_new_tokens: int = setting(48, "prompt/completion data: greedy tokens generated per held-out example, "
                                       "scored by ROUGE-L against its completion (up to the first line break); "
                                       "0: held-out loss only")
    # "auto": the label-restricted loss for classification data whose labels are
    # one token each, the language-model loss otherwise. "lm" or "labels" force one.
    objective: str = setting("auto", "loss: 'lm' = cross-entropy over the whole vocabulary; 'labels' = over the "
                                     "label tokens only (PET-style, C instead of V LM-head columns on the device); "
                                     "'auto' = labels for text/label data with one-token labels, else lm",
                             choices=["auto", "lm", "labels"])
    secret_labels: bool = setting(False, "train each label as a secret random vocabulary token (kept in "
                                         "OUT/secret_labels.json, never sent), so the cloud cannot name labels from "
                                         "the gradient or its own head; it can still group them (docs/privacy.md). "
                                         "Needs --objective labels or auto with one-token labels")
    network: str = setting("lan", "the link to the cloud: 'wan' presets " + " and ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in NETWORKS["wan"].items()) + " (flags given still win), what "
        "bench-wire found cheapest on slow links at no accuracy cost (docs/results); 'lan' presets nothing",
        choices=list(NETWORKS), group="wire")
    kr: KRConfig = setting(KRConfig, "Kill and Revive")
    # "dlora": the cloud runs every block, this device the adapters. "splitlora":
    # this device runs the first cut_layer blocks with its adapters, the cloud
    # the rest with server-side adapters; FedAvg every aggregate_every steps.
    mode: str = setting("dlora", "'dlora': the cloud runs every block, this device computes the adapters; "
                                 "'splitlora': see above", choices=["dlora", "splitlora"], group=SPLIT_GROUP)
    cut_layer: int = setting(4, "blocks run on this device", group=SPLIT_GROUP)
    aggregate_every: int = setting(10, "steps between FedAvg rounds, I in the paper", group=SPLIT_GROUP)
    clients: int = setting(1, "clients each FedAvg round waits for (the federation's size)", group=SPLIT_GROUP)
    federation: str = setting("default", "federation name: clients with the same name share server-side adapters "
                                         "and average together", group=SPLIT_GROUP)
    out: Path = setting(Path("runs/latest"), "directory for adapter_model.safetensors and run.json")
    progress: bool = setting(True, "no progress bars (for logs)")
    retry: RetryPolicy = setting(RetryPolicy, "retries")
    checkpoint_every: int = setting(20, "save adapters + optimizer to OUT/checkpoint.pt every N steps; 0: only at "
                                        "the end", group="connection and recovery")
    resume: bool = setting(False, "continue from OUT/checkpoint.pt", group="connection and recovery")
    credentials: Credentials = setting(Credentials, "the token and TLS files (see the connection flags)", cli=False)

    @classmethod
    def of(cls, **settings: Any) -> TrainConfig:
        """A TrainConfig from settings named as the flags are: `TrainConfig.of(server=..., r=4, steps=80,
        budget=0.25)`; a part may be given whole (`kr=KRConfig(...)`). An unknown name is a TypeError."""
        return from_values(cls, **settings)

    @classmethod
    def for_network(cls, network: str, **settings: Any) -> TrainConfig:
        """A TrainConfig with `network`'s presets (NETWORKS) under `settings`, as `--network` gives."""
        if network not in NETWORKS:
            raise ValueError(f"unknown network {network!r}; choose one of {', '.join(NETWORKS)}")
        preset: dict[str, Any] = dict(NETWORKS[network])   # flag-named values, checked as any others
        if "kr" in settings:
            preset.pop("policy", None)
        return cls.of(network=network, **(preset | settings))

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length", "eval_batch_size", "cut_layer", "aggregate_every",
                     "clients"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_limit", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"--test-fraction must be between 0 and 1, got {self.test_fraction}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.objective not in ("auto", "lm", "labels"):
            raise ValueError(f"unknown objective {self.objective!r}; choose auto, lm or labels")
        if self.mode not in ("dlora", "splitlora"):
            raise ValueError(f"unknown mode {self.mode!r}; choose dlora or splitlora")
        check_front(self.remote.private_front, self.remote.edge_layers, splitlora=self.mode == "splitlora")
        if self.mode == "splitlora":
            if self.remote.edge_layers:
                raise ValueError("--edge-layers is a DLoRA option; SplitLoRA runs --cut-layer blocks on this device")
            if self.remote.micro_batches > 1:
                raise ValueError("--micro-batches is a DLoRA option: a SplitLoRA step is one call (the "
                                 "federation's server-side update is one per step)")
            if self.kr.policy != "all":
                raise ValueError("Kill and Revive (--policy) is a DLoRA-mode feature; SplitLoRA trains every adapter")
            if self.resume:
                raise ValueError("--resume is not supported in SplitLoRA mode: the server-side adapters live on "
                                 "the cloud")


def load_splits(cfg: TrainConfig) -> tuple[datasets.Dataset, datasets.Dataset, str]:
    """The training and held-out sets: a named task's fixed split, or --data (with --test or a held-out share)."""
    if cfg.data is None or (str(cfg.data) in datasets.TASKS and not cfg.data.exists()):
        named = datasets.task("bbc" if cfg.data is None else str(cfg.data))
        if cfg.test is not None:
            raise datasets.DataError(f"the task {named.name} brings its own held-out split; drop --test")
        train_p, test_p = named.files(cfg.remote.cache)
        train = datasets.load(train_p, cfg.template or named.template)
        test = datasets.load(test_p, cfg.template or named.template, labels=train.labels)
        return train, test, named.description
    full = datasets.load(cfg.data, cfg.template, labels=cfg.labels)
    if cfg.test is not None:
        test = datasets.load(cfg.test, cfg.template, labels=full.labels or None)
        return full, test, str(cfg.data)
    tr, te = datasets.split(full.examples, cfg.test_fraction, cfg.remote.seed)
    if not te:
        raise datasets.DataError(f"{cfg.data}: too few records to hold out a test split")
    return datasets.Dataset(tr, full.labels), datasets.Dataset(te, full.labels), str(cfg.data)


class EdgeTrainer:
    """The CLI's training job on a DLoRAModelForCausalLM: data, loss, optimizer, Kill and Revive, FedAvg."""

    def __init__(self, cfg: TrainConfig, session: CloudSession) -> None:
        self.cfg = cfg
        self.session = session
        self.split = cfg.mode == "splitlora"
        self.model = DLoRAModelForCausalLM(session, session.fetch_assets(cfg.remote.cache / "edge-assets"),
                                           cfg.lora, cfg.remote)
        self.train_examples = 0           # FedAvg weight (set by run())
        self.rounds = 0
        # Killed modules get no gradient, so AdamW leaves them (and their moments) alone.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=0.0)
        # SplitLoRA trains every adapter (open_session refuses a policy there); in DLoRA
        # Kill and Revive manages the modules of the cloud's blocks only.
        self.kr = None if self.split else KillRevive(self.model, cfg.kr)
        self.label_ids: torch.Tensor | None = None
        self._said_no_rouge = False
        self.head_ids: torch.Tensor | None = None   # the head columns trained: label_ids, or their secret tokens

    # The model's parts, by the names the benches and tests use.
    tokenizer = property(lambda self: self.model.tokenizer)
    edge = property(lambda self: self.model.edge)
    front = property(lambda self: self.model.front)
    adapters = property(lambda self: self.model.adapters)
    remote = property(lambda self: self.model.remote_adapters)

    @property
    def step_id(self) -> int:
        return self.model.steps

    @property
    def live(self) -> set[str]:
        return self.kr.live if self.kr is not None else set(self.adapters)

    def set_objective(self, train: datasets.Dataset) -> str:
        """Pick the loss: label-restricted for one-token labels (unless told otherwise)."""
        want = self.cfg.objective
        if want not in ("auto", "lm", "labels"):
            raise ValueError(f"unknown objective {want!r}; choose auto, lm or labels")
        ids = label_token_ids(self.tokenizer, train.labels) if train.is_classification else None
        if want == "labels" and ids is None:
            raise ValueError("--objective labels needs classification data whose labels are one distinct token each")
        self.label_ids = ids if want in ("auto", "labels") else None
        self.head_ids = self.label_ids
        if self.cfg.secret_labels:
            if self.label_ids is None:
                raise ValueError("--secret-labels needs the label objective: classification data whose labels are "
                                 "one distinct token each, and --objective auto or labels")
            self.head_ids = self._secret_ids(train.labels)
            log.info("--secret-labels: the labels train as secret tokens (%s/secret_labels.json, never sent); the "
                     "adapters answer with those tokens, so keep that file to read their answers", self.cfg.out)
        return "labels" if self.label_ids is not None else "lm"

    def _secret_ids(self, labels: list[str]) -> torch.Tensor:
        """The secret tokens of the labels: drawn once per run directory, then read back (resume, evaluation)."""
        path = self.cfg.out / "secret_labels.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("labels") != list(labels):
                raise ValueError(f"{path} holds secret tokens for the labels {saved.get('labels')}, not {labels}; "
                                 "use another --out")
            return torch.tensor(saved["token_ids"])
        assert self.label_ids is not None
        ids = secret_label_tokens(self.tokenizer, len(labels), avoid=self.label_ids.tolist())
        with replacing(path) as tmp:
            tmp.write_text(json.dumps({"labels": list(labels), "token_ids": ids.tolist()}, indent=1))
            tmp.chmod(0o600)  # the device's secret: readable by its owner only
        return ids

    def loss(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        if self.label_ids is None:
            return completion_loss(hidden, batch, self.edge.logits)
        assert self.head_ids is not None
        heads = self.head_ids
        return label_loss(hidden, batch, self.label_ids, lambda h: self.edge.token_logits(h, heads))

    def warm_up_front(self) -> list[dict[str, float]]:
        """The private front's warm-up on public text (nothing sent), if --front-privacy asks for one."""
        cfg = self.cfg
        warmup = cfg.remote.private_front.front_warmup_steps
        if self.model.guard is None or not warmup:
            return []
        texts = private_front.public_texts(cfg.remote.cache, warmup * cfg.batch_size)
        log.info("private front: %d warm-up steps on %d public tweets before the first private step",
                 warmup, len(texts))
        return self.model.warm_up_front(texts, cfg.lr, cfg.max_length, cfg.batch_size)

    # -- one step ------------------------------------------------------------
    def train_step(self, batch: Batch) -> tuple[float, StepStats, Change | None]:
        """One step: forward through the cloud, this device's loss, backward, AdamW; then Kill and
        Revive (DLoRA) or FedAvg every aggregate_every steps (SplitLoRA)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.model.final_hidden(batch.input_ids, batch.attention_mask), batch)
        loss.backward()
        stats = self.model.last_stats
        assert stats is not None  # set by the training step's backward, which loss.backward() just ran
        b, t = batch.input_ids.shape
        if self.front is not None:
            stats.block_flops = self.front.flops(b, t, train=True)
            stats.edge_flops += 3 * sum(a.flops(b * t) for n, a in self.adapters.items() if n not in self.remote)
        if self.model.guard is not None:
            stats.block_flops += self.model.guard.last_flops
        # Head FLOPs: norm + LM head forward, and the backward to the hidden
        # state (the head is frozen, so no weight gradient): about 2x forward.
        cols = None if self.label_ids is None else len(self.label_ids)
        stats.head_flops = 2 * self.edge.head_flops(len(batch.targets), cols)
        self.optimizer.step()
        change = None
        if self.kr is not None:
            change = self.kr.step()
            if change is not None:
                stats.bytes_sent += change.bytes_sent
                stats.bytes_received += change.bytes_received
        elif self.step_id % self.cfg.aggregate_every == 0 or self.step_id == self.cfg.steps:
            self.rounds += 1
            clients, sent, received = self.model.aggregate(self.rounds, self.train_examples)
            stats.bytes_sent += sent
            stats.bytes_received += received
            log.debug("aggregation round %d: averaged with %d clients", self.rounds, clients)
        return float(loss.detach()), stats, change

    # -- evaluation ----------------------------------------------------------
    def first_hidden(self, input_ids: torch.Tensor, mask: torch.Tensor, noise_step: int | None = None) -> torch.Tensor:
        """What the cloud's first block receives (see DLoRAModelForCausalLM.first_hidden)."""
        return self.model.first_hidden(input_ids, mask, self.step_id if noise_step is None else noise_step)

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.final_hidden(input_ids, mask)

    @torch.no_grad()
    def evaluate(self, test: datasets.Dataset, desc: str) -> dict:
        exs = test.examples[: self.cfg.eval_limit] if self.cfg.eval_limit else test.examples
        bar = tqdm(total=len(exs), desc=desc, unit="ex", disable=not self.cfg.progress, leave=False)
        try:
            if test.is_multiple_choice:
                preds = multiple_choice(self.tokenizer, exs, self.hidden, self.edge.logits, self.cfg.max_length,
                                        self.cfg.eval_batch_size, bar.update)
                correct = sum(ex.choices[p] == ex.completion for p, ex in zip(preds, exs))
                return {"accuracy": correct / len(exs), "examples": len(exs)}
            if test.is_classification:
                preds = classify(self.tokenizer, [e.prompt for e in exs], test.labels, self.hidden,
                                 self.edge.logits, self.cfg.max_length, self.cfg.eval_batch_size, bar.update,
                                 token_logits=self.edge.token_logits,
                                 label_ids=self.head_ids if self.cfg.secret_labels else None)
                correct = sum(test.labels[p] == e.label for p, e in zip(preds, exs))
                return {"accuracy": correct / len(exs), "examples": len(exs)}
            total, n = 0.0, 0
            for i in range(0, len(exs), self.cfg.eval_batch_size):
                batch = make_batch(self.tokenizer, exs[i:i + self.cfg.eval_batch_size], self.cfg.max_length)
                h = self.hidden(batch.input_ids, batch.attention_mask)
                total += float(completion_loss(h, batch, self.edge.logits)) * len(batch.targets)
                n += len(batch.targets)
                bar.update(len(batch.input_ids))
            return {"loss": total / n, "examples": len(exs), **self._rouge(exs, desc)}
        finally:
            bar.close()

    def _rouge(self, exs: list[datasets.Example], desc: str) -> dict:
        """ROUGE-L F1 of greedy completions against the held-out ones, where this model generates (every
        block on the cloud: not with --edge-layers or SplitLoRA's cut)."""
        if not self.cfg.eval_new_tokens:
            return {}
        if self.front is not None:
            if not self._said_no_rouge:
                log.info("held-out ROUGE-L skipped: generation runs every block on the cloud, and this run keeps "
                         "blocks on the device; the held-out loss is reported")
                self._said_no_rouge = True
            return {}
        bar = tqdm(total=len(exs), desc=f"{desc} (generating)", unit="ex", disable=not self.cfg.progress,
                   leave=False)
        try:
            got = []
            for ex in exs:
                p, _ = encode(self.tokenizer, ex.prompt, ex.completion, self.cfg.max_length)
                ids = torch.tensor([p])
                out = self.model.generate(ids, max_new_tokens=self.cfg.eval_new_tokens)[0, len(p):]
                got.append(self.tokenizer.decode(out, skip_special_tokens=True))
                bar.update(1)
        finally:
            bar.close()
        return {"rouge_l": rouge_l([ex.completion for ex in exs], got)}

    # -- checkpoints ---------------------------------------------------------
    def fingerprint(self) -> dict:
        """What must not change across --resume for the result to equal an uninterrupted run."""
        c = self.cfg
        return {"rank": c.lora.r, "alpha": c.lora.lora_alpha, "lr": c.lr, "batch_size": c.batch_size,
                "seed": c.remote.seed,
                "max_length": c.max_length, "data": str(c.data), "template": c.template, "objective": c.objective,
                "kr": json.loads(json.dumps(asdict(c.kr))), "modules": sorted(self.adapters),
                # Only when set, so checkpoints written before the options existed still resume.
                **({"label_epsilon": c.remote.label_epsilon} if c.remote.label_epsilon is not None else {}),
                **({"edge_layers": c.remote.edge_layers} if c.remote.edge_layers else {}),
                **({"token_epsilon": c.remote.token_epsilon} if c.remote.token_epsilon is not None else {}),
                **({"private_front": asdict(c.remote.private_front)} if c.remote.private_front.enabled else {})}

    def checkpoint_state(self, extra: dict) -> dict:
        return {"version": 1, "step_id": self.step_id, "adapters": adapters_state(self.adapters),
                "model": self.session.model.name, "model_type": self.session.model.model_type,
                "mode": self.cfg.mode,
                "optimizer": self.optimizer.state_dict(),
                **({"selector": self.kr.selector.state_dict()} if self.kr is not None else {}),
                **({"guard": self.model.guard.state_dict()} if self.model.guard is not None else {}),
                "fingerprint": self.fingerprint(), **extra}

    def restore(self, state: dict) -> None:
        diff = {k: (v, state["fingerprint"].get(k)) for k, v in self.fingerprint().items()
                if state["fingerprint"].get(k) != v}
        if diff:
            detail = "; ".join(f"{k}: checkpoint {old!r}, now {new!r}" for k, (new, old) in list(diff.items())[:4])
            raise ValueError(f"--resume with different settings would not continue the same run ({detail})")
        load_adapters_state(self.adapters, state["adapters"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.model.steps = state["step_id"]
        if self.model.guard is not None:
            self.model.guard.load_state_dict(state["guard"])
        assert self.kr is not None  # --resume is refused in SplitLoRA mode, the only one without Kill and Revive
        self.kr.load_state_dict({"steps": state["step_id"], "selector": state["selector"]})

    def save(self, out: Path, meta: dict) -> Path:
        """The adapters in PEFT's layout (SplitLoRA: with the cloud's server-side ones)."""
        return self.model.save_pretrained(out)

    def edge_param_bytes(self) -> int:
        """Bytes of weights this device holds: its model parts plus the adapters."""
        held = self.front.model if self.front is not None else self.edge
        seen = {id(p): p for p in held.parameters()}  # a tied head counts once
        seen.update({id(p): p for a in self.adapters.values() for p in a.parameters()})
        return sum(p.numel() * p.element_size() for p in seen.values())


def batches(examples: list[datasets.Example], batch_size: int, seed: int):
    """Endless shuffled mini-batches, reshuffled each epoch, reproducible by seed."""
    rng = random.Random(seed)
    while True:
        order = examples[:]
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield order[i:i + batch_size]


def run(cfg: TrainConfig) -> dict:
    """The whole job: evaluate, train, evaluate, save. Returns the run summary."""
    remote = cfg.remote
    torch.manual_seed(remote.seed)
    train, test, source = load_splits(cfg)
    if remote.label_epsilon is not None:
        train = label_privacy.privatise(train, remote.label_epsilon, remote.seed)
        log.info("label privacy: epsilon %g, each training label kept with probability %.1f%% (randomised "
                 "response over %d labels); evaluation uses the true labels, on this device",
                 remote.label_epsilon, 100 * label_privacy.keep_probability(remote.label_epsilon, len(train.labels)),
                 len(train.labels))
    if len(train.examples) < cfg.batch_size:
        raise datasets.DataError(f"{len(train.examples)} training examples are fewer than --batch-size "
                                 f"{cfg.batch_size}")
    t_start = time.time()
    ckpt_path = cfg.out / "checkpoint.pt"
    resumed = None
    if cfg.resume:
        if not ckpt_path.exists():
            raise datasets.DataError(f"--resume: no checkpoint at {ckpt_path}")
        resumed = torch.load(ckpt_path, weights_only=True)  # plain data only: no pickled code runs
    with open_session(cfg) as session:
        split = session.split
        log.info("session %s on %s: model %s (%d layers), %d sites, %d adapted modules, cloud device %s",
                 session.session_id[:8], remote.server, session.model.name, session.model.num_layers,
                 len(session.sites), len(session.module_names), session.device)
        trainer = EdgeTrainer(cfg, session)
        trainer.train_examples = len(train.examples)
        if split is not None:
            log.info("SplitLoRA: blocks 0..%d on this device, %d..%d on the cloud; federation %r of %d clients, "
                     "FedAvg every %d steps", cfg.cut_layer - 1, cfg.cut_layer, session.model.num_layers - 1,
                     cfg.federation, cfg.clients, cfg.aggregate_every)
        elif remote.edge_layers:
            log.info("edge layers: blocks 0..%d and their %d adapters run on this device, the cloud runs "
                     "blocks %d..%d", remote.edge_layers - 1, len(trainer.adapters) - len(trainer.remote),
                     remote.edge_layers, session.model.num_layers - 1)
        objective = trainer.set_objective(train)
        log.info("objective: %s; selection policy: %s", objective,
                 cfg.kr.policy if cfg.kr.policy == "all" else
                 f"{cfg.kr.policy} (budget {cfg.kr.budget}, revive {cfg.kr.revive}, period {cfg.kr.period}, "
                 f"warm-up {cfg.kr.warmup_steps})")
        log.warning(leakage.notice(cfg.mode, remote.edge_layers, cfg.cut_layer, remote.label_epsilon,
                                   remote.token_epsilon, len(train.labels), cfg.secret_labels,
                                   remote.private_front.front_privacy))
        warm_up = trainer.warm_up_front() if resumed is None else []
        if resumed is not None:
            trainer.restore(resumed)
            record = RunRecord.from_checkpoint(resumed)
            log.info("resumed from %s at step %d", ckpt_path, trainer.step_id)
        else:
            record = RunRecord.start(trainer.evaluate(test, "eval before") if cfg.eval_before else None,
                                     trainer.live)
        if record.before is not None:
            log.info("before training: %s", _fmt(record.before))
        train_steps(cfg, trainer, record, train, test, ckpt_path)
        after = trainer.evaluate(test, "eval after")
        record.add_eval(record.steps, after)
        log.info("after training: %s", _fmt(after))
        summary = {
            "model": session.model.name, "server": remote.server, "data": source,
            "train_examples": len(train.examples), "test_examples": len(test.examples),
            "sites": len(session.sites), "modules": len(session.module_names),
            "objective": objective, "policy": cfg.kr.policy, "before": record.before, "after": after,
            **record.totals(),
            "total_seconds": time.time() - t_start, "reconnects": session.reconnects,
            "mode": cfg.mode, "cut_layer": cfg.cut_layer if split else 0, "edge_layers": remote.edge_layers,
            "edge_param_mb": trainer.edge_param_bytes() / 1e6, "edge_peak_rss_mb": peak_rss_mb(),
            "attested": bool(session.attestations),
        }
        attestations = list(session.attestations)
        summary["adapters"] = str(trainer.save(cfg.out, summary))
    record.write(cfg.out / "run.json", public_config(cfg), summary, attestations, warm_up)
    return summary


def train_steps(cfg: TrainConfig, trainer: EdgeTrainer, record: RunRecord, train: datasets.Dataset,
                test: datasets.Dataset, ckpt_path: Path) -> None:
    """Train from the trainer's step to cfg.steps, keeping `record`, evaluating every --eval-every steps and
    checkpointing every --checkpoint-every and at the end."""
    it = batches(train.examples, cfg.batch_size, cfg.remote.seed)
    for _ in range(trainer.step_id):  # the data order continues where the checkpoint left it
        next(it)
    bar = tqdm(range(trainer.step_id, cfg.steps), desc="train", unit="step", disable=not cfg.progress,
               initial=trainer.step_id, total=cfg.steps)
    for step in bar:
        batch = make_batch(trainer.tokenizer, next(it), cfg.max_length)
        t0 = time.perf_counter()
        loss, stats, change = trainer.train_step(batch)
        dt = time.perf_counter() - t0
        guard = trainer.model.guard
        record.add_step(loss, dt, batch, stats, len(trainer.live), guard.last if guard is not None else None)
        if change is not None:
            record.add_change(change, trainer.live)
            log.debug("step %d: killed %d, revived %d, %d live", change.step, len(change.kill),
                      len(change.revive), len(trainer.live))
        mb = (stats.bytes_sent + stats.bytes_received) / 1e6
        bar.set_postfix(loss=f"{loss:.3f}", live=len(trainer.live), MB_step=f"{mb:.1f}")
        done = step + 1
        if not cfg.progress and (done % 10 == 0 or done == cfg.steps):
            # Without a bar (logs, containers, simulations), a line every 10 steps.
            log.info("step %d/%d: loss %.4f, %.1f MB on the wire, %.2f s", done, cfg.steps, loss, mb, dt)
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            metrics = trainer.evaluate(test, f"eval at step {done}")
            record.add_eval(done, metrics)
            log.info("step %d: %s", done, _fmt(metrics))
        if done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
            save_checkpoint(ckpt_path, trainer.checkpoint_state(record.checkpoint()))
    bar.close()


def open_session(cfg: TrainConfig) -> CloudSession:
    """The session `cfg` trains in (its settings were checked when it was made)."""
    split = None
    if cfg.mode == "splitlora":
        split = SplitOptions(cfg.cut_layer, cfg.federation, cfg.clients, cfg.lora.r, cfg.lora.lora_alpha, cfg.lr)
    return CloudSession.from_config(cfg.remote, cfg.lora, credentials=cfg.credentials, retry=cfg.retry, split=split)


def public_config(cfg: TrainConfig) -> dict:
    """The run's settings for run.json, without secrets: the token and keys never reach the disk. Named as the
    flags are: the remote and lora parts' fields at the top level, as run.json has always had them."""
    doc = json.loads(json.dumps(asdict(cfg), default=str))
    doc = {k: v for k, v in doc.items() if k not in ("remote", "lora")} | doc["remote"] | doc["lora"]
    creds = cfg.credentials
    doc["credentials"] = {"token": "<set>" if creds.token else None, "tls": creds.ca is not None,
                          "client_certificate": creds.cert is not None, "server_name": creds.server_name,
                          "attestation_policy": creds.attestation.source if creds.attestation else None}
    return doc


def peak_rss_mb() -> float:
    """This process's own peak resident memory, in MB (KiB / 1024).

    VmHWM, the peak of this program's memory map. Not getrusage's ru_maxrss: Linux carries that across
    exec, so a process started by a large parent (a bench holding a whole model) reports the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # no /proc (not Linux): ru_maxrss, KiB on Linux, bytes on macOS

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def save_checkpoint(path: Path, state: dict) -> None:
    """Written whole (common/atomic_write.py): a crash mid-write never leaves a torn checkpoint."""
    with replacing(path) as tmp:
        torch.save(state, tmp)


def _fmt(metrics: dict) -> str:
    if "accuracy" in metrics:
        return f"accuracy {metrics['accuracy']:.1%} on {metrics['examples']} held-out examples"
    rouge = f", ROUGE-L {metrics['rouge_l']:.3f}" if "rouge_l" in metrics else ""
    return f"loss {metrics['loss']:.4f}{rouge} on {metrics['examples']} held-out examples"
