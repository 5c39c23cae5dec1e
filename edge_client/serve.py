"""`edge_client serve`: the fine-tuned model behind an OpenAI-compatible HTTP API, on this device.

Prompts are tokenized and embedded here, tokens are chosen here and the adapters stay here, exactly as
`edge_client generate` does; the cloud sees hidden states only and keeps each generation's KV cache.
Requests run at once up to --sessions, one cloud session each; more wait for a free one. Built on
FastAPI and uvicorn; /v1/models, /v1/completions and /v1/chat/completions, streamed (server-sent
events) or not.
"""
from __future__ import annotations

import asyncio
import json
import logging
import queue
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from common.addresses import is_loopback
from common.lora import LoRAAdapter, LoRAConfig
from common.settings import setting
from edge_client.edge_model import EdgeModel, load_tokenizer
from edge_client.errors import CloudError
from edge_client.generation import GenerateConfig, Generated, fit_adapters, generate, max_positions, prompt_ids
from edge_client.session import CloudSession, Credentials

if TYPE_CHECKING:
    from fastapi import FastAPI

    from edge_client.remote_model import RemoteConfig

log = logging.getLogger(__name__)

# The RemoteConfig fields `edge_client serve` takes as flags.
CONNECTION = ("server", "wire_dtype", "cache", "timeout")


@dataclass
class ServeConfig:
    """`edge_client serve`'s own settings; each field is a flag (common/settings.py)."""

    adapters: str = setting("none", "a PEFT adapter directory, e.g. the --out of a training run, or 'none' for "
                                    "the base model")
    host: str = setting("127.0.0.1", "address the HTTP server binds; another than loopback needs --api-key",
                        group="HTTP")
    port: int = setting(8000, "HTTP port; 0 picks a free one (logged)", group="HTTP")
    api_key: str | None = setting(None, "the key clients must send as 'Authorization: Bearer KEY'; off: none "
                                        "asked (loopback only)", group="HTTP")
    model_name: str | None = setting(None, "the model id clients name; off: the adapter directory's name, or "
                                           "the cloud's model name for the base model", group="HTTP")
    sessions: int = setting(4, "requests generated at once, one cloud session each; more wait for a free one",
                            group="HTTP")
    park: bool = setting(False, "upload the adapters to the cloud: one round trip per token instead of one per "
                                "site, but the adapters leave the device")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be 0..65535, got {self.port}")
        if self.sessions < 1:
            raise ValueError(f"--sessions must be at least 1, got {self.sessions}")
        if not is_loopback(self.host) and not self.api_key:
            raise ValueError(f"--host {self.host} is not loopback: give --api-key, so only your clients use it")

    @property
    def adapter_dir(self) -> Path | None:
        return None if self.adapters == "none" else Path(self.adapters)


