"""What a client shows of a sweep: its trials (state, objective, parameters, job), the best so far, parameter
importances and the best trial's job config. Read from the study's storage and the job store."""
from __future__ import annotations

from pathlib import Path

from finetune import rundir
from finetune.jobs.store import JobStore
from finetune.sweep import study as S

STATE_NAMES = {"COMPLETE": "completed", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
               "WAITING": "queued"}


def trial_jobs(store: JobStore, sweep_id: str) -> list[dict]:
    """The jobs a sweep submitted (its trials), newest first."""
    return [r for r in store.list_jobs() if r.get("parent") == sweep_id]


def trial_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        last = max(t.intermediate_values) if t.intermediate_values else None
        rows.append({"number": t.number, "state": STATE_NAMES.get(t.state.name, t.state.name.lower()),
                     "value": t.value, "params": dict(t.params), "job_id": t.user_attrs.get(S.JOB),
                     "worker": t.user_attrs.get(S.WORKER),
                     "last_report": [last, t.intermediate_values[last]] if last is not None else None})
    return rows


def summary(study) -> dict:
    """Trials, how many have finished, and the best (number, value, params) so far."""
    rows = trial_rows(study)
    done = [r for r in rows if r["state"] == "completed" and r["value"] is not None]
    best = None
    if done:
        pick = min if study.direction.name == "MINIMIZE" else max
        b = pick(done, key=lambda r: r["value"])
        best = {"number": b["number"], "value": b["value"], "params": b["params"], "job_id": b["job_id"]}
    return {"trials": rows, "finished": sum(r["state"] not in ("running", "queued") for r in rows), "best": best}


def sweep_status(store: JobStore, job_id: str, with_importances: bool = True) -> dict:
    """Everything the Sweep panel, /sweep_status and the CLI show for one sweep job."""
    from finetune.sweep.config import SweepConfig

    row = store.get(job_id)
    if row["kind"] != "sweep":
        raise ValueError(f"job {job_id} is a {row['kind']} job, not a sweep")
    spec: SweepConfig = store.spec_of(row)
    status = rundir.read_status(Path(row["run_dir"]))
    out = {"job": store.live(job_id, detail=False), "objective": spec.objective, "direction": spec.direction,
           "n_trials": spec.n_trials, "study_name": status.get("study_name") or spec.study_name or job_id,
           "trials": [], "finished": 0, "best": None, "importances": {}, "best_config": None}
    storage = S.storage_url(spec, Path(row["run_dir"]))
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        return out  # the driver has not created it yet
    try:
        study = S.load_study(storage, out["study_name"])
    except Exception:  # noqa: BLE001 - not created yet (the driver has not started): nothing to show
        return out
    out.update(summary(study))
    if with_importances:
        out["importances"] = S.importances(study)
    if out["best"]:
        out["best_config"] = best_config(spec, out["best"]["params"]).model_dump(mode="json")
    return out


def best_config(spec, params: dict):
    """The best trial's job config, named for training on its own (the "train the best config" action)."""
    from finetune.sweep.config import with_params

    return with_params(spec.base_config(), params, f"{spec.name}-best")
