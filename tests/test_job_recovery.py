"""The job store survives its database: a damaged studio.db is set aside and the jobs come back from their run
folders (at start and when the file is deleted under a running store), database errors are plain sentences, a job
whose adapter was published is completed whatever happened to its launcher, and a store that cannot take an adapter
refuses the job at submit without leaving a run folder."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

from finetune.config import JobConfig
from finetune.errors import JobError
from finetune.jobs.recover import LOST
from finetune.jobs.store import JobStore, outcome
from finetune.store.adapters import AdapterError, delete_adapter
from finetune.store.zip_import import import_zip
from tests.studio_server import as_json, running_studio


def published_adapter(tmp_path: Path, name: str) -> str:
    z = tmp_path / f"{name}.zip"
    with zipfile.ZipFile(z, "w") as out:
        out.writestr(f"{name}/adapter_config.json", json.dumps({"peft_type": "LORA"}))
        out.writestr(f"{name}/adapter_model.safetensors", b"\0" * 64)
    return import_zip(z)


def finished_job(store: JobStore, adapter: str) -> str:
    """A submitted job whose run folder says it completed and published `adapter`."""
    job_id = store.submit(JobConfig(adapter_name=adapter))
    (store.runs / job_id / "status.json").write_text(json.dumps({"phase": "completed", "adapter_name": adapter,
                                                                 "updated_at": 1.0}))
    return job_id


def damage(db: Path) -> None:
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    db.write_bytes(b"this is not a database\n" * 512)


def test_a_damaged_database_is_set_aside_and_the_jobs_come_back(tmp_path):
    home = tmp_path / "home"
    store = JobStore(home, reconcile=False)
    adapter = published_adapter(tmp_path, "kept-through-damage")
    done = finished_job(store, adapter)
    queued = store.submit(JobConfig(adapter_name="never-ran"))
    damage(store.db_path)
    with pytest.raises(JobError, match="restart the studio"):  # in use: one plain sentence, not SQLite's
        store.list_jobs()
    again = JobStore(home, reconcile=False)
    rows = {r["id"]: r for r in again.list_jobs()}
    assert rows[done]["state"] == "completed" and rows[done]["adapter_name"] == adapter
    assert rows[queued]["state"] == "failed" and rows[queued]["error"] == LOST
    assert list(home.glob("studio.db.damaged-*"))
    again.resume(queued)  # a recovered job resumes like any failed one
    assert again.get(queued)["state"] == "queued"
    delete_adapter(adapter)


def test_a_database_deleted_under_a_running_store_is_rebuilt(tmp_path):
    store = JobStore(tmp_path / "home", reconcile=False)
    job_id = store.submit(JobConfig(adapter_name="after-delete"))
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store.db_path}{suffix}").unlink(missing_ok=True)
    assert [r["id"] for r in store.list_jobs()] == [job_id]


def test_a_killed_launcher_does_not_fail_a_published_job(tmp_path):
    store = JobStore(tmp_path / "home", reconcile=False)
    adapter = published_adapter(tmp_path, "launcher-killed")
    job_id = finished_job(store, adapter)
    row = store.get(job_id)
    assert outcome(row, store.spec_of(row), -9) == ("completed", None, adapter)  # SIGKILL of the launcher only
    delete_adapter(adapter)


def test_a_store_that_cannot_take_an_adapter_refuses_at_submit(tmp_path, monkeypatch):
    unwritable = Path("/sys/kernel")
    try:
        (unwritable / ".probe").touch()
        pytest.skip("no unwritable folder to use as the store on this machine")
    except OSError:
        pass
    store = JobStore(tmp_path / "home", reconcile=False)
    monkeypatch.setenv("STUDIO_ADAPTERS_DIR", str(unwritable))
    with pytest.raises(AdapterError, match="cannot take a new adapter"):
        store.submit(JobConfig(adapter_name="nowhere-to-go"))
    assert not any(store.runs.iterdir())


def test_the_studio_starts_on_a_damaged_database(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    damage(home / "studio.db")
    from gradio_client import Client

    with running_studio(home, "--no-scheduler") as (url, proc, log):
        assert as_json(Client(url, verbose=False).predict(api_name="/list_jobs")) == []
    assert list(home.glob("studio.db.damaged-*"))
    assert "Traceback" not in log.read_text()
    assert os.path.getsize(home / "studio.db") > 0
