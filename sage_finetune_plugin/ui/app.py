"""The web UI's FastAPI application: the page, and the REST API under ``/api/v1`` it uses.

Every route calls the service the matching command calls (``scan_tasks`` for ``list``,
``quickstart``, ``plan_run``, ``cancel_run``, ``delete_task``, the eval report) and long
operations run as the commands themselves in worker processes (``jobs.py``). A service's
FinetuneError becomes its one-line message (``{"error": ...}``) with an HTTP status: 404 for an
unknown task, 409 for a task that is training or busy, 413 for an upload over the limit, 403
for a path outside the root, 400 for other bad input (422 for a malformed request body).

Only the root is reachable: tasks by name (never a path), data by a path inside the root
(uploads land in ``ROOT/.uploads``). With a token every request must carry it (``Authorization:
Bearer TOKEN``, or ``?token=TOKEN`` for the page and its event streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import queue
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from .._version import __version__
from ..books import progress_history
from ..config import flags
from ..errors import (
    DataError,
    DependencyError,
    FinetuneError,
    LockError,
    TaskError,
    UsageProblem,
    first_line,
)
from ..paths import EVAL_DIR, META_FILENAME, atomic_file, remove_tree, validate_task_name
from ..task import Task, TaskEntry, delete_task, scan_tasks
from .jobs import Jobs

STATIC = Path(__file__).resolve().parent / "static"
UPLOADS = ".uploads"
TOKEN_COOKIE = "sage_finetune_token"
DEFAULT_MAX_UPLOAD = 100 * 1024 * 1024
#: Seconds between two events of a progress stream.
STREAM_INTERVAL = 1.0


class NotFound(TaskError):
    """No such task under the root (HTTP 404)."""


class OutsideRoot(UsageProblem):
    """A path that leads out of the root (HTTP 403)."""


class TooLarge(DataError):
    """An upload over the limit (HTTP 413)."""


def http_status(exc: FinetuneError) -> int:
    """The HTTP status of a service's error."""
    for kind, code in (
        (NotFound, 404),
        (OutsideRoot, 403),
        (TooLarge, 413),
        (LockError, 409),
        (TaskError, 409),  # a task in the wrong state: not training, already exists, ...
        (DependencyError, 503),
    ):
        if isinstance(exc, kind):
            return code
    return 400


# --- request bodies ----------------------------------------------------------------------------


class TaskSpec(BaseModel):
    """A new task (``quickstart``): its data is a path inside the root (an upload's ``path``)."""

    data: str = Field(description="Data file or folder, relative to the root (or an upload's)")
    task_type: str = "custom"
    name: str | None = None
    model: str | None = Field(default=None, description="Base model: Hub id or local model folder")
    preset: str = "auto"
    method: str | None = None
    max_length: int | None = None
    system_prompt: str | None = None
    skip_invalid: bool = False
    force: bool = False
    preview: int = Field(
        default=3, ge=0, le=20, description="Samples to show as the model sees them"
    )


class RunSpec(BaseModel):
    """A run (``run``): the task's recorded config, then these."""

    resume: bool = False
    force: bool = False
    preset: str | None = None
    max_steps: int | None = Field(default=None, ge=1)
    epochs: float | None = Field(default=None, gt=0)
    learning_rate: float | None = Field(default=None, gt=0)
    max_length: int | None = Field(default=None, ge=8)
    batch_size: int | None = Field(default=None, ge=1)
    settings: list[str] = Field(default_factory=list, description="KEY=VALUE, as --set")


class EvalSpec(BaseModel):
    max_samples: int = Field(default=100, ge=1)
    max_new_tokens: int | None = Field(default=None, ge=1)
    base_only: bool = False
    no_base: bool = False


class ExportSpec(BaseModel):
    quant: str = "f16"
    adapter: bool = False
    force: bool = False


