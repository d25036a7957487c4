"""``POST /v1/moderations``: OpenAI's moderation endpoint, answered by the server's shields.

The shields themselves are ``moderation.py`` (and ``openherd.safety``); this module is the
route only, so the shields never depend on the HTTP layer that uses them.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..safety.policy import SafetyPolicy
from . import protocol as p
from .moderation import moderate
from .personas import find_persona
from .serving import ServerState, request_id

router = APIRouter()


@router.post("/v1/moderations")
async def moderations(request: Request) -> Response:
    state: ServerState = request.app.state.herd
    req = p.parse_request(p.ModerationRequest, await request.body())
    persona = await find_persona(state, req.model) if req.model else None
    # What a request to this persona (or any model) runs under; with no policy at all the
    # shields still run with their defaults (all PII kinds, the injection scan).
    policy = state.shields.effective(persona) or SafetyPolicy()
    results = [await moderate(state.shields, policy, text) for text in req.inputs()]
    model = req.model or policy.llama_guard or "openherd-shields"
    return JSONResponse({"id": request_id("modr"), "model": model, "results": results})
