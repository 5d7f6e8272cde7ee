"""Agents on the server: `POST /v1/agent/run` streams one agent solving one held-out task.

The agent loop (`run_agent`) runs in a thread of its own, and each of its model calls is an
ordinary decode request to the scheduler (`ScheduledPolicy.decode`). So the scheduler's worker
stays the only thread that touches the model (no lock, no second copy of the weights), an agent
never holds the worker while it runs a tool, and the AR and diffusion agents of a race are
stepped in turn, one forward each, like the playground's two panels. With `serve --ar-model`
the AR agent runs on the second model's own worker, so the two decode at the same time and share
the cores: wall times in such a race are not those of one agent alone. A row decodes as it would
alone, so a streamed run ends in exactly the `AgentResult` of `run_agent` with `ModelPolicy`.

The page starts a race as two requests, `"agent": "ar"` and `"agent": "diffusion"`, with the
same body: `sampler` and the options are the diffusion agent's (checked as such for both), and
the AR agent takes the shared sampling options (`agent.evaluate.agent_options`). Events, each a
server-sent `data:` JSON object with a "type":

    start        {agent, task, question, sampler, options}
    round        {round}                                  a model call begins
    call         {round, call, text, tokens, nfe, seconds} a parsed call, run
    observation  {round, observation}                     the tool's result
    call_error   {round, kind, message, text, tokens, nfe, seconds}  the reply was no usable call
    done         {result}                                 AgentResult.as_dict()

A failure of the server itself (queue full, timeout, a crashed decode) ends the stream with
{"error": {message, type, code}}, as the completions stream does.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, ValidationError
from sse_starlette.sse import EventSourceResponse

from ..agent import ModelPolicy, Reply, Step, make_task, run_agent
from ..agent.evaluate import DIFFUSION_SAMPLER, agent_options, agent_sampler
from ..agent.loop import Policy, check_limits
from ..agent.trajectory import render, start_messages
from ..agent.world import EVAL_POOL, Task
from ..config import BlockdiffError
from .app import Server
from .protocol import APIError, CompletionRequest
from .scheduler import Done, Failed, QueueFull, emitter

# completion fields that are not sampler options: an agent sets them itself
RESERVED = set(CompletionRequest.model_fields) - {"temperature", "top_p"}


class AgentRequest(BaseModel):
    """One agent on held-out task `task`; any other field is a sampler option (block_size, ...)."""

    model_config = ConfigDict(extra="allow", strict=True)
    agent: Literal["ar", "diffusion"]
    task: int = 0
    model: str | None = None  # default: the served model (the AR agent: the AR model, if served)
    sampler: str | None = None  # the diffusion agent's [fastdllm]
    max_new_tokens: int = 96  # per call
    max_rounds: int = 12
    max_tokens: int = 2048
    max_errors: int = 0
    seed: int = 0


class ScheduledPolicy(ModelPolicy):
    """`ModelPolicy` whose model call is a scheduler job with the same prompt, seed and options."""

    def __init__(self, server: Server, name: str, sampler: str, max_new_tokens: int, seed: int, **options):
        super().__init__(server.model, server.tok, sampler, max_new_tokens, seed, **options)
        self.server, self.name = server, name
        self.deadline = time.monotonic() + server.timeout  # the whole run is one request
        self.stop = threading.Event()  # set when the client goes away

    def request(
        self, prompt: str, seed: int, sampler: str | None = None, options: dict | None = None
    ) -> CompletionRequest:
        """The completion request of one call (checked as /v1/completions checks its body)."""
        body = {"model": self.name, "prompt": prompt, "max_tokens": self.max_new_tokens, "seed": seed}
        body.update(sampler=sampler or self.sampler, **(self.options if options is None else options))
        try:
            return CompletionRequest.model_validate(body)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or None
            raise APIError(400, f"{err['msg']} ({where})", where, err["type"]) from None

    def decode(self, prompt: str, seed: int) -> Reply:
        replies: queue.Queue = queue.Queue()
        job = self.server.job(self.request(prompt, seed), prompt, replies.put)
        job.deadline = self.deadline
        try:
            self.server.scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, str(e), None, "queue_full") from None
        while True:
            try:
                ev = replies.get(timeout=0.1)
            except queue.Empty:
                if self.stop.is_set():  # a cancelled job reports nothing more: stop waiting
                    job.cancelled = True
                    raise APIError(499, "client closed the request") from None
                continue
            if isinstance(ev, Failed):
                raise APIError(ev.status, ev.message)
            if isinstance(ev, Done):
                stats = ev.stats[0]
                return Reply(ev.texts[0], stats["tokens"], stats["nfe"])


def prepare(server: Server, req: AgentRequest) -> tuple[Task, ScheduledPolicy]:
    """The task and the agent's policy, every setting checked (4xx) before anything runs."""
    if isinstance(req.task, bool) or not 0 <= req.task < EVAL_POOL:
        raise APIError(400, f"task must be a held-out task index in [0, {EVAL_POOL}), got {req.task}", "task")
    extra = dict(req.model_extra or {})
    reserved = sorted(RESERVED & set(extra))
    if reserved:
        raise APIError(400, f"{reserved[0]} is not an agent option", reserved[0], "invalid_value")
    diffusion = req.sampler or DIFFUSION_SAMPLER
    try:
        check_limits(
            max_rounds=req.max_rounds,
            max_tokens=req.max_tokens,
            max_errors=req.max_errors,
            max_new_tokens=req.max_new_tokens,
        )
        sampler = agent_sampler(req.agent, diffusion)
    except ValueError as e:
        raise APIError(400, str(e), None, "invalid_value") from None
    task = make_task("eval", req.task)
    own_ar = req.agent == "ar" and server.ar is not None
    name = req.model or (server.ar.name if own_ar else server.name)
    srv = server.route(name)
    try:
        policy = ScheduledPolicy(
            srv, name, sampler, req.max_new_tokens, req.seed, **agent_options(req.agent, extra)
        )
    except (ValueError, TypeError, BlockdiffError) as e:  # the options, checked once
        raise APIError(400, str(e), None, "invalid_value") from None
    prompt = render(start_messages(task.question.text), srv.tok)
    as_diffusion = policy.request(prompt, req.seed, diffusion, extra)
    as_diffusion = as_diffusion.model_copy(update={"model": server.name})
    server.job(as_diffusion, prompt, lambda ev: None)  # builds (runs nothing): as the diffusion agent
    srv.job(policy.request(prompt, req.seed, sampler, policy.options), prompt, lambda ev: None)  # as itself
    return task, policy


