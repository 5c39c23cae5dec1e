"""`make bench-privacy`: what a curious cloud recovers from what really crosses the wire, and what each defence costs.

A cloud_server on the embedded SmolLM2-135M records every message edges send
(`--record-dir`). An edge trains on BBC News with each variant's settings.
Then the cloud's attacks run on the recording alone, with only what the cloud
holds: the public model. The edge's batches (true tokens and labels) are kept
to score the attacks, never to run them.

Attacks on the first activations the edge sends (StepStart.hidden: the
embedding output, or with --edge-layers K / SplitLoRA cut K the output of
block K - 1):
- **Tokens by nearest neighbour** against the embedding table, by L2 and by cosine.
- **Tokens by a learned inverter** (bench/inverters.py): a ridge map and a small
  MLP, trained by the cloud on public text (not BBC) through the same frozen
  blocks [0, K), which it has.
- **Tokens by known plaintext** (adaptive): the cloud knows the prompt
  template (so the tokens at its positions in every sequence) and the text of
  1% of the recorded sequences (at least one), pairs their activations with
  those tokens, refits its inverters (bench/inverters.fit_known_plaintext) and
  reads every other position. Scored on the positions it did not know.
- **Tokens, all earlier plaintext known** (adaptive, --front-privacy only): the
  device's own inverter, retrained at every step on that step's activations
  and true tokens, scored on each new step before it learns from it (the
  accuracy runs' mean over their steps): what a cloud that knew the text of
  every earlier batch would read.
- **Tokens with a language-model prior** (depth > 0, or --token-epsilon): each
  public inverter's top-10 candidates per position, rescored left to right by
  the public model (bench/lm_prior.py); its temperature and weight are picked on
  held-out public text, so the cloud needs no private token to tune it. Under
  --token-epsilon that text first goes through the (public) mechanism, so the
  prior learns to denoise the released tokens by their context.
- **Tokens by unpaired alignment** (adaptive, depth > 0; bench/alignment.py):
  knowing no private token, the cloud fits a front of the edge front's shape
  (the same LoRA targets, rank and scale) so that public text through it
  matches the recorded activations' distribution (MMD plus the first two
  moments), then trains its inverters on public text through that fitted
  front, with and without the language-model prior. A linear variant (CORAL:
  recorded activations whitened and recoloured to the public ones' moments)
  is reported beside it.
- **Labels from the input.** Is the label among the recovered input tokens,
  where a sequence's completion would sit (its last real position)?

Attack on the gradient the edge sends (FinalGrad, every mode):
- **Labels from the gradient.** The final-hidden gradient is zero except at the
  loss positions, so it marks them. At each one, it is a combination of
  LM-head rows seen through the final norm. The attack divides out the norm's
  weight and then either solves least squares over the task's label tokens
  (a cloud that knows the label names), or takes the most negative score over
  the whole vocabulary (one that does not).

Attacks on the labels beyond the named-label solve (bench/label_attacks.py):
- **Forward leak.** The cloud computes the final hidden state itself: the
  public norm and head at the loss position give the model's own prediction.
- **Clusters.** k-means over the loss positions' gradients, and over their
  final hidden states, of every recorded step: scored with the best mapping of
  clusters to labels (the labels up to their names), and named by majority
  vote of the public model classifying the text the cloud recovered (no
  mapping given). The public model on the recovered text alone is reported too.

Defences measured, alone and combined: --edge-layers (DLoRA), --front-privacy
(the edge blocks' adapters trained against the device's own inverter), SplitLoRA's cut,
--label-epsilon (randomised response: its keep probability bounds any
attacker), --token-epsilon (metric DP on the tokens) and --secret-labels
(each label trained as a secret random token: no public head row names it). For each variant the
same settings also train `--accuracy-steps` steps without recording, for
held-out accuracy, edge GFLOP/step and edge memory.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import alignment, inverters, label_attacks, lm_prior, report
from cloud_server import launch, recorder
from cloud_server.model_store import ensure_default_model
from common import tensor_codec as codec
from common.wire import dlora_pb2 as pb
from edge_client import label_privacy, token_privacy
from edge_client.data import TASKS
from edge_client.objective import Batch, make_batch
from edge_client.trainer import EdgeTrainer, TrainConfig, batches, load_splits, open_session

# Token privacy epsilons, per unit of embedding distance. SmolLM2's nearest embedding rows sit
# 2.0 apart (median; token_privacy.distance_scale), so these bounds are weak as guarantees go
# (e^(25 x 2) between neighbours); they are where the tokens released unchanged fall to about
# 15% (25) and 80% (50) of BBC text.
TOKEN_EPS_STRONG, TOKEN_EPS_WEAK = 25.0, 50.0

VARIANTS = {
    # The defaults: DLoRA, label-restricted loss (BBC's labels are one token each), fp32 on the wire.
    "default": {},
    # The first K blocks and their adapters on the edge.
    "edge-layers-1": {"edge_layers": 1},
    "edge-layers-2": {"edge_layers": 2},
    "edge-layers-4": {"edge_layers": 4},
    # SplitLoRA: blocks [0, cut) on the edge, the rest with server-side adapters.
    "splitlora-cut-1": {"mode": "splitlora", "cut_layer": 1},
    "splitlora-cut-2": {"mode": "splitlora", "cut_layer": 2},
    "splitlora-cut-4": {"mode": "splitlora", "cut_layer": 4},
    # Label differential privacy: the edge trains on labels released by randomised response.
    "label-dp-eps1": {"label_epsilon": 1.0},
    "label-dp-eps2": {"label_epsilon": 2.0},
    # Token privacy: every token released by metric DP before it is embedded.
    "token-dp-eps25": {"token_epsilon": TOKEN_EPS_STRONG},
    "token-dp-eps50": {"token_epsilon": TOKEN_EPS_WEAK},
    # A private label path: each label trained as a secret random token (no public head row names it).
    "secret-labels": {"secret_labels": True},
    "secret-labels-edge-layers-2": {"secret_labels": True, "edge_layers": 2},
    # A private front: the two edge blocks' adapters (never sent) trained against the device's own inverter, after
    # 20 warm-up steps on public text; 0.1 cost 3 points in a 20-step trial, 0.5 left accuracy near chance.
    "private-front-2": {"edge_layers": 2, "front_privacy": 0.1, "front_warmup_steps": 20},
    "private-front-2-strong": {"edge_layers": 2, "front_privacy": 0.5, "front_warmup_steps": 20},
    # Every defence at once.
    "combined": {"edge_layers": 2, "label_epsilon": 2.0, "token_epsilon": TOKEN_EPS_STRONG},
    # --network wan's wire: int8 activations and gradients (its Kill and Revive parks nothing during the
    # 20-step warm-up, so the recorded first steps are what --network wan sends).
    "int8-wire": {"wire_dtype": "int8"},
    # Measured in earlier runs, not by default: neither changes what leaks.
    "lm-objective": {"objective": "lm"},
    "bf16-wire": {"wire_dtype": "bf16"},
}
DEFAULT_VARIANTS = [v for v in VARIANTS if v not in ("lm-objective", "bf16-wire")]


def public_source(task: str) -> str:
    """The cloud's public text for a task: the other task's corpus, so it never trains on the private data."""
    return "bbc" if task == "tweets" else "tweets"


def depth(settings: dict) -> int:
    """The block whose input the cloud receives first: 0 (embedding), --edge-layers or the SplitLoRA cut."""
    if settings.get("mode") == "splitlora":
        return settings["cut_layer"]
    return settings.get("edge_layers", 0)


@dataclass
class Public:
    """What the cloud holds: the whole public model (embedding table, blocks, final norm, LM head)."""

    model: torch.nn.Module
    tokenizer: object
    embedding: torch.Tensor   # [V, H]
    head: torch.Tensor        # [V, H]
    norm_weight: torch.Tensor  # [H]
    inverters: dict[int, dict[str, inverters.Inverter]] = field(default_factory=dict)
    pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)   # public (X, y) per depth
    held: dict[int, tuple[torch.Tensor, torch.Tensor, list[int]]] = field(default_factory=dict)  # (X, y, lengths)

    @classmethod
    def load(cls) -> Public:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = ensure_default_model()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        model.requires_grad_(False)
        return cls(model, AutoTokenizer.from_pretrained(path), model.get_input_embeddings().weight.detach(),
                   model.get_output_embeddings().weight.detach(), model.model.norm.weight.detach())

    def learned(self, k: int, args) -> dict[str, inverters.Inverter]:
        """The cloud's inverters for activations entering block k, trained once per depth on public text."""
        if k not in self.inverters:
            source = public_source(args.task)
            print(f"[{time.strftime('%H:%M:%S')}] training inverters for block {k} on "
                  f"{inverters.PUBLIC_SOURCES[source]} ...", flush=True)
            self.inverters[k], *pairs = inverters.train_inverters_and_data(
                self.model, self.tokenizer, k, tokens=args.public_tokens, seconds=args.inverter_seconds, seed=args.seed,
                source=source, max_steps=args.inverter_steps)
            self.pairs[k] = (pairs[0], pairs[1])
        return self.inverters[k]

    def heldout(self, k: int, args) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Held-out public sequences at depth k, whole (the language-model prior picks its weight on them)."""
        if k not in self.held:
            self.held[k] = lm_prior.public_sequences(self.model, self.tokenizer, k, args.prior_texts,
                                                     public_source(args.task), seed=args.seed)
        return self.held[k]


@dataclass
class Tally:
    """Hits and trials per attack, over every recorded step of one variant."""

    hits: dict[str, int] = field(default_factory=dict)
    trials: dict[str, int] = field(default_factory=dict)

    def add(self, attack: str, hits: int, trials: int) -> None:
        self.hits[attack] = self.hits.get(attack, 0) + hits
        self.trials[attack] = self.trials.get(attack, 0) + trials

    def rate(self, attack: str) -> float:
        return self.hits.get(attack, 0) / max(self.trials.get(attack, 0), 1)


def nearest(hidden: torch.Tensor, table: torch.Tensor, cosine: bool) -> torch.Tensor:
    """Index of each row's nearest table row, in chunks (the table is [V, H])."""
    if cosine:
        hidden = torch.nn.functional.normalize(hidden, dim=-1)
        table = torch.nn.functional.normalize(table, dim=-1)
    return torch.cat([torch.cdist(chunk, table).argmin(dim=1) for chunk in hidden.split(256)])


