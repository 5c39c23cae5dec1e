"""`make bench-step`: distributed step time against the in-process LoRA step.

Same model, same adapters, same batch. The in-process step is the physical
limit (1.0x); the distributed one adds serialisation, copies and gRPC on
127.0.0.1. Each model is measured in --runs runs (a fresh server each, the two
steps side by side); the ratio reported is the runs' median, with their
spread. Prints a table and writes bench/out/step_time.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench import report
from cloud_server import launch
from cloud_server.model_store import ensure_default_model
from common import tensor_codec as codec
from common.lora import LoRAAdapter, LoRAConfig, adapters_state, inject, load_adapters_state
from edge_client import data as datasets
from edge_client.objective import completion_loss, make_batch
from edge_client.remote_model import DLoRAModelForCausalLM
from edge_client.session import StepStats


def timed(fn, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def in_process_step(model_dir: Path, adapters: dict[str, LoRAAdapter], batch,
                    device: str = "cpu") -> Callable[[], None]:
    """The 1.0x line: the whole model with copies of `adapters` in this process (on `device`),
    nothing on a wire."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    ref = {n: LoRAAdapter(a.in_features, a.out_features, a.rank, a.scale) for n, a in adapters.items()}
    load_adapters_state(ref, adapters_state(adapters))
    inject(model, ref)
    model.to(device)
    batch = batch.to(device)
    ref_opt = torch.optim.AdamW([p for a in ref.values() for p in a.parameters()], lr=1e-4)
    inner, norm_head = model.base_model, model

    def local() -> None:
        ref_opt.zero_grad()
        h = inner(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(), use_cache=False)
        # Same head work as the edge: final norm is inside `inner`, LM head only at label positions.
        picked = h.last_hidden_state[batch.rows, batch.positions]
        loss = torch.nn.functional.cross_entropy(norm_head.lm_head(picked).float(), batch.targets)
        loss.backward()
        ref_opt.step()
        if device != "cpu":
            torch.cuda.synchronize()  # the step is done when the device is

    return local


def edge_side(address: str, wire: str, cache: Path, examples, max_length: int):
    """The bench's edge: the Python API's model, rank-8 adapters on every served module, and the batch.
    `wire` is a wire dtype, factorised; with '+full' the whole adapter outputs (e.g. 'fp32+full'), with
    '+mM' each step in M pipelined micro-batches (e.g. 'int8+m4')."""
    dtype, *flags = wire.split("+")
    parts = next((int(f[1:]) for f in flags if f.startswith("m") and f[1:].isdigit()), 1)
    model = DLoRAModelForCausalLM.connect(address, LoRAConfig(r=8, lora_alpha=16.0), wire_dtype=dtype,
                                          factorised="full" not in flags, cache=cache, micro_batches=parts)
    return model, make_batch(model.tokenizer, examples, max_length)


def remote_step(model: DLoRAModelForCausalLM, batch, opt: torch.optim.Optimizer) -> tuple[float, StepStats]:
    """One distributed training step, as any user loop runs it: its loss and wire statistics."""
    opt.zero_grad()
    loss = completion_loss(model.final_hidden(batch.input_ids, batch.attention_mask), batch, model.edge.logits)
    loss.backward()
    opt.step()
    return float(loss.detach()), model.last_stats


