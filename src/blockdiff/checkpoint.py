"""Checkpoints: Hugging Face-style directories, written atomically, loaded with clear errors.

A checkpoint directory holds config.json, model.safetensors and the tokenizer files; a training
checkpoint adds trainer_state.json + trainer_state.safetensors (optimizer, EMA, raw weights).
Sharded training (FSDP) writes `state/` instead of both safetensors files: one
torch.distributed.checkpoint directory that every process writes its shards into, read back on any
number of processes, and consolidated in one process wherever the weights are loaded.
A run directory holds step-NNNNNNN/ checkpoints and a `latest` file naming the newest one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import BlockdiffError
from .model import BlockDiffLM
from .tokenizer import Tokenizer


class CheckpointError(BlockdiffError, RuntimeError):
    pass


def resolve(path: str | Path) -> Path:
    """A checkpoint dir itself, or the newest checkpoint of a run dir."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist")
    latest = p / "latest"
    if not (p / "config.json").exists() and latest.exists():
        p = p / latest.read_text().strip()
    if not (p / "config.json").exists():
        raise CheckpointError(f"checkpoint dir {p} has no config.json (and no 'latest' file naming one)")
    return p


def atomic_dir(final: Path):
    """Context manager: write into a temp dir beside `final`, rename into place on success.

    Files become 0644 and dirs 0755 before the rename (mkdtemp makes 0700, and other writers
    may leave 0600), so a checkpoint is readable by whoever serves or copies it. An OSError
    (permission denied, disk full) becomes a CheckpointError naming `final`; the temp dir goes."""

    def fail(e: Exception) -> CheckpointError:
        reason = getattr(e, "strerror", None) or str(e)
        return CheckpointError(f"cannot write {final}: {reason}")

    class _Atomic:
        def __enter__(self):
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
                self.tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp", dir=final.parent))
                self.tmp.chmod(0o755)
            except OSError as e:
                raise fail(e) from e
            return self.tmp

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                if isinstance(exc, (OSError, SafetensorError)):
                    raise fail(exc) from exc
                return False
            try:
                for f in self.tmp.rglob("*"):
                    f.chmod(0o755 if f.is_dir() else 0o644)
                if final.exists():
                    old = final.with_name(f".{final.name}.old")
                    shutil.rmtree(old, ignore_errors=True)
                    final.rename(old)
                    try:
                        self.tmp.rename(final)
                    except OSError:
                        old.rename(final)  # put the previous contents back
                        raise
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    self.tmp.rename(final)
            except OSError as e:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise fail(e) from e
            return False

    return _Atomic()


MANIFEST = "manifest.json"


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record every file's size and sha256, so a later reader can tell a checkpoint damaged after
    the write (truncated copy, bad disk, a file deleted by hand) from an intact one."""
    files = sorted(f for f in directory.rglob("*") if f.is_file() and f.name != MANIFEST)
    entries = {
        f.relative_to(directory).as_posix(): {"size": f.stat().st_size, "sha256": _sha256(f)} for f in files
    }
    (directory / MANIFEST).write_text(json.dumps({"files": entries}, indent=2) + "\n")


def verify(ckpt_dir: str | Path) -> str | None:
    """None if the checkpoint matches its manifest.json, else a one-line reason. A dir without a
    manifest (written before manifests existed) counts as intact."""
    d = Path(ckpt_dir)
    m = d / MANIFEST
    if not m.exists():
        return None
    try:
        files = {n: (int(e["size"]), str(e["sha256"])) for n, e in json.loads(m.read_text())["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is unreadable: {e!r}"
    for name, (want, _) in files.items():  # sizes first: cheap, and catch truncation without hashing
        f = d / name
        if not f.is_file():
            return f"{name}: missing"
        if (size := f.stat().st_size) != want:
            return f"{name}: size {size} != {want}"
    for name, (_, digest) in files.items():
        if _sha256(d / name) != digest:
            return f"{name}: sha256 mismatch"
    return None


@contextlib.contextmanager
def atomic_file(path: Path, what: str = "") -> Iterator[IO[str]]:
    """Write a text file through a temp file beside it, renamed into place when the block ends.

    A failure (disk full, permission denied, a directory in the way) leaves no half-written
    file and no temp file, and becomes a CheckpointError naming `path`: a full disk raises from
    a write whose own error names no file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {what or path}: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def state_dict_for_save(model: BlockDiffLM, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    return sd


def save_config(directory: Path, model: BlockDiffLM, tokenizer: Tokenizer, delta: dict | None = None) -> None:
    """config.json (with `delta`: kind, rank, base, base_sha256, for a delta) and the tokenizer."""
    d = model.config.to_dict()
    if delta is not None:
        d["delta"] = delta
    (Path(directory) / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    tokenizer.save(Path(directory))


def save_model(
    directory: Path, model: BlockDiffLM, tokenizer: Tokenizer, dtype: torch.dtype | None = None
) -> None:
    """Write config, weights and tokenizer into an existing directory."""
    save_config(directory, model, tokenizer)
    save_file(
        state_dict_for_save(model, dtype),
        str(Path(directory) / "model.safetensors"),
        metadata={"format": "pt"},
    )


def save_delta(
    directory: Path, model: BlockDiffLM, tokenizer: Tokenizer, info: dict, dtype: torch.dtype | None = None
) -> None:
    """A delta checkpoint: the config naming its base, delta.safetensors (the trained low-rank
    pairs and rows only) and the tokenizer."""
    from .delta import delta_state

    save_config(directory, model, tokenizer, info)
    sd = delta_state(model)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    save_file(sd, str(Path(directory) / "delta.safetensors"), metadata={"format": "pt"})


SHARDED = "state"  # the torch.distributed.checkpoint directory of a sharded training checkpoint


def read_sharded(directory: Path, keep=lambda key: True) -> dict[str, torch.Tensor]:
    """The full tensors of a torch.distributed.checkpoint directory (those whose key `keep`s),
    read in this process alone: no process group, any number of writers."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        meta = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
        sd = {
            k: torch.empty(m.size, dtype=m.properties.dtype)
            for k, m in meta.items()
            if isinstance(m, TensorStorageMetadata) and keep(k)
        }
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(sd, checkpoint_id=str(directory), no_dist=True)
    except Exception as e:  # DCP wraps reader errors in its own types
        raise CheckpointError(f"corrupt or unreadable sharded checkpoint {directory}: {e}") from None
    return sd


def read_trainer_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Everything a training checkpoint holds, full: `model.<name>`, `ema.<name>`, `opt.<i>.<key>`."""
    if (Path(ckpt) / SHARDED).is_dir():
        return read_sharded(Path(ckpt) / SHARDED)
    return load_weights(Path(ckpt) / "trainer_state.safetensors")


def load_weights(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or, in a sharded checkpoint that has none, the weights inference gets
    (the EMA ones when the run kept an EMA) consolidated from its shards."""
    state = file.parent / SHARDED
    if not file.exists() and state.is_dir():
        names = read_sharded(state, lambda k: k.startswith(("model.", "ema.")))
        prefix = "ema." if any(k.startswith("ema.") for k in names) else "model."
        return {k[len(prefix) :]: v for k, v in names.items() if k.startswith(prefix)}
    if not file.exists():
        raise CheckpointError(f"missing weights file {file}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt or unreadable weights file {file}: {e}") from None


def read_trainer_meta(path: Path) -> dict:
    f = Path(path) / "trainer_state.json"
    return json.loads(f.read_text()) if f.exists() else {}
