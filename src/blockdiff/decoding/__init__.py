"""The decoding engine: one canvas loop, composable policies, every sampler as a named plan."""

from .canvas import Canvas, RowStats
from .engine import Decoding, GenerateOutput, StepEvent, generate, start_decoding
from .policies import Plan
from .samplers import SAMPLERS

__all__ = [
    "Canvas",
    "Decoding",
    "GenerateOutput",
    "Plan",
    "RowStats",
    "SAMPLERS",
    "StepEvent",
    "generate",
    "start_decoding",
]
