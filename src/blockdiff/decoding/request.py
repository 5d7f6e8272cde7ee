"""One typed decode request, checked once where it enters (CLI, HTTP, agent) and passed down.

A `DecodeSpec` is frozen and hashable: the server groups requests whose specs differ only in
their seed into one canvas (`key`), and a face never carries sampler options as a loose bag.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..model import BlockDiffLM
from .samplers import build_plan

DEFAULT_SAMPLER = "fastdllm"  # threshold decoding with the dual cache: fast and good on every model


def _frozen(v: Any) -> Any:
    return tuple(_frozen(x) for x in v) if isinstance(v, list | tuple) else v


@dataclass(frozen=True)
class DecodeSpec:
    sampler: str = DEFAULT_SAMPLER
    options: tuple[tuple[str, Any], ...] = ()  # sorted (name, value); lists become tuples
    max_new_tokens: int = 64
    seed: int = 0
    notes: tuple[str, ...] = field(default=(), compare=False)  # what checking had to say

    @classmethod
    def build(
        cls,
        model: BlockDiffLM,
        sampler: str | None = None,
        max_new_tokens: int = 64,
        seed: int = 0,
        **options: Any,
    ) -> DecodeSpec:
        """Check the sampler, its options and the length against `model` (a wrong one is a
        ValueError naming it) by building the plan once; the prompt's length is checked when a
        decode starts, before anything is allocated."""
        sampler = sampler or DEFAULT_SAMPLER
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        notes: list[str] = []
        build_plan(model, sampler, max_new_tokens, notes, dict(options))
        frozen = tuple(sorted((k, _frozen(v)) for k, v in options.items()))
        return cls(sampler, frozen, max_new_tokens, seed, tuple(notes))

    @property
    def kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of `start_decoding` (tuples back to lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.options}

    @property
    def key(self) -> DecodeSpec:
        """What rows of one canvas must share: everything but the seed."""
        return replace(self, seed=0)