def attack_step(messages: list[pb.EdgeMessage], replies: list[pb.CloudMessage], public: Public,
                learned: dict[str, inverters.Inverter], label_tokens: torch.Tensor, truth: Batch, tally: Tally,
                evidence: label_attacks.LabelEvidence) -> tuple[torch.Tensor, torch.Tensor]:
    """Every attack on one recorded training step, scored against the edge's (true) batch.

    Per-step rates go to `tally`; what the clustering attacks need, over all steps, to `evidence`. Returns the
    step's sent activations at real positions and their true tokens, for the attacks over all steps."""
    start = messages[0].start
    hidden = codec.decode(start.hidden, name="hidden", finite=False).float()
    mask = codec.decode(start.attention_mask, name="mask")
    flat = hidden[mask]
    want = truth.input_ids[mask]
    guesses = {f"nn_{how}": nearest(flat, public.embedding, cosine=how == "cosine") for how in ("l2", "cosine")}
    guesses |= {name: inv.predict(flat) for name, inv in learned.items()}
    for name, got in guesses.items():
        tally.add(f"tokens_{name}", int((got == want).sum()), len(want))
    # The label as an input token, where a completion's last token would sit: by the best guess here.
    best = max(guesses.values(), key=lambda got: int((got == want).sum()))
    recovered = torch.zeros_like(truth.input_ids)
    recovered[mask] = best
    last = mask.sum(dim=1) - 1
    tally.add("label_in_input", int((recovered[truth.rows, last[truth.rows]] == truth.targets).sum()),
              len(truth.targets))
    # The label through the gradient.
    grad = next(m.final_grad.grad for m in messages if m.WhichOneof("kind") == "final_grad")
    g = codec.decode(grad, name="final grad", finite=False).float()
    marked = g.norm(dim=-1) > 0
    where = marked.nonzero().tolist()
    tally.add("loss_positions_found", int(marked[truth.rows, truth.positions].sum()), len(truth.targets))
    truth_at = {(int(r), int(p)): int(t) for r, p, t in zip(truth.rows, truth.positions, truth.targets)}
    # The norm's weight divided out: dL/dh ~ (w * (W^T dL/dlogits)) / rms, up to a term along h.
    u = g[marked] / public.norm_weight.abs().clamp_min(1e-3) * public.norm_weight.sign()
    known = public.head[label_tokens]                                   # [C, H]
    coef = torch.linalg.lstsq(known.T, u.T).solution.T                  # [N, C]: dL/dlogit per label
    by_known = label_tokens[coef.argmin(dim=1)]
    scores = (u @ public.head.T) / public.head.norm(dim=1)               # [N, V]
    by_vocab = scores.argmin(dim=1)
    # The forward leak: the cloud computed the final hidden state itself; its public norm and head name the label.
    final = codec.decode(next(m.final_hidden.hidden for m in replies if m.WhichOneof("kind") == "final_hidden"),
                         name="final hidden", finite=False).float()
    at = final[marked]                                                   # [N, H], the loss positions found above
    by_forward = label_tokens[(public.model.model.norm(at) @ known.T).argmax(dim=1)]
    zero_shot = label_tokens[zero_shot_labels(public, recovered, mask, label_tokens)]   # [B]
    classes = {int(t): c for c, t in enumerate(label_tokens)}
    for i, (r, p) in enumerate(where):
        if (r, p) in truth_at:
            tally.add("label_grad_known_set", int(by_known[i] == truth_at[(r, p)]), 1)
            tally.add("label_grad_full_vocab", int(by_vocab[i] == truth_at[(r, p)]), 1)
            tally.add("label_forward", int(by_forward[i] == truth_at[(r, p)]), 1)
            if truth_at[(r, p)] in classes:
                evidence.add(u[i], at[i], classes[int(zero_shot[r])], classes[truth_at[(r, p)]])
    return flat, want


