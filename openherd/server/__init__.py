"""The HTTP server: OpenAI (``/v1``) and Ollama (``/api``) APIs over the native engine.

    protocol.py   pydantic request/response schemas (OpenAI's order, extensions marked)
    serving.py    the engine calls both front ends share (submit, stream, cancel, measure)
    openai.py     /v1: chat/completions, completions, embeddings, models
    ollama.py     /api: chat, generate, tags, show, ps, pull, delete, embed, version
    tools.py      tool calls: prompt injection, forced-call grammars, output parsing
    metrics.py    Prometheus text format
    personas.py   personas as model ids: persona lookup, input/output shields around a turn
    moderation.py the global safety policy (HERD_SAFETY), Llama Guard on the server's engines,
                  audit log, /v1/moderations
    app.py        build_app(settings): guards, error handlers, lifespan

``build_app`` is re-exported lazily so importing the schemas stays cheap.
"""

from __future__ import annotations

__all__ = ["build_app"]


def __getattr__(name: str):
    if name == "build_app":
        from .app import build_app

        return build_app
    raise AttributeError(name)
