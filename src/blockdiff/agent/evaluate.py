"""Both agents on the same held-out tasks in one run: the side-by-side table of issue 15.

The AR agent and the diffusion agent run task by task in turn (AR on eval:k, diffusion on
eval:k, then k + 1), so load from other processes, thermal state or a cache warming up hits
both alike; their wall times are comparable only because they come from the same run on the
same machine, which the report names (`machine`). The aggregation is a pure function of the
`AgentResult`s (`summarize`), so its arithmetic is tested on hand-made results.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Mapping
from statistics import fmean
from typing import Any

from ..decoding.request import DEFAULT_SAMPLER
from .loop import AgentResult, ModelPolicy, Policy, run_agent
from .tasks import make_task
from .trajectory import start_messages
from .world import EVAL_POOL

AGENTS = ("ar", "diffusion")
DIFFUSION_SAMPLER = DEFAULT_SAMPLER  # the diffusion agent's, unless told
# the sampling options the AR agent shares with the diffusion agent; the rest (block size,
# threshold, steps, cache, ...) configure the diffusion sampler only
# what both agents decode with: sampling, the call schema (--constrain), revision (--revise)
SHARED_OPTIONS = ("temperature", "top_p", "top_k", "json_schema", "regex", "revise")
# how a run ends when it fails, in the order the table lists them; `unparsable_call` is every
# reply the parser rejects (not JSON, unknown tool, wrong arguments)
FAILURE_KINDS = (
    "unparsable_call",
    "round_limit",
    "token_limit",
    "wrong_answer",
    "context_limit",
    "model_error",
)
_CALL_ERRORS = ("unparsable", "unknown_tool", "bad_args")


def failure_kind(failure: str | None) -> str | None:
    """The table's kind of an `AgentResult.failure` ("bad_args: ..." -> "unparsable_call")."""
    if failure is None:
        return None
    head = failure.split(":", 1)[0]
    return "unparsable_call" if head in _CALL_ERRORS else head


def check_eval_n(n: int) -> None:
    """n held-out tasks must exist: 1 <= n <= EVAL_POOL."""
    if not 1 <= n <= EVAL_POOL:
        raise ValueError(
            f"n must be between 1 and {EVAL_POOL} (the held-out tasks eval:0..{EVAL_POOL - 1}), got {n}"
        )


def agent_sampler(agent: str, diffusion_sampler: str = DIFFUSION_SAMPLER) -> str:
    """`ar` for the AR agent; the diffusion agent's sampler, which must not be `ar`."""
    if agent not in AGENTS:
        raise ValueError(f"unknown agent '{agent}'; agents: {', '.join(AGENTS)}")
    if agent == "ar":
        return "ar"
    if diffusion_sampler == "ar":
        raise ValueError("the diffusion agent needs a diffusion sampler (fastdllm, bd3, ...), not 'ar'")
    return diffusion_sampler


def agent_options(agent: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options one agent decodes with: all of them for the diffusion agent, the shared
    sampling options only for the AR agent (so a block size never reaches `ar`)."""
    if agent == "ar":
        return {k: v for k, v in options.items() if k in SHARED_OPTIONS}
    return dict(options)


def model_policies(
    models: Mapping[str, tuple[Any, Any]],
    sampler: str,
    max_new_tokens: int,
    seed: int,
    options: Mapping[str, Any],
) -> tuple[dict[str, Policy], dict[str, dict[str, Any]]]:
    """Both agents on their (model, tokenizer): the AR agent decodes with `ar` and the shared
    options, the diffusion agent with `sampler` and all of them; each policy checked on the
    first held-out task's prompt before anything runs. Returns the policies and their settings."""
    first = start_messages(make_task("eval", 0).question.text)
    policies: dict[str, Policy] = {}
    settings: dict[str, dict[str, Any]] = {}
    for agent in AGENTS:
        name, opts = agent_sampler(agent, sampler), agent_options(agent, options)
        policy = ModelPolicy(*models[agent], name, max_new_tokens, seed, **opts)
        policy.check(first)
        policies[agent], settings[agent] = policy, {"sampler": name, "options": opts}
    return policies, settings


def evaluate_agents(
    policies: Mapping[str, Policy],
    n: int,
    max_rounds: int = 12,
    max_tokens: int = 2048,
    max_errors: int = 0,
    on_result: Callable[[str, AgentResult], None] | None = None,
) -> dict[str, list[AgentResult]]:
    """Run every policy on the held-out tasks eval:0..n-1, interleaved task by task (all
    policies on task k before task k + 1). Returns each policy's results in task order."""
    check_eval_n(n)
    out: dict[str, list[AgentResult]] = {name: [] for name in policies}
    for k in range(n):
        task = make_task("eval", k)
        for name, policy in policies.items():
            res = run_agent(task, policy, max_rounds, max_tokens, max_errors)
            out[name].append(res)
            if on_result is not None:
                on_result(name, res)
    return out


def summarize(results: list[AgentResult]) -> dict[str, Any]:
    """One agent's row: success rate, means per task, total wall time, failures by kind
    (every kind of FAILURE_KINDS listed, 0 included, so two rows always compare)."""
    if not results:
        raise ValueError("no results to summarize")

    def mean(key: str) -> float:
        return round(fmean(getattr(r, key) for r in results), 4)

    failures = dict.fromkeys(FAILURE_KINDS, 0)
    for r in results:
        kind = failure_kind(r.failure)
        if kind is not None:
            failures[kind] = failures.get(kind, 0) + 1
    solved = sum(r.success for r in results)
    return {
        "tasks": len(results),
        "solved": solved,
        "success_rate": round(solved / len(results), 4),
        "mean_tool_calls": mean("tool_calls"),
        "mean_rounds": mean("rounds"),
        "mean_tokens": mean("tokens"),
        "mean_nfe": mean("nfe"),
        "mean_seconds": mean("seconds"),
        "total_seconds": round(sum(r.seconds for r in results), 4),
        "failures": failures,
    }


def records(results: Mapping[str, list[AgentResult]]) -> list[dict[str, Any]]:
    """Per-task records in run order (task k: every agent, then k + 1), tagged with the agent."""
    n = max((len(v) for v in results.values()), default=0)
    return [
        {"agent": name, **rs[k].as_dict()} for k in range(n) for name, rs in results.items() if k < len(rs)
    ]


def machine(model: Any = None) -> dict[str, Any]:
    """Where the numbers were measured: CPU, cores, torch threads, device, load at the time."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    device = "cpu"
    if model is not None:
        dev = next(model.parameters()).device
        device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "torch": torch.__version__,
        "load_average": load,
    }


def markdown_table(summary: Mapping[str, Mapping[str, Any]], samplers: Mapping[str, str]) -> str:
    """The side-by-side table, one row per agent."""
    head = (
        "| agent | sampler | solved | success | tool calls | rounds | tokens | NFEs "
        "| wall s (mean) | wall s (total) | failures |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for name, s in summary.items():
        fails = ", ".join(f"{k} {v}" for k, v in s["failures"].items() if v) or "–"
        lines.append(
            f"| {name} | {samplers.get(name, '')} | {s['solved']}/{s['tasks']} "
            f"| {100 * s['success_rate']:.1f} % "
            f"| {s['mean_tool_calls']:.2f} | {s['mean_rounds']:.2f} | {s['mean_tokens']:.1f} "
            f"| {s['mean_nfe']:.1f} | {s['mean_seconds']:.2f} | {s['total_seconds']:.1f} | {fails} |"
        )
    return "\n".join(lines)
