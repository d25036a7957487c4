"""The OpenAPI description of the server, request bodies included.

The routes read their bodies themselves (``protocol.parse_request`` and the small JSON
readers of the web, persona and job routes), so FastAPI's generated schema knows their
paths and query parameters but not what they take. ``openapi(app)`` adds the bodies:
the pydantic models of protocol.py for the OpenAI and Ollama routes, and small JSON
schemas for the rest, so that a client generator, or a fuzzer (tests/test_fuzz_schemathesis.py),
reaches the code behind each route rather than stopping at "body must be a JSON object".
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from . import protocol as p

_REF = "#/components/schemas/{model}"

# (path, method) -> the pydantic model its body is parsed into.
PROTOCOL_BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("/v1/chat/completions", "post"): p.ChatCompletionRequest,
    ("/v1/completions", "post"): p.CompletionRequest,
    ("/v1/embeddings", "post"): p.EmbeddingRequest,
    ("/v1/moderations", "post"): p.ModerationRequest,
    ("/api/chat", "post"): p.OllamaChatRequest,
    ("/api/generate", "post"): p.OllamaGenerateRequest,
    ("/api/show", "post"): p.OllamaShowRequest,
    ("/api/pull", "post"): p.OllamaPullRequest,
    ("/api/delete", "delete"): p.OllamaDeleteRequest,
    ("/api/embed", "post"): p.OllamaEmbedRequest,
    ("/api/embeddings", "post"): p.OllamaEmbeddingsRequest,
}

_NAME = {"type": "string", "maxLength": 64}
_TEXT = {"type": "string", "maxLength": 2000}
_SAMPLING = {
    "type": "object",
    "properties": {
        "temperature": {"type": "number"},
        "top_p": {"type": "number"},
        "max_tokens": {"type": "integer"},
    },
}
_PERSONA_FIELDS = {
    "name": _NAME,
    "model": _NAME,
    "description": _TEXT,
    "version": {"type": "string", "maxLength": 64},
    "system": _TEXT,
    "greeting": _TEXT,
    "examples": {
        "type": "array",
        "maxItems": 4,
        "items": {"type": "object", "properties": {"user": _TEXT, "assistant": _TEXT}},
    },
    "sampling": _SAMPLING,
}

# The other JSON bodies, as their routes read them (personas/api.py, web/*.py).
JSON_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("/v1/personas", "post"): {"type": "object", "required": ["name", "model"], "properties": _PERSONA_FIELDS},
    ("/v1/personas/{name}", "patch"): {"type": "object", "properties": _PERSONA_FIELDS},
    ("/v1/session", "post"): {"type": "object", "required": ["api_key"], "properties": {"api_key": _TEXT}},
    ("/v1/conversations", "post"): {
        "type": "object",
        "properties": {"model": _NAME, "persona": _NAME, "title": _TEXT},
    },
    ("/v1/conversations/{conv_id}", "patch"): {
        "type": "object", "required": ["title"], "properties": {"title": _TEXT},
    },
    ("/v1/conversations/{conv_id}/turns", "post"): {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]},
            "content": _TEXT,
            "meta": {"type": "object"},
        },
    },
    ("/v1/jobs/eval", "post"): {
        "type": "object",
        "required": ["task", "models"],
        "properties": {
            "task": _NAME,
            "models": {"type": "array", "items": _NAME, "maxItems": 4},
            "limit": {"type": "integer"},
            "fewshot": {"type": "integer"},
        },
    },
}

# Bodies that are not JSON: the bytes themselves.
RAW_BODIES: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {
    ("/v1/jobs/tune", "post"): ("text/plain", {"type": "string", "maxLength": 4000}),  # JSONL
    ("/v1/personas/{name}/knowledge", "post"): ("text/plain", {"type": "string", "maxLength": 4000}),
    ("/v1/personas/import", "post"): ("application/octet-stream", {"type": "string", "format": "binary"}),
}

# OpenAPI links: what a create returns (its "id") names the resource of the next calls,
# so that a client (or schemathesis's stateful phase) can follow create -> use -> delete.
# (path, method, status) -> {link name: (path, method, parameter)}
LINKS: dict[tuple[str, str, str], dict[str, tuple[str, str, str]]] = {
    ("/v1/personas", "post", "201"): {
        "GetPersona": ("/v1/personas/{name}", "get", "name"),
        "PatchPersona": ("/v1/personas/{name}", "patch", "name"),
        "AddKnowledge": ("/v1/personas/{name}/knowledge", "post", "name"),
        "ExportPersona": ("/v1/personas/{name}/export", "get", "name"),
        "PersonaConversations": ("/v1/personas/{name}/conversations", "get", "name"),
        "DeletePersona": ("/v1/personas/{name}", "delete", "name"),
    },
    ("/v1/conversations", "post", "201"): {
        "GetConversation": ("/v1/conversations/{conv_id}", "get", "conv_id"),
        "RenameConversation": ("/v1/conversations/{conv_id}", "patch", "conv_id"),
        "AddTurn": ("/v1/conversations/{conv_id}/turns", "post", "conv_id"),
        "ExportConversation": ("/v1/conversations/{conv_id}/export", "get", "conv_id"),
        "ClearTurns": ("/v1/conversations/{conv_id}/turns", "delete", "conv_id"),
        "DeleteConversation": ("/v1/conversations/{conv_id}", "delete", "conv_id"),
    },
}

# Query parameters that /v1/jobs/tune reads from request.query_params itself.
TUNE_QUERY = ["base", "out", "epochs", "max_steps", "lr", "rank", "seed", "pack"]


def openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema of ``app`` with every request body described."""
    schema = copy.deepcopy(app.openapi())
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    paths = schema["paths"]

    def body(path: str, method: str, content_type: str, body_schema: dict[str, Any]) -> None:
        op = paths.get(path, {}).get(method)
        if op is not None:
            op["requestBody"] = {"required": True, "content": {content_type: {"schema": body_schema}}}

    for (path, method), model in PROTOCOL_BODIES.items():
        js = model.model_json_schema(ref_template=_REF)
        components.update(js.pop("$defs", {}))
        components[model.__name__] = js
        body(path, method, "application/json", {"$ref": _REF.format(model=model.__name__)})
    for (path, method), js in JSON_BODIES.items():
        body(path, method, "application/json", js)
    for (path, method), (content_type, js) in RAW_BODIES.items():
        body(path, method, content_type, js)
    for (path, method, status), links in LINKS.items():
        op = paths.get(path, {}).get(method)
        if op is None:
            continue
        response = op.setdefault("responses", {}).setdefault(status, {"description": "Created"})
        response["links"] = {
            name: {"operationId": paths[to][to_method]["operationId"], "parameters": {param: "$response.body#/id"}}
            for name, (to, to_method, param) in links.items()
            if to_method in paths.get(to, {})
        }
    tune = paths.get("/v1/jobs/tune", {}).get("post")
    if tune is not None:
        tune["parameters"] = [
            {"name": n, "in": "query", "required": n in ("base", "out"), "schema": {"type": "string"}}
            for n in TUNE_QUERY
        ]
    return schema
