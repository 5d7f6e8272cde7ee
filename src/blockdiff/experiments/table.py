"""`blockdiff eval table RECIPE.yaml`: train several models at one budget, sample each with its
samplers, and print the comparison (the talk's table at small scale) with a plot.

A table recipe holds `base` (a training recipe shared by every model: corpus, tokenizer, size,
token budget), `models` (name -> overrides of base, plus the `samplers` rows to evaluate) and
`eval` (a `TableEval`: `kind: genppl` scores samples continuing prompts from the base recipe's
corpus under a reference model, `kind: task` scores answers with a task's checker). Every stage
is resumable: finished runs are not retrained, finished rows not re-evaluated.

This is an experiment (it trains): it uses the metrics in `eval/`, which never import it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, did_you_mean


@dataclass(frozen=True)
class TableEval:
    """The table's `eval` section, parsed and checked once."""

    kind: str = "genppl"  # genppl | task
    max_new_tokens: int | None = None  # genppl: 128; task: the longest answer + EOS (see tasks.py)
    batch_size: int = 8
    # genppl
    num_samples: int = 16
    prompt_tokens: int = 16
    evaluator: str = "smollm2-135m-instruct"
    # task
    task: str | None = None
    n: int = 100
    train_size: int = 10000
    seed: int = 0
    given: dict = field(default_factory=dict, compare=False)  # as written: stamps results.json

    # class constants (no annotation: not fields): the keys only one kind reads
    ONLY = {
        "genppl": ("num_samples", "prompt_tokens", "evaluator"),
        "task": ("task", "n", "train_size", "seed"),
    }

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TableEval:
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: eval must be a mapping of settings, got {d!r}")
        names = [f.name for f in dataclasses.fields(cls) if f.name != "given"]
        for k in d:
            if k not in names:
                raise ConfigError(
                    f"{where}: unknown eval key '{k}'{did_you_mean(k, names)}; known keys: {', '.join(names)}"
                )
        for k, v in d.items():
            if k in ("kind", "evaluator", "task"):
                if not isinstance(v, str):
                    raise ConfigError(f"{where}: eval.{k} must be a string, got {v!r}")
            elif not (k == "max_new_tokens" and v is None):
                least = 0 if k == "seed" else 1
                if isinstance(v, bool) or not isinstance(v, int) or v < least:
                    raise ConfigError(f"{where}: eval.{k} must be an integer >= {least}, got {v!r}")
        ev = cls(**d, given=dict(d))
        if ev.kind not in cls.ONLY:
            raise ConfigError(f"{where}: eval.kind must be genppl or task, got '{ev.kind}'")
        for kind, keys in cls.ONLY.items():
            stray = [k for k in keys if k in d and kind != ev.kind]
            if stray:
                raise ConfigError(f"{where}: eval.{stray[0]} is read only by eval.kind {kind}, not {ev.kind}")
        if ev.kind == "task":
            from ..eval.tasks import check_task

            if ev.task is None:
                raise ConfigError(f"{where}: eval.kind task needs eval.task (e.g. mini_sudoku)")
            check_task(ev.task)
        return ev

    def settings(self) -> dict:
        """What a result depends on (the batch size never changes a sample)."""
        return {k: v for k, v in self.given.items() if k != "batch_size"}


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
    the shared base recipe (e.g. train.steps=10 for a smoke test). Everything is checked here,
    before any training: `eval` becomes a `TableEval`."""
    from ..recipe import apply_overrides, from_dict

    try:
        d = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read table recipe {path}: {e}") from None
    if not isinstance(d, dict) or not {"base", "models", "eval"} <= set(d):
        raise ConfigError(f"{path}: a table recipe needs the sections base, models and eval")
    unknown = set(d) - {"base", "models", "eval"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; expected base, models, eval")
    sets = sets or []
    ev = apply_overrides({"eval": d["eval"]}, [x for x in sets if x.startswith("eval.")])["eval"]
    d["eval"] = TableEval.from_dict(ev, str(path))
    d["base"] = apply_overrides(d["base"], [x for x in sets if not x.startswith("eval.")])
    rows = evaluator(d)
    for name, m in d["models"].items():
        if not m.get("samplers"):
            raise ConfigError(f"{path}: model '{name}' lists no samplers")
        r = from_dict(merge(d["base"], {k: v for k, v in m.items() if k != "samplers"}))  # validates early
        rows.check(r, str(path))
    return d


def evaluator(d: dict) -> GenPPLRows | TaskRows:
    """The evaluator of a loaded table recipe's sampler rows."""
    from ..recipe import from_dict

    ev: TableEval = d["eval"]
    return TaskRows(ev) if ev.kind == "task" else GenPPLRows(ev, from_dict(d["base"]).data.corpus)


