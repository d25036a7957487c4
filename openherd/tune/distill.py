"""`herd distill`: synthetic training data from a teacher model.

    herd distill --teacher http://127.0.0.1:11435/v1 --model smollm2 --prompts q.txt --out data.jsonl
    herd distill --teacher smollm2 --prompts q.jsonl --out data.jsonl      # a local model, no server
    herd tune smollm2 --data data.jsonl --out mine                          # the output feeds tune

The teacher is any OpenAI-compatible endpoint (herd itself, llama-server, vLLM, a
closed API) called with httpx, or a local model run on openherd's own engine.

* Concurrency: a fixed pool of workers (``--concurrency``) pulls prompts from a queue,
  so at most that many requests are in flight and memory stays flat for any file size.
* Resume: every answer is appended as one complete JSON line and fsynced as soon as it
  arrives. Rerunning the same command reads the output first and asks only for what is
  missing; a line cut short by a kill is trimmed away.
* Duplicates: prompts are keyed by their normalised text (whitespace collapsed, case
  folded) and asked once; an answer identical (normalised) to one already kept for the
  same prompt is dropped (``--samples N`` with sampling can repeat itself).
* Rate limits and flaky servers: 429 / 5xx / connection errors are retried with
  exponential backoff (honouring Retry-After); other 4xx fail that prompt only, except
  401/403/404, which would fail every prompt and stop the run at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AuthError, HerdError, InvalidRequest, Unavailable

log = logging.getLogger("openherd.tune")

__all__ = ["DistillConfig", "DistillStats", "Prompt", "distill", "read_prompts"]


@dataclass
class DistillConfig:
    teacher: str  # http(s) URL of an OpenAI-compatible API, or a store model name / .gguf path
    prompts: str  # .txt (one prompt per line) or .jsonl ({"prompt": ...} or {"messages": [...]})
    out: str  # JSONL written in `herd tune`'s chat format, appended to (resumable)
    model: str | None = None  # model id at the endpoint (default: the first of GET /models)
    system: str | None = None  # system prompt added to every request
    samples: int = 1  # answers kept per prompt
    concurrency: int = 4  # requests in flight
    max_tokens: int = 512
    temperature: float = 0.7
    seed: int | None = None
    api_key: str | None = None  # bearer token for the endpoint
    timeout: float = 120.0  # seconds per request
    retries: int = 4  # retries of a retryable failure (429, 5xx, connection)
    keep_truncated: bool = False  # keep answers cut off by max_tokens (finish_reason "length")
    progress: bool = True

    def __post_init__(self):
        if self.samples < 1:
            raise InvalidRequest("--samples must be >= 1", param="samples")
        if not 1 <= self.concurrency <= 256:
            raise InvalidRequest("--concurrency must be between 1 and 256", param="concurrency")
        if self.max_tokens < 1:
            raise InvalidRequest("--max-tokens must be >= 1", param="max_tokens")
        if not 0 <= self.temperature <= 2:
            raise InvalidRequest("--temperature must be in [0, 2]", param="temperature")
        if self.timeout <= 0 or self.retries < 0:
            raise InvalidRequest("--timeout must be > 0 and --retries >= 0")


@dataclass
class DistillStats:
    prompts: int = 0  # distinct prompts in the prompts file
    duplicate_prompts: int = 0  # prompt lines that repeat an earlier one (normalised)
    already_done: int = 0  # answers found in the output from an earlier run
    requested: int = 0
    written: int = 0
    duplicates: int = 0  # answers identical to one already kept for the same prompt
    truncated: int = 0  # answers cut off by max_tokens (dropped unless keep_truncated)
    empty: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)  # the first few failure messages


# --------------------------------------------------------------------------- prompts and keys


@dataclass
class Prompt:
    messages: list[dict[str, Any]]  # the request, system prompt included
    key: str  # normalised hash of the messages
    where: str


def normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


def prompt_key(messages: list[dict[str, Any]]) -> str:
    norm = [[m.get("role", ""), normalize(m.get("content") or "")] for m in messages]
    return hashlib.sha256(json.dumps(norm, ensure_ascii=False).encode()).hexdigest()


def answer_key(pkey: str, answer: str) -> str:
    return hashlib.sha256(f"{pkey}\x00{normalize(answer)}".encode()).hexdigest()


def read_prompts(path: str | Path, system: str | None = None) -> tuple[list[Prompt], int]:
    """Distinct prompts of a .txt or .jsonl file (and how many duplicate lines were dropped)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InvalidRequest(f"prompts file not found: {path}", param="prompts") from None
    except OSError as e:
        raise InvalidRequest(f"cannot read {path}: {e.strerror or e}", param="prompts") from None
    is_jsonl = path.suffix.lower() in (".jsonl", ".json", ".ndjson")
    head = [{"role": "system", "content": system}] if system else []
    seen: set[str] = set()
    out: list[Prompt] = []
    dupes = 0
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            raise InvalidRequest(f"{where}: not UTF-8 text (byte {e.start + 1})", param="prompts") from None
        messages = head + (_jsonl_prompt(text, where) if is_jsonl else [{"role": "user", "content": text}])
        key = prompt_key(messages)
        if key in seen:
            dupes += 1
            continue
        seen.add(key)
        out.append(Prompt(messages, key, where))
    if not out:
        raise InvalidRequest(f"{path} has no prompts", param="prompts")
    return out, dupes


