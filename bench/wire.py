"""`make bench-wire`: every wire format, factorised or not, all-live or with Kill and Revive.

Two measurements per combination, on SmolLM2-135M + BBC News, batch 8 x 128:

- **cost**: a few steps at KR's steady state (one selection after the first
  step), timed on loopback: MB per step, round trips per step, seconds per
  step, and the seconds per step the latency model (bench/latency.py)
  predicts for a 10 ms / 100 Mbit/s and a 50 ms / 10 Mbit/s link.
- **accuracy**: a full training run (--steps, KR with its defaults: site
  units, a 20-step warm-up) per seed, held-out accuracy on all 444 test
  articles. Runs already under --out with the same settings are reused, so
  seeds and combinations can be added one command at a time.

A combination is `WIRE[+fact][+kr]`, WIRE one of the names below.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench import report
from bench.latency import measure, predict
from bench.netem import Link
from bench.runs import collect
from cloud_server import launch
from edge_client.kill_revive import KRConfig
from edge_client.trainer import TrainConfig

# name -> (activations, gradients, stochastic rounding of quantised gradients)
WIRES = {
    "fp32": ("fp32", None, False),
    "bf16": ("bf16", None, False),
    "int8": ("int8", None, False),
    "int8-sr": ("int8", None, True),
    "int4": ("int4", None, False),
    "int4-sr": ("int4", None, True),
    "int4-int8grad": ("int4", "int8", False),  # int4 activations, int8 gradients
}
LINKS = [Link(10, 100), Link(50, 10)]



def combos(spec: str) -> list[str]:
    names = [c for c in spec.split(",") if c]
    for name in names:
        wire, *flags = name.split("+")
        if wire not in WIRES or any(f not in ("fact", "kr") for f in flags):
            raise SystemExit(f"unknown combination {name!r}: WIRE[+fact][+kr], WIRE one of {', '.join(WIRES)}")
    return names


def settings(name: str, kr_steady: bool = False) -> dict:
    """TrainConfig fields of a combination; `kr_steady`: select once after step 1 and never again."""
    wire, *flags = name.split("+")
    act, grad, stochastic = WIRES[wire]
    if "kr" not in flags:
        kr = KRConfig(policy="all")
    elif kr_steady:
        kr = KRConfig(policy="kr", unit="site", warmup_steps=1, period=10_000)
    else:
        kr = KRConfig(policy="kr", unit="site")
    return {"wire_dtype": act, "grad_dtype": grad, "stochastic_rounding": stochastic,
            "factorised": "fact" in flags, "kr": kr}


def cost(args, names: list[str]) -> dict[str, dict]:
    """Loopback bytes, round trips and seconds per step of each combination, at KR's steady state."""
    out: dict[str, dict] = {}
    path = args.out / "cost.json"
    done = json.loads(path.read_text()) if path.exists() and args.reuse else {}
    todo = [n for n in names if n not in done or done[n].get("steps") != args.cost_steps]
    if todo:
        with launch.start(["--model", "smollm2-135m"], args.out / "cloud_server.log") as server:
            for name in todo:
                print(f"[{time.strftime('%H:%M:%S')}] cost of {name} ...", flush=True)
                base = measure(server.address, name, args.cost_steps, args.cache, settings(name, kr_steady=True))
                done[name] = base | {"steps": args.cost_steps}
                print(f"    {base['bytes'] / 1e6:.2f} MB/step, {base['seconds']:.2f} s/step", flush=True)
                report.write_json(path, done)
    for name in names:
        out[name] = done[name]
    return out


def accuracy(args, names: list[str]) -> dict[str, dict[int, dict]]:
    """results[combination][seed] = run.json of that training run (trained now or reused)."""
    configs = []
    for seed in args.seeds:
        for name in names:
            fields = settings(name)
            fields["kr"] = replace(fields["kr"], seed=seed)  # as bench-kr seeds it
            configs.append((name, seed, TrainConfig.of(
                steps=args.steps, eval_limit=0, seed=seed, out=args.out / f"seed{seed}" / name,
                client_name=f"bench-wire-{name}-s{seed}"[:64], progress=sys.stderr.isatty(), eval_before=False,
                cache=args.cache, **fields)))
    results = collect(configs, args.out, args.reuse)
    return results


