"""A second kind of job through the same queue, scheduler, cancel, re-attach and failure diagnosis as training.

The kind here is tiny but real: its command is a short Python process that writes its run folder through
finetune.rundir (status.json, metrics.jsonl) and prints to train.log, like the trainer does."""
from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from finetune import rundir
from finetune.config import ConfigError
from conftest import tiny_config, wait_for
from finetune.jobs import JobError, JobKind, JobStore, get_kind, process, register_kind
from finetune.jobs.store import migrate

TINY_JOB = """
import os, sys, time, yaml
from pathlib import Path
from finetune.rundir import Metrics, Status
spec = yaml.safe_load(Path(sys.argv[1]).read_text())
run_dir = Path(sys.argv[2])
status, metrics = Status(run_dir, ""), Metrics(run_dir)
status.update(phase="running", total_steps=spec["steps"], devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
print("devices", repr(os.environ.get("CUDA_VISIBLE_DEVICES")), flush=True)
for step in range(1, spec["steps"] + 1):
    time.sleep(spec["sleep"])
    metrics.write({"step": step, "loss": 1.0 / step})
    status.update(step=step, loss=1.0 / step)
    print("step", step, flush=True)
if spec["fail"]:
    sys.exit("error: the tiny job was told to fail")
status.update(phase="completed")
"""


class TinySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = "tiny"
    steps: int = 3
    sleep: float = 0.0
    gpus: int = 1
    fail: bool = False


def tiny_command(job_yaml: Path, run_dir: Path, resume: bool) -> list[str]:
    return [sys.executable, "-c", TINY_JOB, str(job_yaml), str(run_dir)]


@pytest.fixture(autouse=True, scope="module")
def tiny_kind():
    return register_kind(JobKind(name="tiny", spec=TinySpec, command=tiny_command, gpus=lambda s: s.gpus,
                                 label=lambda s: s.title))


@pytest.fixture
def store(tmp_path):
    store = JobStore(tmp_path / "studio", poll_interval=0.1)
    yield store
    store.stop_scheduler()
    for row in store.list_jobs(states=("running",)):
        if row["pgid"]:
            process.stop_group(row["pgid"], row["run_dir"], grace_s=2)


def test_registered_kind_runs_through_the_queue(store):
    job_id = store.submit(TinySpec(title="first", steps=3), kind="tiny")
    assert store.get(job_id)["kind"] == "tiny" and store.get(job_id)["name"] == "first"
    assert Path(store.get(job_id)["run_dir"], "job.yaml").read_text().startswith("title: first")
    row = store.wait(job_id, timeout=120)
    assert row["state"] == "completed", row["error"]
    live = store.live(job_id)
    assert (live["kind"], live["step"], live["total_steps"], live["progress"]) == ("tiny", 3, 3, 1.0)
    assert [p[0] for p in live["loss_history"]] == [1, 2, 3]
    assert "step 3" in live["log_tail"] and live["command"].startswith(sys.executable)
    assert isinstance(store.duplicate(job_id), TinySpec)


def test_spec_is_validated_and_unknown_kinds_refused(store):
    with pytest.raises(ConfigError, match="steps"):
        store.submit({"steps": "many"}, kind="tiny")
    with pytest.raises(ConfigError, match="colour"):
        store.submit("colour: blue\n", kind="tiny")
    with pytest.raises(JobError, match="unknown job kind 'nope'"):
        store.submit({}, kind="nope")
    assert get_kind("train").label(get_kind("train").spec(adapter_name="x")) == "x"


def test_failure_is_diagnosed_from_the_log(store):
    job_id = store.submit(TinySpec(steps=1, fail=True), kind="tiny")
    row = store.wait(job_id, timeout=120)
    assert (row["state"], row["error"], row["exit_code"]) == ("failed", "the tiny job was told to fail", 1)


