"""The job store: a persistent queue in SQLite (STUDIO_HOME/studio.db) and each job's state machine.

    queued --claim--> running --record_outcome--> completed | failed | cancelled
      ^                                                      |
      +-------------------- resume (failed, cancelled) ------+

State lives in the database and the run folder, never in this process: any number of JobStore objects (Gradio
threads, a CLI in another terminal, a restarted studio) see the same jobs. Every operation is one short transaction
on its own connection. Starting and watching processes is the scheduler's (scheduler.py), the processes themselves
are process.py's, and what a job runs is its kind's (kinds.py).

    store = get_store(); store.start_scheduler()
    job_id = store.submit(JobConfig.load("job.yaml"))          # kind="train"
    store.live(job_id)   # state, step, loss history, log tail, ... (rundir.view)
"""
from __future__ import annotations

import contextlib
import re
import secrets
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import yaml
from pydantic import BaseModel

from finetune import rundir
from finetune.config import ConfigError
from finetune.errors import JobError
from finetune.fsutil import file_lock, write_text_atomic
from finetune.jobs import process, recover
from finetune.jobs.kinds import get_kind, parse_spec, spec_yaml
from finetune.jobs.scheduler import Scheduler
from finetune.paths import adapters_dir, studio_home

STATES = ("queued", "running", "completed", "failed", "cancelled")
FINISHED = ("completed", "failed", "cancelled")
JOB_ID_RE = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{4}$")
CANCEL_GRACE_S = 10.0
ADAPTER_LINE = re.compile(r"^adapter_name: (.*)$", re.MULTILINE)  # a training spec's YAML, as spec_yaml writes it

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    config TEXT NOT NULL,               -- the job's spec as YAML, as submitted
    state TEXT NOT NULL CHECK (state IN ('queued','running','completed','failed','cancelled')),
    created_at REAL NOT NULL,
    started_at REAL,                    -- the latest launch
    finished_at REAL,
    pid INTEGER,                        -- the launcher; its process group is the job
    pgid INTEGER,
    run_dir TEXT NOT NULL,
    error TEXT,                         -- plain words: why it failed
    adapter_name TEXT,                  -- set when the adapter is published
    attempts INTEGER NOT NULL DEFAULT 0,-- launches so far
    resumed_from TEXT,                  -- checkpoint the latest launch continued from
    resume INTEGER NOT NULL DEFAULT 0,  -- the next launch passes --resume
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    exit_code INTEGER,
    command TEXT,                       -- the exact command line of the latest launch
    kind TEXT NOT NULL DEFAULT 'train', -- finetune.jobs.kinds: what the job runs
    devices TEXT,                       -- the GPUs the running job holds ("0,1"; "" or NULL: none)
    parent TEXT,                        -- the job that submitted this one (a sweep's trials), else NULL
    reason TEXT                         -- why a cancelled job was stopped when not by hand ("pruned")
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created_at);
"""
# Columns added since the first schema; a database from before gets them with their defaults.
_ADDED_COLUMNS = {"kind": "TEXT NOT NULL DEFAULT 'train'", "devices": "TEXT", "parent": "TEXT", "reason": "TEXT"}


def new_job_id() -> str:
    """Sortable by submission time, unique enough, and safe as a folder name: 20261128-161502-ab12."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def migrate(con: sqlite3.Connection) -> None:
    con.executescript(_SCHEMA)
    # Under the write lock, so that two stores opening an old file together do not both add a column.
    con.execute("BEGIN IMMEDIATE")
    try:
        have = {r[1] for r in con.execute("PRAGMA table_info(jobs)")}
        for column, decl in _ADDED_COLUMNS.items():
            if column not in have:
                con.execute(f"ALTER TABLE jobs ADD COLUMN {column} {decl}")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