def known_positions(truths: list[Batch], sequences: int) -> list[torch.Tensor]:
    """Per recorded step, which real positions a cloud that knows the plaintext of some examples knows: the prompt
    template's tokens (the prefix and the suffix every sequence shares; the label itself is never in the input)
    in every sequence, and every token of the first `sequences` sequences."""
    rows = [ids[m].tolist() for t in truths for ids, m in zip(t.input_ids, t.attention_mask.bool())]
    prefix = inverters._shared_prefix(rows)
    suffix = inverters._shared_prefix([r[::-1] for r in rows])
    out, seen = [], 0
    for t in truths:
        mask = t.attention_mask.bool()
        known = torch.zeros_like(t.input_ids, dtype=torch.bool)
        for row, m in enumerate(mask):
            n = int(m.sum())
            pos = torch.arange(len(m))
            known[row] = (pos < prefix) | ((pos >= n - suffix) & (pos < n))
            if seen < sequences:
                known[row] = m
                seen += 1
        out.append(known[mask])
    return out


def known_plaintext(flats: list[torch.Tensor], wants: list[torch.Tensor], known: list[torch.Tensor],
                    public: Public, k: int, args, tally: Tally) -> int:
    """The cloud refits its inverters with the pairs it knows (`known_positions`) and reads the rest; returns
    how many known pairs it had."""
    X, y, kn = torch.cat(flats), torch.cat(wants), torch.cat(known)
    X_pub, y_pub = public.pairs[k]
    fitted = inverters.fit_known_plaintext(X_pub, y_pub, X[kn], y[kn], public.embedding,
                                           seconds=args.inverter_seconds, seed=args.seed,
                                           max_steps=args.inverter_steps)
    for name, inv in fitted.items():
        tally.add(f"tokens_known_plaintext_{name}", int((inv.predict(X[~kn]) == y[~kn]).sum()), int((~kn).sum()))
    return int(kn.sum())