def _jsonl_prompt(text: str, where: str) -> list[dict[str, Any]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"{where}: invalid JSON ({e.msg} at column {e.colno})", param="prompts") from None
    if isinstance(obj, str):
        obj = {"prompt": obj}
    if not isinstance(obj, dict):
        raise InvalidRequest(f"{where}: expected a JSON object or string", param="prompts")
    if isinstance(obj.get("prompt"), str):
        return [{"role": "user", "content": obj["prompt"]}]
    messages = obj.get("messages")
    if isinstance(messages, list) and messages:
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                   for m in messages):  # fmt: skip
            raise InvalidRequest(f"{where}: every message needs a string role and content", param="prompts")
        if messages[-1]["role"] == "assistant":
            raise InvalidRequest(f"{where}: the conversation already ends with an assistant answer", param="prompts")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    raise InvalidRequest(f'{where}: expected {{"prompt": "..."}} or {{"messages": [...]}}', param="prompts")


def read_done(out: Path) -> dict[str, set[str]]:
    """Prompt key -> answer keys already in the output. Trims a last line cut short by a kill."""
    done: dict[str, set[str]] = {}
    if not out.exists():
        return done
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        log.warning("%s: dropping an incomplete last line (the previous run was interrupted mid-write)", out)
        with open(out, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            messages = obj["messages"]
            answer = messages[-1]["content"]
            assert messages[-1]["role"] == "assistant" and isinstance(answer, str)
        except (ValueError, KeyError, TypeError, IndexError, AssertionError):
            raise InvalidRequest(
                f"{out}:{lineno}: not a distill output line; write to a new --out file", param="out"
            ) from None
        pkey = prompt_key(messages[:-1])
        done.setdefault(pkey, set()).add(answer_key(pkey, answer))
    return done


# --------------------------------------------------------------------------- teachers


class _Fatal(Exception):
    """Carries a failure every other request would hit too (bad key, unknown model): stop the run."""

    def __init__(self, error: HerdError):
        super().__init__(error.message)
        self.error = error


class HTTPTeacher:
    """An OpenAI-compatible /chat/completions endpoint."""

    def __init__(self, url: str, cfg: DistillConfig):
        import httpx

        self.base = _api_base(url)
        self.cfg = cfg
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self.client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(cfg.timeout, connect=10.0))
        self.model = cfg.model or ""

    async def start(self) -> None:
        if not self.model:
            self.model = await self._first_model()

    async def _first_model(self) -> str:
        import httpx

        try:
            r = await self.client.get(f"{self.base}/models")
        except httpx.HTTPError as e:
            raise Unavailable(f"cannot reach the teacher at {self.base}: {e}") from None
        if r.status_code in (401, 403):
            raise AuthError(f"the teacher rejected the API key ({r.status_code}); set --api-key-env") from None
        try:
            return r.json()["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise InvalidRequest(f"{self.base}/models lists no model; pass --model NAME") from None

    async def complete(self, messages: list[dict[str, Any]]) -> tuple[str, str]:
        import httpx

        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.cfg.max_tokens,
                                "temperature": self.cfg.temperature}  # fmt: skip
        if self.cfg.seed is not None:
            body["seed"] = self.cfg.seed
        for attempt in range(self.cfg.retries + 1):
            retry_after = None
            try:
                r = await self.client.post(f"{self.base}/chat/completions", json=body)
            except httpx.HTTPError as e:
                problem = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    return _parse_choice(r)
                problem = f"HTTP {r.status_code}: {_error_message(r)}"
                if r.status_code in (401, 403):
                    raise _Fatal(AuthError(f"the teacher rejected the request ({problem}); check --api-key-env"))
                if r.status_code == 404:
                    raise _Fatal(InvalidRequest(f"the teacher has no model {self.model!r} ({problem}); check --model"))
                if r.status_code != 429 and r.status_code < 500:
                    raise InvalidRequest(problem)
                retry_after = _retry_after(r)
            if attempt == self.cfg.retries:
                raise Unavailable(f"{problem} (after {self.cfg.retries} retries)")
            delay = retry_after if retry_after is not None else min(30.0, 0.5 * 2**attempt) * (0.5 + random.random())
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self.client.aclose()


