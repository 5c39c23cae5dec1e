"""`edge_client generate`: text from the frozen cloud model plus this device's adapters.

The prompt is tokenized and embedded here, the tokens are chosen here from the
LM head's logits; the cloud only ever sees hidden states, one position per
new token (it keeps the KV cache of the stream).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from common.lora import LoRAAdapter, LoRAConfig
from common.settings import setting
from edge_client.edge_model import EdgeModel
from edge_client.session import CloudSession, Credentials, StepStats

if TYPE_CHECKING:  # remote_model imports this module
    from edge_client.remote_model import RemoteConfig

# The RemoteConfig fields `edge_client generate` takes as flags (the others are training's).
CONNECTION = ("server", "wire_dtype", "cache", "timeout")


@dataclass
class GenerateConfig:
    """How tokens are chosen; each field is also an `edge_client generate` flag."""

    max_new_tokens: int = setting(64, "tokens to generate at most")
    temperature: float = setting(0.0, "0 for greedy decoding; above 0, sampling at this temperature")
    top_p: float = setting(1.0, "nucleus sampling mass when sampling")
    seed: int = setting(0, "sampling seed")
    stop_at_eos: bool = setting(True, "stop at the end-of-sequence token", cli=False)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")


@dataclass
class GenerateJob:
    """`edge_client generate`'s own flags: what the prompts run with."""

    adapters: str = setting("none", "a PEFT adapter directory, e.g. the --out of a training run, or 'none' for "
                                    "the base model")
    chat: bool = setting(False, "wrap the prompt in the model's chat template")
    park: bool = setting(False, "upload the adapters to the cloud for this session: one round trip per token "
                                "instead of one per site, but the adapters leave the device")

    @property
    def adapter_dir(self) -> Path | None:
        return None if self.adapters == "none" else Path(self.adapters)


@dataclass
class Generated:
    text: str
    token_ids: list[int]
    seconds: float
    stats: StepStats

    eos: bool = False                 # it ended at the end-of-sequence token

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / max(self.seconds, 1e-9)


def choose(logits: torch.Tensor, cfg: GenerateConfig, gen: torch.Generator) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: greedy, or temperature + top-p sampling."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = sorted_p.cumsum(-1) - sorted_p >= cfg.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(session: CloudSession, edge: EdgeModel, tokenizer, adapters: dict[str, LoRAAdapter],
             prompt_ids: list[int], cfg: GenerateConfig,
             on_token: Callable[[list[int]], bool | None] | None = None) -> Generated:
    """Generate up to cfg.max_new_tokens after `prompt_ids`; `on_token` sees the ids so far, and stops the
    generation by returning True (a stop sequence, a client gone)."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.tensor([prompt_ids])
    out: list[int] = []
    eos = tokenizer.eos_token_id
    ended = [False]

    def next_embedding(h: torch.Tensor) -> torch.Tensor | None:
        token = choose(edge.logits(h[:, -1]), cfg, gen)
        tid = int(token[0])
        if cfg.stop_at_eos and tid == eos:
            ended[0] = True
            return None
        out.append(tid)
        if on_token is not None and on_token(out):
            return None
        if len(out) >= cfg.max_new_tokens:
            return None
        return edge.embed(token[:, None])

    t0 = time.perf_counter()
    stats = session.generate(edge.embed(ids), torch.ones_like(ids, dtype=torch.bool), adapters, next_embedding)
    return Generated(tokenizer.decode(out, skip_special_tokens=True), out, time.perf_counter() - t0, stats,
                     ended[0])


def max_positions(config: dict) -> int:
    """The model's position limit from its config.json (0: none stated)."""
    return int(config.get("n_positions") or config.get("max_position_embeddings") or 0)


def fit_adapters(session: CloudSession, adapters: dict[str, LoRAAdapter], source: Path | None,
                 park: bool) -> dict[str, LoRAAdapter]:
    """Set a generation session up with `adapters` (read from `source`; None: the base model) and return
    the ones this device computes: all of them, or none when parked on the cloud (`park`) or absent."""
    import logging

    from edge_client import peft_format

    if source is None:
        # The base model alone: zero adapters (B = 0) parked on the cloud add
        # nothing to any output and need no exchange at all.
        session.park({n: LoRAAdapter(fin, fout, 1, 1.0) for n, (fin, fout) in session.module_shapes().items()}, [])
        return {}
    missing = sorted(set(session.module_names) - set(adapters))
    extra = sorted(set(adapters) - set(session.module_names))
    if missing or extra:
        raise peft_format.AdapterFormatError(
            f"{source} does not fit this model: missing {missing[:3]}, unknown {extra[:3]}")
    if park:
        session.park(adapters, [])
        logging.getLogger(__name__).info("parked %d adapters on the cloud: one round trip per token", len(adapters))
        return {}
    return adapters


def prompt_ids(tokenizer, prompt: str | list[dict[str, str]]) -> list[int]:
    """Token ids of a plain prompt, or of chat messages through the model's chat template."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def generate_cli(remote: RemoteConfig, credentials: Credentials, job: GenerateJob, prompts: list[str],
                 cfg: GenerateConfig) -> int:
    """What `edge_client generate` does: print each prompt's continuation as it is generated."""
    import json
    import logging
    import sys

    from edge_client import peft_format
    from edge_client.edge_model import load_tokenizer

    log = logging.getLogger(__name__)
    adapters: dict[str, LoRAAdapter] = {}
    targets: list[str] = []
    adapter_dir, chat, park = job.adapter_dir, job.chat, job.park
    if adapter_dir is not None:
        adapters, acfg = peft_format.load(adapter_dir)
        targets = sorted({n.rsplit(".", 1)[-1] for n in adapters})
    with CloudSession.from_config(remote, LoRAConfig(target_modules=targets), credentials=credentials) as session:
        assets = session.fetch_assets(remote.cache / "edge-assets")
        tokenizer = load_tokenizer(assets)
        edge = EdgeModel.from_assets(assets)
        limit = max_positions(json.loads((assets / "config.json").read_text()))
        computed = fit_adapters(session, adapters, adapter_dir, park)
        for prompt in prompts:
            ids = prompt_ids(tokenizer, [{"role": "user", "content": prompt}] if chat else prompt)
            run_cfg = cfg
            if limit and len(ids) + cfg.max_new_tokens > limit:
                if len(ids) >= limit:
                    raise ValueError(f"the prompt has {len(ids)} tokens; the model takes at most {limit}")
                run_cfg = dataclasses.replace(cfg, max_new_tokens=limit - len(ids))
                log.warning("capping --max-new-tokens at %d: the model takes %d positions", run_cfg.max_new_tokens,
                            limit)
            shown = [""]

            def stream(out: list[int], shown: list[str] = shown) -> None:
                now = tokenizer.decode(out, skip_special_tokens=True)
                if now.startswith(shown[0]):  # a partial UTF-8 sequence decodes differently until complete
                    sys.stdout.write(now[len(shown[0]):])
                    sys.stdout.flush()
                    shown[0] = now

            result = generate(session, edge, tokenizer, computed, ids, run_cfg, stream)
            sys.stdout.write(result.text[len(shown[0]):] + "\n")
            s = result.stats
            print(f"[{len(result.token_ids)} tokens in {result.seconds:.2f} s ({result.tokens_per_second:.1f} "
                  f"tokens/s); prompt {len(ids)} tokens; {s.sites} site exchanges; sent "
                  f"{s.bytes_sent / 1e6:.2f} MB, received {s.bytes_received / 1e6:.2f} MB]", file=sys.stderr)
    return 0
