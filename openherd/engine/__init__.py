"""The llama.cpp engine: continuous batching over one loaded model.

Import from here; the submodules are implementation detail. Importing this
package does not load libllama (that happens on the first ``Engine.load``).
"""

from .backend import Backend, Capabilities, Unsupported, load_backend
from .engine import Engine, RequestHandle
from .types import (
    EngineConfig,
    EngineStats,
    FinishEvent,
    GenerationRequest,
    GrammarSpec,
    ModelInfo,
    SamplingParams,
    TokenEvent,
    TopLogprob,
    Usage,
)

__all__ = [
    "Backend",
    "Capabilities",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "FinishEvent",
    "GenerationRequest",
    "GrammarSpec",
    "ModelInfo",
    "RequestHandle",
    "SamplingParams",
    "TokenEvent",
    "TopLogprob",
    "Unsupported",
    "Usage",
    "load_backend",
]
