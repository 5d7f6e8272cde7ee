"""The decoding engine: one canvas loop, composable policies, every sampler as a named plan."""

from .canvas import Canvas, RowStats
from .samplers import SAMPLERS, GenerateOutput, Plan, generate

__all__ = ["Canvas", "GenerateOutput", "Plan", "RowStats", "SAMPLERS", "generate"]
