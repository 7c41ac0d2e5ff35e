"""specdecode: lossless speculative decoding for Hugging Face causal LMs."""

from .engine import Engine
from . import auto  # noqa: F401 - registers method 'auto' with the engine
from .results import GenerationResult, GenerationStats, GenerationStream
from .errors import InvalidArgument, ModelLoadError, SpecDecodeError
from .sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "GenerationResult",
    "GenerationStats",
    "GenerationStream",
    "InvalidArgument",
    "ModelLoadError",
    "SamplingParams",
    "SpecDecodeError",
]
