"""Many prompts through `generate` in batches, each row on its own random stream: what every
evaluation, the stitching rollouts and the reference solver decode with."""

from __future__ import annotations

import time

from .engine import generate, row_seeds
from .request import DecodeSpec


def decode_all(
    model, tok, prompts: list[str], spec: DecodeSpec, batch_size: int, index: list[int] | None = None
) -> tuple[list[str], list[list[int]], list, float]:
    """(texts, token ids, per-row stats, decoding seconds) for prompts decoded in batches with a
    checked `spec`; row i has its own random stream (spec.seed * 1_000_003 + index[i], index = 0,
    1, ... unless given), so neither the batch size nor the other rows change a sample."""
    index = list(range(len(prompts))) if index is None else index
    texts, toks, rows, secs = [], [], [], 0.0
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        t = time.perf_counter()
        out = generate(model, tok, chunk, spec, seed=row_seeds(spec.seed, index[i : i + batch_size]))
        secs += time.perf_counter() - t
        texts, toks, rows = texts + out.texts, toks + out.tokens, rows + out.rows
    return texts, toks, rows, secs