def test_cancel_and_reattach_after_a_restart(store):
    job_id = store.submit(TinySpec(steps=2000, sleep=0.05), kind="tiny")
    store.tick()
    wait_for(lambda: store.live(job_id)["step"] >= 1, 60, "the tiny job's first step")
    restarted = JobStore(store.home, poll_interval=0.1)  # another studio: re-attaches instead of failing the job
    row = restarted.get(job_id)
    assert row["state"] == "running" and process.is_ours(row["pid"], row["run_dir"])
    restarted.tick()
    assert restarted.get(job_id)["state"] == "running"
    assert restarted.cancel(job_id, grace_s=5)["state"] == "cancelled"
    assert not process.group_members(row["pgid"], row["run_dir"])


def test_one_gpu_jobs_share_a_two_gpu_host_and_a_two_gpu_job_waits(tmp_path):
    # Device ids are handed out through CUDA_VISIBLE_DEVICES; the tiny job only records what it was given.
    store = JobStore(tmp_path / "studio", poll_interval=0.1, gpus=("0", "1"))
    try:
        a = store.submit(TinySpec(title="a", steps=400, sleep=0.05), kind="tiny")
        b = store.submit(TinySpec(title="b", steps=400, sleep=0.05), kind="tiny")
        big = store.submit(TinySpec(title="big", steps=1, gpus=2), kind="tiny")
        assert store.tick() == [a, b]
        seen = {j: wait_for(lambda: rundir.read_status(Path(store.get(j)["run_dir"])).get("devices"), 60,
                            f"job {j} started") for j in (a, b)}
        assert sorted(seen.values()) == ["0", "1"]
        assert {store.get(j)["devices"] for j in (a, b)} == {"0", "1"}
        assert store.tick() == [] and store.get(big)["state"] == "queued"
        store.cancel(a, grace_s=5)
        assert store.tick() == [] and store.get(big)["state"] == "queued"  # one GPU free is not two
        store.cancel(b, grace_s=5)
        assert store.wait(big, timeout=120)["state"] == "completed"
        assert rundir.read_status(Path(store.get(big)["run_dir"]))["devices"] == "0,1"
    finally:
        for row in store.list_jobs(states=("running",)):
            process.stop_group(row["pgid"], row["run_dir"], grace_s=2)


def test_a_job_needing_more_gpus_than_the_host_has_fails_with_that_reason(tmp_path):
    store = JobStore(tmp_path / "studio", gpus=("0",))
    job_id = store.submit(TinySpec(gpus=2), kind="tiny")
    store.tick()
    row = store.get(job_id)
    assert row["state"] == "failed" and "needs 2 GPUs" in row["error"], row


OLD_SCHEMA = """CREATE TABLE jobs (id TEXT PRIMARY KEY, name TEXT NOT NULL, config TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued','running','completed','failed','cancelled')), created_at REAL NOT NULL,
    started_at REAL, finished_at REAL, pid INTEGER, pgid INTEGER, run_dir TEXT NOT NULL, error TEXT, adapter_name TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, resumed_from TEXT, resume INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0, exit_code INTEGER, command TEXT);"""


def test_a_database_from_before_job_kinds_is_migrated(tmp_path, chat_jsonl):
    home = tmp_path / "studio"
    (home / "runs" / "20260101-000000-abcd").mkdir(parents=True)
    con = sqlite3.connect(home / "studio.db")
    with con:
        con.executescript(OLD_SCHEMA)
        con.execute("INSERT INTO jobs (id, name, config, state, created_at, run_dir, error) VALUES (?,?,?,?,?,?,?)",
                    ("20260101-000000-abcd", "old", tiny_config(chat_jsonl, "old").to_yaml(), "failed", 1.0,
                     str(home / "runs" / "20260101-000000-abcd"), "an old failure"))
    con.close()
    store = JobStore(home)
    row = store.get("20260101-000000-abcd")
    assert (row["kind"], row["devices"], row["error"]) == ("train", None, "an old failure")
    assert store.live(row["id"])["adapter_name"] == "old"
    assert store.config(row["id"]).adapter_name == "old"
    assert store.resume(row["id"])["state"] == "queued"
    with sqlite3.connect(home / "studio.db") as con:  # migrating again changes nothing
        columns = [r[1] for r in con.execute("PRAGMA table_info(jobs)")]
        assert {"kind", "devices"} <= set(columns)
        migrate(con)
        assert [r[1] for r in con.execute("PRAGMA table_info(jobs)")] == columns
