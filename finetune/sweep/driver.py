"""The sweep driver: asks the study for a trial, trains it as an ordinary studio job, tells the study how it went.

    ask -> submit a train job (parent = the sweep job) -> watch its run folder: each validation loss goes to
    trial.report, and trial.should_prune() cancels the job through the normal cancel path (reason "pruned")
    -> tell the study COMPLETE (objective), PRUNED or FAIL

Nothing lives in this process: the study is in its RDB storage and the trials' jobs are in the store, so a driver
started again (after a crash or a studio restart) loads the study, re-attaches to the trial it was watching (its
job is found by name among the sweep's jobs) and never runs a finished trial again. Several drivers (workers, on one
host or many) may share one study through one storage URL; each follows only the trials it asked for.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from finetune import rundir
from finetune.errors import StudioError, plain_message
from finetune.fsutil import write_json_atomic
from finetune.jobs.store import FINISHED, JobStore
from finetune.sweep import study as S
from finetune.sweep.config import SweepConfig, with_params
from finetune.sweep.objective import objective_value
from finetune.sweep.status import summary, trial_jobs

PRUNE_GRACE_S = 5.0


class Driver:
    def __init__(self, spec: SweepConfig, store: JobStore, sweep_id: str, run_dir: Path,
                 poll_s: float = 1.0, log: Callable[[str], None] = print):
        self.spec, self.store, self.sweep_id, self.run_dir = spec, store, sweep_id, Path(run_dir)
        self.poll_s, self.log = poll_s, log
        self.study_name = spec.study_name or sweep_id
        self.study = S.open_study(spec, S.storage_url(spec, run_dir), self.study_name, sweep_id)
        self.base = spec.base_config()
        self.stopping = False
        if "started_at" not in self.study.user_attrs:
            self.study.set_user_attr("started_at", time.time())

    # --- the loop --------------------------------------------------------------------------------------------
    def run(self) -> None:
        import optuna

        self._status("sweeping")
        running = (optuna.trial.TrialState.RUNNING,)
        for frozen in self.study.get_trials(deepcopy=False, states=running):
            if frozen.user_attrs.get(S.WORKER) == self.sweep_id and not self.stopping:
                self.log(f"trial {frozen.number}: re-attached")
                self._follow(S.live_trial(self.study, frozen), frozen.params, set(frozen.intermediate_values))
        while self._more():
            trial = self.study.ask()
            trial.set_user_attr(S.WORKER, self.sweep_id)
            self._follow(trial, S.suggest(trial, self.spec.space))
        self._status("cancelled" if self.stopping else "completed")

    def _more(self) -> bool:
        if self.stopping or len(self.study.get_trials(deepcopy=False)) >= self.spec.n_trials:
            return False
        started = float(self.study.user_attrs.get("started_at", time.time()))
        return self.spec.timeout is None or time.time() - started < self.spec.timeout

    def trial_name(self, number: int) -> str:
        return f"{self.spec.name}-{self.sweep_id[-4:]}-t{number}"

    def trial_config(self, params: dict, number: int):
        cfg = with_params(self.base, params, self.trial_name(number))
        data = cfg.model_dump(mode="json")
        if self.spec.report_every:
            data["training"]["eval_steps"] = self.spec.report_every
        # validation loss comes from the run itself; a generation metric needs the end-of-run evaluation
        data["evaluation"]["enabled"] = self.spec.objective != "val_loss"
        return type(cfg).parse(data, "trial config")

    # --- one trial ---------------------------------------------------------------------------------------------
    def _follow(self, trial, params: dict, reported: set[int] | None = None) -> None:
        import optuna

        try:
            job_id = self._job_for(trial.number, params)
        except StudioError as e:  # the trial's job was refused (its data vanished, its name is taken): it failed
            self.log(f"trial {trial.number}: not queued: {plain_message(e)}")
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            return
        trial.set_user_attr(S.JOB, job_id)
        self.log(f"trial {trial.number}: job {job_id} {params}")
        state, value = self._watch(trial, job_id, reported or set())
        TS = optuna.trial.TrialState
        if state == "completed" and value is not None:
            self.study.tell(trial, value, skip_if_finished=True)
        else:
            self.study.tell(trial, state=TS.PRUNED if state == "pruned" else TS.FAIL, skip_if_finished=True)
        shown = f"{value:.4f}" if isinstance(value, float) else state
        self.log(f"trial {trial.number}: {state} {self.spec.objective}={shown}")
        self._status("sweeping")

    def _job_for(self, number: int, params: dict) -> str:
        """The trial's job: the one already submitted for it (a restarted driver), else a new one."""
        name = self.trial_name(number)
        for row in trial_jobs(self.store, self.sweep_id):
            if row["name"] == name:
                return row["id"]
        return self.store.submit(self.trial_config(params, number), name=name, parent=self.sweep_id)

    def _watch(self, trial, job_id: str, reported: set[int]) -> tuple[str, float | None]:
        """Follow the job to its end, reporting its validation losses; ("completed" | "pruned" | ..., objective)."""
        while True:
            row = self.store.get(job_id)
            for step, loss in _eval_losses(Path(row["run_dir"])):
                if step in reported:
                    continue
                reported.add(step)
                trial.report(loss, step)
                if row["state"] not in FINISHED and trial.should_prune():
                    return self._prune(job_id), None
            if self.stopping and row["state"] not in FINISHED:
                self.store.cancel(job_id, grace_s=PRUNE_GRACE_S)
                continue
            if row["state"] in FINISHED:
                if row.get("reason") == "pruned":
                    return "pruned", None
                value = objective_value(self.spec.objective, row) if row["state"] == "completed" else None
                return row["state"], value
            time.sleep(self.poll_s)

    def _prune(self, job_id: str) -> str:
        row = self.store.get(job_id)
        if row["state"] not in FINISHED:
            self.store.cancel(job_id, grace_s=PRUNE_GRACE_S, reason="pruned")
        return "pruned"

    def _status(self, phase: str) -> None:
        info = summary(self.study)
        write_json_atomic(self.run_dir / rundir.STATUS, {
            **rundir.read_status(self.run_dir), "phase": phase, "kind": "sweep", "adapter_name": "",
            "step": info["finished"], "total_steps": self.spec.n_trials, "best": info["best"],
            "study_name": self.study_name, "updated_at": time.time()})


def _eval_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["eval_loss"])) for r in rundir.read_metrics(run_dir)
            if isinstance(r.get("eval_loss"), (int, float))]
