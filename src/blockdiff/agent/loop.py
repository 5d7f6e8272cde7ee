"""The agent loop: ask the policy for a call, parse it, run the tool, append the observation.

The loop knows nothing of models: a policy is any `policy(messages) -> str | Reply` callable, so
the loop is tested with scripted and broken policies, and the AR and diffusion agents differ
only in the policy (`ModelPolicy` with sampler `ar`, or `fastdllm`/`bd3`/...). Every task ends
in an `AgentResult` — success by the question's own checker, or the reason it failed — never in
an exception from the model's output.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..decoding.constraint import constraint_of
from ..decoding.engine import check_length
from ..decoding.request import DecodeSpec, as_spec
from .tools import Toolbox
from .trajectory import (
    OBSERVATION,
    Call,
    CallError,
    call_error_at,
    format_observation,
    parse_call,
    render,
    start_messages,
)
from .world import Task


@dataclass
class Reply:
    """A policy's turn, with what producing it cost (0 where the policy is not a model)."""

    text: str
    tokens: int = 0
    nfe: int = 0


Policy = Callable[[list[dict[str, str]]], "str | Reply"]


class ContextLimit(ValueError):
    """The dialogue no longer fits the model's context."""


@dataclass
class Step:
    """One round: what the policy wrote, the call it meant (or the error), the tool's result."""

    round: int
    text: str
    call: dict | None
    observation: dict | None
    error: dict | None
    tokens: int
    nfe: int
    seconds: float


@dataclass
class AgentResult:
    task: str
    question: str
    success: bool
    failure: str | None  # None on success; else unparsable/unknown_tool/bad_args: why, round_limit, ...
    answer: object
    expected: dict
    rounds: int
    tool_calls: int  # calls parsed and run, finish included
    tokens: int  # generated tokens, all rounds
    nfe: int
    seconds: float  # wall time end to end (policy and tools)
    steps: list[Step] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self, dialogue: bool = False) -> dict:
        d = asdict(self)
        if not dialogue:
            d.pop("messages")
        return d


LIMITS = {"max_rounds": 1, "max_tokens": 1, "max_errors": 0, "max_new_tokens": 1}  # lowest values


def check_limits(**limits: int) -> None:
    """Refuse a limit below its lowest value (LIMITS), before any model runs."""
    for name, v in limits.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < LIMITS[name]:
            raise ValueError(f"{name} must be >= {LIMITS[name]} (an integer), got {v!r}")


def run_agent(
    task: Task,
    policy: Policy,
    max_rounds: int = 12,
    max_tokens: int = 2048,
    max_errors: int = 0,
    on_step: Callable[[Step], None] | None = None,
) -> AgentResult:
    """Run one task to its end: `finish`, a broken call (after `max_errors` tolerated ones, each
    answered with an error observation), `max_rounds` rounds or `max_tokens` generated tokens.
    `on_step(step)` after every round (the CLI prints it; a page could stream it)."""
    check_limits(max_rounds=max_rounds, max_tokens=max_tokens, max_errors=max_errors)
    q = task.question
    box = Toolbox(task.world)
    msgs = start_messages(q.text)
    steps: list[Step] = []
    tokens = nfe = calls = errors = 0
    answer: object = None
    failure: str | None = "round_limit"
    t0 = time.perf_counter()
    for r in range(1, max_rounds + 1):
        t = time.perf_counter()
        try:
            reply = policy(msgs)
        except ValueError as e:  # the dialogue outgrew the context, a sampler refused its options...
            failure = f"{'context_limit' if isinstance(e, ContextLimit) else 'model_error'}: {e}"
            break
        reply = reply if isinstance(reply, Reply) else Reply(str(reply))
        tokens, nfe = tokens + reply.tokens, nfe + reply.nfe
        msgs.append({"role": "assistant", "content": reply.text})
        parsed = parse_call(reply.text)
        step = Step(r, reply.text, None, None, None, reply.tokens, reply.nfe, 0.0)
        if isinstance(parsed, CallError):
            errors += 1
            step.error = {"kind": parsed.kind, "message": parsed.message}
            obs = {"error": f"{parsed.kind}: {parsed.message}"}
        else:
            calls += 1
            step.call = {"tool": parsed.tool, "args": parsed.args}
            obs = step.observation = box.call(parsed.tool, parsed.args)
        step.seconds = time.perf_counter() - t
        steps.append(step)
        if on_step is not None:
            on_step(step)
        if isinstance(parsed, CallError) and errors > max_errors:
            failure = f"{parsed.kind}: {parsed.message}"
            break
        if isinstance(parsed, Call) and parsed.tool == "finish":
            answer = parsed.args["answer"]
            failure = None if q.check(answer) else "wrong_answer"
            break
        msgs.append({"role": OBSERVATION, "content": format_observation(obs)})
        if tokens >= max_tokens:
            failure = "token_limit"
            break
    return AgentResult(
        task=task.id,
        question=q.text,
        success=failure is None,
        failure=failure,
        answer=answer,
        expected={"entity": q.entity, "value": q.value},
        rounds=len(steps),
        tool_calls=calls,
        tokens=tokens,
        nfe=nfe,
        seconds=time.perf_counter() - t0,
        steps=steps,
        messages=msgs,
    )


