"""The Python API examples run as written (against a tiny model's real server), and the README shows its
one verbatim."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["torch_loop.py", "hf_trainer.py", "trl_sft.py"]
SAVED = {"torch_loop.py": "my-adapters", "hf_trainer.py": "runs/trainer/adapters", "trl_sft.py": "runs/sft/adapters"}


@pytest.mark.parametrize("name", ["torch_loop.py"])
def test_readme_shows_the_example_verbatim(name):
    code = (ROOT / "examples" / name).read_text()
    assert f"```python\n{code}```" in (ROOT / "README.md").read_text(), f"README's copy of examples/{name} is stale"


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name, servers, tmp_path):
    env = {**os.environ, "DLORA_SERVER": servers["llama"], "HOME": str(tmp_path),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    adapters = tmp_path / SAVED[name]
    assert (adapters / "adapter_model.safetensors").exists() and (adapters / "adapter_config.json").exists()
    if name == "torch_loop.py":
        lines = [line for line in done.stdout.splitlines() if line.startswith("step ")]
        assert len(lines) == 4 and "modules live" in lines[-1]
