"""Property-based fuzzing of every file format openherd reads (issue 18), with hypothesis.

Formats: GGUF headers and metadata, persona archives (zip, YAML, JSON), persona YAML,
task YAML and JSONL, tune JSONL, knowledge documents (txt, md, html, pdf) and chat
templates. Inputs are random bytes, mutations of a valid file (byte flips, cuts,
splices of hostile fragments) and structured generators. The properties, for every one:

* success, or a HerdError with a one-line message (no other exception, no traceback);
* each input handled within PER_INPUT_SECONDS, and peak memory growth within MEMORY_MB;
* nothing written outside HERD_HOME, and nothing partial left inside it by a failure.

Bounded by default (CI): ``derandomize=True`` and EXAMPLES examples per property, about
30 s in all. The long run: ``pytest -m fuzz_long tests/test_fuzz_formats.py`` (LONG_EXAMPLES
per property, random seeds; HERD_FUZZ_EXAMPLES overrides the count).
"""

from __future__ import annotations

import io
import json
import os
import resource
import time
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openherd.errors import HerdError

pytestmark = pytest.mark.timeout(600)

EXAMPLES = 200
LONG_EXAMPLES = int(os.environ.get("HERD_FUZZ_EXAMPLES", "3000"))
PER_INPUT_SECONDS = 5.0  # chat templates may use their 2 s render budget
MEMORY_MB = 512

_COMMON = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None)
CI = settings(max_examples=EXAMPLES, derandomize=True, **_COMMON)
LONG = settings(max_examples=LONG_EXAMPLES, **_COMMON)

