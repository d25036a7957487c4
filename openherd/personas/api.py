"""``/v1/personas``: persona CRUD over HTTP (an openherd extension, not an OpenAI API).

    GET    /v1/personas                               list
    POST   /v1/personas                               create (JSON: the persona.yaml fields; 201)
    GET    /v1/personas/{name}                        one persona
    PATCH  /v1/personas/{name}                        JSON merge patch (RFC 7386) of its fields
    DELETE /v1/personas/{name}                        remove it, its documents and conversations
    POST   /v1/personas/{name}/knowledge?filename=F   add a document (raw body: the file's bytes)
    DELETE /v1/personas/{name}/knowledge/{file}       remove a document
    GET    /v1/personas/{name}/export                 the .herd file
    POST   /v1/personas/import[?name=NEW]             install a .herd file (raw body; 201)
    GET    /v1/personas/{name}/conversations          conversations (memory) of the persona
    GET    /v1/personas/{name}/conversations/{id}?format=json|markdown

Errors are HerdErrors; the app's handlers turn them into OpenAI-shaped bodies.
Messages name personas and documents, never filesystem paths. Bodies are raw
bytes (no multipart dependency); their size is capped by HERD_MAX_BODY upstream.
Disk work runs in the thread pool so the event loop keeps streaming tokens.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from ..errors import HerdError, InvalidRequest
from ..settings import Settings, get_settings
from .bundle import Persona, PersonaStore, safe_file_name, validate_persona_name

log = logging.getLogger("openherd.personas")

router = APIRouter(prefix="/v1/personas")

HERD_MEDIA_TYPE = "application/vnd.openherd.persona+zip"


def _settings(request: Request) -> Settings:
    state = getattr(request.app.state, "herd", None)
    return getattr(state, "settings", None) or get_settings()


def _store(request: Request) -> PersonaStore:
    return PersonaStore(_settings(request))


def _json(persona: Persona) -> dict[str, Any]:
    return {"id": persona.name, "object": "persona", **persona.to_dict()}


async def _body_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"the request body is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return data


async def _acquire_for(request: Request):
    """acquire(name) -> Engine through the server's ModelManager, when there is one."""
    state = getattr(request.app.state, "herd", None)
    manager = getattr(state, "manager", None)
    if manager is None:
        return None

    async def acquire(name: str):
        engine = state.engine(name) if hasattr(state, "engine") else manager.acquire(name)
        engine = await engine
        return engine[0] if isinstance(engine, tuple) else engine  # ServerState.engine -> (engine, load_s)

    return acquire


# ----------------------------------------------------------------------------- CRUD


@router.get("")
async def list_personas(request: Request) -> Response:
    personas = await run_in_threadpool(_store(request).list)
    return JSONResponse({"object": "list", "data": [_json(p) for p in personas]})


@router.post("")
async def create_persona(request: Request) -> Response:
    data = await _body_json(request)
    if data.get("knowledge", {}).get("sources") if isinstance(data.get("knowledge"), dict) else False:
        raise InvalidRequest("add documents with POST /v1/personas/{name}/knowledge after creating the persona",
                             param="knowledge.sources")
    for key in ("created_at", "updated_at", "id", "object"):
        data.pop(key, None)
    persona = Persona.from_dict(data)
    store = _store(request)

    def create() -> Persona:
        store.check_new_name(persona.name)
        store.check_models(persona)
        return store.create(persona)

    created = await run_in_threadpool(create)
    return JSONResponse(_json(created), status_code=201)


@router.get("/{name}")
async def get_persona(name: str, request: Request) -> Response:
    persona = await run_in_threadpool(_store(request).get, name)
    return JSONResponse(_json(persona))


@router.patch("/{name}")
async def patch_persona(name: str, request: Request) -> Response:
    patch = await _body_json(request)
    for key in ("id", "object"):
        patch.pop(key, None)
    store = _store(request)

    def update() -> Persona:
        from .bundle import merge_patch

        current = store.get(name)
        if {"model", "adapter", "knowledge"} & set(patch):
            store.check_models(Persona.from_dict(merge_patch(current.to_dict(), patch)))
        return store.update(name, patch)

    return JSONResponse(_json(await run_in_threadpool(update)))


@router.delete("/{name}")
async def delete_persona(name: str, request: Request) -> Response:
    store = _store(request)
    removed = await run_in_threadpool(store.remove, name)
    from .runtime import forget_index

    forget_index(store.knowledge_db(removed))
    return JSONResponse({"id": removed, "object": "persona", "deleted": True})


