"""The shape of the package: every module on a floor, imports only downwards or sideways, and no
import cycle (read from the source with `ast`, function-level imports included)."""

import ast
from pathlib import Path

import blockdiff

ROOT = Path(next(iter(blockdiff.__path__)))  # a namespace package: no __init__.py

# Lowest first. A module may import from its own floor or below, never from above.
FLOORS = [
    {"config", "tokenizer", "quant", "native"},
    {"model", "delta"},
    {"masks", "runtime", "convert", "costs"},
    {"noise", "checkpoint", "sharding"},
    {"objectives", "trainer_state", "data"},
    {"hub"},
    {"models", "recipe", "schedule"},
    {"decoding", "train"},
    {"eval", "export", "agent", "distill"},
    {"reason", "experiments"},
    {"serve"},
    {"cli", "__main__"},
]
FLOOR = {name: i for i, names in enumerate(FLOORS) for name in names}


def imports() -> dict[str, set[str]]:
    """Module -> blockdiff modules it imports (full dotted names)."""
    out: dict[str, set[str]] = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        mod = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        pkg = mod.split(".") if p.name == "__init__.py" else mod.split(".")[:-1]
        got = out.setdefault(mod, set())
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.ImportFrom) and n.level:
                base = ".".join(pkg[: len(pkg) - n.level + 1])
                if n.module:
                    got.add(f"{base}.{n.module}")
                else:
                    got |= {f"{base}.{a.name}" for a in n.names}
            elif isinstance(n, ast.ImportFrom) and (n.module or "").startswith("blockdiff"):
                got.add(n.module)
            elif isinstance(n, ast.Import):
                got |= {a.name for a in n.names if a.name.startswith("blockdiff")}
    return out


def floor(mod: str) -> int:
    top = mod.split(".")[1] if "." in mod else ""
    assert top in FLOOR, f"{mod}: put its top-level name '{top}' on a floor in tests/test_layers.py"
    return FLOOR[top]


def test_no_import_runs_upwards():
    up = [
        f"{m} (floor {floor(m)}) imports {t} (floor {floor(t)})"
        for m, ts in imports().items()
        if m != "blockdiff"
        for t in ts
        if t != "blockdiff" and floor(t) > floor(m)
    ]
    assert not up, "\n".join(up)


def test_no_import_cycles():
    g = imports()
    known = set(g)

    def resolve(t: str) -> str | None:  # "pkg.mod.name" may name a module or a name in a module
        while t and t not in known:
            t = t.rpartition(".")[0]
        return t or None

    graph = {m: {r for t in ts if (r := resolve(t)) and r != m} for m, ts in g.items()}
    # a package's __init__ re-exports its modules: an edge into a package is not a cycle through it
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t) :] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
