"""The Optuna side of a sweep: the study in its storage, the sampler and pruner, and a trial's parameters.

Optuna is imported inside these functions: the studio UI imports the sweep package and stays light.
"""
from __future__ import annotations

import time
import zlib
from pathlib import Path

from finetune.sweep.config import LogRange, Space, SweepConfig

# A trial's user attributes: which sweep job (worker) runs it and which studio job trains it.
WORKER, JOB = "sweep_job", "job_id"


def storage_url(spec: SweepConfig, run_dir: Path) -> str:
    return spec.storage or f"sqlite:///{Path(run_dir).resolve() / 'study.db'}"


def _sampler(spec: SweepConfig, offset: int = 0):
    """offset moves the seed: a restarted driver or a second worker must not draw the first trials' values again."""
    import optuna

    seed = None if spec.seed is None else spec.seed + offset
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(4, spec.n_trials))


def _pruner(spec: SweepConfig):
    import optuna

    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if spec.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if spec.pruner == "threshold":
        return optuna.pruners.ThresholdPruner(upper=spec.prune_above)
    return optuna.pruners.NopPruner()


def open_study(spec: SweepConfig, storage: str, study_name: str, worker: str = "", attempts: int = 10):
    """Create the study, or load it when it exists (a restarted sweep, another worker). The sampler's seed is moved
    by the trials already in the study and, in a study named for sharing, by the worker."""
    import optuna
    import sqlalchemy.exc

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for attempt in range(attempts):
        try:
            storage_obj = optuna.storages.RDBStorage(storage, engine_kwargs=_engine_kwargs(storage))
            study = optuna.create_study(storage=storage_obj, study_name=study_name, direction=spec.direction,
                                        sampler=_sampler(spec), pruner=_pruner(spec), load_if_exists=True)
            offset = len(study.get_trials(deepcopy=False)) + (zlib.crc32(worker.encode()) if spec.study_name else 0)
            if offset:
                study.sampler = _sampler(spec, offset)
            return study
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):  # two workers creating one new database
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 + attempt)


def load_study(storage: str, study_name: str):
    """An existing study, for reading (never creates the storage's tables: that is a driver's job)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage_obj = optuna.storages.RDBStorage(storage, engine_kwargs=_engine_kwargs(storage), skip_table_creation=True)
    return optuna.load_study(study_name=study_name, storage=storage_obj)


def _engine_kwargs(storage: str) -> dict:
    # Several processes write one SQLite file (the driver, a second worker, the UI reading): wait, do not fail.
    return {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}


def suggest(trial, space: Space) -> dict:
    """The trial's parameters, named as the space's fields."""
    params: dict = {}
    for field in Space.model_fields:
        value = getattr(space, field)
        if isinstance(value, LogRange):
            params[field] = trial.suggest_float(field, value.low, value.high, log=True)
        elif value is not None:
            params[field] = trial.suggest_categorical(field, list(value))
    return params


def live_trial(study, frozen):
    """A Trial handle on a trial that is still running (one this worker re-attaches to after a restart)."""
    import optuna

    return optuna.trial.Trial(study, frozen._trial_id)


def importances(study) -> dict[str, float]:
    """Parameter importances once two trials have completed with different parameters; {} before."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2 or not complete[0].params:
        return {}
    try:
        return {k: round(float(v), 4) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError, ZeroDivisionError):  # too few distinct values to fit the evaluator
        return {}
