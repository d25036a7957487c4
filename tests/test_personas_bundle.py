"""The persona bundle: schema validation, the CLI (create/list/show/edit/rm), and .herd
export/import, including hostile archives that must be refused without writing anything."""

from __future__ import annotations

import io
import json
import os
import stat
import zipfile
from pathlib import Path

import pytest
import yaml

from openherd.cli import main
from openherd.errors import HerdError, InvalidName, InvalidRequest, NotFound, PayloadTooLarge
from openherd.personas import bundle
from openherd.personas.bundle import Persona, PersonaExists, PersonaStore, merge_patch, validate_persona_name
from openherd.settings import get_settings

FACT = b"# The keeper\n\nThe Glimmerfen lighthouse keeper's cat is named Bartholomew Quince.\n"


@pytest.fixture
def store(herd_home, tiny_gguf) -> PersonaStore:
    """A persona store in a fresh HERD_HOME with the tiny model registered as 'tiny'."""
    from openherd.store import Store

    Store(get_settings()).pull(str(tiny_gguf), name="tiny")
    return PersonaStore(get_settings())


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ----------------------------------------------------------------------------- schema


def test_names_follow_the_store_rules_without_tags():
    assert validate_persona_name("glimmer-fen.v2") == "glimmer-fen.v2"
    assert validate_persona_name("glim:latest") == "glim"  # what Ollama clients send
    for bad in ("../x", "/abs", "a/b", "", ".hidden", "-flag", "x:v2", "a" * 200, None, "a\x00b"):
        with pytest.raises(InvalidName):
            validate_persona_name(bad)


def test_schema_round_trips_and_rejects_bad_fields():
    p = Persona.from_dict({
        "name": "glim", "model": "smollm2", "system": "Be kind.", "greeting": "Hi!",
        "examples": [{"user": "hello", "assistant": "Ahoy."}],
        "sampling": {"temperature": 0.2, "top_k": 20, "stop": ["\nUser:"]},
        "knowledge": {"top_k": 3},
        "safety": {"blocked_topics": ["lottery numbers"]},
        "version": 1.5,
    })
    assert p.version == "1.5"
    assert p.safety.injection == "quarantine"  # the persona default when the policy doesn't say
    assert p.sampling.values() == {"temperature": 0.2, "top_k": 20, "stop": ["\nUser:"]}
    again = Persona.from_yaml(p.to_yaml())
    assert again.to_dict() == p.to_dict()

    cases = [
        ({"model": "smollm2"}, "name"),
        ({"name": "glim"}, "model"),
        ({"name": "glim", "model": "../etc"}, "model"),
        ({"name": "glim", "model": "smollm2", "colour": "red"}, "unknown field"),
        ({"name": "glim", "model": "smollm2", "sampling": {"temperature": -1}}, "temperature"),
        ({"name": "glim", "model": "smollm2", "sampling": {"top_k": "many"}}, "integer"),
        ({"name": "glim", "model": "smollm2", "examples": [{"user": "hi"}]}, "assistant"),
        ({"name": "glim", "model": "smollm2", "knowledge": {"chunk_tokens": 8}}, "chunk_tokens"),
        ({"name": "glim", "model": "smollm2", "knowledge": {"top_k": 0}}, "top_k"),
        ({"name": "glim", "model": "smollm2", "knowledge": {"sources": [{"file": "../x.md", "sha256": "0" * 64,
                                                                          "size": 1}]}}, "safe"),
        ({"name": "glim", "model": "smollm2", "safety": {"pii_input": "maybe"}}, "pii_input"),
        ({"name": "glim", "model": "smollm2", "schema": 99}, "newer"),
        ({"name": "glim", "model": "smollm2", "system": 5}, "string"),
    ]
    for data, words in cases:
        with pytest.raises(InvalidRequest, match=words):
            Persona.from_dict(data)


def test_yaml_aliases_are_refused():
    bomb = "name: glim\nmodel: smollm2\nexamples: &a [{user: x, assistant: y}]\ndescription: *a\n"
    with pytest.raises(InvalidRequest, match="aliases"):
        Persona.from_yaml(bomb)


