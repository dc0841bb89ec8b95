"""Fault injection on training: SIGKILL the real training process at random points of N runs.

Every kill must leave the job `failed` (never `running`), the adapter store holding only whole adapters, and every
visible checkpoint complete; resuming after each kill must finally complete the job at its planned step count.
The kill points are seeded-random among: start-up/loading, mid-training, while a checkpoint is being written, and
while the finished adapter is being saved/published.
"""
from __future__ import annotations

import functools
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import tiny_config, wait_for
from finetune import rundir
from finetune.config import JobConfig
from finetune.jobs import JobStore, process
from finetune.store.adapters import adapters_dir

N_KILLS = int(os.environ.get("STUDIO_FAULT_KILLS", "10"))
MAX_STEPS = 12
DEADLINE = 240


# Fast polling: the moments these tests aim at (a checkpoint mid-write) last a fraction of a second.
wait_fast = functools.partial(wait_for, interval=0.02)


def config(data: Path) -> JobConfig:
    # a checkpoint every step: many chances to be killed mid-write
    return tiny_config(data, "fault-victim", MAX_STEPS, save_steps=1, save_total_limit=2)


def assert_store_whole() -> None:
    for p in adapters_dir().iterdir():
        if p.name.startswith(".") or not p.is_dir():
            continue  # staging folders are hidden and never listed
        for f in ("adapter_config.json", "studio.json"):
            json.loads((p / f).read_text())
        with safe_open(str(p / "adapter_model.safetensors"), "pt") as st:
            assert list(st.keys()), f"{p.name}: empty adapter"


def assert_checkpoints_whole(run_dir: Path) -> None:
    for p in (run_dir / "checkpoints").glob("checkpoint-*"):
        state = json.loads((p / "trainer_state.json").read_text())
        assert p.name == f"checkpoint-{state['global_step']}"
        with safe_open(str(p / "model.safetensors"), "pt") as st:
            assert list(st.keys())


def written_since(folder: Path, pattern: str, t0: float) -> bool:
    """Whether a file matching pattern was written at or after t0; it may be renamed away between glob and stat."""
    for p in folder.glob(pattern):
        try:
            if p.stat().st_mtime >= t0:
                return True
        except FileNotFoundError:
            continue
    return False


def kill_point(store: JobStore, job_id: str, kind: str, rng: random.Random) -> str:
    """Wait for the chosen moment of the current attempt, then SIGKILL the trainer. Returns what was hit."""
    row = wait_fast(lambda: (r := store.get(job_id))["state"] == "running" and r["pgid"] and r, DEADLINE, "launch")
    run_dir = Path(row["run_dir"])
    ckpts = run_dir / "checkpoints"
    if kind == "loading":
        time.sleep(rng.uniform(0.5, 6.0))
    elif kind == "training":
        start = rundir.read_status(run_dir).get("step") or 0
        wait_fast(lambda: store.live(job_id)["phase"] == "training" and store.live(job_id)["step"] > start
                 or store.get(job_id)["state"] != "running", DEADLINE, "a training step")
        time.sleep(rng.uniform(0.0, 0.4))
    elif kind == "checkpoint":
        # A kill mid-write leaves a stale .tmp-checkpoint-N behind (never read); wait for one written by this attempt.
        wait_fast(lambda: store.live(job_id)["phase"] == "training" or store.get(job_id)["state"] != "running",
                 DEADLINE, "training to start")
        t0 = time.time()
        wait_fast(lambda: written_since(ckpts, ".tmp-checkpoint-*", t0)
                 or store.get(job_id)["state"] != "running", DEADLINE, "a checkpoint being written", interval=0.002)
    elif kind == "saving":
        wait_fast(lambda: rundir.read_status(run_dir).get("phase") in ("saving", "completed")
                 or any(adapters_dir().glob(".tmp-fault-victim-*")) or store.get(job_id)["state"] != "running",
                 DEADLINE, "the adapter being saved", interval=0.002)
    row = store.get(job_id)
    members = process.group_members(row["pgid"], row["run_dir"])
    status = rundir.read_status(run_dir)
    hit = status.get("phase") if status.get("pid") in members else "starting"  # else: the last attempt's file
    if row["state"] != "running" or not members:
        return f"{kind}: too late ({row['state']})"
    for pid in members:  # the trainer and accelerate's launcher: the whole job dies like an OOM-killed one
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return f"{kind}: killed in phase {hit}"


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(tmp_path, chat_jsonl):
    rng = random.Random(1234)
    store = JobStore(home=tmp_path / "studio", poll_interval=0.2).start_scheduler()
    try:
        job_id = store.submit(config(chat_jsonl))
        # Every kind of moment once, then random ones; the adapter save comes last (after it, resuming only re-saves).
        mid = ["loading", "training", "checkpoint"]
        kinds = mid + [rng.choice(mid) for _ in range(max(0, N_KILLS - 4))] + ["saving"]
        hits = []
        for kind in kinds[-N_KILLS:]:
            hits.append(kill_point(store, job_id, kind, rng))
            row = wait_fast(lambda: (r := store.get(job_id))["state"] != "running" and r, 60, "the job to stop")
            assert row["state"] in ("failed", "completed"), row
            if row["state"] == "failed":
                assert row["error"], row
                assert not process.group_members(row["pgid"], row["run_dir"])
            assert_store_whole()
            assert_checkpoints_whole(Path(row["run_dir"]))
            if row["state"] == "completed":
                break
            store.resume(job_id)
        if store.get(job_id)["state"] != "completed":
            wait_fast(lambda: store.get(job_id)["state"] in ("completed", "failed"), DEADLINE, "the final resume")
        row = store.get(job_id)
        print("\n".join(hits))
        assert row["state"] == "completed", (row["error"], store.live(job_id)["log_tail"])
        assert sum("killed" in h for h in hits) >= N_KILLS // 2, hits
        live = store.live(job_id)
        assert live["step"] == MAX_STEPS
        meta = json.loads((adapters_dir() / "fault-victim" / "studio.json").read_text())
        assert meta["metrics"]["steps"] == MAX_STEPS
        assert_store_whole()
    finally:
        store.stop_scheduler()
