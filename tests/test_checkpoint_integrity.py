"""Checkpoints never lose the last good state: manifests, resume past corrupt checkpoints,
retention, file modes, export onto existing dirs, OS errors while writing, `data task` temp files.

All on the tiny recipe from conftest (4 steps, a checkpoint every 2, one thread)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from blockdiff import checkpoint, trainer_state
from blockdiff.checkpoint import CheckpointError, verify
from blockdiff.cli import main
from blockdiff.export import export
from blockdiff.train import Trainer

from .conftest import tiny_recipe

STEP2, STEP4 = "step-0000002", "step-0000004"


def recipe(corpus_dir, steps: int = 4, keep: int = 2):
    return tiny_recipe(corpus_dir, steps=steps, save_every=2, keep=keep, threads=1)


def train(corpus_dir, out: Path, **kw) -> Path:
    grad = torch.is_grad_enabled()
    try:
        Trainer(recipe(corpus_dir, **kw), out).run()
    finally:
        torch.set_grad_enabled(grad)
    return out


@pytest.fixture(scope="module")
def run4(corpus_dir, tmp_path_factory) -> Path:
    """A run dir with step-0000002 and step-0000004 (keep=2)."""
    return train(corpus_dir, tmp_path_factory.mktemp("integrity") / "run")


@pytest.fixture
def run(run4, tmp_path) -> Path:
    return shutil.copytree(run4, tmp_path / "run")


def truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


# ---- 1. manifest and verify ---------------------------------------------------------------------
def test_manifest_lists_every_file_and_verify_names_the_damage(run):
    ck = run / STEP4
    manifest = json.loads((ck / "manifest.json").read_text())["files"]
    on_disk = {f.name for f in ck.iterdir()} - {"manifest.json"}
    assert set(manifest) == on_disk and {"model.safetensors", "trainer_state.safetensors"} <= on_disk
    assert manifest["config.json"]["size"] == (ck / "config.json").stat().st_size
    assert verify(ck) is None

    w = ck / "model.safetensors"
    good = w.read_bytes()
    data = bytearray(good)
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    assert verify(ck) == "model.safetensors: sha256 mismatch"
    truncate(w)
    assert verify(ck) == f"model.safetensors: size {len(good) // 2} != {len(good)}"
    w.write_bytes(good)
    (ck / "recipe.yaml").unlink()
    assert verify(ck) == "recipe.yaml: missing"
    (ck / "manifest.json").unlink()  # a checkpoint from before manifests: trusted as it is
    assert verify(ck) is None


# ---- 2. resume --------------------------------------------------------------------------------
def test_resume_skips_a_corrupt_checkpoint_and_removes_orphans(run, corpus_dir, capsys):
    w = run / STEP4 / "model.safetensors"
    size = w.stat().st_size
    truncate(w)
    orphans = [run / ".step-0000006.tmpab12cd", run / ".step-0000004.old"]
    for o in orphans:
        o.mkdir()
        (o / "model.safetensors").write_bytes(b"partial")
    t = Trainer(recipe(corpus_dir, steps=6), run, resume=True)
    assert t.start_step == 2
    err = capsys.readouterr().err
    reason = f"model.safetensors: size {size // 2} != {size}"
    assert f"checkpoint {STEP4} is corrupt ({reason}); resuming from {STEP2}" in err
    assert not any(o.exists() for o in orphans)
    assert all(f"removed {o}" in err for o in orphans)


def test_resume_with_empty_latest_file_says_so(run, corpus_dir):
    (run / "latest").write_text("  \n")
    with pytest.raises(CheckpointError, match=r"`latest` file .* is empty"):
        Trainer(recipe(corpus_dir, steps=6), run, resume=True)


def test_resume_with_every_checkpoint_corrupt_is_an_error(run, corpus_dir):
    for name in (STEP2, STEP4):
        truncate(run / name / "trainer_state.safetensors")
    with pytest.raises(CheckpointError, match="every checkpoint .* is corrupt"):
        Trainer(recipe(corpus_dir, steps=6), run, resume=True)


# ---- 3. retention -------------------------------------------------------------------------------
def test_pruning_keeps_the_newest_intact_checkpoint(corpus_dir, tmp_path, monkeypatch, capsys):
    real = trainer_state.write_manifest

    def damaged_after_manifest(d: Path) -> None:  # a bad disk: step 4 rots right after it is written
        real(d)
        if d.name.startswith(f".{STEP4}"):
            truncate(d / "model.safetensors")

    monkeypatch.setattr(trainer_state, "write_manifest", damaged_after_manifest)
    run = train(corpus_dir, tmp_path / "run", keep=1)
    assert (run / STEP2).is_dir() and verify(run / STEP2) is None
    assert (run / "latest").read_text().strip() == STEP2
    assert f"checkpoint {STEP4} failed verification" in capsys.readouterr().err
    assert Trainer(recipe(corpus_dir, steps=6, keep=1), run, resume=True).start_step == 2


# ---- 4. file modes ------------------------------------------------------------------------------
def test_checkpoint_and_export_files_are_world_readable(corpus_dir, tmp_path):
    old = os.umask(0o077)  # a private umask must not make checkpoints unreadable to others
    try:
        run = train(corpus_dir, tmp_path / "run", steps=2)
        out = export(run, tmp_path / "exported")
    finally:
        os.umask(old)
    ck = run / STEP2
    assert (ck / "model.safetensors").stat().st_mode & 0o777 == 0o644
    for d in (ck, out):
        assert d.stat().st_mode & 0o777 == 0o755
        assert {f.name: f.stat().st_mode & 0o777 for f in d.iterdir()} == {f.name: 0o644 for f in d.iterdir()}


# ---- 5. export ----------------------------------------------------------------------------------
def test_export_refuses_an_existing_dir_without_force(run, tmp_path, capsys):
    out = export(run, tmp_path / "exp")
    names = {f.name for f in out.iterdir()}
    assert "model.safetensors" in names and not any(n.startswith("trainer_state") for n in names)
    (out / "mine.txt").write_text("keep me")

    assert main(["export", str(run), str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and str(out) in err
    assert (out / "mine.txt").exists()

    assert main(["export", str(run), str(out), "--force"]) == 0
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").exists()
    # --force never replaces the run being exported
    with pytest.raises(CheckpointError, match="holds the checkpoint being exported"):
        export(run, run, force=True)
    assert verify(run / STEP4) is None


# ---- 6. OS errors while writing -----------------------------------------------------------------
def test_disk_full_while_saving_is_a_clear_error_and_leaves_no_temp_dir(corpus_dir, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(28, "No space left on device")

    run = tmp_path / "run"
    t = Trainer(recipe(corpus_dir), run)
    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(CheckpointError) as e:
        t.save(2)
    assert str(e.value) == (
        f"cannot write {run / STEP2}: No space left on device; no checkpoint yet; "
        "rerun with --resume once it can be written"
    )
    assert list(run.iterdir()) == []


# ---- 7. data task -------------------------------------------------------------------------------
def test_data_task_failed_write_leaves_no_temp_file(tmp_path):
    # The file-size limit makes the write fail for real (EFBIG) after the temp file was created.
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from blockdiff.eval import tasks
        tasks.training_pairs = lambda name, n, seed: [{{"prompt": "q" * 100, "answer": "a"}}] * n
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            tasks.write_training_data("countdown", 100, {str(tmp_path / "d" / "pairs.jsonl")!r})
        except Exception as e:
            print(type(e).__name__, e)
            sys.exit(3)
        """
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stderr
    assert list((tmp_path / "d").iterdir()) == []
    # a BlockdiffError, so `blockdiff data task` reports it as one line
    assert f"CheckpointError cannot write {tmp_path / 'd' / 'pairs.jsonl'}: File too large" in p.stdout
