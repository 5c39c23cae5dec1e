"""`make bench-privacy`: what a curious cloud recovers from what really crosses the wire.

A cloud_server on the embedded SmolLM2-135M records every message edges send
(`--record-dir`). An edge trains on BBC News with each variant's settings.
Then the cloud's attacks run on the recording alone, with only what the cloud
holds: the public model. The edge's batches (true tokens and labels) are kept
to score the attacks, never to run them.

Attacks:
- **Tokens by nearest neighbour.** Each position of the first activations
  (StepStart.hidden) is matched against the embedding table, by L2 and by
  cosine.
- **Labels from the input.** Is the label among the recovered input tokens,
  where a sequence's completion would sit (its last real position)?
- **Labels from the gradient.** The final-hidden gradient (FinalGrad) is zero
  except at the loss positions, so it marks them. At each one, it is a
  combination of LM-head rows seen through the final norm. The attack divides
  out the norm's weight and then either solves least squares over the
  task's label tokens (a cloud that knows the label names), or takes the
  most negative score over the whole vocabulary (one that does not).

Label differential privacy (--label-epsilon) is measured against the true
labels, next to its guarantee: the keep probability of randomised response,
which bounds any attacker's chance of naming a label.

Not yet here (see the README's privacy section): learned inverters, DLoRA
--edge-layers, SplitLoRA cuts, token-level differential privacy, and the
accuracy each option costs.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from cloud_server import launch, recorder
from cloud_server.model_store import ensure_default_model
from common import tensor_codec as codec
from common.wire import dlora_pb2 as pb
from edge_client import label_privacy
from edge_client.objective import Batch, make_batch
from edge_client.session import CloudSession
from edge_client.trainer import EdgeTrainer, TrainConfig, batches, load_splits

VARIANTS = {
    # The defaults: label-restricted loss (BBC's labels are one token each), fp32 on the wire.
    "default": {},
    # The language-model loss: a softmax over the whole vocabulary.
    "lm-objective": {"objective": "lm"},
    # Half the bytes on the wire: does rounding hide anything?
    "bf16-wire": {"wire_dtype": "bf16"},
    # Label differential privacy: the edge trains on labels released by randomised response.
    "label-dp-eps1": {"label_epsilon": 1.0},
    "label-dp-eps2": {"label_epsilon": 2.0},
}


@dataclass
class Public:
    """What the cloud holds of the model: embedding table, LM head and final norm weight."""

    embedding: torch.Tensor   # [V, H]
    head: torch.Tensor        # [V, H]
    norm_weight: torch.Tensor  # [H]

    @classmethod
    def load(cls) -> "Public":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ensure_default_model(), dtype=torch.float32)
        return cls(model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach(),
                   model.model.norm.weight.detach())


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


def attack_step(messages: list[pb.EdgeMessage], public: Public, label_tokens: torch.Tensor, truth: Batch,
                tally: Tally) -> None:
    """Every attack on one recorded training step, scored against the edge's batch."""
    start = messages[0].start
    hidden = codec.decode(start.hidden, name="hidden", finite=False).float()
    mask = codec.decode(start.attention_mask, name="mask")
    flat = hidden[mask]
    want = truth.input_ids[mask]
    for how in ("l2", "cosine"):
        got = nearest(flat, public.embedding, cosine=how == "cosine")
        tally.add(f"tokens_nn_{how}", int((got == want).sum()), len(want))
    # The label as an input token: where a completion's last token would sit.
    recovered = torch.zeros_like(truth.input_ids)
    recovered[mask] = nearest(flat, public.embedding, cosine=False)
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
    for i, (r, p) in enumerate(where):
        if (r, p) in truth_at:
            tally.add("label_grad_known_set", int(by_known[i] == truth_at[(r, p)]), 1)
            tally.add("label_grad_full_vocab", int(by_vocab[i] == truth_at[(r, p)]), 1)


