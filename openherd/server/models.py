"""The model store over HTTP, in both APIs' shapes: what is stored, loaded, pulled, deleted.

Not the generation path (``pipeline.py``): these routes read the store and the
ModelManager. OpenAI's ``/v1/models`` lists store models and personas as model
ids; Ollama's ``/api/tags``, ``/api/show`` and ``/api/ps`` describe them as
Ollama does, ``/api/pull`` streams a download's progress as NDJSON and
``/api/delete`` unloads and removes a model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import HerdError, ModelNotFound
from ..store.manifest import is_valid_name, validate_name
from . import protocol as p
from .ollama import NDJSON, iso_time, ndjson_line, now_iso
from .personas import find_persona, list_personas
from .serving import EventStream, ServerState, error_in_stream, run_unless_disconnected

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.herd


# ============================================================================
# OpenAI: /v1/models, /v1/models/{id}
# ============================================================================


def _created(manifest) -> int:
    try:
        return int(datetime.fromisoformat(manifest.created_at.replace("Z", "+00:00")).timestamp())
    except (ValueError, AttributeError):
        return 0


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    state = _state(request)
    manifests = await run_in_threadpool(state.store.list)
    cards = [p.ModelCard(id=m.name, created=_created(m)) for m in manifests]
    cards += [p.ModelCard(**c) for c in (x.model_card() for x in await list_personas(state))]
    return Response(p.ModelList(data=cards).model_dump_json(), media_type="application/json")


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> Response:
    state = _state(request)
    if not is_valid_name(model_id):
        raise ModelNotFound(model_id, f"model '{model_id[:80]}' not found")
    manifest = await run_in_threadpool(state.store.get, model_id)
    if manifest is None:
        persona = await find_persona(state, model_id)
        if persona is None:
            raise ModelNotFound(model_id)
        return Response(p.ModelCard(**persona.model_card()).model_dump_json(), media_type="application/json")
    card = p.ModelCard(id=manifest.name, created=_created(manifest))
    return Response(card.model_dump_json(), media_type="application/json")


# ============================================================================
# Ollama: /api/tags, /api/show, /api/ps, /api/pull, /api/delete
# ============================================================================


def _parameter_size(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    if n >= 1e6:
        return f"{n / 1e6:.0f}M"
    if n >= 1e3:
        return f"{n / 1e3:.0f}K"
    return str(n)


def _details(m) -> dict:
    return {
        "parent_model": m.base or "",
        "format": m.format,
        "family": m.architecture,
        "families": [m.architecture] if m.architecture else None,
        "parameter_size": _parameter_size(m.parameters),
        "quantization_level": m.quantization,
    }


def _modified(m) -> str:
    return m.created_at or now_iso()


@router.get("/api/tags")
async def tags(request: Request) -> Response:
    manifests = await run_in_threadpool(_state(request).store.list)
    models = [
        {
            "name": m.name,
            "model": m.name,
            "modified_at": _modified(m),
            "size": m.size,
            "digest": m.sha256,
            "details": _details(m),
        }
        for m in manifests
    ]
    for persona in await list_personas(_state(request)):
        card = persona.model_card()
        models.append(
            {
                "name": persona.name,
                "model": persona.name,
                "modified_at": persona.updated_at or now_iso(),
                "size": 0,
                "digest": "",
                "details": {"parent_model": persona.served_model, "format": "persona", "family": "persona",
                            "families": None, "parameter_size": "", "quantization_level": ""},
                "herd": card["herd"],
            }
        )
    return JSONResponse({"models": models})


def _resolve(state: ServerState, name: str):
    validate_name(name)
    manifest = state.store.get(name)
    if manifest is None:
        raise ModelNotFound(name)
    return manifest


@router.post("/api/show")
async def show(request: Request) -> Response:
    state = _state(request)
    req = p.parse_request(p.OllamaShowRequest, await request.body())
    m = await run_in_threadpool(_resolve, state, req.model)
    arch = m.architecture or "llama"
    info: dict = {
        "general.architecture": arch,
        "general.parameter_count": m.parameters,
        f"{arch}.context_length": m.context_length,
    }
    for key, gguf_key in (
        ("block_count", "block_count"),
        ("embedding_length", "embedding_length"),
        ("head_count", "attention.head_count"),
        ("head_count_kv", "attention.head_count_kv"),
    ):
        if m.details.get(key):
            info[f"{arch}.{gguf_key}"] = m.details[key]
    if m.details.get("model_name"):
        info["general.name"] = m.details["model_name"]
    template = m.chat_template or ""
    modelfile = f"# Modelfile generated by openherd\nFROM {m.name}\n"
    if template:
        modelfile += f'TEMPLATE """{template}"""\n'
    body = {
        "license": m.details.get("license", ""),
        "modelfile": modelfile,
        "parameters": "",
        "template": template,
        "details": _details(m),
        "model_info": info,
        # Tools work with any chat model here (see tools.py); embeddings with any model.
        "capabilities": ["completion", "tools"],
        "modified_at": _modified(m),
    }
    return JSONResponse(body)


@router.get("/api/ps")
async def ps(request: Request) -> Response:
    models = []
    for lm in _state(request).manager.loaded():
        m = lm.manifest
        models.append(
            {
                "name": lm.name,
                "model": lm.name,
                "size": lm.size,
                "digest": getattr(m, "sha256", ""),
                "details": _details(m),
                "expires_at": iso_time(lm.expires_at),
                "size_vram": 0,  # llama.cpp CPU build: nothing in GPU memory
                "context_length": lm.engine.info.n_ctx,
            }
        )
    return JSONResponse({"models": models})


class _PullCancelled(Exception):
    pass


def _pullable(state: ServerState, name: str) -> str:
    """Over HTTP only catalog names and hub references can be pulled: a path would let a
    client import any file the server can read. (`herd pull PATH` is for local files.)"""
    from ..store.hub import is_hub_ref

    if is_hub_ref(name):
        return name
    validate_name(name)
    key = name[: -len(":latest")] if name.endswith(":latest") else name
    if key not in state.store.catalog:
        known = ", ".join(sorted(state.store.catalog)) or "none"
        raise ModelNotFound(
            name, f"model '{name}' is not in the catalog (known: {known}); or pull hf:OWNER/REPO/FILE.gguf"
        )
    return key


@router.post("/api/pull")
async def pull(request: Request) -> Response:
    state = _state(request)
    req = p.parse_request(p.OllamaPullRequest, await request.body())
    source = _pullable(state, req.model)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancelled = False

    def progress(ev) -> None:
        if cancelled:  # the client went away: stop the download between chunks
            raise _PullCancelled()
        line = {"status": ev.status}
        if ev.digest:
            line["digest"] = ev.digest
        if ev.total:
            line["total"], line["completed"] = ev.total, ev.completed
        loop.call_soon_threadsafe(queue.put_nowait, line)

    def work() -> None:
        state.store.pull(source, progress=progress)

    task = asyncio.ensure_future(run_in_threadpool(work))
    # A pull whose client left ends in _PullCancelled; nobody awaits it then.
    task.add_done_callback(lambda t: t.cancelled() or t.exception())

    if req.stream is False:
        try:
            await run_unless_disconnected(request, asyncio.shield(task))
        except BaseException:
            cancelled = True
            raise
        return JSONResponse({"status": "success"})

    async def stream() -> AsyncIterator[str]:
        nonlocal cancelled
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    line = getter.result()
                    yield ndjson_line(line)
                    if line["status"] == "success":
                        await task
                        return
                    continue
                getter.cancel()
                while not queue.empty():
                    yield ndjson_line(queue.get_nowait())
                exc = task.exception()
                if exc is not None:
                    raise exc
                return
        except Exception as e:
            err = e if isinstance(e, HerdError) else error_in_stream(e)
            yield ndjson_line({"error": err.message})
        finally:
            cancelled = True

    return EventStream(stream(), media_type=NDJSON)


@router.delete("/api/delete")
async def delete(request: Request) -> Response:
    state = _state(request)
    req = p.parse_request(p.OllamaDeleteRequest, await request.body())
    await state.unload(req.model)
    await run_in_threadpool(state.store.remove, req.model)
    return Response(status_code=200)
