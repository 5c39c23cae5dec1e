"""`make bench-tasks`: every mode on several models and tasks, in one table.

Per model x task x variant x seed, one `edge_client train` process (so its peak
memory is its own) against one cloud_server per model. Variants:
- zero-shot: the untrained model, held-out score before the first run's training;
- dlora: DLoRA with every module live (exact: it equals in-process LoRA training to
  1e-5, tests/test_exactness.py);
- dlora-kr: Kill and Revive at its defaults (its warm-up steps count in its bytes);
- wan: `--network wan` (int8 wire and Kill and Revive);
- splitlora-k2: SplitLoRA, cut after block 2.
Columns: held-out score (accuracy; ROUGE-L F1 for aclsum, which SplitLoRA cannot score: generation
runs every block on the cloud), mean over seeds and each seed, MB/step, edge GFLOP/step,
edge peak RSS, s/step; and for Kill and Revive, what it saves against all-live.
Finished runs are reused (their run.json holds the same settings), so an interrupted
bench continues where it stopped, and adding a seed trains only that seed.
Writes OUT/results.json, OUT/table.md and OUT/loss-<model>-<task>.png (seed 0's loss curves).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import report
from cloud_server import launch
from edge_client import data

VARIANTS: dict[str, list[str]] = {
    "dlora": [],
    "dlora-kr": ["--policy", "kr"],
    "wan": ["--network", "wan"],
    "splitlora-k2": ["--mode", "splitlora", "--cut-layer", "2"],
}
ALL_LIVE = "dlora"
MAX_LENGTH = 128   # edge_client train's default


def run_dir(out: Path, model: str, task: str, variant: str, seed: int) -> Path:
    return out / model / task / variant / f"seed{seed}"


def command(args, address: str, task: str, variant: str, seed: int, out: Path, evaluate_before: bool) -> list[str]:
    """The `edge_client train` command of one run."""
    cmd = [sys.executable, "-m", "edge_client", "train", "--server", address, "--data", task,
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--eval-limit", str(args.eval_limit),
           "--seed", str(seed), "--out", str(out), "--name", f"bench-tasks-{variant}", "--no-progress",
           *VARIANTS[variant]]
    if variant.startswith("splitlora"):   # a federation of its own: no other run's clients to average with
        cmd += ["--federation", f"bench-tasks-{task}-{variant}-{seed}-{time.time_ns()}"]
    if args.max_length != MAX_LENGTH:   # only when changed, so runs recorded before the flag are still reused
        cmd += ["--max-length", str(args.max_length)]
    if not evaluate_before:
        cmd.append("--no-eval-before")
    return cmd


def finished(out: Path, cmd: list[str]) -> dict | None:
    """The run.json of a finished run of exactly this command's settings, else None."""
    path, saved = out / "run.json", out / "command.json"
    if not path.exists() or not saved.exists():
        return None
    return json.loads(path.read_text()) if _settings(json.loads(saved.read_text())) == _settings(cmd) else None


def _settings(cmd: list[str]) -> list[str]:
    """A run's command without the interpreter, the cloud's address and the federation's name, which change
    from run to run while the result does not."""
    volatile = {"--server", "--federation"}
    return [x for i, x in enumerate(cmd) if i and x not in volatile and cmd[i - 1] not in volatile]


def train(args, address: str, model: str, task: str, variant: str, seed: int, evaluate_before: bool) -> dict:
    out = run_dir(args.out, model, task, variant, seed)
    cmd = command(args, address, task, variant, seed, out, evaluate_before)
    if args.resume and (doc := finished(out, cmd)) is not None \
            and (not evaluate_before or doc["summary"]["before"] is not None):
        print(f"    reusing {out}", flush=True)
        return doc
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"{model} {task} {variant} seed {seed} failed (exit {rc}); see {out / 'train.log'}")
    report.write_json(out / "command.json", cmd)
    return json.loads((out / "run.json").read_text())


def score(metrics: dict) -> float | None:
    """A held-out evaluation's score: accuracy (classification, multiple choice) or ROUGE-L (generation; None
    where the run could not generate: blocks on the device)."""
    return metrics.get("accuracy", metrics.get("rouge_l"))


def row(model: str, task: str, variant: str, docs: dict[int, dict]) -> dict:
    """One table row: the mean over seeds, and each seed's score."""
    s = {seed: d["summary"] for seed, d in docs.items()}
    mean = lambda key: statistics.mean(x[key] for x in s.values())   # noqa: E731
    scores = {seed: score(x["after"]) for seed, x in s.items()}
    known = [v for v in scores.values() if v is not None]
    return {"model": model, "task": task, "variant": variant,
            "score": statistics.mean(known) if known else None, "seeds": scores,
            "examples": next(iter(s.values()))["after"]["examples"],
            "mb_step": (mean("bytes_sent_per_step") + mean("bytes_received_per_step")) / 1e6,
            "gflop_step": mean("edge_flops_per_step") / 1e9, "edge_peak_rss_mb": mean("edge_peak_rss_mb"),
            "seconds_per_step": mean("seconds_per_step"), "total_seconds": sum(x["total_seconds"] for x in s.values())}


def zero_shot(model: str, task: str, doc: dict) -> dict:
    before = doc["summary"]["before"]
    return {"model": model, "task": task, "variant": "zero-shot", "score": score(before), "seeds": {},
            "examples": before["examples"]}


