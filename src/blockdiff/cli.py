"""blockdiff: train, adapt, import, generate with every sampler, evaluate and export block-diffusion
language models. `blockdiff COMMAND --help` for each command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .checkpoint import read_trainer_meta, resolve
from .config import BlockdiffError, ConfigError
from .decoding.samplers import SAMPLERS
from .models import load_model
from .recipe import adapt_defaults
from .runtime import PRECISIONS


def cmd_train(a: argparse.Namespace) -> int:
    from .train import train

    last = train(a.config, a.out, a.resume, a.set or [])
    if last is not None:
        print(f"checkpoint: {last}")
    return 0


def cmd_adapt(a: argparse.Namespace) -> int:
    """NBDiff: context-causal layout, shifted logits, AR-loss regulariser, gradual block growth."""
    from .recipe import adapt_recipe
    from .train import Trainer

    names = ("base", "data", "target_block_size", "ar_loss_weight", "growth", "delta", "mix_scale")
    names += ("seq_len", "steps", "batch_size", "lr", "precision", "set")
    r = adapt_recipe(**{n if n != "set" else "sets": getattr(a, n) for n in names})
    base, B = Path(str(r.model["base"])).name, r.block_sizes()[0]
    last = Trainer(r, Path(a.out or f"runs/adapt-{base}-B{B}"), a.resume).run()
    if last is not None:
        print(f"checkpoint: {last}")
    return 0


def cmd_import(a: argparse.Namespace) -> int:
    from .hub import import_checkpoint

    import_checkpoint(a.base, a.out, getattr(torch, a.dtype))
    print(f"imported {a.base} -> {a.out}")
    return 0


def _sampler_kwargs(a: argparse.Namespace) -> dict:
    names = ("block_size", "steps", "threshold", "temperature", "top_p", "top_k", "seed", "draft_len")
    kw = {k: getattr(a, k) for k in names if getattr(a, k, None) is not None}
    if getattr(a, "no_cache", False):
        kw["cache"] = "none"
    elif getattr(a, "cache", None):
        kw["cache"] = a.cache
    return kw


def cmd_eval_genppl(a: argparse.Namespace) -> int:
    from .eval import genppl
    from .hub import load_reference

    for name in ("num_samples", "max_new_tokens", "prompt_tokens", "batch_size"):
        if getattr(a, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    genppl.check_lengths(a.model, a.prompt_tokens, a.max_new_tokens)
    model, tok = load(a, a.model)
    corpus, source = (a.corpus, "--corpus") if a.corpus else genppl.trained_corpus(a.model)
    prompts, real = genppl.corpus_prompts(tok, corpus, a.num_samples, a.prompt_tokens, a.max_new_tokens)
    ref, ref_tok = load_reference(a.evaluator)
    kw = _sampler_kwargs(a)
    res = genppl.evaluate(
        model, tok, ref, ref_tok, prompts, a.sampler, a.max_new_tokens, batch_size=a.batch_size, **kw
    )
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
    from .eval.tasks import as_dict, check_task, evaluate_task

    check_task(a.task)
    model, tok = load(a, a.model)
    kw = _sampler_kwargs(a)
    seed = kw.pop("seed", 0)
    res = evaluate_task(model, tok, a.task, a.sampler, a.n, a.max_new_tokens, a.batch_size, seed=seed, **kw)
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


def cmd_eval_table(a: argparse.Namespace) -> int:
    from .experiments.table import run_table

    out = run_table(a.recipe, a.out, a.set or [])
    print((out / "table.md").read_text())
    print(f"results: {out / 'results.json'}, plot: {out / 'plot.png'}")
    return 0


def cmd_data_task(a: argparse.Namespace) -> int:
    from .eval.tasks import check_task, write_training_data

    check_task(a.task)
    if a.n < 1:
        raise ConfigError(f"--n must be >= 1 (the number of pairs to write), got {a.n}")
    out = write_training_data(a.task, a.n, a.out, a.seed)
    print(f"{a.n} {a.task} prompt/answer pairs -> {out} (evaluation questions excluded)")
    return 0


def cmd_data_distill(a: argparse.Namespace) -> int:
    from .data.distill import distill

    out = distill(a.model, a.out, a.n, a.max_new_tokens, a.batch_size, a.seq_len)
    print(f"self-distilled pairs -> {out}")
    return 0


def cmd_agent_data(a: argparse.Namespace) -> int:
    from . import models
    from .agent import write_sft_data
    from .tokenizer import Tokenizer

    tok = Tokenizer.load(resolve(models.path_of(a.tokenizer))) if a.tokenizer else None
    rows = write_sft_data(a.n, a.out, a.seed, tok)
    how = "its chat template" if tok and tok.chat_template else "plain '### role' turns"
    print(f"{a.n} agent tasks -> {rows} prompt/answer rows in {a.out} ({how}; held-out tasks excluded)")
    return 0


def cmd_agent_run(a: argparse.Namespace) -> int:
    from .agent import ModelPolicy, make_task, run_agent

    task = make_task("eval", a.task_seed)
    model, tok = load(a, a.model)
    kw = _sampler_kwargs(a)
    policy = ModelPolicy(model, tok, a.sampler, a.max_new_tokens, kw.pop("seed", 0), **kw)
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
    from . import models
    from .agent import ModelPolicy, make_task
    from .agent import evaluate as ev
    from .agent.loop import check_limits
    from .agent.trajectory import start_messages

    ev.check_eval_n(a.n)
    check_limits(max_rounds=a.max_rounds, max_tokens=a.max_tokens, max_new_tokens=a.max_new_tokens)
    if a.sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler '{a.sampler}'; known samplers: {', '.join(SAMPLERS)}")
    kw = _sampler_kwargs(a)
    seed = kw.pop("seed", 0)
    names = {"ar": a.ar_model or a.model, "diffusion": a.diffusion_model or a.model}
    samplers = {agent: ev.agent_sampler(agent, a.sampler) for agent in ev.AGENTS}
    loaded: dict = {}
    policies, settings = {}, {}
    for agent, sampler in samplers.items():
        opts = ev.agent_options(agent, kw)
        if names[agent] not in loaded:  # one model object when both agents use the same weights
            loaded[names[agent]] = load(a, names[agent])
        policies[agent] = ModelPolicy(*loaded[names[agent]], sampler, a.max_new_tokens, seed, **opts)
        policies[agent].check(start_messages(make_task("eval", 0).question.text))
        settings[agent] = {"model": names[agent] or models.DEFAULT, "sampler": sampler, "options": opts}
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


def _agent_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=96, dest="max_new_tokens", help="per call [96]")
    p.add_argument("--max-rounds", type=int, default=12, dest="max_rounds", help="[12]")
    p.add_argument("--max-tokens", type=int, default=2048, dest="max_tokens", help="in all [2048]")


def _reason_setup(a: argparse.Namespace):
    from .eval import tasks
    from .reason import stitch

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
    kw = _sampler_kwargs(a)
    seed = kw.pop("seed", 0)
    if a.sampler == "llada":  # one block = the canvas unless told: canvases differ per prompt here
        kw.setdefault("block_size", 1 << 20)
    complete = stitch.diffusion_completer(model, tok, a.sampler, a.new_tokens, a.batch_size, **kw)
    return complete, seed, (model, tok)


def _scorers(a: argparse.Namespace) -> list:
    from .reason import stitch

    return [stitch.make_scorer(s, a.task, lambda p: load(a, p)) for s in a.scorer]


def cmd_reason_prm_data(a: argparse.Namespace) -> int:
    from .eval import tasks
    from .reason import stitch

    complete, seed, _ = _reason_setup(a)
    its = tasks.training_items(a.task, a.questions, a.question_seed)
    rows = stitch.prm_data(a.task, its, complete, a.rollouts, a.k, a.sep, seed)
    tasks.write_jsonl(rows, a.out)
    good = sum(r["answer"] == stitch.PRM_GOOD for r in rows)
    print(
        f"{len(rows)} step labels ({good} '+', {len(rows) - good} '-') "
        f"from {a.questions} questions -> {a.out}"
    )
    return 0


def cmd_reason_solver_data(a: argparse.Namespace) -> int:
    from .eval import tasks
    from .reason import stitch

    complete, seed, diffusion = _reason_setup(a)
    (scorer,) = _scorers(a) if len(a.scorer) == 1 else (None,)
    if scorer is None:
        raise ConfigError("solver-data takes one --scorer")
    its = tasks.training_items(a.task, a.questions, a.question_seed)
    rolls = stitch.sample_rollouts(its, complete, a.rollouts, a.sep, seed)
    tok = diffusion[1]
    rows = stitch.solver_data(
        its, rolls, scorer, a.sep, a.stitch_threshold, a.cap, a.agree, tok, a.max_prompt_tokens
    )
    tasks.write_jsonl(rows, a.out)
    print(f"{len(rows)} stitched contexts ({scorer.name}) -> {a.out}")
    return 0


def cmd_reason_stitch(a: argparse.Namespace) -> int:
    import platform
    import time

    from .eval import tasks
    from .reason import stitch

    complete, seed, diffusion = _reason_setup(a)
    its = tasks.items(a.task, a.n)
    scorers = _scorers(a)
    solver = load(a, a.solver) if a.solver else None
    alone = load(a, a.ar_model) if a.ar_model else None
    t = time.perf_counter()
    rolls = stitch.sample_rollouts(its, complete, a.rollouts, a.sep, seed)
    secs = time.perf_counter() - t
    long = None
    if a.long_steps:  # the reference cost: one greedy rollout with this many steps
        kw = {**_sampler_kwargs(a), "steps": a.long_steps, "temperature": 0.0}
        kw.pop("seed", None)
        one = stitch.diffusion_completer(*diffusion, a.sampler, a.new_tokens, a.batch_size, **kw)
        t = time.perf_counter()
        long = ([r[0] for r in stitch.sample_rollouts(its, one, 1, a.sep, seed)], time.perf_counter() - t)
    res = stitch.evaluate_stitching(
        a.task,
        its,
        rolls,
        scorers,
        solver,
        a.sep,
        a.stitch_threshold,
        a.cap,
        a.agree,
        a.solver_tokens,
        secs,
        alone,
        long,
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
        f"{json.dumps(_sampler_kwargs(a))}); {platform.machine()}, {torch.get_num_threads()} threads"
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


def cmd_info(a: argparse.Namespace) -> int:
    p = resolve(a.path)
    model, tok = load_model(p, None)
    cfg, meta = model.config, read_trainer_meta(p)
    card = p / "model_card.json"
    if card.exists():
        meta = {**json.loads(card.read_text()), **meta}
    info = {
        "path": str(p),
        "architecture": (
            f"Llama-style: {cfg.num_hidden_layers} layers, width {cfg.hidden_size}, "
            f"{cfg.num_attention_heads} query / {cfg.num_key_value_heads} KV heads, vocab {cfg.vocab_size}"
        ),
        "parameters": model.num_parameters(),
        "block_size": cfg.block_size,
        "block_sizes": cfg.block_sizes or [cfg.block_size],
        "logits": cfg.logits,
        "layout": cfg.layout,
        "max_position_embeddings": cfg.max_position_embeddings,
        "training_tokens": meta.get("tokens_seen"),
        "train_seconds": meta.get("train_seconds"),
        "val_nll_bound": {k: v for k, v in (meta.get("metrics") or {}).items() if k.startswith("val_nll")}
        or None,
    }
    if a.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>24}: {v}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .export import export

    export(a.run, a.out, dtype=a.dtype, force=a.force)
    print(f"exported {resolve(a.run)} -> {a.out}")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from .decoding import generate
    from .decoding.display import LiveCanvas

    model, tok = load(a, a.model)
    kwargs = _sampler_kwargs(a)
    if a.max_new_tokens is not None:
        kwargs["max_new_tokens"] = a.max_new_tokens
    try:
        a.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError("the prompt is not valid UTF-8 text") from None
    infill = tok.names["mask_token"] in a.prompt
    chat = bool(tok.chat_template) and not a.raw and not infill
    prompt = tok.chat(a.prompt) if chat else a.prompt
    plain = a.json or not sys.stdout.isatty() or a.quiet
    live = None if plain else LiveCanvas(tok, prompt=a.prompt if chat else None)
    out = generate(model, tok, [prompt], sampler=a.sampler, on_step=live, **kwargs)
    if live is not None:
        live.close()
    row = out.rows[0]
    if a.json:
        d = {"text": out.texts[0], "prompt": a.prompt, "chat_template": chat, "sampler": a.sampler}
        print(json.dumps({**d, **row.as_dict(), "notes": out.notes}))
    else:
        if live is None:  # the live view already shows the final canvas
            print(
                out.texts[0] if infill else f"{a.prompt}\n{out.texts[0]}" if chat else a.prompt + out.texts[0]
            )
        for note in out.notes:
            print(f"note: {note}", file=sys.stderr)
        print(
            f"[{a.sampler}] {row.tokens} tokens, {row.nfe} NFEs, {row.tokens_per_nfe:.2f} tokens/NFE, "
            f"{row.seconds:.2f}s",
            file=sys.stderr,
        )
    return 0


def _decode_args(g: argparse.ArgumentParser) -> None:
    g.add_argument(
        "--model",
        help="model name (smollm2-nbdiff, shakespeare-5m, smollm2-135m-instruct) or checkpoint/run dir",
    )
    g.add_argument("--sampler", default="bd3", help="one of " + ", ".join(SAMPLERS))
    g.add_argument("--block-size", type=int, dest="block_size")
    g.add_argument("--steps", type=int)
    g.add_argument("--threshold", type=float)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float, dest="top_p")
    g.add_argument("--top-k", type=int, dest="top_k")
    g.add_argument("--seed", type=int)
    g.add_argument("--draft-len", type=int, dest="draft_len", help="spec: tokens drafted per forward (3)")
    g.add_argument("--cache", choices=["none", "prefix", "dual", "exact"])
    g.add_argument("--no-cache", action="store_true", dest="no_cache")
    g.add_argument("--json", action="store_true")
    add_precision(g)


def load(a: argparse.Namespace, path):
    """A model for one of the decoding commands, in their --dtype on their --device."""
    try:
        device = torch.device(a.device)
    except RuntimeError:
        raise ConfigError(f"unknown --device '{a.device}' (cpu, cuda, cuda:N, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {a.device}: this machine has no CUDA device")
    return load_model(path, a.dtype, device)


def add_precision(g) -> None:
    g.add_argument(
        "--dtype",
        default="auto",
        choices=PRECISIONS,
        help="weights for inference: auto = int4 where the weights are on a 4-bit grid (exact: "
        "SmolLM2 and deltas over it), else float32; int8 = weight-only, lossy (README: Precision)",
    )
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (int4/int8 are CPU kernels)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blockdiff", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a model from a YAML recipe")
    t.add_argument("config")
    t.add_argument("--out")
    t.add_argument("--resume", action="store_true")
    t.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. train.steps=10"
    )
    t.set_defaults(fn=cmd_train)

    i = sub.add_parser("info", help="describe a checkpoint")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)

    e = sub.add_parser(
        "export", help="copy a run's newest checkpoint for inference (weights only, model card)"
    )
    e.add_argument("run")
    e.add_argument("out")
    e.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    e.add_argument("--force", action="store_true", help="replace OUT if it already exists")
    e.set_defaults(fn=cmd_export)

    ad = sub.add_parser(
        "adapt",
        help="turn a pretrained AR model into a block-diffusion model (NBDiff)",
        description="NBDiff adaptation. Defaults (shown in brackets) come from the shipped recipe "
        "recipes/nbdiff-smollm2.yaml; with another --steps its warm-up, eval, save and log intervals "
        "scale in proportion.",
    )
    d = adapt_defaults()
    dflt = {k: v for s in ("model", "data", "objective", "train") for k, v in d[s].items()}
    ad.add_argument("--base", help=f"a known name, a path or an HF id [{dflt['base']}]")
    ad.add_argument("--data", help=f"corpus: shakespeare, a text file or folder, a .jsonl [{dflt['corpus']}]")
    ad.add_argument(
        "--target-block-size", type=int, dest="target_block_size", help=f"[{dflt['block_sizes'][0]}]"
    )
    ad.add_argument("--ar-loss-weight", type=float, dest="ar_loss_weight", help=f"[{dflt['ar_weight']}]")
    ad.add_argument("--growth", default="linear", help="none | linear | 'progress:block,...' [linear]")
    ad.add_argument("--delta", help="lora:RANK trains a low-rank delta over the frozen base")
    ad.add_argument("--mix-scale", action="store_true", dest="mix_scale", help="also train the global block")
    ad.add_argument("--seq-len", type=int, dest="seq_len", help=f"[{dflt['seq_len']}]")
    ad.add_argument("--steps", type=int, help=f"[{dflt['steps']}]")
    ad.add_argument("--batch-size", type=int, dest="batch_size", help=f"[{dflt['batch_size']}]")
    ad.add_argument("--lr", type=float, help=f"[{dflt['lr']}]")
    ad.add_argument("--precision", choices=["fp32", "bf16"], help=f"[{dflt['precision']}]")
    ad.add_argument("--out")
    ad.add_argument("--resume", action="store_true")
    ad.add_argument("--set", action="append", metavar="KEY=VALUE")
    ad.set_defaults(fn=cmd_adapt)

    im = sub.add_parser("import", help="convert a Llama-family causal LM into a blockdiff checkpoint")
    im.add_argument("base", help="smollm2-135m-instruct, a .gguf file, a local directory or an HF id")
    im.add_argument("out")
    im.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    im.set_defaults(fn=cmd_import)

    g = sub.add_parser("generate", help="generate text, showing the denoising as it happens")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, dest="max_new_tokens")
    _decode_args(g)
    g.add_argument("--quiet", action="store_true", help="no live canvas")
    g.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's chat template")
    g.set_defaults(fn=cmd_generate, sampler="fastdllm")  # as make demo and serve
    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="what", required=True)
    gp = ev.add_parser("genppl", help="generative perplexity under a reference model, with NFEs and entropy")
    _decode_args(gp)
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
    _decode_args(tk)
    tk.add_argument("--n", type=int, default=50, help="evaluation items (a fixed held-out set)")
    tk.add_argument("--max-new-tokens", type=int, dest="max_new_tokens", help="default: from the answers")
    tk.add_argument("--batch-size", type=int, default=8, dest="batch_size")
    tk.set_defaults(fn=cmd_eval_task)

    tb = ev.add_parser("table", help="train models at one budget and compare them (the talk's table)")
    tb.add_argument("recipe", help="a table recipe, e.g. recipes/table-shakespeare.yaml")
    tb.add_argument("--out", help="default: runs/table-<recipe name>")
    tb.add_argument("--set", action="append", metavar="KEY=VALUE", help="eval.KEY=V or SECTION.KEY=V (base)")
    tb.set_defaults(fn=cmd_eval_table)

    da = sub.add_parser("data", help="write training data").add_subparsers(dest="what", required=True)
    dt = da.add_parser("task", help="prompt/answer pairs (JSONL) for a reasoning task; loss on answers only")
    dt.add_argument("task")
    dt.add_argument("--n", type=int, required=True)
    dt.add_argument("--out", required=True)
    dt.add_argument("--seed", type=int, default=0)
    dt.set_defaults(fn=cmd_data_task)
    dd = da.add_parser("distill", help="a chat model's own answers to an offline prompt set (SFT JSONL)")
    dd.add_argument("--model", default="smollm2-135m-instruct")
    dd.add_argument("--n", type=int, default=100000, help="at most this many prompts (train split)")
    dd.add_argument("--out", required=True)
    dd.add_argument("--max-new-tokens", type=int, default=160, dest="max_new_tokens")
    dd.add_argument("--batch-size", type=int, default=16, dest="batch_size")
    dd.add_argument("--seq-len", type=int, default=256, dest="seq_len", help="drop pairs longer than this")
    dd.set_defaults(fn=cmd_data_distill)

    ag = sub.add_parser("agent", help="the tool-using agent").add_subparsers(dest="what", required=True)
    agd = ag.add_parser("data", help="SFT JSONL of scripted tool-use trajectories (one row per call)")
    agd.add_argument("--n", type=int, required=True, help="training tasks (6 rows each)")
    agd.add_argument("--out", required=True)
    agd.add_argument("--seed", type=int, default=0)
    agd.add_argument("--tokenizer", help="render with this model's chat template (the model to train)")
    agd.set_defaults(fn=cmd_agent_data)
    agr = ag.add_parser("run", help="one held-out task, printing each call and observation")
    _decode_args(agr)
    agr.add_argument("--task-seed", type=int, default=0, dest="task_seed", help="held-out task K [0]")
    _agent_limits(agr)
    agr.set_defaults(fn=cmd_agent_run, sampler="ar")
    age = ag.add_parser(
        "eval",
        help="the AR and the diffusion agent on n held-out tasks, interleaved: the side-by-side table",
        description="Decoding options (--block-size, --threshold, ...) configure the diffusion sampler; "
        "the AR agent shares only --temperature, --top-p, --top-k and --seed.",
    )
    _decode_args(age)
    age.add_argument(
        "--diffusion-sampler", dest="sampler", help="the diffusion agent's sampler (= --sampler) [fastdllm]"
    )
    age.add_argument("--ar-model", dest="ar_model", help="the AR agent's model [--model]")
    age.add_argument("--diffusion-model", dest="diffusion_model", help="the diffusion agent's [--model]")
    age.add_argument("--n", type=int, default=50, help="held-out tasks eval:0..n-1 [50]")
    age.add_argument("--out", help="write the summary and every task's record here (JSON)")
    _agent_limits(age)
    age.set_defaults(fn=cmd_agent_eval, sampler="fastdllm")

    rs = sub.add_parser("reason", help="stitching diffusion reasoning rollouts").add_subparsers(
        dest="what", required=True
    )
    rst = rs.add_parser(
        "stitch", help="Sample -> Score -> Stitch -> Refine on held-out questions, costs beside"
    )
    rpd = rs.add_parser("prm-data", help="PRM training pairs: step labels by Monte-Carlo rollouts")
    rsd = rs.add_parser("solver-data", help="stitched contexts of training questions -> reference answers")
    for g in (rst, rpd, rsd):
        _decode_args(g)  # --model is the diffusion model that writes the rollouts
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

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server and the live denoising page")
    sv.add_argument("--model", help="model name or checkpoint/run dir (default: smollm2-nbdiff)")
    sv.add_argument(
        "--ar-model",
        dest="ar_model",
        help="also serve this model; the page's AR side (race, AR agent) uses it [the main model]",
    )
    sv.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--sampler", default="fastdllm", help="default sampler: one of " + ", ".join(SAMPLERS))
    sv.add_argument("--max-batch", type=int, default=8, dest="max_batch", help="canvas rows per batch")
    sv.add_argument("--max-queue", type=int, default=64, dest="max_queue", help="waiting requests before 429")
    sv.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take in all")
    sv.add_argument(
        "--api-key",
        dest="api_key",
        default=os.environ.get("BLOCKDIFF_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $BLOCKDIFF_API_KEY; none: open)",
    )
    add_precision(sv)
    sv.set_defaults(fn=cmd_serve)
    return p


def cmd_serve(a: argparse.Namespace) -> int:
    try:
        from .serve import Server, bind, serve
    except ImportError as e:
        raise ConfigError(f"the server needs its extra: pip install 'blockdiff[serve]' ({e})") from None
    from . import models

    if a.sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler '{a.sampler}'; known samplers: {', '.join(SAMPLERS)}")
    if not 0 <= a.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {a.port}")
    if a.max_batch < 1 or a.max_queue < 1 or a.timeout <= 0:
        raise ConfigError("--max-batch and --max-queue must be >= 1 and --timeout > 0")
    sock = bind(a.host, a.port)  # before the model loads: a taken port fails at once
    model, tok = load(a, a.model)
    name = a.model if a.model in models.NAMES else Path(a.model).name if a.model else models.DEFAULT
    server = Server(model, tok, name, a.sampler, a.max_batch, a.max_queue, a.timeout, a.api_key)
    also = ""
    if a.ar_model:
        ar_name = a.ar_model if a.ar_model in models.NAMES else Path(a.ar_model).name
        server.add_ar_model(*load(a, a.ar_model), ar_name)
        also = f" and {ar_name} (ar)"
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"blockdiff serve: {name} ({a.sampler}){also} on http://{host}:{port}/", file=sys.stderr)
    serve(server, sock)
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        with torch.set_grad_enabled(a.cmd in ("train", "adapt")):
            return a.fn(a)
    except (BlockdiffError, ValueError) as e:
        print(f"blockdiff {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # permission denied, disk full, a file where a directory should be...
        where = f"{e.filename}: " if e.filename else ""
        print(f"blockdiff {a.cmd}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