class MergeSpec(BaseModel):
    force: bool = False


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    """One OpenAI-style chat request. ``model``: a task name (its tuned model) or
    ``TASK:base`` (its base model)."""

    model: str
    messages: list[ChatMessage]
    stream: bool = False
    max_tokens: int = Field(default=128, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0)


# --- the application ---------------------------------------------------------------------------


@dataclass
class UiState:
    root: Path
    token: str | None = None
    max_upload: int = DEFAULT_MAX_UPLOAD
    jobs: Jobs = field(default_factory=Jobs)
    chats: dict[tuple[str, bool], tuple[Any, threading.Lock, str]] = field(default_factory=dict)
    chat_lock: threading.Lock = field(default_factory=threading.Lock)

    def task_dir(self, name: str) -> Path:
        """The task called ``name`` directly under the root (a name, never a path)."""
        try:
            validate_task_name(name)
        except TaskError as exc:  # no task can have that name
            raise NotFound(str(exc)) from None
        path = self.root / name
        if not (path / META_FILENAME).is_file():
            raise NotFound(f"Task {name!r} not found under {self.root}.")
        return path

    def task(self, name: str) -> Task:
        return Task(self.task_dir(name))

    def inside(self, value: str) -> Path:
        """A path given to the API, relative to the root; refused when it leads out of it."""
        path = (self.root / value).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise OutsideRoot(
                f"data={value} is outside the root {self.root}: put the file under the root "
                "or upload it."
            )
        if not path.exists():
            raise DataError(f"data={value}: no such file or directory under the root.")
        return path

    def row(self, entry: TaskEntry) -> dict[str, Any]:
        """The task's ``list`` row, with the job this server runs on it."""
        job = self.jobs.get(entry.name)
        return {**entry.summary(), "job": job.to_dict() if job else None}


