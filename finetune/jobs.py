"""The job store and scheduler: a persistent queue in SQLite (STUDIO_HOME/studio.db), detached `accelerate launch`
runs in STUDIO_HOME/runs/<job_id>/, cancel / resume / duplicate, and reconciliation after a studio restart.

State lives in the database and the run folder, never in this process: any number of JobStore objects (Gradio
threads, a CLI in another terminal, a restarted studio) see the same jobs. Every operation is one short
transaction on its own connection. The scheduler never relies on being the parent of a training process: it
polls process liveness, so a job started by a studio that has since died is still watched and finished.

    store = JobStore(); store.start_scheduler()
    job_id = store.submit(JobConfig.load("job.yaml"))
    store.live(job_id)   # state, step, loss history, log tail, ...
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from finetune import policy, rundir, runner
from finetune.config import ConfigError, JobConfig
from finetune.errors import StudioError
from finetune.fsutil import file_lock, write_text_atomic
from finetune.paths import adapters_dir, studio_home

STATES = ("queued", "running", "completed", "failed", "cancelled")
FINISHED = ("completed", "failed", "cancelled")
JOB_ID_RE = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{4}$")
CANCEL_GRACE_S = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    config TEXT NOT NULL,               -- the job's YAML, as submitted
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
    command TEXT                        -- the exact command line of the latest launch
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created_at);
"""


class JobError(StudioError):
    """An operation that does not apply to the job (cancel a completed job, resume a running one, unknown id)."""


def max_concurrent_default() -> int:
    try:
        return max(1, int(os.environ.get("STUDIO_MAX_CONCURRENT_JOBS", "1")))
    except ValueError:
        return 1


