"""Generative perplexity: samples scored by a reference AR model, with NFEs and entropy beside.

Gen PPL = exp(sum of the evaluator's NLL over all continuation tokens / their number), token
weighted over samples. Each sample is re-tokenised with the evaluator's tokenizer and scored
given its prompt, with a sliding window (context `window`, stride `stride`) when it is longer
than the window. EOS is not scored. The unigram entropy (nats) of each sample's own tokens is
reported so that degenerate, repetitive samples (which score a low perplexity) are visible.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..decoding import DecodeSpec, decode_all
from ..decoding.request import as_spec

DEGENERATE_ENTROPY = 3.0  # nats; a sample below this is flagged (BD3-LM uses 4 on 256 tokens)


def unigram_entropy(ids: list[int]) -> float:
    """Entropy (nats) of the empirical token distribution of one sample."""
    if not ids:
        return 0.0
    n = len(ids)
    return -sum(c / n * math.log(c / n) for c in Counter(ids).values())


@torch.no_grad()
def continuation_nll(
    model, context: list[int], cont: list[int], window: int = 1024, stride: int = 512
) -> tuple[float, int]:
    """(sum of NLL, count) of `cont` given `context` under a causal LM, sliding window.

    Each window of up to `window` tokens ends at the next `stride` scored tokens; every token is
    scored exactly once, with as much left context as the window allows.
    """
    ids = context + cont
    first = len(context)  # index of the first scored token
    if first == 0:
        raise ValueError("scoring needs at least one context token (e.g. the evaluator's BOS)")
    total, count, pos = 0.0, 0, first
    while pos < len(ids):
        end = min(len(ids), pos + stride)
        start = max(0, end - window)
        x = torch.tensor([ids[start:end]], device=next(model.parameters()).device)
        logp = torch.log_softmax(model(x).logits[0].double(), -1).cpu()
        for i in range(pos, end):
            total -= float(logp[i - 1 - start, ids[i]])
            count += 1
        pos = end
    return total, count


@dataclass
class GenPPL:
    gen_ppl: float
    entropy: float  # mean unigram entropy of the samples
    nfe: float  # mean NFEs per sample
    tokens_per_second: float
    tokens_per_nfe: float
    samples: int
    empty: int  # samples with no text after decoding (excluded from Gen PPL, counted here)
    degenerate: int  # samples with entropy below DEGENERATE_ENTROPY
    scored_tokens: int
    texts: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("texts")
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def score(
    ref_model, ref_tok, prompts: list[str], texts: list[str], window: int, stride: int
) -> tuple[float, int]:
    nll, n = 0.0, 0
    bos = [ref_tok.bos_token_id] if ref_tok.bos_token_id is not None else [ref_tok.eos_token_id]
    for p, t in zip(prompts, texts, strict=True):
        ctx = ref_tok(p, add_special_tokens=False).input_ids if p else []
        full = ref_tok(p + t, add_special_tokens=False).input_ids
        cont = full[len(ctx) :] if full[: len(ctx)] == ctx else ref_tok(t, add_special_tokens=False).input_ids
        if not cont:
            continue
        s, c = continuation_nll(ref_model, bos + ctx, cont, window, stride)
        nll, n = nll + s, n + c
    return nll, n


def evaluate(
    model,
    tok,
    ref_model,
    ref_tok,
    prompts: list[str],
    sampler: str | DecodeSpec,
    max_new_tokens: int,
    batch_size: int = 8,
    score_window: int = 1024,
    score_stride: int = 512,
    seed: int = 0,
    **kw,
) -> GenPPL:
    spec = as_spec(model, sampler, max_new_tokens, seed, kw)
    texts, toks, rows, secs = decode_all(model, tok, prompts, spec, batch_size)
    nfes, ntok = [r.nfe for r in rows], sum(r.tokens for r in rows)
    keep = [j for j, t in enumerate(texts) if t.strip()]
    kept_prompts, kept = [prompts[j] for j in keep], [texts[j] for j in keep]
    nll, n = score(ref_model, ref_tok, kept_prompts, kept, score_window, score_stride)
    ents = [unigram_entropy(t) for t in toks]
    return GenPPL(
        gen_ppl=math.exp(nll / n) if n else float("nan"),
        entropy=sum(ents) / len(ents),
        nfe=sum(nfes) / len(nfes),
        tokens_per_second=ntok / secs,
        tokens_per_nfe=ntok / max(1, sum(nfes)),
        samples=len(texts),
        empty=len(texts) - len(keep),
        degenerate=sum(e < DEGENERATE_ENTROPY for e in ents),
        scored_tokens=n,
        texts=texts,
    )


def reference_row(
    ref_model, ref_tok, prompts: list[str], real: list[str], window: int = 1024, stride: int = 512
) -> float:
    """The evaluator's perplexity on the real continuations of the same prompts."""
    nll, n = score(ref_model, ref_tok, prompts, real, window, stride)
    return math.exp(nll / n)