class GenPPLRows:
    """kind genppl: each row continues `num_samples` prompts cut from the validation split of the
    base recipe's corpus (the text the models were trained on), scored by a reference model."""

    columns = ("gen_ppl", "entropy")
    metric, log_scale = "gen_ppl", True
    axis = "Gen PPL (lower is better)"

    def __init__(self, ev: TableEval, corpus: str):
        self.ev, self.corpus = ev, corpus
        self.new = ev.max_new_tokens or 128
        self._loaded = None  # (reference model, its tokenizer, prompts), on the first row

    def check(self, r, where: str) -> None:
        span = self.ev.prompt_tokens + self.new
        if span > r.data.seq_len:
            raise ConfigError(
                f"{where}: eval.prompt_tokens + eval.max_new_tokens = {span} exceeds the models' "
                f"data.seq_len {r.data.seq_len} (their context)"
            )

    def training_data(self, out: Path) -> str | None:
        return None  # the base recipe's corpus

    def prompts(self, tok) -> tuple[list[str], list[str]]:
        """(prompts, their real continuations) from the corpus's validation split."""
        from ..eval.genppl import corpus_prompts

        return corpus_prompts(tok, self.corpus, self.ev.num_samples, self.ev.prompt_tokens, self.new)

    def row(self, model, tok, sampler: str, kw: dict, results: dict) -> dict:
        from ..eval.genppl import evaluate

        if self._loaded is None:
            self._load(tok, results)
        ref, ref_tok, prompts = self._loaded
        t0 = time.process_time()
        r = evaluate(
            model, tok, ref, ref_tok, prompts, sampler, self.new, batch_size=self.ev.batch_size, **kw
        )
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

    def _load(self, tok, results: dict) -> None:
        from ..eval.genppl import reference_row
        from ..hub import load_reference

        # results written before the prompts followed the recipe's corpus came from Shakespeare
        before = results.get("prompt_corpus", "shakespeare")
        if results["rows"] and before != self.corpus:
            raise ConfigError(
                f"the table's results were sampled from prompts of '{before}', not of the recipe's "
                f"corpus '{self.corpus}'; choose another --out or remove them"
            )
        results["prompt_corpus"] = self.corpus
        ref, ref_tok = load_reference(self.ev.evaluator)
        prompts, real = self.prompts(tok)
        results["real_text_ppl"] = reference_row(ref, ref_tok, prompts, real)
        self._loaded = ref, ref_tok, prompts


class TaskRows:
    """kind task: the models train on generated items of the task (held-out questions excluded);
    each row answers `n` held-out questions, scored by the task's own checker."""

    columns = ("accuracy", "mean_score")
    metric, log_scale = "accuracy", False

    def __init__(self, ev: TableEval):
        self.ev = ev
        self.axis = f"{ev.task} accuracy"

    def check(self, r, where: str) -> None:
        pass  # the canvas is sized from the answers (eval/tasks.py)

    def training_data(self, out: Path) -> str | None:
        from ..eval.tasks import write_training_data

        ev = self.ev
        data = out / f"{ev.task}-train-{ev.train_size}.jsonl"
        if not data.exists():
            write_training_data(ev.task, ev.train_size, data, seed=0)
        return str(data.resolve())

    def row(self, model, tok, sampler: str, kw: dict, results: dict) -> dict:
        from ..decoding import DecodeSpec
        from ..eval.tasks import evaluate_task

        ev = self.ev
        options = {k: v for k, v in kw.items() if k != "seed"}
        spec = DecodeSpec.build(model, sampler, ev.max_new_tokens, kw.get("seed", ev.seed), **options)
        r = evaluate_task(model, tok, ev.task, spec, ev.n, batch_size=ev.batch_size)
        return {
            "accuracy": round(r.accuracy, 4),
            "mean_score": round(r.mean_score, 4),
            "nfe": round(r.nfe, 1),
            "tokens_per_nfe": round(r.tokens_per_nfe, 2),
            "empty": r.empty,
            "sample": r.examples[0]["completion"][:160] if r.examples else "",
        }


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

    from ..models import load_model

    d = load_table_recipe(path, sets)
    out = Path(out or Path("runs") / f"table-{Path(path).stem}")
    out.mkdir(parents=True, exist_ok=True)
    ev: TableEval = d["eval"]
    rows = evaluator(d)
    base = copy.deepcopy(d["base"])
    data = rows.training_data(out)
    if data is not None:
        base = merge(base, {"data": {"corpus": data}})
    res_file = out / "results.json"
    results = json.loads(res_file.read_text()) if res_file.exists() else {"rows": [], "models": {}}
    stamped = {k: v for k, v in results.setdefault("eval", ev.given).items() if k != "batch_size"}
    if stamped != ev.settings():
        raise ConfigError(
            f"{res_file} holds results of other eval settings ({results['eval']}); "
            "choose another --out or remove it"
        )
    done = {(r["model"], r["sampler"]) for r in results["rows"]}
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
                rec = rows.row(model, tok, row["sampler"], kw, results)
            results["rows"].append({"model": name, "sampler": key[1], **rec})
            res_file.write_text(json.dumps(results, indent=1))
            print(f"{name} | {key[1]} | " + ", ".join(f"{k} {v}" for k, v in rec.items()), flush=True)
    cmd = " ".join([f"blockdiff eval table {path}", *(f"--set {x}" for x in sets or [])])
    (out / "table.md").write_text(markdown(rows, results, cmd))
    plot(list(d["models"]), rows, results, out / "plot.png")
    return out


def markdown(rows: GenPPLRows | TaskRows, results: dict, command: str) -> str:
    cols = rows.columns
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


def plot(models: list[str], rows: GenPPLRows | TaskRows, results: dict, png: Path) -> None:
    """NFEs against the quality metric, one colour per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in models:
        mine = [r for r in results["rows"] if r["model"] == name]
        ax.plot([r["nfe"] for r in mine], [r[rows.metric] for r in mine], "o-", label=name)
    ax.set_xlabel("NFEs per sample")
    ax.set_ylabel(rows.axis)
    if rows.log_scale:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
