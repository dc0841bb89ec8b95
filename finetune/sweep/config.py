"""A sweep: a base job config, a search space over its fields, a budget, an objective, a sampler and a pruner.

    name: lr-rank                      # trial adapters are lr-rank-t0, lr-rank-t1, ...
    base: examples/quickstart-qlora.yaml   # a job YAML, or the job config inline as a mapping
    space:
      learning_rate: {low: 5.0e-5, high: 2.0e-3}   # log-uniform
      r: [8, 16, 32]
      lora_alpha_multiple: [1, 2]                   # lora_alpha = r x this
    n_trials: 8
    objective: val_loss                # or an evaluation metric: rouge_l, token_f1, exact_match

Every value the space can take is checked against the job config up front, so a bad choice is an error naming
`space.<field>` before any trial runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finetune.config import ConfigError, JobConfig, check_name, format_errors, load_yaml
from finetune.evaluation.metrics import METRICS

# Module-name presets of Llama-style models (SmolLM2, Llama, Qwen, Mistral).
TARGET_PRESETS: dict[str, str | list[str]] = {
    "all-linear": "all-linear",
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "attention-qv": ["q_proj", "v_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
}
TargetPreset = Literal["all-linear", "attention", "attention-qv", "mlp"]
# Objectives: validation loss from the trial's own run, or a generation metric of its end-of-run evaluation.
OBJECTIVES = ("val_loss",) + tuple(m.name for m in METRICS if m.fn is not None)
Sampler = Literal["tpe", "random"]
Pruner = Literal["median", "successive_halving", "threshold", "none"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LogRange(_Strict):
    low: float = Field(gt=0.0, description="Smallest value tried.")
    high: float = Field(gt=0.0, description="Largest value tried; sampled log-uniformly between the two.")

    @model_validator(mode="after")
    def _order(self) -> "LogRange":
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) is below low ({self.low})")
        return self


class Space(_Strict):
    """What each trial may change; a field left out keeps the base config's value."""
    learning_rate: LogRange | None = Field(None, description="training.learning_rate, log-uniform.")
    r: list[int] | None = Field(None, min_length=1, description="lora.r choices.")
    lora_alpha_multiple: list[float] | None = Field(None, min_length=1, description="lora.lora_alpha = r x this.")
    lora_dropout: list[float] | None = Field(None, min_length=1, description="lora.lora_dropout choices.")
    max_steps: list[int] | None = Field(None, min_length=1, description="training.max_steps choices.")
    num_train_epochs: list[float] | None = Field(None, min_length=1, description="training.num_train_epochs choices.")
    per_device_train_batch_size: list[int] | None = Field(None, min_length=1, description="Batch size choices.")
    target_modules: list[TargetPreset] | None = Field(None, min_length=1, description="lora.target_modules presets.")

    @model_validator(mode="after")
    def _length(self) -> "Space":
        if self.max_steps and self.num_train_epochs:
            raise ValueError("give max_steps or num_train_epochs choices, not both")
        return self


class SweepConfig(_Strict):
    name: str = Field("sweep", description="Trial adapters are named <name>-t<trial number>.")
    base: str | dict = Field(description="A job YAML path, or the job config inline.")
    space: Space = Field(default_factory=Space)
    n_trials: int = Field(8, gt=0, le=1000, description="Trials in the study (all workers together).")
    timeout: float | None = Field(None, gt=0, description="Wall-clock budget in seconds: no trial starts after it.")
    objective: str = Field("val_loss", description=f"One of {', '.join(OBJECTIVES)}.")
    sampler: Sampler = Field("tpe", description="tpe (Optuna's default) or random.")
    seed: int | None = Field(0, description="Sampler seed (None: random).")
    pruner: Pruner = Field("median", description="Stops unpromising trials on their intermediate validation loss.")
    prune_above: float | None = Field(None, description="threshold pruner: stop a trial whose validation loss exceeds this.")
    report_every: int = Field(0, ge=0, description="Trials' validation loss every N steps (0: the base's eval_steps).")
    storage: str | None = Field(None, description="Optuna storage URL; unset: sqlite in the sweep's run folder.")
    study_name: str | None = Field(None, description="Unset: the sweep job's id. Workers sharing a study share it.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "name")

    @field_validator("objective")
    @classmethod
    def _objective(cls, v: str) -> str:
        if v not in OBJECTIVES:
            raise ValueError(f"objective {v!r} is not one of {', '.join(OBJECTIVES)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "SweepConfig":
        if self.pruner == "threshold" and self.prune_above is None:
            raise ValueError("prune_above: the threshold pruner needs an upper bound")
        base = self.base_config()
        for field, value in space_values(self.space):
            try:
                with_params(base, {field: value})
            except ConfigError as e:
                raise ValueError(f"space.{field}: {value!r} does not make a valid job ({e})") from None
        return self

    def base_config(self) -> JobConfig:
        if isinstance(self.base, dict):
            return JobConfig.parse(self.base, "base")
        return JobConfig.load(self.base)

    @property
    def direction(self) -> str:
        metric = next((m for m in METRICS if m.name == self.objective), None)
        return "maximize" if metric is not None and metric.higher_is_better else "minimize"

    @classmethod
    def load(cls, path: str | Path) -> "SweepConfig":
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read the sweep config ({e})") from None
        return cls.parse(load_yaml(text, str(p)), str(p), p.parent)

    @classmethod
    def parse(cls, data, source: str = "sweep config", relative_to: Path | None = None) -> "SweepConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a sweep config is a mapping (base, space, n_trials, objective ...)")
        base = data.get("base")
        if isinstance(base, str) and relative_to is not None and not Path(base).is_absolute():
            if not Path(base).exists() and (relative_to / base).exists():
                data = {**data, "base": str(relative_to / base)}
        try:
            return cls.model_validate(data)
        except ValidationError as e:  # the space check names its field itself
            raise ConfigError(format_errors(e, source).replace("(config): space.", "space.")) from None


def space_values(space: Space) -> list[tuple[str, object]]:
    """Every single value the space can give a field (for checking), the range ends for a range."""
    out: list[tuple[str, object]] = []
    for field in Space.model_fields:
        value = getattr(space, field)
        if isinstance(value, LogRange):
            out += [(field, value.low), (field, value.high)]
        elif value is not None:
            out += [(field, v) for v in value]
    return out


def with_params(base: JobConfig, params: dict, adapter_name: str | None = None) -> JobConfig:
    """The base config with a trial's parameters applied (names as in Space)."""
    data = base.model_dump(mode="json")
    lora, training = data["lora"], data["training"]
    for key in ("r", "lora_dropout"):
        if key in params:
            lora[key] = params[key]
    if "lora_alpha_multiple" in params:
        lora["lora_alpha"] = max(1, round(lora["r"] * float(params["lora_alpha_multiple"])))
    if "target_modules" in params:
        lora["target_modules"] = TARGET_PRESETS[params["target_modules"]]
    for key in ("learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size"):
        if key in params:
            training[key] = params[key]
    if "num_train_epochs" in params:
        training["max_steps"] = -1
    if adapter_name:
        data["adapter_name"] = adapter_name
    return JobConfig.parse(data, "trial config")
