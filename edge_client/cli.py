"""`edge_client`: fine-tune LoRA adapters on data that never leaves this device."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

EPILOG = """\
examples:
  edge_client train                                  # BBC News topics against 127.0.0.1:50551
  edge_client train --server gpu-host:50551 --data mydata.jsonl --steps 200
  edge_client train --data train.jsonl --test test.jsonl --out runs/exp1

data format (JSONL, one object per line, all lines of one kind):
  {"text": "...", "label": "sport"}          classification: accuracy is reported
  {"prompt": "...", "completion": "..."}     generation: held-out loss is reported

Only hidden states, adapter activations and their gradients leave the device,
never text, token ids or labels as such; but the cloud that serves the model can
recover the text and the labels from them (README: Privacy). --label-epsilon
bounds what it learns of the labels.
"""


def _connection_args(p: argparse.ArgumentParser, title: str = "connection"):
    """--server and the credentials, shared by every command that talks to a cloud_server."""
    g = p.add_argument_group(title)
    g.add_argument("--server", default="127.0.0.1:50551", help="cloud_server address HOST:PORT (default: %(default)s)")
    g.add_argument("--token", default=os.environ.get("DLORA_TOKEN"),
                   help="bearer token the server expects (default: $DLORA_TOKEN)")
    g.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) that signed the server's: enables TLS")
    g.add_argument("--tls-cert", type=Path, help="this client's certificate (PEM), for mutual TLS")
    g.add_argument("--tls-key", type=Path, help="this client's private key (PEM), for mutual TLS")
    g.add_argument("--tls-server-name", help="name to expect in the server certificate, if not the host")
    return g


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train LoRA adapters against a cloud_server",
                       description="Train rank-r LoRA adapters on private JSONL data. The cloud runs the "
                                   "frozen transformer blocks; this device runs the embedding, the LM head, "
                                   "the loss and the adapters.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None,
                   help="training JSONL file (default: the embedded BBC News topic set)")
    p.add_argument("--test", type=Path, default=None,
                   help="held-out JSONL file (default: hold out --test-fraction of --data)")
    p.add_argument("--labels", default=None,
                   help="comma-separated label set of text/label data, when this device's data may lack "
                        "some labels (default: the labels found in --data)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share when no --test (default: %(default)s)")
    p.add_argument("--template", default=None,
                   help="prompt template for text/label data, with {text} and {labels} "
                        "(default: a short classification instruction)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scale = alpha / r (default: %(default)s)")
    p.add_argument("--targets", default="",
                   help="comma-separated linears to adapt, e.g. q_proj,v_proj (default: the server's)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example; longer prompts are cut (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="evaluate on held-out data every N steps too, for the accuracy curve of "
                        "'edge_client report'; 0: before and after training only (default: %(default)s)")
    p.add_argument("--no-eval-before", action="store_true", help="skip the held-out evaluation before training")
    p.add_argument("--eval-limit", type=int, default=200, help="held-out examples to evaluate, 0 for all (default: %(default)s)")
    p.add_argument("--wire-dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="dtype of activations and gradients on the wire (default: %(default)s)")
    p.add_argument("--objective", default="auto", choices=["auto", "lm", "labels"],
                   help="loss: 'lm' = cross-entropy over the whole vocabulary; 'labels' = over the label "
                        "tokens only (PET-style, C instead of V LM-head columns on the device); 'auto' = "
                        "labels for text/label data with one-token labels, else lm (default: %(default)s)")
    p.add_argument("--label-epsilon", type=float, default=None, metavar="EPS",
                   help="label differential privacy: release each training label once by randomised response with "
                        "this epsilon (kept with probability e^EPS/(e^EPS+C-1), else another label at random); the "
                        "cloud, which can read labels from the gradient, then learns only the released ones. Text/"
                        "label data only; costs accuracy at small EPS (default: off)")
    p.add_argument("--edge-layers", type=int, default=0, metavar="K",
                   help="DLoRA: run the first K frozen blocks on this device, with their adapters, so the cloud "
                        "receives their output instead of the embedding; exact, costs this device K blocks of "
                        "memory and compute (README: Privacy) (default: %(default)s)")
    p.add_argument("--token-epsilon", type=float, default=None, metavar="EPS",
                   help="token privacy (metric differential privacy): before anything is sent, each token, in "
                        "training and evaluation, is swapped for the token nearest its embedding plus noise of "
                        "density ~ exp(-EPS * |z|); epsilon is per unit of embedding distance (README: Privacy) "
                        "(default: off)")
    kr = p.add_argument_group("Kill and Revive", "which adapters stay live (trained here, with traffic); "
                              "killed ones are parked frozen on the cloud")
    kr.add_argument("--policy", default="all", choices=["all", "random", "static", "kr"],
                    help="'all' keeps every module live; 'kr' is Kill and Revive; 'random' and 'static' "
                         "are baselines at the same budget (default: %(default)s)")
    kr.add_argument("--budget", type=float, default=0.125, help="share of modules live after warm-up (default: %(default)s)")
    kr.add_argument("--revive", type=float, default=0.25, help="share of live slots given to revived modules (default: %(default)s)")
    kr.add_argument("--period", type=int, default=10, help="steps between selections (default: %(default)s)")
    kr.add_argument("--warmup-steps", type=int, default=10, help="steps with every module live (default: %(default)s)")
    kr.add_argument("--unit", default="module", choices=["module", "site"],
                    help="what is killed and revived as one: a module (one linear) or a site (the linears "
                         "sharing an input, e.g. q, k, v of a block; traffic is per site) (default: %(default)s)")
    sp = p.add_argument_group("SplitLoRA mode", "split federated fine-tuning: this device runs the embedding and "
                              "the first --cut-layer blocks with its own adapters, the cloud runs the rest with "
                              "server-side adapters it trains; client-side adapters are averaged (FedAvg, "
                              "weighted by examples) across the federation's clients")
    sp.add_argument("--mode", default="dlora", choices=["dlora", "splitlora"],
                    help="'dlora': the cloud runs every block, this device computes the adapters; "
                         "'splitlora': see above (default: %(default)s)")
    sp.add_argument("--cut-layer", type=int, default=4, help="blocks run on this device (default: %(default)s)")
    sp.add_argument("--aggregate-every", type=int, default=10,
                    help="steps between FedAvg rounds, I in the paper (default: %(default)s)")
    sp.add_argument("--clients", type=int, default=1,
                    help="clients each FedAvg round waits for (default: %(default)s)")
    sp.add_argument("--federation", default="default",
                    help="federation name: clients with the same name share server-side adapters and "
                         "average together (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for adapters and data order (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs/latest"),
                   help="directory for adapter_model.safetensors and run.json (default: %(default)s)")
    p.add_argument("--name", default="edge", help="client name shown in the server's log")
    rel = _connection_args(p, "connection and recovery")
    rel.add_argument("--retries", type=int, default=8,
                     help="attempts after a failed step, with exponential backoff; the session is re-opened "
                          "and killed adapters parked again if the server restarted (default: %(default)s)")
    rel.add_argument("--checkpoint-every", type=int, default=20,
                     help="save adapters + optimizer to OUT/checkpoint.pt every N steps; 0: only at the end "
                          "(default: %(default)s)")
    rel.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a run's adapters in the layout Hugging Face PEFT loads",
                       description="Copy a run's LoRA adapters into OUT as adapter_config.json + "
                                   "adapter_model.safetensors, the layout of Hugging Face PEFT: "
                                   "PeftModel.from_pretrained(base_model, OUT) then gives the same logits "
                                   "as the distributed model. Works on interrupted runs too (from checkpoint.pt).",
                       epilog="example:\n  edge_client export runs/latest --out my-adapter "
                              "--base-model HuggingFaceTB/SmolLM2-135M-Instruct",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a --out directory of edge_client train")
    p.add_argument("--out", type=Path, required=True, help="directory to write the PEFT adapter into")
    p.add_argument("--base-model", default=None,
                   help="base_model_name_or_path to record, e.g. a hub id or local path (default: the "
                        "name the server gave the model)")
    p.add_argument("--from-checkpoint", action="store_true",
                   help="export OUT_DIR/checkpoint.pt even if the final adapters exist")


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text with the cloud model and this device's adapters",
                       description="Generate text with the frozen cloud model plus LoRA adapters kept on this "
                                   "device. The prompt is tokenized and embedded here and tokens are chosen "
                                   "here; the cloud sees hidden states only and keeps a KV cache, so each new "
                                   "token costs one exchange per adapted site.",
                       epilog="examples:\n  edge_client generate --prompt 'Write a haiku about the sea.' --chat\n"
                              "  edge_client generate --adapters runs/latest --prompt 'Article: ...' "
                              "--max-new-tokens 8",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _connection_args(p)
    p.add_argument("--prompt", action="append", required=True,
                   help="the prompt; repeat for several, '-' reads one from stdin")
    p.add_argument("--adapters", default="none",
                   help="a PEFT adapter directory, e.g. the --out of a training run, or 'none' for the "
                        "base model (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--park", action="store_true",
                   help="upload the adapters to the cloud for this session: one round trip per token "
                        "instead of one per site, but the adapters leave the device")
    p.add_argument("--wire-dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="dtype of activations on the wire (default: %(default)s)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dlora",
                   help="where downloaded edge assets are kept (default: %(default)s)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="edge_client",
        description="DLoRA edge client: fine-tune an LLM that lives on a cloud_server with LoRA "
                    "adapters trained here, on data that never leaves this device.",
        epilog="run 'edge_client train --help' for the training options")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default: %(default)s)")
    sub = p.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    rep = sub.add_parser("report", help="render PNG plots of a finished run",
                         description="Write loss.png, accuracy.png (or heldout_loss.png), bytes.png and, for Kill "
                                     "and Revive runs, live.png into RUN_DIR from its run.json.")
    rep.add_argument("run_dir", type=Path, help="a --out directory of edge_client train")
    _export_parser(sub)
    _generate_parser(sub)
    sh = sub.add_parser("shard", help="split labelled data into non-IID shards, one per simulated device",
                        description="Split text/label JSONL into CLIENTS shards with label skew: each label's "
                                    "examples go to the clients in Dirichlet(alpha) proportions. Writes "
                                    "OUT/client<i>/{train,test}.jsonl and OUT/labels.txt.")
    sh.add_argument("--clients", type=int, default=3, help="number of shards (default: %(default)s)")
    sh.add_argument("--alpha", type=float, default=0.5,
                    help="Dirichlet concentration: small = few topics per client (default: %(default)s)")
    sh.add_argument("--data", type=Path, default=None, help="training JSONL (default: the embedded BBC News set)")
    sh.add_argument("--test", type=Path, default=None, help="held-out JSONL (default: BBC News' held-out part)")
    sh.add_argument("--seed", type=int, default=0, help="seed of the split (default: %(default)s)")
    sh.add_argument("--out", type=Path, required=True, help="directory for the shards")
    args = p.parse_args(argv)
    if args.command == "generate":
        if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
            p.error("--max-new-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    if args.command != "train":
        return args
    for name in ("steps", "batch_size", "rank", "max_length"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0.0 < args.test_fraction < 1.0:
        p.error("--test-fraction must be between 0 and 1")
    if args.lr <= 0 or args.alpha <= 0:
        p.error("--lr and --alpha must be positive")
    if args.token_epsilon is not None and not 0 < args.token_epsilon < float("inf"):
        p.error("--token-epsilon must be a finite number above 0")
    if args.edge_layers < 0:
        p.error("--edge-layers must not be negative")
    if args.edge_layers and args.mode != "dlora":
        p.error("--edge-layers is a DLoRA option; SplitLoRA runs --cut-layer blocks on this device")
    if min(args.cut_layer, args.aggregate_every, args.clients) < 1:
        p.error("--cut-layer, --aggregate-every and --clients must be at least 1")
    if args.retries < 0 or args.checkpoint_every < 0 or args.eval_every < 0:
        p.error("--retries, --checkpoint-every and --eval-every must not be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from common.malloc_tuning import tune_malloc
    tune_malloc()  # every step parses and builds megabyte messages: keep those buffers warm
    if args.command == "report":
        return _report(args.run_dir)
    if args.command == "export":
        return _export(args)
    if args.command == "shard":
        return _shard(args)
    if args.command == "generate":
        return _generate(args)
    from edge_client.data import DataError
    from edge_client.kill_revive import KRConfig
    from edge_client.session import CloudError, Credentials, RetryPolicy
    from edge_client.trainer import TrainConfig, run

    try:
        kr = KRConfig(policy=args.policy, budget=args.budget, revive=args.revive, period=args.period,
                      warmup_steps=args.warmup_steps, unit=args.unit, seed=args.seed)
        creds = Credentials.from_files(args.token, args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    except (ValueError, OSError) as exc:
        print(f"edge_client: {exc}", file=sys.stderr)
        return 2

    cfg = TrainConfig(server=args.server, data=args.data, test=args.test, template=args.template,
                      labels=[x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None,
                      test_fraction=args.test_fraction, steps=args.steps, batch_size=args.batch_size,
                      lr=args.lr, rank=args.rank, alpha=args.alpha,
                      targets=[t for t in args.targets.split(",") if t], max_length=args.max_length,
                      eval_limit=args.eval_limit, wire_dtype=args.wire_dtype, seed=args.seed,
                      objective=args.objective, label_epsilon=args.label_epsilon,
                      edge_layers=args.edge_layers, token_epsilon=args.token_epsilon, kr=kr, credentials=creds,
                      retry=RetryPolicy(retries=args.retries), checkpoint_every=args.checkpoint_every,
                      resume=args.resume, eval_every=args.eval_every, mode=args.mode, cut_layer=args.cut_layer,
                      aggregate_every=args.aggregate_every, clients=args.clients, federation=args.federation,
                      out=args.out, client_name=args.name, progress=not args.no_progress,
                      eval_before=not args.no_eval_before)
    try:
        summary = run(cfg)
    except (DataError, CloudError, ValueError) as exc:
        print(f"edge_client: {exc}", file=sys.stderr)
        return 2
    print(report(summary))
    return 0


def _shard(args: argparse.Namespace) -> int:
    from edge_client import data
    from edge_client.shards import make_shards

    try:
        if (args.data is None) != (args.test is None):
            raise data.DataError("give both --data and --test, or neither (for BBC News)")
        train, test = (args.data, args.test) if args.data else data.bbc_news(Path.home() / ".cache" / "dlora")
        parts = make_shards(train, test, args.out, args.clients, args.alpha, args.seed)
    except data.DataError as exc:
        print(f"edge_client: {exc}", file=sys.stderr)
        return 2
    for p in parts:
        mix = ", ".join(f"{k} {v}" for k, v in p["labels"].items())
        print(f"client{p['client']}: {p['train']} train / {p['test']} test examples ({mix}) -> {p['dir']}")
    print(f"labels: {(args.out / 'labels.txt').read_text().strip()}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from edge_client.peft_format import AdapterFormatError, export

    try:
        path = export(args.run_dir, args.out, args.base_model, args.from_checkpoint)
    except (AdapterFormatError, OSError) as exc:
        print(f"edge_client: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} and {path.parent / 'adapter_config.json'}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from edge_client.generation import GenerateConfig, generate_cli
    from edge_client.peft_format import AdapterFormatError
    from edge_client.session import CloudError, Credentials

    try:
        creds = Credentials.from_files(args.token, args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
        cfg = GenerateConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
        prompts = [sys.stdin.read() if p == "-" else p for p in args.prompt]
        return generate_cli(args.server, creds, None if args.adapters == "none" else Path(args.adapters),
                            prompts, cfg, chat=args.chat, park=args.park, wire_dtype=args.wire_dtype,
                            cache=args.cache)
    except (AdapterFormatError, CloudError, ValueError, OSError) as exc:
        print(f"edge_client: {exc}", file=sys.stderr)
        return 2


def _report(run_dir: Path) -> int:
    from edge_client import plots

    if not (run_dir / "run.json").exists():
        print(f"edge_client: {run_dir} has no run.json (is it an --out directory of edge_client train?)",
              file=sys.stderr)
        return 2
    try:
        files = plots.report(run_dir)
    except RuntimeError as exc:
        print(f"edge_client: {exc}", file=sys.stderr)
        return 2
    for f in files:
        print(f)
    return 0


def report(s: dict) -> str:
    lines = [f"model {s['model']} via {s['server']}, data {s['data']}",
             f"  {s['steps']} steps, {s['seconds_per_step']:.2f} s/step, {s['sites']} sites, {s['modules']} adapted "
             f"modules, objective {s['objective']}, policy {s['policy']}"]
    for key in ("accuracy", "loss"):
        if key in s["after"]:
            fmt = "{:.1%}" if key == "accuracy" else "{:.4f}"
            before = f"before {fmt.format(s['before'][key])} -> " if s.get("before") else ""
            lines.append(f"  held-out {key}: {before}after {fmt.format(s['after'][key])}"
                         f" ({s['after']['examples']} examples)")
    lines.append(f"  wire per step: sent {s['bytes_sent_per_step'] / 1e6:.2f} MB, "
                 f"received {s['bytes_received_per_step'] / 1e6:.2f} MB")
    lines.append(f"  edge compute per step: {s['edge_flops_per_step'] / 1e9:.3f} GFLOP "
                 f"(adapters {s['adapter_flops_per_step'] / 1e9:.3f})")
    lines.append(f"  adapters: {s['adapters']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