def create_app(
    root: Path,
    *,
    token: str | None = None,
    max_upload: int = DEFAULT_MAX_UPLOAD,
    on_ready: Callable[[], None] | None = None,
) -> FastAPI:
    """The application serving the tasks under ``root``."""
    state = UiState(Path(root), token, max_upload)
    state.root.mkdir(parents=True, exist_ok=True)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if on_ready is not None:
            on_ready()
        yield
        await asyncio.to_thread(state.jobs.stop_all)  # runs end checkpointed and resumable

    app = FastAPI(
        title="sage finetune",
        version=__version__,
        description="Fine-tuning tasks: create, run, watch, evaluate, export, chat.",
        openapi_url="/api/v1/openapi.json",
        docs_url=None,  # Swagger UI loads from a CDN: offline machines get the JSON only
        redoc_url=None,
        lifespan=lifespan,
    )

    @app.middleware("http")
    async def require_token(request: Request, call_next: Any) -> Any:
        """With a token: every request carries it (the header, ?token=, or the cookie the
        page gets when opened with ?token=, which its scripts and styles then send)."""
        if state.token is None:
            return await call_next(request)
        header = request.headers.get("authorization", "")
        given = (
            header[7:].strip()
            if header.lower().startswith("bearer ")
            else request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
        )
        if not hmac.compare_digest(given.encode(), state.token.encode()):
            return JSONResponse(
                {"error": "A token is required: send `Authorization: Bearer TOKEN` (or open "
                 "the page with ?token=TOKEN), as printed by `sage finetune ui`."},
                status_code=401,
            )  # fmt: skip
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="strict")
        return response

    @app.exception_handler(FinetuneError)
    async def finetune_error(request: Request, exc: FinetuneError) -> JSONResponse:
        return JSONResponse({"error": first_line(exc)}, status_code=http_status(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in error['loc'][1:]) or 'body'}: {error['msg']}"
            for error in exc.errors()
        ]
        return JSONResponse({"error": f"Bad request: {'; '.join(problems)}."}, status_code=422)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    api = "/api/v1"

    @app.get(f"{api}/health", tags=["server"])
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "root": str(state.root)}

    # --- tasks ---

    @app.get(f"{api}/tasks", tags=["tasks"])
    def list_tasks() -> dict[str, Any]:
        """Every task under the root: the rows of `sage finetune list --json`, each with the
        job this server runs on it."""
        return {"root": str(state.root), "tasks": [state.row(e) for e in scan_tasks(state.root)]}

    raw_body = {
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    }

    @app.post(
        f"{api}/uploads",
        tags=["tasks"],
        status_code=201,
        openapi_extra={"requestBody": {**raw_body, "required": True}},
    )
    async def upload(request: Request, filename: str) -> dict[str, Any]:
        """Store a data file (the raw request body) under the root; its ``path`` is what
        creating a task takes as ``data``."""
        name = filename
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name) or ".." in name:
            raise UsageProblem(
                f"filename={filename!r} is not a plain file name: use letters, digits, '.', "
                "'-' and '_'."
            )
        limit = state.max_upload
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise TooLarge(_too_large(name, limit))
        folder = state.root / UPLOADS / secrets.token_hex(8)
        size = 0
        try:
            with atomic_file(folder / name) as tmp, tmp.open("wb") as out:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise TooLarge(_too_large(name, limit))
                    out.write(chunk)
        except BaseException:
            remove_tree(folder)
            raise
        return {"path": str((folder / name).relative_to(state.root)), "bytes": size}

    @app.post(f"{api}/tasks/preview", tags=["tasks"])
    def preview_task(spec: TaskSpec) -> dict[str, Any]:
        """The first samples as the model sees them ((text, trained on) pieces), the data's
        statistics and warnings: a task built aside and removed."""
        scratch = state.root / UPLOADS / f"preview-{secrets.token_hex(8)}"
        try:
            result = _quickstart(state, spec, root=scratch, name="preview", force=False)
            return {
                "preview": result.preview,
                "stats": result.stats.summary() if result.stats else None,
                "records": result.records_kept,
                "max_length": result.config.max_length,
                "model": result.config.model_name,
                "method": result.config.method,
                "warnings": result.warnings,
                "notes": result.notes,
            }
        finally:
            remove_tree(scratch)

    @app.post(f"{api}/tasks", tags=["tasks"], status_code=201)
    def create_task(spec: TaskSpec) -> dict[str, Any]:
        """Create a task (`sage finetune quickstart TYPE --data PATH`)."""
        data = state.inside(spec.data)
        result = _quickstart(state, spec, root=state.root, name=spec.name, force=spec.force)
        uploads = (state.root / UPLOADS).resolve()
        if data.is_relative_to(uploads) and data != uploads:  # the task holds its copy now
            remove_tree(uploads / data.relative_to(uploads).parts[0])
        return {
            **state.row(TaskEntry.read(result.task_dir)),
            "preview": result.preview,
            "warnings": result.warnings,
            "notes": result.notes,
        }

    @app.get(f"{api}/tasks/{{name}}", tags=["tasks"])
    def get_task(name: str) -> dict[str, Any]:
        """A task: its row, config, data statistics, stages, eval summary, exports."""
        from ..data.prepared import DataStats

        task = state.task(name)
        meta = task.meta
        stats = DataStats.from_dict(meta.data_stats) if meta.data_stats.get("format") else None
        return {
            **state.row(TaskEntry(task.name, task.path, meta)),
            "config": meta.training,
            "data_stats": meta.data_stats,
            "data_summary": stats.summary() if stats else None,
            "stages": meta.stages,
            "metrics": {k: v for k, v in meta.metrics.items() if not k.endswith("history")},
            "eval_summary": meta.eval,
            "merge": meta.merge,
            "exports": meta.exports,
            "created_at": meta.created_at,
        }

    @app.delete(f"{api}/tasks/{{name}}", tags=["tasks"])
    def remove_task(name: str, force: bool = False) -> dict[str, Any]:
        """Delete a task (`sage finetune delete`); refused while it trains."""
        path = state.task_dir(name)
        state.jobs.check_idle(name)
        delete_task(name, root=state.root, force=force)
        return {"deleted": name, "path": str(path)}

    @app.get(f"{api}/tasks/{{name}}/plan", tags=["runs"])
    def plan(name: str) -> dict[str, Any]:
        """The next run as `run --dry-run` plans it: memory estimate, device, what would stop
        it (the data statistics are the task's, recorded when it was made)."""
        from ..runs import RunOptions, plan_run

        run = plan_run(state.task(name), RunOptions())
        return {
            "memory": run.memory_verdict(),
            "memory_lines": run.memory.summary() if run.memory else [],
            "device": run.runtime.device,
            "precision": run.runtime.dtype_name,
            "objective": run.objective_lines(),
            "blockers": [first_line(b) for b in run.blockers],
            "resume_from": run.resume_from.name if run.resume_from else None,
        }

    # --- runs ---

    @app.post(f"{api}/tasks/{{name}}/runs", tags=["runs"], status_code=202)
    def start_run(name: str, spec: RunSpec | None = None) -> dict[str, Any]:
        """Start a run in a worker process (`sage finetune run TASK ...`), after the same
        checks: refused (409) while the task trains, or when the run cannot start."""
        from ..runs import RunOptions, plan_run

        spec = spec or RunSpec()
        task = state.task(name)
        state.jobs.check_idle(name)
        named = ("max_steps", "epochs", "learning_rate", "max_length", "batch_size")
        options = RunOptions(
            preset=spec.preset,
            settings=tuple(spec.settings),
            resume=spec.resume,
            force=spec.force,
            **{key: getattr(spec, key) for key in named},
        )
        plan_run(task, options).check()  # the refusals, at once and in one line
        job = state.jobs.start("run", task.path, _run_arguments(spec))
        return job.to_dict()

    @app.post(f"{api}/tasks/{{name}}/runs/cancel", tags=["runs"], status_code=202)
    def cancel(name: str) -> dict[str, Any]:
        """Stop the task's run at the end of its step, checkpoint saved (`sage finetune
        cancel --no-wait`); it ends interrupted and resumable."""
        from ..runs import cancel_run

        owner = cancel_run(state.task(name)).run_owner()
        return {"cancelling": name, "pid": owner.get("pid") if owner else None}

    @app.get(f"{api}/tasks/{{name}}/progress", tags=["runs"])
    def progress(name: str) -> dict[str, Any]:
        """The run's progress: the task's row (step, max_steps, loss, tokens/s, ETA) and every
        logged step (loss, eval loss, reward, ... as the trainer logged them)."""
        return _progress(state, name)

    @app.get(f"{api}/tasks/{{name}}/events", tags=["runs"])
    async def events(name: str, request: Request) -> StreamingResponse:
        """The progress as server-sent events (one ``data:`` JSON per change); the stream
        ends when nothing works on the task any more."""
        state.task_dir(name)

        async def stream() -> AsyncIterator[str]:
            last = None
            while not await request.is_disconnected():
                snapshot = await asyncio.to_thread(_progress, state, name)
                text = json.dumps(snapshot)
                if text != last:
                    yield f"data: {text}\n\n"
                    last = text
                if not _active(snapshot):
                    yield "event: end\ndata: {}\n\n"
                    return
                await asyncio.sleep(STREAM_INTERVAL)

        return StreamingResponse(stream(), media_type="text/event-stream")

    # --- eval, merge, export: worker processes ---

    @app.post(f"{api}/tasks/{{name}}/eval", tags=["eval"], status_code=202)
    def start_eval(name: str, spec: EvalSpec | None = None) -> dict[str, Any]:
        """Evaluate the tuned model against its base (`sage finetune eval`)."""
        spec = spec or EvalSpec()
        args = ["--max-samples", str(spec.max_samples)]
        args += ["--max-new-tokens", str(spec.max_new_tokens)] if spec.max_new_tokens else []
        args += ["--base-only"] * spec.base_only + ["--no-base"] * spec.no_base
        return _worker(state, "eval", name, args)

    @app.get(f"{api}/tasks/{{name}}/eval", tags=["eval"])
    def eval_report(name: str) -> dict[str, Any]:
        """The last evaluation's report: metrics of both models, their change, every
        example (prompt, reference, each model's answer and scores)."""
        from ..scoring.report import METRICS

        report = state.task(name).path / EVAL_DIR / "report.json"
        if not report.is_file():
            raise NotFound(f"Task {name!r} has no evaluation yet: start one with POST .../eval.")
        return {"labels": METRICS, **json.loads(report.read_text(encoding="utf-8"))}

    @app.post(f"{api}/tasks/{{name}}/merge", tags=["export"], status_code=202)
    def start_merge(name: str, spec: MergeSpec | None = None) -> dict[str, Any]:
        """Merge the adapter into its base (`sage finetune merge`)."""
        return _worker(state, "merge", name, ["--force"] * (spec or MergeSpec()).force)

    @app.post(f"{api}/tasks/{{name}}/export", tags=["export"], status_code=202)
    def start_export(name: str, spec: ExportSpec | None = None) -> dict[str, Any]:
        """Export a GGUF file (`sage finetune export --quant Q`)."""
        spec = spec or ExportSpec()
        args = ["--quant", spec.quant] + ["--adapter"] * spec.adapter + ["--force"] * spec.force
        return _worker(state, "export", name, args)

    @app.get(f"{api}/tasks/{{name}}/export", tags=["export"])
    def export_files(name: str) -> dict[str, Any]:
        """What export wrote, by file name: type, size, how it read back."""
        return {"files": state.task(name).meta.exports}

    @app.get(f"{api}/tasks/{{name}}/job", tags=["runs"])
    def job(name: str) -> dict[str, Any]:
        """The latest worker process this server started for the task (state, error, log)."""
        state.task_dir(name)
        current = state.jobs.get(name)
        if current is None:
            raise NotFound(f"No job was started for task {name!r} by this server.")
        return current.to_dict()

    # --- chat ---

    @app.get(f"{api}/models", tags=["chat"])
    def models() -> dict[str, Any]:
        """The models chat can answer from, OpenAI-style: each task with a trained adapter or
        model (``TASK``) and its base (``TASK:base``)."""
        data = []
        for entry in scan_tasks(state.root):
            row = entry.summary()
            if row.get("adapter") or row.get("merged"):
                for ident in (entry.name, f"{entry.name}:base"):
                    data.append({"id": ident, "object": "model", "owned_by": "sage-finetune",
                                 "base_model": row["model"], "status": row["status"]})  # fmt: skip
        return {"object": "list", "data": data}

    @app.post(f"{api}/chat/completions", tags=["chat"], response_model=None)
    def chat(request: ChatRequest) -> dict[str, Any] | StreamingResponse:
        """An OpenAI-style chat completion from a task's tuned model (``model``: the task's
        name) or its base (``TASK:base``); ``stream`` sends chunks as server-sent events."""
        session, lock = _chat_session(state, request)
        *history, last = [m.model_dump() for m in request.messages]
        if last["role"] != "user":
            raise UsageProblem("messages: the last message must be the user's.")
        system = [m["content"] for m in history if m["role"] == "system"]
        if system:  # else the task's default system prompt, as `chat` uses
            session.system = system[-1]
        session.history = [m for m in history if m["role"] != "system"]
        created, ident = int(time.time()), f"chatcmpl-{secrets.token_hex(6)}"

        def chunk(delta: dict[str, str], finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            body = {"id": ident, "object": "chat.completion.chunk", "created": created,
                    "model": request.model, "choices": [choice]}  # fmt: skip
            return f"data: {json.dumps(body)}\n\n"

        if not request.stream:
            with lock:
                answer = session.generate(last["content"])
            message = {"role": "assistant", "content": answer}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return {"id": ident, "object": "chat.completion", "created": created,
                    "model": request.model, "choices": [choice]}  # fmt: skip

        def stream() -> Iterator[str]:
            pieces: queue.Queue[str | None] = queue.Queue()

            def generate() -> None:
                try:
                    with lock:
                        session.generate(last["content"], pieces.put)
                except FinetuneError as exc:
                    pieces.put(f"[{first_line(exc)}]")
                finally:
                    pieces.put(None)

            threading.Thread(target=generate, daemon=True).start()
            yield chunk({"role": "assistant"})
            while (piece := pieces.get()) is not None:
                yield chunk({"content": piece})
            yield chunk({}, "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


# --- what the routes share ---------------------------------------------------------------------


def _too_large(name: str, limit: int) -> str:
    return (
        f"Upload {name} is larger than the limit of {limit / 2**20:g} MiB: put the file under "
        "the root and give its path, or start the server with a larger --max-upload-mb."
    )


def _quickstart(
    state: UiState, spec: TaskSpec, *, root: Path, name: str | None, force: bool
) -> Any:
    """``quickstart`` of the spec's data (inside the root) into ``root``."""
    from ..quickstart import TASK_TYPES, QuickstartOptions, quickstart

    if TASK_TYPES.get(spec.task_type) is not None and TASK_TYPES[spec.task_type].source:
        raise UsageProblem(
            f"task_type={spec.task_type} builds its data from a code base: run `sage finetune "
            f"quickstart {spec.task_type}` on the machine, or give data of another type."
        )
    keywords = {"model", "method", "max_length", "system_prompt", "skip_invalid"}
    given = {k: v for k, v in spec.model_dump().items() if k in keywords and v is not None}
    options = QuickstartOptions.of(
        spec.task_type,
        data=str(state.inside(spec.data)),
        name=name,
        preset=spec.preset,
        force=force,
        root=root,
        preview=spec.preview,
        **given,
    )
    return quickstart(options)


def _run_arguments(spec: RunSpec) -> list[str]:
    """The options of `sage finetune run` for the spec."""
    by_keyword = {flag.keyword: flag.name for _, flag in flags("run") if flag.keyword}
    args: list[str] = []
    for key, value in spec.model_dump().items():
        if key in by_keyword and value is not None:
            args += [f"--{by_keyword[key]}", str(value)]
    args += ["--preset", spec.preset] if spec.preset else []
    for setting in spec.settings:
        args += ["--set", setting]
    return args + ["--resume"] * spec.resume + ["--force"] * spec.force


def _worker(state: UiState, kind: str, name: str, args: list[str]) -> dict[str, Any]:
    """Start `sage finetune KIND TASK ARGS` unless the task trains or is busy (409)."""
    task = state.task(name)
    task.lock().check()  # a run holds it, also one started from a terminal
    return state.jobs.start(kind, task.path, args).to_dict()


def _progress(state: UiState, name: str) -> dict[str, Any]:
    path = state.task_dir(name)
    return {"task": state.row(TaskEntry.read(path)), "history": progress_history(path)}


def _active(snapshot: dict[str, Any]) -> bool:
    row = snapshot["task"]
    job = row.get("job") or {}
    return bool(row.get("running")) or job.get("state") == "running"


def _chat_session(state: UiState, request: ChatRequest) -> tuple[Any, threading.Lock]:
    """A chat session on the requested model, loaded once per (task, side) and kept."""
    from ..chat import ChatSession, load_chat_model

    name, _, side = request.model.partition(":")
    if side not in ("", "base", "tuned"):
        raise UsageProblem(f"model={request.model!r}: use TASK, TASK:tuned or TASK:base.")
    task = state.task(name)
    base = side == "base"
    key = (str(task.path), base)
    trained = "" if base else task.meta.updated_at  # a task trained again: load it again
    with state.chat_lock:
        loaded = state.chats.get(key)
        if loaded is None or loaded[2] != trained:
            loaded = (load_chat_model(task, base=base), threading.Lock(), trained)
            state.chats[key] = loaded
        chat, lock, _ = loaded
    session = ChatSession(chat, max_new_tokens=request.max_tokens, temperature=request.temperature)
    return session, lock
