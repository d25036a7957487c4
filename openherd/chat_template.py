"""Render a model's own chat template, sandboxed.

Chat templates ship inside model files (GGUF ``tokenizer.chat_template``), so
they are untrusted code. They run in Jinja2's ``ImmutableSandboxedEnvironment``:
no attribute access to Python internals, no mutation of passed-in objects. The
environment matches what Hugging Face ``apply_chat_template`` provides
(``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, ``strftime_now``,
``tojson``), because templates are written against that runtime.

The sandbox stops escapes, not loops: a template may recurse, nest ``range`` loops or
build a 20 MB string, and each request that renders it pays. So rendering has a budget,
``RENDER_SECONDS`` of time (checked on every line of the compiled template) and
``MAX_RENDER_CHARS`` of output (counted as it streams, before any tokenising), and
``*``, ``**`` and ``+`` refuse results past that size before computing them.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError, nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ContextOverflow, InvalidModelFile, InvalidRequest

RENDER_SECONDS = 2.0  # real templates render in well under 10 ms
# About 250k tokens: past any context herd serves, so a longer prompt could only be refused
# after tokenising it, which for 20 MB took 10-24 s.
MAX_RENDER_CHARS = 1 << 20
_TEMPLATE_FILE = "<template>"  # co_filename of the code Jinja compiles from_string templates to

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


class _OverBudget(Exception):
    pass


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else 0


class _BudgetedCodeGenerator(CodeGenerator):
    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        # "a ~ b" compiles to runtime.str_join, out of the sandbox's reach: route it through
        # the environment, so that "{% set ns.s = ns.s ~ ns.s %}" in a loop cannot double a
        # string into gigabytes between two checks of the clock.
        self.write("environment.concat_checked((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _BudgetedEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _BudgetedCodeGenerator
    # Intercepted operators are also kept out of compile-time constant folding, where
    # "{{ 9 ** 9 ** 9 }}" would hang the compile itself.
    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def concat_checked(self, parts: tuple[Any, ...]) -> str:
        texts = [str(p) for p in parts]
        if sum(map(len, texts)) > MAX_RENDER_CHARS:
            raise _too_long()
        return "".join(texts)

    def call(self, __context, __obj, *args: Any, **kwargs: Any) -> Any:
        # Sizes passed to filters and methods ("x"|center(10**9), "%*d"-style widths) would
        # build their result before any check could see it.
        for v in (*args, *kwargs.values()):
            if isinstance(v, int) and not isinstance(v, bool) and v > MAX_RENDER_CHARS:
                raise _too_long()
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            if right * left.bit_length() > 64 * MAX_RENDER_CHARS:
                raise _OverBudget(f"computes {left} ** {right}")
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(n, int) and _size(seq) * n > MAX_RENDER_CHARS:
                    raise _too_long()
        elif operator == "+" and _size(left) + _size(right) > MAX_RENDER_CHARS:
            raise _too_long()  # long messages, or a template doubling a string
        elif operator == "%" and isinstance(left, str):
            values = right if isinstance(right, tuple) else (right,)
            if any(isinstance(v, int) and v > MAX_RENDER_CHARS for v in values):
                raise _too_long()  # "%*s" % (10**9, "x")
        return super().call_binop(context, operator, left, right)


def _too_long() -> ContextOverflow:
    return ContextOverflow(
        f"the chat template renders these messages to more than {MAX_RENDER_CHARS} characters, "
        "more than any context holds; send less"
    )


def _size_checked(f):
    @functools.wraps(f)  # keeps jinja_pass_arg (pass_context and the like)
    def checked(*args: Any, **kwargs: Any) -> Any:
        for v in (*args, *kwargs.values()):
            if isinstance(v, int) and not isinstance(v, bool) and v > MAX_RENDER_CHARS:
                raise _too_long()
        return f(*args, **kwargs)

    return checked


def _deadline_tracer(deadline: float):
    """A sys.settrace function that raises _OverBudget on the first line of template code
    run after ``deadline``. Only frames of compiled template code get the line tracer, so
    the cost is one call per Python function entered while rendering."""

    def on_line(frame, event, arg):
        if event == "line" and time.monotonic() > deadline:
            raise _OverBudget(f"ran for more than {RENDER_SECONDS:g} s")
        return on_line

    def on_call(frame, event, arg):
        return on_line if frame.f_code.co_filename == _TEMPLATE_FILE else None

    return on_call


@lru_cache(maxsize=32)
def _compile(source: str):
    env = _BudgetedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    # Compiled templates call filters directly, not through the sandbox's call(): check
    # their sizes here too ("x"|center(10**9) builds a gigabyte before returning).
    env.filters = {name: _size_checked(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise InvalidModelFile(f"the model's chat template does not compile: {e}") from None
    except (SyntaxError, RecursionError, MemoryError, ValueError) as e:
        # Jinja passes some templates through to Python's compiler unchecked ("{% break %}"
        # outside a loop, found by tests/test_fuzz_formats.py); they fail there.
        problem = e.msg if isinstance(e, SyntaxError) else type(e).__name__
        raise InvalidModelFile(f"the model's chat template does not compile: {problem}") from None


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
            return self._render_budgeted(ctx)
        except _OverBudget as e:
            raise InvalidModelFile(f"the model's chat template {e}; refusing to render it") from None
        except RecursionError:
            raise InvalidModelFile("the model's chat template recurses too deeply") from None
        except (OverflowError, MemoryError) as e:  # the sandbox's range() limit, a huge join
            raise InvalidModelFile(f"the model's chat template is too costly to render ({e})") from None
        except _TemplateRaise as e:
            # The template itself rejected the conversation (e.g. roles must alternate).
            raise InvalidRequest(f"the model's chat template rejected these messages: {e}") from None
        except TemplateError as e:
            raise InvalidRequest(f"could not render the model's chat template: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise InvalidRequest(f"could not render the model's chat template: {e}") from None


    def _render_budgeted(self, ctx: dict[str, Any]) -> str:
        """Render as a stream: output is counted as it comes, time by the tracer."""
        previous = sys.gettrace()  # a debugger's or coverage's, restored after
        sys.settrace(_deadline_tracer(time.monotonic() + RENDER_SECONDS))
        try:
            parts: list[str] = []
            total = 0
            for chunk in self._template.generate(**ctx):
                total += len(chunk)
                if total > MAX_RENDER_CHARS:
                    raise _too_long()
                parts.append(chunk)
            return "".join(parts)
        finally:
            sys.settrace(previous)


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
