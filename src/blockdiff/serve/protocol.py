"""OpenAI's wire format as blockdiff reads and writes it: request models, the fields accepted at
their neutral values, and errors in OpenAI's shape (what every 4xx/5xx body looks like)."""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

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
    "tools": (None, []),
    "tool_choice": (None, "none"),
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


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_turn(self) -> dict[str, str]:
        """One chat-template turn: text parts joined, `developer` as OpenAI's new `system`."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Common):
    messages: list[Message]


def include_usage(req: _Common) -> bool:
    return bool((req.stream_options or {}).get("include_usage"))