# Fragments the probe and the fuzzers found to hurt; spliced into valid inputs.
HOSTILE = [
    b"[" * 5000, b"{" * 5000, b"9" * 5000, b'"\\ud800"', b"\xed\xa0\x80", b"\xff\xfe", b"\x00" * 64,
    b"&a [*a]", b"*a", b"- " * 2000, b"1e999", b"NaN", b"\r\n" * 100, b"{{ range(10**9) }}",
]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check(fn, *args) -> object:
    """Run one parser on one input: success or a one-line HerdError, within the bounds."""
    t0 = time.monotonic()
    before = _peak_mb()
    try:
        out = fn(*args)
    except HerdError as e:
        assert e.message and "\n" not in e.message.strip(), e.message
        assert "Traceback" not in e.message
        out = e
    elapsed = time.monotonic() - t0
    assert elapsed < PER_INPUT_SECONDS, f"{getattr(fn, '__name__', fn)} took {elapsed:.1f}s"
    assert _peak_mb() - before < MEMORY_MB, f"peak memory grew by {_peak_mb() - before:.0f} MB"
    return out


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """``seed`` with a few flips, cuts, duplications and hostile splices."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "splice", "dup", "insert"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at:]
        elif op == "splice":
            data[at:at] = draw(st.sampled_from(HOSTILE))
        elif op == "dup":
            n = draw(st.integers(1, 64))
            data[at:at] = data[at : at + n] * draw(st.integers(2, 50))
        else:
            data[at:at] = draw(st.binary(max_size=32))
    return bytes(data)


def fuzz_bytes(seed: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=512), mutated(seed))


# ---------------------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def gguf_seed(tiny_gguf) -> bytes:
    # The header, metadata and tensor infos; the weights after them add nothing to parse.
    return Path(tiny_gguf).read_bytes()[:65536]


def _gguf_property(tmp_path_factory, gguf_seed):
    from openherd.gguf import read_gguf

    d = tmp_path_factory.mktemp("fuzz-gguf")

    def prop(data: bytes) -> None:
        path = d / "x.gguf"
        path.write_bytes(data)
        check(read_gguf, path)
        check(lambda p: read_gguf(p, load_arrays=True), path)

    return prop


def test_fuzz_gguf(tmp_path_factory, gguf_seed):
    prop = _gguf_property(tmp_path_factory, gguf_seed)
    CI(given(fuzz_bytes(gguf_seed))(prop))()


@pytest.mark.fuzz_long
def test_fuzz_gguf_long(tmp_path_factory, gguf_seed):
    prop = _gguf_property(tmp_path_factory, gguf_seed)
    LONG(given(fuzz_bytes(gguf_seed))(prop))()


# ---------------------------------------------------------------------------- personas

PERSONA_YAML = (
    b"schema: 1\nname: fuzzed\nmodel: tiny\ndescription: a test\nsystem: |\n  You are terse.\n"
    b"greeting: Hello\nexamples:\n  - user: hi\n    assistant: hello\nsampling:\n  temperature: 0.5\n"
)


def _archive(members: dict[str, bytes], manifest: bytes | None = None) -> bytes:
    import hashlib

    files = {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for n, b in members.items()}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("herd.json", manifest or json.dumps({"format": "openherd-persona", "version": 1, "files": files}))
        for n, b in members.items():
            zf.writestr(n, b)
    return buf.getvalue()


ARCHIVE_SEED = _archive({"persona.yaml": PERSONA_YAML, "knowledge/notes.md": b"# Notes\nThe keeper is Glim.\n"})


@st.composite
def archives(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "yaml", "manifest", "member"]))
    if kind == "bytes":
        return draw(fuzz_bytes(ARCHIVE_SEED))
    if kind == "yaml":  # a well-formed archive around a fuzzed persona.yaml
        return _archive({"persona.yaml": draw(fuzz_bytes(PERSONA_YAML))})
    if kind == "manifest":
        return _archive({"persona.yaml": PERSONA_YAML}, draw(fuzz_bytes(b'{"format": "openherd-persona"}')))
    name = draw(st.sampled_from(["knowledge/a.md", "knowledge/../x", "/abs", "knowledge/a.pdf", "persona.yaml/x"]))
    return _archive({"persona.yaml": PERSONA_YAML, name: draw(st.binary(max_size=256))})


def _persona_property(tmp_path_factory):
    from openherd.personas.bundle import PersonaStore
    from openherd.settings import Settings

    root = tmp_path_factory.mktemp("fuzz-persona")
    home = root / "home"
    store = PersonaStore(Settings(home=home))
    outside = root / "outside"
    outside.mkdir()

    def prop(data: bytes) -> None:
        result = check(store.import_bytes, data)
        if not isinstance(result, HerdError):
            store.remove(result.persona.name)  # the next input may reuse the name
        assert not any(outside.iterdir())
        personas = home / "personas"
        # Nothing partial: no staging directory, no persona without its persona.yaml.
        leftovers = [p for p in personas.iterdir() if not (p / "persona.yaml").is_file()] if personas.exists() else []
        assert [p for p in leftovers if not p.name.startswith(".")] == [], leftovers
        assert not [p for p in leftovers if p.name.startswith(".") and p.name != ".lock" and p.is_dir()
                    and any(p.iterdir())], leftovers

    return prop


def test_fuzz_persona_archives(tmp_path_factory):
    CI(given(archives())(_persona_property(tmp_path_factory)))()


@pytest.mark.fuzz_long
def test_fuzz_persona_archives_long(tmp_path_factory):
    LONG(given(archives())(_persona_property(tmp_path_factory)))()


def _persona_yaml(data: bytes) -> None:
    from openherd.personas.bundle import Persona

    check(Persona.from_yaml, data)


def test_fuzz_persona_yaml():
    CI(given(fuzz_bytes(PERSONA_YAML))(_persona_yaml))()


# ---------------------------------------------------------------------------- tasks, tune data

TASK_YAML = (
    b"name: fuzz\ntype: multiple_choice\ndata: data.jsonl\nprompt: \"Q: {{question}}\\nA:\"\n"
    b"choices: \"{{choices}}\"\ntarget: \"{{answer}}\"\n"
)
TASK_JSONL = b'{"question": "1+1?", "choices": ["1", "2"], "answer": 1}\n' * 3
TUNE_JSONL = (
    b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    b'{"prompt": "2+2=", "completion": "4"}\n'
)


def _task_property(tmp_path_factory):
    from openherd.evals.tasks import load_task, parse_spec

    d = tmp_path_factory.mktemp("fuzz-task")

    def prop(spec: bytes, rows: bytes) -> None:
        (d / "task.yaml").write_bytes(spec)
        (d / "data.jsonl").write_bytes(rows)
        check(parse_spec, d / "task.yaml")
        check(load_task, str(d / "task.yaml"))

    return prop


def test_fuzz_task_files(tmp_path_factory):
    CI(given(fuzz_bytes(TASK_YAML), fuzz_bytes(TASK_JSONL))(_task_property(tmp_path_factory)))()


@pytest.mark.fuzz_long
def test_fuzz_task_files_long(tmp_path_factory):
    LONG(given(fuzz_bytes(TASK_YAML), fuzz_bytes(TASK_JSONL))(_task_property(tmp_path_factory)))()


def _tune_property(tmp_path_factory):
    from openherd.tune.data import read_jsonl

    d = tmp_path_factory.mktemp("fuzz-tune")

    def prop(data: bytes) -> None:
        (d / "data.jsonl").write_bytes(data)
        check(read_jsonl, d / "data.jsonl")

    return prop


def test_fuzz_tune_jsonl(tmp_path_factory):
    CI(given(fuzz_bytes(TUNE_JSONL))(_tune_property(tmp_path_factory)))()


@pytest.mark.fuzz_long
def test_fuzz_tune_jsonl_long(tmp_path_factory):
    LONG(given(fuzz_bytes(TUNE_JSONL))(_tune_property(tmp_path_factory)))()


# ---------------------------------------------------------------------------- knowledge documents

DOC_SEEDS = {
    "txt": b"The keeper of the lighthouse is Glim.\n",
    "md": b"# Title\n\nSome *text* with [a link](http://x).\n\n- item\n",
    "html": b"<html><head><title>T</title><script>x()</script></head><body><p>Hello <b>there</b></p></body></html>",
    "pdf": (
        b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
        b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 200 200]/Contents 4 0 R/Resources<<>>>>endobj\n"
        b"4 0 obj<</Length 35>>stream\nBT /F1 12 Tf 10 10 Td (Hello) Tj ET\nendstream endobj\n"
        b"trailer<</Root 1 0 R>>\n%%EOF\n"
    ),
}


@st.composite
def documents(draw) -> tuple[str, bytes]:
    ext = draw(st.sampled_from(sorted(DOC_SEEDS)))
    return f"doc.{ext}", draw(fuzz_bytes(DOC_SEEDS[ext]))


def _document(doc: tuple[str, bytes]) -> None:
    from openherd.personas.knowledge import check_document

    check(check_document, *doc)


def test_fuzz_knowledge_documents():
    CI(given(documents())(_document))()


@pytest.mark.fuzz_long
def test_fuzz_knowledge_documents_long():
    LONG(given(documents())(_document))()


# ---------------------------------------------------------------------------- chat templates

_PIECES = [
    "{% for m in messages %}", "{% endfor %}", "{{ m.content }}", "{{ m['role'] }}", "{% if add_generation_prompt %}",
    "{% endif %}", "{{ bos_token }}", "{% set ns = namespace(x='') %}", "{% set ns.x = ns.x ~ ns.x ~ 'ab' %}",
    "{{ ns.x }}", "{% for i in range(99999) %}", "{{ raise_exception('no') }}", "{{ messages | tojson }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}", "{{ f(0) }}", "{{ 'x' * 99999 }}", "{{ 10 ** 99 }}",
    "{{ messages[0].content * 3 }}", "{{ strftime_now('%Y') }}", "{{ undefined_thing.attr }}", "text", "{%", "}}",
    "{{ ''.__class__ }}", "{{ lipsum }}", "{{ cycler }}", "{% break %}", "{{ m.content[::-1] }}",
    "{{ m.content|center(99999999) }}", "{{ '%*s' % (99999999, 'x') }}", "{{ m.content ~ m.content }}",
]


@st.composite
def templates(draw) -> str:
    return "".join(draw(st.lists(st.sampled_from(_PIECES), max_size=12)))


_MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=50)}),
    min_size=1, max_size=4,
)


def _template(source: str, messages: list[dict]) -> None:
    from openherd.chat_template import ChatTemplate

    def render() -> str:
        return ChatTemplate(source).render(messages)

    check(render)


def test_fuzz_chat_templates():
    CI(given(templates(), _MESSAGES)(_template))()


@pytest.mark.fuzz_long
def test_fuzz_chat_templates_long():
    LONG(given(templates(), _MESSAGES)(_template))()
