"""blockdiff models in EleutherAI's lm-evaluation-harness (`pip install 'blockdiff[lmeval]'`).

Importing this module registers `blockdiff` as an lm-eval model; `blockdiff eval lm-eval` (and
`python -m blockdiff.eval.harness`) import it and hand their arguments to the harness's CLI, so
`--model blockdiff --model_args pretrained=smollm2-nbdiff,sampler=fastdllm,threshold=0.9` works
as with any other backend.

* `generate_until`: blockdiff's batched decoding (`decode_all`) with the sampler and options of
  `model_args`, checked once as a `DecodeSpec`; the text is cut at the first stop sequence.
* `loglikelihood` / `loglikelihood_rolling`: exact through the AR path of a shifted-logits model
  (NBDiff, imported AR models: one causal forward); for a diffusion model without one, the
  Monte-Carlo ELBO that LLaDA's harness reports: `mc_samples` draws of l ~ U{1..m} masked
  continuation tokens (stratified over l, a fixed generator: the same seed gives the same
  number), each masked token's -log p weighted by m / l, under full attention.
* `write_task`: a blockdiff task (its held-out items, scored by the task's own checker) as a local
  lm-eval task, so that the harness and `blockdiff eval task` score the same items alike.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..checkpoint import write_text_atomic
from ..config import ConfigError
from ..decoding import DEFAULT_SAMPLER, DecodeSpec, decode_all
from ..model import token_logits
from ..models import load_model
from ..objectives import ar_logprobs
from . import tasks

HARNESS_ARGS = ("batch_size", "max_batch_size", "device")  # what lm-eval adds to model_args


@register_model("blockdiff")
class BlockdiffLM(LM):
    made: list[BlockdiffLM] = []  # the instances the harness built (their costs are reported)

    def __init__(
        self,
        pretrained: str = "smollm2-nbdiff",
        sampler: str = DEFAULT_SAMPLER,
        dtype: str = "auto",
        batch_size: int | str = 8,
        seed: int = 0,
        max_gen_toks: int = 256,
        mc_samples: int = 64,
        loglikelihood: str = "auto",
        **options,
    ):
        super().__init__()
        options = {k: v for k, v in options.items() if k not in HARNESS_ARGS}
        self.model, self.tok = load_model(str(pretrained), dtype)
        self.name = str(pretrained)
        self.spec = DecodeSpec.build(self.model, sampler, None, int(seed), **options)
        self.batch_size = 8 if batch_size in ("auto", None) else int(batch_size)
        self.max_gen_toks, self.mc_samples = int(max_gen_toks), int(mc_samples)
        cfg = self.model.config
        if loglikelihood not in ("auto", "ar", "elbo"):
            raise ConfigError(f"loglikelihood must be auto, ar or elbo, got {loglikelihood!r}")
        if loglikelihood == "ar" and not cfg.shifted:
            raise ConfigError(f"{pretrained} has no AR path (aligned logits): use loglikelihood=elbo")
        self.ll_mode = loglikelihood if loglikelihood != "auto" else "ar" if cfg.shifted else "elbo"
        if self.ll_mode == "elbo" and not cfg.has_global_block:
            raise ConfigError(f"{pretrained} has neither an AR path nor a global block to score with")
        if self.mc_samples < 1:
            raise ConfigError(f"mc_samples must be >= 1, got {mc_samples}")
        self.nfe = self.tokens = 0  # what generation cost, for the results
        BlockdiffLM.made.append(self)

    # ---- the harness's questions ---------------------------------------------------------------

    def get_model_info(self) -> dict:
        """What the results file records beside the harness's numbers: the decoding and its cost."""
        return {
            "blockdiff": {
                "sampler": self.spec.sampler,
                "options": self.spec.kwargs,
                "seed": self.spec.seed,
                "nfe": self.nfe,
                "tokens": self.tokens,
                "tokens_per_nfe": round(self.tokens / self.nfe, 4) if self.nfe else None,
                "loglikelihood": self.ll_mode,
            }
        }

    @property
    def tokenizer_name(self) -> str:
        return self.name

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tok.chat(chat_history)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(int(r.args[1].get("max_gen_toks", self.max_gen_toks)), []).append(i)
        for n, idx in groups.items():
            spec = self.spec.with_length(self.model, n)
            texts, _, rows, _ = decode_all(self.model, self.tok, [requests[i].args[0] for i in idx], spec,
                                           self.batch_size, index=idx)  # fmt: skip
            self.nfe += sum(r.nfe for r in rows)
            self.tokens += sum(r.tokens for r in rows)
            for i, text in zip(idx, texts, strict=True):
                until = requests[i].args[1].get("until") or []
                until = [until] if isinstance(until, str) else until
                cut = min((p for p in (text.find(s) for s in until if s) if p >= 0), default=len(text))
                out[i] = text[:cut]
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._split(*r.args) for r in requests]
        if self.ll_mode == "ar":
            return self._ar_batched(pairs)
        return [(self.elbo(ctx, cont), False) for ctx, cont in pairs]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        if self.ll_mode != "ar":
            raise ConfigError("loglikelihood_rolling needs an AR path; this model has none")
        L = self.model.config.max_position_embeddings
        out = []
        for r in requests:
            ids = self.tok.encode(r.args[0])
            windows = list(map(make_disjoint_window, get_rolling_token_windows(ids, self.tok.eos_id, L, 1)))
            out.append(sum(ll for ll, _ in self._ar_batched(windows)))
        return out

    # ---- scoring -------------------------------------------------------------------------------

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of the context ([EOS] if empty) and the continuation, split where the joint
        encoding of the two starts the continuation (as the harness's own backends do)."""
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context)
        cont = whole[len(ctx) :] if whole[: len(ctx)] == ctx else self.tok.encode(continuation)
        return (ctx or [self.tok.eos_id]), cont

    def _fits(self, n: int) -> None:
        L = self.model.config.max_position_embeddings
        if n > L:
            raise ConfigError(
                f"a request of {n} tokens (context + continuation) is longer than the model's "
                f"context of {L} positions; shorten the task's prompts or few-shot examples"
            )

    def _ar(self, ctx: Sequence[int], cont: Sequence[int]) -> tuple[float, bool]:
        return self._ar_batched([(ctx, cont)])[0]

    def _ar_batched(self, pairs: list[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """Per pair: the continuation's log-probability on the AR path, and whether it is greedy."""
        for ctx, cont in pairs:
            self._fits(len(ctx) + len(cont) - 1)  # the last token is predicted, never fed
        rows = [list(ctx) + list(cont) for ctx, cont in pairs]
        scored = ar_logprobs(self.model, rows, [len(c) for c, _ in pairs], self.tok.eos_id, self.batch_size)
        return [(float(lp.sum()), bool(greedy.all())) for lp, greedy in scored]

    @torch.no_grad()
    def _masked_logp(self, ctx: Sequence[int], cont: Sequence[int], hidden: torch.Tensor) -> torch.Tensor:
        """log p of each continuation token [s, m] with the positions `hidden` [s, m] masked."""
        m = len(cont)
        x = torch.tensor(list(ctx) + list(cont)).repeat(len(hidden), 1)
        x[:, len(ctx) :][hidden] = self.model.config.mask_token_id
        logp = token_logits(self.model(x), self.model.config).float().log_softmax(-1)[:, len(ctx) :]
        return logp.gather(-1, torch.tensor(cont)[None, :, None].expand(len(hidden), m, 1))[..., 0]

    def elbo(self, ctx: Sequence[int], cont: Sequence[int], samples: int | None = None) -> float:
        """Monte-Carlo ELBO of the continuation (a lower bound on its log-likelihood)."""
        m, n = len(cont), samples or self.mc_samples
        self._fits(len(ctx) + m)
        if m == 0:  # nothing to score
            return 0.0
        gen = torch.Generator().manual_seed(self.spec.seed)
        counts = [(j % m) + 1 for j in range(n)]  # stratified over the masked count l
        hidden = torch.zeros(n, m, dtype=torch.bool)
        for j, k in enumerate(counts):
            hidden[j, torch.randperm(m, generator=gen)[:k]] = True
        total = 0.0
        for lo in range(0, n, self.batch_size):
            h = hidden[lo : lo + self.batch_size]
            logp = self._masked_logp(ctx, cont, h)
            w = torch.tensor([m / k for k in counts[lo : lo + self.batch_size]])
            total += float(((logp * h).sum(1) * w).sum())
        return total / n

    def exact_elbo(self, ctx: Sequence[int], cont: Sequence[int]) -> float:
        """The ELBO by enumerating every masking pattern (for short continuations: the oracle)."""
        m = len(cont)
        if m == 0:
            return 0.0
        pats = torch.tensor([[(p >> i) & 1 for i in range(m)] for p in range(1, 2**m)], dtype=torch.bool)
        logp = torch.cat([self._masked_logp(ctx, cont, pats[i : i + 64]) for i in range(0, len(pats), 64)])
        k = pats.sum(1)
        per = (logp * pats).sum(1) * m / k  # each pattern's weighted sum
        # E_l U{1..m} E_{S, |S| = l}: a pattern of size l has weight 1 / (m * C(m, l))
        weight = torch.tensor([1 / (m * math.comb(m, int(x))) for x in k])
        return float((per * weight).sum())


def json_task(task: str, data: str | Path) -> str:
    """The head of an lm-eval task YAML whose test split is a local JSON file (no hub)."""
    files = f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"  # JSON is YAML
    return f"task: {task}\ndataset_path: json\n{files}test_split: test\n"


TASK_YAML = """output_type: generate_until
doc_to_text: !function blockdiff_checker.doc_to_text
doc_to_target: answer
generation_kwargs:
  until: []
  max_gen_toks: {tokens}
process_results: !function blockdiff_checker.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: score
    aggregation: mean
    higher_is_better: true
"""
CHECKER = "from blockdiff.eval.harness import doc_to_text, process_results  # noqa: F401\n"


def write_task(name: str, n: int, out: str | Path, max_gen_toks: int) -> Path:
    """`name`'s first `n` held-out items as the lm-eval task `blockdiff_<name>` in `out` (its JSON
    data, its YAML, and the checker module the YAML names): prompts exactly as `blockdiff eval
    task` asks them, scored by the task's own checker (`acc`: scored 1.0; `score`: the mean)."""
    its = tasks.items(name, n)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task = f"blockdiff_{name}"
    try:
        rows = [dict(task=name, prompt=it.prompt, answer=it.answer, entry=json.dumps(it.entry)) for it in its]
    except TypeError as e:
        raise ConfigError(f"task {name}: its items cannot be written as JSON ({e})") from None
    # JSON turns tuples into lists (reasoning-gym's difficulty ranges): the reference answer must
    # score the same through the written entry as through the item itself
    back = tasks.Item(its[0].prompt, its[0].answer, json.loads(rows[0]["entry"]))
    if tasks.score(name, back, its[0].answer) != tasks.score(name, its[0], its[0].answer):
        raise ConfigError(f"task {name}: its checker scores a JSON copy of an item differently")
    write_text_atomic(out / f"{task}.json", json.dumps(rows))
    write_text_atomic(out / "blockdiff_checker.py", CHECKER)
    yaml = json_task(task, (out / f"{task}.json").resolve()) + TASK_YAML.format(tokens=int(max_gen_toks))
    write_text_atomic(out / f"{task}.yaml", yaml)
    return out / f"{task}.yaml"


def doc_to_text(doc: dict) -> str:
    return doc["prompt"]  # verbatim: a template would be one more place for whitespace to change


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """The task's own checker on a completion (an empty one scores 0, as in `blockdiff eval task`)."""
    item = tasks.Item(doc["prompt"], doc["answer"], json.loads(doc["entry"]))
    text = results[0]
    s = tasks.score(doc["task"], item, text) if text.strip() else 0.0
    return {"acc": float(s == 1.0), "score": float(s)}


def main(argv: list[str] | None = None) -> int:
    """lm-eval's own command line, with the `blockdiff` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    for lm in BlockdiffLM.made:  # what the harness's table does not say: the decoding's cost
        per = lm.tokens / max(1, lm.nfe)
        said = f"{lm.tokens} tokens generated in {lm.nfe} NFEs ({per:.2f} tokens/NFE)"
        print(f"blockdiff {lm.name} [{lm.spec.sampler}]: {said}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
