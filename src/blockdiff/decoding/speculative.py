"""Self-speculative block decoding: the diffusion path drafts, the AR path verifies, one forward.

An NBDiff model (context-causal layout, shifted logits, trained with an AR loss) holds two
predictors in one network: each clean causal token's output is an AR next-token distribution p,
and a block of B mask tokens after a clean prefix drafts the tokens after the next one (q). Each
forward feeds the pending token `a` and the k = B - 1 drafts of the previous forward as clean
tokens, and behind clean index m (for every m = 0..k) one mask block: whatever prefix of the
drafts is accepted, the next drafts were made for exactly that prefix (TiDAR's layout).

Verification: greedy — accept the longest prefix of drafts equal to the AR argmax, then the AR
token at the first mismatch (or the bonus token after k accepted): every forward commits >= 1
token and the output is greedy AR's, token for token. Sampling — accept draft d with
probability min(1, p(d)/q(d)), else sample from the normalised residual (p - q)+: the output
distribution is the AR model's (Leviathan et al. 2023). Rejected drafts' keys are rolled back in
the cache (each row to its own length) and overwritten by the next forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .canvas import Canvas
from .policies import argmax, filter_logits
from .runner import Runner


@dataclass
class Speculate:
    draft_len: int = 3  # drafts per forward (k, the most with `cost`); the mask blocks have k + 1 tokens
    cost: Callable[[int], float] | None = None  # forward cost by width: draft length chosen, `best_k`
    probe: int = 4  # forwards at draft_len that measure the acceptance before the first choice
    notes: list[str] | None = None  # where a change of draft length is told
    prior: tuple[float, ...] = ()  # the model's measured acceptance per draft position (its config)


# The prior counts as this many tries of each draft position, beside the counted ones.
PRIOR_TRIES = 8


def rows(k: int, B: int) -> int:
    """Tokens a forward feeds per sequence with k drafts: k + 1 clean, a block of B behind each."""
    return 1 if k == 0 else (k + 1) * (1 + B)


def best_k(hits: list[float], tried: list[float], kmax: int, B: int, cost: Callable[[int], float]) -> int:
    """The draft length (0 = plain AR) with the most committed tokens per unit of forward cost:
    1 + sum_i prod_{j<=i} a_j tokens (a_j: draft j's acceptance after j - 1 accepted, counted,
    Laplace-smoothed) over cost(rows(k)). Lossless at any k, so only speed depends on it."""
    best, best_rate, expect, chain = 0, 1.0, 1.0, 1.0
    for k in range(1, kmax + 1):
        chain *= (hits[k - 1] + 1) / (tried[k - 1] + 2)
        expect += chain
        if (rate := expect / cost(rows(k, B))) > best_rate:
            best, best_rate = k, rate
    return best


def distribution(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """The sampling distribution (float64) that temperature, top-k and top-p define."""
    return filter_logits(logits.double() / temperature, top_k, top_p).softmax(-1)


def accept(u: float, p: float, q: float) -> bool:
    """Speculative sampling: keep a draft with probability min(1, p/q) (u ~ U[0, 1))."""
    return u * q < p


class SpecStep:
    """One forward of self-speculative decoding per call; the canvas holds every committed token."""

    def __init__(self, c: Canvas, runner: Runner, plan, gens: list[torch.Generator], ar_step=None):
        if c.masked[:, : c.G].any():
            raise ValueError("spec decodes left to right and does not fill blanks in the prompt")
        self.c, self.run, self.plan, self.gens = c, runner, plan, gens
        self.ar_step, self.ar = ar_step, None  # the engine's AR step, taken over once drafting ends
        sp = plan.spec
        self.kmax = self.k = sp.draft_len  # self.k: drafts the next forward feeds
        self.B = self.kmax + 1
        self.hits, self.tried, self.forwards = [0] * self.kmax, [0] * self.kmax, 0
        # the model's measured acceptance (greedy, free text): a prior for such decodes only
        self.prior = sp.prior[: self.kmax] if plan.temperature == 0 and plan.constraint is None else ()
        self.n: Tensor | None = None  # [b] column of the pending token (committed, not yet fed)
        self.drafts: Tensor | None = None  # [b, k]
        self.q: list[Tensor | None] = []  # per row [k, V]: the draft distributions (sampling)
        # plain AR from the start, nothing probed: where the model's measured rate (its prior)
        # cannot pay, or without one, where not even every draft of the probe accepted could
        if sp.cost is not None and not self._may_pay(probing=not self.prior):
            self.k = 0
            if sp.notes is not None:
                why = (
                    " at this model's measured acceptance"
                    if self.prior
                    else (", even with the probe's drafts all accepted")
                )
                sp.notes.append(
                    f"spec: no draft length pays on this runtime{why} (drafting {self.kmax} feeds "
                    f"{rows(self.kmax, self.B)} tokens a forward, "
                    f"{sp.cost(rows(self.kmax, self.B)):.1f}x one token's cost): plain AR"
                )
            self._hand_over()

    def _may_pay(self, probing: bool = True) -> bool:
        """Whether some draft length would pay at the tries counted so far and the prior's, and
        (`probing`) if every draft of the probe's remaining forwards were accepted: the test that
        decides whether to start drafting and whether to go on probing."""
        hits, tried = self._counts()
        more = max(self.plan.spec.probe - self.forwards, 0) * self.c.batch if probing else 0
        return (
            best_k(
                [h + more for h in hits], [t + more for t in tried], self.kmax, self.B, self.plan.spec.cost
            )
            > 0
        )

    def _counts(self) -> tuple[list[float], list[float]]:
        """Accepted and tried per draft position: counted, plus the model's prior as PRIOR_TRIES
        tries at its measured rate (positions it does not cover: counted only)."""
        prior = list(self.prior)
        rate = prior + [0.0] * (self.kmax - len(prior))
        w = [PRIOR_TRIES] * len(prior) + [0] * (self.kmax - len(prior))
        hits = [h + p * n for h, p, n in zip(self.hits, rate, w, strict=True)]
        return hits, [t + n for t, n in zip(self.tried, w, strict=True)]

    def _pick(self, logits: Tensor, r: int) -> tuple[Tensor, Tensor | None]:
        """Tokens [..] from logits [.., V] (argmax, or a sample), and the distribution sampled."""
        p = self.plan
        if p.temperature == 0:
            return argmax(logits), None
        d = distribution(logits, p.temperature, p.top_k, p.top_p)
        flat = d.reshape(-1, d.shape[-1])
        tok = torch.multinomial(flat, 1, generator=self.gens[r])[:, 0].view(d.shape[:-1])
        return tok, d

    def _commit(self, r: int, cols: Tensor, toks: Tensor, conf: Tensor) -> None:
        c = self.c
        ok = cols < c.T
        cols, toks, conf = cols[ok], toks[ok], conf[ok]
        ok = c.masked[r, cols]
        if ok.any():
            c.commit(torch.full((int(ok.sum()),), r), cols[ok], toks[ok], conf[ok])

    def _hand_over(self) -> None:
        """Drafting has ended: the engine's own AR step decodes the rest (the same plan, runner
        and cache, rolled back to the committed prefix; this step's one-token forwards build
        masks and per-row cache slots that AR does not need). A batch only before its first
        forward: after drafting, its rows stand at different columns, which the AR step's shared
        columns cannot hold."""
        if self.ar_step is None or (self.c.batch != 1 and self.n is not None):
            return
        if self.n is not None:
            n = int(self.n[0])
            lengths = self.run.cache.lengths
            self.run.cache.truncate(torch.minimum(lengths, self.n.to(lengths.device)))
            self.run.cache_idx = torch.arange(n)
        self.ar = self.ar_step(self.c, self.run, self.plan, self.gens)

    def step(self) -> bool:
        if self.ar is not None:
            return self.ar.step()
        c, b = self.c, self.c.batch
        active = ~c.done()
        if not active.any():
            return False
        k, first = self.k, self.n is None  # drafts fed now; the prefill feeds none
        if first:  # the prompt, and one mask block after its last token
            blocks = [c.G - 1] if k else []
            ar, dr = self.run.speculate(torch.zeros(b, dtype=torch.long), c.tokens[:, : c.G], blocks, self.B)
            ar, start = ar[:, -1:], torch.full((b,), c.G - 1)
        else:
            a = c.tokens.gather(1, self.n.clamp(max=c.T - 1)[:, None])
            clean = torch.cat([a, self.drafts[:, :k]], 1)
            ar, dr = self.run.speculate(self.n, clean, list(range(k + 1)) if k else [], self.B)
            start = self.n
        c.step += 1
        n_new = start.clone()
        drafts = torch.zeros(b, self.kmax, dtype=torch.long)
        qs = []
        for r in range(b):
            if not active[r]:
                qs.append(None)
                continue
            c.nfe[r] += 1
            fed = 0 if first else k
            m, tok, conf = self._verify(r, self._constrained(r, int(start[r]) + 1, ar[r]), fed)
            for i in range(min(m + 1, fed)):  # draft i tried; accepted unless it was the m-th
                self.tried[i] += 1
                self.hits[i] += i < m
            cols = start[r] + 1 + torch.arange(m + 1)
            self._commit(r, cols, tok, conf)
            n_new[r] = start[r] + m + 1
            q = None
            if k:
                drafts[r], q = self._draft(r, int(n_new[r]) + 1, dr[r, m, : self.kmax])
            qs.append(q)
        self.n, self.drafts = n_new, drafts
        self.q = qs
        self._choose(first)
        return True

    def _choose(self, first: bool) -> None:
        """The next forward's draft length, once `probe` forwards measured the acceptance; plain
        AR (0) is final (nothing is drafted, so nothing more is measured). The probe ends early
        when even every draft of its remaining forwards accepted could not make drafting pay."""
        sp = self.plan.spec
        self.forwards += not first
        if sp.cost is None or self.k == 0 or first:
            return
        if self.forwards < sp.probe and self._may_pay():
            return
        k, self.k = self.k, best_k(*self._counts(), self.kmax, self.B, sp.cost)
        if self.k == 0:
            self._hand_over()
        if self.k != k and sp.notes is not None:
            rate = ", ".join(f"{h}/{t}" for h, t in zip(self.hits, self.tried, strict=True))
            rate += " and this model's measured rates" if self.prior else ""
            n = f"{self.forwards} forward" + "s" * (self.forwards != 1)
            sp.notes.append(
                f"spec: draft length {k} -> {self.k} after {n} (drafts accepted "
                f"by position {rate}; a forward of {rows(k, self.B)} tokens costs "
                f"{sp.cost(rows(k, self.B)):.1f}x one token's on this runtime)"
            )

    def _constrained(self, r: int, col: int, ar: Tensor) -> Tensor:
        """The AR logits for columns col.. under the plan's constraint, each read after the
        drafts before it (a draft that breaks it is masked out of the AR target: rejected)."""
        con = self.plan.constraint
        if con is None:
            return ar
        cur, out = con.cursor(self.c, r, col), ar.clone()
        for i in range(len(ar)):
            out[i] = cur.mask(ar[i])
            if self.n is not None and i < self.k:  # self.k: the drafts fed in this forward
                cur.feed(int(self.drafts[r, i]))
        return out

    def _draft(self, r: int, col: int, logits: Tensor) -> tuple[Tensor, Tensor | None]:
        """The k drafts for columns col.. (under a constraint: one at a time, each after the last)."""
        con = self.plan.constraint
        if con is None:
            return self._pick(logits, r)
        cur, toks, dists = con.cursor(self.c, r, col), [], []
        for i in range(len(logits)):
            tok, d = self._pick(cur.mask(logits[i]), r)
            cur.feed(int(tok))
            toks.append(tok)
            dists.append(d)
        return torch.stack(toks), None if dists[0] is None else torch.stack(dists)

    def _verify(self, r: int, ar: Tensor, k: int) -> tuple[int, Tensor, Tensor]:
        """(drafts accepted m of the k fed, the m + 1 tokens to commit, their AR probabilities)."""
        p = self.plan
        if k == 0:  # nothing drafted: the AR token alone
            tok, _ = self._pick(ar[0], r)
            return 0, tok[None], ar[0].double().softmax(-1)[tok][None]
        probs = ar.double().softmax(-1)
        toks: list[int] = []
        for i in range(k):
            d = int(self.drafts[r, i])
            if p.temperature == 0:
                ok = d == int(ar[i].argmax())
            else:
                pd = distribution(ar[i], p.temperature, p.top_k, p.top_p)
                qd = self.q[r][i]
                u = float(torch.rand((), generator=self.gens[r], dtype=torch.float64))
                ok = accept(u, float(pd[d]), float(qd[d]))
                if not ok:
                    res = (pd - qd).clamp(min=0)
                    res = res if float(res.sum()) > 0 else pd
                    t = int(torch.multinomial(res / res.sum(), 1, generator=self.gens[r]))
                    toks.append(t)
                    break
            if not ok:
                toks.append(int(ar[i].argmax()))
                break
            toks.append(d)
        else:  # all k accepted: the bonus token from the AR output after the last draft
            tok, _ = self._pick(ar[k], r)
            toks.append(int(tok))
        t = torch.tensor(toks)
        m = len(toks) - 1
        return m, t, probs[torch.arange(m + 1), t]
