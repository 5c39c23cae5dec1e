"""BIG-bench's multiple-choice tasks, read from a self-made archive of the sdist's layout (the real one is 358 MB)."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest

from edge_client import bigbench, data
from edge_client.bigbench import Archive, BigBenchError


def make_archive(path, tasks: dict[str, dict]):
    with tarfile.open(path, "w:gz") as tf:
        for name, task in tasks.items():
            blob = json.dumps(task).encode()
            info = tarfile.TarInfo(bigbench.TASK_PATH.format(name=name))
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return path


TASK = {"name": "toy", "examples": [
    {"input": f"Question {i}? ", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2 == 1)}}
    for i in range(40)] + [
    {"input": "Two right answers?", "target_scores": {"a": 1, "b": 1}},   # dropped: not one right choice
    {"input": "One choice?", "target_scores": {"a": 1}},                   # dropped: fewer than two
]}


def test_tasks_become_multiple_choice_splits(tmp_path):
    archive = make_archive(tmp_path / "bb.tar.gz", {"toy": TASK})
    train_p, test_p = bigbench.write_task(tmp_path, "toy", data.QUESTION_TEMPLATE, archive=archive)
    train, test = data.load(train_p), data.load(test_p)
    assert train.is_multiple_choice and test.is_multiple_choice
    assert len(train.examples) + len(test.examples) == 40 and test.examples    # the two bad ones dropped
    assert not {e.prompt for e in train.examples} & {e.prompt for e in test.examples}
    ex = next(e for e in train.examples + test.examples if "Question 3?" in e.prompt)
    assert ex.prompt == "Answer the question.\n\nQuestion: Question 3?\nAnswer:"
    assert ex.choices == (" yes", " no") and ex.completion == " no"
    # The split is fixed: written again elsewhere, the same held-out questions.
    again = bigbench.write_task(tmp_path / "other", "toy", data.QUESTION_TEMPLATE, archive=archive)[1]
    assert again.read_text() == test_p.read_text()


def test_missing_task_is_named(tmp_path):
    archive = make_archive(tmp_path / "bb.tar.gz", {"toy": TASK})
    with pytest.raises(BigBenchError, match="no task 'absent'"):
        bigbench.read_task(archive, "absent")


def test_archive_must_be_the_pinned_bytes(tmp_path):
    good = tmp_path / "a.tar.gz"
    good.write_bytes(b"pinned bytes")
    pin = Archive("a.tar.gz", "http://127.0.0.1:9/a.tar.gz", 12, hashlib.sha256(b"pinned bytes").hexdigest())
    assert bigbench.check(good, pin) == good
    (tmp_path / "b.tar.gz").write_bytes(b"pinned bytez")
    with pytest.raises(BigBenchError, match="SHA-256"):
        bigbench.check(tmp_path / "b.tar.gz", pin)
    (tmp_path / "c.tar.gz").write_bytes(b"short")
    with pytest.raises(BigBenchError, match="5 bytes, expected 12"):
        bigbench.check(tmp_path / "c.tar.gz", pin)


def test_unreachable_download_says_where_to_put_the_file(tmp_path):
    pin = Archive("a.tar.gz", "http://127.0.0.1:9/a.tar.gz", 12, "0" * 64)   # port 9: nothing listens
    with pytest.raises(BigBenchError, match=f"place a.tar.gz .* at {tmp_path / 'a.tar.gz'}"):
        bigbench.download(tmp_path / "a.tar.gz", pin, timeout=5)
    assert not list(tmp_path.iterdir())    # no partial file left behind


def test_download_through_a_real_http_server(tmp_path):
    import functools
    import http.server
    import threading

    root = tmp_path / "served"
    root.mkdir()
    blob = b"x" * (3 << 20)   # several blocks
    (root / "a.tar.gz").write_bytes(blob)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/a.tar.gz"
        pin = Archive("a.tar.gz", url, len(blob), hashlib.sha256(blob).hexdigest())
        got = bigbench.download(tmp_path / "cache" / "a.tar.gz", pin)
        assert got.read_bytes() == blob
        with pytest.raises(BigBenchError, match="SHA-256"):   # other bytes under the pinned name: refused
            bigbench.download(tmp_path / "cache2" / "a.tar.gz", Archive("a.tar.gz", url, len(blob), "0" * 64))
        assert not list((tmp_path / "cache2").iterdir())
    finally:
        server.shutdown()
