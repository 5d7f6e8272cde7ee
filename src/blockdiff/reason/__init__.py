"""Reasoning on top of decoding: stitching diffusion rollouts with a step scorer and an AR solver.

`steps.py` (texts as steps, rollouts, paths) ← `scorers.py` (step scorers) ← `stitch.py`
(sampling, stitching, the solver, the evaluation and the training data of the PRM and solver)."""

from .scorers import LogProbScorer, OracleScorer, PRMScorer, StepScorer, make_scorer
from .steps import Rollout, best_path, majority, path_score, split_steps
from .stitch import (
    Cost,
    Record,
    diffusion_completer,
    evaluate_stitching,
    mc_labels,
    sample_rollouts,
    solve,
    stitch_prompt,
    stitched_steps,
    summary,
)

__all__ = [
    "Cost",
    "LogProbScorer",
    "OracleScorer",
    "PRMScorer",
    "Record",
    "Rollout",
    "StepScorer",
    "best_path",
    "diffusion_completer",
    "evaluate_stitching",
    "majority",
    "make_scorer",
    "mc_labels",
    "path_score",
    "sample_rollouts",
    "solve",
    "split_steps",
    "stitch_prompt",
    "stitched_steps",
    "summary",
]
