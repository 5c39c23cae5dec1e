"""DLoRAModelForCausalLM: the cloud's frozen blocks as a torch module; `loss.backward()` drives the remote backward.

    model = DLoRAModelForCausalLM.connect("cloud:50551", LoraConfig(r=8, lora_alpha=16))
    out = model(input_ids, attention_mask, labels=labels)   # forward through the cloud's blocks
    out.loss.backward()                                     # the cloud's backward, adapters' .grad filled
    optimizer.step()                                        # any torch optimizer: the adapters are Parameters

The device holds the tokenizer, the embedding, the final norm and LM head
(and with `edge_layers` the first blocks); the adapters are the module's only
parameters. A training forward opens a step stream and leaves it open at the
final hidden state; the matching backward sends its gradient and finishes the
step (`_RemoteBlocks`). A forward whose backward never comes (the loss
raised, the graph was dropped, or a new forward began) is abandoned: the cloud
frees the step and the session stays usable.
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from torch import nn

from common import tensor_codec as codec
from common.lora import ALL_LINEAR, LoRAAdapter, LoRAConfig, LoRALinear, seeded_adapters
from common.settings import setting
from common.wire_format import MAX_MICRO_BATCHES, WireFormat
from edge_client import label_privacy, peft_format, token_privacy
from edge_client.attestation import policy as attestation
from edge_client.attestation.policy import Policy
from edge_client.edge_model import EdgeModel, load_tokenizer
from edge_client.errors import CloudError
from edge_client.private_front import FrontGuard, PrivateFrontConfig
from edge_client.session import CloudSession, Credentials, RetryPolicy, SplitOptions, StepStats
from edge_client.split_model import FrontModel
from edge_client.step_stream import StepState

log = logging.getLogger(__name__)
_Model = TypeVar("_Model", bound="DLoRAModelForCausalLM")


@dataclass
class RemoteConfig:
    """Where the cloud is and what this device keeps to itself (see docs/privacy.md)."""

    server: str = setting("127.0.0.1:50551", "cloud_server address HOST:PORT", group="connection and recovery")
    edge_layers: int = setting(0, "DLoRA: run the first K frozen blocks on this device, with their adapters, so "
                                  "the cloud receives their output instead of the embedding; exact, costs this "
                                  "device K blocks of memory and compute (docs/privacy.md)", metavar="K")
    token_epsilon: float | None = setting(
        None, "token privacy (metric differential privacy): before anything is sent, each token, in training and "
              "evaluation, is swapped for the token nearest its embedding plus noise of density ~ exp(-EPS * |z|); "
              "epsilon is per unit of embedding distance (docs/privacy.md)", metavar="EPS")
    label_epsilon: float | None = setting(
        None, "label differential privacy: release each training label once by randomised response with this "
              "epsilon (kept with probability e^EPS/(e^EPS+C-1), else another label at random); the cloud, which "
              "can read labels from the gradient, then learns only the released ones. Text/label data only; costs "
              "accuracy at small EPS", metavar="EPS")
    label_token_ids: list[int] | None = setting(
        None, "Python API: the C class tokens label_epsilon protects in forward(labels=...)", cli=False)
    wire_dtype: str = setting("fp32", "dtype of activations (and gradients, unless --grad-dtype) on the wire; int8 "
                                      "sends one byte per value plus a float32 scale per token (its absolute "
                                      "maximum / 127), int4 half a byte plus a scale per 32 values",
                              choices=list(codec.WIRE_DTYPES), group="wire: how activations and gradients travel")
    grad_dtype: str | None = setting(None, "dtype of gradients on the wire; off: --wire-dtype's",
                                     choices=list(codec.WIRE_DTYPES),
                                     group="wire: how activations and gradients travel")
    factorised: bool = setting(True, "send each adapter's whole output (and receive its gradient) instead of its "
                                     "rank-r factors, scale*A x and B, which the cloud multiplies out: factors "
                                     "carry r numbers per token instead of the output width, and are the same "
                                     "step in exact arithmetic", group="wire")
    stochastic_rounding: bool = setting(False, "round int8/int4 gradients stochastically (unbiased) instead of "
                                               "to nearest", group="wire")
    client_name: str = setting("edge", "client name shown in the server's log", flag="--name")
    cache: Path = setting(Path.home() / ".cache" / "dlora", "where downloaded edge assets are kept")
    seed: int = setting(0, "seed of the adapters' initialisation, the data order, dropout and token noise")
    timeout: float = setting(600.0, "seconds one call to the cloud may take", group="connection and recovery")
    private_front: PrivateFrontConfig = setting(PrivateFrontConfig, "private front")
    micro_batches: int = setting(1, "DLoRA training steps: cut each step's batch into M micro-batches, all in "
                                    "flight at once, so the cloud computes one while another's exchange is on "
                                    "the wire; the same step (loss and gradients to float rounding), more "
                                    "messages. Pays on slow links (docs/results); 1: off",
                                 metavar="M", group="wire")

    def __post_init__(self) -> None:
        if self.edge_layers < 0:
            raise ValueError(f"--edge-layers must not be negative, got {self.edge_layers}")
        if self.token_epsilon is not None:
            token_privacy.check_epsilon(self.token_epsilon)
        if self.label_epsilon is not None and self.label_token_ids is not None:
            label_privacy.keep_probability(self.label_epsilon, len(self.label_token_ids))   # checks both
        for name in (self.wire_dtype, self.grad_dtype or self.wire_dtype):
            if name not in codec.WIRE_DTYPES:
                raise ValueError(f"wire dtype {name!r}: choose one of {', '.join(codec.WIRE_DTYPES)}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")
        if not 1 <= self.micro_batches <= MAX_MICRO_BATCHES:
            raise ValueError(f"--micro-batches must be 1 to {MAX_MICRO_BATCHES}, got {self.micro_batches}")

    def wire_format(self) -> WireFormat:
        return WireFormat.named(self.wire_dtype, self.grad_dtype, self.factorised, self.stochastic_rounding)


# LoraConfig fields DLoRA follows; the rest must keep PEFT's default, or the config is refused.
_FOLLOWED = {"r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora"}
# Bookkeeping with no effect on the adapters' math (fan_in_fan_out: DLoRA reads each layer's layout itself).
_IGNORED = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "fan_in_fan_out", "runtime_config", "megatron_core"}


def lora_settings(config=None) -> LoRAConfig:
    """DLoRA's LoRAConfig from a peft.LoraConfig (or a LoRAConfig, or None: the defaults), refusing
    what DLoRA cannot do with a message that names the fields."""
    if config is None or isinstance(config, LoRAConfig):
        return config or LoRAConfig()
    from peft import LoraConfig

    if not isinstance(config, LoraConfig):
        raise TypeError(f"lora_config must be a peft.LoraConfig, got {type(config).__name__}")
    default = LoraConfig()
    odd = [f.name for f in dataclasses.fields(config)
           if f.name not in _FOLLOWED | _IGNORED and getattr(config, f.name) != getattr(default, f.name)]
    if odd:
        raise ValueError(f"DLoRA does not support LoraConfig fields {odd[:6]}; it follows r, lora_alpha, "
                         "target_modules, lora_dropout and use_rslora (leave the others at PEFT's defaults)")
    if config.task_type not in (None, "CAUSAL_LM"):
        raise ValueError(f"task_type {config.task_type!r}: DLoRA trains causal language models (CAUSAL_LM)")
    targets = config.target_modules
    if isinstance(targets, str) and targets != ALL_LINEAR:
        raise ValueError(f"target_modules {targets!r}: give a list of module names (e.g. ['q_proj', 'v_proj']) "
                         "or 'all-linear'; regular expressions are not supported")
    names = [ALL_LINEAR] if targets == ALL_LINEAR else sorted({t.rsplit(".", 1)[-1] for t in targets or ()})
    return LoRAConfig(int(config.r), float(config.lora_alpha), names, float(config.lora_dropout),
                      bool(config.use_rslora))


def check_front(front: PrivateFrontConfig, edge_layers: int, splitlora: bool) -> None:
    """Refuse a private front where it has no blocks to train or where they would be sent."""
    if not front.enabled:
        return
    if splitlora:
        # FedAvg sends every client-side adapter to the cloud: the front would not stay private.
        raise ValueError("--front-privacy keeps DLoRA's --edge-layers blocks private; in SplitLoRA mode FedAvg "
                         "sends the front's adapters to the cloud, so it is refused there")
    if not edge_layers:
        raise ValueError("--front-privacy trains the blocks this device runs: give --edge-layers K (K >= 1)")


class _Parts:
    """The frozen model parts this device holds, kept out of the module tree: they are the cloud's
    public weights (re-sent with the assets), so state_dict() and checkpoints hold the adapters only."""

    def __init__(self, edge: EdgeModel, front: FrontModel | None) -> None:
        self.edge, self.front = edge, front


class DLoRAModelForCausalLM(nn.Module):
    """A causal LM whose frozen blocks run on a cloud_server; its parameters are the LoRA adapters."""

    # What Hugging Face's Trainer reads: the loss is ForCausalLMLoss, and it takes num_items_in_batch.
    loss_type = "ForCausalLM"
    accepts_loss_kwargs = True
    main_input_name = "input_ids"

    def __init__(self, session: CloudSession, assets: Path, lora: LoRAConfig, remote: RemoteConfig) -> None:
        super().__init__()
        from transformers import AutoConfig

        self.session = session
        self.remote_config = remote
        self.lora_settings = lora
        from transformers import GenerationConfig

        self.config = AutoConfig.from_pretrained(assets)
        # What trainers (TRL's SFTTrainer) read and set; generate() takes its own arguments.
        self.generation_config = GenerationConfig.from_model_config(self.config)
        self.tokenizer = load_tokenizer(assets)
        self.split = session.split
        if self.split is not None and remote.edge_layers:
            raise ValueError("edge_layers is a DLoRA option; a SplitLoRA model runs its cut_layer blocks here")
        if self.split is not None and remote.micro_batches > 1:
            raise ValueError("micro_batches is a DLoRA option: a SplitLoRA step is one call (its server-side "
                             "update is one per step)")
        # The blocks this device runs: SplitLoRA's first cut_layer, or DLoRA's edge_layers.
        self.front_layers = self.split.cut_layer if self.split is not None else remote.edge_layers
        front = FrontModel.from_assets(assets, self.front_layers) if self.front_layers else None
        self._parts = _Parts(front.head if front is not None else EdgeModel.from_assets(assets), front)
        # A federation's clients start from one initialisation (FedAvg averages copies of one model).
        adapters = seeded_adapters(session.module_shapes(), lora.r, lora.scale,
                                   self.split.seed if self.split is not None else remote.seed)
        layer = {m.name: s.layer for s in session.sites for m in s.modules}
        # Adapters of the cloud's blocks answer its site exchanges; those of this device's blocks live in
        # them (SplitLoRA: every client-side adapter; the server-side ones live on the cloud).
        self.remote_adapters = {n: a for n, a in adapters.items()
                                if self.split is None and layer[n] >= remote.edge_layers}
        if front is not None:
            front.add_adapters({n: a for n, a in adapters.items() if n not in self.remote_adapters}, lora.lora_dropout)
        self.adapters = adapters
        # The private front's adversary (this device's own inverter), when asked for.
        self.guard = self._guard(remote)
        self.lora = nn.ModuleDict({n.replace(".", "__"): a for n, a in adapters.items()})
        self.steps = 0                    # training forwards so far: each one's step id
        self._forwards = 0                # no-grad forwards so far (their token noise is drawn apart)
        self._pending = None              # the last training step's stream, until its backward ends it
        self.last_stats: StepStats | None = None

    def _guard(self, remote: RemoteConfig) -> FrontGuard | None:
        if not remote.private_front.enabled:
            return None
        check_front(remote.private_front, remote.edge_layers, splitlora=self.split is not None)
        weight = cast(torch.Tensor, self.edge.embedding.weight)
        return FrontGuard(remote.private_front, weight, remote.seed)

    # -- construction --------------------------------------------------------
    @classmethod
    def connect(cls: type[_Model], server: str, lora_config=None, *, credentials: Credentials | None = None,
                retry: RetryPolicy | None = None, split: SplitOptions | None = None,
                attestation_policy: str | Path | Policy | None = None, **settings) -> _Model:
        """Open a session on `server` with fresh adapters for `lora_config` (a peft.LoraConfig).

        `attestation_policy` (a TOML file or a loaded Policy): the cloud must prove with TEE evidence that
        it satisfies it before anything is sent (docs/attestation.md).

        `settings` are RemoteConfig's fields: edge_layers, token_epsilon, label_epsilon, label_token_ids,
        wire_dtype, grad_dtype, factorised, stochastic_rounding, client_name, cache, seed, timeout,
        private_front (a PrivateFrontConfig: the edge blocks trained against this device's inverter),
        micro_batches (pipelined training steps; see docs/configuration.md). `split`
        makes it a SplitLoRA client (see SplitLoRAModelForCausalLM)."""
        remote = RemoteConfig(server=server, **settings)
        if remote.label_epsilon is not None and not remote.label_token_ids:
            raise ValueError("label_epsilon protects the class tokens in forward(labels=...): give label_token_ids, "
                             "the token id of each class label (each label one token)")
        lora = lora_settings(lora_config)
        if attestation_policy is not None:
            rules = attestation_policy if isinstance(attestation_policy, Policy) else \
                attestation.load(Path(attestation_policy))
            credentials = dataclasses.replace(credentials or Credentials(), attestation=rules)
        if split is not None:
            split = dataclasses.replace(split, rank=lora.r, alpha=lora.lora_alpha)
        session = CloudSession.from_config(remote, lora, credentials=credentials, retry=retry, split=split)
        try:
            return cls(session, session.fetch_assets(remote.cache / "edge-assets"), lora, remote)
        except BaseException:
            session.close()
            raise

    @classmethod
    def from_pretrained(cls, path: str | Path, server: str, **kwargs) -> DLoRAModelForCausalLM:
        """Connect with the LoRA settings of a PEFT adapter directory and load its adapters."""
        from peft import LoraConfig

        adapters, cfg = peft_format.load(Path(path))
        lora = LoraConfig(r=int(cfg["r"]), lora_alpha=cfg["lora_alpha"], use_rslora=bool(cfg.get("use_rslora")),
                          target_modules=sorted({n.rsplit(".", 1)[-1] for n in adapters}))
        model = cls.connect(server, lora, **kwargs)
        model.load_adapters(adapters, str(path))
        return model

    def load_adapters(self, adapters: dict[str, LoRAAdapter], source: str = "the adapters") -> None:
        if set(adapters) != set(self.adapters):
            extra, missing = sorted(set(adapters) - set(self.adapters)), sorted(set(self.adapters) - set(adapters))
            raise ValueError(f"{source} do not fit this session's modules: unexpected {extra[:3]}, missing "
                             f"{missing[:3]} (were they trained on another model or target_modules?)")
        with torch.no_grad():
            for name, ad in adapters.items():
                self.adapters[name].lora_A.copy_(ad.lora_A)
                self.adapters[name].lora_B.copy_(ad.lora_B)
        parked = {n: self.adapters[n] for n in self.session.parked}
        if parked:  # the cloud applies parked copies: give it the loaded ones
            self.park(parked, [])

    def save_pretrained(self, path: str | Path) -> Path:
        """The adapters in PEFT's layout (PeftModel.from_pretrained loads them on the base model); for a
        SplitLoRA client with the federation's server-side ones, so the directory is the whole fine-tune."""
        s = self.lora_settings
        adapters = dict(self.adapters)
        if self.split is not None:
            server, scale, _ = self.session.server_adapters()
            adapters |= {name: LoRAAdapter.from_weights(a, b, scale) for name, (a, b) in server.items()}
        return peft_format.save(Path(path), adapters, s.r, s.lora_alpha, self.session.model.name,
                                self.session.model.model_type, use_rslora=s.use_rslora)

    def aggregate(self, round_: int, examples: int) -> tuple[int, int, int]:
        """SplitLoRA: FedAvg of this client's adapters with the federation's, weighted by `examples`;
        the average is loaded here. Returns (clients averaged, bytes sent, bytes received)."""
        if self.split is None:
            raise ValueError("aggregate() is SplitLoRA's FedAvg; this is a DLoRA model")
        self.settle()
        return self.session.aggregate(round_, examples, self.adapters)

    # -- the parts -----------------------------------------------------------
    @property
    def edge(self) -> EdgeModel:
        """Embedding, final norm and LM head."""
        return self._parts.edge

    @property
    def front(self) -> FrontModel | None:
        """With edge_layers: the first blocks, run here."""
        return self._parts.front

    def train(self, mode: bool = True) -> DLoRAModelForCausalLM:
        """Train mode turns LoRA dropout on; the frozen parts stay in eval mode, as the cloud's blocks do."""
        super().train(mode)
        if self.front is not None:
            for m in self.front.model.modules():
                if isinstance(m, LoRALinear):
                    m.dropout.train(mode)
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.edge.embedding

    # -- what trainers ask of a Hugging Face model (TRL's SFTTrainer, Trainer) --------
    model_tags: list[str] = []

    @property
    def base_model(self) -> _Backbone:
        """The blocks and the final norm, as a trainer that computes the loss from the LM head itself calls
        them (TRL's fused LM head): `(input_ids, attention_mask)` -> `.last_hidden_state`, normed."""
        return _Backbone(self)

    def get_output_embeddings(self) -> nn.Module:
        return self.edge.lm_head

    def add_model_tags(self, tags: list[str] | str) -> None:
        """Tags a trainer names in the model card it writes (TRL adds 'trl', 'sft')."""
        self.model_tags = sorted(set(self.model_tags) | ({tags} if isinstance(tags, str) else set(tags)))

    def gradient_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """Refused: the blocks, and so their activations, are on the cloud; nothing here to recompute."""
        raise ValueError("gradient checkpointing does not apply to DLoRAModelForCausalLM: the blocks and their "
                         "activations live on the cloud. Turn it off (SFTConfig(gradient_checkpointing=False))")

    def live_adapters(self) -> dict[str, LoRAAdapter]:
        """The cloud-side adapters this device computes now (Kill and Revive parks the others on the cloud)."""
        return {n: a for n, a in self.remote_adapters.items() if n not in self.session.parked_adapters}

    # -- forward -------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, num_items_in_batch=None, **kwargs):
        """Logits [B, T, V] for `input_ids`, and with `labels` the causal-LM loss (labels shifted inside,
        -100 ignored), as a Hugging Face CausalLMOutputWithPast."""
        from transformers.loss.loss_utils import ForCausalLMLoss
        from transformers.modeling_outputs import CausalLMOutputWithPast

        unsupported = sorted(k for k, v in kwargs.items() if v is not None and v is not False
                             and k not in ("return_dict", "use_cache"))
        if unsupported:
            raise TypeError(f"DLoRAModelForCausalLM.forward does not take {unsupported}; it takes input_ids, "
                            "attention_mask and labels")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        cfg = self.remote_config
        if labels is not None and cfg.label_epsilon is not None and cfg.label_token_ids:
            # Label DP: the class tokens are released (in the labels and where the input carries them).
            input_ids, labels = label_privacy.release_tokens(input_ids, mask, labels, cfg.label_token_ids,
                                                             cfg.label_epsilon, cfg.seed)
        hidden = self.final_hidden(input_ids, mask)
        logits = self.edge.logits(hidden)
        loss = None
        if labels is not None:
            loss = ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def final_hidden(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The last block's output [B, T, H] (before the final norm): through the cloud, differentiable
        with respect to the adapters when grad is enabled."""
        self.settle()
        live = self.live_adapters()
        params = [p for a in live.values() for p in (a.lora_A, a.lora_B)]
        train = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if train:
            self.steps += 1
            step = self.steps
        else:
            self._forwards += 1
            step = -self._forwards        # token noise of evaluation batches is drawn apart from training's
        first = self.first_hidden(input_ids, mask, step)
        if train and self.guard is not None:
            first = self.guard.attach(first, input_ids, mask)
        if not train:
            hidden, self.last_stats = self.session.forward(first.detach(), mask, live)
            return hidden
        handle = _StepHandle(self, step, first, mask, live, params)
        return _RemoteBlocks.apply(handle, first, *params)

    def first_hidden(self, input_ids: torch.Tensor, mask: torch.Tensor, step: int) -> torch.Tensor:
        """What the cloud's first block receives: the embedding, or the output of this device's blocks;
        with token_epsilon, of the released tokens (noise drawn for `step`, so a replay draws the same)."""
        cfg = self.remote_config
        if cfg.token_epsilon is not None:
            # nn.Module's __getattr__ is typed Tensor | Module; the embedding's weight is a tensor.
            weight = cast(torch.Tensor, self.edge.embedding.weight)
            input_ids = token_privacy.perturb(input_ids, mask, weight, cfg.token_epsilon,
                                              token_privacy.generator_for(cfg.seed, step))
        return self.edge.embed(input_ids) if self.front is None else self.front(input_ids, mask)

    def warm_up_front(self, texts: list[str], lr: float = 2e-3, max_length: int = 128,
                      batch_size: int = 8) -> list[dict[str, float]]:
        """The private front's warm-up on public `texts`, before any private step (nothing is sent)."""
        front = self.front
        if self.guard is None or front is None:
            raise ValueError("warm_up_front needs a private front: edge_layers >= 1 and front_privacy > 0")
        batches = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                                 return_tensors="pt")
            batches.append((enc.input_ids, enc.attention_mask.bool()))
        params = [p for n, a in self.adapters.items() if n not in self.remote_adapters for p in a.parameters()]
        return self.guard.warm_up(front, params, batches, lr=lr)

    def settle(self) -> None:
        """End the last training step if its backward never came: the cloud frees it, the session stays."""
        stream, self._pending = self._pending, None
        if stream is None or stream.state in (StepState.DONE, StepState.FAILED):
            return
        if stream.state is not StepState.ABANDONED:
            log.warning("step %d: its backward never came before the next call; abandoning it (the cloud "
                        "frees it). Call loss.backward() before the next forward.", stream.step_id)
            stream.abandon("a new call began before its backward")
        stream.drain()

    # -- Kill and Revive and generation ----------------------------------------
    def park(self, kill: dict[str, LoRAAdapter], revive: list[str]) -> tuple[int, int]:
        """Freeze `kill` on the cloud (no traffic, no gradient) and bring `revive` back; (bytes sent, received)."""
        self.settle()
        return self.session.park(kill, revive)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0) -> torch.Tensor:
        """Each row's tokens followed by its new ones ([B, T + n], right-padded with the pad token).
        Greedy by default; do_sample draws with temperature and top_p."""
        from edge_client.generation import GenerateConfig, generate

        if self.front is not None:
            raise CloudError(f"generation runs every block on the cloud; this model keeps {self.front_layers} "
                             "blocks on the device (a DLoRA model without edge_layers generates)")
        self.settle()
        cfg = GenerateConfig(max_new_tokens, temperature if do_sample else 0.0, top_p if do_sample else 1.0, seed)
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        rows = []
        for ids, keep in zip(input_ids, mask):
            got = generate(self.session, self.edge, self.tokenizer, self.remote_adapters, ids[keep].tolist(), cfg)
            rows.append(torch.cat([ids, torch.tensor(got.token_ids, dtype=ids.dtype)]))
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        return torch.stack([torch.cat([r, r.new_full((width - len(r),), pad)]) for r in rows])

    def close(self) -> None:
        self.settle()
        self.session.close()

    def __enter__(self) -> DLoRAModelForCausalLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Backbone:
    """DLoRAModelForCausalLM.base_model: the cloud's blocks and this device's final norm."""

    def __init__(self, model: DLoRAModelForCausalLM) -> None:
        self.model = model

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        unsupported = sorted(k for k, v in kwargs.items() if v is not None and v is not False
                             and k not in ("return_dict", "use_cache"))
        if unsupported:
            raise TypeError(f"DLoRAModelForCausalLM.base_model does not take {unsupported}; it takes input_ids "
                            "and attention_mask")
        if self.model.remote_config.label_epsilon is not None:
            raise ValueError("label_epsilon releases the labels in forward(labels=...); a trainer that computes "
                             "the loss from base_model would train on the true ones: use one that calls forward")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        hidden = self.model.final_hidden(input_ids, mask)
        return BaseModelOutputWithPast(last_hidden_state=self.model.edge.final_norm(hidden))


