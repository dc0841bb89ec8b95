"""Sweeps end to end on CPU with the real model: trials are real training jobs of a few steps.

- through the studio: a 4-trial sweep submitted with /submit_sweep; the studio and the sweep's driver are SIGKILLed
  after the first trial and the studio started again: the same study goes on to 4 trials, none lost or repeated;
- a trial the pruner stops is shown as pruned (the threshold pruner with a bound no loss can meet: deterministic);
- two workers (two processes, two studio homes, as two machines would be) share one study through one storage URL.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from gradio_client import Client

from conftest import arithmetic_rows, tiny_config, wait_for, write_jsonl
from studio_server import ROOT, as_json, free_port, running_studio, studio_env

TRIAL_S = 900  # one trial of 2-3 steps, model loading included, on a busy 2-core machine


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("sweep-data") / "train.jsonl", arithmetic_rows(40))


def sweep_spec(data: Path, name: str, n_trials: int, **over) -> dict:
    base = tiny_config(data, name, steps=2, eval_steps=1)
    base.data.validation_split = 0.2
    spec = {"name": name, "base": base.model_dump(mode="json"), "n_trials": n_trials, "pruner": "none",
            "space": {"learning_rate": {"low": 1e-4, "high": 1e-2}, "r": [4, 8], "max_steps": [2, 3]}}
    spec.update(over)
    return spec


def sweep_status(client: Client, job_id: str) -> dict:
    """The sweep's status; a sweep that failed ends any wait on it at once, with its error."""
    status = as_json(client.predict(job_id, api_name="/sweep_status"))
    assert status["job"]["state"] != "failed", status["job"]
    return status


@pytest.mark.timeout(5400)  # four real trials and two studio starts on a shared 2-core machine
def test_sweep_through_the_queue_survives_a_studio_kill(tmp_path, data):
    home, port = tmp_path / "home", free_port()
    args = ("--allow-path", str(data.parent))
    with running_studio(home, *args, port=port) as (url, proc, _):
        client = Client(url, verbose=False)
        job = str(client.predict(yaml.safe_dump(sweep_spec(data, "sw", 4)), api_name="/submit_sweep")).strip()
        wait_for(lambda: sweep_status(client, job)["finished"] >= 1, 2 * TRIAL_S, "the first trial to finish")
        os.kill(proc.pid, signal.SIGKILL)  # the studio dies, and the driver with it (a machine going down)
        proc.wait(timeout=10)
    from finetune.jobs.store import JobStore
    from finetune.sweep.status import trial_jobs

    pgid = JobStore(home, reconcile=False).get(job)["pgid"]
    os.killpg(pgid, signal.SIGKILL)
    with running_studio(home, *args, port=port) as (url, proc, _):
        client = Client(url, verbose=False)
        final = wait_for(lambda: (s := sweep_status(client, job))["job"]["state"] == "completed" and s,
                         5 * TRIAL_S, "the sweep to finish after the restart")
    assert final["job"]["state"] == "completed", final["job"]
    trials = final["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3]
    assert all(t["state"] == "completed" and isinstance(t["value"], float) for t in trials), trials
    jobs = trial_jobs(JobStore(home, reconcile=False), job)
    assert sorted(t["job_id"] for t in trials) == sorted(r["id"] for r in jobs)  # one job per trial: none repeated
    assert all(r["state"] == "completed" and r["kind"] == "train" for r in jobs)
    assert JobStore(home, reconcile=False).get(job)["attempts"] == 2  # the driver was started again, once
    best = min(trials, key=lambda t: t["value"])
    assert final["best"]["number"] == best["number"]
    assert final["best_config"]["lora"]["r"] == best["params"]["r"]
    assert set(final["importances"]) <= {"learning_rate", "r", "max_steps"}
    # Compare runs: the sweep picked stands for its trials' curves
    from app import render
    from app.jobs_tab import overlay_runs

    store = JobStore(home, reconcile=False)
    runs = overlay_runs([job], store.views())
    assert sorted(runs) == sorted(r["id"] for r in jobs)
    lives = [store.live(r) for r in runs]
    assert all(len(live["loss_history"]) >= 2 for live in lives)
    chart = render.overlay_chart(lives)
    assert all(render.esc(live["name"]) in chart for live in lives)


def run_cli(home: Path, spec: dict, path: Path) -> subprocess.Popen:
    path.write_text(yaml.safe_dump(spec))
    return subprocess.Popen([sys.executable, "-m", "finetune", "sweep", str(path)], cwd=ROOT, env=studio_env(home),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.timeout(2400)
def test_pruned_trial_shows_as_pruned(tmp_path, data):
    from finetune.jobs.store import JobStore
    from finetune.sweep.status import sweep_status as status_of, trial_jobs

    spec = sweep_spec(data, "pr", 1, pruner="threshold", prune_above=1e-3, report_every=1,
                      space={"max_steps": [40]})  # any validation loss is above 1e-3: stopped at its first report
    proc = run_cli(tmp_path / "home", spec, tmp_path / "sweep.yaml")
    out, _ = proc.communicate(timeout=2 * TRIAL_S)
    assert "pruned" in out, out
    store = JobStore(tmp_path / "home", reconcile=False)
    sweep_row = next(r for r in store.list_jobs() if r["kind"] == "sweep")
    (trial_job,) = trial_jobs(store, sweep_row["id"])
    assert trial_job["state"] == "cancelled" and trial_job["reason"] == "pruned"
    view = store.live(trial_job["id"])
    assert view["phase"] == "pruned" and view["step"] < 40
    info = status_of(store, sweep_row["id"])
    assert [t["state"] for t in info["trials"]] == ["pruned"] and info["best"] is None


@pytest.mark.timeout(2400)
def test_two_workers_share_one_study(tmp_path, data):
    import optuna

    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    spec = sweep_spec(data, "shared", 2, storage=storage, study_name="shared-study")
    workers = [run_cli(tmp_path / f"home{i}", spec, tmp_path / f"sweep{i}.yaml") for i in range(2)]
    outputs = [w.communicate(timeout=3 * TRIAL_S)[0] for w in workers]
    study = optuna.load_study(study_name="shared-study", storage=storage)
    trials = study.get_trials()
    assert 2 <= len(trials) <= 3, outputs  # two asking at the same moment may both start one
    assert all(t.state.name == "COMPLETE" for t in trials), outputs
    assert len({t.user_attrs["sweep_job"] for t in trials}) == 2, outputs  # both workers ran trials
    assert all("best trial" in o for o in outputs), outputs
