"""Render a model's own chat template, sandboxed.

Chat templates ship inside model files (GGUF ``tokenizer.chat_template``), so
they are untrusted code. They run in Jinja2's ``ImmutableSandboxedEnvironment``:
no attribute access to Python internals, no mutation of passed-in objects. The
environment matches what Hugging Face ``apply_chat_template`` provides
(``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, ``strftime_now``,
``tojson``), because templates are written against that runtime.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InvalidModelFile, InvalidRequest

# Used when a model carries no template (base models, some conversions). ChatML is
# what SmolLM2/Qwen use and what most fine-tuning data is formatted as.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _TemplateRaise(Exception):
    pass


def _raise_exception(message: str):
    raise _TemplateRaise(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    # HF's tojson does not HTML-escape (Jinja's built-in one does), which changes tokens.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise InvalidModelFile(f"the model's chat template does not compile: {e}") from None


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = ""):
        self.source = source or CHATML_TEMPLATE
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = _compile(self.source)

    def render(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        ctx = dict(
            messages=[_normalise(m) for m in messages],
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            add_generation_prompt=add_generation_prompt,
            **extra,
        )
        if tools:
            ctx["tools"] = tools
        try:
            return self._template.render(**ctx)
        except _TemplateRaise as e:
            # The template itself rejected the conversation (e.g. roles must alternate).
            raise InvalidRequest(f"the model's chat template rejected these messages: {e}") from None
        except TemplateError as e:
            raise InvalidRequest(f"could not render the model's chat template: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise InvalidRequest(f"could not render the model's chat template: {e}") from None


def _normalise(message: dict) -> dict:
    """OpenAI text parts -> plain string; templates expect `content` to be a string."""
    m = dict(message)
    content = m.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                texts.append(part)
            else:
                raise InvalidRequest("only text content parts are supported", param="messages")
        m["content"] = "".join(texts)
    elif content is None:
        m["content"] = "" if not m.get("tool_calls") else None
    return m