def bench_model(label: str, model_dir: Path, batch_size: int, max_length: int, warmup: int, reps: int,
                wire: str, cache: Path, threads: int = 0, edge_threads: int = 0, device: str = "cpu") -> dict:
    """Median step time of the distributed step (the cloud on `device`, this process the edge) and
    of the in-process step (on `device`), with the same adapters and batch."""
    train_p, _ = datasets.bbc_news(Path.home() / ".cache" / "dlora")
    exs = datasets.load(train_p, datasets.BBC_TEMPLATE).examples[:batch_size]
    server_args = ["--model", str(model_dir), "--device", device, "--threads", str(threads)]
    with launch.start(server_args, cache / f"{label}.log", timeout=900) as server:
        model, batch = edge_side(server.address, wire, cache, exs, max_length)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step = {"bytes": 0}

        def remote() -> None:
            _, st = remote_step(model, batch, opt)
            step["bytes"] = st.bytes_sent + st.bytes_received

        default_threads = torch.get_num_threads()
        if edge_threads:
            torch.set_num_threads(edge_threads)
        remote_t = timed(remote, warmup, reps)
        torch.set_num_threads(default_threads)
        model.close()
    local_t = timed(in_process_step(model_dir, model.adapters, batch, device), warmup, reps)
    r, l_ = statistics.median(remote_t), statistics.median(local_t)
    return {"model": label, "batch": f"{batch_size}x{batch.input_ids.shape[1]}", "wire": wire, "device": device,
            "in_process_s": l_, "distributed_s": r, "ratio": r / l_, "bytes_per_step": step["bytes"],
            "reps": reps}


def over_runs(runs: list[dict]) -> dict:
    """One row from several runs of a model: the run with the median ratio, and every run's ratio."""
    ratios = [r["ratio"] for r in runs]
    middle = sorted(runs, key=lambda r: r["ratio"])[(len(runs) - 1) // 2]
    return {**middle, "ratio": statistics.median(ratios), "run_ratios": ratios,
            "ratio_min": min(ratios), "ratio_max": max(ratios)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5, help="timed steps per run and side (default: %(default)s)")
    p.add_argument("--runs", type=int, default=3,
                   help="runs per model, each with a fresh server; the ratio is their median (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--skip-smollm2", action="store_true")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads in every process (cloud, edge, in-process); 0 keeps torch's default")
    p.add_argument("--out", type=Path, default=Path("bench/out/step_time.json"))
    p.add_argument("--edge-threads", type=int, default=0,
                   help="torch threads of the edge (this process) during the distributed steps; 0: as --threads. "
                        "The edge's adapter work is small; on a host it shares with the cloud its idle "
                        "threads' spinning slows the cloud")
    p.add_argument("--wire", default="fp32", choices=[f"{w}{f}" for w in codec.WIRE_DTYPES for f in ("", "+full")],
                   help="wire dtype, factorised; '+full': adapter outputs at full width (default: fp32)")
    args = p.parse_args()
    from bench.tiny_models import save_tiny
    from common.malloc_tuning import tune_malloc

    tune_malloc()  # as edge_client's CLI does: this process is the edge
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = [("tiny-llama (2 layers, h=32)", save_tiny("llama", tmp / "tl")),
                  ("tiny-gpt2 (2 layers, h=32)", save_tiny("gpt2", tmp / "tg"))]
        if not args.skip_smollm2:
            models.append(("SmolLM2-135M (30 layers, h=576)", ensure_default_model()))
        for label, path in models:
            runs = []
            for i in range(args.runs):
                print(f"measuring {label}, run {i + 1}/{args.runs} ...", flush=True)
                runs.append(bench_model(label, path, args.batch_size, args.max_length, args.warmup, args.reps,
                                        args.wire, tmp, args.threads, args.edge_threads))
                print(f"    ratio {runs[-1]['ratio']:.2f}x", flush=True)
            rows.append(over_runs(runs))
    print()
    print(f"step time, CPU ({torch.get_num_threads()} torch threads per process), 127.0.0.1, {args.wire} wire, "
          f"median of {args.reps} steps per run; ratio: median of {args.runs} runs (their range)")
    print(report.table(["model", "batch", "in-process s", "distributed s", "ratio", "runs' ratios",
                        "MB on wire per step"],
                       [[r["model"], r["batch"], f"{r['in_process_s']:.4f}", f"{r['distributed_s']:.4f}",
                         f"{r['ratio']:.2f}x", ", ".join(f"{x:.2f}" for x in r["run_ratios"]),
                         f"{r['bytes_per_step'] / 1e6:.2f}"] for r in rows]))
    report.write_json(args.out, rows)
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
