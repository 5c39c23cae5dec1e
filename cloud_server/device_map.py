"""Placing the frozen model over several devices with accelerate (`cloud_server --device-map auto|FILE`)."""
from __future__ import annotations

import atexit
import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

DeviceMap = dict[str, int | str]

# 'auto' leaves room for what is not weights: the joint batches' activations and
# saved tensors, generation KV caches, parked adapters, gRPC buffers.
_GPU_SHARE, _CPU_SHARE = 0.8, 0.7
_FIX = ("give 'auto', or a JSON object of module names to devices, e.g. "
        '{"model.layers.0": 0, "model.layers.1": "cpu"}')


def load(path: Path, dtype: torch.dtype, spec: str | DeviceMap) -> nn.Module:
    """The causal LM at `path` placed by `spec`, with accelerate's hooks moving tensors between devices."""
    from transformers import AutoModelForCausalLM

    dmap = resolve(spec, path, dtype)
    disk = None
    if "disk" in dmap.values():
        # Used only when a weight cannot be read in place from the checkpoint's safetensors; under the
        # cache, not /tmp, which may be RAM.
        from cloud_server.model_store import cache_root

        (cache_root() / "offload").mkdir(parents=True, exist_ok=True)
        disk = tempfile.mkdtemp(dir=cache_root() / "offload")
        atexit.register(shutil.rmtree, disk, ignore_errors=True)
    by_device: dict[str, list[str]] = {}
    for name, dev in dmap.items():
        by_device.setdefault(str(dev), []).append(name or "(everything)")
    log.info("device map: %s", "; ".join(f"{d}: {', '.join(n)}" for d, n in by_device.items()))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=dmap, offload_folder=disk)
    offloaded = _one_forward_at_a_time(model)
    if offloaded:
        log.info("%d modules are offloaded: their weights are loaded onto their execution device at each forward",
                 offloaded)
    return model


def resolve(spec: str | DeviceMap, path: Path, dtype: torch.dtype) -> DeviceMap:
    """'auto', the path of a JSON file, or a map: a checked map naming a device for every weight."""
    skeleton = _skeleton(path, dtype)
    if spec == "auto":
        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory, get_max_memory

        budget = {d: int(m * (_CPU_SHARE if d == "cpu" else _GPU_SHARE)) for d, m in get_max_memory().items()}
        no_split: list[str] = list(getattr(skeleton, "_no_split_modules", None) or [])
        # Balanced: every GPU gets a share of the blocks, and so room for activations.
        budget = get_balanced_memory(skeleton, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
        return dict(infer_auto_device_map(skeleton, max_memory=budget, no_split_module_classes=no_split, dtype=dtype))
    where = f"--device-map {spec}" if isinstance(spec, str) else "device_map"
    if isinstance(spec, str):
        try:
            spec = json.loads(Path(spec).read_text())
        except OSError as exc:
            raise ValueError(f"{where}: cannot read it ({exc.strerror}); {_FIX}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{where}: not JSON ({exc}); {_FIX}") from None
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"{where}: not a JSON object of module names to devices; {_FIX}")
    modules = dict(skeleton.named_modules())
    unknown = [k for k in spec if k not in modules]
    if unknown:
        blocks = [n for n, m in modules.items() if isinstance(m, nn.ModuleList)][:1]
        raise ValueError(f"{where}: this model has no module named {', '.join(map(repr, unknown[:5]))}; names are "
                         f"those of model.named_modules(), e.g. {blocks[0] + '.0' if blocks else 'lm_head'!r}")
    dmap = {name: _device(name, dev, where) for name, dev in spec.items()}
    # Modules the file leaves out go on its first GPU, where they would run anyway (transformers would
    # put them on the CPU, which beside a GPU means offloaded there).
    main = next((d for d in dmap.values() if d not in ("cpu", "disk")), "cpu")
    for name, module in modules.items():
        if not any(name == k or name.startswith(k + ".") or k == "" for k in dmap) and (
                next(module.parameters(recurse=False), None) is not None
                or next(module.buffers(recurse=False), None) is not None):
            dmap[name] = main
    return dmap


def _device(name: str, value: object, where: str) -> int | str:
    """A map entry's device, checked against this host: a GPU index, 'cuda:N', 'cpu', 'disk', 'mps', ..."""
    bad = (f"{where}: {name!r}: {value!r} is not a device of this host; use a GPU index (0, 1, ...), 'cuda:N', "
           "'cpu' or 'disk'")
    if value in ("cpu", "disk"):
        return str(value)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(bad)  # noqa: TRY004 - a bad entry in the user's map: a usage error (exit 2)
    try:
        dev = torch.device("cuda", value) if isinstance(value, int) else torch.device(value)
    except RuntimeError:
        raise ValueError(bad) from None
    backend = getattr(torch, dev.type, None)
    count = int(backend.device_count()) if backend is not None and hasattr(backend, "device_count") else 0
    if (dev.index or 0) >= count:
        raise ValueError(f"{bad} ({count} {dev.type} devices here)")
    return (dev.index or 0) if dev.type == "cuda" else str(dev)


def _skeleton(path: Path, dtype: torch.dtype) -> nn.Module:
    """The model without weights (on the meta device): its module names and sizes."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    model.tie_weights()  # tied weights count once
    return model


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its accelerate hook's device (an offloaded module's weights are elsewhere)."""
    dev = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if dev is None:
        return next(module.parameters()).device
    return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)


def readable(module: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """`module`'s (name, tensor) pairs, those accelerate offloaded (meta here) read from where it keeps them."""
    for key, t in tensors:
        if t.device.type == "meta":
            owner, _, leaf = key.rpartition(".")
            hook: Any = module.get_submodule(owner)._hf_hook  # accelerate's offload hook
            t = hook.weights_map[leaf]
        yield key, t


def state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()`, offloaded weights included."""
    return dict(readable(module, module.state_dict().items()))


def _one_forward_at_a_time(model: nn.Module) -> int:
    """An offloaded module loads its weights before its forward and drops them after: two sessions'
    steps running through it at once would drop them under each other. Each gets a lock; returns how many."""
    offloaded = [m for m in model.modules() if getattr(getattr(m, "_hf_hook", None), "offload", False)]
    for module in offloaded:
        module.forward = _locked(module.forward, threading.Lock())
    return len(offloaded)


def _locked(forward, lock: threading.Lock):
    def run(*args, **kwargs):
        with lock:
            return forward(*args, **kwargs)

    return run
