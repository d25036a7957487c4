"""One context policy: what happens when a conversation does not fit the model's window.

Every route and the personas meet an over-long conversation here, in
:func:`fit_messages` (a conversation) or :func:`fit_prompt` (a raw prompt). Each
front end keeps its own API's convention by choosing the policy:

* ``ERROR`` (OpenAI): nothing is dropped; the request is refused
  with ``context_length_exceeded`` (400) and the numbers: the window, the prompt,
  and what was asked for the completion.
* ``DROP_OLDEST`` (Ollama, personas): the oldest turns go first,
  never a system message and never the last message, and after a drop the
  conversation restarts at a user turn (strict templates, Llama's and Mistral's,
  refuse a history that opens with an assistant or a tool message). When only
  the last message is left and it still does not fit, the request is refused as
  under ERROR.

A prompt fits when it leaves room for the completion: ``max_tokens`` when the
request sets it, else ``reserve`` (at least one token: something must be
generated). That is the engine's own rule (``Engine.submit``), checked before
anything is submitted, so the error can name the route's numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ContextOverflow

__all__ = ["DROP_OLDEST", "ERROR", "ContextPolicy", "Fitted", "fit_messages", "fit_prompt", "overflow"]

Encode = Callable[[list[dict[str, Any]]], list[int]]  # messages -> prompt tokens (chat template)


@dataclass(frozen=True)
class ContextPolicy:
    drop_oldest: bool  # drop the oldest turns to fit (else refuse with the numbers)
    reserve: int = 1  # tokens kept free for the answer when the request sets no max_tokens

    def __post_init__(self):
        if self.reserve < 1:
            raise ValueError("reserve must be at least 1 token")


ERROR = ContextPolicy(drop_oldest=False)  # OpenAI: refuse with the numbers
DROP_OLDEST = ContextPolicy(drop_oldest=True)  # Ollama, personas: drop the oldest turns


@dataclass
class Fitted:
    prompt: list[int]
    messages: list[dict[str, Any]]  # what was encoded (the input, less what was dropped)
    dropped: int = 0  # messages left out, oldest first


def _room(max_tokens: int | None, policy: ContextPolicy) -> int:
    return max(1, max_tokens if max_tokens is not None else policy.reserve)


def overflow(n_prompt: int, n_ctx: int, max_tokens: int | None, what: str = "the prompt") -> ContextOverflow:
    """The 400 for a prompt that leaves no room, with the numbers."""
    if max_tokens is not None and n_prompt < n_ctx:
        return ContextOverflow(
            f"this model's context window is {n_ctx} tokens, but {n_prompt + max_tokens} were requested "
            f"({n_prompt} in {what}, {max_tokens} for the completion); reduce the prompt or max_tokens"
        )
    return ContextOverflow(
        f"{what} has {n_prompt} tokens but the context window is {n_ctx} tokens; "
        "shorten it or raise the context size (num_ctx / --ctx)"
    )


def fit_prompt(prompt: Sequence[int], n_ctx: int, max_tokens: int | None, policy: ContextPolicy = ERROR) -> list[int]:
    """A raw prompt (completions, generate) as is, or ContextOverflow: a raw prompt has no turns
    to drop, so every policy refuses it the same way."""
    if len(prompt) + _room(max_tokens, policy) > n_ctx:
        raise overflow(len(prompt), n_ctx, max_tokens)
    return list(prompt)


def _droppable(messages: Sequence[dict[str, Any]]) -> int | None:
    """Index of the oldest message that may go: not a system message, not the last one."""
    return next((i for i, m in enumerate(messages[:-1]) if m.get("role") not in ("system", "developer")), None)


def fit_messages(encode: Encode, messages: Sequence[dict[str, Any]], n_ctx: int, max_tokens: int | None,
                 policy: ContextPolicy) -> Fitted:
    """The conversation encoded so that it fits ``n_ctx`` with room for the answer, under ``policy``
    (see the module docstring); ContextOverflow with the numbers when it cannot."""
    kept = list(messages)
    room = _room(max_tokens, policy)
    dropped = 0
    while True:
        prompt = encode(kept)
        if len(prompt) + room <= n_ctx:
            return Fitted(prompt, kept, dropped)
        i = _droppable(kept) if policy.drop_oldest else None
        if i is None:
            raise overflow(len(prompt), n_ctx, max_tokens, "the conversation")
        del kept[i]
        dropped += 1
        # Restart the history at a user turn: drop what followed the dropped turn up to the next one.
        while (i < len(kept) - 1 and kept[i].get("role") not in ("user", "system", "developer")):
            del kept[i]
            dropped += 1
