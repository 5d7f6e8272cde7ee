"""`blockdiff eval table RECIPE.yaml`: train several models at one budget, sample each with its
samplers, and print the comparison (the talk's table at small scale) with a plot.

A table recipe holds `base` (a training recipe shared by every model: corpus, tokenizer, size,
token budget), `models` (name -> overrides of base, plus the `samplers` rows to evaluate) and
`eval` (`kind: genppl` under a reference model, or `kind: task` with a task's checker). Every
stage is resumable: finished runs are not retrained, finished rows not re-evaluated.
"""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

import yaml

from ..config import ConfigError

EVAL_KEYS = {
    "kind",
    "num_samples",
    "prompt_tokens",
    "max_new_tokens",
    "evaluator",
    "batch_size",
    "task",
    "n",
    "train_size",
    "seed",
}


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-").lower()


def label(row: dict) -> str:
    kw = {k: v for k, v in row.items() if k not in ("sampler", "label")}
    return row.get("label") or " ".join([row["sampler"], *(f"{k}={v}" for k, v in kw.items())])


def load_table_recipe(path: str | Path, sets: list[str] | None = None) -> dict:
    """The recipe with `--set` overrides: `eval.KEY=V` sets an eval key, `SECTION.KEY=V` a key of
    the shared base recipe (e.g. train.steps=10 for a smoke test)."""
    from ..recipe import apply_overrides

    try:
        d = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read table recipe {path}: {e}") from None
    if not isinstance(d, dict) or not {"base", "models", "eval"} <= set(d):
        raise ConfigError(f"{path}: a table recipe needs the sections base, models and eval")
    sets = sets or []
    d["eval"] = apply_overrides({"eval": d["eval"]}, [x for x in sets if x.startswith("eval.")])["eval"]
    d["base"] = apply_overrides(d["base"], [x for x in sets if not x.startswith("eval.")])
    unknown = set(d) - {"base", "models", "eval"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; expected base, models, eval")
    bad = set(d["eval"]) - EVAL_KEYS
    if bad:
        raise ConfigError(f"{path}: unknown eval key(s) {sorted(bad)}; known: {sorted(EVAL_KEYS)}")
    if d["eval"].get("kind", "genppl") not in ("genppl", "task"):
        raise ConfigError(f"{path}: eval.kind must be genppl or task")
    if d["eval"].get("kind") == "task":
        from .tasks import check_task

        if "task" not in d["eval"]:
            raise ConfigError(f"{path}: eval.kind task needs eval.task (e.g. mini_sudoku)")
        check_task(d["eval"]["task"])
    from ..recipe import from_dict

    ev = d["eval"]
    for name, m in d["models"].items():
        if not m.get("samplers"):
            raise ConfigError(f"{path}: model '{name}' lists no samplers")
        r = from_dict(merge(d["base"], {k: v for k, v in m.items() if k != "samplers"}))  # validates early
        span = int(ev.get("prompt_tokens", 16)) + int(ev.get("max_new_tokens", 128))
        if ev.get("kind", "genppl") == "genppl" and span > r.data.seq_len:
            raise ConfigError(
                f"{path}: eval.prompt_tokens + eval.max_new_tokens = {span} exceeds the models' "
                f"data.seq_len {r.data.seq_len} (their context)"
            )
    return d


def train_one(recipe: dict, out: Path) -> dict:
    """Train (or finish) one model; returns its CPU and wall seconds, summed over invocations."""
    from ..recipe import from_dict
    from ..train import Trainer

    r = from_dict(recipe)
    stamp = out / "table_recipe.json"
    if stamp.exists() and json.loads(stamp.read_text()) != recipe:
        raise ConfigError(
            f"{out} was trained from a different recipe than the table's now; "
            "choose another --out or remove that run"
        )
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(recipe, indent=1))
    log = out / "table_time.json"
    spent = json.loads(log.read_text()) if log.exists() else {"cpu_s": 0.0, "wall_s": 0.0}
    latest = out / "latest"
    if latest.exists() and latest.read_text().strip() == f"step-{r.train.steps:07d}":
        return spent
    import torch

    c0, w0 = time.process_time(), time.time()
    with torch.enable_grad():  # the CLI runs eval commands without autograd
        Trainer(r, out, resume=latest.exists()).run()
    spent = {"cpu_s": spent["cpu_s"] + time.process_time() - c0, "wall_s": spent["wall_s"] + time.time() - w0}
    log.write_text(json.dumps(spent))
    return spent