def table(costs: dict[str, dict], runs: dict[str, dict[int, dict]], baseline: str) -> list[dict]:
    rows = []
    base = costs.get(baseline)
    for name, c in costs.items():
        acc = [r["summary"]["after"]["accuracy"] for _, r in sorted(runs.get(name, {}).items())]
        rows.append({
            "combination": name, "mb_step": c["bytes"] / 1e6, "round_trips": c["round_trips"],
            "seconds_loopback": c["seconds"],
            "bytes_cut": 1 - c["bytes"] / base["bytes"] if base else None,
            "predicted": {f"{link.rtt_ms:g}ms/{link.mbit:g}Mbit": predict(c, link) for link in LINKS},
            "accuracy": statistics.fmean(acc) if acc else None, "accuracy_per_seed": acc,
            "seeds": sorted(runs.get(name, {})),
        })
    return rows


def print_table(rows: list[dict], args) -> None:
    headers = ["wire", "factorised", "KR", "MB/step", f"cut vs {args.baseline}", "held-out acc, mean (per seed)",
               "s/step, loopback",
               *(f"s/step at {link.rtt_ms:g} ms, {link.mbit:g} Mbit/s (predicted)" for link in LINKS)]
    cells = []
    for r in rows:
        wire, *flags = r["combination"].split("+")
        acc = (f"{r['accuracy']:.1%} ({', '.join(f'{a:.1%}' for a in r['accuracy_per_seed'])})"
               if r["accuracy"] is not None else "not run")
        cut = f"{r['bytes_cut']:.1%}" if r["bytes_cut"] is not None else "-"
        cells.append([wire, "yes" if "fact" in flags else "no", "site" if "kr" in flags else "all-live",
                      f"{r['mb_step']:.2f}", cut, acc, f"{r['seconds_loopback']:.2f}",
                      *(f"{v:.2f}" for v in r["predicted"].values())])
    print(report.table(headers, cells))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    every = [f"{w}{f}{k}" for w in WIRES for f in ("", "+fact") for k in ("", "+kr")]
    p.add_argument("--combos", default=",".join(every),
                   help="comma-separated WIRE[+fact][+kr] to measure the cost of (default: all %(default)s)")
    p.add_argument("--train", default=None,
                   help="comma-separated combinations to train for accuracy (default: the same as --combos; "
                        "'none' for cost only)")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2, 3],
                   help="comma-separated training seeds (default: 0,1,2,3)")
    p.add_argument("--steps", type=int, default=80, help="training steps per accuracy run (default: %(default)s)")
    p.add_argument("--cost-steps", type=int, default=3,
                   help="timed steps per cost measurement, after one warm step (default: %(default)s)")
    p.add_argument("--baseline", default="fp32", help="the combination bytes are cut against (default: %(default)s)")
    p.add_argument("--no-reuse", dest="reuse", action="store_false", help="measure and train everything again")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dlora", help="edge asset cache")
    p.add_argument("--out", type=Path, default=Path("bench/out/wire"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = combos(args.combos)
    if args.baseline not in names:
        names.insert(0, combos(args.baseline)[0])
    trained = [] if args.train == "none" else combos(args.train) if args.train else names
    costs = cost(args, names)
    runs = accuracy(args, trained) if trained else {}
    # Runs trained by earlier invocations count too.
    for name in names:
        if name not in runs:
            runs[name] = {s: json.loads(f.read_text()) for s in range(16)
                          if (f := args.out / f"seed{s}" / name / "run.json").exists()
                          and json.loads(f.read_text())["config"].get("steps") == args.steps}
    rows = table(costs, runs, args.baseline)
    print("\nSmolLM2-135M, BBC News, batch 8 x 128, r 8 on q/k/v_proj (90 modules at 30 sites); "
          f"accuracy after {args.steps} steps "
          f"(KR: site units, 20-step warm-up); cost at KR's steady state over {args.cost_steps} steps on loopback")
    print_table(rows, args)
    report.write_json(args.out / "results.json",
                      {"args": vars(args) | {"out": str(args.out), "cache": str(args.cache)}, "rows": rows})
    print(f"\nwritten to {args.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
