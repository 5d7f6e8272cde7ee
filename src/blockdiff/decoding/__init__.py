"""The decoding engine: one canvas loop, composable policies, every sampler as a named plan."""

from .batch import decode_all
from .canvas import Canvas, RowStats
from .engine import Decoding, GenerateOutput, StepEvent, generate, row_seeds, start_decoding
from .policies import Plan
from .request import DEFAULT_SAMPLER, DecodeSpec
from .samplers import SAMPLERS

__all__ = [
    "Canvas",
    "DEFAULT_SAMPLER",
    "DecodeSpec",
    "Decoding",
    "GenerateOutput",
    "Plan",
    "RowStats",
    "SAMPLERS",
    "StepEvent",
    "decode_all",
    "generate",
    "row_seeds",
    "start_decoding",
]
