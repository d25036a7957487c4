"""Parsers for text that comes from outside: JSON and YAML with limits on depth, numbers and characters.

Python's own parsers have three failure modes that a few hundred hostile bytes can reach,
and none of them is a clean parse error:

* Depth. ``json.loads`` recurses per level and raises ``RecursionError`` (not a
  ``ValueError``); PyYAML's scanner does work per token that grows with the nesting
  depth, so a 100,000-deep document (200 KB) runs for minutes. Depth is measured here in
  one linear pass over the text *before* either parser sees it.
* Integers. ``int()`` refuses strings over 4,300 digits with a ``ValueError`` that
  ``json.loads`` and YAML's constructor let through (CVE-2020-10735). No field anywhere
  takes more than an int64, so a much lower limit costs nothing.
* Lone surrogates. ``"\\ud800"`` is valid JSON and decodes to a ``str`` that cannot be
  encoded as UTF-8, so it fails later, wherever the text is written, logged or tokenised.

Every refusal is an ``InvalidRequest`` (400) whose message starts with ``what`` (``"the
request body"``, ``"data.jsonl:3"``), so callers need no handling of their own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from itertools import accumulate
from typing import Any

from .errors import InvalidRequest

MAX_DEPTH = 64  # arrays/objects (or YAML collections) inside each other; real documents use < 10
MAX_INT_DIGITS = 1000  # far above int64 (19), far below int()'s 4,300 limit and its quadratic cost
MAX_YAML_EVENTS = 200_000  # YAML nodes; 1 MB of "[1, 1, ...]" is 500k, a persona is < 1,000

__all__ = [
    "MAX_DEPTH",
    "MAX_INT_DIGITS",
    "BadYAML",
    "JSONRefused",
    "NotJSON",
    "check_json",
    "find_surrogate",
    "compose_yaml",
    "loads_json",
    "load_yaml",
]

# A JSON string, unrolled so that the regex engine loops instead of backtracking.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DELTA = {"[": 1, "{": 1, "]": -1, "}": -1}
# Only text with one of these escapes, or a raw surrogate (a str from outside UTF-8, such
# as a surrogateescape'd argv), can decode to a lone surrogate: without either, the walk
# over the parsed value is skipped.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class JSONRefused(InvalidRequest):
    """JSON with a hazard in it. ``problem`` is the part after ``what``, for callers that
    name the place themselves ("data.jsonl:3: nested more than 64 levels deep")."""

    def __init__(self, what: str, problem: str):
        super().__init__(f"{what}: {problem}")
        self.problem = problem


class NotJSON(InvalidRequest):
    """Text that is not JSON at all, as opposed to JSON with a hazard in it. ``problem`` is
    the parser's own words ("Expecting value"), for callers that word the message themselves."""

    def __init__(self, message: str, problem: str):
        super().__init__(message)
        self.problem = problem


def bracket_depth(text: str, *, json_strings: bool = True) -> int:
    """The deepest nesting of [] and {} (outside JSON strings, unless ``json_strings`` is
    false), in C-speed passes. Unbalanced closers count as 0, so broken text can only look
    deeper than it is, never shallower."""
    if json_strings:
        text = _JSON_STRING.sub("", text)
    brackets = _NOT_BRACKET.sub("", text)
    return max(accumulate(map(_DELTA.__getitem__, brackets), lambda d, x: max(d + x, 0)), default=0)


def _check_depth(text: str, what: str) -> None:
    # No deeper than its number of openers: the common case, without a pass of its own.
    if text.count("[") + text.count("{") > MAX_DEPTH and bracket_depth(text) > MAX_DEPTH:
        raise JSONRefused(what, f"nested more than {MAX_DEPTH} levels deep")


def _int_parser(what: str) -> Callable[[str], int]:
    def parse_int(digits: str) -> int:
        if len(digits.lstrip("-")) > MAX_INT_DIGITS:
            raise JSONRefused(what, f"a number longer than {MAX_INT_DIGITS} digits")
        return int(digits)

    return parse_int


