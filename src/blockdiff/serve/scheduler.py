"""One model, one worker thread, many requests: dynamic and continuous batching over the canvas loop.

Requests with the same decoding settings (a `DecodeSpec` but its seed) that wait together start
together as rows of one canvas; each row decodes as it would alone (its own positions and random
stream: the engine's batched = unbatched oracle; bit for bit in float32, up to kernel rounding in
bfloat16, docs/decisions.md). A request that arrives while others run starts its own batch at
once (up to `max_active` batches, stepped in turn, one forward each: an `ar` panel and a
diffusion panel race on the same cores; at most one such newcomer batch per setting, so that
later arrivals gather) and, when its sampler decodes blocks in lockstep (`Plan.joins`), joins a
running batch of the same settings at the next block boundary both reach
(`decoding/continuous.py`; a batch at a boundary waits a step or two for its partner to reach
one). Rows of finished requests leave at boundaries. A cancelled or timed-out request frees its
rows at the next step (`Decoding.cancel`: the other rows are unaffected).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from ..decoding import DecodeSpec, row_seeds, start_decoding
from ..decoding.continuous import between_blocks, can_join, evict, join
from ..decoding.engine import Decoding, StepEvent
from ..model import BlockDiffLM
from ..tokenizer import Tokenizer

log = logging.getLogger("blockdiff.serve")


# ---- what a job hears (typed; `as_dict` is the wire form the page reads) -------------------------


@dataclass(frozen=True)
class JobEvent:
    type: ClassVar[str]

    def as_dict(self) -> dict:
        return {"type": self.type, **asdict(self)}


@dataclass(frozen=True)
class Started(JobEvent):
    type: ClassVar[str] = "start"
    canvas: list[int]  # new-token columns per row
    notes: list[str]


@dataclass(frozen=True)
class Denoised(JobEvent):
    type: ClassVar[str] = "denoise"
    step: int
    committed: list  # [row, column, text piece]
    remasked: list  # [row, column]
    nfe: list[int]
    steered: list = field(default_factory=list)  # [row, column]: committed where the constraint overruled


@dataclass(frozen=True)
class Delta(JobEvent):
    type: ClassVar[str] = "delta"
    index: int
    text: str


@dataclass(frozen=True)
class Finished(JobEvent):
    type: ClassVar[str] = "finish"
    index: int
    reason: str
    text: str  # the row's whole text (what a non-streamed answer returns)


@dataclass(frozen=True)
class Done(JobEvent):
    type: ClassVar[str] = "done"
    texts: list[str]
    finish: list[str]
    stats: list[dict]
    tokens: list[int]  # completion tokens of each returned text


@dataclass(frozen=True)
class Failed(JobEvent):
    type: ClassVar[str] = "error"
    status: int
    message: str


class QueueFull(Exception):
    pass


@dataclass
class Job:
    """One request: `n` rows of the same prompt. The worker reports to `emit` (thread-safe)."""

    prompt: str
    n: int
    spec: DecodeSpec  # checked when the request came in
    stop: list[str]
    deadline: float
    emit: Callable[[JobEvent], None]
    denoise: bool = False
    stream: bool = False
    cancelled: bool = False
    infill: bool = False
    # worker side
    rows: list[int] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)  # text already streamed, per choice
    finish: list[str | None] = field(default_factory=list)
    texts: list[str | None] = field(default_factory=list)

    @property
    def key(self) -> DecodeSpec:
        return self.spec.key  # what the rows of one canvas share: all but the seed

    @property
    def seeds(self) -> list[int]:
        # as generate(prompts=[prompt] * n, seed=seed): the same texts as a request alone
        return row_seeds(self.spec.seed, range(self.n))


@dataclass
class Batch:
    jobs: list[Job]
    decoding: Decoding
    it: Any
    key: DecodeSpec


def emitter(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[JobEvent], None]:
    return lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)


class Scheduler:
    def __init__(
        self,
        model: BlockDiffLM,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        max_queue: int = 64,
        max_active: int = 4,
    ):
        self.model, self.tok = model, tokenizer
        self.max_batch, self.max_queue, self.max_active = max_batch, max_queue, max_active
        self.waiting: deque[Job] = deque()
        self.active: list[Batch] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.steps = 0  # forwards run, for /health
        self.thread = threading.Thread(target=self._run, name="blockdiff-decoder", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self.waiting.append(job)
            self.cond.notify()

    def load(self) -> dict[str, int]:
        with self.cond:
            return {
                "waiting": len(self.waiting),
                "running_rows": sum(len(j.rows) for b in self.active for j in b.jobs),
                "batches": len(self.active),
                "forwards": self.steps,
            }

    # ---- worker --------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.waiting and not self.active:
                    self.cond.wait()
                if self.stopping:
                    return
                try:
                    new = self._take()
                except Exception as e:  # never let the worker die: fail what waits, go on
                    log.exception("scheduling failed")
                    new = []
                    for j in self.waiting:
                        j.emit(Failed(500, f"scheduling failed: {e!r}"))
                    self.waiting.clear()
            for jobs in new:
                self._start(jobs)
            for b in list(self.active):
                if self._held(b):
                    continue
                try:
                    self._step(b)
                except Exception as e:  # a failed batch fails its requests, never the server
                    log.exception("decoding failed")
                    for j in b.jobs:
                        if any(f is None for f in j.finish):
                            j.emit(Failed(500, f"decoding failed: {e!r}"))
                    with self.cond:
                        self.active.remove(b)
            try:
                with self.cond:
                    self._regroup()
            except Exception:  # joining is an optimisation: a batch that cannot join runs alone
                log.exception("regrouping failed")

    # ---- continuous batching -----------------------------------------------------------------

    def _rows(self, b: Batch) -> int:
        return sum(j.n for j in b.jobs if any(f is None for f in j.finish))

    def _partners(self, b: Batch) -> list[Batch]:
        fits = self.max_batch - self._rows(b)
        return [
            o
            for o in self.active
            if o is not b and o.key == b.key and o.decoding.plan.joins and self._rows(o) <= fits
        ]

    def _held(self, b: Batch) -> bool:
        """A batch at a boundary waits while a batch it could join is mid-block."""
        partners = self._partners(b)  # cheap: no canvas is read unless a partner exists
        if not partners or between_blocks(b.decoding) is None:
            return False
        return any(between_blocks(o.decoding) is None and not o.decoding.ended for o in partners)

    def _regroup(self) -> None:
        """Between blocks: rows of finished requests leave, batches of the same settings join."""
        for b in list(self.active):
            d = b.decoding
            live = [j for j in b.jobs if any(f is None for f in j.finish)]
            if live and len(live) < len(b.jobs) and between_blocks(d) is not None:
                keep = [r for j in live for r in j.rows]
                evict(d, keep)
                at = {r: i for i, r in enumerate(keep)}
                for j in live:
                    j.rows = [at[r] for r in j.rows]
                b.jobs = live
        for b in list(self.active):
            if b not in self.active:
                continue
            for o in self._partners(b):
                if self.active.index(o) > self.active.index(b) and can_join(b.decoding, o.decoding):
                    rows = join(b.decoding, o.decoding)
                    for j in o.jobs:
                        j.rows = [rows[r] for r in j.rows]
                    b.jobs += o.jobs
                    self.active.remove(o)

    def _take(self) -> list[list[Job]]:
        """Waiting jobs that can start now, grouped into batches (called under the lock)."""
        now = time.monotonic()
        for j in [j for j in self.waiting if j.cancelled or now > j.deadline]:
            self.waiting.remove(j)
            self._drop(j)
        groups: list[list[Job]] = []
        for j in list(self.waiting):
            group = next((g for g in groups if g[0].key == j.key), None)
            if group is None:
                if len(self.active) + len(groups) >= self.max_active:
                    continue
                # one newcomer batch per setting beside the running one: later arrivals gather
                # while it decodes its first block, then start together (fewer one-row forwards)
                if sum(b.key == j.key for b in self.active) >= 2:
                    continue
                group = []
                groups.append(group)
            if sum(x.n for x in group) + j.n > self.max_batch and group:
                continue
            group.append(j)
            self.waiting.remove(j)
        return groups

    def _drop(self, j: Job) -> None:
        if not j.cancelled:
            j.emit(Failed(504, "request timed out before it was decoded"))

    def _start(self, jobs: list[Job]) -> None:
        prompts, seeds = [], []
        for j in jobs:
            j.rows = list(range(len(prompts), len(prompts) + j.n))
            j.sent, j.finish, j.texts = [""] * j.n, [None] * j.n, [None] * j.n
            prompts += [j.prompt] * j.n
            seeds += j.seeds
        j0 = jobs[0]
        try:
            d = start_decoding(self.model, self.tok, prompts, j0.spec, seed=seeds)
        except Exception as e:  # checked at submission; anything left is the server's fault
            if len(jobs) > 1:  # one bad request must not fail the others: start each alone
                for j in jobs:
                    self._start([j])
                return
            log.exception("could not start decoding")
            j0.emit(Failed(500, f"could not start decoding: {e}"))
            return
        c = d.c
        for j in jobs:
            lengths = [int(c.valid[r, c.start[r] :].sum()) for r in j.rows]
            j.emit(Started(lengths, d.notes))
        with self.cond:
            self.active.append(Batch(jobs, d, iter(d), j0.key))

    def _step(self, b: Batch) -> None:
        d = b.decoding
        now = time.monotonic()
        for j in b.jobs:
            if (j.cancelled or now > j.deadline) and any(f is None for f in j.finish):
                for r in j.rows:
                    d.cancel(r)
                if not j.cancelled:
                    j.emit(Failed(504, "request timed out"))
                j.finish = ["cancelled" if f is None else f for f in j.finish]
        ev = next(b.it, None)
        self.steps += ev is not None
        for j in b.jobs:
            if all(f is not None for f in j.finish):
                continue
            if ev is not None and j.denoise:
                self._denoise(j, d, ev)
            self._progress(j, d, ended=ev is None)
        if ev is None or all(f is not None for j in b.jobs for f in j.finish):
            for r in (~d.c.done()).nonzero().flatten().tolist():  # end rows nobody waits for
                d.cancel(r)
            with self.cond:
                self.active.remove(b)

    def _denoise(self, j: Job, d: Decoding, ev: StepEvent) -> None:
        c, idx = d.c, {r: i for i, r in enumerate(j.rows)}
        g = c.start.tolist()
        com = [[idx[r], k - g[r], self._piece(t)] for r, k, t in ev.committed if r in idx and k >= g[r]]
        rem = [[idx[r], k - g[r]] for r, k in ev.remasked if r in idx]
        nfe = [ev.nfe[r] for r in j.rows]
        steer = [[idx[r], k - g[r]] for r, k in ev.steered if r in idx and k >= g[r]]
        j.emit(Denoised(ev.step, com, rem, nfe, steer))

    def _piece(self, t: int) -> str:
        return "" if t in (self.tok.eos_id, self.tok.pad_id) else self.tok.decode([t])

    def _progress(self, j: Job, d: Decoding, ended: bool) -> None:
        """Stream what became final, apply stop strings, finish rows that are done."""
        c = d.c
        done = c.done()
        hold = max((len(s) for s in j.stop), default=1) - 1
        for i, r in enumerate(j.rows):
            if j.finish[i] is not None:
                continue
            row_done = ended or (bool(done[r]) and not d.revises)
            text = d.text(r) if row_done else ("" if j.infill else self.tok.decode(d.final_prefix(r)))
            cut = min((p for p in (text.find(s) for s in j.stop) if p >= 0), default=-1)
            if cut >= 0:
                text, row_done = text[:cut], True
                d.cancel(r)
                j.finish[i] = "stop"
            elif row_done:
                j.finish[i] = "stop" if int(c.eos_at[r]) < c.T else "length"
            if row_done:
                j.texts[i] = text
            elif text.endswith("\ufffd"):  # a multi-byte character split across tokens
                continue
            else:
                text = text[: len(text) - hold] if hold else text
            if j.stream and len(text) > len(j.sent[i]) and text.startswith(j.sent[i]):
                j.emit(Delta(i, text[len(j.sent[i]) :]))
                j.sent[i] = text
            if row_done:
                j.emit(Finished(i, j.finish[i], j.texts[i]))
        if all(f is not None for f in j.finish):
            stats = [s.as_dict() for s in (c.stats()[r] for r in j.rows)]
            counts = [
                st["tokens"] - st["stopped_at_eos"] if j.infill else self._returned(d, r, t)
                for r, t, st in zip(j.rows, j.texts, stats, strict=True)
            ]
            j.emit(Done(j.texts, j.finish, stats, counts))

    def _returned(self, d: Decoding, r: int, text: str) -> int:
        """Tokens of the text returned (OpenAI's completion_tokens): the row's generated tokens,
        without EOS, up to the shortest prefix that covers a stop-cut text."""
        ids = d.c.generated(r).tolist()
        lo, hi = 0, len(ids)
        while lo < hi:  # decoded length grows with the prefix: the first prefix as long as text
            mid = (lo + hi) // 2
            if len(self.tok.decode(ids[:mid]).rstrip("\ufffd")) >= len(text):
                hi = mid
            else:
                lo = mid + 1
        return lo
