"""The scheduler: admits queued jobs by free device slots, launches them, and watches them until they end.

On a host with N GPUs, jobs that each need one GPU run side by side, each with its own CUDA_VISIBLE_DEVICES; a job
that needs k GPUs (a training job: launch.num_processes per machine; `auto` = every GPU of the host, resolved
here at admission) waits until k are free; a CPU-only job (or any job on a host without GPUs) takes one of the CPU
slots (STUDIO_MAX_CONCURRENT_JOBS, default 1; when set, it also caps the jobs running at once on a GPU host). Queued jobs start in submission order: a job that does not fit yet
holds back the ones behind it, so a large job is never starved by a stream of small ones.

admit() is a pure function of the queue, what runs and the devices, so other device pools (the benchmark's) can
use the same rule.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from finetune import rundir
from finetune.jobs import process
from finetune.jobs.kinds import get_kind
from finetune.jobs.launch import ALL_GPUS

if TYPE_CHECKING:
    from finetune.jobs.store import JobStore


# --- admission ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Admission:
    job_id: str
    devices: tuple[str, ...]  # the GPUs the job gets ("" for CPU-only jobs: CUDA_VISIBLE_DEVICES is emptied)


def admit(queue: list[tuple[str, int]], running: list[tuple[str, ...]], gpus: list[str], cpu_slots: int = 1,
          max_jobs: int | None = None) -> list[Admission]:
    """Which queued jobs start now. queue: (job id, GPUs it needs), oldest first; running: the devices each
    running job holds (() for a CPU job); gpus: the host's devices. Without GPUs every job is a CPU job."""
    busy = {d for held in running for d in held}
    free = [g for g in gpus if g not in busy]
    cpu_jobs = sum(1 for held in running if not held) if gpus else len(running)
    total = len(running)
    out: list[Admission] = []
    for job_id, need in queue:
        if max_jobs is not None and total >= max_jobs:
            break
        if not gpus or need <= 0:
            if cpu_jobs >= cpu_slots:
                break
            cpu_jobs += 1
            out.append(Admission(job_id, ()))
        else:
            if need > len(free):
                break
            taken, free = free[:need], free[need:]
            out.append(Admission(job_id, tuple(taken)))
        total += 1
    return out


def max_concurrent_env() -> int | None:
    """STUDIO_MAX_CONCURRENT_JOBS: how many jobs may run at once (unset: one on a CPU host, one per GPU)."""
    try:
        return max(1, int(os.environ["STUDIO_MAX_CONCURRENT_JOBS"]))
    except (KeyError, ValueError):
        return None


