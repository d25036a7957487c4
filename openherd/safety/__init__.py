"""Safety shields: steps in serving, never inside the model or engine.

* pii: detect and redact personal data and secrets, whole texts and streams
* llama_guard: Llama Guard 3 prompt, verdict parser and shield
* injection: prompt-injection heuristics for retrieved passages
* policy: the per-persona SafetyPolicy and the input/output pipeline
* audit: SQLite log of decisions (kinds and counts, never values)
"""

from __future__ import annotations

from .audit import AuditEntry, AuditLog
from .injection import InjectionReport, scan
from .llama_guard import LlamaGuardShield, Verdict, parse_verdict, render_prompt
from .pii import Finding, StreamRedactor, find_pii, redact
from .policy import (
    Decision,
    OutputGuard,
    SafetyPolicy,
    aapply_input,
    apply_input,
    apply_retrieved,
    check_output,
    merge_policies,
    refusal,
)

__all__ = [
    "AuditEntry",
    "AuditLog",
    "Decision",
    "Finding",
    "InjectionReport",
    "LlamaGuardShield",
    "OutputGuard",
    "SafetyPolicy",
    "StreamRedactor",
    "Verdict",
    "aapply_input",
    "apply_input",
    "merge_policies",
    "apply_retrieved",
    "check_output",
    "find_pii",
    "parse_verdict",
    "redact",
    "refusal",
    "render_prompt",
    "scan",
]