class JobStore:
    def __init__(self, home: Path | str | None = None, max_concurrent: int | None = None,
                 poll_interval: float = 1.0, reconcile: bool = True, gpus: tuple[str, ...] | None = None):
        self.home = Path(home).resolve() if home else studio_home()
        self.runs = self.home / "runs"
        self.runs.mkdir(parents=True, exist_ok=True)
        self.db_path = self.home / "studio.db"
        self._tick_lock = threading.Lock()
        recover.open_database(self, migrate)
        self.scheduler = Scheduler(self, max_concurrent, poll_interval, gpus)
        if reconcile:
            self.scheduler.reconcile()

    # --- database ------------------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        # A connection per call: safe from any thread; autocommit mode, transactions are explicit.
        fresh = not self.db_path.exists()
        con = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA busy_timeout=30000")
        if fresh:  # deleted while the studio runs: a new database, and the jobs back from their run folders
            migrate(con)
            recover.rediscover(self)
        return con

    @contextlib.contextmanager
    def _tx(self):
        """One short write transaction (BEGIN IMMEDIATE: take the write lock up front, so read-then-write is atomic)."""
        with recover.plain_errors(self.db_path), contextlib.closing(self._connect()) as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def _select(self, where: str = "", args: tuple = (), limit: int = -1, newest_first: bool = False) -> list[dict]:
        order = "created_at DESC, id DESC" if newest_first else "created_at, id"
        with recover.plain_errors(self.db_path), contextlib.closing(self._connect()) as con:
            rows = con.execute(f"SELECT * FROM jobs {where} ORDER BY {order} LIMIT ?", (*args, limit))
            return [dict(r) for r in rows]

    @staticmethod
    def _row(con: sqlite3.Connection, job_id: str) -> dict:
        if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
            raise JobError(f"{job_id!r} is not a job id (they look like 20261128-161502-ab12)")
        row = con.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise JobError(f"no job with id {job_id}")
        return dict(row)

    @contextlib.contextmanager
    def scheduling(self):
        """Serialises claim/launch/reconcile across threads (lock) and processes (a file lock beside the DB),
        so a job is never launched twice and never seen `running` without its pid."""
        with self._tick_lock, file_lock(self.home / "studio.db.lock"):
            yield

    # --- queries -------------------------------------------------------------------------------------------------
    def get(self, job_id: str) -> dict:
        with recover.plain_errors(self.db_path), contextlib.closing(self._connect()) as con:
            return self._row(con, job_id)

    def list_jobs(self, states: tuple[str, ...] | None = None, limit: int = 500) -> list[dict]:
        """Newest first, without the spec text."""
        where = f"WHERE state IN ({','.join('?' * len(states))})" if states else ""
        rows = self._select(where, tuple(states or ()), limit, newest_first=True)
        for r in rows:
            r.pop("config", None)
        return rows

    def queued(self) -> list[dict]:
        return self._select("WHERE state='queued'")

    def running(self) -> list[dict]:
        return self._select("WHERE state='running'")

    def spec_of(self, row: dict) -> BaseModel:
        return parse_spec(get_kind(row["kind"]), row["config"], f"job {row['id']}")

    def config(self, job_id: str) -> BaseModel:
        """The job's spec (a JobConfig for a training job)."""
        return self.spec_of(self.get(job_id))

    def duplicate(self, job_id: str) -> BaseModel:
        """The job's spec, for the caller to edit and submit as a new job."""
        return self.config(job_id)

    # --- operations ----------------------------------------------------------------------------------------------
    def submit(self, spec: BaseModel | dict | str, name: str | None = None, kind: str = "train",
               parent: str | None = None) -> str:
        """Validate, write runs/<id>/job.yaml, queue (parent: the sweep submitting it). Raises ConfigError naming the field."""
        job_kind = get_kind(kind)
        spec = job_kind.prepare(parse_spec(job_kind, spec))
        label = str(job_kind.label(spec))
        name = (name or label).strip()[:100] or label
        text = spec_yaml(spec)
        run_dir = self._new_run_dir()
        try:
            with self._tx() as con:
                refuse_taken_adapter_name(con, spec if kind == "train" else None)
                con.execute("INSERT INTO jobs (id, name, config, state, created_at, run_dir, kind, parent) "
                            "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
                            (run_dir.name, name, text, time.time(), str(run_dir), kind, parent))
                # Written while the row's transaction holds the write lock: a run folder with a job.yaml always has
                # its row, or is about to, so rebuilding the job list from the folders never races a submit.
                write_text_atomic(run_dir / rundir.JOB_YAML, text)
        except BaseException as e:
            shutil.rmtree(run_dir, ignore_errors=True)  # a full disk or a failed insert leaves no orphan folder
            if isinstance(e, OSError):
                raise JobError(f"cannot queue the job: writing {run_dir / rundir.JOB_YAML} failed "
                               f"({e.strerror or e})") from None
            raise
        self.scheduler.wake.set()
        return run_dir.name

    def _new_run_dir(self) -> Path:
        for _ in range(20):
            run_dir = self.runs / new_job_id()
            try:
                run_dir.mkdir()
                return run_dir
            except FileExistsError:
                continue
            except OSError as e:  # read-only or full: refuse now, not when the job runs
                raise JobError(f"cannot queue the job: {self.runs} is not writable ({e.strerror or e})") from None
        raise JobError("could not allocate a job id")

    def cancel(self, job_id: str, grace_s: float = CANCEL_GRACE_S, reason: str | None = None) -> dict:
        """Queued: cancelled at once. Running: SIGTERM to its process group, SIGKILL after grace_s, then cancelled.
        reason: why, when not by hand ("pruned": its sweep stopped it). Returns the job's row afterwards."""
        with self.scheduling(), self._tx() as con:
            row = self._row(con, job_id)
            if row["state"] == "queued":
                con.execute("UPDATE jobs SET state='cancelled', finished_at=?, reason=? WHERE id=?",
                            (time.time(), reason, job_id))
            elif row["state"] == "running":
                con.execute("UPDATE jobs SET cancel_requested=1, reason=? WHERE id=?", (reason, job_id))
            else:
                raise JobError(f"job {job_id} is {row['state']}: only a queued or running job can be cancelled")
        if row["state"] == "running":  # outside the scheduling lock: the grace period must not stall the scheduler
            self.scheduler.stop_job(row, grace_s)
        return self.get(job_id)

    def resume(self, job_id: str) -> dict:
        """Re-queue a failed or cancelled job; it continues from its latest checkpoint in the same run folder
        (or starts over if it never saved one) and stops at the planned step count."""
        with self._tx() as con:
            row = self._row(con, job_id)
            if row["state"] not in ("failed", "cancelled"):
                raise JobError(f"job {job_id} is {row['state']}: only a failed or cancelled job can be resumed")
            con.execute("UPDATE jobs SET state='queued', resume=1, error=NULL, finished_at=NULL, pid=NULL, pgid=NULL, "
                        "cancel_requested=0, exit_code=NULL, devices=NULL WHERE id=?", (job_id,))
        self.scheduler.wake.set()
        return self.get(job_id)

    # --- transitions the scheduler makes (under scheduling()) ----------------------------------------------------
    def claim(self, job_id: str, devices: str) -> dict | None:
        """queued -> running, holding `devices`; the row afterwards, or None if the job is no longer queued."""
        with self._tx() as con:
            cur = con.execute("UPDATE jobs SET state='running', started_at=?, finished_at=NULL, error=NULL, devices=?, "
                              "attempts=attempts+1, cancel_requested=0 WHERE id=? AND state='queued'",
                              (time.time(), devices, job_id))
            return self._row(con, job_id) if cur.rowcount else None

    def launched(self, job_id: str, pid: int, pgid: int, command: str, checkpoint: str | None) -> None:
        with self._tx() as con:
            con.execute("UPDATE jobs SET pid=?, pgid=?, command=?, resumed_from=?, resume=0 WHERE id=?",
                        (pid, pgid, command, checkpoint, job_id))

    def launch_failed(self, job_id: str, error: str) -> None:
        with self._tx() as con:
            con.execute("UPDATE jobs SET state='failed', finished_at=?, error=?, devices=NULL WHERE id=?",
                        (time.time(), error, job_id))

    def requeue_unlaunched(self, job_id: str) -> None:
        with self._tx() as con:
            con.execute("UPDATE jobs SET state='queued', devices=NULL WHERE id=? AND state='running' AND pid IS NULL",
                        (job_id,))

    def record_outcome(self, job_id: str, returncode: int | None) -> None:
        """How a job whose processes are all gone ended, from its run folder. Only a `running` job changes, so two
        watchers (the scheduler thread and a cancel, or two studios) agree on one outcome."""
        row = self.get(job_id)
        if row["state"] != "running":
            return
        state, error, adapter = outcome(row, self._spec_or_none(row), returncode)
        with self._tx() as con:
            con.execute("UPDATE jobs SET state=?, finished_at=?, error=?, exit_code=?, adapter_name=?, devices=NULL "
                        "WHERE id=? AND state='running'", (state, time.time(), error, returncode, adapter, job_id))

    def _spec_or_none(self, row: dict) -> BaseModel | None:
        try:
            return self.spec_of(row)
        except (ConfigError, JobError):
            return None

    # --- views -----------------------------------------------------------------------------------------------------
    def live(self, job_id: str, detail: bool = True) -> dict:
        """Everything a client shows for one job (rundir.view), from the DB and the run folder; a queued job also
        says its place in the queue and what it waits for."""
        view = self._view(self.get(job_id), detail)
        if view["state"] == "queued":
            view.update(queue_place(view["id"], self.queued(), len(self.running()), self.max_concurrent))
        return view

    def views(self, limit: int = 500) -> list[dict]:
        """rundir.view, without curves and log, of every job, newest first (the job tables)."""
        views = [self._view(r, detail=False) for r in self._select(limit=limit, newest_first=True)]
        queued = [v for v in reversed(views) if v["state"] == "queued"]
        running = sum(v["state"] == "running" for v in views)
        for v in queued:
            v.update(queue_place(v["id"], queued, running, self.max_concurrent))
        return views

    def _view(self, row: dict, detail: bool) -> dict:
        spec = self._spec_or_none(row)
        training = getattr(spec, "training", None)
        max_steps = getattr(training, "max_steps", None)
        planned = max_steps if isinstance(max_steps, int) and max_steps > 0 else None
        label = str(get_kind(row["kind"]).label(spec)) if spec is not None else None
        command = None
        if detail and not row["command"] and spec is not None:  # not launched yet: what it will run
            run_dir = Path(row["run_dir"])
            resume = bool(row["resume"] and rundir.latest_checkpoint(run_dir))
            command = process.command_string(get_kind(row["kind"]).command(run_dir / rundir.JOB_YAML, run_dir, resume))
        return rundir.view(row, planned_steps=planned, command=command, label=label, detail=detail)

    # --- scheduling, delegated -------------------------------------------------------------------------------------
    @property
    def max_concurrent(self) -> int:
        """How many jobs may run at once."""
        return self.scheduler.max_jobs or max(self.scheduler.cpu_slots, len(self.scheduler.gpus))

    def tick(self) -> list[str]:
        return self.scheduler.tick()

    def reconcile(self) -> None:
        self.scheduler.reconcile()

    def start_scheduler(self) -> "JobStore":
        self.scheduler.start()
        return self

    def stop_scheduler(self, timeout: float = 30) -> None:
        self.scheduler.stop(timeout)

    def wait(self, job_id: str, timeout: float | None = None, on_change=None, schedule: bool = True) -> dict:
        return self.scheduler.wait(job_id, timeout, on_change, schedule)


