"""The command-line contract: generate with every sampler, JSON output, the bundled model."""

import json
import subprocess
import sys

import pytest
import torch

from blockdiff import cli
from blockdiff.decoding import SAMPLERS
from blockdiff.models import bundled_path


def run_cli(capsys, *args):
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s != "spec"])  # spec: tests/test_spec.py
def test_generate_every_sampler_json(capsys, tiny_ckpt, sampler):
    block = [] if sampler == "mdlm" else ["--block-size", "1" if sampler == "ar" else "8"]
    args = ["generate", "Shall I", "--model", str(tiny_ckpt), "--sampler", sampler, "--max-new-tokens", "16"]
    code, out, err = run_cli(capsys, *args, *block, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert {"text", "nfe", "tokens", "seconds", "tokens_per_nfe"} <= set(d)
    assert d["sampler"] == sampler and 0 < d["tokens"] <= 16 and d["nfe"] >= 1


def test_generate_with_a_regex_or_a_json_schema(capsys, tiny_ckpt, tmp_path):
    """--regex and --json-schema (JSON text or a file) constrain the answer; a missing file or a
    regex that does not compile is one clear error."""
    import re

    base = ["generate", "Shall I", "--model", str(tiny_ckpt), "--max-new-tokens", "24", "--json"]
    code, out, err = run_cli(capsys, *base, "--regex", "(thee|thou) (art|shall)[.!]")
    assert code == 0, err
    assert re.fullmatch("(thee|thou) (art|shall)[.!]", json.loads(out)["text"])
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    for arg in (json.dumps(schema), str(tmp_path / "s.json")):
        code, out, err = run_cli(capsys, *base, "--json-schema", arg)
        assert code == 0, err
        assert isinstance(json.loads(json.loads(out)["text"])["n"], int)
    code, _, err = run_cli(capsys, *base, "--json-schema", str(tmp_path / "nope.json"))
    assert code == 2 and "no such file, and not JSON text" in err
    code, _, err = run_cli(capsys, *base, "--regex", "a(")
    assert code == 2 and "cannot be compiled" in err
    grammar = 'start: WORD (" " WORD)* "."\nWORD: "thee" | "thou" | "art"'
    (tmp_path / "g.lark").write_text(grammar)
    for arg in (grammar, str(tmp_path / "g.lark")):
        code, out, err = run_cli(capsys, *base, "--grammar", arg)
        assert code == 0, err
        assert re.fullmatch(r"(thee|thou|art)( (thee|thou|art))*\.", json.loads(out)["text"])
    long = "start: " + " | ".join(f'"w{i}"' for i in range(60))  # no file name: 400+ characters
    code, out, err = run_cli(capsys, *base, "--grammar", long)
    assert code == 0 and re.fullmatch(r"w[0-9]+", json.loads(out)["text"]), err
    code, _, err = run_cli(capsys, *base, "--grammar", "start: (")
    assert code == 2 and "grammar cannot be read" in err


def test_spec_on_a_model_without_ar_path_is_one_clear_line(capsys, tiny_ckpt):
    code, _, err = run_cli(capsys, "generate", "x", "--model", str(tiny_ckpt), "--sampler", "spec")
    assert code == 2 and "spec needs an NBDiff model" in err and err.count("\n") == 1


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
        (["--sampler", "fastdllm", "--threshold", "0", "--block-size", "8"], "threshold must be in (0.0, 1"),
        (["--sampler", "fastdllm", "--block-size", "0"], "block_size must be an integer >= 1"),
        (["--sampler", "llada", "--block-size", "0"], "block_size must be an integer >= 1"),
        (["--sampler", "bd3", "--block-size", "0"], "block_size must be an integer >= 1"),
        (["--sampler", "bd3", "--block-size", "-4"], "block_size must be an integer >= 1"),
        (["--sampler", "bd3", "--steps", "-1"], "steps must be an integer >= 1"),
        (["--sampler", "bd3", "--steps", "0"], "steps must be an integer >= 1"),
        (["--sampler", "bd3", "--top-k", "-1"], "top_k must be an integer >= 1"),
        (["--sampler", "bd3", "--temperature", "-1"], "temperature must be in [0.0, 100.0]"),
        (["--sampler", "bd3", "--top-p", "1.5"], "top_p must be in (0.0, 1.0]"),
        (["--sampler", "bd3", "--max-new-tokens", "-3"], "max_new_tokens must be an integer >= 0"),
        (["--bad-utf8"], "not valid UTF-8"),
        (["--sampler", "mdlm", "--block-size", "8"], "'mdlm' does not take block_size"),
        (["--sampler", "ar", "--block-size", "8"], "block_size must be 1"),
        (["--sampler", "ar", "--temperature", "nan"], "temperature must be a finite number"),
        (["--dtype", "int4"], "on none"),  # the tiny model's weights are on no 4-bit grid
        (["--device", "warp9"], "unknown --device 'warp9'"),
    ],
)
def test_generate_errors(capsys, tiny_ckpt, args, message):
    prompt = "x" * 100 if "--prompt-repeat" in args else "x\udcff" if "--bad-utf8" in args else "x"
    args = [a for a in args if a not in ("--prompt-repeat", "--bad-utf8")]
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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "recipes/demo.yaml", "--out", "{file}"], "is a file, not a run directory"),
        (["eval", "genppl", "--model", "{tiny}", "--num-samples", "0"], "--num-samples must be >= 1"),
        (["data", "task", "mini_sudoku", "--n", "-5", "--out", "{dir}/x.jsonl"], "--n must be >= 1"),
        (["export", "{tiny}", "{dir}"], "already exists; pass --force"),
        (["generate", "x", "--model", "nonexistent-model"], "known names: smollm2-nbdiff"),
        (["adapt", "--delta", "lora:0", "--steps", "1"], "--delta rank must be >= 1"),
        (["adapt", "--delta", "lora", "--steps", "1"], "--delta must look like lora:RANK"),
        (["adapt", "--ar-loss-weight", "-1", "--steps", "1"], "must be a number >= 0"),
        (["data", "distill", "--out", "{dir}"], "is a directory"),
        (["data", "distill", "--out", "{dir}/d.jsonl", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["agent", "run", "--model", "{tiny}", "--task-seed", "-1"], "held-out task is an index in [0, 500)"),
    ],
)
def test_commands_fail_with_one_clear_line(capsys, tmp_path, tiny_ckpt, argv, message):
    f = tmp_path / "afile"
    f.write_text("x")
    argv = [x.format(file=f, tiny=tiny_ckpt, dir=tmp_path) for x in argv]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--sampler", "bd4"], "unknown sampler 'bd4'"),
        (["--port", "70000"], "--port must be in [0, 65535]"),
        (["--max-batch", "0"], "--max-batch and --max-queue must be >= 1"),
        (["--max-queue", "0"], "--max-batch and --max-queue must be >= 1"),
        (["--timeout", "0"], "--timeout > 0"),
    ],
)
def test_serve_argument_errors(capsys, args, message):
    code, _, err = run_cli(capsys, "serve", "--model", "no-such-model-dir/x", *args)
    assert code == 2 and message in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the command would run")
def test_a_device_the_machine_lacks_is_one_clear_line(capsys, tiny_ckpt):
    code, _, err = run_cli(capsys, "generate", "x", "--model", str(tiny_ckpt), "--device", "cuda")
    assert code == 2 and "this machine has no CUDA device" in err and err.count("\n") == 1
