"""blockdiff: train, adapt, import, generate with every sampler, evaluate and export block-diffusion
language models. `blockdiff COMMAND --help` for each command.

Each face is a module (train, decode, evaluate, data, agent, reason) with its commands and an
`add(sub)` that declares their arguments; the work itself lives in the features they call."""

from __future__ import annotations

import argparse
import sys

import torch

from ..config import BlockdiffError
from . import agent, data, decode, evaluate, reason, train

FACES = (train, decode, evaluate, data, agent, reason)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blockdiff", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for face in FACES:
        face.add(sub)
    return p


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


__all__ = ["build_parser", "main"]