MAX_RELAUNCHES = 5


def relaunch_if_lost(store: JobStore, job_id: str) -> bool:
    """A running job of a kind that restarts safely (a sweep driver) whose process vanished without saying it
    finished, and that nobody cancelled, is queued again (a few times at most) instead of failing: it picks up
    where it was. Returns whether it was."""
    row = store.get(job_id)
    try:
        kind = get_kind(row["kind"])
    except JobError:
        return False
    phase = rundir.read_status(Path(row["run_dir"])).get("phase")
    if (row["state"] != "running" or not kind.relaunch or row["cancel_requested"] or phase in ("completed", "failed")
            or (row["attempts"] or 0) > MAX_RELAUNCHES):
        return False
    with store._tx() as con:
        con.execute("UPDATE jobs SET state='queued', resume=1, pid=NULL, pgid=NULL, devices=NULL "
                    "WHERE id=? AND state='running'", (job_id,))
    return True


def queue_place(job_id: str, queued: list[dict], running: int, slots: int) -> dict:
    """{"queue_position": 1-based place among the queued jobs (oldest first), "waiting_for": in words}."""
    ids = [q["id"] for q in queued]
    pos = ids.index(job_id) + 1 if job_id in ids else None
    if pos is None:
        return {"queue_position": None, "waiting_for": None}
    if pos > 1:
        waiting = f"{pos - 1} job(s) queued before it (next to start: {ids[0]})"
    elif running >= slots:
        waiting = f"a free slot: {running} job(s) running, {slots} at a time"
    else:
        waiting = "the scheduler to start it (a slot is free)"
    return {"queue_position": pos, "waiting_for": waiting}