def test_merge_patch_is_rfc7386():
    assert merge_patch({"a": 1, "b": {"c": 2, "d": 3}}, {"b": {"c": None, "e": 4}, "f": 5}) == \
        {"a": 1, "b": {"d": 3, "e": 4}, "f": 5}
    assert merge_patch({"a": [1, 2]}, {"a": [3]}) == {"a": [3]}


# ----------------------------------------------------------------------------- store and CLI


def test_cli_create_list_show_edit_rm(store, tmp_path, capsys):
    doc = tmp_path / "keeper notes.md"
    doc.write_bytes(FACT)
    rc = main(["persona", "create", "glim", "--model", "tiny", "--system", "You guide visitors.",
               "--greeting", "Welcome!", "--temperature", "0.3", "--example", "hi", "Ahoy.",
               "--knowledge", str(doc)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "created persona 'glim'" in out and "indexed 1 document(s)" in out
    p = store.get("glim")
    assert p.model == "tiny" and p.greeting == "Welcome!" and p.sampling.temperature == 0.3
    assert [s.file for s in p.knowledge.sources] == ["keeper_notes.md"]
    assert (store.knowledge_dir("glim") / "keeper_notes.md").read_bytes() == FACT
    assert store.knowledge_db("glim").is_file()  # indexed at create

    assert main(["persona", "list"]) == 0
    assert "glim" in capsys.readouterr().out
    assert main(["persona", "show", "glim"]) == 0
    shown = capsys.readouterr().out
    assert "You guide visitors." in shown and "keeper_notes.md" in shown

    more = tmp_path / "weather.txt"
    more.write_text("Fog rolls in every evening.")
    assert main(["persona", "edit", "glim", "--system", "You are terse.", "--top-k", "7",
                 "--add-knowledge", str(more), "--remove-knowledge", "keeper_notes.md"]) == 0
    p = store.get("glim")
    assert p.system == "You are terse." and p.sampling.top_k == 7 and p.sampling.temperature == 0.3
    assert [s.file for s in p.knowledge.sources] == ["weather.txt"]
    assert not (store.knowledge_dir("glim") / "keeper_notes.md").exists()

    assert main(["persona", "rm", "glim"]) == 0
    assert not store.exists("glim") and not (store.root / "glim").exists()
    assert [e for e in store.root.iterdir() if e.name != ".lock"] == []


def test_cli_errors_are_one_line(store, tmp_path, capsys):
    assert main(["persona", "create", "glim", "--model", "nosuchmodel"]) != 0
    assert "nosuchmodel" in capsys.readouterr().err
    assert main(["persona", "create", "../evil", "--model", "tiny"]) != 0
    assert "invalid persona name" in capsys.readouterr().err
    bad = tmp_path / "x.exe"
    bad.write_bytes(b"MZ")
    assert main(["persona", "create", "glim", "--model", "tiny", "--knowledge", str(bad)]) != 0
    assert "unsupported" in capsys.readouterr().err
    assert main(["persona", "show", "nobody"]) != 0
    assert "not found" in capsys.readouterr().err
    assert not store.exists("glim")


def test_name_collisions(store):
    # A persona is served as a model id: it may not take a model's (or catalog alias's) name.
    with pytest.raises(PersonaExists, match="model name"):
        store.create(Persona(name="tiny", model="tiny"))
    with pytest.raises(PersonaExists, match="model name"):
        store.create(Persona(name="smollm2", model="tiny"))
    store.create(Persona(name="glim", model="tiny"))
    with pytest.raises(PersonaExists, match="already exists"):
        store.create(Persona(name="glim", model="tiny"))
    # Models win at lookup: a persona never shadows a model.
    assert store.lookup("glim").name == "glim"
    assert store.lookup("glim:latest").name == "glim"
    assert store.lookup("tiny") is None
    assert store.lookup("../x") is None


def test_update_rules(store):
    store.create(Persona(name="glim", model="tiny", sampling=bundle.SamplingDefaults(temperature=0.5)))
    p = store.update("glim", {"sampling": {"top_p": 0.9}, "description": "Lighthouse lore"})
    assert p.sampling.temperature == 0.5 and p.sampling.top_p == 0.9
    p = store.update("glim", {"sampling": {"temperature": None}})
    assert p.sampling.temperature is None
    with pytest.raises(InvalidRequest, match="renamed"):
        store.update("glim", {"name": "other"})
    with pytest.raises(InvalidRequest, match="sources"):
        store.update("glim", {"knowledge": {"sources": []}})
    with pytest.raises(InvalidRequest, match="temperature"):
        store.update("glim", {"sampling": {"temperature": -3}})
    assert store.get("glim").description == "Lighthouse lore"


# ----------------------------------------------------------------------------- export / import


def _make(store: PersonaStore, name: str = "glim") -> Persona:
    return store.create(Persona(name=name, model="tiny", system="Guide."),
                        [("keeper.md", FACT), ("weather.txt", b"Foggy evenings.")])


def test_export_import_round_trip(store, tmp_path):
    _make(store)
    out = store.export("glim", tmp_path / "glim.herd")
    again = store.export("glim", tmp_path / "again.herd")
    assert out.read_bytes() == again.read_bytes()  # deterministic: fixed timestamps and order
    with zipfile.ZipFile(out) as zf:
        assert zf.namelist() == ["herd.json", "persona.yaml", "knowledge/keeper.md", "knowledge/weather.txt"]
        manifest = json.loads(zf.read("herd.json"))
    assert manifest["format"] == "openherd-persona" and set(manifest["files"]) == {
        "persona.yaml", "knowledge/keeper.md", "knowledge/weather.txt"}

    with pytest.raises(PersonaExists, match="--name"):
        store.import_file(out)
    result = store.import_file(out, name="glim2")
    p = result.persona
    assert p.name == "glim2" and result.files == 2
    assert (store.knowledge_dir("glim2") / "keeper.md").read_bytes() == FACT
    a, b = store.get("glim").to_dict(), store.get("glim2").to_dict()
    for d in (a, b):
        d.pop("name"), d.pop("updated_at")
    assert a == b


def _zip(members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def _valid_members(store: PersonaStore) -> list[tuple[str, bytes]]:
    _make(store, "source")
    with zipfile.ZipFile(io.BytesIO(store.export_bytes("source"))) as zf:
        return [(n, zf.read(n)) for n in zf.namelist()]


def _with_manifest(members: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Rewrite herd.json to list the members as given, so only the attack itself is wrong."""
    import hashlib

    files = {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in members if n != "herd.json"}
    manifest = {"format": "openherd-persona", "version": 1, "persona": "x", "files": files}
    return [("herd.json", json.dumps(manifest).encode())] + [(n, d) for n, d in members if n != "herd.json"]


def _symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


ATTACKS = {  # attack -> words the refusal must contain (so it is refused for the right reason)
    "dotdot": "outside the persona",
    "dotdot_nested": "outside the persona",
    "absolute": "absolute",
    "backslash": "non-portable",
    "drive": "non-portable",
    "symlink": "symlink",
    "oversized": "at most",
    "bomb": "zip bomb",
    "duplicate": "twice",
    "unexpected": "unexpected member",
    "tampered": "sha256",
    "bad_schema": "model",
    "not_zip": "not a zip",
    "no_manifest": "no herd.json",
    "source_mismatch": "do not match",
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_hostile_archives_are_refused_and_write_nothing(store, tmp_path, attack):
    members = _valid_members(store)
    before = tree(store.settings.home)
    outside = tmp_path / "outside"
    outside.mkdir()
    doc = ("knowledge/keeper.md", FACT)
    if attack == "dotdot":
        data = _zip(_with_manifest(members + [("../../outside/pwned.md", b"x")]))
    elif attack == "dotdot_nested":
        data = _zip(_with_manifest(members + [("knowledge/../../pwned.md", b"x")]))
    elif attack == "absolute":
        data = _zip(_with_manifest(members + [(str(outside / "pwned.md"), b"x")]))
    elif attack == "backslash":
        data = _zip(_with_manifest(members + [("knowledge\\..\\..\\pwned.md", b"x")]))
    elif attack == "drive":
        data = _zip(_with_manifest(members + [("C:/pwned.md", b"x")]))
    elif attack == "symlink":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for n, d in _with_manifest(members + [("knowledge/link.md", b"/etc/passwd")]):
                zf.writestr(_symlink_info(n) if n == "knowledge/link.md" else n, d)
        data = buf.getvalue()
    elif attack == "oversized":
        big = b"a" * (bundle.MAX_DOCUMENT_BYTES + 1)
        data = _zip(_with_manifest(members + [("knowledge/big.txt", big)]))
    elif attack == "bomb":
        data = _zip(_with_manifest(members + [("knowledge/zeros.txt", b"\0" * (8 * 1024 * 1024))]))
    elif attack == "duplicate":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf, pytest.warns(UserWarning):
            for n, d in _with_manifest(members) + [doc]:
                zf.writestr(n, d)
        data = buf.getvalue()
    elif attack == "unexpected":
        data = _zip(_with_manifest(members + [("run.sh", b"rm -rf /")]))
    elif attack == "tampered":
        # Same size, one byte changed: only the digest can tell.
        data = _zip([(n, FACT.replace(b"Quince", b"Quincy") if n == "knowledge/keeper.md" else d)
                     for n, d in members])
    elif attack == "bad_schema":
        data = _zip(_with_manifest([(n, b"name: x\nmodel: ../etc\n" if n == "persona.yaml" else d)
                                    for n, d in members]))
    elif attack == "not_zip":
        data = b"PK\x03\x04 this is not really a zip"
    elif attack == "no_manifest":
        data = _zip([(n, d) for n, d in members if n != "herd.json"])
    elif attack == "source_mismatch":
        data = _zip(_with_manifest([m for m in members if m[0] != "knowledge/weather.txt"]))
    path = tmp_path / "evil.herd"
    path.write_bytes(data)
    with pytest.raises((InvalidRequest, PayloadTooLarge)) as err:
        store.import_file(path, name="victim")
    assert isinstance(err.value, HerdError)
    assert ATTACKS[attack] in err.value.message
    assert not store.exists("victim")
    assert tree(store.settings.home) == before  # nothing written, not even a staging directory
    assert list(outside.iterdir()) == []
    assert not (tmp_path.parent / "pwned.md").exists()


def test_import_cli_rejects_zip_slip(store, tmp_path, capsys):
    members = _valid_members(store)
    path = tmp_path / "evil.herd"
    path.write_bytes(_zip(_with_manifest(members + [("../pwned.md", b"x")])))
    before = tree(store.settings.home)
    assert main(["persona", "import", str(path), "--name", "victim"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("herd: error:") and "outside" in err and len(err.strip().splitlines()) == 1
    assert tree(store.settings.home) == before


def test_remove_survives_nothing_outside(store, tmp_path):
    _make(store)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    # A symlink planted where a persona directory would be is not followed by rm.
    os.symlink(tmp_path, store.root / "linked")
    with pytest.raises(NotFound):
        store.remove("linked")
    assert victim.read_text() == "keep me"
    store.remove("glim")
    assert victim.read_text() == "keep me"


def test_persona_yaml_on_disk_is_validated(store):
    _make(store)
    path = store.dir("glim") / "persona.yaml"
    data = yaml.safe_load(path.read_text())
    data["sampling"] = {"temperature": "hot"}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InvalidRequest, match="sampling.temperature"):
        store.get("glim")
    assert [p.name for p in store.list()] == []  # a broken persona does not break the listing


def test_edit_in_editor(store, monkeypatch):
    from openherd.commands.persona import _edit_in_editor

    _make(store)
    monkeypatch.setenv("EDITOR", "sed -i -e 's/^system:.*/system: Edited./' -e \"s/^version:.*/version: '7'/\"")
    monkeypatch.delenv("VISUAL", raising=False)
    p = _edit_in_editor(store, store.get("glim"))
    assert p.system == "Edited." and p.version == "7"
    assert store.get("glim").system == "Edited." and len(p.knowledge.sources) == 2

    # An edit that breaks the schema is refused; answering "n" abandons it and nothing changes.
    monkeypatch.setenv("EDITOR", "sed -i 's|^model:.*|model: ../etc|'")
    monkeypatch.setattr("builtins.input", lambda prompt="": "n")
    with pytest.raises(InvalidRequest, match="abandoned"):
        _edit_in_editor(store, store.get("glim"))
    assert store.get("glim").model == "tiny"
