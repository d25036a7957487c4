"""Hostile files, by class (issue 18): YAML nested deep (persona archives, task files,
safety policies), JSONL lines deep, with huge integers or lone surrogates (tune data, task
data), chat templates that loop, recurse or render megabytes, a stream cut inside a
character; and every CLI command fed the worst of them exits with one ``herd: error:``
line, no traceback, and writes nothing partial.
"""

from __future__ import annotations

import io
import json
import re
import time
import zipfile
from pathlib import Path

import pytest

from openherd.chat_template import MAX_RENDER_CHARS, RENDER_SECONDS, ChatTemplate
from openherd.cli import main
from openherd.engine.detok import StreamDecoder
from openherd.errors import HerdError, InvalidRequest
from openherd.untrusted import MAX_DEPTH, MAX_INT_DIGITS, load_yaml, loads_json

pytestmark = pytest.mark.timeout(300)

DEEP = 100_000
HUGE_INT = "9" * 5000

# The worst inputs the fuzzers and the probe found, per format.
DEEP_YAML_FLOW = "a: " + "[" * DEEP + "]" * DEEP + "\n"
DEEP_YAML_BLOCK = "".join(" " * i + "a:\n" for i in range(1000))  # 1,000 block levels in 0.5 MB
DEEP_YAML_DASH = "- " * 20_000 + "x\n"
HUGE_INT_YAML = f"a: {HUGE_INT}\n"
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9)
)
WORST_YAML = [DEEP_YAML_FLOW, DEEP_YAML_BLOCK, DEEP_YAML_DASH, HUGE_INT_YAML, ALIAS_BOMB]
WORST_JSONL_LINES = [
    b'{"messages": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    b"[" * DEEP,
    b'{"prompt": "a", "completion": ' + HUGE_INT.encode() + b"}",
    b'{"prompt": "\\ud800", "completion": "b"}',
    b'{"prompt": 1e999, "completion": "b"}',
]
LOOPING_TEMPLATES = {
    "huge range": "{% for i in range(10**9) %}x{% endfor %}",
    "nested ranges": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "recursive macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "20 MB string": "{{ 'x' * 20000000 }}",
    "20 MB by loop": "{% for i in range(99999) %}{{ 'x' * 200 }}{% endfor %}",
    "huge power": "{{ 10 ** 100000000 }}",
    "doubling by ~": "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "huge filter width": "{{ 'x'|center(1000000000) }}",
    "huge method width": "{{ 'x'.ljust(1000000000) }}",
    "huge format width": "{{ '%*s' % (1000000000, 'x') }}",
}


def _fast(fn, *args, bound: float = 5.0):
    t0 = time.monotonic()
    try:
        return fn(*args)
    finally:
        assert time.monotonic() - t0 < bound, f"{fn.__name__} took {time.monotonic() - t0:.1f}s"


# ---------------------------------------------------------------------------- YAML


@pytest.mark.parametrize("text", WORST_YAML, ids=["flow", "block", "dashes", "huge-int", "alias-bomb"])
def test_hostile_yaml_is_a_400_within_a_second(text):
    with pytest.raises(InvalidRequest) as e:
        _fast(load_yaml, text, "x.yaml", bound=1.0)
    assert e.value.status == 400 and "\n" not in e.value.message


def test_yaml_at_the_depth_limit_still_loads():
    ok = "a: " + "[" * (MAX_DEPTH - 2) + "1" + "]" * (MAX_DEPTH - 2)
    assert load_yaml(ok, "x.yaml")["a"] is not None
    block = "".join("  " * i + f"k{i}:\n" for i in range(MAX_DEPTH - 2)) + "  " * (MAX_DEPTH - 2) + "v\n"
    assert load_yaml(block, "x.yaml") is not None
    # A block scalar may be indented as deep as it likes: it is text, not nesting.
    prompt = "system: |\n" + "".join(" " * (2 + i) + "line\n" for i in range(300))
    assert load_yaml(prompt, "x.yaml")["system"].count("line") == 300


def test_persona_yaml_deep_is_refused_fast():
    from openherd.personas.bundle import Persona

    with pytest.raises(InvalidRequest, match="nested more than"):
        _fast(Persona.from_yaml, "name: x\nmodel: tiny\nsystem: " + "[" * 8000 + "]" * 8000 + "\n", bound=1.0)


