"""`make demo`: a cloud_server on the embedded SmolLM2-135M and one edge_client on BBC News.

Prints accuracy before and after a short training, and the bytes per step.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from cloud_server import launch


def main() -> int:
    p = argparse.ArgumentParser(description="DLoRA demo: SmolLM2-135M on the cloud, BBC News on the edge")
    p.add_argument("--port", type=int, default=0, help="server port; 0 picks a free one")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-limit", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "cloud_server.log"
    t0 = time.time()
    print(f"starting cloud_server on the embedded SmolLM2-135M (log: {log}); the first start converts "
          "the GGUF to safetensors once", flush=True)
    server = launch.start(["--model", "smollm2-135m"] + (["--port", str(args.port)] if args.port else []), log)
    print(f"cloud_server ready at {server.address} after {time.time() - t0:.0f} s", flush=True)
    try:
        rc = subprocess.call([sys.executable, "-m", "edge_client", "train", "--server", server.address,
                              "--steps", str(args.steps), "--eval-limit", str(args.eval_limit),
                              "--out", str(args.out), "--name", "demo-edge"])
    finally:
        server.stop()
    print(f"demo finished in {time.time() - t0:.0f} s; run log: {args.out / 'run.json'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
