"""Training recipes. `training.objective` picks the recipe class from RECIPES; `run` drives it:
setup -> train -> save -> evaluate_adapter, with the run folder's status.json saying where it is (or why it failed).

A new objective subclasses SFTRecipe (overriding `_setup_data` and `loss_step`), adds its name to the config's
Objective type and registers here. Importing this package loads no torch: recipe modules are imported on use.
"""
from __future__ import annotations

import importlib
from pathlib import Path

# objective -> "module:Class", imported when a run asks for it
RECIPES: dict[str, str] = {"sft": "finetune.recipe.sft:SFTRecipe", "dpo": "finetune.recipe.dpo:DPORecipe",
                           "distill": "finetune.recipe.distill:DistillRecipe"}

__all__ = ["RECIPES", "recipe_class", "run"]


def recipe_class(objective: str) -> type:
    """The recipe class that trains `objective` (a training.objective value)."""
    try:
        module, name = RECIPES[objective].split(":")
    except KeyError:
        raise ValueError(f"training.objective: no recipe for {objective!r} (known: {', '.join(RECIPES)})") from None
    return getattr(importlib.import_module(module), name)


def run(config, run_dir: str | Path, resume: bool = False) -> dict:
    """Train `config`, publish the adapter and (if enabled) evaluate it. Returns the adapter's studio.json
    (empty on processes other than the main one)."""
    from finetune.errors import plain_message
    from finetune.plan import oom_hint

    recipe = recipe_class(config.training.objective)(config, run_dir)
    try:
        recipe.setup(resume=resume)
        recipe.train()
        meta = recipe.save()
        recipe.evaluate_adapter(meta)
    except BaseException as e:
        recipe.status.update(phase="failed", error=plain_message(e) + oom_hint(config, e))
        raise
    recipe.status.update(phase="completed", eta_seconds=0)
    return meta
