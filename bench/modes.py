"""`make bench-modes`: DLoRA against SplitLoRA on the same model, data, steps and wire
(and `make bench-wire`: DLoRA with fp32, fp16, bf16 and int8 on the wire, and int8 with Kill and Revive).

Each variant is one `edge_client train` process (so its peak memory is its
own) against one cloud_server on the embedded SmolLM2-135M, on BBC News.
Prints one table: held-out accuracy, bytes per step, edge FLOPs per step, edge
memory (weights held, and the process's peak RSS) and seconds per step.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import report
from cloud_server import launch

VARIANTS = {
    "dlora": [],
    "dlora-kr-site": ["--policy", "kr", "--unit", "site"],
    "splitlora-k2": ["--mode", "splitlora", "--cut-layer", "2"],
    "splitlora-k4": ["--mode", "splitlora", "--cut-layer", "4"],
    # `make bench-wire`: the same DLoRA run with half-precision activations and gradients on the wire.
    "dlora-fp16": ["--wire-dtype", "fp16"],
    "dlora-bf16": ["--wire-dtype", "bf16"],
    # int8 with a float32 scale per token (common/tensor_codec.py), alone and with Kill and Revive's defaults.
    "dlora-int8": ["--wire-dtype", "int8"],
    "dlora-kr-site-int8": ["--policy", "kr", "--unit", "site", "--wire-dtype", "int8"],
}
DEFAULT = "dlora,dlora-kr-site,splitlora-k2,splitlora-k4"


def modes_table(rows: list[dict]) -> str:
    """The Markdown table of the variants' rows."""
    headers = ["variant", "held-out acc", "MB/step", "site round trips/step", "edge GFLOP/step", "edge weights MB",
               "edge peak RSS MB", "s/step"]
    return report.table(headers, [
        [r["variant"], f"{r['accuracy']:.1%}", f"{r['mb_step']:.1f}", f"{r['site_exchanges_per_step']:.1f}",
         f"{r['gflop_step']:.2f}", f"{r['edge_param_mb']:.1f}", f"{r['edge_peak_rss_mb']:.0f}",
         f"{r['seconds_per_step']:.2f}"] for r in rows])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-limit", type=int, default=0, help="held-out examples, 0 for all (default: %(default)s)")
    p.add_argument("--variants", default=DEFAULT, help=f"comma-separated from {list(VARIANTS)} (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/out/modes"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = [v for v in args.variants.split(",") if v]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    results = {}
    with launch.start(["--model", args.model], args.out / "cloud_server.log") as server:
        for i, name in enumerate(names):
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
            out = args.out / name
            cmd = [sys.executable, "-m", "edge_client", "train", "--server", server.address, "--steps",
                   str(args.steps), "--eval-limit", str(args.eval_limit), "--seed", str(args.seed), "--out", str(out),
                   "--name", f"bench-{name}", "--no-progress", "--federation", f"bench-{name}-{time.time_ns()}",
                   *VARIANTS[name]]
            if i:
                cmd.append("--no-eval-before")
            with open(args.out / f"{name}.log", "w") as log:
                rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
            if rc != 0:
                print(f"    failed (exit {rc}); see {args.out / name}.log", flush=True)
                return 1
            doc = json.loads((out / "run.json").read_text())
            results[name] = doc
            print(f"    accuracy {doc['summary']['after']['accuracy']:.1%}", flush=True)
    before = results[names[0]]["summary"]["before"]
    rows = []
    for name, doc in results.items():
        s, h = doc["summary"], doc["history"]
        rows.append({
            "variant": name, "accuracy": s["after"]["accuracy"], "examples": s["after"]["examples"],
            "mb_step": (s["bytes_sent_per_step"] + s["bytes_received_per_step"]) / 1e6,
            "gflop_step": s["edge_flops_per_step"] / 1e9,
            "edge_param_mb": s["edge_param_mb"], "edge_peak_rss_mb": s["edge_peak_rss_mb"],
            "seconds_per_step": s["seconds_per_step"],
            "site_exchanges_per_step": sum(x["site_exchanges"] for x in h) / len(h),
        })
    print()
    print(f"{args.model}, BBC News, {args.steps} steps, batch 8, seed {args.seed}, fp32 wire unless the variant "
          f"says otherwise; accuracy before training {before['accuracy']:.1%} on {before['examples']} "
          "held-out articles")
    print(modes_table(rows))
    report.write_json(args.out / "results.json",
                      {"args": vars(args) | {"out": str(args.out)}, "before": before, "rows": rows})
    print(f"\nwritten to {args.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
