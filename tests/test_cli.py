"""The command-line contract: generate with every sampler, JSON output, the bundled model."""

import json
import subprocess
import sys

import pytest

from blockdiff import cli
from blockdiff.decoding import SAMPLERS
from blockdiff.models import bundled_path


def run_cli(capsys, *args):
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_generate_every_sampler_json(capsys, tiny_ckpt, sampler):
    block = [] if sampler == "mdlm" else ["--block-size", "1" if sampler == "ar" else "8"]
    args = ["generate", "Shall I", "--model", str(tiny_ckpt), "--sampler", sampler, "--max-new-tokens", "16"]
    code, out, err = run_cli(capsys, *args, *block, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert {"text", "nfe", "tokens", "seconds", "tokens_per_nfe"} <= set(d)
    assert d["sampler"] == sampler and 0 < d["tokens"] <= 16 and d["nfe"] >= 1


def test_generate_no_cache_matches_cache(capsys, tiny_ckpt):
    args = [
        "generate",
        "Shall I",
        "--model",
        str(tiny_ckpt),
        "--sampler",
        "bd3",
        "--max-new-tokens",
        "16",
        "--block-size",
        "4",
        "--temperature",
        "0",
        "--json",
    ]
    _, a, _ = run_cli(capsys, *args)
    _, b, _ = run_cli(capsys, *args, "--no-cache")
    assert json.loads(a)["text"] == json.loads(b)["text"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--sampler", "nope"], "known samplers: ar, bd3"),
        (["--max-new-tokens", "8", "--prompt-repeat"], "exceeds the model's context"),
        (["--sampler", "fastdllm", "--threshold", "0", "--block-size", "8"], "threshold must be in (0, 1]"),
        (["--sampler", "mdlm", "--block-size", "8"], "'mdlm' does not take block_size"),
        (["--sampler", "ar", "--block-size", "8"], "block_size must be 1"),
    ],
)
def test_generate_errors(capsys, tiny_ckpt, args, message):
    prompt = "x" * 100 if "--prompt-repeat" in args else "x"
    args = [a for a in args if a != "--prompt-repeat"]
    code, _, err = run_cli(
        capsys, "generate", prompt, "--model", str(tiny_ckpt), "--max-new-tokens", "8", *args
    )
    assert code == 2 and message in err and err.count("\n") == 1


def test_bundled_model_end_to_end():
    """The first README command's job, through the installed entry point."""
    r = subprocess.run(
        [sys.executable, "-m", "blockdiff.cli", "generate", "ROMEO.", "--max-new-tokens", "32", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["tokens"] >= 1 and d["nfe"] >= 1 and isinstance(d["text"], str)
    info = subprocess.run(
        [sys.executable, "-m", "blockdiff.cli", "info", str(bundled_path("shakespeare-5m")), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert info.returncode == 0, info.stderr
    meta = json.loads(info.stdout)
    assert meta["training_tokens"] > 1_000_000 and meta["val_nll_bound"]