def test_task_yaml_deep_is_a_task_error(tmp_path):
    from openherd.errors import TaskError
    from openherd.evals.tasks import parse_spec

    for i, text in enumerate(WORST_YAML):
        path = tmp_path / f"t{i}.yaml"
        path.write_text(text)
        with pytest.raises(TaskError, match=rf"^{path}(:\d+)?: malformed YAML"):
            _fast(parse_spec, path, bound=1.0)


def test_safety_policy_deep_is_a_400(tmp_path):
    from openherd.server.moderation import load_policy_file

    path = tmp_path / "policy.yaml"
    path.write_text(DEEP_YAML_FLOW[:200_000])
    with pytest.raises(InvalidRequest, match="HERD_SAFETY"):
        _fast(load_policy_file, path, bound=1.0)


# ---------------------------------------------------------------------------- JSON / JSONL


@pytest.mark.parametrize("line", WORST_JSONL_LINES, ids=["deep", "unclosed", "huge-int", "surrogate", "inf"])
def test_tune_data_lines_are_one_line_errors(tmp_path, line):
    from openherd.tune.data import read_jsonl

    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "p", "completion": "c"}\n' + line + b"\n")
    with pytest.raises(InvalidRequest) as e:
        _fast(read_jsonl, path)
    assert e.value.message.startswith(f"{path}:2: ") and "\n" not in e.value.message


@pytest.mark.parametrize("line", WORST_JSONL_LINES, ids=["deep", "unclosed", "huge-int", "surrogate", "inf"])
def test_task_data_lines_are_task_errors(tmp_path, line):
    from openherd.errors import TaskError
    from openherd.evals.tasks import read_jsonl

    path = tmp_path / "data.jsonl"
    path.write_bytes(line + b"\n")
    with pytest.raises(TaskError, match=r"data.jsonl:1: "):
        list(read_jsonl((str(path), path)))


def test_loads_json_limits():
    assert loads_json("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None
    assert loads_json('{"ok": "\\ud83d\\ude00"}') == {"ok": "\U0001f600"}
    for bad, word in [
        ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "nested"),
        ("1" * (MAX_INT_DIGITS + 1), "digits"),
        ('{"a": ["\\udfff"]}', "a[0]"),
        ('{"\\ud800": 1}', "key"),
        ("NaN", "NaN"),
    ]:
        with pytest.raises(InvalidRequest, match=re.escape(word)):
            loads_json(bad)


# ---------------------------------------------------------------------------- chat templates


@pytest.mark.parametrize("source", LOOPING_TEMPLATES.values(), ids=LOOPING_TEMPLATES.keys())
def test_hostile_chat_templates_are_400s_within_budget(source):
    template = ChatTemplate(source)
    with pytest.raises(HerdError) as e:
        _fast(template.render, [{"role": "user", "content": "hi"}], bound=RENDER_SECONDS + 2)
    assert e.value.status == 400 and "\n" not in e.value.message


def test_output_budget_counts_while_rendering():
    template = ChatTemplate(None)
    fits = [{"role": "user", "content": "x" * (MAX_RENDER_CHARS - 100)}]
    assert len(template.render(fits)) <= MAX_RENDER_CHARS
    with pytest.raises(InvalidRequest, match="characters"):
        template.render([{"role": "user", "content": "x" * MAX_RENDER_CHARS}])


def test_render_budget_restores_the_previous_tracer():
    import sys

    def tracer(frame, event, arg):
        return None

    sys.settrace(tracer)
    try:
        ChatTemplate(None).render([{"role": "user", "content": "hi"}])
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(None)


# ---------------------------------------------------------------------------- streams


def test_a_stream_cut_inside_a_character_drops_the_partial_bytes():
    d = StreamDecoder()
    text = "hi 😀"
    raw = text.encode()
    out = d.feed(raw[:-2]) + d.flush()  # max_tokens ended two bytes into the emoji
    assert out == "hi " and "\ufffd" not in d.text
    d = StreamDecoder(stop=["</s>"])
    out = d.feed(b"a<" + "é".encode()[:1]) + d.flush()
    assert out == "a<"


# ---------------------------------------------------------------------------- the CLI


