"""``/v1/jobs``: fine-tunes and evaluations started from the browser.

    POST   /v1/jobs/tune?base=B&out=NAME[&epochs=..&max_steps=..&lr=..]   body: the training JSONL
    POST   /v1/jobs/eval        {"task": T, "models": [A] or [A, B], "limit"?: N, "fewshot"?: N}
    GET    /v1/jobs             recent jobs, newest first
    GET    /v1/jobs/tasks       built-in eval tasks
    GET    /v1/jobs/{id}        one job: status, progress, loss points, results, log tail
    GET    /v1/jobs/{id}/events NDJSON: a snapshot, then progress/log/status events until it ends
    POST   /v1/jobs/{id}/cancel stop it (a tune gets SIGINT first, so it saves a checkpoint)
    DELETE /v1/jobs/{id}        forget a finished job (cancels a running one) and remove its files

A job is the CLI run as a child process: ``python -m openherd tune ...`` or
``python -m openherd eval ... --json``. The CLI is the one implementation of
both; the server stays a thin launcher, and a crash or out-of-memory in
training cannot take the model server down with it. Children run in their own
process group at lower priority, and at most ``JobConfig.max_running`` at a time
(one by default: a fine-tune takes every core it can get); the rest queue.

Progress. ``herd tune --progress-json`` (when the CLI has it) prints one JSON
object per optimizer step and per validation; without it, the tqdm bar on
stderr is parsed (its postfix carries loss, lr and tok/s). Either way the run's
``history.json``, written at every checkpoint and at the end, replaces the
estimated points with the exact ones.

What a client sees never contains a server path: job files live under
``$HERD_HOME/jobs/<id>/`` and every line of output has the home directory
replaced by ``$HERD_HOME`` before it leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..atomic import atomic_write
from ..errors import HerdError, InvalidRequest, ModelNotFound, NotFound, QueueFull
from ..settings import Settings
from ..tune.config import field_type

log = logging.getLogger("openherd.web")

router = APIRouter(prefix="/v1/jobs")

PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the directory holding `openherd/`
JOB_ID_RE = re.compile(r"job-[0-9]{8}-[0-9]{6}-[0-9a-f]{6}")
KINDS = ("tune", "eval")
FINISHED = ("succeeded", "failed", "cancelled")
NDJSON = "application/x-ndjson"


@dataclass
class JobConfig:
    max_running: int = 1  # jobs running at once; a fine-tune alone saturates a small machine
    max_queued: int = 16  # waiting jobs before 429
    max_listed: int = 100  # jobs kept in memory (older finished ones stay on disk)
    log_lines: int = 400  # output lines kept per job
    cancel_grace: float = 15.0  # seconds between SIGINT (tune saves a checkpoint) and SIGKILL
    nice: int = 10  # children run at lower priority than the server answering chats

    def __post_init__(self):
        if self.max_running < 1 or self.max_queued < 0 or self.log_lines < 10:
            raise ValueError("JobConfig: max_running >= 1, max_queued >= 0, log_lines >= 10")


# ----------------------------------------------------------------------------- the job


@dataclass
class Job:
    id: str
    kind: str  # tune | eval
    params: dict[str, Any]  # what was asked for (names and numbers only)
    status: str = "queued"  # queued | running | succeeded | failed | cancelled
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    progress: dict[str, Any] = field(default_factory=dict)  # step, total, loss, eval_loss, tok_s, phase
    points: list[dict[str, Any]] = field(default_factory=list)  # {"step", "loss"} / {"step", "eval_loss"}
    result: dict[str, Any] | None = None  # tune: {"model"}; eval: {"task", "models": {name: summary}}
    error: str | None = None  # one line, for people
    log: deque[str] = field(default_factory=deque)
    exact_points: bool = False  # points come from history.json / --progress-json, not the tqdm estimate
    # runtime only
    task: asyncio.Task | None = field(default=None, repr=False)
    proc: asyncio.subprocess.Process | None = field(default=None, repr=False)
    cancel_requested: bool = False
    subscribers: set[asyncio.Queue] = field(default_factory=set, repr=False)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def to_dict(self, full: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "object": "job",
            "kind": self.kind,
            "status": self.status,
            "params": self.params,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "progress": self.progress,
            "result": self.result,
            "error": self.error,
        }
        if full:
            out["points"] = self.points
            out["log"] = list(self.log)
        return out

    def publish(self, event: dict[str, Any]) -> None:
        for q in list(self.subscribers):
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:  # a stalled reader: drop it; it can reconnect for a snapshot
                self.subscribers.discard(q)


def new_job_id() -> str:
    return time.strftime("job-%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)


# ----------------------------------------------------------------------------- parsing output

_TQDM_COUNT = re.compile(r"\|\s*(\d+)/(\d+)\s*\[")
_TQDM_FIELD = re.compile(r"\b(loss|eval|lr|tok_s)=([-+0-9.eE]+|nan|inf)")
_TUNED_LINE = re.compile(r"^tuned (\S+): (\d+) steps")


def parse_progress_json(line: str) -> dict[str, Any] | None:
    """One line of ``herd tune --progress-json``: {"step", "loss", ...} or {"step", "eval_loss"}."""
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("step"), int):
        return None
    return obj


def parse_tqdm(line: str) -> dict[str, Any] | None:
    """A tqdm refresh of `herd tune`: 'tune NAME:  40%|####  | 4/10 [00:02<00:03, 1.9step/s, loss=1.23, ...]'.

    tqdm draws the bar on update() and the new postfix is set just after, so the numbers
    on a line with counter N describe step N-1 (and the final line, drawn on close, step N);
    the caller places them and history.json corrects them at every checkpoint."""
    m = _TQDM_COUNT.search(line)
    if m is None:
        return None
    out: dict[str, Any] = {"count": int(m.group(1)), "total": int(m.group(2))}
    for k, v in _TQDM_FIELD.findall(line):
        try:
            out[k] = float(v)
        except ValueError:
            continue
    return out


def points_from_history(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for h in history:
        if not isinstance(h, dict) or not isinstance(h.get("step"), int):
            continue
        if isinstance(h.get("loss"), (int, float)):
            out.append({"step": h["step"], "loss": float(h["loss"])})
        if isinstance(h.get("eval_loss"), (int, float)):
            out.append({"step": h["step"], "eval_loss": float(h["eval_loss"])})
    return out


# ----------------------------------------------------------------------------- the manager


class JobManager:
    def __init__(self, settings: Settings, config: JobConfig | None = None):
        self.settings = settings
        self.config = config or JobConfig()
        self.root = settings.home / "jobs"
        self.jobs: dict[str, Job] = {}
        self._sem: asyncio.Semaphore | None = None
        self._cli_help: dict[str, str] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._sem = asyncio.Semaphore(self.config.max_running)
        await run_in_threadpool(self._load)

    async def close(self) -> None:
        running = [j for j in self.jobs.values() if not j.finished]
        for job in running:
            await self.cancel(job.id, reason="the server is shutting down")
        tasks = [j.task for j in running if j.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _load(self) -> None:
        """Finished jobs from earlier runs of the server, so their results stay visible."""
        if not self.root.is_dir():
            return
        for d in sorted(self.root.iterdir())[-self.config.max_listed :]:
            if not JOB_ID_RE.fullmatch(d.name):
                continue
            try:
                raw = json.loads((d / "job.json").read_text())
                job = Job(
                    id=d.name,
                    kind=raw["kind"],
                    params=raw["params"],
                    status=raw["status"],
                    created_at=raw["created_at"],
                    started_at=raw.get("started_at"),
                    finished_at=raw.get("finished_at"),
                    progress=raw.get("progress") or {},
                    points=raw.get("points") or [],
                    result=raw.get("result"),
                    error=raw.get("error"),
                    log=deque(raw.get("log") or [], maxlen=self.config.log_lines),
                )
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if not job.finished:  # the server stopped (or died) while it ran
                job.status, job.error = "failed", "the server stopped while this job was running"
                job.finished_at = job.finished_at or time.time()
            self.jobs[job.id] = job

    def _save(self, job: Job) -> None:
        atomic_write(self.root / job.id / "job.json", json.dumps(job.to_dict()))

    # ------------------------------------------------------------------ submit / cancel

    def _admit(self) -> None:
        waiting = sum(1 for j in self.jobs.values() if j.status == "queued")
        if waiting >= self.config.max_queued:
            raise QueueFull(
                f"{waiting} jobs are already waiting; wait for them or cancel some", retry_after=30
            )

    def _register(self, job: Job) -> Job:
        self.jobs[job.id] = job
        job.log = deque(job.log, maxlen=self.config.log_lines)
        finished = [j for j in self.jobs.values() if j.finished]
        while len(self.jobs) > self.config.max_listed and finished:
            self.jobs.pop(finished.pop(0).id, None)
        self._save(job)
        job.task = asyncio.get_running_loop().create_task(self._run(job))
        return job

    async def cancel(self, job_id: str, reason: str = "cancelled") -> Job:
        job = self.get(job_id)
        if job.finished:
            return job
        job.cancel_requested = True
        job.error = reason if reason != "cancelled" else None
        if job.proc is not None and job.proc.returncode is None:
            _signal_group(job.proc, signal.SIGINT)  # tune saves a checkpoint on Ctrl-C
            asyncio.get_running_loop().call_later(
                self.config.cancel_grace, _signal_group, job.proc, signal.SIGKILL
            )
        elif job.task is not None:
            job.task.cancel()  # still queued
        return job

    async def remove(self, job_id: str) -> None:
        job = self.get(job_id)
        if not job.finished:
            await self.cancel(job_id)
            if job.task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(asyncio.shield(job.task), self.config.cancel_grace + 5)
        self.jobs.pop(job.id, None)
        await run_in_threadpool(shutil.rmtree, self.root / job.id, True)

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id) if JOB_ID_RE.fullmatch(job_id or "") else None
        if job is None:
            raise NotFound(f"no job '{(job_id or '')[:64]}'", param="job")
        return job

    # ------------------------------------------------------------------ running

    def redact(self, text: str) -> str:
        home = str(self.settings.home)
        text = text.replace(home, "$HERD_HOME")
        return text.replace(str(PACKAGE_PARENT), "<openherd>")

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["HERD_HOME"] = str(self.settings.home)  # the server's settings, not the environment's
        if self.settings.threads:
            env["HERD_THREADS"] = str(self.settings.threads)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_PARENT), env.get("PYTHONPATH", "")) if p)
        return env

    async def cli_help(self, command: str) -> str:
        """`herd COMMAND --help`, once per server: which flags this CLI has (it imports only argparse)."""
        if command not in self._cli_help:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "openherd",
                command,
                "--help",
                env=self._env(),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await proc.communicate()
            self._cli_help[command] = out.decode(errors="replace")
        return self._cli_help[command]

    def _set(self, job: Job, **changes: Any) -> None:
        for k, v in changes.items():
            setattr(job, k, v)
        job.publish(
            {
                "type": "status",
                "status": job.status,
                "error": job.error,
                "result": job.result,
                "started_at": job.started_at,
                "finished_at": job.finished_at,
            }
        )
        with contextlib.suppress(OSError):
            self._save(job)

    def _log(self, job: Job, line: str) -> None:
        line = self.redact(line.rstrip())[:2000]
        if not line:
            return
        job.log.append(line)
        job.publish({"type": "log", "line": line})

    def _progress(self, job: Job, **values: Any) -> None:
        job.progress.update({k: v for k, v in values.items() if v is not None})
        job.publish({"type": "progress", "progress": job.progress})

    def _add_point(self, job: Job, point: dict[str, Any]) -> None:
        key = "loss" if "loss" in point else "eval_loss"
        for p in job.points:  # a step's estimate is replaced, never duplicated
            if p["step"] == point["step"] and key in p:
                p[key] = point[key]
                break
        else:
            job.points.append(point)
        job.publish({"type": "point", "point": point})

    def _replace_points(self, job: Job, points: list[dict[str, Any]]) -> None:
        job.points = points
        job.exact_points = True
        job.publish({"type": "points", "points": points})
        # The headline numbers follow the exact points too, not the last tqdm estimate.
        train = [p for p in points if "loss" in p]
        evals = [p for p in points if "eval_loss" in p]
        self._progress(
            job,
            loss=train[-1]["loss"] if train else None,
            eval_loss=evals[-1]["eval_loss"] if evals else None,
        )

    async def _run(self, job: Job) -> None:
        assert self._sem is not None, (
            "JobManager.start() was not called (mount_web wires it to the app lifespan)"
        )
        try:
            async with self._sem:
                if job.cancel_requested:
                    raise asyncio.CancelledError
                self._set(job, status="running", started_at=time.time())
                if job.kind == "tune":
                    await self._run_tune(job)
                else:
                    await self._run_eval(job)
            if job.cancel_requested:
                self._set(job, status="cancelled", finished_at=time.time())
            else:
                self._set(job, status="succeeded", finished_at=time.time())
        except asyncio.CancelledError:
            self._set(job, status="cancelled", finished_at=time.time())
        except HerdError as e:
            status = "cancelled" if job.cancel_requested else "failed"
            self._set(job, status=status, error=self.redact(e.message), finished_at=time.time())
        except Exception as e:  # never lose a job silently; the details go to the server log
            log.exception("job %s failed", job.id)
            self._set(
                job,
                status="failed",
                error=f"internal error ({e.__class__.__name__}); see the server log",
                finished_at=time.time(),
            )
        finally:
            job.publish({"type": "end"})
            job.proc = None

    async def _spawn(self, job: Job, argv: list[str], on_line) -> int:
        """Run `python -m openherd ARGV...`, feeding each output line (split on \\n and tqdm's \\r)."""
        cwd = self.root / job.id
        cwd.mkdir(parents=True, exist_ok=True)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "openherd",
            *argv,
            cwd=cwd,
            env=self._env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        job.proc = proc
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, proc.pid, self.config.nice)

        async def pump(stream: asyncio.StreamReader, name: str) -> None:
            buf = b""
            while True:
                chunk = await stream.read(65536)
                if not chunk:
                    break
                buf += chunk
                *lines, buf = re.split(rb"[\r\n]", buf)
                for raw in lines:
                    if raw.strip():
                        on_line(name, raw.decode("utf-8", errors="replace"))
                if len(buf) > 1 << 20:  # a runaway line: keep memory bounded
                    buf = buf[-65536:]
            if buf.strip():
                on_line(name, buf.decode("utf-8", errors="replace"))

        try:
            await asyncio.gather(pump(proc.stdout, "stdout"), pump(proc.stderr, "stderr"))
            return await proc.wait()
        except asyncio.CancelledError:
            _signal_group(proc, signal.SIGKILL)
            raise

    def _failure(self, job: Job, code: int, what: str) -> HerdError:
        """The child's own one-line error (`herd: error: ...`), or its exit code."""
        for line in reversed(job.log):
            if line.startswith("herd: error: "):
                return HerdError(line.removeprefix("herd: error: "))
        if code < 0:
            return HerdError(f"{what} was killed by signal {-code}")
        return HerdError(f"{what} exited with code {code}; see the job log")

    # ------------------------------------------------------------------ tune

    def run_dir(self, out: str) -> Path:
        return self.settings.home / "runs" / out  # `herd tune`'s default: --resume finds it from the CLI too

    async def _run_tune(self, job: Job) -> None:
        p = job.params
        data = self.root / job.id / "data.jsonl"
        argv = ["tune", p["base"], "--data", str(data), "--out", p["out"]]
        for key, flag in TUNE_FLAGS.items():
            if p.get(key) is not None and not isinstance(p[key], bool):
                argv += [flag, str(p[key])]
        for key in ("pack", "resume", "overwrite"):
            if p.get(key):
                argv.append("--" + key)
        progress_json = "--progress-json" in await self.cli_help("tune")
        if progress_json:
            argv.append("--progress-json")
        history = self.run_dir(p["out"]) / "history.json"
        history_mtime = [history.stat().st_mtime if history.exists() else 0.0]
        seen_final = [False]
        self._progress(job, phase="loading", step=0)

        def refresh_history() -> None:
            try:
                mtime = history.stat().st_mtime
            except OSError:
                return
            if mtime == history_mtime[0]:
                return
            history_mtime[0] = mtime
            try:
                points = points_from_history(json.loads(history.read_text()))
            except (OSError, ValueError):
                return
            if points:
                self._replace_points(job, points)

        def on_line(stream: str, line: str) -> None:
            obj = parse_progress_json(line) if progress_json and stream == "stdout" else None
            if obj is not None:
                step = obj["step"]
                if "loss" in obj:
                    self._add_point(job, {"step": step, "loss": float(obj["loss"])})
                    self._progress(
                        job,
                        phase="training",
                        step=step,
                        total=obj.get("total"),
                        loss=obj["loss"],
                        tok_s=obj.get("tok_s"),
                        lr=obj.get("lr"),
                    )
                if "eval_loss" in obj:
                    self._add_point(job, {"step": step, "eval_loss": float(obj["eval_loss"])})
                    self._progress(job, eval_loss=obj["eval_loss"])
                job.exact_points = True
                return
            bar = parse_tqdm(line) if stream == "stderr" else None
            if bar is not None:
                count, total = bar["count"], bar["total"]
                self._progress(job, phase="training", step=count, total=total, tok_s=bar.get("tok_s"))
                if "loss" in bar and not job.exact_points:
                    final = count == total and seen_final[0]
                    seen_final[0] = seen_final[0] or count == total
                    step = count if final else count - 1
                    if step >= 1:
                        self._add_point(job, {"step": step, "loss": bar["loss"]})
                        self._progress(job, loss=bar["loss"])
                    if "eval" in bar and step >= 1:
                        self._add_point(job, {"step": step, "eval_loss": bar["eval"]})
                        self._progress(job, eval_loss=bar["eval"])
                refresh_history()
                return
            self._log(job, line)
            m = _TUNED_LINE.match(line)
            if m:
                self._progress(job, phase="done", step=int(m.group(2)))

        code = await self._spawn(job, argv, on_line)
        refresh_history()
        if code != 0:
            if job.cancel_requested:
                return
            raise self._failure(job, code, "herd tune")
        job.result = {"model": p["out"], "steps": job.progress.get("step")}

    # ------------------------------------------------------------------ eval

    async def _run_eval(self, job: Job) -> None:
        p = job.params
        help_text = await self.cli_help("eval")
        models: dict[str, Any] = {}
        job.result = {"task": p["task"], "models": models}
        for i, model in enumerate(p["models"]):
            if job.cancel_requested:
                return
            self._progress(job, phase="evaluating", model=model, index=i + 1, total=len(p["models"]))
            out_dir = self.root / job.id / f"eval-{i + 1}"
            # `herd eval --model M` today; a positional MODEL if the CLI grows one instead.
            target = ["--model", model] if "--model" in help_text else [model]
            argv = ["eval", *target, "--task", p["task"], "--json", "--out", str(out_dir)]
            for key in ("limit", "fewshot"):
                if p.get(key) is not None:
                    argv += [f"--{key}", str(p[key])]
            metrics: list[dict[str, Any]] = []

            def on_line(stream: str, line: str, metrics=metrics) -> None:
                if stream == "stdout" and line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        obj = json.loads(line)
                        if isinstance(obj, dict):
                            metrics.append(obj)
                            return
                self._log(job, line)

            code = await self._spawn(job, argv, on_line)
            if code != 0:
                if job.cancel_requested:
                    return
                raise self._failure(job, code, f"herd eval of {model}")
            summary = await run_in_threadpool(_read_results, out_dir / "results.json")
            if not summary.get("metrics") and metrics:
                summary["metrics"] = metrics[-1]
            models[model] = summary
            job.publish({"type": "result", "result": job.result})


