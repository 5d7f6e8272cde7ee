"""Short factual questions with checkable answers (`data/prompts.py: QUESTIONS`), asked through
the model's chat template: does an adapted model still know what its base knew? A question is
answered correctly when one of its keywords appears in the answer (case-insensitive; numbers as
whole words)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..data.prompts import QUESTIONS


def correct(answer: str, keywords: tuple[str, ...]) -> bool:
    text = answer.lower()
    for k in keywords:
        pattern = rf"(?<![\w.]){re.escape(k)}(?![\w])" if k[0].isdigit() else re.escape(k)
        if re.search(pattern, text):
            return True
    return False


@dataclass
class QAResult:
    accuracy: float
    n: int
    nfe: float
    tokens_per_nfe: float
    examples: list[dict]


def accuracy(model, tok, sampler: str, max_new_tokens: int = 48, batch_size: int = 8, **kw) -> QAResult:
    from ..decoding import generate

    rows, nfe, toks = [], 0, 0
    for i in range(0, len(QUESTIONS), batch_size):
        chunk = QUESTIONS[i : i + batch_size]
        prompts = [tok.chat(q) if tok.chat_template else q + "\n" for q, _ in chunk]
        out = generate(model, tok, prompts, sampler=sampler, max_new_tokens=max_new_tokens, **kw)
        for (q, keys), text, st in zip(chunk, out.texts, out.rows, strict=True):
            rows.append({"question": q, "answer": text, "correct": correct(text, keys)})
            nfe, toks = nfe + st.nfe, toks + st.tokens
    return QAResult(
        sum(r["correct"] for r in rows) / len(rows), len(rows), nfe / len(rows), toks / max(1, nfe), rows
    )
