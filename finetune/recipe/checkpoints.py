"""Checkpoints for exact resume: checkpoints/checkpoint-<step>/ holds the LoRA tensors, the optimizer, scheduler and
RNG states (accelerate's save_state) and trainer_state.json (where training is: the Progress below)."""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import StudioError
from finetune.fsutil import write_json_atomic
from finetune.rundir import CHECKPOINTS, TRAINER_STATE, list_checkpoints

log = logging.getLogger(__name__)


class TrainError(StudioError):
    """A run that cannot go on, with a message meant for the person who started it."""


@dataclass
class Progress:
    """Where training is: what a checkpoint's trainer_state.json holds."""
    global_step: int = 0
    epoch: int = 0
    groups_done_in_epoch: int = 0  # the data loader's position inside `epoch`
    first_loss: float | None = None
    train_tokens: int = 0
    elapsed_s: float = 0.0
    losses: list = field(default_factory=list)  # (step, loss) of the last few steps, for the final loss
    num_processes: int = 1  # the world size that trained it: a checkpoint resumes only with the same


def install_lora_only_checkpoints(accelerator) -> None:
    """accelerate's save_state would write the whole base model (frozen, maybe quantized) into every checkpoint.
    Keep only the trainable (LoRA) tensors, and load them back strictly by name."""
    def on_save(models, weights, output_dir):
        for model, sd in zip(models, weights):
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            for key in [k for k in sd if k not in trainable]:
                del sd[key]

    def on_load(models, input_dir):
        from safetensors.torch import load_file

        for i, model in enumerate(models):
            path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            state = load_file(str(path))
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            missing = trainable - set(state)
            if missing:
                raise TrainError(f"checkpoint {input_dir} does not match this model: {len(missing)} trainable tensors "
                                 f"missing (e.g. {sorted(missing)[0]}); was the LoRA config changed?")
            model.load_state_dict(state, strict=False)
        models.clear()  # loaded here; accelerate must not load them again (strictly, expecting the full model)

    accelerator.register_save_state_pre_hook(on_save)
    accelerator.register_load_state_pre_hook(on_load)


def save_checkpoint(accelerator, run_dir: Path, state: dict, limit: int) -> Path:
    """checkpoints/checkpoint-<step>: written under a temporary name, then renamed, so a checkpoint that exists is
    complete. The oldest beyond save_total_limit are removed."""
    root = run_dir / CHECKPOINTS
    final = root / f"checkpoint-{state['global_step']}"
    tmp = root / f".tmp-checkpoint-{state['global_step']}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        write_json_atomic(tmp / TRAINER_STATE, state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(run_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_latest(accelerator, run_dir: Path) -> tuple[Progress, Path] | None:
    """Restore the newest checkpoint into the prepared model, optimizer, scheduler and RNGs; None when there is none."""
    found = list_checkpoints(run_dir)
    if not found:
        return None
    _, path = found[-1]
    saved = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    check_world_size(saved.get("num_processes", 1), accelerator.num_processes, path)
    accelerator.load_state(str(path))
    return Progress(**{k: v for k, v in saved.items() if k in Progress.__dataclass_fields__}), path


def check_world_size(saved: int, current: int, path: Path) -> None:
    """A checkpoint resumes only with the world size that wrote it: the data split, the optimizer state and (under
    FSDP) the shards all depend on it."""
    if saved != current:
        raise TrainError(f"checkpoint {path.name} was written by {saved} processes and this run has {current}: "
                         f"resume with launch.num_processes {saved}, or start a new job")
