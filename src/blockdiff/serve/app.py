"""The HTTP face of the scheduler: OpenAI's completions and chat completions, plus the page.

Every request is checked once into a `DecodeSpec` (sampler, options, length, seed) and its prompt
against the context, so a wrong option, an impossible length or a block that does not fit is a
400 with OpenAI's error shape before it reaches a batch; the same checks as `blockdiff generate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..agent.evaluate import DIFFUSION_SAMPLER
from ..agent.trajectory import call_schema as agent_call_schema
from ..agent.world import EVAL_POOL
from ..config import BlockdiffError
from ..costs import forward_cost
from ..decoding import DEFAULT_SAMPLER, SAMPLERS, DecodeSpec
from ..decoding import options as sampler_options
from ..decoding.constraint import constraint_of
from ..decoding.engine import check_length
from ..decoding.samplers import PLANS
from ..model import BlockDiffLM
from ..runtime import tiles_from
from ..tokenizer import Tokenizer
from .protocol import (
    IGNORED,
    NEUTRAL,
    APIError,
    ChatRequest,
    CompletionRequest,
    _Common,
    _error,
    as_call,
    call_schema,
    include_usage,
    response_format,
    tools_turn,
    usage,
)
from .scheduler import Delta, Denoised, Done, Failed, Finished, Job, QueueFull, Scheduler, Started, emitter

STATIC = Path(__file__).parent / "static"


class Server:
    def __init__(
        self,
        model: BlockDiffLM,
        tokenizer: Tokenizer,
        name: str,
        sampler: str = DEFAULT_SAMPLER,
        max_batch: int = 8,
        max_queue: int = 64,
        timeout: float = 300.0,
        api_key: str | None = None,
        default_max_tokens: int = 128,
    ):
        self.model, self.tok, self.name, self.sampler = model, tokenizer, name, sampler
        self.timeout, self.api_key, self.default_max_tokens = timeout, api_key, default_max_tokens
        self.max_batch, self.max_queue = max_batch, max_queue
        if max_batch > 1:  # batched one-token steps on AMX tiles: batch 8 ~2x faster, alone 0.95x
            tiles_from(model, 1)
        if sampler == "spec":  # its cost curve timed now (once per machine), not in a first request
            forward_cost(model)
        self.scheduler = Scheduler(model, tokenizer, max_batch=max_batch, max_queue=max_queue)
        self.ar: Server | None = None

    def add_ar_model(self, model: BlockDiffLM, tokenizer: Tokenizer, name: str) -> None:
        """A second model beside this one, own scheduler: the page's AR side (race, AR agent)."""
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
            if not any(v == n and isinstance(v, bool) == isinstance(n, bool) for n in neutral):
                raise APIError(400, f"{k} is not supported by blockdiff", k, "unsupported_parameter")
        skip = (*NEUTRAL, *IGNORED, "response_format", "tools", "tool_choice")
        extra = {k: v for k, v in (req.model_extra or {}).items() if k not in skip}
        extra |= response_format((req.model_extra or {}).get("response_format"))
        funcs, choice = req.tools()
        if funcs and not isinstance(req, ChatRequest):
            raise APIError(400, "tools are a field of /v1/chat/completions", "tools")
        if choice not in (None, "auto"):  # a call is required: its JSON is the constraint
            if {"json_schema", "regex", "grammar"} & set(extra):
                raise APIError(400, "response_format and a required tool call both constrain it", "tools")
            extra["json_schema"] = call_schema(funcs if choice == "required" else {choice: funcs[choice]})
        sampler = req.sampler or self.sampler
        max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        max_tokens = self.default_max_tokens if max_tokens is None else max_tokens
        if max_tokens < 1:  # as OpenAI: a completion has at least one token
            raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
        if not 1 <= req.n <= self.max_batch:
            raise APIError(400, f"n must be between 1 and {self.max_batch} (the server's max batch)", "n")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if any(s == "" for s in stop) or len(stop) > 4:
            raise APIError(400, "stop takes up to 4 non-empty strings", "stop")
        if "\x00" in prompt:
            raise APIError(400, "the prompt contains a NUL character", "prompt")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            why = f"the prompt is not valid Unicode text ({e.reason} at {e.start})"
            raise APIError(400, why, "prompt") from None
        opts = {**extra, "temperature": req.temperature, "top_p": req.top_p}
        opts = {k: v for k, v in opts.items() if v is not None}
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        try:
            spec = DecodeSpec.build(self.model, sampler, max_tokens, seed, **opts)
            check_length(self.model, len(self.tok.encode(prompt)), max_tokens)
            if (con := constraint_of(spec.kwargs)) is not None:  # before the request is queued
                con.bind(self.tok).check_fits(max_tokens)
        except (ValueError, TypeError, BlockdiffError) as e:
            raise APIError(400, str(e), _param(str(e), [*opts, "sampler"]), "invalid_value") from None
        return Job(
            prompt=prompt,
            n=req.n,
            spec=spec,
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
        funcs, choice = req.tools()
        turns = [m.as_turn() for m in req.messages]
        if choice:  # the functions join the leading system turn, or make one
            tools = tools_turn(funcs)
            if turns[0]["role"] == "system":
                tools["content"] = turns.pop(0)["content"] + "\n\n" + tools["content"]
            turns.insert(0, tools)
        return self.tok.chat(turns)

    # ---- responses -----------------------------------------------------------------------------

    async def respond(self, request: Request, req: _Common, prompt: str, chat: bool):
        queue: asyncio.Queue = asyncio.Queue()
        # the checks tokenize and build a canvas: off the event loop, which keeps serving
        job = await asyncio.to_thread(self.job, req, prompt, emitter(asyncio.get_running_loop(), queue))
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
                self._stream(job, queue, rid, created, obj, n_prompt, chat, req),
                ping=15,
                sep="\n",
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
                if isinstance(ev, Failed):
                    return _error(ev.status, ev.message)
                if isinstance(ev, Done):
                    break
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        choices = []
        funcs, choice = req.tools() if chat else ({}, None)
        for i, (text, fin) in enumerate(zip(ev.texts, ev.finish, strict=True)):
            msg = {"role": "assistant", "content": text}
            if choice and (call := as_call(text, funcs)):
                msg, fin = {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
            c = {"index": i, "finish_reason": fin, "blockdiff": ev.stats[i]}
            c.update({"message": msg} if chat else {"text": text, "logprobs": None})
            choices.append(c)
        return JSONResponse(
            {
                "id": rid,
                "object": obj,
                "created": created,
                "model": self.name,
                "choices": choices,
                "usage": usage(n_prompt, ev.stats, ev.tokens),
            }
        )

    async def _stream(self, job: Job, queue: asyncio.Queue, rid, created, obj, n_prompt, chat, req):
        """OpenAI's chunks: every chunk carries choices, except the usage chunk that
        `stream_options.include_usage` asks for; blockdiff's per-row stats ride on the last one.
        With tools, a row's text is held until it ends: a call goes out as one `tool_calls`
        delta (name and whole arguments), anything else as one content delta."""
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"
        funcs, choice = req.tools() if chat else ({}, None)

        def chunk(choices, **extra) -> dict:
            return {"id": rid, "object": chunk_obj, "created": created, "model": self.name,
                    "choices": choices, **extra}  # fmt: skip

        def sse(payload: dict) -> dict:
            return {"data": json.dumps(payload)}

        held = None  # the latest finish chunk: the last one carries the stats
        try:
            if chat:  # (a call's message has no content: none announced with tools)
                role = {"role": "assistant"} if choice else {"role": "assistant", "content": ""}
                yield sse(chunk([{"index": i, "delta": role, "finish_reason": None} for i in range(job.n)]))
            while True:
                ev = await queue.get()
                if isinstance(ev, Failed):
                    err = {"message": ev.message, "type": "server_error", "code": ev.status}
                    yield sse({"error": err})
                    return
                if isinstance(ev, Started | Denoised) and job.denoise:  # blockdiff's own, by name
                    yield sse(chunk([], blockdiff=ev.as_dict()))
                elif isinstance(ev, Delta) and not choice:  # with tools: the row's text when it ends
                    d = {"content": ev.text} if chat else None
                    c = {"index": ev.index, "finish_reason": None}
                    c.update({"delta": d} if chat else {"text": ev.text, "logprobs": None})
                    yield sse(chunk([c]))
                elif isinstance(ev, Finished):
                    if held is not None:
                        yield sse(held)
                    reason, d = ev.reason, None
                    if choice and (call := as_call(ev.text, funcs)):
                        reason, d = "tool_calls", {"tool_calls": [{"index": 0, **call}]}
                    elif choice and ev.text:
                        d = {"content": ev.text}
                    if d is not None:
                        yield sse(chunk([{"index": ev.index, "delta": d, "finish_reason": None}]))
                    c = {"index": ev.index, "finish_reason": reason}
                    c.update({"delta": {}} if chat else {"text": "", "logprobs": None})
                    held = chunk([c])
                elif isinstance(ev, Done):
                    if held is not None:
                        yield sse({**held, "blockdiff": {"type": "done", "stats": ev.stats}})
                    if include_usage(req):
                        yield sse(chunk([], usage=usage(n_prompt, ev.stats, ev.tokens)))
                    yield {"data": "[DONE]"}
                    return
        finally:
            job.cancelled = True  # a client that went away frees its rows (no effect once done)


def _param(message: str, names: list[str]) -> str | None:
    """The request field an engine error is about (OpenAI names it in every 400)."""
    if "max_new_tokens" in message or "context" in message:
        return "max_tokens"
    if "unknown sampler" in message:
        return "sampler"
    named = [n for n in names if re.search(rf"\b{re.escape(n)}\b", message)]
    return named[0] if named else None


class KeyAuth:
    """`Authorization: Bearer KEY` on /v1/ (the page, /health and /docs stay open). Plain ASGI,
    not BaseHTTPMiddleware: that one hides a client's disconnect from the endpoint, which then
    decodes on for nobody."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, key = auth.partition(" ")
            given = key.strip().encode("latin-1")
            if scheme.lower() != "bearer" or not secrets.compare_digest(given, self.key.encode()):
                msg = "missing or wrong API key (Authorization: Bearer KEY)"
                await _error(401, msg, None, "invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(server: Server, *routes: Callable[[FastAPI, Server], None]) -> FastAPI:
    """The OpenAI API and the page; `routes` add more (the agent routes: `main.build_app`)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        for s in server.servers():
            s.scheduler.start()
        yield
        for s in server.servers():
            s.scheduler.stop()

    app = FastAPI(title="blockdiff", docs_url="/docs", redoc_url=None, lifespan=lifespan)

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

    if server.api_key:
        app.add_middleware(KeyAuth, key=server.api_key)

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
            "agent": {  # call_schema: both agents' json_schema when the page constrains their calls
                "tasks": EVAL_POOL,
                "diffusion_sampler": DIFFUSION_SAMPLER,
                "call_schema": agent_call_schema(),
            },
            "ar_model": server.ar.name if server.ar else None,  # the page's AR side, if its own
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await server.route(req.model).respond(request, req, req.prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        srv = server.route(req.model)
        return await srv.respond(request, req, srv.chat_prompt(req), chat=True)

    for add in routes:
        add(app, server)

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