def new_job_id() -> str:
    """Sortable by submission time, unique enough, and safe as a folder name: 20261128-161502-ab12."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def _absolute_data_paths(cfg: JobConfig) -> JobConfig:
    """The training process runs from the project root: a data file named relative to the submitter's
    working directory is pinned to its absolute path (hub ids and builtin: sources are left alone)."""
    updates = {}
    for field in ("path", "validation_path"):
        value = getattr(cfg.data, field)
        if value and not value.startswith("builtin:") and not os.path.isabs(value) and os.path.exists(value):
            updates[field] = os.path.abspath(value)
    if not updates:
        return cfg
    data = cfg.model_dump(mode="json")
    data["data"].update(updates)
    return JobConfig.parse(data, "job")


class JobStore:
    def __init__(self, home: Path | str | None = None, max_concurrent: int | None = None,
                 poll_interval: float = 1.0, reconcile: bool = True):
        self.home = Path(home).resolve() if home else studio_home()
        self.home.mkdir(parents=True, exist_ok=True)
        self.runs = self.home / "runs"
        self.runs.mkdir(parents=True, exist_ok=True)
        self.db_path = self.home / "studio.db"
        self.max_concurrent = max_concurrent or max_concurrent_default()
        self.poll_interval = poll_interval
        self._procs: dict[str, object] = {}  # job id -> Popen, for the jobs this object launched (exit codes, reaping)
        self._procs_lock = threading.Lock()
        self._tick_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)
        if reconcile:
            self.reconcile()

    # --- database ------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        # A connection per call: safe from any thread; autocommit mode, transactions are explicit.
        con = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA busy_timeout=30000")
        return con

    @contextlib.contextmanager
    def _tx(self):
        """One short write transaction (BEGIN IMMEDIATE: take the write lock up front, so read-then-write is atomic)."""
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    def _row(self, con: sqlite3.Connection, job_id: str) -> dict:
        if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
            raise JobError(f"{job_id!r} is not a job id (they look like 20261128-161502-ab12)")
        row = con.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise JobError(f"no job with id {job_id}")
        return dict(row)

    @contextlib.contextmanager
    def _scheduling(self):
        """Serialises claim/launch/reconcile across threads (lock) and processes (flock on a file beside the DB),
        so a job is never launched twice and never seen `running` without its pid."""
        with self._tick_lock, file_lock(self.home / "studio.db.lock"):
            yield

    # --- queries -------------------------------------------------------------------------------
    def get(self, job_id: str) -> dict:
        con = self._connect()
        try:
            return self._row(con, job_id)
        finally:
            con.close()

    def list_jobs(self, states: tuple[str, ...] | None = None, limit: int = 500) -> list[dict]:
        """Newest first, without the config text."""
        con = self._connect()
        try:
            sql = "SELECT * FROM jobs"
            args: list = []
            if states:
                sql += f" WHERE state IN ({','.join('?' * len(states))})"
                args += list(states)
            sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
            rows = [dict(r) for r in con.execute(sql, args + [limit])]
        finally:
            con.close()
        for r in rows:
            r.pop("config", None)
        return rows

    def config(self, job_id: str) -> JobConfig:
        return JobConfig.from_yaml(self.get(job_id)["config"], f"job {job_id}")

    # --- operations ----------------------------------------------------------------------------
    def submit(self, config: JobConfig | dict | str, name: str | None = None) -> str:
        """Validate, write runs/<id>/job.yaml, queue. Raises ConfigError naming the bad field."""
        if isinstance(config, str):
            cfg = JobConfig.from_yaml(config, "submitted config")
        elif isinstance(config, dict):
            cfg = JobConfig.parse(config, "submitted config")
        elif isinstance(config, JobConfig):
            cfg = JobConfig.parse(config.model_dump(mode="json"), "submitted config")  # re-validate (assignments)
        else:
            raise ConfigError(f"submit expects a JobConfig, a dict or YAML text, got {type(config).__name__}")
        cfg = _absolute_data_paths(cfg)
        if policy.confined():  # a client of the studio sent it
            policy.check_job(cfg)
        name = (name or cfg.adapter_name).strip()[:100] or cfg.adapter_name
        text = cfg.to_yaml()
        for _ in range(20):
            job_id = new_job_id()
            run_dir = self.runs / job_id
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                continue
        else:
            raise JobError("could not allocate a job id")
        write_text_atomic(run_dir / rundir.JOB_YAML, text)
        try:
            with self._tx() as con:
                con.execute("INSERT INTO jobs (id, name, config, state, created_at, run_dir, adapter_name) "
                            "VALUES (?, ?, ?, 'queued', ?, ?, NULL)", (job_id, name, text, time.time(), str(run_dir)))
        except BaseException:
            (run_dir / "job.yaml").unlink(missing_ok=True)
            run_dir.rmdir()
            raise
        self._wake.set()
        return job_id

    def duplicate(self, job_id: str) -> JobConfig:
        """The job's config, for the caller to edit and submit as a new job."""
        return self.config(job_id)

    def cancel(self, job_id: str, grace_s: float = CANCEL_GRACE_S) -> dict:
        """Queued: cancelled at once. Running: SIGTERM to its process group, SIGKILL after grace_s, then cancelled.
        Returns the job's row afterwards."""
        with self._scheduling():
            with self._tx() as con:
                row = self._row(con, job_id)
                if row["state"] == "queued":
                    con.execute("UPDATE jobs SET state='cancelled', finished_at=? WHERE id=?", (time.time(), job_id))
                elif row["state"] == "running":
                    con.execute("UPDATE jobs SET cancel_requested=1 WHERE id=?", (job_id,))
                else:
                    raise JobError(f"job {job_id} is {row['state']}: only a queued or running job can be cancelled")
        if row["state"] == "queued":
            return self.get(job_id)
        # Outside the scheduling lock: the grace period must not stall the scheduler.
        if row["pgid"]:
            runner.stop_group(row["pgid"], row["run_dir"], grace_s, reap=self._reap)
        self._reap()
        self._finish(job_id, None)
        self._wake.set()
        return self.get(job_id)

    def resume(self, job_id: str) -> dict:
        """Re-queue a failed or cancelled job; it continues from its latest checkpoint in the same run folder
        (or starts over if it never saved one) and stops at the planned step count."""
        with self._tx() as con:
            row = self._row(con, job_id)
            if row["state"] not in ("failed", "cancelled"):
                raise JobError(f"job {job_id} is {row['state']}: only a failed or cancelled job can be resumed")
            con.execute("UPDATE jobs SET state='queued', resume=1, error=NULL, finished_at=NULL, pid=NULL, pgid=NULL, "
                        "cancel_requested=0, exit_code=NULL WHERE id=?", (job_id,))
        self._wake.set()
        return self.get(job_id)

    # --- scheduling ----------------------------------------------------------------------------
    def tick(self) -> list[str]:
        """Reconcile, then start queued jobs (oldest first) while fewer than max_concurrent run.
        Returns the ids launched. The scheduler thread calls this every poll_interval; tests may call it directly."""
        launched = []
        with self._scheduling():
            self._reconcile_locked()
            while True:
                with self._tx() as con:
                    running = con.execute("SELECT COUNT(*) FROM jobs WHERE state='running'").fetchone()[0]
                    if running >= self.max_concurrent:
                        break
                    row = con.execute("SELECT * FROM jobs WHERE state='queued' ORDER BY created_at, id LIMIT 1").fetchone()
                    if row is None:
                        break
                    row = dict(row)
                    con.execute("UPDATE jobs SET state='running', started_at=?, finished_at=NULL, error=NULL, "
                                "attempts=attempts+1, cancel_requested=0 WHERE id=?", (time.time(), row["id"]))
                self._launch(row)
                launched.append(row["id"])
        return launched

    def _launch(self, row: dict) -> None:
        job_id, run_dir = row["id"], Path(row["run_dir"])
        checkpoint = rundir.latest_checkpoint(run_dir) if row["resume"] else None
        cmd = runner.train_command(run_dir / rundir.JOB_YAML, run_dir, resume=bool(checkpoint))
        try:
            rundir.begin_attempt(run_dir, row["attempts"] + 1, checkpoint, runner.command_string(cmd), row["config"])
            proc = runner.launch(cmd, run_dir, job_id, self.home)
        except OSError as e:
            with self._tx() as con:
                con.execute("UPDATE jobs SET state='failed', finished_at=?, error=?, command=? WHERE id=?",
                            (time.time(), f"could not start the training process: {e}", runner.command_string(cmd), job_id))
            return
        with self._procs_lock:
            self._procs[job_id] = proc
        try:
            pgid = os.getpgid(proc.pid)
        except ProcessLookupError:
            pgid = proc.pid  # start_new_session: the launcher leads its own group
        with self._tx() as con:
            con.execute("UPDATE jobs SET pid=?, pgid=?, command=?, resumed_from=?, resume=0 WHERE id=?",
                        (proc.pid, pgid, runner.command_string(cmd), checkpoint, job_id))

    def _reap(self) -> dict[str, int]:
        """Collect exit codes of processes this object launched (so they do not stay zombies)."""
        codes = {}
        with self._procs_lock:
            for job_id, proc in list(self._procs.items()):
                rc = proc.poll()
                if rc is not None:
                    codes[job_id] = rc
        return codes

    def reconcile(self) -> None:
        """Make the DB agree with reality: every `running` job either has a live process of its own (re-attached:
        the scheduler polls it from now on) or is finished from what its run folder says."""
        with self._scheduling():
            self._reconcile_locked()

    def _reconcile_locked(self) -> None:
        codes = self._reap()
        for job_id in codes:  # exited children of ours whose job someone else (a CLI cancel) already finished
            if self.get(job_id)["state"] != "running":
                with self._procs_lock:
                    self._procs.pop(job_id, None)
        con = self._connect()
        try:
            rows = [dict(r) for r in con.execute("SELECT * FROM jobs WHERE state='running'")]
        finally:
            con.close()
        for row in rows:
            if row["pid"] is None:
                # Claimed but never launched (the studio died between the two writes): run it again.
                with self._tx() as con:
                    con.execute("UPDATE jobs SET state='queued' WHERE id=? AND state='running' AND pid IS NULL", (row["id"],))
                continue
            if runner.group_members(row["pgid"], row["run_dir"]) or runner.is_ours(row["pid"], row["run_dir"]):
                continue  # still running (ours, or re-attached after a restart)
            self._finish(row["id"], codes.get(row["id"]))

    def _finish(self, job_id: str, returncode: int | None) -> None:
        """Record how a job whose processes are all gone ended. Only a `running` job changes, so two watchers
        (the scheduler thread and a cancel, or two studios) agree on one outcome."""
        with self._procs_lock:
            proc = self._procs.get(job_id)
        if proc is not None and returncode is None:
            # Our own child: its exit code is the truth. The /proc scan can miss a process that is in the middle of
            # exiting (seen under load: the job finished with exit_code None), so give it a moment to be reaped.
            try:
                returncode = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                return  # still alive after all: the next scheduler pass looks again
        with self._procs_lock:
            self._procs.pop(job_id, None)
        row = self.get(job_id)
        if row["state"] != "running":
            return
        run_dir = Path(row["run_dir"])
        status = rundir.read_status(run_dir)
        adapter = status.get("adapter_name") or self._planned_adapter(row)
        published = bool(adapter) and (adapters_dir() / adapter / "adapter_model.safetensors").is_file()
        error = None
        if row["cancel_requested"]:
            state = "cancelled"
        elif status.get("phase") == "completed" and published and returncode in (0, None):
            state = "completed"
        else:
            state = "failed"
            error = runner.diagnose(status, rundir.log_tail(run_dir, 80), returncode)
            if status.get("phase") == "completed" and not published:
                error = f"training reported completed but adapter {adapter!r} is not in {adapters_dir()}"
        with self._tx() as con:
            con.execute("UPDATE jobs SET state=?, finished_at=?, error=?, exit_code=?, adapter_name=? "
                        "WHERE id=? AND state='running'",
                        (state, time.time(), error, returncode, adapter if state == "completed" else None, job_id))

    def _planned_adapter(self, row: dict) -> str | None:
        try:
            return JobConfig.from_yaml(row["config"]).adapter_name
        except ConfigError:
            return None

    # --- the scheduler thread ------------------------------------------------------------------
    def start_scheduler(self) -> "JobStore":
        """Start the daemon thread (idempotent). Jobs keep running if this process exits."""
        if self._thread and self._thread.is_alive():
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="studio-job-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop_scheduler(self, timeout: float = 30) -> None:
        """Stop scheduling; running jobs are left running (a restarted studio re-attaches them)."""
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)
        self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as e:  # a bad moment (disk, DB locked for 30 s) must not end scheduling for good
                print(f"studio scheduler: {type(e).__name__}: {e}", file=sys.stderr)
            self._wake.wait(self.poll_interval)
            self._wake.clear()

    # --- live view -----------------------------------------------------------------------------
    def live(self, job_id: str, detail: bool = True) -> dict:
        """Everything a client shows for one job (rundir.view), from the DB and the run folder."""
        return self._view(self.get(job_id), detail)

    def views(self, limit: int = 500) -> list[dict]:
        """rundir.view without curves and log of every job, newest first (the job tables)."""
        con = self._connect()
        try:
            rows = [dict(r) for r in con.execute("SELECT * FROM jobs ORDER BY created_at DESC, id DESC LIMIT ?", (limit,))]
        finally:
            con.close()
        return [self._view(r, detail=False) for r in rows]

    def _view(self, row: dict, detail: bool) -> dict:
        try:
            cfg = JobConfig.from_yaml(row["config"])
        except ConfigError:
            cfg = None
        planned = cfg.training.max_steps if cfg and cfg.training.max_steps > 0 else None
        command = None
        if detail and not row["command"]:
            run_dir = Path(row["run_dir"])
            resume = bool(row["resume"] and rundir.latest_checkpoint(run_dir))
            command = runner.command_string(runner.train_command(run_dir / rundir.JOB_YAML, run_dir, resume=resume))
        return rundir.view(row, planned_steps=planned, command=command,
                           label=cfg.adapter_name if cfg else None, detail=detail)

    def wait(self, job_id: str, timeout: float | None = None, on_change=None, schedule: bool = True) -> dict:
        """Block until the job has finished, scheduling in this thread when schedule is true (CLI --wait, scripts)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = None
        while True:
            if schedule:
                self.tick()
            row = self.get(job_id)
            if on_change:
                key = (row["state"], rundir.read_status(Path(row["run_dir"])).get("step"))
                if key != seen:
                    seen = key
                    on_change(self.live(job_id))
            if row["state"] in FINISHED:
                return row
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {row['state']} after {timeout} s")
            self._wake.wait(self.poll_interval)
            self._wake.clear()


# --- one store per studio process ------------------------------------------------------------------
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


# --- CLI -----------------------------------------------------------------------------------------
def _fmt_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def _print_table(store: JobStore) -> None:
    views = store.views()
    if not views:
        print("no jobs yet: python -m finetune jobs submit JOB.yaml")
        return
    head = ("ID", "NAME", "STATE", "STEP", "LOSS", "ADAPTER", "CREATED")
    table = []
    for v in views:
        step = "-" if v["state"] == "queued" and not v["attempts"] else f"{v['step']}/{v['total_steps'] or '?'}"
        loss = f"{v['loss']:.4f}" if isinstance(v["loss"], (int, float)) else "-"
        adapter = v["adapter_name"] if v["state"] == "completed" else "-"
        table.append((v["id"], v["name"][:28], v["state"], step, loss, adapter, _fmt_time(v["created_at"])))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    for line in [head, *table]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())


def _progress(info: dict) -> None:
    loss = f" loss {info['loss']:.4f}" if isinstance(info.get("loss"), (int, float)) else ""
    print(f"[{info['id']}] {info['state']} {info['phase']} step {info['step']}/{info['total_steps']}{loss}", flush=True)


def _wait_and_report(store: JobStore, job_id: str) -> int:
    try:
        row = store.wait(job_id, on_change=_progress)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; job {job_id} keeps running (python -m finetune jobs show {job_id})")
        return 130
    if row["state"] == "completed":
        print(f"job {job_id} completed: adapter {row['adapter_name']}")
        return 0
    print(f"job {job_id} {row['state']}" + (f": {row['error']}" if row["error"] else ""), file=sys.stderr)
    return 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune jobs", description="The studio's job queue (STUDIO_HOME/studio.db).")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="table of jobs, newest first")
    s = sub.add_parser("show", help="a job's live status as JSON")
    s.add_argument("id")
    s = sub.add_parser("submit", help="queue a job config")
    s.add_argument("file")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    s.add_argument("--name")
    s.add_argument("--wait", action="store_true", help="run the scheduler here until the job ends; exit 0 if it completed")
    s = sub.add_parser("cancel", help="cancel a queued or running job")
    s.add_argument("id")
    s = sub.add_parser("resume", help="re-queue a failed or cancelled job from its last checkpoint")
    s.add_argument("id")
    s.add_argument("--wait", action="store_true")
    s = sub.add_parser("duplicate", help="print a job's config as YAML, to edit and submit")
    s.add_argument("id")
    sub.add_parser("run-scheduler", help="run queued jobs in the foreground (without the UI) until Ctrl-C")
    a = p.parse_args(argv)

    try:
        store = JobStore()
        if a.cmd == "list":
            _print_table(store)
        elif a.cmd == "show":
            print(json.dumps(store.live(a.id), indent=2))
        elif a.cmd == "submit":
            cfg = JobConfig.load(a.file)
            if a.set:
                cfg = cfg.with_overrides(a.set)
            job_id = store.submit(cfg, name=a.name)
            print(job_id, flush=True)
            if a.wait:
                return _wait_and_report(store, job_id)
            print(f"queued; it runs while the studio (make run) or `python -m finetune jobs run-scheduler` is up",
                  file=sys.stderr)
        elif a.cmd == "cancel":
            row = store.cancel(a.id)
            print(f"job {a.id} {row['state']}")
        elif a.cmd == "resume":
            store.resume(a.id)
            print(f"job {a.id} queued again")
            if a.wait:
                return _wait_and_report(store, a.id)
        elif a.cmd == "duplicate":
            sys.stdout.write(store.duplicate(a.id).to_yaml())
        elif a.cmd == "run-scheduler":
            signal.signal(signal.SIGTERM, _interrupt)
            print(f"scheduler running on {store.db_path} (max {store.max_concurrent} at once); Ctrl-C to stop", flush=True)
            try:
                while True:
                    for job_id in store.tick():
                        print(f"started {job_id}", flush=True)
                    store._wake.wait(store.poll_interval)
            except KeyboardInterrupt:
                print("scheduler stopped; running jobs continue")
    except (ConfigError, JobError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