def _api_base(url: str) -> str:
    """'http://h:p' -> 'http://h:p/v1'; '.../v1/chat/completions' -> '.../v1'."""
    url = url.rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    from urllib.parse import urlsplit

    return url if urlsplit(url).path not in ("", "/") else url + "/v1"


def _parse_choice(r: Any) -> tuple[str, str]:
    try:
        choice = r.json()["choices"][0]
        return choice["message"].get("content") or "", choice.get("finish_reason") or "stop"
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise InvalidRequest("the teacher's response is not an OpenAI chat completion") from None


def _error_message(r: Any) -> str:
    try:
        return str(r.json()["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return r.text[:200]


def _retry_after(r: Any) -> float | None:
    try:
        return min(60.0, max(0.0, float(r.headers["retry-after"])))
    except (KeyError, ValueError):
        return None


class LocalTeacher:
    """A store model (or .gguf) on openherd's engine: requests batch in one llama.cpp context."""

    def __init__(self, name: str, cfg: DistillConfig):
        from ..engine.engine import Engine, EngineConfig
        from ..settings import get_settings
        from ..store import Store

        settings = get_settings()
        manifest = Store(settings).ensure(name)
        ecfg = EngineConfig(n_ctx=settings.num_ctx, n_parallel=cfg.concurrency, n_threads=settings.threads,
                            max_queue=cfg.concurrency, lora=manifest.adapter)  # fmt: skip
        self.engine = Engine.load(manifest.path, ecfg, name=manifest.name or name)
        self.cfg = cfg

    async def start(self) -> None:
        pass

    async def complete(self, messages: list[dict[str, Any]]) -> tuple[str, str]:
        from ..engine.types import FinishEvent, GenerationRequest, SamplingParams

        params = SamplingParams(temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens, seed=self.cfg.seed)
        handle = self.engine.submit(GenerationRequest(self.engine.encode_chat(messages), params))
        parts: list[str] = []
        async for ev in handle:
            parts.append(ev.text)
            if isinstance(ev, FinishEvent):
                if ev.reason == "error":
                    raise Unavailable(ev.error or "generation failed")
                return "".join(parts), ev.reason
        raise Unavailable("generation ended without finishing")

    async def close(self) -> None:
        self.engine.close()


def is_url(teacher: str) -> bool:
    return teacher.startswith(("http://", "https://"))


# --------------------------------------------------------------------------- the run


def distill(cfg: DistillConfig, teacher_factory: Callable[[], Any] | None = None) -> DistillStats:
    """Ask the teacher for every missing answer and append them to cfg.out."""
    prompts, dupes = read_prompts(cfg.prompts, cfg.system)
    out = Path(cfg.out)
    if out.is_dir():
        raise InvalidRequest(f"--out {out} is a directory; give a .jsonl file", param="out")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out)
    stats = DistillStats(prompts=len(prompts), duplicate_prompts=dupes)
    jobs: list[Prompt] = []
    for p in prompts:
        have = len(done.get(p.key, ()))
        stats.already_done += min(have, cfg.samples)
        jobs += [p] * max(0, cfg.samples - have)
    if not jobs:
        return stats
    factory = teacher_factory or (lambda: HTTPTeacher(cfg.teacher, cfg) if is_url(cfg.teacher) else LocalTeacher(cfg.teacher, cfg))
    asyncio.run(_run(cfg, factory(), jobs, done, out, stats))
    if stats.written == 0 and stats.failed == len(jobs):
        raise Unavailable(f"the teacher answered none of {len(jobs)} requests: {stats.errors[0]}")
    return stats


async def _run(cfg: DistillConfig, teacher: Any, jobs: list[Prompt], done: dict[str, set[str]], out: Path,
               stats: DistillStats) -> None:  # fmt: skip
    try:
        await teacher.start()
        await _work(cfg, teacher, jobs, done, out, stats)
    finally:
        await teacher.close()


async def _work(cfg: DistillConfig, teacher: Any, jobs: list[Prompt], done: dict[str, set[str]], out: Path,
                stats: DistillStats) -> None:  # fmt: skip
    queue: asyncio.Queue[Prompt] = asyncio.Queue()
    for j in jobs:
        queue.put_nowait(j)
    bar = _bar(cfg, len(jobs))
    fatal: list[BaseException] = []
    with open(out, "ab") as f:

        def keep(p: Prompt, answer: str) -> None:
            line = json.dumps({"messages": p.messages + [{"role": "assistant", "content": answer}]}, ensure_ascii=False)
            f.write(line.encode("utf-8") + b"\n")  # one write per line: a kill leaves whole lines (+ at most one cut)
            f.flush()
            os.fsync(f.fileno())

        async def worker() -> None:
            while not fatal:
                try:
                    p = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                stats.requested += 1
                try:
                    answer, finish = await teacher.complete(p.messages)
                except _Fatal as e:
                    fatal.append(e.error)
                    return
                except HerdError as e:
                    stats.failed += 1
                    if len(stats.errors) < 5:
                        stats.errors.append(f"{p.where}: {e.message}")
                    log.warning("%s: %s", p.where, e.message)
                else:
                    _accept(cfg, p, answer, finish, done, stats, keep)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(written=stats.written, dup=stats.duplicates, failed=stats.failed, refresh=False)

        try:
            await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        finally:
            if bar is not None:
                bar.close()
    if fatal:
        raise fatal[0]


def _accept(cfg: DistillConfig, p: Prompt, answer: str, finish: str, done: dict[str, set[str]],
            stats: DistillStats, keep: Callable[[Prompt, str], None]) -> None:  # fmt: skip
    if not answer.strip():
        stats.empty += 1
        return
    if finish == "length":
        stats.truncated += 1
        if not cfg.keep_truncated:
            return
    akey = answer_key(p.key, answer)
    seen = done.setdefault(p.key, set())
    if akey in seen:
        stats.duplicates += 1
        return
    seen.add(akey)
    keep(p, answer)
    stats.written += 1


def _bar(cfg: DistillConfig, total: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="distill", unit="req", file=sys.stderr, dynamic_ncols=True)
