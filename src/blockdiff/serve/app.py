"""The HTTP face of the scheduler: OpenAI's completions and chat completions, plus the page.

Every request is checked by building its decode once (`start_decoding` on the one prompt, no
forward), so a wrong option, an impossible length or a block that does not fit is a 400 with
OpenAI's error shape before it reaches a batch; the same checks as `blockdiff generate`.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..agent.evaluate import DIFFUSION_SAMPLER
from ..agent.world import EVAL_POOL
from ..config import BlockdiffError
from ..decoding import SAMPLERS, start_decoding
from ..decoding import options as sampler_options
from ..decoding.samplers import PLANS
from ..model import BlockDiffLM
from ..tokenizer import Tokenizer
from .scheduler import Job, QueueFull, Scheduler, emitter

STATIC = Path(__file__).parent / "static"
# OpenAI fields blockdiff does not implement: accepted only at their neutral value.
NEUTRAL = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logprobs": None,
    "top_logprobs": None,
    "echo": False,
    "best_of": None,
    "logit_bias": None,
    "suffix": None,
    "tools": None,
    "tool_choice": None,
    "response_format": None,
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class _Common(BaseModel):
    """OpenAI's fields; any other field is a blockdiff sampler option (block_size, steps, ...)."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    max_tokens: int | None = Field(default=None)
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None
    sampler: str | None = None
    denoise: bool = False  # blockdiff: stream every canvas step (what the page draws)


class CompletionRequest(_Common):
    prompt: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Common):
    messages: list[Message]