def _float_parser(what: str) -> Callable[[str], float]:
    def parse_float(text: str) -> float:
        value = float(text)
        if value in (float("inf"), float("-inf")):  # 1e400: JSON has no infinity
            raise JSONRefused(what, f"a number too large for a float ({text[:20]})")
        return value

    return parse_float


def _constant_parser(what: str) -> Callable[[str], Any]:
    def parse_constant(name: str) -> Any:
        # Python's json accepts NaN/Infinity; JSON does not, and they poison sampling math.
        raise NotJSON(f"{what} is not valid JSON: {name} is not a JSON value", f"{name} is not a JSON value")

    return parse_constant


def find_surrogate(value: Any) -> str | None:
    """The path ("messages[0].content") of the first string, or key, holding a lone UTF-16
    surrogate, or None. Iterative: the value may be as deep as MAX_DEPTH allows."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return path or "the value"
        elif isinstance(v, dict):
            for k, item in v.items():
                key = str(k)
                if _SURROGATE.search(key):
                    return f"{path}.<key>" if path else "a key"
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(v, (list, tuple)):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(v))
    return None


def _decode(raw: str | bytes, what: str) -> str:
    if isinstance(raw, str):
        return raw
    try:
        # json.loads(bytes) accepts UTF-16/32 by their byte patterns; so do we, so that a
        # body cannot slip past these checks in an encoding the route would still accept.
        return raw.decode(json.detect_encoding(raw), errors="strict")
    except UnicodeDecodeError as e:
        raise JSONRefused(what, f"not UTF-8 text (byte {e.start + 1})") from None


def loads_json(raw: str | bytes, what: str = "the request body") -> Any:
    """``json.loads`` with the limits above; every failure is an InvalidRequest naming ``what``."""
    text = _decode(raw, what)
    _check_depth(text, what)
    try:
        value = json.loads(
            text,
            parse_int=_int_parser(what),
            parse_float=_float_parser(what),
            parse_constant=_constant_parser(what),
        )
    except json.JSONDecodeError as e:
        raise NotJSON(f"{what} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})", e.msg) from None
    except RecursionError:  # unreachable below MAX_DEPTH; kept so that no limit change can 500
        raise JSONRefused(what, "nested too deeply") from None
    if _SURROGATE_ESCAPE.search(text) or _SURROGATE.search(text):
        where = find_surrogate(value)
        if where is not None:
            raise JSONRefused(what, f"{where} holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text")
    return value


def check_json(raw: bytes, what: str = "the request body") -> None:
    """Refuse a body that *looks* like JSON and carries one of the hazards above; let
    everything else (a zip, a document, JSONL, plain broken JSON) through, for the route's
    own parser and its own message. Every JSON route then parses only what is safe."""
    try:
        text = _decode(raw, what)
    except InvalidRequest:
        return  # not text: a route that wants JSON will say so itself
    if text.lstrip()[:1] in ("{", "["):
        try:
            loads_json(text, what)
            return
        except NotJSON:
            pass
    # JSONL (tune data) and anything else: each line that is JSON on its own is checked, so
    # that a route reading the body line by line sees no hazard either.
    for line in text.split("\n"):
        try:
            loads_json(line, what)
        except NotJSON:
            pass


# --------------------------------------------------------------------------- YAML

# A block scalar header ("key: |", "- >-", "text: |2 # comment"): the lines under it are
# text, however deeply they are indented.
_BLOCK_SCALAR = re.compile(r"(?:^|[\s:])[|>][-+0-9]*\s*(?:#.*)?$")
# Compact nested collections on one line: "- - - x", "? - x", "- a: - x".
_INDICATOR = re.compile(r"(?:^|(?<=\s))[-?:](?=\s|$)")


def yaml_depth(text: str) -> int:
    """A linear upper bound on a YAML document's nesting depth, measured before any YAML
    parser runs: block levels by indentation (a stack, as Python's tokenizer keeps), plus
    compact "- - x" indicators on a line, plus flow brackets. Block scalars are skipped.
    Quotes are not tracked, so brackets inside quoted text count too: an overestimate,
    which can only refuse a document that is absurd anyway (64 levels)."""
    # YAML quotes are not JSON's (and an apostrophe in plain text is no quote at all), so
    # every bracket counts.
    flow = bracket_depth(text, json_strings=False)
    deepest = 0
    indents: list[int] = []
    scalar_parent: int | None = None  # indentation of the key that opened a block scalar
    for line in text.split("\n"):
        stripped = line.lstrip(" ")
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(stripped)
        if scalar_parent is not None:
            if indent > scalar_parent:
                continue
            scalar_parent = None
        while indents and indents[-1] > indent:
            indents.pop()
        if not indents or indents[-1] < indent:
            indents.append(indent)
        level = len(indents) + len(_INDICATOR.findall(stripped))
        deepest = max(deepest, level)
        if _BLOCK_SCALAR.search(stripped):
            scalar_parent = indent
    return deepest + flow


_YAML_INT = re.compile(r"[-+]?[0-9][0-9a-fA-FxXoObB_:]*")


class BadYAML(InvalidRequest):
    """A YAML document refused: ``problem`` says why, ``line`` (1-based) where, if known."""

    def __init__(self, what: str, problem: str, line: int | None = None, column: int | None = None):
        at = f" at line {line}" + (f", column {column}" if column else "") if line else ""
        super().__init__(f"{what}: {problem}{at}")
        self.problem = problem
        self.line = line


def _loader():
    import yaml

    # libyaml where PyYAML was built with it: the pure-Python scanner is ~50x slower.
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_yaml(text: str, what: str, aliases: bool) -> None:
    """The limits, checked in one bounded pass each: depth before any parser runs, then
    an event walk capped at MAX_YAML_EVENTS for aliases and over-long numbers."""
    import yaml

    if yaml_depth(text) > MAX_DEPTH:
        raise BadYAML(what, f"nested more than {MAX_DEPTH} levels deep")
    for n, event in enumerate(yaml.parse(text, Loader=_loader())):
        line = event.start_mark.line + 1 if event.start_mark is not None else None
        if n > MAX_YAML_EVENTS:
            raise BadYAML(what, f"more than {MAX_YAML_EVENTS} YAML nodes", line)
        if isinstance(event, yaml.AliasEvent) and not aliases:
            raise BadYAML(what, "uses YAML aliases (*name), which are not allowed; write the value out", line)
        if (
            isinstance(event, yaml.ScalarEvent)
            and not event.style  # plain: None from PyYAML, "" from libyaml
            and len(event.value) > MAX_INT_DIGITS
            and _YAML_INT.fullmatch(event.value)
        ):
            raise BadYAML(what, f"a number longer than {MAX_INT_DIGITS} digits", line)


def _yaml_error(what: str, e: Exception) -> BadYAML:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or "invalid YAML"
    if mark is None:
        return BadYAML(what, problem)
    return BadYAML(what, problem, mark.line + 1, mark.column + 1)


def load_yaml(raw: str | bytes, what: str, *, aliases: bool = False) -> Any:
    """Safe YAML with a depth limit applied before parsing, an event budget, no aliases
    unless asked (an alias bomb, "billion laughs", is tiny on disk and exponential to
    walk) and no numbers over MAX_INT_DIGITS. Every refusal is a BadYAML naming ``what``."""
    import yaml

    text = _decode(raw, what) if isinstance(raw, bytes) else raw
    try:
        _check_yaml(text, what, aliases)
        return yaml.load(text, Loader=_loader())
    except yaml.YAMLError as e:
        raise _yaml_error(what, e) from None
    except (ValueError, OverflowError, RecursionError, MemoryError) as e:  # a constructor's own limits
        raise BadYAML(what, f"a value cannot be read ({e.__class__.__name__})") from None


def compose_yaml(raw: str | bytes, what: str) -> Any:
    """The node tree of a document (for line numbers), after the same limits as load_yaml."""
    import yaml

    text = _decode(raw, what) if isinstance(raw, bytes) else raw
    try:
        _check_yaml(text, what, aliases=True)
        return yaml.compose(text, Loader=_loader())
    except yaml.YAMLError as e:
        raise _yaml_error(what, e) from None
