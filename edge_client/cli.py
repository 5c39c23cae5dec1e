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
  {"prompt": "...", "completion": "..."}     generation: held-out loss and ROUGE-L are reported
  {"prompt": "...", "choices": [...], "answer": 0}   multiple choice: accuracy is reported

Only hidden states, adapter activations and their gradients leave the device,
never text, token ids or labels as such; but the cloud that serves the model can
recover the text and the labels from them (docs/privacy.md). --label-epsilon
bounds what it learns of the labels.
"""


def _connection_args(p: argparse.ArgumentParser, title: str = "connection", server: bool = True):
    """The credentials (and --server), shared by every command that talks to a cloud_server."""
    g = p.add_argument_group(title)
    if server:
        g.add_argument("--server", default="127.0.0.1:50551",
                       help="cloud_server address HOST:PORT (default: %(default)s)")
    _credential_args(g)
    return g


def _credential_args(g) -> None:
    g.add_argument("--token", default=os.environ.get("DLORA_TOKEN"),
                   help="bearer token the server expects (default: $DLORA_TOKEN)")
    g.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) that signed the server's: enables TLS")
    g.add_argument("--tls-cert", type=Path, help="this client's certificate (PEM), for mutual TLS")
    g.add_argument("--tls-key", type=Path, help="this client's private key (PEM), for mutual TLS")
    g.add_argument("--tls-server-name", help="name to expect in the server certificate, if not the host")
    g.add_argument("--attestation-policy", type=Path, metavar="FILE",
                   help="TOML policy the cloud's TEE evidence must satisfy before anything (the token included) "
                        "is sent; its TLS certificate is then pinned, not checked against --tls-ca "
                        "(docs/attestation.md; example: examples/attestation-policy.toml)")


def _credentials(args: argparse.Namespace):
    from edge_client.session import Credentials

    return Credentials.from_files(args.token, args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name,
                                  args.attestation_policy)


def _train_parser(sub) -> argparse.ArgumentParser:
    from common.settings import add_arguments, group
    from edge_client.trainer import TrainConfig

    p = sub.add_parser("train", help="train LoRA adapters against a cloud_server",
                       description="Train rank-r LoRA adapters on private JSONL data. The cloud runs the "
                                   "frozen transformer blocks; this device runs the embedding, the LM head, "
                                   "the loss and the adapters.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Every flag comes from TrainConfig's fields (and their help), the credentials excepted.
    groups = add_arguments(p, TrainConfig)
    _credential_args(group(p, groups, "connection and recovery"))
    return p


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
    from common.settings import add_arguments, group
    from edge_client.generation import CONNECTION, GenerateConfig, GenerateJob
    from edge_client.remote_model import RemoteConfig

    p = sub.add_parser("generate", help="generate text with the cloud model and this device's adapters",
                       description="Generate text with the frozen cloud model plus LoRA adapters kept on this "
                                   "device. The prompt is tokenized and embedded here and tokens are chosen "
                                   "here; the cloud sees hidden states only and keeps a KV cache, so each new "
                                   "token costs one exchange per adapted site.",
                       epilog="examples:\n  edge_client generate --prompt 'Write a haiku about the sea.' --chat\n"
                              "  edge_client generate --adapters runs/latest --prompt 'Article: ...' "
                              "--max-new-tokens 8",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    # The flags come from the settings' fields (GenerateJob, GenerateConfig, RemoteConfig's connection ones),
    # the credentials and the repeatable --prompt excepted.
    groups = add_arguments(p, RemoteConfig, only=CONNECTION)
    _credential_args(group(p, groups, "connection and recovery"))
    p.add_argument("--prompt", action="append", required=True,
                   help="the prompt; repeat for several, '-' reads one from stdin")
    add_arguments(p, GenerateJob, groups=groups)
    add_arguments(p, GenerateConfig, groups=groups)


def _serve_parser(sub) -> None:
    from common.settings import add_arguments, group
    from edge_client.remote_model import RemoteConfig
    from edge_client.serve import CONNECTION, ServeConfig

    p = sub.add_parser("serve", help="serve the model with this device's adapters behind an OpenAI-compatible API",
                       description="Serve the cloud model plus LoRA adapters kept on this device as an "
                                   "OpenAI-compatible HTTP API (/v1/models, /v1/completions, "
                                   "/v1/chat/completions, streamed or not). Prompts are tokenized and embedded "
                                   "here and tokens chosen here, as with 'generate'; the cloud sees hidden "
                                   "states only.",
                       epilog="example:\n  edge_client serve --adapters runs/latest\n"
                              "  then: OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='none')",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    # The flags come from ServeConfig's fields and RemoteConfig's connection ones, the credentials excepted.
    groups = add_arguments(p, RemoteConfig, only=CONNECTION)
    _credential_args(group(p, groups, "connection and recovery"))
    add_arguments(p, ServeConfig, groups=groups)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="edge_client",
        description="DLoRA edge client: fine-tune an LLM that lives on a cloud_server with LoRA "
                    "adapters trained here, on data that never leaves this device.",
        epilog="run 'edge_client train --help' for the training options")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default: %(default)s)")
    sub = p.add_subparsers(dest="command", required=True)
    train = _train_parser(sub)
    rep = sub.add_parser("report", help="render PNG plots of a finished run",
                         description="Write loss.png, accuracy.png (or heldout_loss.png), bytes.png and, for Kill "
                                     "and Revive runs, live.png into RUN_DIR from its run.json.")
    rep.add_argument("run_dir", type=Path, help="a --out directory of edge_client train")
    _export_parser(sub)
    _generate_parser(sub)
    _serve_parser(sub)
    _attest_parser(sub)
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
    _network_presets(train, argv)
    args = p.parse_args(argv)
    if args.command == "generate":
        from common.settings import build
        from edge_client.generation import GenerateConfig, GenerateJob
        from edge_client.remote_model import RemoteConfig

        try:  # their checks run here: a bad value is a usage error
            args.remote = build(RemoteConfig, args, client_name="edge-generate", seed=0)
            args.sampling, args.job = build(GenerateConfig, args), build(GenerateJob, args)
        except ValueError as exc:
            p.error(str(exc))
    if args.command == "serve":
        from common.settings import build
        from edge_client.remote_model import RemoteConfig
        from edge_client.serve import ServeConfig

        try:  # their checks run here: a bad value is a usage error
            args.remote = build(RemoteConfig, args, client_name="edge-serve", seed=0)
            args.serve = build(ServeConfig, args)
        except ValueError as exc:
            p.error(str(exc))
    if args.command == "train":
        from common.settings import build
        from edge_client.trainer import TrainConfig

        try:
            args.config = build(TrainConfig, args)  # its checks run here: a bad value is a usage error
        except ValueError as exc:
            train.error(str(exc))
        args.config.kr.seed = args.config.remote.seed
    return args


def _network_presets(train: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """`train --network wan`: that network's presets become the defaults, so explicit flags still win."""
    from edge_client.trainer import NETWORKS

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--network", choices=list(NETWORKS), default="lan")
    known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    train.set_defaults(**NETWORKS[known.network])


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
    if args.command == "serve":
        return _serve(args)
    if args.command == "attest":
        return _attest(args)
    from dataclasses import replace

    from edge_client.attestation.errors import AttestationFailed
    from edge_client.data import DataError
    from edge_client.errors import CloudError
    from edge_client.trainer import run

    try:
        creds = _credentials(args)
    except (ValueError, OSError) as exc:
        print(f"edge_client: {exc}", file=sys.stderr)
        return 2
    cfg = replace(args.config, credentials=creds)
    try:
        summary = run(cfg)
    except AttestationFailed as exc:
        print(f"edge_client: nothing was sent: {exc}", file=sys.stderr)
        return 1
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