def released_heldout(public: Public, k: int, epsilon: float, args) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Held-out public texts as a cloud simulates --token-epsilon on them (the mechanism is public): the
    activations entering block k of the released tokens, labelled with the original ones."""
    texts = inverters.public_texts(args.prior_texts, seed=args.seed, split="heldout", source=public_source(args.task))
    seqs = inverters._tokenize(public.tokenizer, texts, 128)
    table = public.model.get_input_embeddings().weight
    gen = torch.Generator().manual_seed(args.seed + 1)
    X, y = [], []
    for seq in seqs:
        ids = torch.tensor([seq])
        mask = torch.ones_like(ids)
        released = token_privacy.perturb(ids, mask, table, epsilon, gen)
        X.append(inverters.activations(public.model, released, mask, k)[0])
        y.append(ids[0])
    return torch.cat(X), torch.cat(y), [len(seq) for seq in seqs]


def lm_prior_attack(flats: list[torch.Tensor], wants: list[torch.Tensor], lengths: list[int], public: Public, k: int,
                    args, tally: Tally, token_epsilon: float | None = None) -> dict[str, dict[str, float]]:
    """Each public inverter's reading rescored by the public model over its top candidates (bench/lm_prior.py),
    its temperature and weight picked on public held-out text (put through --token-epsilon's public mechanism
    where the edge used it: the prior then denoises the released tokens by their context). Returns what was
    picked, per inverter."""
    X, y = torch.cat(flats), torch.cat(wants)
    held = public.heldout(k, args) if token_epsilon is None else released_heldout(public, k, token_epsilon, args)
    out = {}
    for name, inv in public.learned(k, args).items():
        print(f"[{time.strftime('%H:%M:%S')}] language-model prior over the {name} inverter's candidates ...",
              flush=True)
        prior, notes = lm_prior.choose(public.model, inv, *held)
        candidates, scores = inv.top(X, prior.k)
        got = lm_prior.decode(public.model, candidates, scores, lengths, prior)
        tally.add(f"tokens_lm_prior_{name}", int((got == y).sum()), len(y))
        out[name] = notes
    return out


def unpaired_alignment(flats: list[torch.Tensor], wants: list[torch.Tensor], lengths: list[int], front: dict,
                       public: Public, k: int, args, tally: Tally) -> dict[str, float]:
    """The cloud, knowing no token, fits a front of the edge's shape to the recorded activations' distribution
    and reads them through inverters trained on public text through it (bench/alignment.py); and maps them onto
    the public activations by their first two moments (CORAL); and with the language-model prior over the
    fitted front's inverters. Returns the fit's notes."""
    X, y = torch.cat(flats), torch.cat(wants)
    one = next(iter(front.values()))
    shape = alignment.FrontShape({n: (a.in_features, a.out_features) for n, a in front.items()}, one.rank, one.scale)
    print(f"[{time.strftime('%H:%M:%S')}] unpaired alignment: fitting a front of {len(front)} adapters "
          f"(rank {one.rank}) to {len(X)} recorded activations ...", flush=True)
    fitted, learned, notes = alignment.attack(public.model, public.tokenizer, shape, X, k, public_source(args.task),
                                              args.public_tokens, args.inverter_seconds, seed=args.seed,
                                              steps=args.alignment_steps, inverter_steps=args.inverter_steps)
    # The language-model prior on top, its weight picked on public text through the fitted front.
    held = lm_prior.public_sequences(fitted, public.tokenizer, k, args.prior_texts, public_source(args.task),
                                     seed=args.seed)
    del fitted
    for name, inv in learned.items():
        tally.add(f"tokens_aligned_front_{name}", int((inv.predict(X) == y).sum()), len(y))
        prior, picked = lm_prior.choose(public.model, inv, *held)
        candidates, scores = inv.top(X, prior.k)
        got = lm_prior.decode(public.model, candidates, scores, lengths, prior)
        tally.add(f"tokens_aligned_prior_{name}", int((got == y).sum()), len(y))
        notes |= {f"prior_{name}_{key}": v for key, v in picked.items()}
    for name, got in alignment.read_linear(X, public.pairs[k][0], public.learned(k, args)).items():
        tally.add(f"tokens_aligned_linear_{name}", int((got == y).sum()), len(y))
    return notes


@torch.no_grad()
def zero_shot_labels(public: Public, ids: torch.Tensor, mask: torch.Tensor, label_tokens: torch.Tensor) -> torch.Tensor:
    """The public model's own label (index into label_tokens) for each recovered sequence, at its last position."""
    hidden = public.model.model(input_ids=ids, attention_mask=mask.long(), use_cache=False).last_hidden_state
    last = mask.sum(dim=1) - 1
    return (hidden[torch.arange(len(ids)), last] @ public.head[label_tokens].T).argmax(dim=1)


