"""The named-model registry on small GGUFs written here, split over real installed distributions.

Each part lies in a distribution laid out as pip installs one (a package folder and
a .dist-info with METADATA and RECORD) on a directory put on sys.path, so the
registry finds it exactly as it finds the real packages: through importlib.metadata
and RECORD, never by importing anything.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib
import os
from pathlib import Path

import numpy as np
import pytest

from cloud_server import model_registry as reg
from cloud_server.model_registry import GgufModel, ModelInstallError, Part


def write_gguf(path: Path, arch: str = "llama", blocks: int = 2, hidden: int = 32, file_type: int = 15) -> bytes:
    """A small well-formed GGUF, written with the `gguf` package's writer: header, metadata, one tensor."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_name("tiny test model")
    writer.add_block_count(blocks)
    writer.add_embedding_length(hidden)
    writer.add_file_type(file_type)
    writer.add_token_list([f"t{i}" for i in range(300)])   # an array of strings, as tokenizers ship
    writer.add_token_scores([0.0] * 300)                     # an array of floats
    writer.add_tensor("token_embd.weight", np.arange(300 * hidden, dtype=np.float32).reshape(300, hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def install_dist(site: Path, package: str, version: str, files: dict[str, bytes]) -> None:
    """A distribution as pip lays it out in site-packages: its files and a dist-info listing them."""
    info = site / f"{package.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
    rows = []
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
        rows.append(f"{rel},{_record_hash(data)},{len(data)}")
    rows += [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(rows) + "\n")


def split(data: bytes, n: int) -> list[bytes]:
    step = -(-len(data) // n)
    return [data[i:i + step] for i in range(0, len(data), step)]


def entry(name: str, data: bytes, slices: list[bytes], package: str = "dlora-test-slice", **over) -> GgufModel:
    """A registry entry for `data` cut into `slices`, each in distribution `package`N 1.0."""
    parts = tuple(Part(f"{package}{i}", "1.0", f"{package.replace('-', '_')}{i}/data/part{i}.bin", len(s),
                       hashlib.sha256(s).hexdigest()) for i, s in enumerate(slices, 1))
    fields = dict(name=name, title="test model", gguf_file=f"{name}.gguf", parts=parts,
                  sha256=hashlib.sha256(data).hexdigest(), size=len(data), architecture="llama", block_count=2,
                  embedding_length=32, file_type=15, cache_dir=name, model_type="llama")
    fields.update(over)
    return GgufModel(**fields)


@pytest.fixture
def site(tmp_path, monkeypatch) -> Path:
    """A site-packages directory on sys.path for this test only."""
    path = tmp_path / "site-packages"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    importlib.invalidate_caches()
    return path


@pytest.fixture
def gguf_bytes(tmp_path) -> bytes:
    return write_gguf(tmp_path / "made.gguf")


def install_slices(site: Path, model: GgufModel, slices: list[bytes]) -> None:
    for part, data in zip(model.parts, slices):
        install_dist(site, part.package, part.version, {part.path: data})
    importlib.invalidate_caches()


def assemble_checked(model: GgufModel, cache: Path) -> Path:
    gguf = reg.assemble(model, reg.locate_parts(model), cache / "gguf" / model.gguf_file)
    reg.check_header(model, gguf)
    return gguf


def test_parts_found_through_record_assemble_to_the_committed_digest(site, gguf_bytes, tmp_path):
    slices = split(gguf_bytes, 3)
    model = entry("tiny-ok", gguf_bytes, slices, package="dlora-test-ok")
    install_slices(site, model, slices)
    gguf = assemble_checked(model, tmp_path / "cache")
    assert gguf.read_bytes() == gguf_bytes
    assert not list(gguf.parent.glob(".*.tmp")), "no temporary file left behind"
    meta = reg.read_gguf_metadata(gguf)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    assert meta["tokenizer.ggml.tokens"] == 300
    assert "general.name='tiny test model'" in reg.describe(meta) and "Q4_K_M" in reg.describe(meta)


def test_header_reader_agrees_with_the_gguf_package(gguf_bytes, tmp_path):
    from gguf import GGUFReader

    path = tmp_path / "made.gguf"
    ours = reg.read_gguf_metadata(path)
    theirs = GGUFReader(str(path))
    for key in ("general.architecture", "general.name", "llama.block_count", "llama.embedding_length",
                "general.file_type"):
        assert ours[key] == theirs.fields[key].contents(), key
    assert ours["GGUF.tensor_count"] == len(theirs.tensors) == 1


def test_a_part_with_other_bytes_is_refused_by_name_and_digest(site, gguf_bytes, tmp_path):
    slices = split(gguf_bytes, 3)
    model = entry("tiny-tampered", gguf_bytes, slices, package="dlora-test-tampered")
    bad = bytearray(slices[1])
    bad[10] ^= 0xFF
    install_slices(site, model, [slices[0], bytes(bad), slices[2]])
    with pytest.raises(ModelInstallError) as err:
        assemble_checked(model, tmp_path / "cache")
    text = str(err.value)
    assert "tiny-tampered: part 2 of 3 (dlora-test-tampered2==1.0" in text
    assert model.parts[1].sha256 in text and hashlib.sha256(bad).hexdigest() in text
    assert "--force-reinstall dlora-test-tampered2==1.0" in text
    assert not list((tmp_path / "cache" / "gguf").glob("*")), "nothing assembled is left"


def test_a_whole_file_digest_other_than_the_committed_one_is_refused(site, gguf_bytes, tmp_path):
    """Every part as recorded, but the committed digest of the whole is another: refused, naming both."""
    slices = split(gguf_bytes, 2)
    model = entry("tiny-digest", gguf_bytes, slices, package="dlora-test-digest", sha256="ab" * 32)
    install_slices(site, model, slices)
    with pytest.raises(ModelInstallError) as err:
        assemble_checked(model, tmp_path / "cache")
    text = str(err.value)
    assert "tiny-digest: the assembled tiny-digest.gguf has sha256 " + hashlib.sha256(gguf_bytes).hexdigest() in text
    assert "expected " + "ab" * 32 in text and "install tiny-digest" in text


def test_a_single_file_model_is_checked_in_place(site, gguf_bytes, tmp_path):
    model = entry("tiny-single", gguf_bytes, [gguf_bytes], package="dlora-test-single")
    install_slices(site, model, [gguf_bytes])
    gguf = assemble_checked(model, tmp_path / "cache")
    assert gguf == site / model.parts[0].path and not (tmp_path / "cache").exists(), "not copied"
    tampered = dataclasses.replace(model, sha256="cd" * 32)
    with pytest.raises(ModelInstallError, match="tiny-single: the assembled tiny-single.gguf has sha256"):
        assemble_checked(tampered, tmp_path / "cache")


def test_a_wrong_architecture_is_refused_before_converting(site, tmp_path):
    """Digests right (the registry recorded these very bytes), but the header names another family."""
    data = write_gguf(tmp_path / "llama.gguf", arch="llama")
    slices = split(data, 2)
    model = entry("tiny-arch", data, slices, package="dlora-test-arch", architecture="gemma3")
    install_slices(site, model, slices)
    with pytest.raises(ModelInstallError) as err:
        assemble_checked(model, tmp_path / "cache")
    text = str(err.value)
    assert "tiny-arch: the GGUF header of tiny-arch.gguf says general.architecture='llama'" in text
    assert "expected general.architecture='gemma3'" in text and "refusing to convert" in text


def test_wrong_sizes_in_the_header_are_refused(site, tmp_path):
    data = write_gguf(tmp_path / "deep.gguf", blocks=5, hidden=64)
    model = entry("tiny-sizes", data, [data], package="dlora-test-sizes")
    install_slices(site, model, [data])
    with pytest.raises(ModelInstallError, match=r"llama.block_count=5, llama.embedding_length=64 .*expected "
                                                r"llama.block_count=2, llama.embedding_length=32"):
        assemble_checked(model, tmp_path / "cache")


def test_bytes_that_are_not_a_gguf_are_refused(site, tmp_path):
    data = b"PK\x03\x04" + bytes(200)   # a zip, say
    model = entry("tiny-zip", data, [data], package="dlora-test-zip")
    install_slices(site, model, [data])
    with pytest.raises(ModelInstallError, match=r"tiny-zip: .* is not a readable GGUF \(no GGUF magic: the file "
                                                r"starts with b'PK\\x03\\x04'"):
        assemble_checked(model, tmp_path / "cache")
    truncated = write_gguf(tmp_path / "t.gguf")[:60]   # cut inside the metadata
    model = entry("tiny-cut", truncated, [truncated], package="dlora-test-cut")
    install_slices(site, model, [truncated])
    with pytest.raises(ModelInstallError, match="tiny-cut: .* is not a readable GGUF"):
        assemble_checked(model, tmp_path / "cache")


def test_a_missing_part_is_refused_by_name(site, gguf_bytes, tmp_path):
    slices = split(gguf_bytes, 3)
    model = entry("tiny-missing", gguf_bytes, slices, package="dlora-test-missing")
    install_slices(site, model, [slices[0], slices[1]])   # part 3's package never installed
    with pytest.raises(ModelInstallError) as err:
        reg.locate_parts(model)
    assert ("tiny-missing: part 3 of 3 (dlora-test-missing3==1.0: dlora_test_missing3/data/part3.bin) is missing: "
            "the package is not installed; run `python -m cloud_server.model_registry install tiny-missing`"
            in str(err.value))
    install_dist(site, "dlora-test-missing3", "1.0", {"dlora_test_missing3/data/part3.bin": slices[2]})
    importlib.invalidate_caches()
    (site / model.parts[1].path).unlink()   # installed, but its file deleted since
    with pytest.raises(ModelInstallError, match=r"tiny-missing: part 2 of 3 \(dlora-test-missing2==1.0: "
                                                r"dlora_test_missing2/data/part2.bin\) is missing: .* does not exist"):
        reg.locate_parts(model)
    assert reg.missing_packages(model) == []


def test_a_part_the_distribution_does_not_list_is_refused(site, gguf_bytes):
    slices = split(gguf_bytes, 2)
    model = entry("tiny-unlisted", gguf_bytes, slices, package="dlora-test-unlisted")
    install_dist(site, model.parts[0].package, "1.0", {model.parts[0].path: slices[0]})
    install_dist(site, model.parts[1].package, "1.0", {"dlora_test_unlisted2/data/other.bin": slices[1]})
    importlib.invalidate_caches()
    with pytest.raises(ModelInstallError, match="part 2 of 2 .* is missing: the installed distribution does not "
                                                "list that file"):
        reg.locate_parts(model)


def test_another_installed_version_is_refused(site, gguf_bytes):
    slices = split(gguf_bytes, 2)
    model = entry("tiny-version", gguf_bytes, slices, package="dlora-test-version")
    install_dist(site, model.parts[0].package, "1.0", {model.parts[0].path: slices[0]})
    install_dist(site, model.parts[1].package, "2.0", {model.parts[1].path: slices[1]})
    importlib.invalidate_caches()
    assert reg.missing_packages(model) == [("dlora-test-version2", "1.0")]
    with pytest.raises(ModelInstallError, match=r"part 2 of 2 \(dlora-test-version2==1.0: .*\): version 2.0 is "
                                                r"installed, 1.0 expected"):
        reg.locate_parts(model)


def test_parts_out_of_order_are_refused_by_name(site, gguf_bytes, tmp_path):
    slices = split(gguf_bytes, 3)
    model = entry("tiny-order", gguf_bytes, slices, package="dlora-test-order")
    install_slices(site, model, [slices[1], slices[0], slices[2]])   # parts 1 and 2 swapped
    with pytest.raises(ModelInstallError) as err:
        assemble_checked(model, tmp_path / "cache")
    text = str(err.value)
    assert "tiny-order: part 1 of 3 (dlora-test-order1==1.0: dlora_test_order1/data/part1.bin) holds the bytes of " \
           "part 2: the parts are out of order" in text
    assert model.parts[0].sha256 in text and model.parts[1].sha256 in text


def test_ensure_without_install_names_the_missing_packages_and_the_command(site, tmp_path, monkeypatch):
    data = write_gguf(tmp_path / "m.gguf")
    model = entry("tiny-absent", data, split(data, 2), package="dlora-test-absent")
    monkeypatch.setitem(reg.MODELS, model.name, model)
    with pytest.raises(ModelInstallError, match=r"tiny-absent: not installed \(dlora-test-absent1==1.0, "
                                                r"dlora-test-absent2==1.0 missing\); run `python -m "
                                                r"cloud_server.model_registry install tiny-absent`"):
        reg.ensure("tiny-absent", cache=tmp_path / "cache", install=False)


def test_an_unknown_name_lists_the_named_models(tmp_path):
    from cloud_server.model_store import resolve_model_path

    with pytest.raises(ModelInstallError, match="no model named 'gemma-9'; the named models are smollm2-135m, "
                                                "gemma-3-270m, qwen2.5-0.5b, qwen2.5-1.5b"):
        reg.get("gemma-9")
    with pytest.raises(FileNotFoundError, match="nor a named model; give a local directory or one of smollm2-135m, "
                                                "gemma-3-270m, qwen2.5-0.5b, qwen2.5-1.5b"):
        resolve_model_path(str(tmp_path / "nothing-here"))


@pytest.mark.parametrize("model", list(reg.MODELS.values()), ids=list(reg.MODELS))
def test_committed_entries_are_consistent(model):
    """Sizes add up, digests are SHA-256 hex, versions pinned, every part a distinct file."""
    assert sum(p.size for p in model.parts) == model.size
    for digest in [model.sha256, *(p.sha256 for p in model.parts)]:
        assert len(digest) == 64 and int(digest, 16) >= 0
    assert len({p.sha256 for p in model.parts}) == len(model.parts)
    assert len({(p.package, p.path) for p in model.parts}) == len(model.parts)
    assert all(v and v[0].isdigit() for _, v in model.requirements())
    if len(model.parts) == 1:
        assert model.parts[0].sha256 == model.sha256


def test_ensure_refuses_before_converting_and_leaves_nothing_behind(site, tmp_path, monkeypatch):
    """The whole first-use path on installed parts: a header naming another family stops it before
    transformers sees the file, and the staged GGUF is removed; nothing counts as converted."""
    data = write_gguf(tmp_path / "m.gguf", arch="llama")
    slices = split(data, 3)
    model = entry("tiny-ensure", data, slices, package="dlora-test-ensure", architecture="qwen2")
    install_slices(site, model, slices)
    monkeypatch.setitem(reg.MODELS, model.name, model)
    cache = tmp_path / "cache"
    with pytest.raises(ModelInstallError, match="tiny-ensure: the GGUF header of tiny-ensure.gguf says "
                                                "general.architecture='llama'"):
        reg.ensure("tiny-ensure", cache=cache, install=False)
    assert [p for p in cache.rglob("*") if p.is_file()] == []
    assert not reg.is_converted(reg.converted_dir(model, cache))


# Opt-in, never in the default suite: the named real models, converted beforehand with
# `python -m cloud_server.model_registry install NAME`, e.g. DLORA_REAL_MODELS=gemma-3-270m,qwen2.5-0.5b.
REAL_MODELS = [n for n in os.environ.get("DLORA_REAL_MODELS", "").split(",") if n]
# Qwen2.5-0.5B is ill-conditioned in fp32 (its massive activations): in-process fp32 is itself 3.9e-3 from a
# float64 run of the same step, and the distributed step is as close to float64 (3.87e-3 against 3.88e-3);
# the two fp32 runs differ by up to 2.5e-5 in summation order alone. Every other model keeps the 1e-5 bar.
REAL_TOLERANCE = {"qwen2.5-0.5b": 5e-5}


@pytest.mark.skipif(not REAL_MODELS, reason="set DLORA_REAL_MODELS=NAME,... to check converted real models")
@pytest.mark.parametrize("name", REAL_MODELS or ["-"])
def test_one_step_on_real_weights_is_exact(name, tmp_path):
    """The master test's first step on a real model served by name: loss and every A/B gradient of
    every linear of every block within 1e-5 of the same step in one process, fp32 wire."""
    from cloud_server import launch

    from helpers import EXAMPLES, assert_step_exact, connect

    model_dir = reg.converted_dir(reg.get(name))
    if not reg.is_converted(model_dir):
        pytest.skip(f"{name} is not converted: python -m cloud_server.model_registry install {name}")
    with launch.start(["--model", name, "--device", "cpu"], tmp_path / "server.log", timeout=900) as server:
        edge = connect(server.address, tmp_path / "cache", targets=["all-linear"])
        try:
            worst = assert_step_exact(edge, model_dir, edge.batch(EXAMPLES), tol=REAL_TOLERANCE.get(name, 1e-5))
        finally:
            edge.session.close()
    print(f"\n{name}: {len(edge.adapters)} adapted linears; worst relative error: " +
          ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
