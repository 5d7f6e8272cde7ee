"""`blockdiff reason stitch | prm-data | solver-data`: stitching reasoning rollouts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..config import ConfigError
from .common import decode_args, decode_spec, load, sampler_kwargs


def _reason_setup(a: argparse.Namespace):
    from ..eval import tasks
    from ..reason import stitch

    tasks.check_task(a.task)
    for name in (
        "rollouts",
        "batch_size",
        *(("k",) if hasattr(a, "k") else ()),
        *(("n",) if hasattr(a, "n") else ()),
    ):
        if getattr(a, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if not a.model:
        raise ConfigError("--model: the diffusion model that writes the rollouts")
    model, tok = load(a, a.model)
    # llada: one block = the canvas unless told (canvases differ per prompt here)
    spec = decode_spec(a, model, None, **({"block_size": 1 << 20} if a.sampler == "llada" else {}))
    complete = stitch.diffusion_completer(model, tok, spec, a.new_tokens, a.batch_size)
    return complete, spec.seed, (model, tok)


def _scorers(a: argparse.Namespace) -> list:
    from ..reason.scorers import make_scorer

    return [make_scorer(s, a.task, lambda p: load(a, p)) for s in a.scorer]


def _stitching(a: argparse.Namespace) -> dict:
    """How stitching picks steps: the same for the solver's training data and the evaluation."""
    return {"threshold": a.stitch_threshold, "cap": a.cap, "agree": a.agree}


def cmd_reason_prm_data(a: argparse.Namespace) -> int:
    from ..eval import tasks
    from ..reason import scorers, stitch

    complete, seed, _ = _reason_setup(a)
    its = tasks.training_items(a.task, a.questions, a.question_seed)
    rows = stitch.prm_data(a.task, its, complete, a.rollouts, a.k, a.sep, seed)
    tasks.write_jsonl(rows, a.out)
    good = sum(r["answer"] == scorers.PRM_GOOD for r in rows)
    print(
        f"{len(rows)} step labels ({good} '+', {len(rows) - good} '-') "
        f"from {a.questions} questions -> {a.out}"
    )
    return 0


def cmd_reason_solver_data(a: argparse.Namespace) -> int:
    from ..eval import tasks
    from ..reason import stitch

    complete, seed, diffusion = _reason_setup(a)
    (scorer,) = _scorers(a) if len(a.scorer) == 1 else (None,)
    if scorer is None:
        raise ConfigError("solver-data takes one --scorer")
    its = tasks.training_items(a.task, a.questions, a.question_seed)
    rolls = stitch.sample_rollouts(its, complete, a.rollouts, a.sep, seed)
    tok = diffusion[1]
    rows = stitch.solver_data(
        its, rolls, scorer, a.sep, **_stitching(a), tok=tok, max_prompt_tokens=a.max_prompt_tokens
    )
    tasks.write_jsonl(rows, a.out)
    print(f"{len(rows)} stitched contexts ({scorer.name}) -> {a.out}")
    return 0


def cmd_reason_stitch(a: argparse.Namespace) -> int:
    import platform

    from ..eval import tasks
    from ..reason import stitch

    complete, seed, diffusion = _reason_setup(a)
    its = tasks.items(a.task, a.n)
    scorers = _scorers(a)
    solver = load(a, a.solver) if a.solver else None
    alone = load(a, a.ar_model) if a.ar_model else None
    long = None
    if a.long_steps:  # the reference cost: one greedy rollout with this many steps
        kw = {**sampler_kwargs(a), "steps": a.long_steps, "temperature": 0.0}
        kw.pop("seed", None)
        long = stitch.diffusion_completer(*diffusion, a.sampler, a.new_tokens, a.batch_size, **kw)
    res = stitch.run_stitching(
        a.task,
        its,
        complete,
        a.rollouts,
        a.sep,
        seed,
        scorers,
        solver,
        long_complete=long,
        alone=alone,
        solver_tokens=a.solver_tokens,
        **_stitching(a),
    )
    rows = stitch.summary(res)
    if a.out:
        recs = {
            m: [{"text": r.text, "correct": r.correct, **r.cost.__dict__} for r in rs]
            for m, rs in res.items()
        }
        Path(a.out).write_text(json.dumps({"summary": rows, "records": recs}, indent=1))
    if a.json:
        print(json.dumps(rows))
        return 0
    print(
        f"{a.task}: {len(its)} held-out questions, {a.rollouts} rollouts each ({a.sampler} "
        f"{json.dumps(sampler_kwargs(a))}); {platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(
        "| method | accuracy | rollout NFEs (sum) | rollout NFEs (max) | scorer forwards | AR tokens "
        "| ms/question |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {100 * r['accuracy']:.1f}% | {r['rollout_nfe']:.1f} "
            f"| {r['rollout_nfe_max']:.1f} "
            f"| {r['scorer_forwards']:.1f} | {r['solver_tokens']:.1f} | {1000 * r['seconds']:.1f} |"
        )
    return 0


def add(sub) -> None:
    rs = sub.add_parser("reason", help="stitching diffusion reasoning rollouts").add_subparsers(
        dest="what", required=True
    )
    rst = rs.add_parser(
        "stitch", help="Sample -> Score -> Stitch -> Refine on held-out questions, costs beside"
    )
    rpd = rs.add_parser("prm-data", help="PRM training pairs: step labels by Monte-Carlo rollouts")
    rsd = rs.add_parser("solver-data", help="stitched contexts of training questions -> reference answers")
    for g in (rst, rpd, rsd):
        decode_args(g)  # --model is the diffusion model that writes the rollouts
        g.add_argument("--task", required=True)
        g.add_argument("--rollouts", type=int, default=4, help="rollouts per question [4]")
        g.add_argument("--sep", default="\n", help="step separator, or 'sentences' [newline]")
        g.add_argument("--new-tokens", type=int, dest="new_tokens", help="canvas (default: the model's rows)")
        g.add_argument("--batch-size", type=int, default=64, dest="batch_size")
        g.set_defaults(sampler="llada")
    for g in (rpd, rsd):
        g.add_argument("--questions", type=int, required=True, help="training questions (never held-out)")
        g.add_argument("--question-seed", type=int, default=2_000_000, dest="question_seed")
        g.add_argument("--out", required=True)
    rpd.add_argument("--k", type=int, default=4, help="completions per step prefix [4]")
    rpd.set_defaults(fn=cmd_reason_prm_data)
    for g in (rst, rsd):
        g.add_argument("--scorer", action="append", required=True, help="oracle | logprob:MODEL | prm:MODEL")
        g.add_argument("--stitch-threshold", type=float, default=0.9, dest="stitch_threshold")
        g.add_argument("--cap", type=int, default=80, help="stitched steps at most [80]")
        g.add_argument("--agree", action="store_true", help="stitch only paths agreeing with the best")
    rsd.add_argument(
        "--max-prompt-tokens", type=int, dest="max_prompt_tokens", help="the solver's context - its answer"
    )
    rsd.set_defaults(fn=cmd_reason_solver_data)
    rst.add_argument("--n", type=int, default=100, help="held-out questions [100]")
    rst.add_argument("--solver", help="AR model that reads the stitched context (decoded with ar)")
    rst.add_argument("--ar-model", dest="ar_model", help="AR model alone on the plain question [the solver]")
    rst.add_argument("--solver-tokens", type=int, default=64, dest="solver_tokens")
    rst.add_argument(
        "--long-steps", type=int, dest="long_steps", help="also one greedy rollout of this many steps"
    )
    rst.add_argument("--out", help="JSON with every record")
    rst.set_defaults(fn=cmd_reason_stitch)
