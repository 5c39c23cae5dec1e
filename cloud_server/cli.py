"""`cloud_server`: serve a frozen LLM to DLoRA edge clients."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

import torch

from common.tensor_codec import dtype_from_name

EPILOG = """\
examples:
  cloud_server                              # embedded SmolLM2-135M on 127.0.0.1:50551
  cloud_server --model ./my-llama --device cuda --port 50051
  cloud_server --port 0                     # pick a free port; the ready line names it

The server never sees text, token ids or labels: edges send hidden states and
adapter outputs only. It prints 'DLoRA cloud server listening on HOST:PORT'
once it accepts connections.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="cloud_server",
        description="Hold a frozen causal LM and run its transformer blocks for DLoRA edge "
                    "clients, which train LoRA adapters on private data over gRPC.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="local Hugging Face model directory, or 'smollm2-135m' for the embedded "
                        "SmolLM2-135M-Instruct (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=50551, help="port to bind; 0 picks a free one (default: %(default)s)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda' or 'cuda:N' (default: %(default)s)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="dtype of the frozen weights (default: %(default)s)")
    p.add_argument("--targets", default="",
                   help="comma-separated leaf names of the linears edges may adapt by default, "
                        "e.g. q_proj,k_proj,v_proj (default: the attention input projections)")
    p.add_argument("--max-sessions", type=int, default=8, help="most edge sessions open at once (default: %(default)s)")
    p.add_argument("--max-batch-tokens", type=int, default=16384,
                   help="largest batch x sequence length one step may carry (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default: %(default)s)")
    args = p.parse_args(argv)
    if args.max_sessions < 1 or args.max_batch_tokens < 1:
        p.error("--max-sessions and --max-batch-tokens must be positive")
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be 0..65535, got {args.port}")
    return args


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this host")
    return name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    # Imported here so `--help` answers at once.
    from cloud_server.served_model import ServedModel
    from cloud_server.service import DLoRAService, ServerLimits, make_server

    device = pick_device(args.device)
    targets = [t for t in args.targets.split(",") if t] or None
    try:
        served = ServedModel(args.model, device=device, dtype=dtype_from_name(args.dtype), default_targets=targets)
    except (FileNotFoundError, ValueError) as exc:
        print(f"cloud_server: {exc}", file=sys.stderr)
        return 2
    service = DLoRAService(served, ServerLimits(args.max_sessions, args.max_batch_tokens))
    server, port = make_server(service, args.host, args.port)
    server.start()
    print(f"DLoRA cloud server listening on {args.host}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    logging.getLogger("cloud_server").info("shutting down: finishing in-flight steps (up to 10 s)")
    server.stop(grace=10).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