def run_table(path: str | Path, out: str | Path | None = None, sets: list[str] | None = None) -> Path:
    import torch

    from ..checkpoint import load_model

    d = load_table_recipe(path, sets)
    out = Path(out or Path("runs") / f"table-{Path(path).stem}")
    out.mkdir(parents=True, exist_ok=True)
    ev = d["eval"]
    base = copy.deepcopy(d["base"])
    if ev.get("kind") == "task":
        from .tasks import write_training_data

        data = out / f"{ev['task']}-train-{int(ev.get('train_size', 10000))}.jsonl"
        if not data.exists():
            write_training_data(ev["task"], int(ev.get("train_size", 10000)), data, seed=0)
        base = merge(base, {"data": {"corpus": str(data.resolve())}})
    res_file = out / "results.json"
    results = json.loads(res_file.read_text()) if res_file.exists() else {"rows": [], "models": {}}
    same = {k: v for k, v in ev.items() if k != "batch_size"}  # batch size never changes a sample
    if {k: v for k, v in results.setdefault("eval", ev).items() if k != "batch_size"} != same:
        raise ConfigError(
            f"{res_file} holds results of other eval settings ({results['eval']}); "
            "choose another --out or remove it"
        )
    done = {(r["model"], r["sampler"]) for r in results["rows"]}
    evaluator = None
    for name, m in d["models"].items():
        run = out / slug(name)
        spent = train_one(merge(base, {k: v for k, v in m.items() if k != "samplers"}), run)
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        nll = [x["val_nll"] for x in metrics if "val_nll" in x]
        results["models"][name] = {**spent, "val_nll_bound": nll[-1] if nll else None}
        model, tok = load_model(run)
        for row in m["samplers"]:
            key = (name, label(row))
            if key in done:
                continue
            kw = {k: v for k, v in row.items() if k not in ("sampler", "label")}
            with torch.no_grad():
                if ev.get("kind") == "task":
                    rec = _task_row(model, tok, ev, row["sampler"], kw)
                else:
                    evaluator = evaluator or _load_evaluator(ev, tok, results)
                    rec = _genppl_row(model, tok, ev, evaluator, row["sampler"], kw)
            results["rows"].append({"model": name, "sampler": key[1], **rec})
            res_file.write_text(json.dumps(results, indent=1))
            print(f"{name} | {key[1]} | " + ", ".join(f"{k} {v}" for k, v in rec.items()), flush=True)
    cmd = " ".join([f"blockdiff eval table {path}", *(f"--set {x}" for x in sets or [])])
    (out / "table.md").write_text(markdown(d, results, cmd))
    plot(d, results, out / "plot.png")
    return out


def _load_evaluator(ev: dict, tok, results: dict):
    from ..hub import load_reference
    from .genppl import corpus_prompts, reference_row

    ref, ref_tok = load_reference(ev.get("evaluator", "smollm2-135m-instruct"))
    n, new = int(ev.get("num_samples", 16)), int(ev.get("max_new_tokens", 128))
    prompts, real = corpus_prompts(tok, "shakespeare", n, int(ev.get("prompt_tokens", 16)), new)
    results["real_text_ppl"] = reference_row(ref, ref_tok, prompts, real)
    return ref, ref_tok, prompts


def _genppl_row(model, tok, ev: dict, evaluator, sampler: str, kw: dict) -> dict:
    from .genppl import evaluate

    ref, ref_tok, prompts = evaluator
    new, bs = int(ev.get("max_new_tokens", 128)), int(ev.get("batch_size", 8))
    t0 = time.process_time()
    r = evaluate(model, tok, ref, ref_tok, prompts, sampler, new, batch_size=bs, **kw)
    return {
        "gen_ppl": round(r.gen_ppl, 2),
        "entropy": round(r.entropy, 3),
        "nfe": round(r.nfe, 1),
        "tokens_per_nfe": round(r.tokens_per_nfe, 2),
        "empty": r.empty,
        "degenerate": r.degenerate,
        "cpu_s": round(time.process_time() - t0, 1),
        "sample": r.texts[0][:160],
    }


def _task_row(model, tok, ev: dict, sampler: str, kw: dict) -> dict:
    from .tasks import evaluate_task

    seed = kw.pop("seed", int(ev.get("seed", 0)))
    r = evaluate_task(
        model, tok, ev["task"], sampler, int(ev.get("n", 100)), ev.get("max_new_tokens"),
        int(ev.get("batch_size", 8)), seed=seed, **kw,
    )  # fmt: skip
    return {
        "accuracy": round(r.accuracy, 4),
        "mean_score": round(r.mean_score, 4),
        "nfe": round(r.nfe, 1),
        "tokens_per_nfe": round(r.tokens_per_nfe, 2),
        "empty": r.empty,
        "sample": r.examples[0]["completion"][:160] if r.examples else "",
    }


def markdown(d: dict, results: dict, command: str) -> str:
    task = d["eval"].get("kind") == "task"
    cols = ["accuracy", "mean_score"] if task else ["gen_ppl", "entropy"]
    head = ["model", "sampler", *cols, "NFEs", "tokens/NFE", "val NLL bound", "train CPU min"]
    lines = [f"command: {command}", ""]
    if "real_text_ppl" in results:
        lines += [
            f"real text (validation continuations) under the evaluator: {results['real_text_ppl']:.2f}",
            "",
        ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        m = results["models"][r["model"]]
        nll = f"{m['val_nll_bound']:.3f}" if m.get("val_nll_bound") is not None else "-"
        vals = [r["model"], r["sampler"], *(r[c] for c in cols), r["nfe"], r["tokens_per_nfe"], nll]
        lines.append("| " + " | ".join(str(v) for v in vals) + f" | {m['cpu_s'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


def plot(d: dict, results: dict, png: Path) -> None:
    """NFEs against the quality metric, one colour per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    task = d["eval"].get("kind") == "task"
    metric = "accuracy" if task else "gen_ppl"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in d["models"]:
        rows = [r for r in results["rows"] if r["model"] == name]
        ax.plot([r["nfe"] for r in rows], [r[metric] for r in rows], "o-", label=name)
    ax.set_xlabel("NFEs per sample")
    ax.set_ylabel(f"{d['eval'].get('task', '')} accuracy" if task else "Gen PPL (lower is better)")
    if not task:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
