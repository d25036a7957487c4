"""``/v1/conversations``: the chat sidebar's persisted conversations.

    GET    /v1/conversations?persona=P                     list, most recently active first
    POST   /v1/conversations                               {persona?, model?, title?} -> a new one
                                                           (a persona's opens with its greeting)
    GET    /v1/conversations/{id}?persona=P               the conversation and its turns
    PATCH  /v1/conversations/{id}?persona=P               {title}: rename
    DELETE /v1/conversations/{id}?persona=P               delete it and its turns
    POST   /v1/conversations/{id}/turns?persona=P         {role, content, meta?}: append one turn
    DELETE /v1/conversations/{id}/turns?persona=P&from=N  drop turns N.. (regenerate an answer)
    GET    /v1/conversations/{id}/export?persona=P&format=markdown|json

A persona's conversations live in its ``memory.db``: the very store `herd chat
PERSONA` resumes from (``personas.memory.ConversationStore``), so a chat started
in the browser continues in the terminal and the other way round. Chats with a
plain model (no persona) go to ``$HERD_HOME/conversations.db``, the same schema,
which `herd chat [MODEL] --list / --resume ID` reads. This module only translates
HTTP to ``ConversationStore`` calls; the schema and its SQL are memory.py's.

The chat endpoint stays stateless (OpenAI's API is): the page appends the user's
turn before it asks for the answer and the answer (or what was generated before
Stop) when the stream ends, exactly as `herd chat` writes its turns.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import InvalidRequest, NotFound
from ..personas.memory import (
    EXPORT_FORMATS,
    ROLES,
    Conversation,
    Turn,
    clean_title,
    conversations_exist,
    model_chats_db,
    open_conversations,
)
from ..settings import Settings

__all__ = ["conversation_json", "model_chats_db", "router", "turn_json"]

router = APIRouter(prefix="/v1/conversations")

MAX_META_BYTES = 64 * 1024  # sources and flags of one answer; far more than they take


def _settings(request: Request) -> Settings:
    return request.app.state.web.settings


def conversation_json(c: Conversation) -> dict[str, Any]:
    return {
        "id": c.id,
        "object": "conversation",
        "persona": c.persona or None,
        "model": c.model,
        "title": c.title,
        "turns": c.turns,
        "created_at": int(c.created_at),
        "updated_at": int(c.updated_at),
    }


def turn_json(t: Turn) -> dict[str, Any]:
    return {
        "seq": t.seq,
        "role": t.role,
        "content": t.content,
        "meta": t.meta,
        "created_at": int(t.created_at),
    }


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return data


# ----------------------------------------------------------------------------- endpoints


@router.get("")
async def list_conversations(request: Request, persona: str = "", limit: int = 200) -> Response:
    settings = _settings(request)
    if not 1 <= limit <= 1000:
        raise InvalidRequest("limit must be between 1 and 1000", param="limit")

    def rows() -> list[dict[str, Any]]:
        if not conversations_exist(settings, persona):
            return []
        with open_conversations(settings, persona) as mem:
            return [conversation_json(c) for c in mem.list(limit=limit)]

    return JSONResponse({"object": "list", "data": await run_in_threadpool(rows)})


@router.post("")
async def create_conversation(request: Request) -> Response:
    settings = _settings(request)
    data = await _body(request)
    persona = data.get("persona") or ""
    model = data.get("model") or ""
    if not isinstance(persona, str) or not isinstance(model, str) or len(model) > 300:
        raise InvalidRequest("persona and model must be names", param="persona")
    title = clean_title(data.get("title", ""))

    def create() -> dict[str, Any]:
        if persona:
            from ..personas.bundle import PersonaStore

            p = PersonaStore(settings).get(persona)
            served = p.served_model
        else:
            from ..store.manifest import validate_name

            if not model:
                raise InvalidRequest("name the model of the conversation", param="model")
            validate_name(model)
            p, served = None, model
        with open_conversations(settings, persona) as mem:
            conv = mem.new(title=title, model=served, greeting=p.greeting if p is not None else "")
            return {**conversation_json(conv), "messages": [turn_json(t) for t in mem.turns(conv.id)]}

    return JSONResponse(await run_in_threadpool(create), status_code=201)


@router.get("/{conv_id}")
async def get_conversation(conv_id: str, request: Request, persona: str = "") -> Response:
    settings = _settings(request)

    def read() -> dict[str, Any]:
        if not conversations_exist(settings, persona):
            raise NotFound(f"no conversation '{conv_id[:64]}'", param="conversation")
        with open_conversations(settings, persona) as mem:
            conv = mem.get(conv_id)
            return {**conversation_json(conv), "messages": [turn_json(t) for t in mem.turns(conv.id)]}

    return JSONResponse(await run_in_threadpool(read))


@router.patch("/{conv_id}")
async def rename_conversation(conv_id: str, request: Request, persona: str = "") -> Response:
    settings = _settings(request)
    data = await _body(request)
    if "title" not in data:
        raise InvalidRequest('send {"title": "..."}', param="title")
    title = clean_title(data["title"])

    def update() -> dict[str, Any]:
        with open_conversations(settings, persona) as mem:
            return conversation_json(mem.rename(conv_id, title))

    return JSONResponse(await run_in_threadpool(update))


@router.delete("/{conv_id}")
async def delete_conversation(conv_id: str, request: Request, persona: str = "") -> Response:
    settings = _settings(request)

    def delete() -> str:
        if not conversations_exist(settings, persona):
            raise NotFound(f"no conversation '{conv_id[:64]}'", param="conversation")
        with open_conversations(settings, persona) as mem:
            conv = mem.get(conv_id)
            mem.delete(conv.id)
            return conv.id

    removed = await run_in_threadpool(delete)
    return JSONResponse({"id": removed, "object": "conversation", "deleted": True})


@router.post("/{conv_id}/turns")
async def append_turn(conv_id: str, request: Request, persona: str = "") -> Response:
    settings = _settings(request)
    data = await _body(request)
    role, content, meta = data.get("role"), data.get("content"), data.get("meta") or {}
    if role not in ROLES:
        raise InvalidRequest(f"role must be one of {', '.join(ROLES)}", param="role")
    if not isinstance(content, str):
        raise InvalidRequest("content must be a string", param="content")
    if not isinstance(meta, dict) or len(json.dumps(meta)) > MAX_META_BYTES:
        raise InvalidRequest(f"meta must be a JSON object of at most {MAX_META_BYTES} bytes", param="meta")

    def append() -> dict[str, Any]:
        with open_conversations(settings, persona) as mem:
            conv = mem.get(conv_id)
            turn = mem.append(conv.id, role, content, meta)
            return {**turn_json(turn), "conversation": conversation_json(mem.get(conv.id))}

    return JSONResponse(await run_in_threadpool(append), status_code=201)


@router.delete("/{conv_id}/turns")
async def truncate_turns(conv_id: str, request: Request, persona: str = "") -> Response:
    settings = _settings(request)
    raw = request.query_params.get("from", "")
    if not raw.isdigit() or int(raw) < 1:
        raise InvalidRequest("give the first turn to drop: ?from=N (N >= 1)", param="from")
    from_seq = int(raw)

    def drop() -> dict[str, Any]:
        with open_conversations(settings, persona) as mem:
            conv = mem.truncate(conv_id, from_seq)
            return {**conversation_json(conv), "messages": [turn_json(t) for t in mem.turns(conv.id)]}

    return JSONResponse(await run_in_threadpool(drop))


@router.get("/{conv_id}/export")
async def export_conversation(
    conv_id: str, request: Request, persona: str = "", format: str = "markdown"
) -> Response:
    settings = _settings(request)
    if format not in EXPORT_FORMATS:
        raise InvalidRequest(f"format must be one of {', '.join(EXPORT_FORMATS)}", param="format")

    def export() -> tuple[str, str]:
        with open_conversations(settings, persona) as mem:
            conv = mem.get(conv_id)
            return conv.id, mem.export(conv.id, format)

    cid, text = await run_in_threadpool(export)
    ext, media = ("json", "application/json") if format == "json" else ("md", "text/markdown; charset=utf-8")
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", cid)  # ids are [0-9a-f-] when made here; a header takes no chances
    return Response(
        text,
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="conversation-{safe}.{ext}"'},
    )
