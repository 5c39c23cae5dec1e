"""`edge_client serve` answers the official OpenAI client, streamed and not, with the tokens `model.generate()`
gives; concurrent requests; OpenAI-style errors with the right status, a 503 when the cloud goes, and an API key
where one is set. A real cloud_server and a real `edge_client serve` process on 127.0.0.1."""
from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
import torch

from bench.tiny_models import save_tiny
from cloud_server import launch
from edge_client.remote_model import DLoRAModelForCausalLM

from helpers import ENV, random_adapters

# A chat template for the tiny model (the byte tokenizer has none of its own).
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    path = save_tiny("llama", tmp_path_factory.mktemp("chat") / "llama", seed=3)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def cloud(chat_model, tmp_path_factory):
    with launch.start(["--model", str(chat_model), "--device", "cpu"],
                      tmp_path_factory.mktemp("logs") / "cloud.log") as server:
        yield server


@pytest.fixture(scope="module")
def adapters_dir(cloud, tmp_path_factory) -> Path:
    """PEFT adapters with B != 0 (random), saved from the Python API's model."""
    cache = tmp_path_factory.mktemp("cache")
    with DLoRAModelForCausalLM.connect(cloud.address, cache=cache) as model:
        model.load_adapters(random_adapters(model.session.module_shapes(), rank=8, alpha=16.0, seed=5))
        out = tmp_path_factory.mktemp("adapters") / "my-adapter"
        model.save_pretrained(out)
        return out


@contextmanager
def serving(*args: str) -> Iterator[str]:
    """`edge_client serve ARGS --port 0`: its base URL, once it says it serves."""
    proc = subprocess.Popen([sys.executable, "-m", "edge_client", "--log-level", "WARNING", "serve", "--port", "0",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)],  # type: ignore[union-attr]
                     daemon=True).start()
    try:
        while True:
            line = lines.get(timeout=120)
            if line is None:
                raise AssertionError(f"edge_client serve exited {proc.wait()}: {proc.stderr.read()}")  # type: ignore
            if m := re.search(r"on (http://\S+/v1)", line):
                yield m.group(1)
                return
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def endpoint(cloud, adapters_dir, tmp_path_factory):
    with serving("--server", cloud.address, "--adapters", str(adapters_dir),
                 "--cache", str(tmp_path_factory.mktemp("serve-cache"))) as url:
        yield url


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


def reference(cloud, adapters_dir, prompt_ids: list[int], n: int, cache: Path) -> list[int]:
    """The greedy tokens of the Python API's model.generate() with the same adapters."""
    with DLoRAModelForCausalLM.from_pretrained(adapters_dir, cloud.address, cache=cache) as model:
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n)
        return out[0, len(prompt_ids):].tolist()


def test_completions_equal_model_generate(endpoint, cloud, adapters_dir, chat_model, tmp_path):
    c = client(endpoint)
    assert [m.id for m in c.models.list().data] == ["my-adapter"]
    got = c.completions.create(model="my-adapter", prompt="the match ended", max_tokens=8, temperature=0)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(chat_model)
    ids = tok("the match ended")["input_ids"]
    want = reference(cloud, adapters_dir, ids, 8, tmp_path / "cache")
    eos = tok.eos_token_id
    want = want[:want.index(eos)] if eos in want else want
    assert got.choices[0].text == tok.decode(want, skip_special_tokens=True)
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == len(want)
    assert got.choices[0].finish_reason in ("length", "stop") and got.object == "text_completion"


def test_streamed_chat_equals_the_whole_answer(endpoint):
    c = client(endpoint)
    messages = [{"role": "user", "content": "a new phone"}]
    whole = c.chat.completions.create(model="my-adapter", messages=messages, max_tokens=10, temperature=0)
    chunks = list(c.chat.completions.create(model="my-adapter", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content and whole.choices[0].message.role == "assistant"
    reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert reasons == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_two_requests_at_once_and_seeded_sampling(endpoint):
    c = client(endpoint)
    prompts = ["the minister said", "shares fell"]
    alone = [c.completions.create(model="my-adapter", prompt=p, max_tokens=6, temperature=0).choices[0].text
             for p in prompts]
    got: dict[int, str] = {}

    def ask(i: int) -> None:
        got[i] = c.completions.create(model="my-adapter", prompt=prompts[i], max_tokens=6,
                                      temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[0], got[1]] == alone
    sampled = [c.completions.create(model="my-adapter", prompt="a", max_tokens=6, temperature=1.0, top_p=0.9,
                                    seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]   # the same seed draws the same tokens


def test_stop_sequences_cut_the_text(endpoint):
    c = client(endpoint)
    free = c.completions.create(model="my-adapter", prompt="the", max_tokens=12, temperature=0).choices[0]
    if len(free.text) < 3:
        pytest.skip("the tiny model's greedy continuation is too short to cut")
    stop = free.text[2:4] if len(free.text) >= 4 else free.text[2:]
    cut = c.completions.create(model="my-adapter", prompt="the", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == free.text[:free.text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_bad_requests_get_openai_errors(endpoint):
    c = client(endpoint)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="at most 256 positions"):
        c.completions.create(model="my-adapter", prompt="word " * 300)
    with pytest.raises(openai.BadRequestError, match="temperature must be a number from 0 to 2"):
        c.completions.create(model="my-adapter", prompt="x", temperature=5)
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        c.chat.completions.create(model="my-adapter", messages=[{"role": "user", "content": "x"}], n=2)
    with pytest.raises(openai.BadRequestError, match="messages must be a non-empty list"):
        c.chat.completions.create(model="my-adapter", messages=[])
    assert c.models.list().data   # still serving


def test_api_key_and_a_cloud_that_goes(chat_model, adapters_dir, tmp_path):
    res = subprocess.run([sys.executable, "-m", "edge_client", "serve", "--host", "0.0.0.0"], capture_output=True,
                         text=True, timeout=120, env=ENV)
    assert res.returncode == 2 and "give --api-key" in res.stderr
    own = launch.start(["--model", str(chat_model), "--device", "cpu"], tmp_path / "own.log")
    try:
        with serving("--server", own.address, "--adapters", str(adapters_dir), "--api-key", "s3cret",
                     "--cache", str(tmp_path / "cache"), "--timeout", "5") as url:
            with pytest.raises(openai.AuthenticationError):
                client(url, "wrong").models.list()
            c = client(url, "s3cret")
            assert c.completions.create(model="my-adapter", prompt="x", max_tokens=2, temperature=0).choices
            own.stop()
            with pytest.raises(openai.InternalServerError) as gone:
                c.completions.create(model="my-adapter", prompt="x", max_tokens=2, temperature=0)
            assert gone.value.status_code == 503 and "cloud" in str(gone.value)
            assert c.models.list().data   # the endpoint keeps running
    finally:
        own.stop()
