"""DLoRA edge client: private data, tokenizer, embedding, LM head and the live LoRA adapters.

The Python API (docs/python-api.md):

    from edge_client import DLoRAModelForCausalLM, KillRevive, KRConfig, PrivateFrontConfig,
                             SplitLoRAModelForCausalLM
"""
from __future__ import annotations

import importlib

# Imported on first use, so `python -m edge_client --help` stays quick.
_EXPORTS = {
    "DLoRAModelForCausalLM": "edge_client.remote_model",
    "SplitLoRAModelForCausalLM": "edge_client.remote_model",
    "RemoteConfig": "edge_client.remote_model",
    "KillRevive": "edge_client.kill_revive",
    "KRConfig": "edge_client.kill_revive",
    "PrivateFrontConfig": "edge_client.private_front",
    "Credentials": "edge_client.session",
    "RetryPolicy": "edge_client.session",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'edge_client' has no attribute {name!r}")
