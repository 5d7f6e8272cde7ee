"""Self-distillation data: the base AR model's own answers to a chat prompt set.

Adapting on the model's own outputs keeps its behaviour (what it says, when it stops) and makes
the diffusion drafts agree with its AR path, which the speculative sampler needs. Answers that
hit the length limit without ending are kept, marked `"complete": false` (trained without an
EOS, so they teach continuing, never stopping early). Written as prompt/answer JSONL: the prompt
carries the chat template, so training puts the loss on the answer only. Resumable: rows
already in `<out>.partial` are kept and skipped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .checkpoint import write_text_atomic
from .config import ConfigError
from .data.prompts import chat_prompts
from .decoding import generate
from .models import load_model


def distill(
    model_name: str,
    out: str | Path,
    n: int,
    max_new_tokens: int = 160,
    batch_size: int = 16,
    seq_len: int = 256,
    dtype: str = "bfloat16",
    log=print,
) -> Path:
    for name, v in (("--n", n), ("--max-new-tokens", max_new_tokens), ("--batch-size", batch_size),
                    ("--seq-len", seq_len)):  # fmt: skip
        if v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; name the .jsonl file to write")
    model, tok = load_model(model_name, dtype)
    if not tok.chat_template:
        raise ConfigError(f"{model_name} has no chat template; self-distillation needs a chat model")
    questions = chat_prompts("train")[:n]
    partial = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if partial.exists():
        done = {json.loads(ln)["question"] for ln in partial.read_text().splitlines() if ln.strip()}
    todo = [q for q in questions if q not in done]
    kept, dropped, t0, toks = len(done), 0, time.time(), 0
    with partial.open("a", encoding="utf-8") as f:
        for i in range(0, len(todo), batch_size):
            qs = todo[i : i + batch_size]
            prompts = [tok.chat(q) for q in qs]
            res = generate(model, tok, prompts, sampler="ar", max_new_tokens=max_new_tokens, temperature=0.0)
            for q, p, text, row in zip(qs, prompts, res.texts, res.rows, strict=True):
                toks += row.tokens
                fits = len(tok.encode(p)) + len(tok.encode(text)) + 1 <= seq_len
                if not fits or not text.strip():
                    dropped += 1
                    f.write(json.dumps({"question": q, "dropped": True}) + "\n")
                    continue
                kept += 1
                rec = {"question": q, "prompt": p, "answer": text, "complete": row.stopped_at_eos}
                f.write(json.dumps(rec) + "\n")
            f.flush()
            log(f"distill: {i + len(qs)}/{len(todo)} prompts, {toks / (time.time() - t0):.0f} tokens/s")
    rows = [json.loads(ln) for ln in partial.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if not r.get("dropped")]
    if not rows:
        partial.unlink()
        raise ConfigError(
            f"no pair fits: every answer was empty or longer than --seq-len {seq_len} tokens; nothing written"
        )
    keys = ("prompt", "answer", "complete")
    write_text_atomic(out, "".join(json.dumps({k: r.get(k, True) for k in keys}) + "\n" for r in rows))
    partial.unlink()
    log(
        f"distill: {len(rows)} pairs -> {out} ({dropped} dropped this run: empty or longer than "
        f"{seq_len} tokens; {sum(not r.get('complete', True) for r in rows)} cut at the length limit)"
    )
    return out
