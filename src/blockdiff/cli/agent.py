"""`blockdiff agent data | run | eval`: the tool-using agents."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..checkpoint import resolve
from ..config import ConfigError
from ..decoding.samplers import SAMPLERS
from .common import decode_args, decode_spec, load, sampler_kwargs


def cmd_agent_data(a: argparse.Namespace) -> int:
    from .. import models
    from ..agent import write_sft_data
    from ..tokenizer import Tokenizer

    tok = Tokenizer.load(resolve(models.path_of(a.tokenizer))) if a.tokenizer else None
    rows = write_sft_data(a.n, a.out, a.seed, tok)
    how = "its chat template" if tok and tok.chat_template else "plain '### role' turns"
    print(f"{a.n} agent tasks -> {rows} prompt/answer rows in {a.out} ({how}; held-out tasks excluded)")
    return 0


def cmd_agent_run(a: argparse.Namespace) -> int:
    from ..agent import ModelPolicy, make_task, run_agent

    task = make_task("eval", a.task_seed)
    model, tok = load(a, a.model)
    calls = _calls(a)
    revise = calls.pop("revise", 0)
    policy = ModelPolicy(model, tok, decode_spec(a, model, a.max_new_tokens, **calls), revise=revise)
    out = sys.stderr if a.json else sys.stdout
    print(f"task {task.id}: {task.question.text}", file=out)

    def show(s) -> None:
        said = json.dumps(s.call, ensure_ascii=False) if s.call else f"{s.text!r} -> {s.error['message']}"
        print(f"[{s.round}] {said}", file=out)
        if s.observation is not None:
            print(f"    = {json.dumps(s.observation, ensure_ascii=False)}", file=out)

    res = run_agent(task, policy, a.max_rounds, a.max_tokens, on_step=show)
    if a.json:
        print(json.dumps(res.as_dict()))
    else:
        print(
            f"{'solved' if res.success else 'failed: ' + str(res.failure)} (expected {res.expected}); "
            f"{res.rounds} rounds, {res.tool_calls} tool calls, {res.tokens} tokens, {res.nfe} NFEs, "
            f"{res.seconds:.2f}s [{a.sampler}]"
        )
    return 0


def cmd_agent_eval(a: argparse.Namespace) -> int:
    """The AR agent and the diffusion agent on held-out tasks eval:0..n-1, interleaved task by task."""
    from .. import models
    from ..agent import evaluate as ev
    from ..agent.loop import check_limits

    ev.check_eval_n(a.n)
    check_limits(max_rounds=a.max_rounds, max_tokens=a.max_tokens, max_new_tokens=a.max_new_tokens)
    if a.sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler '{a.sampler}'; known samplers: {', '.join(SAMPLERS)}")
    kw = {**_calls(a), **sampler_kwargs(a)}
    seed = kw.pop("seed", 0)
    names = {"ar": a.ar_model or a.model, "diffusion": a.diffusion_model or a.model}
    ev.agent_sampler("diffusion", a.sampler)  # before any model loads
    loaded: dict = {}
    for name in names.values():  # one model object when both agents use the same weights
        loaded[name] = loaded.get(name) or load(a, name)
    policies, settings = ev.model_policies(
        {agent: loaded[names[agent]] for agent in ev.AGENTS}, a.sampler, a.max_new_tokens, seed, kw
    )
    settings = {agent: {"model": names[agent] or models.DEFAULT, **s} for agent, s in settings.items()}
    where = ev.machine(next(iter(loaded.values()))[0])
    out = sys.stderr if a.json else sys.stdout
    print(
        f"held-out tasks eval:0..{a.n - 1}, agents interleaved task by task; machine: {where['cpu']}, "
        f"{where['cpus']} CPUs, {where['torch_threads']} torch threads, device {where['device']}, "
        f"load average {where['load_average']}",
        file=out,
    )

    def progress(agent: str, r) -> None:
        how = "solved" if r.success else f"failed: {r.failure}"
        print(f"[{agent}] {r.task}: {how} ({r.rounds} rounds, {r.seconds:.2f}s)", file=sys.stderr)

    limits = {"max_rounds": a.max_rounds, "max_tokens": a.max_tokens, "max_new_tokens": a.max_new_tokens}
    results = ev.evaluate_agents(policies, a.n, a.max_rounds, a.max_tokens, on_result=progress)
    summary = {agent: ev.summarize(rs) for agent, rs in results.items()}
    doc = {"tasks": a.n, "machine": where, "limits": limits, "seed": seed, "agents": settings}
    doc["summary"] = summary
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({**doc, "records": ev.records(results)}, ensure_ascii=False))
    if a.json:
        print(json.dumps(doc))
    else:
        print(ev.markdown_table(summary, {k: v["sampler"] for k, v in settings.items()}))
        if a.out:
            print(f"per-task records: {a.out}")
    return 0


def _calls(a: argparse.Namespace) -> dict:
    """--constrain: every call decoded under the call schema (it parses by construction);
    --revise N: a reply that is not a usable call is remasked around the error, N times at most."""
    from ..agent.trajectory import call_schema

    calls = {"json_schema": json.dumps(call_schema())} if a.constrain else {}
    return calls | ({"revise": a.revise} if a.revise else {})


def _agent_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--constrain", action="store_true", help="decode every call under the call's JSON schema")
    p.add_argument(
        "--revise", type=int, default=0, help="revise a reply that is not a usable call, N times [0]"
    )
    p.add_argument("--max-new-tokens", type=int, default=96, dest="max_new_tokens", help="per call [96]")
    p.add_argument("--max-rounds", type=int, default=12, dest="max_rounds", help="[12]")
    p.add_argument("--max-tokens", type=int, default=2048, dest="max_tokens", help="in all [2048]")


def add(sub) -> None:
    ag = sub.add_parser("agent", help="the tool-using agent").add_subparsers(dest="what", required=True)
    agd = ag.add_parser("data", help="SFT JSONL of scripted tool-use trajectories (one row per call)")
    agd.add_argument("--n", type=int, required=True, help="training tasks (6 rows each)")
    agd.add_argument("--out", required=True)
    agd.add_argument("--seed", type=int, default=0)
    agd.add_argument("--tokenizer", help="render with this model's chat template (the model to train)")
    agd.set_defaults(fn=cmd_agent_data)
    agr = ag.add_parser("run", help="one held-out task, printing each call and observation")
    decode_args(agr)
    agr.add_argument("--task-seed", type=int, default=0, dest="task_seed", help="held-out task K [0]")
    _agent_limits(agr)
    agr.set_defaults(fn=cmd_agent_run, sampler="ar")
    age = ag.add_parser(
        "eval",
        help="the AR and the diffusion agent on n held-out tasks, interleaved: the side-by-side table",
        description="Decoding options (--block-size, --threshold, ...) configure the diffusion sampler; "
        "the AR agent shares only --temperature, --top-p, --top-k and --seed.",
    )
    decode_args(age)
    age.add_argument(
        "--diffusion-sampler", dest="sampler", help="the diffusion agent's sampler (= --sampler) [fastdllm]"
    )
    age.add_argument("--ar-model", dest="ar_model", help="the AR agent's model [--model]")
    age.add_argument("--diffusion-model", dest="diffusion_model", help="the diffusion agent's [--model]")
    age.add_argument("--n", type=int, default=50, help="held-out tasks eval:0..n-1 [50]")
    age.add_argument("--out", help="write the summary and every task's record here (JSON)")
    _agent_limits(age)
    age.set_defaults(fn=cmd_agent_eval)