def run_variant(name: str, settings: dict, args, public: Public) -> dict:
    wire = args.out / name / "wire"
    # ~190 MB a step edge -> cloud on SmolLM2 at batch 8 x 128: room for every recorded step.
    limit = str(400 * args.steps)
    with launch.start(["--model", "smollm2-135m", "--record-dir", str(wire), "--record-limit-mb", limit,
                       "--threads", str(args.threads)], args.out / f"{name}.server.log") as server:
        cfg = replace(TrainConfig(server=server.address, cache=args.cache, progress=False, seed=args.seed,
                                  out=args.out / name), **settings)
        train, _, _ = load_splits(cfg)
        # What the edge trains on: the true labels, or those released by randomised response.
        released = train if cfg.label_epsilon is None else label_privacy.privatise(train, cfg.label_epsilon, cfg.seed)
        with CloudSession(server.address, wire_dtype=cfg.wire_dtype) as session:
            trainer = EdgeTrainer(cfg, session)
            objective = trainer.set_objective(released)
            # Same seed, same order: batch i of both streams holds the same examples.
            stream, true_stream = (batches(d.examples, cfg.batch_size, cfg.seed) for d in (released, train))
            truths, megabytes = [], []
            for step in range(args.steps):
                batch = make_batch(trainer.tokenizer, next(stream), cfg.max_length)
                _, stats, _ = trainer.train_step(batch)
                truths.append(make_batch(trainer.tokenizer, next(true_stream), cfg.max_length))
                megabytes.append((stats.bytes_sent + stats.bytes_received) / 1e6)
                print(f"    step {step + 1}/{args.steps}: {megabytes[-1]:.1f} MB", flush=True)
    label_tokens = torch.tensor([trainer.tokenizer(" " + lab, add_special_tokens=False).input_ids[0]
                                 for lab in train.labels])
    tally = Tally()
    calls = recorder.calls(wire, "TrainStep")
    if len(calls) != len(truths):
        raise SystemExit(f"{name}: {len(calls)} recorded steps for {len(truths)} trained (a retried step?)")
    for call, truth in zip(calls, truths):
        messages = [pb.EdgeMessage.FromString(m) for m in recorder.read(call)]
        attack_step(messages, public, label_tokens, truth, tally)
    shutil.rmtree(wire)  # gigabytes of activations computed from (public, here) data: attacked, then gone
    rates = {k: tally.rate(k) for k in sorted(tally.trials)}
    bound = (None if cfg.label_epsilon is None else
             label_privacy.keep_probability(cfg.label_epsilon, len(train.labels)))
    return {"variant": name, "settings": settings, "objective": objective, "steps": args.steps,
            "labels": train.labels, "chance": 1 / len(train.labels), "label_bound": bound,
            "rates": rates, "trials": tally.trials,
            "mb_per_step": sum(megabytes) / len(megabytes)}


def accuracy(names: list[str], args) -> dict[str, dict]:
    """Held-out accuracy after `--accuracy-steps` of `edge_client train` per variant (no recording)."""
    out = {}
    with launch.start(["--model", "smollm2-135m"], args.out / "accuracy.server.log") as server:
        for name in names:
            flags = [x for k, v in VARIANTS[name].items() for x in (f"--{k.replace('_', '-')}", str(v))]
            run_dir = args.out / f"{name}.accuracy"
            cmd = [sys.executable, "-m", "edge_client", "train", "--server", server.address, "--steps",
                   str(args.accuracy_steps), "--seed", str(args.seed), "--eval-limit", str(args.eval_limit),
                   "--no-eval-before", "--no-progress", "--out", str(run_dir), *flags]
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {args.accuracy_steps} steps for accuracy ...", flush=True)
            with open(args.out / f"{name}.accuracy.log", "w") as log:
                if subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT) != 0:
                    raise SystemExit(f"{name}: edge_client train failed; see {args.out / name}.accuracy.log")
            after = json.loads((run_dir / "run.json").read_text())["summary"]["after"]
            out[name] = after
            print(f"    accuracy {after['accuracy']:.1%} on {after['examples']} held-out articles", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="training steps recorded per variant (default: %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated from {list(VARIANTS)} (default: all)")
    p.add_argument("--accuracy-steps", type=int, default=40,
                   help="also train each variant this many steps (no recording) and report held-out accuracy; "
                        "0: skip (default: %(default)s)")
    p.add_argument("--eval-limit", type=int, default=200, help="held-out articles for accuracy (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="cloud_server torch threads (default: %(default)s)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dlora")
    p.add_argument("--out", type=Path, default=Path("bench/out/privacy"))
    args = p.parse_args()
    names = [v for v in args.variants.split(",") if v]
    if unknown := [n for n in names if n not in VARIANTS]:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    public = Public.load()
    rows = []
    for name in names:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        rows.append(run_variant(name, VARIANTS[name], args, public))
    accs = accuracy(names, args) if args.accuracy_steps else {}
    for r in rows:
        r["accuracy"] = accs.get(r["variant"])
    print(f"\nSmolLM2-135M, BBC News, {args.steps} recorded training steps per variant, batch 8 x up to 128 tokens, "
          f"seed {args.seed}; the cloud's attacks on its own recording (chance for labels: "
          f"{rows[0]['chance']:.0%})")
    print("| variant | objective | tokens by NN (L2 / cosine) | label in the input | true label from the gradient "
          "(known label set / full vocabulary) | guarantee: at most | loss positions found | MB/step | "
          f"held-out accuracy after {args.accuracy_steps} steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        x = r["rates"]
        bound = "—" if r["label_bound"] is None else f"{r['label_bound']:.1%}"
        print(f"| {r['variant']} | {r['objective']} | {x['tokens_nn_l2']:.1%} / {x['tokens_nn_cosine']:.1%} | "
              f"{x['label_in_input']:.1%} | {x['label_grad_known_set']:.1%} / {x['label_grad_full_vocab']:.1%} | "
              f"{bound} | {x['loss_positions_found']:.1%} | {r['mb_per_step']:.1f} | "
              f"{'—' if r['accuracy'] is None else format(r['accuracy']['accuracy'], '.1%')} |")
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "rows": rows}, indent=2))
    print(f"\nwritten to {args.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
