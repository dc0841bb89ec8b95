"""The job config: every shipped preset validates, YAML round-trips exactly, errors name the field, --set parses."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from finetune.config import ConfigError, JobConfig, choices, example_config

ROOT = Path(__file__).resolve().parent.parent
ALL_SHIPPED = sorted(p for d in ("examples", "configs") for p in (ROOT / d).rglob("*.yaml")) if any(
    (ROOT / d).is_dir() for d in ("examples", "configs")) else []
SHIPPED = [p for p in ALL_SHIPPED if "sweep" not in p.name]
SWEEPS = [p for p in ALL_SHIPPED if "sweep" in p.name]


def test_example_config_validates_and_round_trips():
    cfg = example_config()
    text = cfg.to_yaml()
    again = JobConfig.from_yaml(text, "example")
    assert again == cfg
    assert again.to_yaml() == text  # byte for byte: field order and formatting are stable


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_every_shipped_yaml_validates(path):
    cfg = JobConfig.load(path)
    assert JobConfig.from_yaml(cfg.to_yaml()) == cfg


@pytest.mark.parametrize("path", SWEEPS, ids=[str(p.relative_to(ROOT)) for p in SWEEPS])
def test_every_shipped_sweep_validates(path):
    from finetune.sweep.config import SweepConfig, space_values

    spec = SweepConfig.load(path)
    assert space_values(spec.space), f"{path}: the sweep searches nothing"
    assert spec.base_config().adapter_name


def test_cli_example_prints_a_config_that_loads(tmp_path):
    out = subprocess.run([sys.executable, "-m", "finetune", "config", "--example"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    (tmp_path / "job.yaml").write_text(out)
    assert JobConfig.load(tmp_path / "job.yaml") == example_config()


def test_round_trip_keeps_every_non_default_value():
    cfg = example_config().with_overrides([
        "adapter_name=round.trip_1", "model.quantization=8bit", "model.revision=abc123", "lora.r=8",
        "lora.target_modules=[q_proj, v_proj]", "lora.use_rslora=true", "data.path=/tmp/x y/data.jsonl",
        "data.system_prompt='Answer: briefly.'", "data.max_samples=10", "training.learning_rate=3e-5",
        "training.num_train_epochs=2.5", "training.lr_scheduler_type=linear", "evaluation.enabled=false",
    ])
    again = JobConfig.from_yaml(cfg.to_yaml())
    assert again == cfg
    assert again.lora.target_modules == ["q_proj", "v_proj"]
    assert again.data.system_prompt == "Answer: briefly."
    assert again.training.learning_rate == 3e-5


def test_unknown_field_is_named():
    with pytest.raises(ConfigError) as e:
        JobConfig.from_yaml("lora:\n  rank: 8\n", "job.yaml")
    assert "job.yaml" in str(e.value) and "lora.rank" in str(e.value) and "unknown field" in str(e.value)
    with pytest.raises(ConfigError, match="learning_rat"):
        JobConfig.from_yaml("training: {learning_rat: 0.1}\n", "job.yaml")


def test_bad_yaml_names_file_and_line():
    with pytest.raises(ConfigError, match=r"job.yaml, line \d+"):
        JobConfig.from_yaml("model:\n  name_or_path: [unclosed\n", "job.yaml")


@pytest.mark.parametrize("override,field", [
    ("training.max_steps=0", "training.max_steps"),
    ("training.max_steps=-5", "training.max_steps"),
    ("data.max_seq_length=0", "data.max_seq_length"),
    ("lora.r=0", "lora.r"),
    ("model.quantization=3bit", "model.quantization"),
    ("adapter_name=../escape", "adapter_name"),
    ("lora.target_modules=[]", "lora.target_modules"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        example_config().with_overrides([override])
    assert field in str(e.value)


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="training.num_train_epochs"):
        example_config().with_overrides(["training.max_steps=-1", "training.num_train_epochs=0"])
    with pytest.raises(ConfigError, match="use_dora"):
        example_config().with_overrides(["model.quantization=4bit", "model.torch_dtype=float16", "lora.use_dora=true"])
    # Epochs alone are fine when max_steps is -1; max_steps alone is fine with 0 epochs.
    example_config().with_overrides(["training.max_steps=-1", "training.num_train_epochs=1"])
    example_config().with_overrides(["training.max_steps=5", "training.num_train_epochs=0"])


def test_quantization_needs_bitsandbytes(monkeypatch):
    import importlib.util

    base = example_config()  # built before bitsandbytes "disappears"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match="model.quantization needs bitsandbytes"):
        base.with_overrides(["model.quantization=4bit"])
    with pytest.raises(ConfigError, match="training.optim needs bitsandbytes"):
        base.with_overrides(["model.quantization=none", "training.optim=adamw_8bit"])
    base.with_overrides(["model.quantization=none"])  # plain LoRA needs no bitsandbytes


def test_set_parsing_types():
    cfg = example_config().with_overrides(["training.max_steps=12", "training.learning_rate=1e-3",
                                           "training.gradient_checkpointing=false", "lora.lora_dropout=0",
                                           "data.validation_path=null", "model.name_or_path=./my model"])
    assert cfg.training.max_steps == 12 and isinstance(cfg.training.max_steps, int)
    assert cfg.training.learning_rate == 1e-3
    assert cfg.training.gradient_checkpointing is False
    assert cfg.lora.lora_dropout == 0.0
    assert cfg.data.validation_path is None
    assert cfg.model.name_or_path == "./my model"


@pytest.mark.parametrize("item,match", [
    ("training.max_steps", "expected section.field=value"),
    ("=5", "expected section.field=value"),
    ("training.nope=1", "unknown field training.nope"),
    ("nosection.x=1", "nosection is not a config section"),
    ("training.max_steps=many", "training.max_steps"),
])
def test_set_errors(item, match):
    with pytest.raises(ConfigError, match=match):
        example_config().with_overrides([item])


def test_training_objective_picks_the_recipe_and_round_trips():
    from finetune.recipe import RECIPES, recipe_class

    cfg = JobConfig()
    assert cfg.training.objective == "sft" and set(RECIPES) == set(choices(type(cfg.training).model_fields["objective"].annotation))
    assert JobConfig.from_yaml(cfg.to_yaml()).training.objective == "sft"
    assert recipe_class("sft").__name__ == "SFTRecipe" and recipe_class("dpo").__name__ == "DPORecipe"
    assert recipe_class("distill").__name__ == "DistillRecipe"
    with pytest.raises(ConfigError, match="training.objective"):
        JobConfig.parse({"training": {"objective": "ppo"}})
    with pytest.raises(ConfigError, match="distill.teacher_model_name_or_path is empty"):
        JobConfig.parse({"training": {"objective": "distill"}})
