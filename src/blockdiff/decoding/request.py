"""One typed decode request, checked once where it enters (CLI, HTTP, agent) and passed down.

A `DecodeSpec` is frozen and hashable: the server groups requests whose specs differ only in
their seed into one canvas (`key`), and a face never carries sampler options as a loose bag.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..model import BlockDiffLM
from .samplers import build_plan, check_options

DEFAULT_SAMPLER = "fastdllm"  # threshold decoding with the dual cache: fast and good on every model


def _frozen(v: Any) -> Any:
    return tuple(_frozen(x) for x in v) if isinstance(v, list | tuple) else v


@dataclass(frozen=True)
class DecodeSpec:
    sampler: str = DEFAULT_SAMPLER
    options: tuple[tuple[str, Any], ...] = ()  # sorted (name, value); lists become tuples
    max_new_tokens: int | None = 64  # None: decided where the decode is made (`with_length`)
    seed: int = 0

    @classmethod
    def build(
        cls,
        model: BlockDiffLM,
        sampler: str | None = None,
        max_new_tokens: int | None = 64,
        seed: int = 0,
        **options: Any,
    ) -> DecodeSpec:
        """Check the sampler, its options and the length against `model` (a wrong one is a
        ValueError naming it) by building the plan once; the prompt's length is checked when a
        decode starts, before anything is allocated. With `max_new_tokens=None` (a task that
        decides its canvas) the name and options are checked now, the rest by `with_length`."""
        sampler = sampler or DEFAULT_SAMPLER
        if max_new_tokens is not None and (
            isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0
        ):
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if max_new_tokens is None:  # the notes are said again when a decode is made
            check_options(model, sampler, dict(options), [])
        else:
            build_plan(model, sampler, max_new_tokens, [], dict(options))
        frozen = tuple(sorted((k, _frozen(v)) for k, v in options.items()))
        return cls(sampler, frozen, max_new_tokens, seed)

    @property
    def kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of `start_decoding` (tuples back to lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.options}

    def with_length(self, model: BlockDiffLM, max_new_tokens: int) -> DecodeSpec:
        """This request for a length decided later, checked again for it."""
        return DecodeSpec.build(model, self.sampler, max_new_tokens, self.seed, **self.kwargs)

    def length(self, model: BlockDiffLM, default: int) -> DecodeSpec:
        """This request with `default` as its length if it has none yet."""
        return self if self.max_new_tokens is not None else self.with_length(model, default)

    @property
    def key(self) -> DecodeSpec:
        """What rows of one canvas must share: everything but the seed."""
        return replace(self, seed=0)


def as_spec(
    model: BlockDiffLM, sampler: str | DecodeSpec, max_new_tokens: int | None, seed: int, options: dict
) -> DecodeSpec:
    """What a feature decodes with: the face's checked spec, or (the library's loose form, a
    sampler name and keyword options) one built and checked here."""
    if not isinstance(sampler, DecodeSpec):
        return DecodeSpec.build(model, sampler, max_new_tokens, seed, **options)
    if options:
        raise TypeError(f"options {sorted(options)} belong in the DecodeSpec")
    return sampler if max_new_tokens is None else sampler.length(model, max_new_tokens)
