"""What a forward of n tokens per sequence costs on this machine, relative to one token's: the
cost model by which `spec` chooses its draft shape (`speculative.best_shape`).

Measured where it runs, not carried from another machine: the ratios depend on the CPU (AMX
tiles or not, its caches, its cores) and on the model as prepared (precision, kernels, an
unmerged delta's rank): an int4 forward of 8 tokens costs 1.5x one token's on a Xeon with AMX
tiles, 1.8-2.2x on an AMD EPYC without (BENCHMARKS.md). The first decode that needs it times
this model's forwards of 1..32 tokens over a 64-token cache (2-7 s on a 2-core CPU; a GPU is
synchronised around each) and keeps the table in the cache directory, keyed by the machine and
the model's shapes, so later runs (and a seed's sampled text) see the same table there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable

import torch

from .config import cache_dir
from .model import KVCache

WIDTHS = (1, 2, 4, 8, 16, 32)
METHOD = 1  # how `measure` times; raising it after a change re-measures every kept table


def curve(table: dict[int, float]) -> Callable[[int], float]:
    """tokens per sequence -> cost relative to one token's: the table interpolated in log2 of
    the width, linear past its widest."""
    xs = sorted(table)

    def cost(n: int) -> float:
        if n >= xs[-1]:
            slope = (table[xs[-1]] - table[xs[-2]]) / (xs[-1] - xs[-2])
            return (table[xs[-1]] + slope * (n - xs[-1])) / table[1]
        hi = next(x for x in xs if x >= n)
        lo = max(x for x in xs if x <= n)
        f = 0.0 if hi == lo else (math.log2(n) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
        return (table[lo] + f * (table[hi] - table[lo])) / table[1]

    return cost


def measure(model, widths=WIDTHS, rounds: int = 5, prefix: int = 64) -> dict[int, float]:
    """ms per forward of n new tokens over a cached prefix (batch 1) as spec feeds them: under an
    explicit mask, logits for every token (a verifying forward reads them for most of its rows;
    the LM head is a sixth of SmolLM2's weights). The fastest over `rounds` rounds through all
    widths (a burst of load spoils one round, not a width), each width timed twice after one
    untimed forward, as a decode runs one shape many times (a 4-bit model reads a different
    layout for one token than for several: cold, either looks slower)."""
    V, dev = model.config.vocab_size, next(model.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    gen = torch.Generator().manual_seed(0)
    cache = KVCache(model.config.num_hidden_layers)
    best = dict.fromkeys(widths, math.inf)
    with torch.no_grad():
        model(torch.randint(0, V, (1, prefix), generator=gen).to(dev), cache=cache, write_cache=True)
        xs = {n: torch.randint(0, V, (1, n), generator=gen).to(dev) for n in widths}
        masks = {n: torch.ones(1, 1, n, prefix + n, dtype=torch.bool).tril(prefix).to(dev) for n in widths}
        for _ in range(rounds):
            for n in widths:
                for i in range(3):
                    sync()
                    t = time.perf_counter()
                    model(xs[n], mask=masks[n], cache=cache, write_cache=False)
                    sync()
                    if i:
                        best[n] = min(best[n], (time.perf_counter() - t) * 1e3)
    return best


def _key(model) -> str:
    """The machine (CPU, the native kernels' build: `native._key`), threads, and the model as
    prepared: precision and the shapes of everything it holds (a delta's rank included)."""
    from . import native
    from .quant import tiles

    sizes = sorted((n, tuple(t.shape)) for n, t in [*model.named_parameters(), *model.named_buffers()])
    dev = next(model.parameters()).device
    where = (
        torch.cuda.get_device_name(dev) if dev.type == "cuda" else [native._key(), torch.get_num_threads()]
    )
    what = [METHOD, where, model.precision, tiles(), sizes]
    return hashlib.sha256(json.dumps(what, default=str).encode()).hexdigest()[:16]


def forward_cost(model) -> Callable[[int], float] | None:
    """This model's cost curve on this machine (measured once, then read from the cache
    directory); None for models not prepared for inference (`runtime.prepare`: training
    modules, tests' models), whose spec drafts as told."""
    if getattr(model, "precision", None) is None:
        return None
    if "_costs" not in model.__dict__:
        model.__dict__["_costs"] = _table(model)
    return curve(model.__dict__["_costs"])


def _table(model) -> dict[int, float]:
    """The table kept for this machine and model, else one measured now and kept beside the
    others (a file that does not parse is replaced)."""
    path, key = cache_dir() / "costs.json", _key(model)
    try:
        known = json.loads(path.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    try:
        table = {int(n): float(v) for n, v in known[key].items()}
        if set(table) == set(WIDTHS) and min(table.values()) > 0:
            return table
    except (KeyError, AttributeError, TypeError, ValueError):
        pass
    table = known[key] = measure(model)
    try:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache: measured again next time
    return table
