"""Self-speculative block decoding: the diffusion path drafts, the AR path verifies, one forward.

An NBDiff model (context-causal layout, shifted logits, trained with an AR loss) holds two
predictors in one network: each clean causal token's output is an AR next-token distribution p,
and a block of B mask tokens after a clean prefix drafts the tokens after the next one (q). Each
forward feeds the pending token `a` and the k = B - 1 drafts of the previous forward as clean
tokens, and behind clean index m (for every m = 0..k) one mask block: whatever prefix of the
drafts is accepted, the next drafts were made for exactly that prefix (TiDAR's layout).

Verification: greedy — accept the longest prefix of drafts equal to the AR argmax, then the AR
token at the first mismatch (or the bonus token after k accepted): every forward commits >= 1
token and the output is greedy AR's, token for token. A token tree adds, beside draft 1, the
drafter's next w - 1 choices for its column (each with its own mask block behind it): where draft
1 is rejected, one of them may still be the AR token. Sampling — accept draft d with
probability min(1, p(d)/q(d)), else sample from the normalised residual (p - q)+: the output
distribution is the AR model's (Leviathan et al. 2023); the tree's other candidates, each
proposed with certainty, are then tried in turn against the residual (min(1, p'(d)/1)), which
keeps it exact (SpecInfer's multi-candidate rule). Rejected drafts' keys are rolled back in the
cache (each row to its own length) and overwritten by the next forward; an accepted candidate's
keys move to the slot after the pending token.
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
    width: int = 1  # candidates for the first drafted column (a token tree; the most with `cost`)
    cost: Callable[[int], float] | None = None  # forward cost by width: shape chosen (`rates`)
    probe: int = 4  # forwards at draft_len that measure the acceptance before the first choice
    notes: list[str] | None = None  # where a change of shape is told
    prior: tuple[float, ...] = ()  # the model's measured acceptance per draft position (its config)


# The prior counts as this many tries of each draft position, beside the counted ones.
PRIOR_TRIES = 8
# Another drafting shape replaces the current one only when it promises this much more (plain
# AR as soon as it is the best): near-even shapes do not alternate forward after forward.
SWITCH = 1.03


def rows(k: int, w: int = 1) -> int:
    """Tokens a forward feeds per sequence with k drafts and w candidates for the first: the
    pending token, the drafts and the w - 1 other candidates, a block of k + 1 behind each."""
    return 1 if k == 0 else (k + w) * (k + 2)


def parents(k: int, w: int) -> list[int]:
    """Parents of the fed clean tokens: 0 the pending token, 1..k the drafts (a chain), then the
    w - 1 other candidates for draft 1's column (leaves after the pending token)."""
    return [-1, *range(k)] + [0] * (w - 1)


def rates(
    hits: list[float], tried: list[float], ranks: list[float], seen: float, kmax: int, wmax: int,
    cost: Callable[[int], float],
) -> dict[tuple[int, int], float]:  # fmt: skip
    """Committed tokens per unit of forward cost of each shape (draft length k, width w), (0, 1)
    for plain AR (1): 1 + sum_i prod_{j<=i} a_j tokens (a_j: draft j's acceptance after j - 1
    accepted, counted, Laplace-smoothed) plus the share of forwards whose first token was the
    drafter's 2nd..w-th choice (ranks[r] of seen), over cost(rows(k, w))."""
    out, expect, chain = {(0, 1): 1.0}, 1.0, 1.0
    for k in range(1, kmax + 1):
        chain *= (hits[k - 1] + 1) / (tried[k - 1] + 2)
        expect += chain
        for w in range(1, wmax + 1):
            out[k, w] = (expect + sum(ranks[1:w]) / (seen + 2)) / cost(rows(k, w))
    return out


