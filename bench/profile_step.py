"""Where one distributed training step's time goes: `python -m bench.profile_step`.

Runs a cloud_server child and one edge (this process) on the bench's batch,
profiles the edge's steps with cProfile and splits each step into:

- cloud compute: what the cloud reports in StepEnd (its blocks, its codec and
  its message handling; its waits for the edge excluded),
- edge compute, by part: decoding and encoding tensors, protobuf
  serialisation and parsing, adapter forward and backward, the head and loss,
- wire and scheduling: the rest of the time the edge waited for the cloud
  (gRPC, loopback, thread hand-offs on both sides).

The in-process LoRA step on the same model and batch is the 1.0x line (see
bench/step_time.py). `--threads` sets torch's threads in both processes; on a
shared or busy host 1 thread gives steadier numbers.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.step_time import edge_side, in_process_step, remote_step, timed
from cloud_server import launch
from cloud_server.model_store import ensure_default_model
from common import tensor_codec as codec
from edge_client import data as datasets

# Edge parts: (label, how to find the profiled functions, own time or cumulative).
# Cumulative entries must not nest in each other, or time would count twice.
_PARTS: list[tuple[str, tuple[str, ...], str]] = [
    ("decode tensors", ("tensor_codec.py:decode",), "cum"),
    ("encode tensors", ("tensor_codec.py:encode",), "cum"),
    ("serialise messages", ("SerializeToString", "ByteSize"), "own"),
    ("adapter forward", ("lora.py:forward",), "cum"),
    ("autograd backward", ("run_backward",), "own"),
]
# Blocking on the response stream. gRPC parses replies on its own thread, so
# parsing is not edge compute here: it shows up in this wait.
_WAIT = ("_channel.py:_next",)


def _match(key: tuple[str, int, str], needles: tuple[str, ...]) -> bool:
    file, _, func = key
    where = f"{Path(file).name}:{func}"
    # Built-ins have no file: their name reads like "<method 'SerializeToString' ...>".
    return any(n in where if ":" in n else n in func for n in needles)


def _seconds(stats: pstats.Stats, needles: tuple[str, ...], kind: str) -> float:
    """Own or cumulative seconds of the matching functions; a matching function
    called by another matching one (encode -> encode_into) counts once."""
    table = stats.stats  # type: ignore[attr-defined]
    total = 0.0
    for key, (_, _, own, cum, callers) in table.items():
        if not _match(key, needles):
            continue
        if kind == "own":
            total += own
        else:
            nested = sum(c[3] for caller, c in callers.items() if _match(caller, needles))
            total += cum - nested
    return total


def breakdown(profile: cProfile.Profile, steps: int, wall: float, cloud: float) -> list[tuple[str, float]]:
    """Per-step seconds by part; the parts add up to the step's wall time."""
    st = pstats.Stats(profile)
    parts = [(label, _seconds(st, needles, kind) / steps) for label, needles, kind in _PARTS]
    waited = _seconds(st, _WAIT, "cum") / steps
    edge = wall - waited
    rows = [("cloud compute (StepEnd)", cloud), ("wire + scheduling (waited - cloud)", max(waited - cloud, 0.0))]
    rows += [(f"edge: {label}", s) for label, s in parts]
    rows.append(("edge: other (head + loss, optimizer step, glue)", max(edge - sum(s for _, s in parts), 0.0)))
    return rows


def run(model_dir: Path, batch_size: int, max_length: int, warmup: int, reps: int, wire: str,
        threads: int, cache: Path) -> None:
    torch.set_num_threads(threads)
    train_p, _ = datasets.bbc_news(Path.home() / ".cache" / "dlora")
    exs = datasets.load(train_p, datasets.BBC_TEMPLATE).examples[:batch_size]
    args = ["--model", str(model_dir), "--device", "cpu", "--threads", str(threads)]
    with launch.start(args, cache / "cloud.log", timeout=900) as server:
        model, batch = edge_side(server.address, wire, cache, exs, max_length)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            return remote_step(model, batch, opt)

        for _ in range(warmup):
            step()
        profile, walls, clouds = cProfile.Profile(), [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            profile.enable()
            loss, stats = step()
            profile.disable()
            walls.append(time.perf_counter() - t0)
            clouds.append(stats.cloud_seconds)
        model.close()
    local = statistics.median(timed(in_process_step(model_dir, model.adapters, batch), warmup, reps))
    wall = statistics.mean(walls)
    print(f"{reps} steps, batch {batch_size}x{batch.input_ids.shape[1]}, {wire} wire, {threads} thread(s) per process; "
          f"wall per step: mean {wall:.3f} s, min {min(walls):.3f} s; "
          f"{stats.messages} messages, {(stats.bytes_sent + stats.bytes_received) / 1e6:.1f} MB; loss {loss:.6f}")
    for label, s in breakdown(profile, reps, wall, statistics.mean(clouds)):
        print(f"  {label:52s} {s:8.3f} s  {100 * s / wall:5.1f}%")
    print(f"in-process LoRA step (same model, batch, threads): median {local:.3f} s; "
          f"distributed / in-process = {wall / local:.2f}x")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' or 'tiny-llama' (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--wire", default="fp32", choices=list(codec.WIRE_DTYPES))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model == "smollm2":
            model_dir = ensure_default_model()
        else:
            from bench.tiny_models import save_tiny
            model_dir = save_tiny("llama", tmp / "tl")
        run(model_dir, args.batch_size, args.max_length, args.warmup, args.reps, args.wire, args.threads, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
