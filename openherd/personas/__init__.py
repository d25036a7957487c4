"""Personas: a model, a character, its own documents, memory and safety policy, served as a model id.

    bundle.py     persona.yaml schema (typed, validated), PersonaStore (create/list/edit/rm), .herd export/import
    knowledge.py  document ingest (.txt .md .html .pdf), token chunking, hybrid BM25 + dense retrieval
    memory.py     conversations per persona (SQLite WAL), list and export
    runtime.py    PersonaRuntime: messages + retrieved passages + sampling -> an engine request
    chat.py       `herd chat PERSONA` (resume, --new, --resume ID, --list)
    api.py        the /v1/personas router

The server resolves a request's model id with ``PersonaStore(settings).lookup(model)``
(None for store models, which win) and runs the turn through ``PersonaRuntime``.
"""

from .bundle import Persona, PersonaExists, PersonaStore, validate_persona_name
from .memory import ConversationStore
from .runtime import PersonaRuntime, PreparedChat

__all__ = [
    "ConversationStore",
    "Persona",
    "PersonaExists",
    "PersonaRuntime",
    "PersonaStore",
    "PreparedChat",
    "validate_persona_name",
]
