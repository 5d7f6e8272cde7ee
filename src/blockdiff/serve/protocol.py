"""OpenAI's wire format as blockdiff reads and writes it: request models, the fields accepted at
their neutral values, and errors in OpenAI's shape (what every 4xx/5xx body looks like)."""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

# OpenAI fields blockdiff does not implement: accepted only at their neutral values.
NEUTRAL: dict[str, tuple] = {
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "suffix": (None,),
}
# OpenAI fields with no effect on a completion: accepted and ignored, never sampler options.
IGNORED = ("store", "metadata", "parallel_tool_calls", "service_tier", "modalities")


def response_format(rf) -> dict:
    """OpenAI's `response_format` as decode options: text (none), json_object (any JSON object),
    json_schema (its `json_schema.schema`)."""
    if rf is None or rf == {"type": "text"}:
        return {}
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "json_object":
        return {"json_schema": {"type": "object"}}
    if kind == "json_schema":
        schema = (
            (rf.get("json_schema") or {}).get("schema") if isinstance(rf.get("json_schema"), dict) else None
        )
        if not isinstance(schema, dict):
            raise APIError(
                400, "response_format json_schema needs json_schema.schema (an object)", "response_format"
            )
        return {"json_schema": schema}
    raise APIError(
        400, f"response_format type {kind!r} is not one of text, json_object, json_schema", "response_format"
    )


def tool_choice(extra: dict) -> tuple[dict[str, dict], str | None]:
    """OpenAI's `tools` and `tool_choice`: (the functions by name, the choice: None when no tool
    may be called, "auto", "required", or one function's name)."""
    tools, choice = extra.get("tools"), extra.get("tool_choice")
    if not tools or choice == "none":
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice names a tool, but the request has no tools", "tool_choice")
        return {}, None
    funcs: dict[str, dict] = {}
    for t in tools if isinstance(tools, list) else [None]:
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise APIError(400, 'each tool must be {"type": "function", "function": {"name": ...}}', "tools")
        if not isinstance(f.get("parameters", {}), dict):
            raise APIError(400, f"tool {f['name']}: parameters must be a JSON schema object", "tools")
        if f["name"] in funcs:
            raise APIError(400, f"two tools are named {f['name']}", "tools")
        funcs[f["name"]] = f
    if choice in (None, "auto", "required"):
        return funcs, choice or "auto"
    name = ((choice or {}).get("function") or {}).get("name") if isinstance(choice, dict) else None
    if name not in funcs:
        why = f"tool_choice {choice!r} is not none, auto, required or one of the tools"
        raise APIError(400, why, "tool_choice")
    return funcs, name


def call_schema(funcs: dict[str, dict]) -> dict:
    """The JSON of a call of one of `funcs`: {"name": its name, "arguments": its parameters}."""
    one = [
        {
            "type": "object",
            "properties": {"name": {"const": n}, "arguments": f.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"],
        }
        for n, f in funcs.items()
    ]
    return one[0] if len(one) == 1 else {"anyOf": one}


def tools_turn(funcs: dict[str, dict]) -> dict[str, str]:
    """A system turn telling the model its functions and how a call is written (what `as_call`
    reads back, and what a required call is constrained to)."""
    lines = [
        "You can call these functions. To call one, answer with only a JSON object "
        '{"name": <the function>, "arguments": <its arguments>}.'
    ]
    for n, f in funcs.items():
        params = json.dumps(f.get("parameters") or {"type": "object"})
        lines.append(f"- {n}: {f.get('description', '')} Arguments: {params}")
    return {"role": "system", "content": "\n".join(lines)}


def as_call(text: str, funcs: dict[str, dict]) -> dict | None:
    """An answer that is a call of one of `funcs`, as OpenAI's `tool_calls` entry; else None."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not (isinstance(obj, dict) and obj.get("name") in funcs and isinstance(obj.get("arguments"), dict)):
        return None
    fn = {"name": obj["name"], "arguments": json.dumps(obj["arguments"])}
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function", "function": fn}


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
    _tools: tuple[dict[str, dict], str | None] | None = PrivateAttr(default=None)

    def tools(self) -> tuple[dict[str, dict], str | None]:
        """`tool_choice` of the request's fields, read once (prompt, job and response ask)."""
        if self._tools is None:
            self._tools = tool_choice(self.model_extra or {})
        return self._tools


class CompletionRequest(_Common):
    prompt: str


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[dict] | None = None  # an assistant's calls, as the model wrote them
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def as_turn(self) -> dict[str, str]:
        """One chat-template turn: text parts joined, `developer` as OpenAI's new `system`, an
        assistant's tool calls as the JSON it answered with."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        for c in self.tool_calls or []:
            f = c.get("function") or {}
            try:
                args = json.loads(f.get("arguments") or "{}")
            except (TypeError, ValueError):
                raise APIError(400, "an assistant tool call's arguments are not JSON", "messages") from None
            text += json.dumps({"name": f.get("name"), "arguments": args})
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Common):
    messages: list[Message]


def include_usage(req: _Common) -> bool:
    return bool((req.stream_options or {}).get("include_usage"))


def usage(n_prompt: int, stats: list[dict], returned: list[int]) -> dict[str, Any]:
    """OpenAI's usage (completion_tokens: the tokens of the returned texts, no EOS, nothing past
    a stop string) and blockdiff's NFE figures (over every committed token, as the page shows)."""
    n = sum(returned)
    committed = sum(s["tokens"] for s in stats)
    nfe = max((s["nfe"] for s in stats), default=0)
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": n,
        "total_tokens": n_prompt + n,
        "nfe": nfe,
        "tokens_per_nfe": round(committed / max(1, nfe), 4),
    }