def render(rows: list[dict], args, wall: float) -> str:
    trained = sum(r.get("total_seconds", 0.0) for r in rows)
    lines = [f"{args.steps} steps, batch {args.batch_size}, seeds {','.join(map(str, args.seeds))}, held-out "
             f"examples up to {args.eval_limit or 'all'} per task; the runs took {trained / 60:.0f} min in all (this "
             f"invocation {wall / 60:.0f} min, reusing what was done).", ""]
    cells = []
    for r in rows:
        if r["variant"] == "zero-shot":
            cells.append([r["model"], r["task"], r["variant"], shown(r["score"]), "—", "—", "—", "—", "—", "—"])
            continue
        ref = next((x for x in rows if x["model"] == r["model"] and x["task"] == r["task"]
                    and x["variant"] == ALL_LIVE), None)
        versus = "—" if ref is None or r["variant"] == ALL_LIVE else (
            f"{points(r['score'], ref['score'])}, {less(r['mb_step'], ref['mb_step'], 'bytes')}, "
            f"{less(r['gflop_step'], ref['gflop_step'], 'edge compute')}")
        per_seed = " / ".join(shown(v) for v in r["seeds"].values())
        cells.append([r["model"], r["task"], r["variant"], shown(r["score"]), per_seed, f"{r['mb_step']:.1f}",
                      f"{r['gflop_step']:.1f}", f"{r['edge_peak_rss_mb']:.0f}", f"{r['seconds_per_step']:.2f}",
                      versus])
    lines.append(report.table(["model", "task", "variant", "score", "per seed", "MB/step", "edge GFLOP/step",
                               "edge peak RSS MB", "s/step", "against all-live"], cells))
    return "\n".join(lines) + "\n"


def shown(value: float | None) -> str:
    """A score as the table shows it: accuracy and ROUGE-L both in percent; "—" where there is none."""
    return "—" if value is None else f"{value:.1%}"


def less(value: float, ref: float, what: str) -> str:
    """'bytes -70%' against all-live, or 'edge compute 11.9x' where the variant costs more."""
    return f"{what} -{1 - value / ref:.0%}" if value <= ref else f"{what} {value / ref:.1f}x"


def points(value: float | None, ref: float | None) -> str:
    return "—" if value is None or ref is None else f"{100 * (value - ref):+.1f} pt"


def plot_losses(docs: dict[str, dict], path: Path, title: str) -> None:
    """Seed 0's training loss per step, one line per variant (a 10-step moving average)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for variant, doc in docs.items():
        losses = [h["loss"] for h in doc["history"]]
        smooth = [statistics.mean(losses[max(0, i - 9):i + 1]) for i in range(len(losses))]
        ax.plot(range(1, len(smooth) + 1), smooth, label=variant)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (10-step mean)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_list(text: str, known: list[str], what: str) -> list[str]:
    items = [x for x in text.split(",") if x]
    unknown = [x for x in items if x not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from {known}")
    return items


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m",
                   help="comma-separated models cloud_server serves (default: %(default)s; others: gemma-3-270m, "
                        "qwen2.5-0.5b after `make models`)")
    p.add_argument("--tasks", default="bbc,tweets,social_iqa,strategyqa,aclsum",
                   help=f"comma-separated named tasks, from {list(data.TASKS)} (default: %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, from {list(VARIANTS)} (default: %(default)s); zero-shot is always shown")
    p.add_argument("--seeds", default="0,1,2,3", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--steps", type=int, default=100, help="training steps per run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=MAX_LENGTH, help="tokens per example (default: %(default)s)")
    p.add_argument("--eval-limit", type=int, default=400,
                   help="held-out examples per task, 0 for all (default: %(default)s)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse finished runs of the same settings under --out (default: on)")
    p.add_argument("--out", type=Path, default=Path("bench/out/tasks"), help="where runs and results go")
    args = p.parse_args()
    models = [m for m in args.models.split(",") if m]
    tasks = parse_list(args.tasks, list(data.TASKS), "tasks")
    variants = parse_list(args.variants, list(VARIANTS), "variants")
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.out.mkdir(parents=True, exist_ok=True)
    start, rows = time.monotonic(), []
    total, done = len(models) * len(tasks) * len(variants) * len(args.seeds), 0
    for spec in models:
        model = Path(spec).name   # a model's name, or a checkpoint directory's (the tests' tiny models)
        with launch.start(["--model", spec], args.out / f"cloud_server-{model}.log", timeout=1800) as server:
            for task in tasks:
                docs: dict[str, dict[int, dict]] = {v: {} for v in variants}
                for seed in args.seeds:
                    for variant in variants:
                        done += 1
                        print(f"[{time.strftime('%H:%M:%S')}] ({done}/{total}) {model} {task} {variant} seed {seed}",
                              flush=True)
                        first = not any(docs.values())
                        doc = train(args, server.address, model, task, variant, seed, evaluate_before=first)
                        docs[variant][seed] = doc
                        print(f"    score {shown(score(doc['summary']['after']))}, "
                              f"{doc['summary']['seconds_per_step']:.2f} s/step", flush=True)
                first_doc = docs[variants[0]][args.seeds[0]]
                rows.append(zero_shot(model, task, first_doc))
                rows += [row(model, task, v, docs[v]) for v in variants]
                plot_losses({v: docs[v][args.seeds[0]] for v in variants},
                            args.out / f"loss-{model}-{task}.png", f"{model}, {task}")
                report.write_json(args.out / "results.json", {"args": vars(args) | {"out": str(args.out)},
                                                              "rows": rows})
    wall = time.monotonic() - start
    text = render(rows, args, wall)
    (args.out / "table.md").write_text(text)
    report.write_json(args.out / "results.json", {"args": vars(args) | {"out": str(args.out)}, "rows": rows,
                                                  "wall_seconds": wall,
                                                  "train_seconds": sum(r.get("total_seconds", 0) for r in rows)})
    print()
    print(text)
    print(f"written to {args.out}/results.json and table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
