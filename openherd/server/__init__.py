"""The HTTP server: OpenAI (``/v1``) and Ollama (``/api``) APIs over the native engine.

    protocol.py    pydantic request/response schemas (OpenAI's order, extensions marked)
    pipeline.py    the one native pipeline: request parsed -> choice deltas ready to render
    serving.py     the engine calls under it (submit, stream, cancel, measure), ServerState
    openai.py      /v1 translation: chat/completions, completions, embeddings (SSE, JSON)
    ollama.py      /api translation: chat, generate, embed, version (NDJSON, JSON)
    models.py      the model store over HTTP: /v1/models, /api/tags, show, ps, pull, delete
    tools.py       tool calls: prompt injection, forced-call grammars, output parsing
    metrics.py     Prometheus text format
    personas.py    personas as model ids: persona lookup, input/output shields around a turn
    moderation.py  the global safety policy (HERD_SAFETY), Llama Guard bound to injected engines, audit log
    moderations.py /v1/moderations
    app.py         build_app(settings): guards, error handlers, lifespan

``build_app`` is re-exported lazily so importing the schemas stays cheap.
"""

from __future__ import annotations

__all__ = ["build_app"]


def __getattr__(name: str):
    if name == "build_app":
        from .app import build_app

        return build_app
    raise AttributeError(name)
