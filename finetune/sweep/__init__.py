"""Hyper-parameter search as a job: an Optuna study whose trials are ordinary studio training jobs.

    config.py    SweepConfig: base job, search space, budget, objective, sampler, pruner, storage
    study.py     the Optuna study (RDB storage), sampler, pruner, a trial's parameters, importances
    driver.py    the loop a sweep job runs: ask -> train job -> report / prune -> tell; restart-safe
    job.py       the "sweep" job kind (no device slot; queued again when its process is lost)
    status.py    trials, best so far, importances, the best config (UI, API, CLI)
    cli.py       python -m finetune sweep SWEEP.yaml (foreground) and `sweep compare`

The functions below are what the UI and the API call; they import neither torch nor optuna at module level.
"""
from __future__ import annotations

from finetune import policy
from finetune.config import ConfigError, load_yaml


def submit(store, sweep_yaml: str, source: str = "submitted sweep") -> str:
    """Queue a sweep from YAML text; returns its job id. A client names a base job file only inside the folders the
    operator allows (the base is then pinned into the sweep as it is now)."""
    from finetune.sweep.config import SweepConfig

    data = load_yaml(sweep_yaml, source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a sweep config is a mapping (base, space, n_trials, objective ...)")
    if isinstance(data.get("base"), str) and policy.confined():
        policy.check_data_path(data["base"], "base")
    return store.submit(SweepConfig.parse(data, source), kind="sweep")


def status_of(store, job_id: str) -> dict:
    from finetune.sweep.status import sweep_status

    return sweep_status(store, job_id)


def train_best(store, job_id: str) -> str:
    """Queue the best trial's config as a training job of its own; returns the new job id."""
    info = status_of(store, job_id)
    if not info["best_config"]:
        raise ConfigError(f"sweep {job_id} has no completed trial yet: nothing to train")
    return store.submit(info["best_config"])