# --- the scheduler ------------------------------------------------------------------------------------------------
class Scheduler:
    """Starts and watches the jobs of one store. State is in the store, so any number of schedulers (the studio, a
    `jobs run-scheduler`, a CLI --wait) may run; the store's scheduling lock makes each pass exclusive."""

    def __init__(self, store: "JobStore", max_jobs: int | None = None, poll_interval: float = 1.0,
                 gpus: tuple[str, ...] | None = None):
        self.store = store
        self.max_jobs = max_jobs or max_concurrent_env()  # None: as many as the slots allow
        self.cpu_slots = self.max_jobs or 1
        self.poll_interval = poll_interval
        self.gpus = list(process.host_gpus() if gpus is None else gpus)
        self.children = process.Children()
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> list[str]:
        """Reconcile, then start what fits (oldest first). Returns the ids launched."""
        with self.store.scheduling():
            self._reconcile_locked()
            running = [tuple(r["devices"].split(",")) if r["devices"] else () for r in self.store.running()
                       if self._slot(r)]
            queue, drivers = [], []
            for r in self.store.queued():
                if not self._slot(r):  # a driver waits for its own jobs: it must never hold the slot they need
                    drivers.append(Admission(r["id"], ()))
                    continue
                need = self._need(r)
                if self.gpus and need > len(self.gpus):
                    self.store.launch_failed(r["id"], f"the job needs {need} GPUs; this host has {len(self.gpus)}")
                else:
                    queue.append((r["id"], need))
            launched = []
            for a in drivers + admit(queue, running, self.gpus, self.cpu_slots, self.max_jobs):
                row = self.store.claim(a.job_id, ",".join(a.devices))
                if row is not None:
                    self._launch(row, a.devices)
                    launched.append(a.job_id)
            return launched

    @staticmethod
    def _slot(row: dict) -> bool:
        try:
            return get_kind(row["kind"]).slot
        except Exception:  # an unknown kind fails at launch, with its reason
            return True

    def _need(self, row: dict) -> int:
        try:
            kind = get_kind(row["kind"])
            need = int(kind.gpus(self.store.spec_of(row)))
            return len(self.gpus) if need == ALL_GPUS else need
        except Exception:  # an unknown kind or a spec that no longer validates fails at launch, with its reason
            return 0

    def _launch(self, row: dict, devices: tuple[str, ...]) -> None:
        job_id, run_dir = row["id"], Path(row["run_dir"])
        checkpoint = rundir.latest_checkpoint(run_dir) if row["resume"] else None
        try:
            kind = get_kind(row["kind"])
            sized = {"gpus": len(devices) if self.gpus else 0} if kind.sized else {}
            cmd = kind.command(run_dir / rundir.JOB_YAML, run_dir, bool(checkpoint), **sized)
            line = process.command_string(cmd)
            rundir.begin_attempt(run_dir, row["attempts"], checkpoint, line, row["config"])
            proc = process.launch(cmd, run_dir, job_id, self.store.home, devices if self.gpus else None)
        except (OSError, ValueError) as e:
            self.store.launch_failed(job_id, f"could not start the {row['kind']} process: {e}")
            return
        self.children.add(job_id, proc)
        self.store.launched(job_id, proc.pid, process.group_of(proc), line, checkpoint)

    def reconcile(self) -> None:
        """Make the store agree with reality: every `running` job either has a live process of its own (re-attached:
        watched from now on) or is finished from what its run folder says."""
        with self.store.scheduling():
            self._reconcile_locked()

    def _reconcile_locked(self) -> None:
        codes = self.children.poll()
        for job_id in codes:  # exited children of ours whose job someone else (a CLI cancel) already finished
            if self.store.get(job_id)["state"] != "running":
                self.children.pop(job_id)
        for row in self.store.running():
            if row["pid"] is None:  # claimed but never launched (the studio died between the two writes)
                self.store.requeue_unlaunched(row["id"])
            elif not process.alive(row):
                self.finish(row["id"], codes.get(row["id"]))

    def finish(self, job_id: str, returncode: int | None) -> None:
        """Record how a job whose processes are all gone ended."""
        if returncode is None:
            try:
                returncode = self.children.exit_code(job_id)
            except TimeoutError:
                return  # still alive after all: the next pass looks again
        self.children.pop(job_id)
        from finetune.jobs.store import relaunch_if_lost  # the store imports this module

        if not relaunch_if_lost(self.store, job_id):
            self.store.record_outcome(job_id, returncode)

    def stop_job(self, row: dict, grace_s: float) -> None:
        """Stop a running job's process group (SIGTERM, SIGKILL after grace_s) and record it."""
        if row["pgid"]:
            process.stop_group(row["pgid"], row["run_dir"], grace_s, reap=self.children.poll)
        self.children.poll()
        self.finish(row["id"], None)
        self.wake.set()

    # --- the thread ---------------------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        """Start the daemon thread (idempotent). Jobs keep running if this process exits."""
        if self._thread and self._thread.is_alive():
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="studio-job-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30) -> None:
        """Stop scheduling; running jobs are left running (a restarted studio re-attaches them)."""
        self._stop.set()
        self.wake.set()
        if self._thread:
            self._thread.join(timeout)
        self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as e:  # a bad moment (disk, DB locked for 30 s) must not end scheduling for good
                print(f"studio scheduler: {type(e).__name__}: {e}", file=sys.stderr)
            self.sleep()

    def sleep(self) -> None:
        self.wake.wait(self.poll_interval)
        self.wake.clear()

    def wait(self, job_id: str, timeout: float | None = None, on_change: Callable[[dict], None] | None = None,
             schedule: bool = True) -> dict:
        """Block until the job has finished, scheduling in this thread when schedule is true (CLI --wait, scripts)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = None
        while True:
            if schedule:
                self.tick()
            row = self.store.get(job_id)
            if on_change:
                key = (row["state"], rundir.read_status(Path(row["run_dir"])).get("step"))
                if key != seen:
                    seen = key
                    on_change(self.store.live(job_id))
            if row["state"] in ("completed", "failed", "cancelled"):
                return row
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {row['state']} after {timeout} s")
            self.sleep()
