"""The model store: names, manifests, blobs, pull of local GGUF files, resolve, list, rm, register."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from openherd.errors import InvalidModelFile, InvalidName, ModelNotFound, StoreError
from openherd.settings import get_settings
from openherd.store import Manifest, Store, validate_name
from openherd.store.manifest import MANIFEST_VERSION, format_parameters, format_size, manifest_filename

BAD_NAMES = [
    "",
    "../x",
    "..",
    ".",
    "/abs",
    "/nonexistent/model",
    "sha256:../x",
    "a/../../b",
    "a/b",
    "a\\b",
    "x\x00y",
    "-rf",
    ".hidden",
    "name:",
    ":tag",
    "a:b:c",
    "a b",
    "x" * 129,
]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and mtime: compare before/after to prove nothing was written."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name", ["smollm2", "smollm2:latest", "Llama-3.2-1B", "a", "m.v2_x-y:q8_0", "x" * 128]
)
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_names(name):
    with pytest.raises(InvalidName) as e:
        validate_name(name)
    assert "\x00" not in e.value.message and "\n" not in e.value.message


def test_manifest_filename_maps_tag():
    assert manifest_filename("smollm2:q8") == "smollm2@q8.json"
    with pytest.raises(InvalidName):
        manifest_filename("../x")


def test_formatting():
    assert format_parameters(134_515_008) == "134.5M"
    assert format_parameters(8_030_261_248) == "8.0B"
    assert format_parameters(139_584) == "139.6K"
    assert format_size(98_362_432) == "98 MB"
    assert format_size(4_700_000_000) == "4.7 GB"


# --------------------------------------------------------------------------- manifests


def test_manifest_json_roundtrip():
    m = Manifest(name="x", source="file:/a.gguf", sha256="ab" * 32, size=3, path="/p", details={"k": [1, 2]})
    again = Manifest.from_json(m.to_json())
    assert again == m
    assert json.loads(m.to_json())["version"] == MANIFEST_VERSION


@pytest.mark.parametrize(
    "text, needle",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"name": "x"}', "no manifest version"),
        ('{"version": 99, "name": "x"}', "upgrade openherd"),
        ('{"version": 1, "name": "x", "source": "", "sha256": "00", "size": 1, "path": ""}', "sha256"),
        (
            '{"version": 1, "name": "x", "source": "", "sha256": "' + "a" * 64 + '", "size": -1, "path": ""}',
            "size",
        ),
        (
            '{"version": 1, "name": "x", "source": 3, "sha256": "' + "a" * 64 + '", "size": 1, "path": ""}',
            "source",
        ),
        ('{"version": 1, "name": "x"}', "herd rm"),
    ],
)
def test_corrupt_manifests_are_actionable_store_errors(herd_home, text, needle):
    store = Store()
    store.models_dir.mkdir(parents=True)
    (store.models_dir / "x.json").write_text(text)
    with pytest.raises(StoreError) as e:
        store.resolve("x")
    assert needle in e.value.message
    assert "\n" not in e.value.message
    # `herd rm` is the way out, so it must work on a corrupt manifest, and list() must not die.
    assert store.list() == []
    assert store.remove("x") == "x"
    assert not (store.models_dir / "x.json").exists()


# --------------------------------------------------------------------------- pull (local GGUF), resolve, list


def test_pull_local_gguf(herd_home, tiny_gguf):
    store = Store()
    events = []
    m = store.pull(str(tiny_gguf), name="tiny", progress=events.append)

    assert m.name == "tiny"
    assert m.sha256 == sha256_of(tiny_gguf)
    assert m.size == tiny_gguf.stat().st_size
    assert m.architecture == "llama" and m.format == "gguf"
    assert m.quantization == "F32"
    assert m.context_length == 512
    assert m.parameters > 100_000
    assert m.chat_template and "<|im_start|>" in m.chat_template
    assert m.source == f"file:{tiny_gguf.resolve()}"
    blob = herd_home / "blobs" / f"sha256-{m.sha256}"
    assert Path(m.path) == blob and blob.read_bytes() == tiny_gguf.read_bytes()
    assert (herd_home / "models" / "tiny.json").is_file()
    statuses = [e.status for e in events]
    assert statuses[0] == "copying" and statuses[-2:] == ["writing manifest", "success"]
    assert events[statuses.index("copying") + 1].completed <= m.size

    assert store.resolve("tiny") == m
    assert store.resolve("tiny:latest").name == "tiny"  # Ollama clients add :latest
    assert [x.name for x in store.list()] == ["tiny"]
    assert store.exists("tiny") and not store.exists("nope") and not store.exists("../x")
    # nothing but the blob and the manifest: no partials left behind
    assert sorted(p.name for p in (herd_home / "blobs").iterdir()) == [f"sha256-{m.sha256}"]


def test_default_name_from_file_stem(herd_home, tiny_gguf, tmp_path):
    src = tmp_path / "my-model.gguf"
    shutil.copy(tiny_gguf, src)
    assert Store().pull(str(src)).name == "my-model"


def test_pull_with_tag(herd_home, tiny_gguf):
    store = Store()
    store.pull(str(tiny_gguf), name="tiny:f32")
    assert (herd_home / "models" / "tiny@f32.json").is_file()
    assert store.resolve("tiny:f32").name == "tiny:f32"
    with pytest.raises(ModelNotFound):
        store.resolve("tiny")


def test_resolve_gguf_path_is_validated_not_registered(herd_home, tiny_gguf):
    store = Store()
    for arg in (str(tiny_gguf), tiny_gguf):
        m = store.resolve(arg)
        assert m.name == "" and not m.registered
        assert m.path == str(tiny_gguf.resolve())
        assert m.architecture == "llama" and m.size == tiny_gguf.stat().st_size
    assert store.list() == []
    assert not (herd_home / "models").exists()


def test_resolve_unknown_name_suggests_pull(herd_home):
    with pytest.raises(ModelNotFound) as e:
        Store().resolve("nosuch")
    assert e.value.message == "model 'nosuch' not found; try `herd pull nosuch`"


def test_resolve_rejects_invalid_gguf(herd_home, tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 60)
    with pytest.raises(InvalidModelFile):
        Store().resolve(str(bad))


def test_pull_rejects_invalid_file_and_writes_nothing(herd_home, tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"this is not a model")
    before = snapshot(herd_home)
    with pytest.raises(InvalidModelFile):
        Store().pull(str(bad), name="junk")
    assert snapshot(herd_home) == before


def test_pull_twice_dedupes_and_rm_keeps_shared_blob(herd_home, tiny_gguf):
    store = Store()
    a = store.pull(str(tiny_gguf), name="a")
    b = store.pull(str(tiny_gguf), name="b")
    assert a.sha256 == b.sha256
    blob = Path(a.path)
    store.remove("a")
    assert blob.is_file(), "blob still used by 'b' must stay"
    assert store.resolve("b").path == str(blob)
    store.remove("b")
    assert not blob.exists(), "last reference gone: blob collected"
    assert store.list() == []


def test_repull_under_same_name_collects_old_blob(herd_home, tiny_gguf, tmp_path):
    from tinymodels import write_tiny_gguf

    other = write_tiny_gguf(tmp_path / "other.gguf", seed=7)
    store = Store()
    old = store.pull(str(tiny_gguf), name="m")
    new = store.pull(str(other), name="m")
    assert old.sha256 != new.sha256
    assert not Path(old.path).exists()
    assert store.resolve("m").sha256 == new.sha256


def test_remove_unknown(herd_home):
    with pytest.raises(ModelNotFound):
        Store().remove("ghost")


def test_missing_blob_is_a_store_error(herd_home, tiny_gguf):
    store = Store()
    m = store.pull(str(tiny_gguf), name="t")
    Path(m.path).unlink()
    with pytest.raises(StoreError) as e:
        store.resolve("t")
    assert "herd rm t" in e.value.message


def test_list_is_sorted_and_skips_corrupt(herd_home, tiny_gguf):
    store = Store()
    store.pull(str(tiny_gguf), name="zeta")
    store.pull(str(tiny_gguf), name="alpha")
    (herd_home / "models" / "broken.json").write_text("{")
    (herd_home / "models" / ".hidden.json").write_text("{}")
    (herd_home / "models" / "notes.txt").write_text("x")
    assert [m.name for m in store.list()] == ["alpha", "zeta"]


def test_manifest_moves_with_herd_home(herd_home, tiny_gguf, tmp_path, monkeypatch):
    Store().pull(str(tiny_gguf), name="t")
    moved = tmp_path / "moved-home"
    shutil.move(str(herd_home), moved)
    monkeypatch.setenv("HERD_HOME", str(moved))
    m = Store().resolve("t")
    assert m.path.startswith(str(moved)) and Path(m.path).is_file()


# --------------------------------------------------------------------------- register (fine-tuning)


def test_add_blob_and_register(herd_home, tiny_gguf, tmp_path):
    store = Store()
    base = store.pull(str(tiny_gguf), name="base")
    adapter_file = tmp_path / "adapter.gguf"
    adapter_file.write_bytes(b"GGUF-adapter-bytes")
    adapter = store.add_blob(adapter_file)
    assert adapter.sha256 == sha256_of(adapter_file) and adapter.path.is_file()

    tuned = Manifest(
        name="tuned:v1",
        source="tune:base",
        sha256=base.sha256,
        size=base.size,
        path="",
        architecture=base.architecture,
        base="base",
        adapter=str(adapter.path),
    )
    out = store.register(tuned)
    assert out.path == base.path and out.created_at
    got = store.resolve("tuned:v1")
    assert got.base == "base" and got.adapter == str(adapter.path)

    # Blob paths follow the store when HERD_HOME moves, the adapter's included.
    moved = tmp_path / "moved-home"
    shutil.copytree(herd_home, moved)
    again = Store(replace(get_settings(), home=moved)).resolve("tuned:v1")
    assert again.path.startswith(str(moved)) and again.adapter.startswith(str(moved))

    store.remove("base")
    assert Path(base.path).is_file(), "the tuned model still uses the base blob"
    store.remove("tuned:v1")
    assert not Path(base.path).exists() and not adapter.path.exists()


def test_register_requires_blob(herd_home):
    m = Manifest(name="x", source="tune:", sha256="cd" * 32, size=1, path="")
    with pytest.raises(StoreError):
        Store().register(m)


def test_register_rejects_bad_name(herd_home):
    m = Manifest(name="../x", source="tune:", sha256="cd" * 32, size=1, path="")
    with pytest.raises(InvalidName):
        Store().register(m)


# --------------------------------------------------------------------------- names that could escape the store


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_escaping_names_write_nothing_anywhere(herd_home, tiny_gguf, tmp_path, monkeypatch, bad):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    root = tmp_path.parent  # the tmp dir shared with neighbours: nothing may appear there either
    before = snapshot(root)
    store = Store()

    with pytest.raises(InvalidName):
        store.pull(bad)
    with pytest.raises(InvalidName):
        store.pull(str(tiny_gguf), name=bad)
    with pytest.raises(InvalidName):
        store.resolve(bad)
    with pytest.raises(InvalidName):
        store.remove(bad)
    assert snapshot(root) == before


def test_existing_non_model_file_is_rejected_and_nothing_written(herd_home, tmp_path):
    victim = tmp_path / "passwd"
    victim.write_text("root:x:0:0:root:/root:/bin/bash\n")
    before = snapshot(tmp_path.parent)
    with pytest.raises(InvalidModelFile):
        Store().pull(str(victim), name="x")
    with pytest.raises(InvalidModelFile):
        Store().resolve(str(victim))
    assert snapshot(tmp_path.parent) == before


# --------------------------------------------------------------------------- crash safety


def test_stale_partials_are_cleaned_by_next_pull(herd_home, tiny_gguf):
    blobs = herd_home / "blobs"
    blobs.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    (blobs / f".partial-{dead_pid}-abc123").write_bytes(b"half a model")
    (blobs / f".partial-{dead_pid}-def456").mkdir()
    (blobs / f".partial-{dead_pid}-def456" / "x").write_bytes(b"scratch")
    mine = blobs / f".partial-{os.getpid()}-0123ab"  # a live pull (this process): must be left alone
    mine.write_bytes(b"in progress")

    m = Store().pull(str(tiny_gguf), name="t")
    names = sorted(p.name for p in blobs.iterdir())
    assert names == sorted([f"sha256-{m.sha256}", mine.name])


def test_settings_dirs(herd_home):
    s = get_settings()
    store = Store(s)
    assert store.models_dir == herd_home / "models"
    assert store.blobs.root == herd_home / "blobs"
