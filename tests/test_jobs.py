"""The job system: SQLite store, scheduler, cancel/resume, restart safety, live view.

The first tests are fast (no model): store semantics and reconciliation against real processes.
The rest run real SmolLM2 training through `accelerate launch` with a handful of steps at max_seq_length 64.
Nothing sleeps blindly: every wait polls with a deadline.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import tiny_config, wait_for
from finetune import rundir
from finetune.config import ConfigError, JobConfig
from finetune.jobs import JOB_ID_RE, JobError, JobStore, cli, process

# --- helpers ---------------------------------------------------------------------------------------


def set_row(store: JobStore, job_id: str, **cols):
    con = sqlite3.connect(store.db_path)
    with con:
        con.execute(f"UPDATE jobs SET {', '.join(f'{k}=?' for k in cols)} WHERE id=?", (*cols.values(), job_id))
    con.close()


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "studio"


@pytest.fixture
def sleeper():
    """A real process that looks like a job's (its command line names finetune and the run folder)."""
    procs = []

    def start(run_dir: Path) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "finetune", str(run_dir)],
                             start_new_session=True)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


# --- fast: the store -------------------------------------------------------------------------------


def test_submit_validates_writes_job_yaml_and_queues(home, chat_jsonl):
    store = JobStore(home)
    job_id = store.submit(tiny_config(chat_jsonl, "a1"), name="first try")
    assert JOB_ID_RE.match(job_id)
    row = store.get(job_id)
    assert row["state"] == "queued" and row["name"] == "first try" and row["attempts"] == 0
    saved = JobConfig.load(Path(row["run_dir"]) / "job.yaml")
    assert saved == tiny_config(chat_jsonl, "a1") == store.duplicate(job_id)
    assert Path(row["run_dir"]) == home.resolve() / "runs" / job_id

    with pytest.raises(ConfigError, match="training.learning_rate"):
        store.submit({"training": {"learning_rate": -1}})
    with pytest.raises(ConfigError, match="lora.rank"):
        store.submit("lora:\n  rank: 8\n")
    assert [r["id"] for r in store.list_jobs()] == [job_id]  # nothing half-submitted


def test_cancel_queued_resume_and_bad_transitions(home, chat_jsonl):
    store = JobStore(home)
    job_id = store.submit(tiny_config(chat_jsonl, "a2"))
    assert store.cancel(job_id)["state"] == "cancelled"
    with pytest.raises(JobError, match="only a queued or running job"):
        store.cancel(job_id)
    assert store.resume(job_id)["state"] == "queued"
    with pytest.raises(JobError, match="only a failed or cancelled job"):
        store.resume(job_id)
    with pytest.raises(JobError, match="no job with id"):
        store.get("20000101-000000-abcd")
    with pytest.raises(JobError, match="not a job id"):
        store.get("../../etc")


def test_concurrent_submits_from_threads_and_stores(home, chat_jsonl):
    """Gradio calls from many threads, each with its own connection: no lost or duplicated jobs."""
    ids, errors = [], []

    def worker(w: int):
        store = JobStore(home, reconcile=False)
        try:
            for i in range(5):  # one adapter name per job: a name a queued job will publish is taken
                ids.append(store.submit(tiny_config(chat_jsonl, f"a3-{w}-{i}")))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(ids)) == 40
    assert {r["id"] for r in JobStore(home).list_jobs()} == set(ids)
    con = sqlite3.connect(home / "studio.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def test_live_reads_status_metrics_and_tolerates_half_written_line(home, chat_jsonl):
    store = JobStore(home)
    job_id = store.submit(tiny_config(chat_jsonl, "a4", steps=10))
    queued = store.live(job_id)
    assert queued["state"] == "queued" and queued["phase"] == "queued" and queued["progress"] == 0
    assert "accelerate.commands.launch" in queued["command"] and f"runs/{job_id}/job.yaml" in queued["command"]
    run_dir = Path(store.get(job_id)["run_dir"])
    set_row(store, job_id, state="failed", started_at=time.time() - 30, finished_at=time.time(), attempts=1)
    (run_dir / "status.json").write_text(json.dumps({"phase": "training", "step": 4, "total_steps": 10, "loss": 1.5,
                                                      "tokens_per_second": 900.0, "peak_memory_mb": 700.0}))
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.7},
            {"step": 3, "loss": 2.0}, {"step": 4, "loss": 1.5}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    (run_dir / "train.log").write_text("".join(f"line {i}\n" for i in range(100)) + "progress 10%\rprogress 50%\n")
    info = store.live(job_id)
    assert info["step"] == 4 and info["total_steps"] == 10 and info["progress"] == 0.4
    assert info["loss_history"] == [[1, 3.0], [2, 2.5], [3, 2.0], [4, 1.5]]
    assert info["eval_history"] == [[2, 2.7]] and info["eval_loss"] == 2.7
    assert info["tokens_per_second"] == 900.0 and info["peak_memory_mb"] == 700.0
    assert 29 <= info["elapsed_seconds"] <= 40
    tail = info["log_tail"].splitlines()
    assert len(tail) == 40 and tail[-1] == "progress 50%" and tail[0] == "line 61"
    # A resumed run logs steps 3-4 again: the later values win.
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('\n{"step": 3, "loss": 1.9}\n{"step": 4, "loss": 1.4}\n')
    assert store.live(job_id)["loss_history"][-2:] == [[3, 1.9], [4, 1.4]]


