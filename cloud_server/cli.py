"""`cloud_server`: serve a frozen LLM to DLoRA edge clients."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

import torch

from common.tensor_codec import dtype_from_name

EPILOG = """\
examples:
  cloud_server                              # embedded SmolLM2-135M on 127.0.0.1:50551
  cloud_server --model ./my-llama --device cuda --port 50051
  cloud_server --port 0                     # pick a free port; the ready line names it

Edges send hidden states, adapter outputs and gradients, never text, token ids
or labels as such; a server holding the model can still recover the text and
labels from them (README: Privacy; audit with --record-dir).

It prints 'DLoRA cloud server listening on HOST:PORT' once it accepts connections.
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
    p.add_argument("--max-sessions-per-client", type=int, default=0,
                   help="most sessions one client identity (its token or certificate) may hold, so one client "
                        "cannot take every slot; 0: no limit besides --max-sessions (default: %(default)s)")
    p.add_argument("--max-batch-tokens", type=int, default=16384,
                   help="largest batch x sequence length one step may carry (default: %(default)s)")
    p.add_argument("--max-message-mb", type=float, default=0,
                   help="largest gRPC message in MiB; 0 derives it from --max-batch-tokens so the "
                        "largest site tensor fits (default: %(default)s)")
    bat = p.add_argument_group("batching", "steps of different edges that arrive together run as one batch "
                                           "through the frozen blocks, so one accelerator serves many edges")
    bat.add_argument("--batch-window-ms", type=float, default=100,
                     help="how long a step waits for other sessions' steps to join its batch; it waits only while "
                          "some session is between steps, so a lone edge never waits. 0 turns batching off "
                          "(default: %(default)s)")
    bat.add_argument("--max-cohort-tokens", type=int, default=65536,
                     help="largest joint batch: sessions x batch x longest sequence (default: %(default)s)")
    bat.add_argument("--max-cohort-sessions", type=int, default=16,
                     help="most sessions in one joint batch (default: %(default)s)")
    bat.add_argument("--batch-lag-timeout", type=float, default=30,
                     help="seconds a batched edge may take to answer one exchange; a slower edge is dropped "
                          "from its batch (its step fails and is retried) and runs alone from then on, so it "
                          "cannot hold the others back (default: %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=600,
                   help="seconds without a call before a session is freed (default: %(default)s)")
    p.add_argument("--step-timeout", type=float, default=300,
                   help="seconds one step may spend waiting on its edge; the cloud's own compute is not "
                        "interrupted (default: %(default)s)")
    p.add_argument("--shutdown-grace", type=float, default=30,
                   help="on SIGTERM, seconds in-flight steps get to finish (default: %(default)s)")
    sec = p.add_argument_group("security", "plaintext is for localhost only; give a certificate to serve a network")
    sec.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM)")
    sec.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    sec.add_argument("--tls-client-ca", type=Path,
                     help="CA (PEM) that must have signed every client's certificate: mutual TLS")
    sec.add_argument("--tokens", type=Path,
                     help="file of 'CLIENT_ID TOKEN' lines; every call must carry one of the tokens")
    sec.add_argument("--allow-insecure-remote", action="store_true",
                     help="allow plaintext on a non-loopback address (logs a warning; do not use on a network "
                          "you do not trust)")
    p.add_argument("--mode", default="any", choices=["any", "dlora", "splitlora"],
                   help="which training modes edges may open sessions in: 'dlora' (the cloud runs every block, "
                        "edges compute the adapters), 'splitlora' (edges run the first --cut-layer blocks, the "
                        "cloud trains server-side adapters), or 'any'; each session picks its own (default: %(default)s)")
    aud = p.add_argument_group("privacy audit", "see for yourself what this cloud learns from edges")
    aud.add_argument("--record-dir", type=Path,
                     help="write every message edges send, as received, and every reply, under this directory "
                          "(two files per call; read with cloud_server.recorder.read). It holds activations and "
                          "gradients computed from "
                          "the edges' private data: for audits and `make bench-privacy`, not for production")
    aud.add_argument("--record-limit-mb", type=float, default=1024,
                     help="stop recording once this many MiB are written (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    p.add_argument("--stats-every", type=float, default=60.0,
                   help="seconds between throughput log lines (steps, tokens/s, busy share); quiet when idle "
                        "(default: %(default)s)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default: %(default)s)")
    args = p.parse_args(argv)
    if args.max_sessions < 1 or args.max_batch_tokens < 1:
        p.error("--max-sessions and --max-batch-tokens must be positive")
    if args.max_sessions_per_client < 0:
        p.error("--max-sessions-per-client must not be negative (0: no limit)")
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be 0..65535, got {args.port}")
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        p.error("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if min(args.idle_timeout, args.step_timeout) <= 0 or args.shutdown_grace < 0:
        p.error("--idle-timeout and --step-timeout must be positive, --shutdown-grace not negative")
    if args.batch_window_ms < 0 or args.max_cohort_tokens < 1 or args.max_cohort_sessions < 1:
        p.error("--batch-window-ms must not be negative; --max-cohort-tokens and --max-cohort-sessions must be positive")
    if args.batch_lag_timeout <= 0:
        p.error("--batch-lag-timeout must be positive")
    if args.stats_every <= 0:
        p.error("--stats-every must be positive")
    if args.record_limit_mb <= 0:
        p.error("--record-limit-mb must be positive")
    from cloud_server.auth import is_loopback
    if not args.tls_cert and not is_loopback(args.host) and not args.allow_insecure_remote:
        p.error(f"refusing plaintext on non-loopback address {args.host}: give --tls-cert/--tls-key, "
                "or --allow-insecure-remote if you really mean it")
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
    log = logging.getLogger("cloud_server")
    from common.malloc_tuning import tune_malloc
    tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Imported here so `--help` answers at once.
    from cloud_server.auth import Authenticator, is_loopback, load_tokens
    from cloud_server.served_model import ServedModel
    from cloud_server.batching import BatchingConfig
    from cloud_server.service import DLoRAService, ServerLimits, TLSFiles, make_server

    try:
        tokens = load_tokens(args.tokens) if args.tokens else {}
        tls = None
        if args.tls_cert:
            tls = TLSFiles(args.tls_cert.read_bytes(), args.tls_key.read_bytes(),
                           args.tls_client_ca.read_bytes() if args.tls_client_ca else None)
        device = pick_device(args.device)
        targets = [t for t in args.targets.split(",") if t] or None
        served = ServedModel(args.model, device=device, dtype=dtype_from_name(args.dtype), default_targets=targets)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"cloud_server: {exc}", file=sys.stderr)
        return 2
    if not tls and not is_loopback(args.host):
        log.warning("serving PLAINTEXT on %s: activations and tokens cross the network unencrypted", args.host)
    limits = ServerLimits(args.max_sessions, args.max_batch_tokens, int(args.max_message_mb * (1 << 20)),
                          args.idle_timeout, args.step_timeout, args.max_sessions_per_client)
    modes = ("dlora", "splitlora") if args.mode == "any" else (args.mode,)
    batching = BatchingConfig(args.batch_window_ms / 1000, args.max_cohort_tokens, args.max_cohort_sessions,
                              args.batch_lag_timeout)
    recorder = None
    if args.record_dir:
        from cloud_server.recorder import MessageRecorder
        try:
            recorder = MessageRecorder(args.record_dir, int(args.record_limit_mb * (1 << 20)))
        except OSError as exc:
            print(f"cloud_server: --record-dir: {exc}", file=sys.stderr)
            return 2
        log.warning("recording every edge message under %s: it holds activations computed from the edges' "
                    "private data; protect it, and delete it after the audit", args.record_dir)
    service = DLoRAService(served, limits, Authenticator(tokens, mtls=bool(args.tls_client_ca)), modes=modes,
                           batching=batching, recorder=recorder)
    try:
        running = make_server(service, args.host, args.port, tls, stats_every=args.stats_every)
    except OSError as exc:
        print(f"cloud_server: {exc}", file=sys.stderr)
        return 2
    log.info("limits: %d sessions, %d tokens/step, %.0f MiB/message, idle %.0f s, step %.0f s; %s; %s%s",
             limits.max_sessions, limits.max_batch_tokens, limits.max_message_bytes / (1 << 20),
             limits.idle_timeout, limits.step_timeout,
             f"batching window {args.batch_window_ms:g} ms, up to {args.max_cohort_sessions} sessions and "
             f"{args.max_cohort_tokens} tokens" if args.batch_window_ms else "batching off",
             "TLS" if tls else "plaintext",
             (" + client certificates" if args.tls_client_ca else "") + (f", {len(tokens)} tokens" if tokens else ""))
    print(f"DLoRA cloud server listening on {args.host}:{running.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down: refusing new work, giving in-flight steps up to %.0f s", args.shutdown_grace)
    running.shutdown(args.shutdown_grace)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