def sent_outputs(msg: pb.SiteOutputs) -> list[torch.Tensor]:
    """The adapter outputs of a site as the cloud sees them: sent whole, or multiplied out from
    factors (then the cloud also holds B itself, and A up to least squares from x and A x)."""
    if not msg.factors:
        return [codec.decode(t, name="y", finite=False).double() for t in msg.outputs]
    return [codec.decode(f.down, name="down", finite=False).double() @ codec.decode(f.up, name="up").double().T
            for f in msg.factors]


def adapter_errors(call: Path, sites: list, truth: dict[str, torch.Tensor]) -> list[float]:
    """The cloud fits each live module's scale * B @ A from one recorded step: the site inputs it
    sent (least squares against the outputs the edge answered). Relative error per module."""
    sent = [pb.EdgeMessage.FromString(m) for m in recorder.read(call)]
    replies = [pb.CloudMessage.FromString(m) for m in recorder.read(recorder.replies(call))]
    inputs = {m.site_input.site: m.site_input for m in replies if m.WhichOneof("kind") == "site_input"}
    outputs = {m.site_outputs.site: m.site_outputs for m in sent if m.WhichOneof("kind") == "site_outputs"}
    mask = codec.decode(sent[0].start.attention_mask, name="mask")
    errors = []
    for site in sites:
        if site.index not in inputs:
            continue
        x = codec.decode(inputs[site.index].x, name="x", finite=False).double()[mask]
        for slot, y in zip(inputs[site.index].live, sent_outputs(outputs[site.index])):
            name = site.modules[slot].name
            y = y[mask]
            fitted = torch.linalg.lstsq(x, y).solution.T
            errors.append(float((fitted - truth[name]).norm() / truth[name].norm()))
    return errors


