"""Tokenizers: a byte-level one for tiny data and tests, and BPE through the `tokenizers` library.

The mask token is a real special token of the vocabulary (`<|mask|>`), never a literal id in
code: models read its id from here or from their config.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS, MASK, PAD = "<|endoftext|>", "<|mask|>", "<|pad|>"
SPECIALS = [EOS, MASK, PAD]


class Tokenizer:
    """A thin wrapper with the ids the rest of blockdiff needs (eos, mask, pad)."""

    def __init__(self, hf: HFTokenizer, mask_token: str = MASK, eos_token: str = EOS, pad_token: str = PAD):
        self.hf = hf
        self.names = {"mask_token": mask_token, "eos_token": eos_token, "pad_token": pad_token}
        self.chat_template: str | None = None
        self.mask_id = self._special(mask_token)
        self.eos_id = self._special(eos_token)
        self.pad_id = hf.token_to_id(pad_token)
        if self.pad_id is None:
            self.pad_id = self.eos_id

    def _special(self, tok: str) -> int:
        i = self.hf.token_to_id(tok)
        if i is None:
            raise ValueError(
                f"tokenizer has no special token '{tok}'; add it (e.g. Tokenizer.with_specials) before use"
            )
        return i

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def chat(self, user: str | list[dict[str, str]]) -> str:
        """The model's chat template around one user turn (or a list of {role, content}
        messages), ending where the assistant speaks."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        msgs = [{"role": "user", "content": user}] if isinstance(user, str) else user
        return env.from_string(self.chat_template).render(messages=msgs, add_generation_prompt=True)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        self.hf.save(str(directory / "tokenizer.json"))
        meta = dict(self.names)
        if self.chat_template:
            meta["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory_or_file: Path) -> Tokenizer:
        p = Path(directory_or_file)
        f = p / "tokenizer.json" if p.is_dir() else p
        if not f.exists():
            raise FileNotFoundError(f"no tokenizer.json at {f}")
        meta_f = f.parent / "tokenizer_config.json"
        meta = json.loads(meta_f.read_text()) if meta_f.exists() else {}
        keys = ("mask_token", "eos_token", "pad_token")
        tok = cls(HFTokenizer.from_file(str(f)), **{k: meta[k] for k in keys if k in meta})
        tok.chat_template = meta.get("chat_template")
        return tok


def byte_tokenizer() -> Tokenizer:
    """256 byte tokens plus the specials: no training, any text round-trips.

    A BPE model with the byte alphabet and no merges is exactly a byte tokenizer.
    """
    byte_of = _bytes_to_unicode()
    hf = HFTokenizer(models.BPE(vocab={byte_of[i]: i for i in range(256)}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(SPECIALS)
    return Tokenizer(hf)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the one ByteLevel uses)."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE vocabulary with the specials reserved first."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)