class Server:
    def __init__(
        self,
        model: BlockDiffLM,
        tokenizer: Tokenizer,
        name: str,
        sampler: str = "fastdllm",
        max_batch: int = 8,
        max_queue: int = 64,
        timeout: float = 300.0,
        api_key: str | None = None,
        default_max_tokens: int = 128,
    ):
        self.model, self.tok, self.name, self.sampler = model, tokenizer, name, sampler
        self.timeout, self.api_key, self.default_max_tokens = timeout, api_key, default_max_tokens
        self.max_batch, self.max_queue = max_batch, max_queue
        self.scheduler = Scheduler(model, tokenizer, max_batch=max_batch, max_queue=max_queue)
        self.ar: Server | None = None

    def add_ar_model(self, model: BlockDiffLM, tokenizer: Tokenizer, name: str) -> None:
        """Serve a second model beside this one, with its own scheduler (its own thread touches
        it); the page's AR side (the race's `ar` panel, the AR agent) uses it."""
        if name == self.name:
            raise ValueError(f"the AR model needs a name of its own, '{name}' is the main model's")
        self.ar = Server(
            model, tokenizer, name, "ar", self.max_batch, self.max_queue, self.timeout, self.api_key,
            self.default_max_tokens,
        )  # fmt: skip

    def servers(self) -> list[Server]:
        return [self] + ([self.ar] if self.ar is not None else [])

    def route(self, name: str | None) -> Server:
        """The server of a requested model (this one for any other name: its checks answer 404)."""
        return self.ar if self.ar is not None and name == self.ar.name else self

    # ---- request -> job ------------------------------------------------------------------------

    def job(self, req: _Common, prompt: str, emit) -> Job:
        if req.model != self.name:
            served = ", ".join(f"'{s.name}'" for s in self.servers())
            raise APIError(
                404,
                f"model '{req.model}' is not served here; this server serves {served}",
                "model",
                "model_not_found",
            )
        for k, neutral in NEUTRAL.items():
            v = (req.model_extra or {}).get(k)
            if v is not None and v != neutral:
                raise APIError(400, f"{k} is not supported by blockdiff", k, "unsupported_parameter")
        extra = {k: v for k, v in (req.model_extra or {}).items() if k not in NEUTRAL}
        sampler = req.sampler or self.sampler
        max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        max_tokens = self.default_max_tokens if max_tokens is None else max_tokens
        if max_tokens < 0:
            raise APIError(400, f"max_tokens must be >= 0, got {max_tokens}", "max_tokens")
        if not 1 <= req.n <= self.max_batch:
            raise APIError(400, f"n must be between 1 and {self.max_batch} (the server's max batch)", "n")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if any(s == "" for s in stop) or len(stop) > 4:
            raise APIError(400, "stop takes up to 4 non-empty strings", "stop")
        if "\x00" in prompt:
            raise APIError(400, "the prompt contains a NUL character", "prompt")
        opts = {**extra, "temperature": req.temperature, "top_p": req.top_p}
        opts = {k: v for k, v in opts.items() if v is not None}
        try:
            d = start_decoding(self.model, self.tok, [prompt], sampler, max_tokens, seed=0, **opts)
        except (ValueError, TypeError, BlockdiffError) as e:
            raise APIError(400, str(e), None, "invalid_value") from None
        del d
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        return Job(
            prompt=prompt,
            n=req.n,
            sampler=sampler,
            options=opts,
            max_new_tokens=max_tokens,
            seed=seed,
            stop=stop,
            deadline=time.monotonic() + self.timeout,
            emit=emit,
            denoise=req.denoise,
            stream=req.stream,
            infill=self.tok.names["mask_token"] in prompt,
        )

    def chat_prompt(self, req: ChatRequest) -> str:
        if not self.tok.chat_template:
            raise APIError(400, f"model '{self.name}' has no chat template; use /v1/completions", "messages")
        if not req.messages:
            raise APIError(400, "messages must not be empty", "messages")
        return self.tok.chat([m.model_dump() for m in req.messages])

    # ---- responses -----------------------------------------------------------------------------

    async def respond(self, request: Request, req: _Common, prompt: str, chat: bool):
        queue: asyncio.Queue = asyncio.Queue()
        job = self.job(req, prompt, emitter(asyncio.get_running_loop(), queue))
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, str(e), None, "queue_full") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        n_prompt = len(self.tok.encode(prompt))
        if req.stream:
            return EventSourceResponse(
                self._stream(job, queue, rid, created, obj, n_prompt, chat), ping=15, sep="\n"
            )
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        job.cancelled = True
                        return _error(499, "client closed the request")
                    continue
                if ev["type"] == "error":
                    return _error(ev["status"], ev["message"])
                if ev["type"] == "done":
                    break
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        choices = []
        for i, (text, fin) in enumerate(zip(ev["texts"], ev["finish"], strict=True)):
            c = {"index": i, "finish_reason": fin, "blockdiff": ev["stats"][i]}
            c.update(
                {"message": {"role": "assistant", "content": text}}
                if chat
                else {"text": text, "logprobs": None}
            )
            choices.append(c)
        return JSONResponse(
            {
                "id": rid,
                "object": obj,
                "created": created,
                "model": self.name,
                "choices": choices,
                "usage": _usage(n_prompt, ev["stats"]),
            }
        )

    async def _stream(self, job: Job, queue: asyncio.Queue, rid, created, obj, n_prompt, chat):
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, **extra) -> dict:
            return {
                "data": json.dumps(
                    {
                        "id": rid,
                        "object": chunk_obj,
                        "created": created,
                        "model": self.name,
                        "choices": choices,
                        **extra,
                    }
                )
            }

        try:
            if chat:
                yield chunk(
                    [
                        {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                        for i in range(job.n)
                    ]
                )
            while True:
                ev = await queue.get()
                t = ev["type"]
                if t == "error":
                    yield {
                        "data": json.dumps(
                            {
                                "error": {
                                    "message": ev["message"],
                                    "type": "server_error",
                                    "code": ev["status"],
                                }
                            }
                        )
                    }
                    return
                if t in ("start", "denoise") and job.denoise:
                    yield chunk([], blockdiff={k: v for k, v in ev.items()})
                elif t == "delta":
                    d = {"content": ev["text"]} if chat else None
                    c = {"index": ev["index"], "finish_reason": None}
                    c.update({"delta": d} if chat else {"text": ev["text"], "logprobs": None})
                    yield chunk([c])
                elif t == "finish":
                    c = {"index": ev["index"], "finish_reason": ev["reason"]}
                    c.update({"delta": {}} if chat else {"text": "", "logprobs": None})
                    yield chunk([c])
                elif t == "done":
                    usage = _usage(n_prompt, ev["stats"])
                    yield chunk([], usage=usage, blockdiff={"type": "done", "stats": ev["stats"]})
                    yield {"data": "[DONE]"}
                    return
        finally:
            job.cancelled = True  # a client that went away frees its rows (no effect once done)


def _usage(n_prompt: int, stats: list[dict]) -> dict[str, Any]:
    n = sum(s["tokens"] for s in stats)
    nfe = max((s["nfe"] for s in stats), default=0)
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": n,
        "total_tokens": n_prompt + n,
        "nfe": nfe,
        "tokens_per_nfe": round(n / max(1, nfe), 4),
    }


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="blockdiff", docs_url="/docs", redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        if err.get("type") == "json_invalid":
            return _error(
                400, f"malformed JSON body: {err.get('ctx', {}).get('error', '')}", None, "json_invalid"
            )
        where = ".".join(str(x) for x in err.get("loc", ())[1:]) or None
        msg = err.get("msg", "invalid request")
        return _error(400, f"{msg}" + (f" ({where})" if where else ""), where, err.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if server.api_key and request.url.path.startswith("/v1/"):
            got = request.headers.get("authorization", "")
            if not secrets.compare_digest(got, f"Bearer {server.api_key}"):
                return _error(
                    401, "missing or wrong API key (Authorization: Bearer KEY)", None, "invalid_api_key"
                )
        return await call_next(request)

    @app.on_event("startup")
    async def _start():
        for s in server.servers():
            s.scheduler.start()

    @app.on_event("shutdown")
    async def _stop():
        for s in server.servers():
            s.scheduler.stop()

    @app.get("/health")
    async def health():
        out = {"status": "ok", "model": server.name, **server.scheduler.load()}
        if server.ar is not None:
            out["ar_model"] = {"model": server.ar.name, **server.ar.scheduler.load()}
        return out

    @app.get("/v1/models")
    async def models():
        card = {"object": "model", "created": 0, "owned_by": "blockdiff"}
        return {"object": "list", "data": [{"id": s.name, **card} for s in server.servers()]}

    @app.get("/v1/samplers")
    async def samplers():
        """The samplers and the options each takes (what the page offers)."""
        return {
            "default": server.sampler,
            "samplers": {s: sorted(sampler_options.accepted(PLANS[s])) for s in SAMPLERS},
            "chat": bool(server.tok.chat_template),
            "max_batch": server.max_batch,
            "agent": {"tasks": EVAL_POOL, "diffusion_sampler": DIFFUSION_SAMPLER},
            "ar_model": server.ar.name if server.ar else None,  # the page's AR side, if its own
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await server.route(req.model).respond(request, req, req.prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        srv = server.route(req.model)
        return await srv.respond(request, req, srv.chat_prompt(req), chat=True)

    from .agents import add_routes  # here: that module builds on this one

    add_routes(app, server)

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def serve(server: Server, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    uvicorn.run(create_app(server), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
