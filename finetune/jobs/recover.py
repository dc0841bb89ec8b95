"""When studio.db is damaged or gone: a damaged file is set aside (never deleted: it may still be read by hand), a new
one is made, and the job list is rebuilt from the run folders, which hold everything a job is (job.yaml, status.json,
checkpoints). A database error during use becomes one plain sentence instead of SQLite's own words."""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path

from finetune import rundir
from finetune.errors import JobError
from finetune.paths import adapters_dir

log = logging.getLogger(__name__)

LOST = ("the job database was lost while this job was queued or running; its run folder is kept: resume the job to "
        "continue from its last checkpoint")


@contextlib.contextmanager
def plain_errors(db_path: Path):
    try:
        yield
    except sqlite3.DatabaseError as e:
        raise JobError(f"the job database {db_path} cannot be used ({e}); restart the studio: it sets a damaged file "
                       "aside and rebuilds the job list from the run folders") from None


def open_database(store, migrate) -> None:
    """Create or migrate the database; a file that is not a readable SQLite database is renamed aside and rebuilt.
    A new database file gets its jobs back from the run folders (store._connect calls rediscover when it creates
    the file); an existing one is trusted as it is (a folder without a row is a submit that never finished)."""
    try:
        _init_when_free(store, migrate)
    except sqlite3.OperationalError:
        # Locked, busy, read-only or an I/O error: the file may be fine (another connection is setting it up).
        # Setting it aside would lose every job, so only a file SQLite cannot read as a database is treated as damaged.
        raise
    except sqlite3.DatabaseError as e:
        aside = Path(f"{store.db_path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        for suffix in ("", "-wal", "-shm"):
            p = Path(f"{store.db_path}{suffix}")
            if p.exists():
                os.replace(p, Path(f"{aside}{suffix}"))
        log.warning("%s is not a readable database (%s): set aside as %s; rebuilding the job list from %s",
                    store.db_path, e, aside.name, store.runs)
        _init(store, migrate)


def _init_when_free(store, migrate, timeout: float = 60.0) -> None:
    """_init, waiting while other connections hold the lock: switching to WAL can answer "locked" at once instead of
    waiting out the busy timeout when several stores open one new file together."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _init(store, migrate)
        except sqlite3.OperationalError as e:
            busy = "locked" in str(e) or "busy" in str(e)
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _init(store, migrate) -> None:
    with contextlib.closing(store._connect()) as con:
        con.execute("PRAGMA journal_mode=WAL")
        migrate(con)
        con.execute("SELECT count(*) FROM jobs").fetchone()  # reads the file: a damaged one fails here


def rediscover(store) -> list[str]:
    """Insert a job row for every run folder (runs/<id>/job.yaml) the database does not know; returns their ids."""
    from finetune.jobs.store import JOB_ID_RE

    known = {r["id"] for r in store._select()}
    found = []
    for run_dir in sorted(p for p in store.runs.iterdir() if p.is_dir()):
        if run_dir.name in known or not JOB_ID_RE.match(run_dir.name) or not (run_dir / rundir.JOB_YAML).is_file():
            continue
        try:
            row = row_from_folder(run_dir)
        except (OSError, UnicodeDecodeError) as e:
            log.warning("run folder %s not recovered: %s", run_dir, e)
            continue
        with store._tx() as con:
            con.execute(f"INSERT OR IGNORE INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                        tuple(row.values()))
        found.append(run_dir.name)
    if found:
        log.warning("recovered %d job(s) from their run folders: %s", len(found), ", ".join(found))
    return found


def row_from_folder(run_dir: Path) -> dict:
    """What the run folder tells of a job: completed (its adapter is in the store), failed (with its reason), or
    failed as LOST when it was queued or running (resume continues it). Kind: a job folder holds a training job
    unless its status says otherwise."""
    text = (run_dir / rundir.JOB_YAML).read_text(encoding="utf-8")
    status = rundir.read_status(run_dir)
    phase, adapter = status.get("phase"), status.get("adapter_name")
    published = bool(adapter) and (adapters_dir() / str(adapter) / "adapter_model.safetensors").is_file()
    if phase == "completed" and published:
        state, error = "completed", None
    elif phase == "failed":
        state, error = "failed", str(status.get("error") or "failed")
    else:
        state, error, adapter = "failed", LOST, None
    created = run_dir.stat().st_mtime
    return {"id": run_dir.name, "name": str(status.get("adapter_name") or run_dir.name)[:100], "config": text,
            "state": state, "created_at": created, "finished_at": status.get("updated_at") or created,
            "run_dir": str(run_dir), "error": error, "adapter_name": adapter if state == "completed" else None,
            "kind": str(status.get("kind") or "train")}
