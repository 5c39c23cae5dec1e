"""Training runs a benchmark needs: reused from an earlier run.json with the same settings, or trained now."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from cloud_server import launch
from edge_client.trainer import TrainConfig, public_config, run

# Settings that name a run; the rest (address, paths, progress) do not change its result.
RESULT_KEYS = ("steps", "batch_size", "lr", "r", "lora_alpha", "max_length", "eval_limit", "wire_dtype", "grad_dtype",
               "factorised", "stochastic_rounding", "objective", "kr", "seed", "data", "target_modules")
# Older runs predate these settings; their absence meant this.
_ABSENT = {"grad_dtype": None, "factorised": False, "stochastic_rounding": False}


def same_run(run_json: Path, cfg: TrainConfig) -> bool:
    """Whether `run_json` holds a finished run of `cfg`'s settings."""
    if not run_json.exists():
        return False
    old = json.loads(run_json.read_text())["config"]
    new = public_config(cfg)
    return all(old.get(k, _ABSENT.get(k)) == new.get(k) for k in RESULT_KEYS)


def collect(runs: list[tuple[str, int, TrainConfig]], out: Path, reuse: bool = True,
            accept: Callable[[dict, TrainConfig], bool] = lambda doc, cfg: True) -> dict[str, dict[int, dict]]:
    """results[name][seed] = run.json of each (name, seed, config): an earlier run of the same
    settings that `accept`s, with `reuse`, or one trained now against one cloud_server."""
    results: dict[str, dict[int, dict]] = {name: {} for name, _, _ in runs}
    todo = []
    for name, seed, cfg in runs:
        path = cfg.out / "run.json"
        if reuse and same_run(path, cfg) and accept(doc := json.loads(path.read_text()), cfg):
            results[name][seed] = doc
            print(f"reusing {path}", flush=True)
        else:
            todo.append((name, seed, cfg))
    _train(todo, out, results)
    return results


def _train(todo: list[tuple[str, int, TrainConfig]], out: Path, results: dict[str, dict[int, dict]]) -> None:
    if not todo:
        return
    with launch.start(["--model", "smollm2-135m"], out / "cloud_server.log") as server:
        for i, (name, seed, cfg) in enumerate(todo, 1):
            print(f"[{time.strftime('%H:%M:%S')}] ({i}/{len(todo)}) seed {seed}, {name} ...", flush=True)
            summary = run(replace(cfg, remote=replace(cfg.remote, server=server.address)))
            results[name][seed] = json.loads((cfg.out / "run.json").read_text())
            print(f"    accuracy {summary['after']['accuracy']:.1%}, {summary['seconds_per_step']:.2f} s/step",
                  flush=True)
