"""`make bench-kr`: every selection policy on SmolLM2-135M + BBC News, side by side.

Same steps, seed, data order and initial adapters for each policy. Prints a
table (held-out accuracy, bytes per step, edge FLOPs per step, cuts against
`all`), and writes bench/out/kr/{results.json,loss.png,live_<policy>.png}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from cloud_server import launch
from edge_client import plots
from edge_client.kill_revive import KRConfig
from edge_client.trainer import TrainConfig, run

VARIANTS = {
    "all": {"policy": "all"},
    "random": {"policy": "random"},
    "static": {"policy": "static"},
    "kr": {"policy": "kr"},
    "kr-site": {"policy": "kr", "unit": "site"},
}


def steady(history: list[dict], key: str, warmup: int) -> float:
    rows = [h[key] for h in history if h["step"] > warmup + 1] or [h[key] for h in history]
    return sum(rows) / len(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--eval-limit", type=int, default=0, help="held-out examples (0: all 445)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated from {list(VARIANTS)}")
    p.add_argument("--budget", type=float, default=0.125)
    p.add_argument("--revive", type=float, default=0.25)
    p.add_argument("--period", type=int, default=10)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/out/kr"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = [v for v in args.variants.split(",") if v]
    results: dict[str, dict] = {}
    with launch.start(["--model", "smollm2-135m"], args.out / "cloud_server.log") as server:
        base = TrainConfig(server=server.address, steps=args.steps, eval_limit=args.eval_limit, seed=args.seed,
                           progress=sys.stderr.isatty())
        for i, name in enumerate(names):
            kr = KRConfig(budget=args.budget, revive=args.revive, period=args.period,
                          warmup_steps=args.warmup_steps, seed=args.seed, **VARIANTS[name])
            cfg = replace(base, kr=kr, out=args.out / name, client_name=f"bench-{name}", eval_before=(i == 0))
            print(f"[{time.strftime('%H:%M:%S')}] training with policy {name} ...", flush=True)
            summary = run(cfg)
            doc = json.loads((cfg.out / "run.json").read_text())
            results[name] = {"summary": summary, "history": doc["history"], "live_sets": doc["live_sets"]}
            print(f"    accuracy {summary['after']['accuracy']:.1%}, {summary['seconds_per_step']:.2f} s/step", flush=True)
    ref = results.get("all")
    rows = []
    for name, r in results.items():
        s, h = r["summary"], r["history"]
        row = {
            "policy": name, "accuracy": s["after"]["accuracy"], "examples": s["after"]["examples"],
            "mb_step_steady": steady(h, "bytes_sent", args.warmup_steps) / 1e6 + steady(h, "bytes_received", args.warmup_steps) / 1e6,
            "mb_step_mean": (s["bytes_sent_per_step"] + s["bytes_received_per_step"]) / 1e6,
            "gflop_step_steady": steady(h, "edge_flops", args.warmup_steps) / 1e9,
            "adapter_gflop_steady": steady(h, "adapter_flops", args.warmup_steps) / 1e9,
            "seconds_per_step_steady": steady(h, "seconds", args.warmup_steps),
            "live_modules": h[-1]["live_modules"],
        }
        rows.append(row)
    if ref:
        base_row = rows[names.index("all")]
        for row in rows:
            row["bytes_cut"] = 1 - row["mb_step_steady"] / base_row["mb_step_steady"]
            row["flops_cut"] = 1 - row["gflop_step_steady"] / base_row["gflop_step_steady"]
    before = results[names[0]]["summary"]["before"]
    print()
    print(f"SmolLM2-135M, BBC News, {args.steps} steps, batch 8, seed {args.seed}, budget {args.budget}, "
          f"revive {args.revive}, period {args.period}, warm-up {args.warmup_steps}; accuracy before training "
          f"{before['accuracy']:.1%}; per-step figures are after warm-up")
    print("| policy | held-out acc | live modules | MB/step | edge GFLOP/step (adapters) | bytes cut | FLOPs cut | s/step |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['policy']} | {row['accuracy']:.1%} | {row['live_modules']} | {row['mb_step_steady']:.1f} | "
              f"{row['gflop_step_steady']:.3f} ({row['adapter_gflop_steady']:.3f}) | {row.get('bytes_cut', 0):.1%} | "
              f"{row.get('flops_cut', 0):.1%} | {row['seconds_per_step_steady']:.2f} |")
    modules = list(results[names[0]]["history"] and json.loads((args.out / names[0] / "run.json").read_text())["live_sets"][0]["live"])
    plots.loss_curves({n: r["history"] for n, r in results.items()}, args.out / "loss.png")
    order = _model_order(modules)
    for n, r in results.items():
        if n != "all":
            plots.live_heatmap(r["live_sets"], order, args.steps, args.out / f"live_{n}.png",
                               f"live modules over training, policy {n}")
    (args.out / "results.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                       "before": before, "rows": rows}, indent=2))
    print(f"\nwritten to {args.out}/ (results.json, loss.png, live_*.png)")
    return 0


def _model_order(modules: list[str]) -> list[str]:
    """Modules sorted by layer, then by their position in the block."""
    from common.model_parts import layer_index
    leaf_rank = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
    return sorted(modules, key=lambda m: (layer_index(m), leaf_rank.get(m.rsplit(".", 1)[-1], 9), m))


if __name__ == "__main__":
    sys.exit(main())