def corpus_prompts(
    tok, corpus: str, n: int, prompt_tokens: int, new_tokens: int
) -> tuple[list[str], list[str]]:
    """n (prompt, real continuation) pairs cut at evenly spaced offsets of the validation split."""
    from ..data.corpus import load_corpus

    ids = [i for text in load_corpus(corpus).val for i in tok.encode(text)]
    span = prompt_tokens + new_tokens
    if len(ids) < span * n:
        raise ValueError(f"validation split of '{corpus}' has {len(ids)} tokens, fewer than {n} x {span}")
    step = len(ids) // n
    prompts = [tok.decode(ids[k * step : k * step + prompt_tokens]) for k in range(n)]
    real = [tok.decode(ids[k * step + prompt_tokens : k * step + span]) for k in range(n)]
    return prompts, real


def check_lengths(model: str | None, prompt_tokens: int, max_new_tokens: int) -> None:
    """Before anything heavy loads: prompt and sample must fit the context of the model (read
    from its config.json alone)."""
    from ..checkpoint import resolve
    from ..config import ModelConfig
    from ..models import path_of

    ctx = ModelConfig.load(resolve(path_of(model)) / "config.json").max_position_embeddings
    if prompt_tokens + max_new_tokens > ctx:
        raise ValueError(
            f"--prompt-tokens {prompt_tokens} + --max-new-tokens {max_new_tokens} exceeds the model's "
            f"context of {ctx} tokens"
        )


def trained_corpus(model: str | None) -> tuple[str, str]:
    """The text corpus a model was trained on (the path its run recorded, else its recipe's), else
    Shakespeare, and where that came from."""
    from pathlib import Path

    from ..checkpoint import read_trainer_meta, resolve
    from ..models import path_of

    p = resolve(path_of(model))
    meta = read_trainer_meta(p)
    card = p / "model_card.json"
    recipe = meta.get("recipe") or (json.loads(card.read_text()).get("recipe") if card.exists() else None)
    corpus = meta.get("corpus_path") or ((recipe or {}).get("data") or {}).get("corpus")
    if corpus and (corpus == "shakespeare" or Path(corpus).exists()) and not str(corpus).endswith(".jsonl"):
        return corpus, "the model's training recipe"
    return "shakespeare", "default: the model's recipe names no readable text corpus"


def write_samples(path, ref_model, ref_tok, prompts: list[str], texts: list[str]) -> None:
    """One JSON line per sample: prompt, sample, its own perplexity under the evaluator, tokens."""
    with open(path, "w", encoding="utf-8") as f:
        for p, t in zip(prompts, texts, strict=True):
            nll, n = score(ref_model, ref_tok, [p], [t], 1024, 512) if t.strip() else (float("nan"), 0)
            ppl = round(math.exp(nll / n), 4) if n else None
            f.write(json.dumps({"prompt": p, "sample": t, "ppl": ppl, "tokens": n}) + "\n")