def _herd(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def _one_error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("herd: error: "), (code, err[-2000:])
    assert "Traceback" not in err
    return lines[0]


def _archive(persona_yaml: str) -> bytes:
    import hashlib

    data = persona_yaml.encode()
    manifest = {"format": "openherd-persona", "version": 1,
                "files": {"persona.yaml": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}}}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("herd.json", json.dumps(manifest))
        zf.writestr("persona.yaml", data)
    return buf.getvalue()


@pytest.mark.parametrize("text", WORST_YAML, ids=["flow", "block", "dashes", "huge-int", "alias-bomb"])
def test_cli_persona_import_of_hostile_yaml(herd_home, tmp_path, capsys, text):
    path = tmp_path / "p.herd"
    path.write_bytes(_archive("schema: 1\nname: evil\nmodel: tiny\nsystem: hi\nexamples: []\nextra:\n" + text))
    t0 = time.monotonic()
    _one_error_line(*_herd(capsys, "persona", "import", str(path)))
    assert time.monotonic() - t0 < 5
    assert not (herd_home / "personas" / "evil").exists()


def test_cli_persona_create_with_a_surrogate_writes_nothing(herd_home, tiny_gguf, capsys):
    from server_helpers import register_model

    register_model(herd_home, tiny_gguf, "tiny")
    line = _one_error_line(*_herd(capsys, "persona", "create", "halfchar", "--model", "tiny", "--system", "a\udc80b"))
    assert "surrogate" in line
    assert not (herd_home / "personas" / "halfchar").exists()
    assert _herd(capsys, "persona", "list")[0] == 0


@pytest.mark.parametrize("text", WORST_YAML, ids=["flow", "block", "dashes", "huge-int", "alias-bomb"])
def test_cli_eval_task_of_hostile_yaml(herd_home, tmp_path, tiny_gguf, capsys, text):
    path = tmp_path / "task.yaml"
    path.write_text(text)
    _one_error_line(*_herd(capsys, "eval", str(tiny_gguf), "--task", str(path)))


@pytest.mark.parametrize("line", WORST_JSONL_LINES, ids=["deep", "unclosed", "huge-int", "surrogate", "inf"])
def test_cli_eval_samples_of_hostile_jsonl(herd_home, tmp_path, capsys, line):
    path = tmp_path / "samples.jsonl"
    path.write_bytes(line + b"\n")
    _one_error_line(*_herd(capsys, "eval", "--task", "humaneval", "--samples", str(path)))


@pytest.mark.parametrize("line", WORST_JSONL_LINES, ids=["deep", "unclosed", "huge-int", "surrogate", "inf"])
def test_cli_tune_of_hostile_jsonl(herd_home, tmp_path, tiny_gguf, capsys, line):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "p", "completion": "c"}\n' + line + b"\n")
    _one_error_line(*_herd(capsys, "tune", str(tiny_gguf), "--data", str(path), "--out", "evil-tune"))
    assert not (herd_home / "models" / "evil-tune").exists()


@pytest.mark.parametrize("name", ["recursive macro", "nested ranges", "20 MB string"])
def test_cli_run_with_a_hostile_template(tmp_path, capsys, herd_home, name):
    from tinymodels import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "evil.gguf", chat_template=LOOPING_TEMPLATES[name])
    t0 = time.monotonic()
    line = _one_error_line(*_herd(capsys, "run", str(gguf), "Say hi", "--max-tokens", "5"))
    assert "chat template" in line and time.monotonic() - t0 < 30


def test_cli_turns_any_exception_into_one_line(herd_home, capsys, monkeypatch):
    """The last resort in cli.main: a bug that slips past every check is still one line."""
    import openherd.commands.store as store_cmd

    def buggy(args):
        raise KeyError("a bug")

    monkeypatch.setattr(store_cmd, "cmd_list", buggy)  # main() builds its parser after this
    line = _one_error_line(*_herd(capsys, "list"))
    assert "KeyError" in line


def test_fuzzer_inputs_leave_nothing_outside_herd_home(herd_home, tmp_path, capsys):
    path = tmp_path / "p.herd"
    path.write_bytes(_archive("name: x\nmodel: tiny\nsystem: " + "[" * DEEP))
    before = set(Path(tmp_path).rglob("*"))
    _one_error_line(*_herd(capsys, "persona", "import", str(path)))
    assert set(Path(tmp_path).rglob("*")) == before
    assert not any((herd_home / "personas").glob("*")) if (herd_home / "personas").exists() else True