def run_variant(name: str, settings: dict, args, public: Public, server: launch.ServerProcess) -> dict:
    """Train `args.steps` recorded steps with `settings` against the recording server, then attack them."""
    cfg = TrainConfig.of(**({"server": server.address, "cache": args.cache, "progress": False, "seed": args.seed,
                             "out": args.out / name, "federation": f"privacy-{name}", "data": Path(args.task)}
                            | settings))
    train, _, _ = load_splits(cfg)
    # What the edge trains on: the true labels, or those released by randomised response.
    eps = cfg.remote.label_epsilon
    released = train if eps is None else label_privacy.privatise(train, eps, cfg.remote.seed)
    with open_session(cfg) as session:
        trainer = EdgeTrainer(cfg, session)
        trainer.train_examples = len(released.examples)
        objective = trainer.set_objective(released)
        trainer.warm_up_front()
        # Same seed, same order: batch i of both streams holds the same examples.
        stream, true_stream = (batches(d.examples, cfg.batch_size, cfg.remote.seed) for d in (released, train))
        truths, megabytes = [], []
        for step in range(args.steps):
            batch = make_batch(trainer.tokenizer, next(stream), cfg.max_length)
            # The adapters this step's forward uses: what the adapter attack is scored against.
            deltas = {n: (a.scale * a.lora_B @ a.lora_A).detach().double() for n, a in trainer.remote.items()}
            _, stats, _ = trainer.train_step(batch)
            truths.append(make_batch(trainer.tokenizer, next(true_stream), cfg.max_length))
            megabytes.append((stats.bytes_sent + stats.bytes_received) / 1e6)
            print(f"    step {step + 1}/{args.steps}: {megabytes[-1]:.1f} MB", flush=True)
    wire = args.out / "wire"
    calls = [c for c in recorder.calls(wire, "TrainStep")
             if pb.EdgeMessage.FromString(next(recorder.read(c))).start.session_id == session.session_id]
    label_tokens = torch.tensor([trainer.tokenizer(" " + lab, add_special_tokens=False).input_ids[0]
                                 for lab in train.labels])
    learned = public.learned(depth(settings), args)
    tally, evidence = Tally(), label_attacks.LabelEvidence()
    if len(calls) != len(truths):
        raise SystemExit(f"{name}: {len(calls)} recorded steps for {len(truths)} trained (a retried step?)")
    flats, wants = [], []
    for call, truth in zip(calls, truths):
        messages = [pb.EdgeMessage.FromString(m) for m in recorder.read(call)]
        replies = [pb.CloudMessage.FromString(m) for m in recorder.read(recorder.replies(call))]
        flat, want = attack_step(messages, replies, public, learned, label_tokens, truth, tally, evidence)
        flats.append(flat)
        wants.append(want)
    # Known plaintext: the template, and 1% of the recorded sequences (at least one).
    sequences = max(1, round(0.01 * sum(len(t.input_ids) for t in truths)))
    known = known_positions(truths, sequences)
    known_pairs = known_plaintext(flats, wants, known, public, depth(settings), args, tally)
    # The public model's prior over the public inverters' top candidates.
    lengths = [int(n) for t in truths for n in t.attention_mask.bool().sum(dim=1)]   # the recorded masks'
    # At depth 0 only where --token-epsilon released other tokens (otherwise nearest neighbour reads them all).
    eps = settings.get("token_epsilon")
    priors = (lm_prior_attack(flats, wants, lengths, public, depth(settings), args, tally, eps)
              if depth(settings) or eps is not None else {})
    # Unpaired alignment: a front of the edge front's shape fitted to the recording's distribution.
    front = {n: a for n, a in trainer.adapters.items() if n not in trainer.remote}
    aligned = {}
    if depth(settings) and front and args.alignment_steps:
        aligned = unpaired_alignment(flats, wants, lengths, front, public, depth(settings), args, tally)
    # On the last step (B is 0 before the first update, so earlier steps carry no adapter).
    errors = adapter_errors(calls[-1], session.sites, deltas) if deltas and args.steps > 1 else []
    for path in wire.glob("*"):  # gigabytes of activations computed from (public, here) data: attacked, then gone
        path.unlink()
    rates = {k: tally.rate(k) for k in sorted(tally.trials)}
    rates |= label_attacks.score(evidence, len(train.labels), seed=args.seed)
    rates["label_best"] = max(v for k, v in rates.items() if k.startswith("label_"))
    rates["tokens_learned"] = max(rates["tokens_ridge"], rates["tokens_mlp"])
    rates["tokens_nn"] = max(rates["tokens_nn_l2"], rates["tokens_nn_cosine"])
    rates["tokens_known_plaintext"] = max(rates["tokens_known_plaintext_ridge"], rates["tokens_known_plaintext_mlp"])
    if priors:
        rates["tokens_lm_prior"] = max(rates["tokens_lm_prior_ridge"], rates["tokens_lm_prior_mlp"])
    if aligned:
        rates["tokens_aligned"] = max(v for k, v in rates.items() if k.startswith("tokens_aligned_"))
    rates["tokens_best"] = max(rates["tokens_learned"], rates["tokens_nn"], rates["tokens_known_plaintext"],
                               rates.get("tokens_aligned", 0.0), rates.get("tokens_lm_prior", 0.0))
    bound = None if eps is None else label_privacy.keep_probability(eps, len(train.labels))
    return {"variant": name, "settings": settings, "depth": depth(settings), "objective": objective,
            "steps": args.steps, "labels": train.labels, "chance": 1 / len(train.labels), "label_bound": bound,
            "rates": rates, "trials": tally.trials, "mb_per_step": sum(megabytes) / len(megabytes),
            "adapter_error_median": sorted(errors)[len(errors) // 2] if errors else None,
            "adapter_error_max": max(errors) if errors else None, "adapters_attacked": len(errors),
            "known_plaintext": {"sequences": sequences, "pairs": known_pairs}, "alignment": aligned,
            "lm_prior": priors}


def _flags(settings: dict) -> list[str]:
    """Command-line flags of a variant's settings (a True bool is a plain switch)."""
    out = []
    for k, v in settings.items():
        out += [f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}", str(v)]
    return out


def _finished(run_dir: Path, settings: dict, steps: int) -> dict | None:
    """The summary of an earlier accuracy run with these settings and steps, if it finished."""
    try:
        doc = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    config = doc["config"] | doc["config"].get("private_front", {})
    same = all(str(config.get(k)) == str(v) for k, v in settings.items())
    return doc["summary"] if same and doc["summary"]["steps"] == steps else None


def accuracy(names: list[str], args) -> dict[str, dict]:
    """Per variant, `--accuracy-steps` of `edge_client train` for each accuracy seed (no recording):
    held-out accuracy (mean over seeds), edge GFLOP/step and edge memory."""
    out = {}
    with launch.start(["--model", "smollm2-135m"], args.out / "accuracy.server.log") as server:
        for name in names:
            runs = []
            for seed in args.accuracy_seeds:
                run_dir = args.out / f"{name}.accuracy.seed{seed}"
                done = _finished(run_dir, VARIANTS[name], args.accuracy_steps) if args.resume else None
                if done is not None:
                    print(f"    {name}, seed {seed}: reusing {run_dir}/run.json", flush=True)
                    runs.append(done)
                    continue
                cmd = [sys.executable, "-m", "edge_client", "train", "--server", server.address, "--steps",
                       str(args.accuracy_steps), "--seed", str(seed), "--eval-limit", str(args.eval_limit),
                       "--data", args.task,
                       "--no-eval-before", "--no-progress", "--out", str(run_dir), *_flags(VARIANTS[name])]
                if VARIANTS[name].get("mode") == "splitlora":
                    cmd += ["--federation", f"accuracy-{name}-{seed}"]
                print(f"[{time.strftime('%H:%M:%S')}] {name}, seed {seed}: {args.accuracy_steps} steps for "
                      "accuracy ...", flush=True)
                with open(args.out / f"{name}.accuracy.seed{seed}.log", "w") as log:
                    if subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT) != 0:
                        raise SystemExit(f"{name}: edge_client train failed; see {log.name}")
                summary = json.loads((run_dir / "run.json").read_text())["summary"]
                runs.append(summary)
                print(f"    accuracy {summary['after']['accuracy']:.1%} on {summary['after']['examples']} "
                      "held-out examples", flush=True)
            accs = [r["after"]["accuracy"] for r in runs]
            out[name] = {"accuracy": sum(accs) / len(accs), "per_seed": accs, "seeds": args.accuracy_seeds,
                         "examples": runs[0]["after"]["examples"],
                         "edge_gflop_per_step": runs[0]["edge_flops_per_step"] / 1e9,
                         "edge_param_mb": runs[0]["edge_param_mb"],
                         "edge_peak_rss_mb": max(r["edge_peak_rss_mb"] for r in runs),
                         "seconds_per_step": sum(r["seconds_per_step"] for r in runs) / len(runs)}
            front = [r["front_inverter_accuracy"] for r in runs if "front_inverter_accuracy" in r]
            if front:  # the device's own adversary: it knows every earlier step's plaintext
                out[name]["front_inverter_accuracy"] = sum(front) / len(front)
    return out