class ApiError(Exception):
    """A request refused with an OpenAI-style error object."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


class Device:
    """The model as this device serves it: tokenizer, embedding and head, the adapters, and a pool of cloud
    sessions (one per request in flight)."""

    def __init__(self, remote: RemoteConfig, credentials: Credentials, cfg: ServeConfig) -> None:
        from edge_client import peft_format

        self.remote, self.credentials, self.cfg = remote, credentials, cfg
        self.adapters: dict[str, LoRAAdapter] = {}
        self.targets: list[str] = []
        if cfg.adapter_dir is not None:
            self.adapters, _ = peft_format.load(cfg.adapter_dir)
            self.targets = sorted({n.rsplit(".", 1)[-1] for n in self.adapters})
        self._free: queue.Queue[CloudSession | None] = queue.Queue()
        first = self._open()
        assets = first.fetch_assets(remote.cache / "edge-assets")
        self.tokenizer = load_tokenizer(assets)
        self.edge = EdgeModel.from_assets(assets)
        self.limit = max_positions(json.loads((assets / "config.json").read_text()))
        self.name = cfg.model_name or (cfg.adapter_dir.name if cfg.adapter_dir else first.model.name)
        self.computed = fit_adapters(first, self.adapters, cfg.adapter_dir, cfg.park)
        self._free.put(first)
        for _ in range(cfg.sessions - 1):
            self._free.put(None)   # opened on first use
        self.created = int(time.time())

    def _open(self) -> CloudSession:
        return CloudSession.from_config(self.remote, LoRAConfig(target_modules=self.targets),
                                        credentials=self.credentials)

    @contextmanager
    def session(self) -> Iterator[CloudSession]:
        """A free session for one request; one that failed is closed and opened again on next use."""
        session = self._free.get()
        ok = False
        try:
            if session is None:
                session = self._open()
                fit_adapters(session, self.adapters, self.cfg.adapter_dir, self.cfg.park)
            yield session
            ok = True
        finally:
            if not ok and session is not None:
                try:
                    session.close()
                except Exception:  # noqa: BLE001 - a broken session is dropped either way
                    pass
                session = None
            self._free.put(session)

    def close(self) -> None:
        while not self._free.empty():
            s = self._free.get_nowait()
            if s is not None:
                s.close()

    def run(self, ids: list[int], cfg: GenerateConfig, stops: list[str],
            on_text: Callable[[str], bool] | None = None) -> tuple[Generated, str, str]:
        """Generate after `ids`: (the generation, its text cut at the first stop sequence, finish reason).
        `on_text` sees the text so far (stop sequences withheld) and stops the generation by returning True."""
        stopped = [False]

        def on_token(out: list[int]) -> bool:
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            if any(s in text for s in stops):
                stopped[0] = True
                return True
            return bool(on_text(text)) if on_text is not None else False

        try:
            with self.session() as session:
                got = generate(session, self.edge, self.tokenizer, self.computed, ids, cfg, on_token)
        except CloudError as exc:
            raise ApiError(503, f"the cloud did not answer: {exc}", "service_unavailable",
                           code="cloud_unavailable") from None
        text = got.text
        for s in stops:
            if s in text:
                text = text[:text.index(s)]
        reason = "stop" if stopped[0] or got.eos else "length"
        return got, text, reason


def sampling(body: dict, default_tokens: int, prompt_len: int, limit: int) -> tuple[GenerateConfig, list[str]]:
    """The GenerateConfig and stop sequences of a request's fields, checked as the OpenAI API does."""
    def number(name: str, default: float, lo: float, hi: float) -> float:
        value = body.get(name, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise ApiError(400, f"{name} must be a number from {lo:g} to {hi:g}, got {value!r}", param=name)
        return float(value)

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or default_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"max_tokens must be a positive integer, got {max_tokens!r}", param="max_tokens")
    if limit and prompt_len >= limit:
        raise ApiError(400, f"the prompt has {prompt_len} tokens; this model takes at most {limit} positions",
                       param="messages" if "messages" in body else "prompt", code="context_length_exceeded")
    if limit:
        max_tokens = min(max_tokens, limit - prompt_len)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"seed must be an integer, got {seed!r}", param="seed")
    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1: one choice per request", param="n")
    cfg = GenerateConfig(max_new_tokens=max_tokens, temperature=number("temperature", 1.0, 0.0, 2.0),
                         top_p=number("top_p", 1.0, 1e-9, 1.0),
                         seed=secrets.randbits(63) if seed is None else seed % (1 << 63))
    return cfg, stops


def _messages(body: dict) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", param="messages")
    out = []
    for m in msgs:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):   # content parts: the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or \
                not isinstance(content, str):
            raise ApiError(400, "each message needs a role (system, user or assistant) and text content",
                           param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt must be a non-empty string (one prompt per request)", param="prompt")
    return prompt


def make_app(device: Device) -> FastAPI:
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="DLoRA edge model", docs_url=None, redoc_url=None)
    key = device.cfg.api_key

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(ApiError(400, f"invalid request: {exc.errors()[:1]}").body(), status_code=400)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if key and request.headers.get("authorization", "") != f"Bearer {key}":
            err = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           "authentication_error", code="invalid_api_key")
            return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": device.name, "object": "model", "created": device.created,
                                            "owned_by": "dlora"}]}

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the request body must be JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if body.get("model") != device.name:
            raise ApiError(404, f"the model {body.get('model')!r} does not exist; this server serves "
                           f"{device.name!r}", param="model", code="model_not_found")
        return body

    async def complete(request: Request, chat: bool):
        body = await body_of(request)
        source: Any = _messages(body) if chat else _prompt(body)
        ids = prompt_ids(device.tokenizer, source)
        cfg, stops = sampling(body, 16 if not chat else 1 << 30, len(ids), device.limit)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        shape = _Shape(rid, device.name, chat, int(time.time()))
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_stream(device, ids, cfg, stops, shape, usage, request),
                                     media_type="text/event-stream")
        got, text, reason = await run_in_threadpool(device.run, ids, cfg, stops)
        return shape.whole(text, reason, len(ids), len(got.token_ids))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    return app


