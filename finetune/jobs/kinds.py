"""Kinds of job: what a job runs. The queue, the scheduler, cancel, re-attach after a restart and failure diagnosis
are the same for every kind; a kind only says how to validate its spec, which command runs it and how many GPUs
it needs.

    register_kind(JobKind(name="export", spec=ExportSpec, command=export_command, gpus=lambda s: 0,
                          label=lambda s: s.adapter_name))
    store.submit(spec, kind="export")

The command runs in its own process session with STUDIO_JOB_ID, STUDIO_HOME and CUDA_VISIBLE_DEVICES set, from the
project root; it writes its run folder through finetune/rundir.py (status.json with phase/step/total_steps/error,
train.log is its stdout and stderr). It must pass the run folder as one of its arguments: that is how the studio
recognises the job's processes after a restart.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml
from pydantic import BaseModel, ValidationError

from finetune import policy
from finetune.datacheck import check_job_data
from finetune.store.adapters import check_writable
from finetune.config import ConfigError, JobConfig, dump_yaml, format_errors
from finetune.errors import JobError
from finetune.jobs.launch import check_host, gpus_needed, train_command
from finetune.recipe import references

NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class JobKind:
    name: str                                          # "train", "export", ...
    spec: type[BaseModel]                              # the job's validated spec, saved as runs/<id>/job.yaml
    command: Callable[[Path, Path, bool], list[str]]   # (job_yaml, run_dir, resume) -> argv
    gpus: Callable[[BaseModel], int]                   # GPUs the job needs (0 = CPU only)
    label: Callable[[BaseModel], str]                  # what the job list shows (e.g. the adapter name)
    prepare: Callable[[BaseModel], BaseModel] = field(default=lambda spec: spec)  # pins the spec before it is queued
    slot: bool = True       # takes a device (or CPU) slot; a driver that only submits and watches other jobs does not
    relaunch: bool = False  # restarts safely: queued again (resumed) when its process is lost, instead of failing
    # the command sizes its launch by the GPUs admitted: called with gpus=<count>; gpus() may return ALL_GPUS
    sized: bool = False


_KINDS: dict[str, JobKind] = {}


def register_kind(kind: JobKind) -> JobKind:
    """Make a kind submittable (registering a name again replaces it: a module reloaded in a test)."""
    if not NAME_RE.match(kind.name):
        raise ValueError(f"job kind name {kind.name!r}: lowercase letters, digits, '-' and '_', 32 at most")
    _KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> JobKind:
    try:
        return _KINDS[name]
    except (KeyError, TypeError):
        raise JobError(f"unknown job kind {name!r} (known: {', '.join(sorted(_KINDS))})") from None


def kind_names() -> list[str]:
    return sorted(_KINDS)


# --- a spec as YAML ---------------------------------------------------------------------------------------------
def parse_spec(kind: JobKind, value: BaseModel | dict | str, source: str = "submitted config") -> BaseModel:
    """Validate a spec given as a model (validated again: fields may have been assigned), a dict or YAML text.
    Raises ConfigError naming the source and each bad field."""
    if isinstance(value, str):
        if kind.spec is JobConfig:
            return JobConfig.from_yaml(value, source)
        try:
            value = yaml.safe_load(value) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML ({e})") from None
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: a {kind.name} job's spec is a mapping or a {kind.spec.__name__}, "
                          f"got {type(value).__name__}")
    try:
        return kind.spec.model_validate(value)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source)) from None


def spec_yaml(spec: BaseModel) -> str:
    return dump_yaml(spec.model_dump(mode="json"))


# --- training ---------------------------------------------------------------------------------------------------
def absolute_data_paths(cfg: JobConfig) -> JobConfig:
    """The training process runs from the project root: a data file named relative to the submitter's
    working directory is pinned to its absolute path (hub ids and builtin: sources are left alone)."""
    updates = {}
    for name in ("path", "validation_path"):
        value = getattr(cfg.data, name)
        if value and not value.startswith("builtin:") and not os.path.isabs(value) and os.path.exists(value):
            updates[name] = os.path.abspath(value)
    if not updates:
        return cfg
    data = cfg.model_dump(mode="json")
    data["data"].update(updates)
    return JobConfig.parse(data, "job")


def prepare_training(cfg: JobConfig) -> JobConfig:
    cfg = absolute_data_paths(cfg)
    check_host(cfg)
    if policy.confined():  # a client of the studio sent it: its paths and models must be ones the operator allows
        policy.check_job(cfg)
    references.check(cfg)
    check_writable()
    check_job_data(cfg.data)  # never queue a job for data it cannot read
    return cfg


TRAIN = register_kind(JobKind(name="train", spec=JobConfig, command=train_command, gpus=gpus_needed,
                              label=lambda spec: spec.adapter_name, prepare=prepare_training, sized=True))
