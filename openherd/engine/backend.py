"""The backend seam: what serving, personas and evals need from a model runtime.

Everything above this seam (``openherd.server``, ``openherd.personas``,
``openherd.evals``) types its ``engine`` parameters as :class:`Backend` and
never imports a runtime (``llama_cpp``, or the modules that bind it); the
llama.cpp engine (``openherd.engine.engine.Engine``) is the first
implementation, and :func:`load_backend` is how the layers above open one
outside the server (where the ``ModelManager`` does it).

A backend declares what it can do in :class:`Capabilities`. A request that
needs what the backend lacks (a grammar, logprobs, embeddings, a LoRA
adapter) gets a 400 naming both, from :func:`require`, before anything is
submitted, rather than an engine error halfway through.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..errors import Unsupported
from .types import (
    Capabilities,
    EngineConfig,
    EngineStats,
    FinishEvent,
    GenerationRequest,
    ModelInfo,
    TokenEvent,
)

if TYPE_CHECKING:
    from ..chat_template import ChatTemplate

__all__ = ["Backend", "Capabilities", "RequestStream", "Unsupported", "load_backend", "require"]


def require(backend: Backend, capability: str, param: str | None = None) -> None:
    """Raise :class:`Unsupported`, naming the backend and the capability, unless the backend has it."""
    if not getattr(backend.capabilities, capability):
        raise Unsupported(
            f"the {backend.kind} backend serving '{backend.info.name}' does not support {capability}; "
            f"it supports: {', '.join(backend.capabilities.names()) or 'plain generation only'}",
            param=param,
        )


class RequestStream(Protocol):
    """One submitted request: its events (sync or async, ending with one FinishEvent), or cancel."""

    def cancel(self) -> None: ...

    def __iter__(self) -> Iterator[TokenEvent | FinishEvent]: ...

    def __aiter__(self) -> AsyncIterator[TokenEvent | FinishEvent]: ...

    def result(self) -> tuple[str, FinishEvent]: ...


@runtime_checkable
class Backend(Protocol):
    """A loaded model that generates, tokenizes, embeds and scores."""

    kind: str  # the runtime's name in errors and /metrics ("llama.cpp")
    info: ModelInfo  # the model: vocabulary, context, special tokens
    template: ChatTemplate  # the model's own chat template
    config: EngineConfig  # context, parallel sequences, queue depth, adapter
    capabilities: Capabilities

    # ---- generation: submit, stream, cancel
    def submit(self, req: GenerationRequest) -> RequestStream: ...

    def submit_many(self, reqs: Sequence[GenerationRequest]) -> list[RequestStream]:
        """Admit every request together (a scoring wave shares its prefix), all or none."""
        ...

    # ---- tokens and chat encoding
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]: ...

    def detokenize(self, tokens: list[int]) -> str: ...

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None, **extra: Any) -> list[int]: ...

    # ---- embeddings and scoring
    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]: ...

    def score_many(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]: ...

    # ---- info, stats, lifecycle
    def stats(self) -> EngineStats: ...

    def close(self) -> None: ...


def load_backend(path: str, config: EngineConfig | None = None, name: str = "") -> Backend:
    """Open a model file on the llama.cpp backend (the terminal and evals; the server's
    ModelManager loads its own). The runtime is imported here, below the seam."""
    from .engine import Engine

    return Engine.load(path, config, name=name)
