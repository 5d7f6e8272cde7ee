"""Sampler options: every name and value checked once, before a plan is built.

A wrong value is a clear error listing what is allowed, never a different algorithm; peers'
spellings (LLaDA's `gen_length`, `block_length`, Dream's `alg`) are mapped here and nowhere else.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

from ..config import did_you_mean
from .constraint import schema_text
from .policies import SCORES

ALIASES = {"gen_length": "max_new_tokens", "block_length": "block_size", "alg": "order"}
CHOICES = {
    "order": ("random", "confidence"),
    "remasking": ("low_confidence", "random"),
    "revise_by": ("snapshot", "random"),
    "score": tuple(SCORES),
    "cache": ("none", "exact", "prefix", "dual"),
}
# samplers whose scoring is set by another option (so `score` would contradict it)
SCORE_SET_BY = {"bd3": "order", "mdlm": None, "llada": "remasking"}


def _int(name: str, lo: int, hi: int | None = None) -> Callable[[Any], Any]:
    def check(v):
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            within = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ValueError(f"{name} must be an integer {within}, got {v!r}")
        return v

    return check


def _float(name: str, lo: float, hi: float, lo_open: bool = False) -> Callable[[Any], Any]:
    def check(v):
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
        if v < lo or v > hi or (lo_open and v == lo):
            left = "(" if lo_open else "["
            raise ValueError(f"{name} must be in {left}{lo}, {hi}], got {v}")
        return float(v)

    return check


def _choice(name: str) -> Callable[[Any], Any]:
    def check(v):
        if v not in CHOICES[name]:
            hint = did_you_mean(v, CHOICES[name])
            raise ValueError(f"{name} '{v}' is not one of {', '.join(CHOICES[name])}{hint}")
        return v

    return check


def _text(name: str) -> Callable[[Any], Any]:
    def check(v):
        if not isinstance(v, str) or not v:
            raise ValueError(f"{name} must be a non-empty string, got {v!r}")
        return v

    return check


CHECKS: dict[str, Callable[[Any], Any]] = {
    "block_size": _int("block_size", 1),
    "steps": _int("steps", 1),
    "top_k": _int("top_k", 1),
    # a spec forward feeds (k + w)(k + 2) tokens (k drafts, w candidates for the first): past 8
    # of either it costs more than it saves
    "draft_len": _int("draft_len", 1, 8),
    "draft_width": _int("draft_width", 1, 8),
    "window": _int("window", 1),
    "max_span": _int("max_span", 1),
    "expand_step": _int("expand_step", 1),
    "expand_max": _int("expand_max", 0),
    "refresh_every": _int("refresh_every", 1),
    "temperature": _float("temperature", 0.0, 100.0),
    "top_p": _float("top_p", 0.0, 1.0, lo_open=True),
    "threshold": _float("threshold", 0.0, 1.0, lo_open=True),
    "factor": _float("factor", 0.0, 1e9, lo_open=True),
    "expand_below": _float("expand_below", 0.0, 1.0),
    "regex": _text("regex"),
    "grammar": _text("grammar"),
    "json_schema": schema_text,
    **{k: _choice(k) for k in CHOICES},
}


def accepted(plan: Callable, extra: tuple[str, ...] = ()) -> set[str]:
    always = {"stop_at_eos", "score", "regex", "json_schema", "grammar"}
    names = set(inspect.signature(plan).parameters) | always | set(extra)
    return names - {"model", "max_new_tokens", "notes", "kw"}


def check(sampler: str, kwargs: dict[str, Any], allowed: set[str]) -> dict[str, Any]:
    """Aliases mapped, None dropped (= the sampler's default), names and values checked."""
    out: dict[str, Any] = {}
    for k, v in kwargs.items():
        k = ALIASES.get(k, k)
        if k in out:
            raise ValueError(f"{k} given twice (once under a peer's alias)")
        if v is not None:
            out[k] = v
    unknown = sorted(set(out) - allowed)
    if unknown:
        hint = did_you_mean(unknown[0], sorted(allowed))
        raise ValueError(
            f"sampler '{sampler}' does not take {', '.join(unknown)}{hint}; "
            f"it takes {', '.join(sorted(allowed))}"
        )
    if "score" in out and sampler in SCORE_SET_BY:
        by = SCORE_SET_BY[sampler]
        how = f"; choose it with {by}=..." if by else ""
        raise ValueError(f"sampler '{sampler}' sets its own scoring, so it does not take score{how}")
    for k, v in out.items():
        if k in CHECKS:
            out[k] = CHECKS[k](v)
    if "stages" in out:
        for st in out["stages"]:
            if not (isinstance(st, list | tuple) and len(st) == 2 and 0 < float(st[1]) <= 1):
                raise ValueError(f"structural stages are (block_size or None, gamma in (0, 1]), got {st!r}")
    return out
