"""What the operator who started the studio allows, and the checks that hold a client to it.

The operator decides with launch.py flags, which set environment variables that every process the studio starts
(training jobs included) inherits:
  STUDIO_CONFINED=1            set by launch.py: requests come from clients, so paths are confined and job fields
                               that would run code are refused
  STUDIO_ALLOW_REMOTE_CODE=1   --allow-remote-code: a job may set model.trust_remote_code
  STUDIO_ALLOWED_PATHS=A:B     --allow-path DIR: more folders a client may name (finetune/paths.py)
  STUDIO_ALLOW_HUB=1           --allow-hub: hub ids may be downloaded; otherwise only what the local cache holds
`python -m finetune train` run by a user in a shell is not confined: that user is the operator.
Model code named by metadata (an adapter's studio.json) runs only with STUDIO_ALLOW_REMOTE_CODE=1, confined or not.
"""
from __future__ import annotations

import os
from pathlib import Path

from finetune.config import DEFAULT_MODEL
from finetune.errors import StudioError
from finetune.paths import confine

ENV_CONFINED = "STUDIO_CONFINED"
ENV_REMOTE_CODE = "STUDIO_ALLOW_REMOTE_CODE"
ENV_HUB = "STUDIO_ALLOW_HUB"


class PolicyError(StudioError):
    """A request for something the operator did not allow; the message names the field and the switch."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def confined() -> bool:
    return _flag(ENV_CONFINED)


def remote_code_allowed() -> bool:
    return _flag(ENV_REMOTE_CODE)


def hub_allowed() -> bool:
    """May a hub id be downloaded? Outside the studio, as huggingface_hub decides (HF_HUB_OFFLINE)."""
    return _flag(ENV_HUB) if confined() else not _flag("HF_HUB_OFFLINE")


def check_remote_code(requested: bool, field: str = "model.trust_remote_code") -> None:
    if requested and not remote_code_allowed():
        raise PolicyError(f"{field} is true, but this studio runs a model's own Python code only when its operator "
                          "started it with --allow-remote-code (STUDIO_ALLOW_REMOTE_CODE=1); set it to false")


def looks_like_path(name: str) -> bool:
    """A name that the loaders would read from disk (rather than treat as a hub id)."""
    name = name.strip()
    if name.startswith(("/", ".", "~", "\\")) or "\\" in name or name.count("/") > 1:
        return True
    try:
        return Path(name).exists()
    except OSError:
        return True


def check_model_name(name: str, field: str = "model.name_or_path") -> None:
    if name.strip() != DEFAULT_MODEL and looks_like_path(name):
        confine(name, field, "model")


def check_data_path(path: str | None, field: str = "data.path") -> None:
    if path and not path.strip().startswith("builtin:") and looks_like_path(path):
        confine(path, field, "data")


def check_model_config(model_cfg, source: str) -> None:
    """A model section taken from metadata (an adapter's studio.json, a job YAML): never turns remote code on by
    itself, and in the studio names only allowed folders."""
    check_remote_code(model_cfg.trust_remote_code, f"{source}: model.trust_remote_code")
    if confined():
        check_model_name(model_cfg.name_or_path, f"{source}: model.name_or_path")


def check_job(cfg) -> None:
    """Everything a client-submitted job may not do; called at submit and again by the training process."""
    check_remote_code(cfg.model.trust_remote_code)
    check_model_name(cfg.model.name_or_path)
    teacher = cfg.distill.teacher_model_name_or_path or ""
    if teacher and not teacher.startswith("adapter:"):  # a store adapter is named, and its base checked, where it is resolved
        check_model_name(teacher, "distill.teacher_model_name_or_path")
    check_data_path(cfg.data.path, "data.path")
    check_data_path(cfg.data.validation_path, "data.validation_path")