def table(rows: list[dict], args) -> str:
    """The Markdown table docs/privacy.md quotes."""
    chance = rows[0]["chance"]
    lines = [f"SmolLM2-135M, {TASKS[args.task].description}, {args.steps} recorded training steps per variant "
             f"(batch 8 x up to 128 tokens, seed {args.seed}); the cloud's attacks on its own recording; learned "
             f"inverters trained on {args.public_tokens} tokens of {inverters.PUBLIC_SOURCES[public_source(args.task)]}"
             f"; known plaintext: the template and 1% of the recorded sequences. Chance for labels: {chance:.0%}. "
             f"Accuracy: {args.accuracy_steps} training steps, {args.eval_limit} held-out examples, mean of seeds "
             f"{','.join(map(str, args.accuracy_seeds))}.",
             ""]
    headers = ["variant", "cloud sees", "tokens: NN (L2 / cos)", "tokens: learned (ridge / MLP)",
               "tokens: known plaintext (ridge / MLP)", "tokens: LM prior (ridge / MLP)",
               "tokens: unpaired alignment (fitted front / with LM prior / CORAL)",
               "tokens: all earlier plaintext known (device's inverter)",
               "tokens: strongest", "label in the input",
               "label from the gradient (known set / full vocab)", "label: forward (public head)",
               "label: clusters of grad / hidden (best map)", "label: clusters named by public model (grad / hidden)",
               "label: public model on recovered text", "label: strongest", "guarantee: at most",
               "adapters fitted (median error)", "held-out accuracy", "MB/step", "edge GFLOP/step", "edge weights MB",
               "edge peak RSS MB"]
    cells = []
    for r in rows:
        x, acc = r["rates"], r.get("accuracy") or {}
        sees = "embedding" if r["depth"] == 0 else f"block {r['depth'] - 1} output"
        bound = "—" if r["label_bound"] is None else f"{r['label_bound']:.1%}"
        if acc:
            cost = [f"{acc['accuracy']:.1%}", f"{r['mb_per_step']:.1f}", f"{acc['edge_gflop_per_step']:.1f}",
                    f"{acc['edge_param_mb']:.0f}", f"{acc['edge_peak_rss_mb']:.0f}"]
        else:  # accuracy runs skipped (--accuracy-steps 0)
            cost = ["—", f"{r['mb_per_step']:.1f}", "—", "—", "—"]
        fitted = "— (sent in FedAvg)" if r["adapter_error_median"] is None else f"{r['adapter_error_median']:.1e}"
        cells.append([r["variant"], sees, f"{x['tokens_nn_l2']:.1%} / {x['tokens_nn_cosine']:.1%}",
                      f"{x['tokens_ridge']:.1%} / {x['tokens_mlp']:.1%}",
                      f"{x['tokens_known_plaintext_ridge']:.1%} / {x['tokens_known_plaintext_mlp']:.1%}",
                      pair_cell(x, "tokens_lm_prior"), aligned_cell(x),
                      "—" if "front_inverter_accuracy" not in acc else f"{acc['front_inverter_accuracy']:.1%}",
                      f"{strongest_tokens(r):.1%}",
                      f"{x['label_in_input']:.1%}",
                      f"{x['label_grad_known_set']:.1%} / {x['label_grad_full_vocab']:.1%}",
                      f"{x['label_forward']:.1%}",
                      f"{x['label_cluster_grad_best_map']:.1%} / {x['label_cluster_hidden_best_map']:.1%}",
                      f"{x['label_cluster_grad_named']:.1%} / {x['label_cluster_hidden_named']:.1%}",
                      f"{x['label_zero_shot_text']:.1%}", f"{x['label_best']:.1%}", bound, fitted, *cost])
    lines.append(report.table(headers, cells))
    return "\n".join(lines) + "\n"


def pair_cell(rates: dict, key: str) -> str:
    """An attack's ridge / MLP rates, or "—" where it did not run."""
    if f"{key}_ridge" not in rates:
        return "—"
    return f"{rates[f'{key}_ridge']:.1%} / {rates[f'{key}_mlp']:.1%}"


def aligned_cell(rates: dict) -> str:
    """The unpaired-alignment attack's best reading through the fitted front and by CORAL; "—" where it did not
    run (no front: the cloud sees the embedding)."""
    if "tokens_aligned" not in rates:
        return "—"
    best = {how: max(rates.get(f"tokens_aligned_{how}_ridge", 0.0), rates.get(f"tokens_aligned_{how}_mlp", 0.0))
            for how in ("front", "prior", "linear")}
    return f"{best['front']:.1%} / {best['prior']:.1%} / {best['linear']:.1%}"


def strongest_tokens(row: dict) -> float:
    """The best any measured attack read of a variant's tokens, the device's own inverter included."""
    return max(row["rates"]["tokens_best"], (row.get("accuracy") or {}).get("front_inverter_accuracy", 0.0))


