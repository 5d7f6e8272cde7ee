"""The decoding engine: one canvas loop, composable policies, every sampler as a named plan."""

from .canvas import Canvas, RowStats
from .engine import GenerateOutput, generate
from .policies import Plan
from .samplers import SAMPLERS

__all__ = ["Canvas", "GenerateOutput", "Plan", "RowStats", "SAMPLERS", "generate"]
