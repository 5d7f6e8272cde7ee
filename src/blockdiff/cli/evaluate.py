"""`blockdiff eval genppl | task | table`."""

from __future__ import annotations

import argparse
import json
import shlex

from ..config import ConfigError
from .common import decode_args, decode_spec, load


def cmd_eval_genppl(a: argparse.Namespace) -> int:
    from ..eval import genppl
    from ..hub import load_reference

    for name in ("num_samples", "max_new_tokens", "prompt_tokens", "batch_size"):
        if getattr(a, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    genppl.check_lengths(a.model, a.prompt_tokens, a.max_new_tokens)
    model, tok = load(a, a.model)
    corpus, source = (a.corpus, "--corpus") if a.corpus else genppl.trained_corpus(a.model)
    prompts, real = genppl.corpus_prompts(tok, corpus, a.num_samples, a.prompt_tokens, a.max_new_tokens)
    ref, ref_tok = load_reference(a.evaluator)
    spec = decode_spec(a, model, a.max_new_tokens)
    res = genppl.evaluate(model, tok, ref, ref_tok, prompts, spec, a.max_new_tokens, batch_size=a.batch_size)
    real_ppl = genppl.reference_row(ref, ref_tok, prompts, real)
    row = {
        "sampler": a.sampler,
        **res.as_dict(),
        "real_text_ppl": round(real_ppl, 4),
        "evaluator": a.evaluator,
        "corpus": f"{corpus} ({source})",
    }
    if a.out:
        genppl.write_samples(a.out, ref, ref_tok, prompts, res.texts)
    if a.json:
        print(json.dumps(row))
    else:
        for k, v in row.items():
            print(f"{k:>18}: {v}")
        print(f"{'sample':>18}: {prompts[0]!r} -> {res.texts[0][:200]!r}")
    return 0


def cmd_eval_task(a: argparse.Namespace) -> int:
    from ..eval.tasks import as_dict, check_task, evaluate_task

    check_task(a.task)
    model, tok = load(a, a.model)
    spec = decode_spec(a, model, a.max_new_tokens)
    res = evaluate_task(model, tok, a.task, spec, a.n, batch_size=a.batch_size)
    row = as_dict(res)
    if a.json:
        print(json.dumps(row))
    else:
        for k, v in row.items():
            if k != "examples":
                print(f"{k:>15}: {v}")
        for ex in res.examples:
            print(
                f"{'example':>15}: ...{ex['prompt'][-60:]!r} -> {ex['completion'][:120]!r} "
                f"(score {ex['score']})"
            )
    return 0


def cmd_eval_lm_eval(a: argparse.Namespace) -> int:
    try:
        from ..eval import harness
    except ImportError as e:
        raise ConfigError(f"lm-eval needs its extra: pip install 'blockdiff[lmeval]' ({e})") from None
    return harness.main(a.args)


def cmd_eval_lm_eval_task(a: argparse.Namespace) -> int:
    try:
        from ..eval import harness
    except ImportError as e:
        raise ConfigError(f"lm-eval needs its extra: pip install 'blockdiff[lmeval]' ({e})") from None
    if a.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    path = harness.write_task(a.task, a.n, a.out, a.max_new_tokens)
    run = f"blockdiff eval lm-eval run --tasks {path.stem} --include_path {shlex.quote(str(a.out))}"
    print(f"wrote {path}: run it with {run} --model blockdiff --model_args pretrained=...")
    return 0


def cmd_eval_table(a: argparse.Namespace) -> int:
    from ..experiments.table import run_table

    out = run_table(a.recipe, a.out, a.set or [])
    print((out / "table.md").read_text())
    print(f"results: {out / 'results.json'}, plot: {out / 'plot.png'}")
    return 0


def add(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="what", required=True)
    gp = ev.add_parser("genppl", help="generative perplexity under a reference model, with NFEs and entropy")
    decode_args(gp)
    gp.add_argument("--num-samples", type=int, default=16, dest="num_samples")
    gp.add_argument("--max-new-tokens", type=int, default=128, dest="max_new_tokens")
    gp.add_argument("--prompt-tokens", type=int, default=16, dest="prompt_tokens")
    gp.add_argument("--batch-size", type=int, default=8, dest="batch_size")
    gp.add_argument(
        "--corpus",
        help="prompts and real text from its validation split (default: the model's training corpus)",
    )
    gp.add_argument("--out", help="write every prompt, sample and its perplexity here (JSONL)")
    gp.add_argument("--evaluator", default="smollm2-135m-instruct", help="known name, local path or HF id")
    gp.set_defaults(fn=cmd_eval_genppl)
    tk = ev.add_parser("task", help="task accuracy with the task's own checker (reasoning-gym, HumanEval)")
    tk.add_argument("task", help="countdown, mini_sudoku, sudoku, gsm_symbolic, basic_arithmetic, humaneval")
    decode_args(tk)
    tk.add_argument("--n", type=int, default=50, help="evaluation items (a fixed held-out set)")
    tk.add_argument("--max-new-tokens", type=int, dest="max_new_tokens", help="default: from the answers")
    tk.add_argument("--batch-size", type=int, default=8, dest="batch_size")
    tk.set_defaults(fn=cmd_eval_task)

    lm = ev.add_parser(
        "lm-eval",
        help="EleutherAI's lm-evaluation-harness with the blockdiff model registered; every argument "
        "after lm-eval is the harness's (run --model blockdiff --model_args pretrained=...,sampler=...)",
        add_help=False,
    )
    lm.add_argument("args", nargs=argparse.REMAINDER)
    lm.set_defaults(fn=cmd_eval_lm_eval)

    lt = ev.add_parser(
        "lm-eval-task",
        help="write a task's held-out items as a local lm-eval task scored by the task's own checker",
    )
    lt.add_argument("task", help="a task of `blockdiff eval task` (basic_arithmetic, countdown, ...)")
    lt.add_argument("--n", type=int, default=50, help="held-out items (the ones `eval task --n` asks)")
    lt.add_argument(
        "--max-new-tokens", type=int, default=128, dest="max_new_tokens",
        help="pass the same to `blockdiff eval task` to score alike (it otherwise sizes the canvas itself)",
    )  # fmt: skip
    lt.add_argument("--out", required=True, help="folder for the task (pass it as --include_path)")
    lt.set_defaults(fn=cmd_eval_lm_eval_task)

    tb = ev.add_parser("table", help="train models at one budget and compare them (the talk's table)")
    tb.add_argument("recipe", help="a table recipe, e.g. recipes/table-shakespeare.yaml")
    tb.add_argument("--out", help="default: runs/table-<recipe name>")
    tb.add_argument("--set", action="append", metavar="KEY=VALUE", help="eval.KEY=V or SECTION.KEY=V (base)")
    tb.set_defaults(fn=cmd_eval_table)