def plot(rows: list[dict], path: Path) -> Path | None:
    """Leakage against cost: token and label recovery against edge GFLOP/step and accuracy."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("accuracy")]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, xkey, xlabel in ((axes[0], "edge_gflop_per_step", "edge GFLOP per training step"),
                             (axes[1], "accuracy", "held-out accuracy")):
        for r in rows:
            x = r["accuracy"][xkey] * (100 if xkey == "accuracy" else 1)
            tok = 100 * strongest_tokens(r)
            lab = 100 * r["rates"]["label_best"]
            ax.scatter([x], [tok], marker="o", color="tab:red")
            ax.scatter([x], [lab], marker="s", color="tab:blue")
            ax.annotate(r["variant"], (x, tok), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel + (" (%)" if xkey == "accuracy" else ""))
        ax.set_ylabel("recovered by the cloud (%)")
        ax.grid(alpha=0.3)
    axes[0].scatter([], [], marker="o", color="tab:red", label="tokens (best attack)")
    axes[0].scatter([], [], marker="s", color="tab:blue", label="labels (strongest attack)")
    axes[0].legend()
    fig.suptitle("What a curious cloud recovers, against what the defence costs (SmolLM2-135M)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="training steps recorded per variant (default: %(default)s)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated from {list(VARIANTS)} (default: all but lm-objective and bf16-wire)")
    p.add_argument("--task", default="bbc", choices=list(TASKS),
                   help="the private task (the cloud's public text is the other task's corpus; default: %(default)s)")
    p.add_argument("--accuracy-steps", type=int, default=40,
                   help="also train each variant this many steps (no recording) and report held-out accuracy, "
                        "edge GFLOP/step and memory; 0: skip (default: %(default)s)")
    p.add_argument("--accuracy-seeds", default="0",
                   help="comma-separated seeds of the accuracy runs; the table gives their mean (default: %(default)s)")
    p.add_argument("--eval-limit", type=int, default=200, help="held-out examples for accuracy (default: %(default)s)")
    p.add_argument("--public-tokens", type=int, default=60000,
                   help="public-text tokens each learned inverter trains on (default: %(default)s)")
    p.add_argument("--inverter-steps", type=int, default=300,
                   help="Adam steps (batches of 512 positions) each MLP inverter trains: a step budget, so its "
                        "figures do not depend on the machine's load; 0: train for --inverter-seconds alone "
                        "(default: %(default)s)")
    p.add_argument("--inverter-seconds", type=float, default=600.0,
                   help="wall seconds each MLP inverter may train at most (default: %(default)s)")
    p.add_argument("--alignment-steps", type=int, default=300,
                   help="Adam steps of the unpaired-alignment attack's fitted front (edge layers, SplitLoRA); "
                        "0: skip it (default: %(default)s)")
    p.add_argument("--prior-texts", type=int, default=100,
                   help="held-out public texts the language-model prior picks its weight on (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the recorded runs and the inverters (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="reuse what an interrupted run in --out already measured: recorded variants (rows/) and "
                        "finished accuracy runs with the same settings")
    p.add_argument("--threads", type=int, default=1, help="cloud_server torch threads (default: %(default)s)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dlora",
                   help="model, data and edge-asset cache (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench/out/privacy"),
                   help="logs, runs and results (default: %(default)s)")
    args = p.parse_args()
    names = [v for v in args.variants.split(",") if v]
    if unknown := [n for n in names if n not in VARIANTS]:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    try:
        args.accuracy_seeds = [int(x) for x in args.accuracy_seeds.split(",") if x.strip()]
    except ValueError:
        p.error("--accuracy-seeds takes comma-separated integers, e.g. 0,1,2,3")
    args.inverter_steps = args.inverter_steps or None
    if args.steps < 1 or args.accuracy_steps < 0 or not args.accuracy_seeds:
        p.error("--steps must be at least 1, --accuracy-steps at least 0, and --accuracy-seeds name a seed")
    args.out.mkdir(parents=True, exist_ok=True)
    public = Public.load()
    rows = []
    # Request and reply messages of one step: about 2 x 190 MB on SmolLM2 at batch 8 x 128.
    limit = str(800 * args.steps * len(names))
    with launch.start(["--model", "smollm2-135m", "--record-dir", str(args.out / "wire"), "--record-limit-mb", limit,
                       "--threads", str(args.threads)], args.out / "record.server.log") as server:
        for name in names:
            saved = args.out / "rows" / f"{name}.json"
            if args.resume and saved.exists():
                row = json.loads(saved.read_text())
                if row["settings"] == VARIANTS[name] and row["steps"] == args.steps:
                    print(f"[{time.strftime('%H:%M:%S')}] {name}: reusing {saved}", flush=True)
                    rows.append(row)
                    continue
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
            rows.append(run_variant(name, VARIANTS[name], args, public, server))
            report.write_json(saved, rows[-1])  # an interrupted run keeps what it measured
    accs = accuracy(names, args) if args.accuracy_steps else {}
    for r in rows:
        r["accuracy"] = accs.get(r["variant"])
    text = table(rows, args)
    print("\n" + text)
    (args.out / "table.md").write_text(text)
    report.write_json(args.out / "results.json", {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    figure = plot(rows, args.out / "leakage.png")
    print(f"written to {args.out}/results.json, table.md" + (f" and {figure.name}" if figure else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