def best_shape(r: dict[tuple[int, int], float]) -> tuple[int, int]:
    """The shape of the most tokens per unit of cost among `rates`' (ties: the smaller). Lossless
    at any shape, so only speed depends on it."""
    return max(r, key=r.get)


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
        self.kmax = self.k = sp.draft_len  # self.k, self.w: the shape the next forward feeds
        self.wmax = sp.width
        if plan.constraint is not None and self.wmax > 1:  # a cursor per candidate: not built
            self.wmax = 1
            if sp.notes is not None:
                sp.notes.append("spec: under a constraint the drafts are a chain (one candidate each)")
        self.w = self.wmax if sp.cost is None else 1  # chosen: a chain until the acceptance is known
        self.made = 0  # drafts per candidate the last forward made (its blocks' length - 1)
        self.hits, self.tried, self.forwards = [0] * self.kmax, [0] * self.kmax, 0
        self.ranks, self.seen = [0] * self.wmax, 0  # the first token's rank among the drafter's choices
        # the model's measured acceptance (greedy, free text): a prior for such decodes only
        self.prior = sp.prior[: self.kmax] if plan.temperature == 0 and plan.constraint is None else ()
        self.n: Tensor | None = None  # [b] column of the pending token (committed, not yet fed)
        self.drafts: Tensor | None = None  # [b, kmax + wmax - 1]: the drafts, then the other candidates
        self.top: Tensor | None = None  # [b, wmax]: the drafter's first choices for draft 1's column
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
                    f"{rows(self.kmax)} tokens a forward, "
                    f"{sp.cost(rows(self.kmax)):.1f}x one token's cost): plain AR"
                )
            self._hand_over()
        elif sp.cost is not None and self.prior:  # the prior's best shape; the probe measures it
            self.k, self.w = best_shape(self._rates(*self._counts()))

    def _rates(self, hits: list[float], tried: list[float]) -> dict[tuple[int, int], float]:
        return rates(hits, tried, self.ranks, self.seen, self.kmax, self.wmax, self.plan.spec.cost)

    def _may_pay(self, probing: bool = True) -> bool:
        """Whether some draft length would pay at the tries counted so far and the prior's, and
        (`probing`) if every draft of the probe's remaining forwards were accepted: the test that
        decides whether to start drafting and whether to go on probing."""
        hits, tried = self._counts()
        more = max(self.plan.spec.probe - self.forwards, 0) * self.c.batch if probing else 0
        return best_shape(self._rates([h + more for h in hits], [t + more for t in tried]))[0] > 0

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
        # the shape fed now (no more drafts than the last forward made; the prefill feeds none),
        # and the blocks that draft for the next: k + 1 tokens for the shape chosen
        k, first, B = min(self.k, self.made), self.n is None, self.k + 1
        w = self.w if k else 1
        if first:  # the prompt, and one mask block after its last token
            blocks = [c.G - 1] if self.k else []
            ar, dr = self.run.speculate(torch.zeros(b, dtype=torch.long), c.tokens[:, : c.G], blocks, B)
            ar, start = ar[:, -1:], torch.full((b,), c.G - 1)
            clean = c.tokens[:, c.G - 1 : c.G]
        else:
            a = c.tokens.gather(1, self.n.clamp(max=c.T - 1)[:, None])
            clean = torch.cat([a, self.drafts[:, :k], self.drafts[:, self.kmax : self.kmax + w - 1]], 1)
            blocks = list(range(clean.shape[1])) if k else []
            ar, dr = self.run.speculate(self.n, clean, blocks, B, parents(k, w) if k else None)
            start = self.n
        c.step += 1
        n_new = start.clone()
        drafts = torch.zeros(b, self.kmax + self.wmax - 1, dtype=torch.long)
        top = torch.zeros(b, self.wmax, dtype=torch.long)
        qs = []
        for r in range(b):
            if not active[r]:
                qs.append(None)
                continue
            c.nfe[r] += 1
            fed = 0 if first else k
            s0 = int(start[r])
            path, tok, conf = self._verify(r, self._constrained(r, s0 + 1, ar[r], fed), clean[r], fed, w)
            self._count(r, path, int(tok[0]), fed)
            m = len(path)
            moved = [(i, t) for t, i in enumerate(path, 1) if i != t]  # a candidate off the chain
            if moved:
                self.run.cache.move(r, [s0 + i for i, _ in moved], [s0 + t for _, t in moved])
            self._commit(r, start[r] + 1 + torch.arange(m + 1), tok, conf)
            n_new[r] = start[r] + m + 1
            q = None
            if self.k:
                behind = dr[r, path[-1] if path else 0]  # the block after the last accepted
                chain, others, top[r], q = self._draft(r, int(n_new[r]) + 1, behind)
                drafts[r, : len(chain)], drafts[r, self.kmax : self.kmax + len(others)] = chain, others
            qs.append(q)
        self.n, self.drafts, self.top, self.made = n_new, drafts, top, B - 1 if self.k else 0
        self.q = qs
        self._choose(first)
        return True

    def _count(self, r: int, path: list[int], first: int, fed: int) -> None:
        """Per draft position, tried and accepted (the chain's drafts up to the first rejected);
        and the committed first token's rank among the drafter's choices for its column."""
        chain = len(path) if path and path[0] == 1 else 0
        for i in range(min(chain + 1, fed)):
            self.tried[i] += 1
            self.hits[i] += i < chain
        if fed:
            self.seen += 1
            hit = (self.top[r] == first).nonzero()
            if len(hit):
                self.ranks[int(hit[0])] += 1

    def _choose(self, first: bool) -> None:
        """The next forward's shape, once `probe` forwards measured the acceptance; plain AR (0)
        is final (nothing is drafted, so nothing more is measured). The probe ends early when
        even every draft of its remaining forwards accepted could not make drafting pay."""
        sp = self.plan.spec
        self.forwards += not first
        if sp.cost is None or self.k == 0 or first:
            return
        if self.forwards < sp.probe and self._may_pay():
            return
        r = self._rates(*self._counts())
        (k, w), best = (self.k, self.w), best_shape(r)
        if best[0] == 0 or r[best] > SWITCH * r[k, w]:
            self.k, self.w = best
        if self.k == 0:
            self._hand_over()
        if (self.k, self.w) != (k, w) and sp.notes is not None:
            rate = ", ".join(f"{h}/{t}" for h, t in zip(self.hits, self.tried, strict=True))
            rate += " and this model's measured rates" if self.prior else ""
            wide = f", candidates for draft 1 {w} -> {self.w}" if self.w != w and self.k else ""
            n = f"{self.forwards} forward" + "s" * (self.forwards != 1)
            sp.notes.append(
                f"spec: draft length {k} -> {self.k}{wide} after {n} (drafts accepted "
                f"by position {rate}; a forward of {rows(k, w)} tokens costs "
                f"{sp.cost(rows(k, w)):.1f}x one token's on this runtime)"
            )

    def _constrained(self, r: int, col: int, ar: Tensor, fed: int) -> Tensor:
        """The AR logits for columns col.. under the plan's constraint, each read after the
        drafts before it (a draft that breaks it is masked out of the AR target: rejected)."""
        con = self.plan.constraint
        if con is None:
            return ar
        cur, out = con.cursor(self.c, r, col), ar.clone()
        for i in range(len(ar)):
            out[i] = cur.mask(ar[i])
            if i < fed:  # the drafts fed in this forward
                cur.feed(int(self.drafts[r, i]))
        return out

    def _draft(self, r: int, col: int, logits: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The drafts for columns col.. (under a constraint: one at a time, each after the last);
        the drafter's other w - 1 first choices for column col; its first w choices there; the
        distributions the drafts were sampled from."""
        con = self.plan.constraint
        if con is None:
            toks, dists = self._pick(logits, r)
        else:
            cur, picked = con.cursor(self.c, r, col), []
            for i in range(len(logits)):
                picked.append(self._pick(cur.mask(logits[i]), r))
                cur.feed(int(picked[-1][0]))
            toks = torch.stack([t for t, _ in picked])
            dists = None if picked[0][1] is None else torch.stack([d for _, d in picked])
        top = logits[0].topk(min(self.wmax + 1, logits.shape[-1])).indices
        others = top[top != toks[0]][: self.wmax - 1]  # draft 1 itself is not a second candidate
        return toks, others, top[: self.wmax], dists

    def _verify(self, r: int, ar: Tensor, clean: Tensor, k: int, w: int) -> tuple[list[int], Tensor, Tensor]:
        """Walk the fed tree from the pending token: (the clean indices accepted, the tokens to
        commit — theirs and the AR token after the last —, their AR probabilities)."""
        p, greedy = self.plan, self.plan.temperature == 0
        probs = ar.double().softmax(-1)
        node, path, toks = 0, [], []
        while True:
            best = int(ar[node].argmax())
            pd = None if greedy else distribution(ar[node], p.temperature, p.top_k, p.top_p)
            kids = ([node + 1] if node < k else []) + (list(range(k + 1, k + w)) if node == 0 and k else [])
            for kid in kids:
                d = int(clean[kid])
                if greedy:
                    ok = d == best
                else:  # a draft sampled from q, or a candidate proposed with certainty (q = 1)
                    qd = self.q[r][node] if kid == node + 1 else None
                    u = float(torch.rand((), generator=self.gens[r], dtype=torch.float64))
                    ok = accept(u, float(pd[d]), 1.0 if qd is None else float(qd[d]))
                    if not ok:
                        res = pd.index_fill(0, torch.tensor(d), 0) if qd is None else (pd - qd).clamp(min=0)
                        pd = res / res.sum() if float(res.sum()) > 0 else pd
                if ok:
                    path.append(kid)
                    toks.append(d)
                    node = kid
                    break
            else:  # no candidate accepted (or none fed): the AR token, from what is left of p
                toks.append(best if greedy else int(torch.multinomial(pd, 1, generator=self.gens[r])))
                break
        t = torch.tensor(toks)
        return path, t, probs[torch.tensor([0, *path]), t]