# ----------------------------------------------------------------------------- knowledge


@router.post("/{name}/knowledge")
async def add_knowledge(name: str, request: Request, filename: str = "", title: str = "") -> Response:
    """The body is the document itself; ?filename= names it (.txt .md .html .pdf)."""
    from .knowledge import check_document

    if not filename:
        raise InvalidRequest("name the document: POST /v1/personas/{name}/knowledge?filename=notes.md",
                             param="filename")
    validate_persona_name(name)
    file = safe_file_name(filename)
    data = await request.body()
    if not data:
        raise InvalidRequest("the request body is empty; send the document's bytes", param="file")
    store = _store(request)
    await run_in_threadpool(store.get, name)  # 404 before the (possibly slow) extraction
    await run_in_threadpool(check_document, file, data)
    src = await run_in_threadpool(store.add_document, name, file, data, title)
    out: dict[str, Any] = {"object": "persona.document", "persona": name, "document": src.file,
                           "sha256": src.sha256, "size": src.size, "indexed": False}
    acquire = await _acquire_for(request)
    if acquire is not None:
        try:
            out.update(await _index_now(store, name, acquire))
        except HerdError as e:  # the document is stored; indexing happens again on first use
            log.warning("indexing persona %s after upload failed: %s", name, e.message)
            out["index_error"] = e.message
    return JSONResponse(out, status_code=201)


async def _index_now(store: PersonaStore, name: str, acquire) -> dict[str, Any]:
    from .runtime import PersonaRuntime

    persona = await run_in_threadpool(store.get, name)
    rt = PersonaRuntime(persona, acquire, store=store)
    engine, embedder = await rt._engines_async()
    report = await run_in_threadpool(rt.sync, engine, embedder)
    return {
        "indexed": True,
        "passages": report.chunks,
        "quarantined": [{"document": f, "chunk": i, "reasons": r} for f, i, r in report.flagged],
        **({"document_flags": [{"document": f, "reasons": r} for f, r in report.document_flags]}
           if report.document_flags else {}),
    }


@router.delete("/{name}/knowledge/{file}")
async def remove_knowledge(name: str, file: str, request: Request) -> Response:
    await run_in_threadpool(_store(request).remove_document, name, file)
    return JSONResponse({"object": "persona.document", "persona": name, "document": file, "deleted": True})


# ----------------------------------------------------------------------------- export / import


@router.get("/{name}/export")
async def export_persona(name: str, request: Request) -> Response:
    name = validate_persona_name(name)
    data = await run_in_threadpool(_store(request).export_bytes, name)
    return Response(data, media_type=HERD_MEDIA_TYPE,
                    headers={"Content-Disposition": f'attachment; filename="{name}.herd"'})


@router.post("/import")
async def import_persona(request: Request, name: str | None = None) -> Response:
    data = await request.body()
    if not data:
        raise InvalidRequest("the request body is empty; send a .herd file")
    result = await run_in_threadpool(_store(request).import_bytes, data, name)
    return JSONResponse(_json(result.persona), status_code=201)


# ----------------------------------------------------------------------------- conversations


@router.get("/{name}/conversations")
async def list_conversations(name: str, request: Request) -> Response:
    from .memory import ConversationStore

    store = _store(request)

    def rows() -> list[dict[str, Any]]:
        persona = store.get(name)
        if not store.memory_db(persona.name).is_file():
            return []
        with ConversationStore(store.memory_db(persona.name), persona.name) as mem:
            return [{"id": c.id, "object": "persona.conversation", "title": c.title, "turns": c.turns,
                     "created_at": int(c.created_at), "updated_at": int(c.updated_at)} for c in mem.list()]

    return JSONResponse({"object": "list", "data": await run_in_threadpool(rows)})


@router.get("/{name}/conversations/{conversation}")
async def export_conversation(name: str, conversation: str, request: Request, format: str = "json") -> Response:
    from ..errors import NotFound
    from .memory import ConversationStore

    store = _store(request)

    def export() -> str:
        persona = store.get(name)
        if not store.memory_db(persona.name).is_file():
            raise NotFound(f"persona '{persona.name}' has no conversations yet", param="conversation")
        with ConversationStore(store.memory_db(persona.name), persona.name) as mem:
            return mem.export(conversation, format)

    text = await run_in_threadpool(export)
    if format == "json":
        return Response(text, media_type="application/json")
    return PlainTextResponse(text, media_type="text/markdown; charset=utf-8")
