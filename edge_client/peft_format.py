"""Adapters on disk in the layout Hugging Face PEFT loads.

A directory with `adapter_config.json` and `adapter_model.safetensors`, keyed
`base_model.model.<module>.lora_{A,B}.weight`, so `PeftModel.from_pretrained`
puts them on the same base model and gives the logits the distributed model
gave. `edge_client generate` reads the same layout back.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.atomic_write import replacing, write_text
from common.lora import LoRAAdapter, adapters_state

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
_KEY = re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_(?P<which>[AB])\.weight$")
# Models whose adapted projections are Conv1D ([in, out] weights); PEFT wants this flag for them.
_CONV1D_MODELS = {"gpt2"}


class AdapterFormatError(ValueError):
    """An adapter directory DLoRA cannot use; the message says what is wrong."""


def save(out: Path, adapters: dict[str, LoRAAdapter], rank: int, alpha: float, base_model: str = "",
         model_type: str = "", use_rslora: bool = False) -> Path:
    """Write adapter_model.safetensors and adapter_config.json, each whole (common/atomic_write.py)."""
    path = out / ADAPTER_FILE
    with replacing(path) as tmp:
        save_file(adapters_state(adapters), tmp, metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
           "bias": "none", "fan_in_fan_out": model_type in _CONV1D_MODELS, "use_rslora": use_rslora,
           "target_modules": sorted({n.rsplit(".", 1)[-1] for n in adapters}),
           "base_model_name_or_path": base_model, "inference_mode": True}
    write_text(out / CONFIG_FILE, json.dumps(cfg, indent=2) + "\n")
    return path


def load(directory: Path) -> tuple[dict[str, LoRAAdapter], dict]:
    """Adapters and their config from a PEFT LoRA directory (ours or PEFT's own)."""
    cfg_path, weights_path = directory / CONFIG_FILE, directory / ADAPTER_FILE
    for p in (cfg_path, weights_path):
        if not p.exists():
            raise AdapterFormatError(f"{directory} has no {p.name}: not a PEFT/DLoRA adapter directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"{cfg_path}: not valid JSON ({exc})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for feature in ("use_dora", "rank_pattern", "alpha_pattern"):
        if cfg.get(feature):
            raise AdapterFormatError(f"{cfg_path}: {feature} is not supported by DLoRA")
    rank, alpha = int(cfg.get("r", 0)), float(cfg.get("lora_alpha", 0))
    if rank < 1 or alpha <= 0:
        raise AdapterFormatError(f"{cfg_path}: needs r >= 1 and lora_alpha > 0, got r={rank}, lora_alpha={alpha}")
    scale = alpha / rank ** 0.5 if cfg.get("use_rslora") else alpha / rank
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(weights_path).items():
        m = _KEY.match(key.replace(".default.", "."))
        if m is None:
            raise AdapterFormatError(f"{weights_path}: unexpected tensor {key!r}")
        pairs.setdefault(m["name"], {})[m["which"]] = t
    adapters = {}
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(f"{weights_path}: {name} lacks lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterFormatError(f"{name}: shapes {list(a.shape)} and {list(b.shape)} do not fit rank {rank}")
        adapters[name] = LoRAAdapter.from_weights(a, b, scale).requires_grad_(False)
    return adapters, cfg


def export(run_dir: Path, out: Path, base_model: str | None = None, from_checkpoint: bool = False) -> Path:
    """Write a run's adapters to `out` in PEFT's layout.

    The source is the run's final adapter file, or its checkpoint.pt (the run
    was interrupted, or `from_checkpoint`).
    """
    if from_checkpoint or not (run_dir / ADAPTER_FILE).exists():
        adapters, rank, alpha, model, model_type = _from_checkpoint(run_dir)
    else:
        adapters, cfg = load(run_dir)
        rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
        model, model_type = cfg.get("base_model_name_or_path", ""), "gpt2" if cfg.get("fan_in_fan_out") else ""
    if out.resolve() == run_dir.resolve():
        raise AdapterFormatError("--out must differ from the run directory")
    return save(out, adapters, rank, alpha, base_model or model, model_type)


def _from_checkpoint(run_dir: Path):
    from common.lora import peft_key

    path = run_dir / "checkpoint.pt"
    if not path.exists():
        raise AdapterFormatError(f"{run_dir} has neither {ADAPTER_FILE} nor checkpoint.pt "
                                 "(is it an --out directory of edge_client train?)")
    state = torch.load(path, weights_only=True)  # plain data only: no pickled code runs
    if state.get("mode") == "splitlora":
        raise AdapterFormatError(f"{path} is a SplitLoRA checkpoint: it holds only the client-side adapters "
                                 "(the server-side ones are on the cloud); export the finished run instead")
    fp = state["fingerprint"]
    rank, alpha = int(fp["rank"]), float(fp["alpha"])
    adapters = {}
    for name in fp["modules"]:
        adapters[name] = LoRAAdapter.from_weights(state["adapters"][peft_key(name, "A")],
                                                  state["adapters"][peft_key(name, "B")], alpha / rank)
    return adapters, rank, alpha, state.get("model", ""), state.get("model_type", "")