@dataclass
class _Shape:
    """The OpenAI response objects of one request."""

    rid: str
    model: str
    chat: bool
    created: int

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.model}

    def whole(self, text: str, reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text}}
                                  if self.chat else {"index": 0, "text": text, "logprobs": None})
        return {**self._head(False), "choices": [{**choice, "finish_reason": reason}],
                "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, delta: str | None, reason: str | None, first: bool = False) -> dict:
        if self.chat:
            d: dict[str, str] = {"role": "assistant"} if first else {}
            if delta:
                d["content"] = delta
            choice: dict[str, Any] = {"index": 0, "delta": d}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None}
        return {**self._head(True), "choices": [{**choice, "finish_reason": reason}]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _stream(device: Device, ids: list[int], cfg: GenerateConfig, stops: list[str], shape: _Shape,
                  with_usage: bool, request) -> AsyncIterator[str]:
    """Server-sent events: text deltas as tokens come (a possible stop sequence held back), the finish
    reason, optionally the usage, then [DONE]."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()
    hold = max((len(s) for s in stops), default=1) - 1

    def on_text(text: str) -> bool:
        # A partial UTF-8 sequence decodes as U+FFFD until its last byte comes: never sent.
        text = text.rstrip("\ufffd")
        loop.call_soon_threadsafe(events.put_nowait, ("text", text[:len(text) - hold] if hold else text))
        return gone.is_set()

    def work() -> None:
        try:
            result = device.run(ids, cfg, stops, on_text)
        except ApiError as exc:
            loop.call_soon_threadsafe(events.put_nowait, ("error", exc))
        except BaseException as exc:  # noqa: BLE001 - reported in the stream, the server keeps going
            loop.call_soon_threadsafe(events.put_nowait, ("error", ApiError(500, f"generation failed: {exc}",
                                                                            "server_error")))
        else:
            loop.call_soon_threadsafe(events.put_nowait, ("done", result))

    threading.Thread(target=work, name="dlora-serve-stream", daemon=True).start()
    sent = ""
    first = True
    try:
        while True:
            kind, value = await events.get()
            if kind == "text":
                # A partial UTF-8 sequence decodes differently until complete: only extensions are sent.
                if value.startswith(sent) and len(value) > len(sent):
                    yield _sse(shape.chunk(value[len(sent):], None, first))
                    sent, first = value, False
                continue
            if kind == "error":
                yield _sse(value.body())
                break
            got, text, reason = value
            rest = text[len(sent):] if text.startswith(sent) else ""
            yield _sse(shape.chunk(rest, reason, first))
            if with_usage:
                yield _sse({**shape.chunk(None, None), "choices": [], "usage": usage(len(ids), len(got.token_ids))})
            break
        yield "data: [DONE]\n\n"
    finally:
        gone.set()   # a client that went away stops the generation at its next token


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def serve(remote: RemoteConfig, credentials: Credentials, cfg: ServeConfig) -> int:
    """Open the sessions, then serve until interrupted."""
    import uvicorn

    device = Device(remote, credentials, cfg)
    app = make_app(device)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)

    def announce() -> None:
        while not server.started:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else cfg.port
        print(f"DLoRA edge model {device.name!r} serving the OpenAI API on http://{cfg.host}:{port}/v1",
              flush=True)

    threading.Thread(target=announce, daemon=True).start()
    try:
        server.run()
    finally:
        device.close()
    return 0