def replay_policy(messages: list[dict[str, str]]) -> Policy:
    """A policy that says the assistant turns of a recorded dialogue, in order (and then
    nothing a parser accepts): runs a scripted trajectory through the real loop."""
    turns = iter([m["content"] for m in messages if m["role"] == "assistant"])
    return lambda _msgs: next(turns, "")


class ModelPolicy:
    """A blockdiff model as a policy: render the dialogue, decode one call with a named sampler.

    `sampler="ar"` is the AR agent; a diffusion sampler (`fastdllm`, `bd3`, ...) the diffusion
    agent. Round r (0-based) decodes at most `max_new_tokens` tokens with seed `seed + r`, so a
    policy holds no state between tasks and a task replays exactly. `revise=N`: a reply that is
    not a usable call is remasked around the error and decoded again, at most N times
    (`call_error_at`, `policies.Recheck`). A dialogue that no longer
    fits the model's context raises `ContextLimit` (a failure record). `decode` is the one model
    call: the server overrides it to go through its scheduler, the rest stays the same."""

    def __init__(
        self,
        model,
        tok,
        sampler: str | DecodeSpec = "ar",
        max_new_tokens: int = 96,
        seed: int = 0,
        revise: int = 0,
        **options,
    ):
        self.model, self.tok, self.revise = model, tok, revise
        if isinstance(sampler, DecodeSpec):  # a face's checked request
            max_new_tokens = sampler.max_new_tokens or max_new_tokens
        self.spec = s = as_spec(model, sampler, max_new_tokens, seed, options)  # checked here
        if (con := constraint_of(dict(s.kwargs))) is not None:  # a call must fit the budget
            con.bind(tok).check_fits(s.max_new_tokens)
        self.sampler, self.max_new_tokens, self.seed = s.sampler, s.max_new_tokens, s.seed
        self.options = s.kwargs

    def __call__(self, messages: list[dict[str, str]]) -> Reply:
        prompt = render(messages, self.tok)
        n, limit = len(self.tok.encode(prompt)), self.model.config.max_position_embeddings
        if n + self.max_new_tokens > limit:
            raise ContextLimit(
                f"prompt ({n} tokens) + max_new_tokens ({self.max_new_tokens}) exceeds the model's "
                f"context of {limit} tokens"
            )
        done = sum(m["role"] == "assistant" for m in messages)
        return self.decode(prompt, self.seed + done)

    def decode(self, prompt: str, seed: int) -> Reply:
        from ..decoding import generate

        check = {"check": call_error_at, "check_rounds": self.revise} if self.revise else {}
        out = generate(self.model, self.tok, [prompt], self.spec, seed=seed, **check)
        row = out.rows[0]
        return Reply(out.texts[0], row.tokens, row.nfe)

    def check(self, messages: list[dict[str, str]]) -> None:
        """The first prompt against the context (the options were checked when the policy was
        made), so a run fails with one clear error instead of a failure record on every task."""
        check_length(self.model, len(self.tok.encode(render(messages, self.tok))), self.max_new_tokens)
