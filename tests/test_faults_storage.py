"""Storage faults: a full disk during the adapter save fails the job with that reason and leaves the store
whole; the SQLite job store survives its writer being SIGKILLed mid-write."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.config import JobConfig
from finetune.jobs import JobStore

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs: a SmolLM2 LoRA adapter (~19 MB at r=16 all-linear) cannot fit. Needs root (CI runs as root)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_save_fails_with_that_reason(tmp_path, tiny_disk, chat_jsonl):
    cfg = JobConfig(adapter_name="no-room")
    cfg.model.quantization = "none"
    cfg.data.path = str(chat_jsonl)
    cfg.data.max_seq_length = 64
    cfg.training.max_steps = 1
    cfg.training.per_device_train_batch_size = 2
    cfg.training.save_steps = 0
    cfg.evaluation.enabled = False
    job = tmp_path / "job.yaml"
    cfg.save(job)
    run_dir = tmp_path / "run"
    env = dict(os.environ, STUDIO_ADAPTERS_DIR=str(tiny_disk))
    r = subprocess.run([sys.executable, "-m", "finetune", "train", str(job), "--run-dir", str(run_dir)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["phase"] == "failed"
    assert status["error"].startswith("disk full"), status["error"]
    # Nothing half-written is visible in the store: only hidden staging leftovers at most, and no "no-room".
    assert not (tiny_disk / "no-room").exists()
    assert [p.name for p in tiny_disk.iterdir() if not p.name.startswith(".")] == []


WRITER = r"""
import os, sys, itertools
from finetune.jobs import JobStore
from finetune.config import JobConfig
store = JobStore(home=sys.argv[1], reconcile=False)
print("ready", flush=True)
for i in itertools.count():
    store.submit(JobConfig(adapter_name=f"w-{os.getpid()}-{i}"), name=f"job-{i}")  # one name per queued job
"""


def test_sqlite_store_survives_sigkill_mid_write(tmp_path):
    home = tmp_path / "studio"
    env = dict(os.environ, STUDIO_HOME=str(home))
    for attempt in range(5):  # kill the writer at different moments, five times over the same database
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(home)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.3 + 0.2 * attempt)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
    con = sqlite3.connect(home / "studio.db")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    store = JobStore(home=home, reconcile=False)
    jobs = store.list_jobs()
    assert len(jobs) > 5
    for job in jobs:  # every committed job is whole: its row and its job.yaml agree
        assert job["state"] == "queued"
        assert JobConfig.load(Path(job["run_dir"]) / "job.yaml").adapter_name.startswith("w-")
