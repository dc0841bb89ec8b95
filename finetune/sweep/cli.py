"""`python -m finetune sweep SWEEP.yaml`: a sweep in the foreground, through the studio's own queue.

The sweep is submitted to the job store of STUDIO_HOME like any job, and this process schedules it and its trials
until the sweep ends: the trials are ordinary jobs (the studio lists them, `jobs cancel` stops one), and a sweep
interrupted here is continued by a studio on the same home. Progress is printed per trial, and the best trial and
its job config at the end. Ctrl-C cancels the sweep (and the trial it runs).

Workers on several machines join one study by giving the same `storage` URL and `study_name` in their YAML.

`python -m finetune sweep compare --adapter A --against B [--metric rouge_l]`: the paired difference of two
adapters' stored evaluations on the same held-out examples (mean, bootstrap 95% interval, wins/ties/losses).
"""
from __future__ import annotations

import argparse
import json
import sys

import yaml

from finetune.config import ConfigError
from finetune.errors import StudioError, plain_message


def _print_trials(info: dict, seen: dict) -> None:
    for t in info["trials"]:
        key = (t["state"], t["value"], t["job_id"])
        if seen.get(t["number"]) != key:
            seen[t["number"]] = key
            value = f"{t['value']:.4f}" if isinstance(t["value"], float) else "-"
            print(f"trial {t['number']:>3}  {t['state']:<9} {info['objective']}={value:<8} job {t['job_id'] or '-'}  "
                  f"{json.dumps(t['params'])}", flush=True)


def run_foreground(path: str, poll_s: float = 2.0) -> int:
    from finetune.jobs.store import FINISHED, JobStore
    from finetune.sweep.config import SweepConfig
    from finetune.sweep.status import sweep_status

    spec = SweepConfig.load(path)
    store = JobStore()
    job_id = store.submit(spec, kind="sweep")
    print(f"sweep job {job_id}: {spec.n_trials} trials, objective {spec.objective} ({spec.direction})", flush=True)
    seen: dict = {}
    try:
        while store.get(job_id)["state"] not in FINISHED:
            store.tick()
            _print_trials(sweep_status(store, job_id, with_importances=False), seen)
            store.scheduler.sleep() if poll_s else None
    except KeyboardInterrupt:
        print("cancelling the sweep ...", flush=True)
        store.cancel(job_id)
    info = sweep_status(store, job_id)
    _print_trials(info, seen)
    return _report(store.get(job_id), info)


def _report(row: dict, info: dict) -> int:
    print(f"sweep {row['id']} {row['state']}" + (f": {row['error']}" if row.get("error") else ""))
    if not info["best"]:
        print("no trial completed")
        return 1
    best = info["best"]
    print(f"best trial {best['number']} (job {best['job_id']}): {info['objective']} = {best['value']:.4f}")
    print(f"parameters: {json.dumps(best['params'])}")
    if info["importances"]:
        print(f"importances: {json.dumps(info['importances'])}")
    print("best config:\n" + yaml.safe_dump(info["best_config"], sort_keys=False))
    return 0 if row["state"] == "completed" else 1


def compare_cli(argv: list[str]) -> int:
    from finetune.sweep.compare import compare

    p = argparse.ArgumentParser(prog="python -m finetune sweep compare")
    p.add_argument("--adapter", required=True, help="the adapter to judge (its stored evaluation)")
    p.add_argument("--against", required=True, help="the adapter it is compared with, on the same examples")
    p.add_argument("--metric", default="rouge_l")
    a = p.parse_args(argv)
    print(json.dumps(compare(a.adapter, a.against, a.metric), indent=2))
    return 0


def cli(argv: list[str]) -> int:
    if argv and argv[0] == "compare":
        runner, args = compare_cli, (argv[1:],)
    else:
        p = argparse.ArgumentParser(prog="python -m finetune sweep", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("sweep_yaml")
        runner, args = run_foreground, (p.parse_args(argv).sweep_yaml,)
    try:
        return runner(*args)
    except (ConfigError, StudioError, ValueError) as e:
        print(f"error: {plain_message(e)}", file=sys.stderr)
        return 2