def run_thread(task: Task, policy: Policy, req: AgentRequest, emit: Callable[[dict], None]) -> None:
    """The agent loop, reporting every round to `emit`; ends with a done or a fatal event."""

    def said(messages: list[dict[str, str]]) -> str | Reply:
        emit({"type": "round", "round": sum(m["role"] == "assistant" for m in messages) + 1})
        return policy(messages)

    def step(s: Step) -> None:
        cost = {"round": s.round, "tokens": s.tokens, "nfe": s.nfe, "seconds": round(s.seconds, 4)}
        if s.call is not None:
            emit({"type": "call", **cost, "call": s.call, "text": s.text})
            emit({"type": "observation", "round": s.round, "observation": s.observation})
        else:
            emit({"type": "call_error", **cost, **(s.error or {}), "text": s.text})

    try:
        res = run_agent(task, said, req.max_rounds, req.max_tokens, req.max_errors, on_step=step)
        emit({"type": "done", "result": res.as_dict()})
    except APIError as e:
        emit({"type": "fatal", "status": e.status, "message": e.message})
    except Exception as e:  # never a silent thread: the client hears why
        emit({"type": "fatal", "status": 500, "message": f"agent run failed: {e!r}"})


def add_routes(app: FastAPI, server: Server) -> None:
    @app.post("/v1/agent/run")
    async def agent_run(req: AgentRequest):
        task, policy = prepare(server, req)
        events: asyncio.Queue = asyncio.Queue()
        emit = emitter(asyncio.get_running_loop(), events)
        start = {"agent": req.agent, "task": task.id, "question": task.question.text}
        start |= {"sampler": policy.sampler, "options": policy.options}

        async def stream():
            yield {"data": json.dumps({"type": "start", **start})}
            worker = threading.Thread(
                target=run_thread, args=(task, policy, req, emit), name=f"agent-{req.agent}", daemon=True
            )
            worker.start()
            try:
                while True:
                    ev: dict[str, Any] = await events.get()
                    if ev["type"] == "fatal":
                        err = {"message": ev["message"], "type": "server_error", "code": ev["status"]}
                        yield {"data": json.dumps({"error": err})}
                        return
                    yield {"data": json.dumps(ev, ensure_ascii=False)}
                    if ev["type"] == "done":
                        return
            finally:
                policy.stop.set()  # a client that went away ends the run at its next model call

        return EventSourceResponse(stream(), ping=15, sep="\n")