class _StepHandle:
    """One training step between its forward and its backward. Only the autograd graph holds it:
    when the graph is dropped without a backward, the step is abandoned."""

    def __init__(self, model: DLoRAModelForCausalLM, step: int, first: torch.Tensor, mask: torch.Tensor,
                 live: dict[str, LoRAAdapter], params: list[nn.Parameter]) -> None:
        self.model, self.step, self.first, self.mask, self.live, self.params = model, step, first, mask, live, params
        self.box: list = [None]           # the step's current stream (a replay replaces it)
        weakref.finalize(self, _abandon, self.box)

    @property
    def stream(self):
        return self.box[0]

    def _open(self) -> torch.Tensor:
        m = self.model
        dropout = m.lora_settings.lora_dropout if m.training else 0.0   # as PEFT: only in train mode
        self.box[0] = m.session.open_step(self.step, self.first, self.mask, self.live, train=True,
                                          dropout=dropout, seed=m.remote_config.seed,
                                          micro_batches=m.remote_config.micro_batches)
        m._pending = self.stream
        return self.stream.open()

    def forward(self) -> torch.Tensor:
        return self.model.session.with_retries(f"step {self.step}", self._open)

    def backward(self, grad: torch.Tensor) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
        """Finish the step with dL/d(final hidden): the adapters' gradients and dL/d(first hidden)."""
        if self.stream.state is StepState.ABANDONED:
            raise RuntimeError(f"step {self.step} was abandoned because another call reached the cloud before "
                               "its backward; call loss.backward() before the next forward")
        def attempt() -> None:
            # Not paused: the stream failed, so replay the forward (same inputs and noise).
            if self.stream.state is not StepState.PAUSED:
                self._open()
            if self.model.front is not None:
                self.stream.expect_cut_grad(tuple(self.first.shape))
            self.stream.finish(grad)

        self.model.session.with_retries(f"step {self.step}", attempt)
        self.model.last_stats = self.stream.stats
        cut = self.stream.cut_grad if self.model.front is not None else None
        if self.model.front is not None and cut is None:
            raise CloudError("the cloud ended the step without the gradient of the edge blocks' output")
        grads = self.stream.grads
        return [grads.get(id(p)) for p in self.params], cut


