"""`python -m finetune jobs ...`: the job queue from a terminal (the same store the studio uses)."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from finetune.config import ConfigError, JobConfig
from finetune.errors import StudioError
from finetune.jobs.kinds import get_kind, kind_names, spec_yaml
from finetune.jobs.store import JobStore


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
        table.append((v["id"], v["name"][:28], v["state"], step, loss, adapter or "-", _fmt_time(v["created_at"])))
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
        print(f"job {job_id} completed" + (f": adapter {row['adapter_name']}" if row["adapter_name"] else ""))
        return 0
    print(f"job {job_id} {row['state']}" + (f": {row['error']}" if row["error"] else ""), file=sys.stderr)
    return 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m finetune jobs", description="The studio's job queue (STUDIO_HOME/studio.db).")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="table of jobs, newest first")
    s = sub.add_parser("show", help="a job's live status as JSON")
    s.add_argument("id")
    s = sub.add_parser("submit", help="queue a job config")
    s.add_argument("file")
    s.add_argument("--kind", default="train", choices=kind_names(), help="what the job runs (default: train)")
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
    return p


def _submit(store: JobStore, a: argparse.Namespace) -> int:
    if get_kind(a.kind).spec is JobConfig:
        spec = JobConfig.load(a.file)
        spec = spec.with_overrides(a.set) if a.set else spec
    else:
        try:
            spec = Path(a.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{a.file}: cannot read the job spec ({e})") from None
    job_id = store.submit(spec, name=a.name, kind=a.kind)
    print(job_id, flush=True)
    if a.wait:
        return _wait_and_report(store, job_id)
    print("queued; it runs while the studio (make run) or `python -m finetune jobs run-scheduler` is up", file=sys.stderr)
    return 0


def _run_scheduler(store: JobStore) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"scheduler running on {store.db_path} (max {store.max_concurrent} at once); Ctrl-C to stop", flush=True)
    try:
        while True:
            for job_id in store.tick():
                print(f"started {job_id}", flush=True)
            store.scheduler.sleep()
    except KeyboardInterrupt:
        print("scheduler stopped; running jobs continue")
    return 0


def _dispatch(store: JobStore, a: argparse.Namespace) -> int:
    if a.cmd == "list":
        _print_table(store)
    elif a.cmd == "show":
        print(json.dumps(store.live(a.id), indent=2))
    elif a.cmd == "submit":
        return _submit(store, a)
    elif a.cmd == "cancel":
        print(f"job {a.id} {store.cancel(a.id)['state']}")
    elif a.cmd == "resume":
        store.resume(a.id)
        print(f"job {a.id} queued again")
        return _wait_and_report(store, a.id) if a.wait else 0
    elif a.cmd == "duplicate":
        sys.stdout.write(spec_yaml(store.duplicate(a.id)))
    elif a.cmd == "run-scheduler":
        return _run_scheduler(store)
    return 0


def cli(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    try:
        return _dispatch(JobStore(), a)
    except StudioError as e:  # a bad config, bad data, an unknown job: one plain line
        print(f"error: {e}", file=sys.stderr)
        return 2
