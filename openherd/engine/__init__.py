"""The llama.cpp engine: continuous batching over one loaded model.

Import from here; the submodules are implementation detail. Importing this
package does not load libllama (that happens on the first ``Engine.load``).
"""

from .engine import Engine, EngineConfig, EngineStats, RequestHandle
from .types import FinishEvent, GenerationRequest, GrammarSpec, SamplingParams, TokenEvent, TopLogprob, Usage

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineStats",
    "FinishEvent",
    "GenerationRequest",
    "GrammarSpec",
    "RequestHandle",
    "SamplingParams",
    "TokenEvent",
    "TopLogprob",
    "Usage",
]