def _abandon(box: list) -> None:
    """The finaliser of a step's handle: a step whose graph went without a backward is given up."""
    if box[0] is not None:
        box[0].abandon("its autograd graph was dropped before backward")


class _RemoteBlocks(torch.autograd.Function):
    """The cloud's blocks as one autograd node: forward opens the step, backward finishes it."""

    @staticmethod
    def forward(ctx, handle: _StepHandle, first: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.handle = handle
        return handle.forward()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        handle, ctx.handle = ctx.handle, None
        param_grads, first_grad = handle.backward(grad)
        return (None, first_grad, *param_grads)


class SplitLoRAModelForCausalLM(DLoRAModelForCausalLM):
    """A SplitLoRA client: blocks [0, cut_layer) and their adapters here, the rest with server-side
    adapters on the cloud; `aggregate()` averages the client adapters across the federation."""

    @classmethod
    def connect(cls, server: str, lora_config=None, *, cut_layer: int = 4, federation: str = "default",
                clients: int = 1, server_lr: float = 2e-3, **kwargs) -> SplitLoRAModelForCausalLM:
        """`server_lr`: the learning rate of the cloud's optimizer for the server-side adapters."""
        seed = kwargs.get("seed", 0)
        split = SplitOptions(cut_layer, federation, clients, lr=server_lr, seed=seed)
        return super().connect(server, lora_config, split=split, **kwargs)