def test_reconcile_reattaches_live_process_and_fails_dead_one(home, chat_jsonl, sleeper):
    store = JobStore(home)
    alive_id = store.submit(tiny_config(chat_jsonl, "a5"))
    dead_id = store.submit(tiny_config(chat_jsonl, "a6"))
    reused_id = store.submit(tiny_config(chat_jsonl, "a7"))
    done_id = store.submit(tiny_config(chat_jsonl, "a8"))
    run = {j: Path(store.get(j)["run_dir"]) for j in (alive_id, dead_id, reused_id, done_id)}

    p = sleeper(run[alive_id])
    set_row(store, alive_id, state="running", pid=p.pid, pgid=p.pid, started_at=time.time())
    gone = sleeper(run[dead_id])
    gone.kill()
    gone.wait()
    (run[dead_id] / "train.log").write_text("loading\nstep 1\nstep 2\n")
    set_row(store, dead_id, state="running", pid=gone.pid, pgid=gone.pid, started_at=time.time())
    # pid reuse: a live process that is not this job's (pytest itself) must not keep the job "running"
    set_row(store, reused_id, state="running", pid=os.getpid(), pgid=os.getpgid(0), started_at=time.time())
    # finished while the studio was down: status.json says completed and the adapter exists
    (run[done_id] / "status.json").write_text(json.dumps({"phase": "completed", "step": 2, "total_steps": 2,
                                                          "adapter_name": "a8"}))
    adapter = Path(os.environ["STUDIO_ADAPTERS_DIR"]) / "a8"
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    set_row(store, done_id, state="running", pid=gone.pid, pgid=gone.pid, started_at=time.time())

    restarted = JobStore(home)  # reconciles on start
    assert restarted.get(alive_id)["state"] == "running"
    dead = restarted.get(dead_id)
    assert dead["state"] == "failed" and "step 2" in dead["error"] and "before finishing" in dead["error"]
    assert restarted.get(reused_id)["state"] == "failed"
    done = restarted.get(done_id)
    assert done["state"] == "completed" and done["adapter_name"] == "a8"

    # SIGKILL of a re-attached process: noticed by polling, not by being its parent
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    restarted.reconcile()
    killed = restarted.get(alive_id)
    assert killed["state"] == "failed"


