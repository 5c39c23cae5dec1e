"""`make bench-kr`: every selection policy on SmolLM2-135M + BBC News, side by side.

Same steps, seeds, data order and initial adapters for each policy. For each
seed every variant trains once; the table gives the mean held-out accuracy over
seeds (with the per-seed values), bytes per step, edge FLOPs per step and the
cuts against `all`. Writes bench/out/kr/{results.json,loss.png,live_<variant>.png}.

A variant is a policy name from the list below, optionally followed by KR
settings that override the command line, e.g. `kr-site@warmup_steps=20@revive=0.5`.
Runs whose run.json already holds the same settings are reused (--reuse), so
adding a seed or a variant does not re-train the others.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

from bench import report
from bench.runs import collect
from common import tensor_codec as codec
from edge_client import plots
from edge_client.kill_revive import KRConfig
from edge_client.trainer import TrainConfig

VARIANTS = {
    "all": {"policy": "all"},
    "random": {"policy": "random", "unit": "module"},
    "static": {"policy": "static", "unit": "module"},
    "kr": {"policy": "kr", "unit": "module"},
    "kr-site": {"policy": "kr", "unit": "site"},
}



def parse_variant(spec: str) -> dict:
    """'kr-site@warmup_steps=20' -> the KRConfig fields for that variant."""
    name, *overrides = spec.split("@")
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; choose from {list(VARIANTS)}")
    fields = dict(VARIANTS[name])
    types = {k: type(v) for k, v in asdict(KRConfig()).items()}
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in types or key in ("policy", "unit", "seed"):
            raise SystemExit(f"{spec}: cannot override {key!r}; use one of budget, revive, period, warmup_steps")
        fields[key] = types[key](value)
    return fields


def steady(history: list[dict], key: str, warmup: int) -> float:
    rows = [h[key] for h in history if h["step"] > warmup + 1] or [h[key] for h in history]
    return sum(rows) / len(rows)


def train_all(args, names: list[str]) -> dict[str, dict[int, dict]]:
    """results[variant][seed] = run.json of that run (trained now or reused)."""
    configs = []
    for seed in args.seeds:
        for name in names:
            fields = parse_variant(name)
            kr = KRConfig(**({"budget": args.budget, "revive": args.revive, "period": args.period,
                              "warmup_steps": args.warmup_steps, "seed": seed} | fields))
            configs.append((name, seed, TrainConfig.of(
                steps=args.steps, eval_limit=args.eval_limit, seed=seed, kr=kr, out=args.out / f"seed{seed}" / name,
                client_name=f"bench-{name}-s{seed}", wire_dtype=args.wire_dtype, progress=sys.stderr.isatty(),
                eval_before=args.eval_before and name == names[0])))
    # A run without the evaluation before training cannot stand in for one that needs it.
    results = collect(configs, args.out, args.reuse,
                      accept=lambda doc, cfg: not cfg.eval_before or bool(doc["summary"]["before"]))
    return results


def summarise(results: dict[str, dict[int, dict]], warmup: int) -> list[dict]:
    rows = []
    for name, by_seed in results.items():
        runs = [by_seed[s] for s in sorted(by_seed)]
        acc = [r["summary"]["after"]["accuracy"] for r in runs]
        w = parse_variant(name).get("warmup_steps", warmup)
        mean = lambda key, runs=runs, w=w: statistics.fmean(steady(r["history"], key, w) for r in runs)  # noqa: E731
        rows.append({
            "policy": name, "seeds": sorted(by_seed), "accuracy": statistics.fmean(acc), "accuracy_per_seed": acc,
            "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "examples": runs[0]["summary"]["after"]["examples"],
            "mb_step_steady": (mean("bytes_sent") + mean("bytes_received")) / 1e6,
            "gflop_step_steady": mean("edge_flops") / 1e9, "adapter_gflop_steady": mean("adapter_flops") / 1e9,
            "seconds_per_step_steady": mean("seconds"), "live_modules": runs[0]["history"][-1]["live_modules"],
        })
    base = next((r for r in rows if r["policy"] == "all"), None)
    for row in rows:
        if base:
            row["bytes_cut"] = 1 - row["mb_step_steady"] / base["mb_step_steady"]
            row["flops_cut"] = 1 - row["gflop_step_steady"] / base["gflop_step_steady"]
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--eval-limit", type=int, default=0, help="held-out examples (0: all 444)")
    p.add_argument("--variants", default="all,random,static,kr,kr-site,kr-site@warmup_steps=20",
                   help=f"comma-separated; each one of {list(VARIANTS)}, optionally with @key=value overrides")
    p.add_argument("--budget", type=float, default=0.125)
    p.add_argument("--revive", type=float, default=0.25)
    p.add_argument("--period", type=int, default=10)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2, 3],
                   help="comma-separated seeds (adapter init, data order, random policy)")
    p.add_argument("--no-reuse", dest="reuse", action="store_false", help="re-train runs that already exist")
    p.add_argument("--wire-dtype", default="fp32", choices=list(codec.WIRE_DTYPES),
                   help="activations and gradients on the wire (default: %(default)s)")
    p.add_argument("--no-eval-before", dest="eval_before", action="store_false",
                   help="skip the held-out evaluation before training (it is the same for every variant)")
    p.add_argument("--out", type=Path, default=Path("bench/out/kr"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = [v for v in args.variants.split(",") if v]
    for n in names:
        parse_variant(n)
    results = train_all(args, names)
    rows = summarise(results, args.warmup_steps)
    befores = [results[names[0]][s]["summary"]["before"]["accuracy"] for s in args.seeds
               if results[names[0]][s]["summary"]["before"]]
    print()
    print(f"SmolLM2-135M, BBC News, {args.steps} steps, batch 8, seeds {','.join(map(str, args.seeds))}, "
          f"budget {args.budget}, revive {args.revive}, period {args.period}, warm-up {args.warmup_steps}; "
          f"{args.wire_dtype} wire; accuracy before training "
          f"{f'{statistics.fmean(befores):.1%}' if befores else 'not measured'}; per-step figures are after warm-up")
    print(results_table(rows))
    seed0 = args.seeds[0]
    plots.loss_curves({n: r[seed0]["history"] for n, r in results.items()}, args.out / "loss.png")
    order = _model_order(results[names[0]][seed0]["live_sets"][0]["live"])
    for n, r in results.items():
        if VARIANTS[n.split("@")[0]]["policy"] != "all":
            plots.live_heatmap(r[seed0]["live_sets"], order, args.steps, args.out / f"live_{n}.png",
                               f"live modules over training, {n}, seed {seed0}")
    report.write_json(args.out / "results.json",
                      {"args": vars(args) | {"out": str(args.out)}, "before": befores, "rows": rows})
    print(f"\nwritten to {args.out}/ (results.json, loss.png, live_*.png; runs under seed*/)")
    return 0


def results_table(rows: list[dict]) -> str:
    """The Markdown table of summarise's rows."""
    headers = ["variant", "held-out acc, mean (per seed)", "live modules", "MB/step", "edge GFLOP/step (adapters)",
               "bytes cut", "FLOPs cut", "s/step"]
    cells = []
    for row in rows:
        per_seed = ", ".join(f"{a:.1%}" for a in row["accuracy_per_seed"])
        cells.append([row["policy"], f"{row['accuracy']:.1%} ({per_seed})", row["live_modules"],
                      f"{row['mb_step_steady']:.1f}",
                      f"{row['gflop_step_steady']:.3f} ({row['adapter_gflop_steady']:.3f})",
                      f"{row.get('bytes_cut', 0):.1%}", f"{row.get('flops_cut', 0):.1%}",
                      f"{row['seconds_per_step_steady']:.2f}"])
    return report.table(headers, cells)


def _model_order(modules: list[str]) -> list[str]:
    """Modules sorted by layer, then by their position in the block."""
    from common.model_parts import layer_index
    leaf_rank = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
    return sorted(modules, key=lambda m: (layer_index(m), leaf_rank.get(m.rsplit(".", 1)[-1], 9), m))


if __name__ == "__main__":
    sys.exit(main())
