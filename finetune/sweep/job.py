"""The "sweep" job kind: its process is the driver (driver.py). It needs no device and takes no slot (its trials
do), and it restarts safely, so a driver lost with a studio or a machine is queued again and picks its study up.

    store.submit(SweepConfig.load("sweep.yaml"), kind="sweep")
    python -m finetune sweep-job runs/<id>/job.yaml --run-dir runs/<id>     (what the job runs)
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from finetune.config import ConfigError
from finetune.sweep.config import SweepConfig


def sweep_command(job_yaml: Path, run_dir: Path, resume: bool = False) -> list[str]:
    """Resuming needs no flag: the study in its storage is the sweep's state."""
    return [sys.executable, "-m", "finetune", "sweep-job", str(job_yaml), "--run-dir", str(run_dir)]


def prepare_sweep(spec: SweepConfig) -> SweepConfig:
    """Pin the base config into the spec (a later edit of its file does not change a queued sweep) and hold a
    studio client to what the operator allows: its base job passes the training job's checks, and the study's
    storage is the studio's own."""
    from finetune import policy
    from finetune.jobs.kinds import prepare_training

    if policy.confined() and spec.storage:
        raise ConfigError("storage: a studio client cannot choose where the study is stored; leave it unset")
    base = prepare_training(spec.base_config())
    return SweepConfig.parse({**spec.model_dump(mode="json"), "base": base.model_dump(mode="json")}, "sweep")


def _register() -> None:
    from finetune.jobs.kinds import JobKind, register_kind

    register_kind(JobKind(name="sweep", spec=SweepConfig, command=sweep_command, gpus=lambda spec: 0,
                          label=lambda spec: f"sweep {spec.name} ({spec.n_trials} trials, {spec.objective})",
                          prepare=prepare_sweep, slot=False, relaunch=True))


def run_job(spec: SweepConfig, run_dir: Path, job_id: str, home: str | None) -> None:
    from finetune.jobs.store import JobStore
    from finetune.sweep.driver import Driver

    store = JobStore(home, reconcile=False)
    driver = Driver(spec, store, job_id, run_dir, log=lambda m: print(m, flush=True))

    def stop(signum, frame):  # a cancelled sweep cancels the trial it is watching, then ends
        driver.stopping = True

    signal.signal(signal.SIGTERM, stop)
    driver.run()


def cli(argv: list[str]) -> int:
    from finetune.rundir import write_failure

    p = argparse.ArgumentParser(prog="python -m finetune sweep-job", description=__doc__)
    p.add_argument("job_yaml")
    p.add_argument("--run-dir", required=True)
    a = p.parse_args(argv)
    run_dir = Path(a.run_dir)
    try:
        spec = SweepConfig.load(a.job_yaml)
        run_job(spec, run_dir, os.environ.get("STUDIO_JOB_ID") or run_dir.name, os.environ.get("STUDIO_HOME"))
    except Exception as e:  # noqa: BLE001 - the sweep's failure, said where the store reads it
        from finetune.errors import plain_message

        write_failure(run_dir, plain_message(e))
        print(f"error: {plain_message(e)}", file=sys.stderr)
        return 1
    return 0


_register()