def _serve(args: argparse.Namespace) -> int:
    from edge_client.serve import serve

    return _reported(lambda: serve(args.remote, _credentials(args), args.serve))


def _generate(args: argparse.Namespace) -> int:
    from edge_client.generation import generate_cli

    def run() -> int:
        prompts = [sys.stdin.read() if p == "-" else p for p in args.prompt]
        return generate_cli(args.remote, _credentials(args), args.job, prompts, args.sampling)

    return _reported(run)


def _reported(command) -> int:
    """Run a command that talks to the cloud; its failures as one line and an exit status (1: the
    attestation failed and nothing was sent; 2: refused, unreachable or bad input)."""
    from edge_client.attestation.errors import AttestationFailed
    from edge_client.errors import CloudError
    from edge_client.peft_format import AdapterFormatError

    try:
        return command()
    except AttestationFailed as exc:
        print(f"edge_client: nothing was sent: {exc}", file=sys.stderr)
        return 1
    except (AdapterFormatError, CloudError, ValueError, OSError) as exc:
        print(f"edge_client: {exc}", file=sys.stderr)
        return 2


def _attest_parser(sub) -> None:
    p = sub.add_parser("attest", help="check what a cloud_server proves with its TEE evidence, and nothing else",
                       description="Ask the cloud_server for TEE evidence bound to a fresh nonce and to the TLS key "
                                   "this connection reaches, check it against POLICY, and print what it proves "
                                   "as JSON. Sends nothing but the handshake and the nonce. Exits 0 if every "
                                   "check passes, 1 if one fails (the message names it), 2 on a usage error.",
                       epilog="example:\n  edge_client attest --server gpu-host:50551 "
                              "--policy examples/attestation-policy.toml",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", default="127.0.0.1:50551", help="cloud_server address HOST:PORT (default: %(default)s)")
    p.add_argument("--policy", type=Path, required=True, metavar="FILE", help="the attestation policy (TOML)")
    p.add_argument("--tls-cert", type=Path, help="this client's certificate (PEM), if the server needs mutual TLS")
    p.add_argument("--tls-key", type=Path, help="this client's private key (PEM), for mutual TLS")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds the check may take (default: %(default)s)")


def _attest(args: argparse.Namespace) -> int:
    import json

    from edge_client.attestation import policy
    from edge_client.attestation.client import attest
    from edge_client.attestation.errors import AttestationFailed

    try:
        rules = policy.load(args.policy)
        read = lambda p: p.read_bytes() if p else None  # noqa: E731
        cloud = attest(args.server, rules, timeout=args.timeout, cert=read(args.tls_cert), key=read(args.tls_key))
    except ConnectionError as exc:
        print(f"edge_client attest: FAILED: {exc}", file=sys.stderr)
        return 1
    except (policy.PolicyError, OSError) as exc:
        print(f"edge_client: {exc}", file=sys.stderr)
        return 2
    except AttestationFailed as exc:
        print(f"edge_client attest: FAILED: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(cloud.claims, indent=2, sort_keys=True))
    print(f"edge_client attest: OK: {args.server} satisfies {args.policy}", file=sys.stderr)
    return 0


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
    for key in ("accuracy", "rouge_l", "loss"):
        if key in s["after"]:
            fmt = {"accuracy": "{:.1%}", "rouge_l": "{:.3f}"}.get(key, "{:.4f}")
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
