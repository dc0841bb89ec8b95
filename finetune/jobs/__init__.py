"""The job system: a persistent queue (store.py), what a job runs (kinds.py), device slots (scheduler.py), the
processes (process.py) and the `jobs` CLI (cli.py).

    from finetune.jobs import get_store
    store = get_store().start_scheduler()
    job_id = store.submit(JobConfig.load("job.yaml"))     # kind="train"; register_kind adds others
    store.live(job_id)
"""
from finetune.errors import JobError
from finetune.jobs import process
from finetune.jobs.kinds import JobKind, get_kind, register_kind
from finetune.jobs.store import (FINISHED, JOB_ID_RE, STATES, JobStore, get_store, start_scheduler,
                                 stop_scheduler)
from finetune.jobs.cli import cli  # noqa: E402  (after the store it drives)
import finetune.export.job  # noqa: E402,F401  (registers the "export" kind)
import finetune.sweep.job  # noqa: E402,F401  (registers the "sweep" kind)


__all__ = ["FINISHED", "JOB_ID_RE", "STATES", "JobError", "JobKind", "JobStore", "cli", "get_kind", "get_store", "process",
           "register_kind", "start_scheduler", "stop_scheduler"]