def test_store_survives_sigkill_mid_write(home, chat_jsonl):
    """A studio killed while it writes to the store: the database stays consistent and every job it recorded has
    its job.yaml (written before the row)."""
    JobStore(home)
    cfg_file = chat_jsonl.parent / "hammer.yaml"
    tiny_config(chat_jsonl, "hammer").save(cfg_file)
    code = ("import sys; from finetune.jobs import JobStore; from finetune.config import JobConfig\n"
            "s = JobStore(sys.argv[1], reconcile=False); c = JobConfig.load(sys.argv[2])\n"
            "while True:\n    j = s.submit(c); s.cancel(j)\n")
    writer = subprocess.Popen([sys.executable, "-c", code, str(home), str(cfg_file)])
    try:
        wait_for(lambda: len(JobStore(home, reconcile=False).list_jobs()) >= 40, 120, "40 jobs written")
    finally:
        writer.kill()
        writer.wait()
    store = JobStore(home)
    con = sqlite3.connect(store.db_path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    rows = store.list_jobs()
    assert len(rows) >= 40 and all(Path(r["run_dir"], "job.yaml").is_file() for r in rows)
    assert {r["state"] for r in rows} <= {"queued", "cancelled"}
    assert store.get(store.submit(tiny_config(chat_jsonl, "after")))["state"] == "queued"


def test_diagnose_plain_words():
    d = process.diagnose
    assert d({"phase": "failed", "error": "bad data: x.jsonl, line 3"}, "", 1) == "bad data: x.jsonl, line 3"
    assert "ran out of memory" in d({}, "torch.OutOfMemoryError: CUDA out of memory. Tried", 1)
    assert "x.jsonl, line 7" in d({}, "Traceback\nfinetune.data.DataError: x.jsonl, line 7: field messages", 1)
    assert "missing: liger_kernel" in d({}, "ModuleNotFoundError: No module named 'liger_kernel'", 1)
    assert "killed (SIGKILL" in d({}, "CalledProcessError: Command '[...]' died with <Signals.SIGKILL: 9>.", 1)
    assert "killed (SIGKILL" in d({}, "", -9)
    assert d({}, "Traceback\nValueError: nope\nsubprocess.CalledProcessError: ... exit status 1.", 1) == \
        "training failed: ValueError: nope"
    # a library's warning about an optional module is not the reason; the signal is
    warn = "WARNING bitsandbytes: Failed to load from kernels-community: No module named 'kernels'.\n"
    assert "killed (SIGKILL" in d({}, warn + "CalledProcessError: Command '[...]' died with <Signals.SIGKILL: 9>.", 1)
    # only the latest attempt's output counts
    old_attempt = "=== studio: attempt 1 ===\nfinetune.data.DataError: old.jsonl, line 1\n"
    assert d({}, old_attempt + "=== studio: attempt 2 ===\nerror: disk full", 1) == "disk full"


def test_cli_list_show_duplicate(home, chat_jsonl, capsys, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(home))
    job_file = chat_jsonl.parent / "cli-job.yaml"
    tiny_config(chat_jsonl, "cli-a").save(job_file)
    assert cli(["submit", str(job_file), "--set", "training.max_steps=3"]) == 0
    job_id = capsys.readouterr().out.strip()
    assert JOB_ID_RE.match(job_id)
    assert cli(["list"]) == 0
    assert job_id in capsys.readouterr().out
    assert cli(["show", job_id]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "queued"
    assert cli(["duplicate", job_id]) == 0
    assert JobConfig.from_yaml(capsys.readouterr().out).training.max_steps == 3
    assert cli(["cancel", job_id]) == 0
    assert cli(["cancel", job_id]) == 2
    assert "only a queued or running job" in capsys.readouterr().err


# --- real training runs ------------------------------------------------------------------------------
RUN_DEADLINE = 420  # seconds for one tiny CPU run on a busy 2-core box (they take ~20-40 s alone)


@pytest.fixture
def stores(home):
    """JobStores made by a test; at the end their schedulers stop and any job still running is killed."""
    made: list[JobStore] = []

    def make(**kw) -> JobStore:
        kw.setdefault("poll_interval", 0.2)
        s = JobStore(home, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop_scheduler()
    if made:
        for row in made[-1].list_jobs(states=("running",)):
            process.stop_group(row["pgid"], row["run_dir"], grace_s=2)


def trainer_pid(row: dict) -> int | None:
    """The training process itself (accelerate's child), not the launcher."""
    for pid in process.group_members(row["pgid"], row["run_dir"]):
        cmd = process._cmdline(pid)
        if "accelerate" not in cmd and " train " in cmd:
            return pid
    return None


def finished(store: JobStore, job_id: str) -> dict | None:
    row = store.get(job_id)
    return row if row["state"] in ("completed", "failed", "cancelled") else None


def in_training(store: JobStore, job_id: str, min_step: int = 1):
    info = store.live(job_id)
    assert info["state"] in ("queued", "running"), info["error"]
    return info["state"] == "running" and info["phase"] == "training" and info["step"] >= min_step


def test_two_jobs_run_one_after_the_other(stores, chat_jsonl):
    store = stores(max_concurrent=1).start_scheduler()
    a = store.submit(tiny_config(chat_jsonl, "seq-a"))
    b = store.submit(tiny_config(chat_jsonl, "seq-b"))
    both_running = []

    def done():
        rows = [store.get(a), store.get(b)]
        if all(r["state"] == "running" for r in rows):
            both_running.append(True)
        return all(r["state"] in ("completed", "failed", "cancelled") for r in rows)

    wait_for(done, 2 * RUN_DEADLINE, "both jobs to finish", interval=0.2)
    ra, rb = store.get(a), store.get(b)
    assert (ra["state"], rb["state"]) == ("completed", "completed"), (ra["error"], rb["error"])
    assert not both_running
    assert rb["started_at"] >= ra["finished_at"]
    for job_id, name in ((a, "seq-a"), (b, "seq-b")):
        info = store.live(job_id)
        assert info["adapter_name"] == name and info["step"] == info["total_steps"] == 2 and info["progress"] == 1.0
        assert [s for s, _ in info["loss_history"]] == [1, 2] and info["exit_code"] == 0
        assert info["command"].split()[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
        assert (Path(os.environ["STUDIO_ADAPTERS_DIR"]) / name / "adapter_model.safetensors").is_file()


def test_sigkill_of_training_process_marks_job_failed(stores, chat_jsonl):
    store = stores().start_scheduler()
    job_id = store.submit(tiny_config(chat_jsonl, "killed", steps=200))
    wait_for(lambda: in_training(store, job_id), RUN_DEADLINE, "training to start")
    row = store.get(job_id)
    pid = trainer_pid(row)
    assert pid, process.group_members(row["pgid"], row["run_dir"])
    os.kill(pid, signal.SIGKILL)
    row = wait_for(lambda: finished(store, job_id), 60, "the job to be marked finished")
    assert row["state"] == "failed"
    assert row["error"] == "the training process was killed (SIGKILL or out of host memory)"
    assert not process.group_members(row["pgid"], row["run_dir"])
    assert store.live(job_id)["log_tail"]


def test_restarted_studio_reattaches_running_job(stores, chat_jsonl, home):
    """The first studio is a real process (`jobs run-scheduler`) that dies by SIGKILL mid-run; a new store and
    scheduler in this process re-attach the orphaned training process and finish the job."""
    env = dict(os.environ, STUDIO_HOME=str(home), PYTHONUNBUFFERED="1")
    first = subprocess.Popen([sys.executable, "-m", "finetune", "jobs", "run-scheduler"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        queue = stores()  # no scheduler here yet: only the first studio launches
        job_id = queue.submit(tiny_config(chat_jsonl, "reattached", steps=8))
        wait_for(lambda: in_training(queue, job_id), RUN_DEADLINE, "training to start")
        pid = queue.get(job_id)["pid"]
        first.kill()  # the studio crashes; its training process does not
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    assert f"started {job_id}" in first.stdout.read()

    second = stores()  # a new studio: reconciles at start
    row = second.get(job_id)
    assert row["state"] == "running" and row["pid"] == pid and process.is_ours(pid, row["run_dir"])
    second.start_scheduler()
    row = wait_for(lambda: finished(second, job_id), RUN_DEADLINE, "the re-attached job to finish")
    assert row["state"] == "completed", row["error"]
    assert row["adapter_name"] == "reattached" and row["attempts"] == 1
    assert second.live(job_id)["step"] == 8


def test_cancel_running_job_then_resume_from_checkpoint(stores, chat_jsonl):
    store = stores().start_scheduler()
    job_id = store.submit(tiny_config(chat_jsonl, "resumed", steps=6, save_steps=2))
    # Step 3 is logged only after checkpoint-2 is fully saved; freezing the group there makes the cancel land
    # before the end however fast the steps are (cancel sends SIGCONT after SIGTERM).
    wait_for(lambda: in_training(store, job_id, min_step=3), RUN_DEADLINE, "step 3", interval=0.05)
    row = store.get(job_id)
    os.killpg(row["pgid"], signal.SIGSTOP)
    t0 = time.monotonic()
    row = store.cancel(job_id)
    cancel_s = time.monotonic() - t0
    assert row["state"] == "cancelled" and row["error"] is None
    assert not process.group_members(row["pgid"], row["run_dir"])
    assert cancel_s < 10, "SIGTERM should stop it well within the grace period"
    checkpoint = rundir.latest_checkpoint(Path(row["run_dir"]))
    assert checkpoint in ("checkpoint-2", "checkpoint-4")
    assert store.live(job_id)["step"] < 6

    store.resume(job_id)
    row = wait_for(lambda: finished(store, job_id), RUN_DEADLINE, "the resumed job to finish")
    assert row["state"] == "completed", row["error"]
    assert row["attempts"] == 2 and row["resumed_from"] == checkpoint
    info = store.live(job_id)
    assert info["step"] == info["total_steps"] == 6 and info["progress"] == 1.0
    assert [s for s, _ in info["loss_history"]] == [1, 2, 3, 4, 5, 6]
    assert "--resume" in info["command"] and f"resuming from {checkpoint}" in Path(row["run_dir"], "train.log").read_text()
    # the resumed attempt logged only the steps after the checkpoint
    resumed_steps = [r["step"] for r in rundir.read_metrics(Path(row["run_dir"])) if "loss" in r]
    first_after = int(checkpoint.split("-")[1]) + 1
    assert resumed_steps[-(6 - first_after + 1):] == list(range(first_after, 7))


def test_data_broken_after_submit_fails_naming_file_and_line(stores, chat_jsonl, tmp_path, home):
    """Broken data is refused at submit (tests/test_datacheck.py); data that breaks while the job waits in the queue
    fails the job with the file and line, never a traceback."""
    rows = chat_jsonl.read_text().splitlines()
    data = tmp_path / "later-broken.jsonl"
    data.write_text("\n".join(rows) + "\n")
    job_id = stores(reconcile=False).submit(tiny_config(data, "bad-data"))  # no scheduler yet: it waits
    data.write_text("\n".join(rows[:2] + ['{"messages": [{"role": "user", "content": "hi"}'] + rows[2:]) + "\n")
    row = stores().wait(job_id, timeout=RUN_DEADLINE)
    assert row["state"] == "failed"
    assert "later-broken.jsonl" in row["error"] and "line 3" in row["error"], row["error"]
    assert "Traceback" not in row["error"]


def test_sigkill_at_random_points_then_resume(stores, chat_jsonl):
    """Fault injection, small: SIGKILL a job's training process at seeded random moments (loading, data,
    training, checkpointing, publishing). Every job ends failed (or completed if it was faster), never `running`;
    no adapter is half-written; resuming each failed job finishes it at the planned step count."""
    import random

    rng = random.Random(6)
    store = stores().start_scheduler()
    adapters = Path(os.environ["STUDIO_ADAPTERS_DIR"])
    jobs = [store.submit(tiny_config(chat_jsonl, f"fault-{i}", steps=4, save_steps=2)) for i in range(4)]
    outcomes = {}
    for i, job_id in enumerate(jobs):
        wait_for(lambda: store.get(job_id)["state"] != "queued", RUN_DEADLINE, f"job {i} to start", interval=0.05)
        started = time.monotonic()
        delay = rng.uniform(0.5, 9.0)
        wait_for(lambda: time.monotonic() - started >= delay or finished(store, job_id), 60, "the kill moment",
                 interval=0.05)
        row = store.get(job_id)
        victim = trainer_pid(row) or row["pid"]
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
        row = wait_for(lambda: finished(store, job_id), 60, "the killed job to be marked finished")
        outcomes[job_id] = (round(delay, 1), row["state"], store.live(job_id)["phase"])
        assert row["state"] in ("failed", "completed"), outcomes
        if row["state"] == "failed":
            assert "killed" in row["error"] or "before finishing" in row["error"], row["error"]
        assert not process.group_members(row["pgid"], row["run_dir"])
        folder = adapters / f"fault-{i}"  # either absent or complete: publishing is a rename
        assert not folder.exists() or all((folder / f).is_file() for f in
                                          ("adapter_model.safetensors", "adapter_config.json", "studio.json"))
    print("kill moments (delay s, state, phase):", list(outcomes.values()))

    for job_id in jobs:
        if store.get(job_id)["state"] == "failed":
            store.resume(job_id)
    for job_id in jobs:
        row = wait_for(lambda: finished(store, job_id), RUN_DEADLINE, "the resumed job to finish")
        assert row["state"] == "completed", row["error"]
        info = store.live(job_id)
        assert info["step"] == 4 and [s for s, _ in info["loss_history"]] == [1, 2, 3, 4]