def refuse_taken_adapter_name(con: sqlite3.Connection, spec: BaseModel | None) -> None:
    """Two jobs never publish under one name: a name a queued or running job will publish is refused at submit
    (inside the submit's transaction, so two racing submits cannot both take it)."""
    name = getattr(spec, "adapter_name", None)
    if not name:
        return
    for row in con.execute("SELECT id, state, config FROM jobs WHERE kind='train' AND state IN ('queued','running')"):
        line = ADAPTER_LINE.search(row["config"])
        if line and yaml.safe_load(line.group(1)) == name:
            raise ConfigError(f"adapter_name: job {row['id']} ({row['state']}) will publish an adapter named {name!r}: "
                              "choose another name, or cancel that job first")


def outcome(row: dict, spec: BaseModel | None, returncode: int | None) -> tuple[str, str | None, str | None]:
    """(state, error, adapter) of a finished job from its run folder: completed when the job said so and (for a job
    that makes an adapter) the adapter is in the store. The exit code is not asked: the launcher can be killed
    after its job published (the run folder and the store are the record, not the launcher's fate)."""
    run_dir = Path(row["run_dir"])
    status = rundir.read_status(run_dir)
    adapter = status.get("adapter_name") or getattr(spec, "adapter_name", None)
    published = not adapter or (adapters_dir() / adapter / "adapter_model.safetensors").is_file()
    if row["cancel_requested"]:
        return "cancelled", None, None
    if status.get("phase") == "completed" and published:
        return "completed", None, adapter
    if status.get("phase") == "completed" and not published:
        return "failed", f"training reported completed but adapter {adapter!r} is not in {adapters_dir()}", None
    return "failed", process.diagnose(status, rundir.log_tail(run_dir, 80), returncode), None


# --- one store per studio process ----------------------------------------------------------------------------------
_stores: dict[Path, JobStore] = {}
_stores_lock = threading.Lock()


def get_store(home: Path | str | None = None) -> JobStore:
    """The process-wide store for a studio home, so that a submit from any Gradio thread wakes the one scheduler."""
    key = Path(home).resolve() if home else studio_home()
    with _stores_lock:
        if key not in _stores:
            _stores[key] = JobStore(key)
        return _stores[key]


def start_scheduler(home: Path | str | None = None) -> JobStore:
    """Start the studio's scheduler thread (idempotent); returns its store. Call once when the app starts."""
    return get_store(home).start_scheduler()


def stop_scheduler(home: Path | str | None = None) -> None:
    get_store(home).stop_scheduler()
