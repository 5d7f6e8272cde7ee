"""Continuous batching: rows of one decode join another's canvas between blocks, finished rows
leave, and every row still decodes exactly as it would alone.

Two decodes with the same plan that both stand between blocks, with their caches ending the same
number of columns before their next block, become one: each decode's columns are shifted so that
every row's next block lies in the same columns (a row's positions are its own, so a shift
changes no logit; block ids are relabelled to agree), the caches are moved alike, and columns no
row uses any more are dropped on the left. A newcomer therefore decodes its first block on its
own (its prompt goes into its own cache, as alone) and then joins at the next boundary that both
decodes reach. Plans that revisit the canvas (revision, expansion, speculation) or refresh an
approximate cache never join (`Plan.joins`).
"""

from __future__ import annotations

from .engine import Decoding


def between_blocks(d: Decoding) -> tuple[int, int] | None:
    """(block id, first column) of the block `d` starts next, if rows may join or leave now."""
    if not d.plan.joins or d.ended:
        return None
    return d.stepper.between_blocks()


def can_join(a: Decoding, b: Decoding) -> bool:
    pa, pb = between_blocks(a), between_blocks(b)
    if pa is None or pb is None or a.plan != b.plan or a.stepper.runner.model is not b.stepper.runner.model:
        return False
    return a.stepper.runner.lag(pa[1]) == b.stepper.runner.lag(pb[1])


def join(a: Decoding, b: Decoding) -> list[int]:
    """Make b's rows rows of `a` (after a's own); returns their indices in `a`. `b` is spent."""
    if not can_join(a, b):
        raise ValueError("these decodes cannot join now (see can_join)")
    (ka, fa), (kb, fb) = between_blocks(a), between_blocks(b)
    front, n = max(fa, fb), a.c.batch
    cancelled = a.cancelled | {n + r for r in b.cancelled}
    _regrid(a, [(a, list(range(n)), front - fa, 0), (b, list(range(b.c.batch)), front - fb, ka - kb)])
    a.cancelled = cancelled
    return list(range(n, n + b.c.batch))


def evict(d: Decoding, keep: list[int]) -> None:
    """Keep only rows `keep` (in that order: row keep[i] becomes row i); between blocks."""
    if between_blocks(d) is None or not keep:
        raise ValueError("rows leave between blocks, and at least one must stay")
    d.cancelled = {i for i, r in enumerate(keep) if r in d.cancelled}
    _regrid(d, [(d, keep, 0, 0)])


def _regrid(d: Decoding, parts: list[tuple[Decoding, list[int], int, int]]) -> None:
    # the leftmost column a kept row uses becomes column 0
    drop = min(int(p.c.valid[r].nonzero()[0]) + s for p, rows, s, _ in parts for r in rows)
    parts = [(p, rows, s - drop, k) for p, rows, s, k in parts]
    d.c.regrid([(p.c, rows, s, k) for p, rows, s, k in parts])
    d.stepper.regrid([(p.stepper, rows, s) for p, rows, s, _ in parts])
