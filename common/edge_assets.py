"""The edge assets' file names and manifest: what cloud_server/assets.py writes and the edge reads.

The cloud packs these files once per model (and one blocks file per SplitLoRA
cut); the edge downloads them into its cache and builds its parts from them.
Both sides take every name from here, so neither can drift from the other.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

# The model's Hugging Face config: the edge builds its skeleton from it.
CONFIG = "config.json"
# Where the edge's parts sit in the model (a Manifest, as JSON).
MANIFEST = "edge_manifest.json"
# Embedding, final norm and (unless tied) LM head, fp32, under their names in the full model.
WEIGHTS = "edge_weights.safetensors"
# The cloud's probe outputs the edge must reproduce (common/edge_probe.py).
PROBE = "edge_probe.safetensors"
# The probe file's metadata key for the dtype the cloud computes in (it sets the tolerance).
PROBE_DTYPE_KEY = "cloud_dtype"
# Tokenizer files shipped when the model directory has them.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
)


def blocks_file(cut: int) -> str:
    """SplitLoRA: the file holding blocks [0, cut) (and any learned position table) for an edge cut at `cut`."""
    return f"edge_blocks_0-{cut}.safetensors"


@dataclass(frozen=True)
class Manifest:
    """Module paths of the edge's parts in the full model; `lm_head` is "" when the model has none."""

    embedding: str
    final_norm: str
    lm_head: str
    tied_lm_head: bool

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    @classmethod
    def read(cls, assets_dir: Path) -> Manifest:
        """The manifest in a downloaded assets directory."""
        path = Path(assets_dir) / MANIFEST
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"{path} is not an edge manifest ({exc}); delete the edge cache and download the "
                             "assets again") from None