def _read_results(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    keep = ("task", "type", "metrics", "intervals", "counts", "settings")
    return {k: raw[k] for k in keep if k in raw}


def _signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the child's pid


# ----------------------------------------------------------------------------- requests

# Query parameter (a TuneConfig field) -> (minimum, maximum): what a browser may ask for. The
# CLI flag and the type come from TuneConfig (tune/config.py), whose checks run again in the job.
TUNE_LIMITS: dict[str, tuple[float, float]] = {
    "epochs": (0.01, 1000), "max_steps": (0, 10_000_000), "lr": (1e-8, 1.0),
    "rank": (1, 1024), "alpha": (0.01, 10_000), "dropout": (0.0, 0.9),
    "batch_size": (1, 4096), "grad_accum": (1, 4096), "seq_len": (8, 1 << 20),
    "warmup": (-1, 10_000_000), "eval_split": (0.0, 0.9), "eval_every": (0, 10_000_000),
    "save_every": (1, 10_000_000), "seed": (0, 2**31 - 1),
}  # fmt: skip
TUNE_FLAGS = {name: "--" + name.replace("_", "-") for name in TUNE_LIMITS}
BOOL_FLAGS = ("pack", "resume", "overwrite")


def _number(name: str, raw: str) -> float | int:
    kind, (lo, hi) = field_type(name), TUNE_LIMITS[name]
    try:
        value = kind(raw)
    except ValueError:
        raise InvalidRequest(
            f"{name} must be {'an integer' if kind is int else 'a number'}", param=name
        ) from None
    if not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be between {lo:g} and {hi:g}", param=name)
    return value


def _flag(raw: str, name: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off", ""):
        return False
    raise InvalidRequest(f"{name} must be true or false", param=name)


def _store(request: Request):
    state = getattr(request.app.state, "herd", None)
    store = getattr(state, "store", None)
    if store is None:
        from ..store import Store

        store = Store(request.app.state.web.settings)
    return store


def _manager(request: Request) -> JobManager:
    return request.app.state.web.jobs


def _check_model(store, name: str, param: str) -> str:
    """A registered store name (never a path: a browser must not make the server read its files)."""
    from ..store.manifest import validate_name

    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"{param} must name a model in the store", param=param)
    validate_name(name)
    manifest = store.get(name)
    if manifest is None:
        raise ModelNotFound(name)
    return manifest.name


def check_training_data(path: Path) -> int:
    """Parse the uploaded JSONL with the tune package's own reader: a bad line is a 400 now,
    not a failed job later. Returns the number of examples."""
    from ..tune.data import read_jsonl

    return len(read_jsonl(path))


@router.post("/tune")
async def start_tune(request: Request) -> Response:
    jobs = _manager(request)
    q = request.query_params
    known = {"base", "out", *TUNE_FLAGS, *BOOL_FLAGS}
    unknown = sorted(set(q) - known)
    if unknown:
        raise InvalidRequest(f"unknown parameter {unknown[0]!r}", param=unknown[0])
    store = _store(request)
    from ..store.manifest import validate_name

    base = await run_in_threadpool(_check_model, store, q.get("base", ""), "base")
    out = q.get("out", "")
    if not out:
        raise InvalidRequest("name the tuned model: out=NAME", param="out")
    validate_name(out)
    if ":" in out:
        raise InvalidRequest("out must be a plain name without a :tag", param="out")
    if out == base:
        raise InvalidRequest(f"out={out} would replace the base model; choose a new name", param="out")
    if await run_in_threadpool(store.get, out) is not None:
        raise InvalidRequest(
            f"a model named '{out}' already exists; choose another name or delete it first", param="out"
        )
    busy = [
        j for j in jobs.jobs.values() if j.kind == "tune" and not j.finished and j.params.get("out") == out
    ]
    if busy:
        raise InvalidRequest(f"job {busy[0].id} is already training '{out}'", param="out")
    params: dict[str, Any] = {"base": base, "out": out}
    for name in TUNE_FLAGS:
        if q.get(name) not in (None, ""):
            params[name] = _number(name, q[name])
    for name in BOOL_FLAGS:
        if name in q:
            params[name] = _flag(q[name], name)
    if params.get("resume") and params.get("overwrite"):
        raise InvalidRequest("resume and overwrite contradict each other", param="resume")
    body = await request.body()
    if not body.strip():
        raise InvalidRequest("send the training data (JSONL) as the request body", param="data")
    jobs._admit()
    job = Job(id=new_job_id(), kind="tune", params=params)
    d = jobs.root / job.id
    try:
        d.mkdir(parents=True, exist_ok=True)
        (d / "data.jsonl").write_bytes(body)
        params["examples"] = await run_in_threadpool(check_training_data, d / "data.jsonl")
    except BaseException as e:
        # Whatever stopped it (a bad line, a disk error, a bug, a cancelled request), the
        # job directory goes: an unregistered job is listed nowhere and never cleaned up.
        shutil.rmtree(d, ignore_errors=True)
        if isinstance(e, HerdError):
            raise InvalidRequest(
                jobs.redact(e.message).replace("$HERD_HOME/jobs/" + job.id + "/", ""), param="data"
            ) from None
        raise
    params["data_bytes"] = len(body)
    jobs._register(job)
    return JSONResponse(job.to_dict(), status_code=201)


@router.post("/eval")
async def start_eval(request: Request) -> Response:
    jobs = _manager(request)
    raw = await request.body()
    try:
        data = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise InvalidRequest('send a JSON object: {"task": "basics-mc", "models": ["base", "tuned"]}')
    from ..evals.tasks import builtin_tasks

    task = data.get("task")
    tasks = builtin_tasks()
    if not isinstance(task, str) or task not in tasks:
        raise InvalidRequest(f"task must be one of {', '.join(sorted(tasks))}", param="task")
    models = data.get("models")
    if isinstance(data.get("model"), str) and models is None:
        models = [data["model"]]
    if not isinstance(models, list) or not 1 <= len(models) <= 4:
        raise InvalidRequest(
            "models must be a list of 1 to 4 model names (base and tuned side by side)", param="models"
        )
    store = _store(request)
    checked = [await run_in_threadpool(_check_model, store, m, "models") for m in models]
    if len(set(checked)) != len(checked):
        raise InvalidRequest("the same model is listed twice", param="models")
    params: dict[str, Any] = {"task": task, "models": checked}
    for key, lo in (("limit", 1), ("fewshot", 0)):
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= 1_000_000:
            raise InvalidRequest(f"{key} must be an integer >= {lo}", param=key)
        params[key] = value
    jobs._admit()
    job = jobs._register(Job(id=new_job_id(), kind="eval", params=params))
    return JSONResponse(job.to_dict(), status_code=201)


@router.get("")
async def list_jobs(request: Request, kind: str = "") -> Response:
    if kind and kind not in KINDS:
        raise InvalidRequest(f"kind must be one of {', '.join(KINDS)}", param="kind")
    jobs = sorted(_manager(request).jobs.values(), key=lambda j: j.created_at, reverse=True)
    data = [j.to_dict(full=False) for j in jobs if not kind or j.kind == kind]
    return JSONResponse({"object": "list", "data": data})


@router.get("/tasks")
async def list_tasks(request: Request) -> Response:
    from ..evals.tasks import builtin_tasks, parse_spec

    def read() -> list[dict[str, Any]]:
        out = []
        for name, path in builtin_tasks().items():
            try:
                spec = parse_spec(path)
            except HerdError:
                continue
            out.append({"name": name, "type": spec.type, "description": spec.description})
        return out

    return JSONResponse({"object": "list", "data": await run_in_threadpool(read)})


@router.get("/{job_id}")
async def get_job(job_id: str, request: Request) -> Response:
    return JSONResponse(_manager(request).get(job_id).to_dict())


@router.get("/{job_id}/events")
async def job_events(job_id: str, request: Request) -> Response:
    job = _manager(request).get(job_id)
    queue: asyncio.Queue = asyncio.Queue(maxsize=10_000)
    job.subscribers.add(queue)

    async def stream():
        try:
            yield json.dumps({"type": "snapshot", "job": job.to_dict()}) + "\n"
            if job.finished:
                yield json.dumps({"type": "end"}) + "\n"
                return
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=15.0)
                except TimeoutError:
                    yield json.dumps({"type": "ping"}) + "\n"  # keeps proxies from closing an idle stream
                    continue
                yield json.dumps(event) + "\n"
                if event.get("type") == "end":
                    return
        finally:
            job.subscribers.discard(queue)

    return StreamingResponse(
        stream(), media_type=NDJSON, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


@router.post("/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request) -> Response:
    job = await _manager(request).cancel(job_id)
    return JSONResponse(job.to_dict(full=False))


@router.delete("/{job_id}")
async def delete_job(job_id: str, request: Request) -> Response:
    jobs = _manager(request)
    job = jobs.get(job_id)
    await jobs.remove(job.id)
    return JSONResponse({"id": job.id, "object": "job", "deleted": True})
