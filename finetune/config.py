"""The one typed job config: form -> YAML -> job -> training -> adapter metadata -> UI.

Field names are the libraries' own (peft's LoraConfig, bitsandbytes' BitsAndBytesConfig,
transformers' TrainingArguments) so that a user who knows them reads this file without a glossary.
Every model forbids unknown keys: a typo in a YAML file is an error that names the field, not a silent default.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finetune import limits
from finetune.errors import StudioError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEMO_DATASET = "builtin:python-docs"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # used with fullmatch: no trailing newline slips through

Quantization = Literal["none", "8bit", "4bit"]
QuantType = Literal["nf4", "fp4"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
DataFormat = Literal["auto", "alpaca", "chat", "text", "preference"]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]
Optimizer = Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit"]
Objective = Literal["sft", "dpo", "distill"]
DPOLossType = Literal["sigmoid", "ipo", "hinge"]
Bias = Literal["none", "all", "lora_only"]
Strategy = Literal["ddp", "fsdp"]
QuantStorage = Literal["uint8", "bfloat16", "float16", "float32"]


def choices(literal: Any) -> list[str]:
    """The allowed values of a Literal type, for dropdowns and messages."""
    return list(get_args(literal))


def check_name(value: str, what: str = "adapter_name") -> str:
    """Adapter and job names become folder names: keep them to one safe path segment."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or value in (".", ".."):
        raise ValueError(
            f"{what} {value!r} must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


class _Section(BaseModel):
    # Bounded strings: a config is stored, listed and sent back on every status poll.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, str_max_length=limits.MAX_CONFIG_STRING)


class ModelConfig(_Section):
    name_or_path: str = Field(DEFAULT_MODEL, description="Embedded default, a local Hugging Face folder, or a hub id.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a hub id.")
    quantization: Quantization = Field("4bit", description="Load the frozen base in 4-bit (QLoRA), 8-bit, or unquantized.")
    bnb_4bit_quant_type: QuantType = Field("nf4", description="4-bit data type; NF4 is the QLoRA paper's choice.")
    bnb_4bit_use_double_quant: bool = Field(True, description="Quantize the quantization constants too (~0.4 bit/param saved).")
    torch_dtype: DType = Field("auto", description="Compute dtype; auto picks bf16 where the device supports it.")
    bnb_4bit_quant_storage: QuantStorage = Field(
        "uint8", description="dtype the packed 4-bit weights are stored in; FSDP can only shard a float dtype, so "
                             "launch.strategy fsdp with 4-bit sets bfloat16 by itself.")
    trust_remote_code: bool = Field(False, description="Run model code from the model's repository. Only for models you trust.")

    @field_validator("name_or_path")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model.name_or_path is empty: give the embedded default, a local folder or a hub id")
        return v.strip()


class LoraSettings(_Section):
    r: int = Field(16, gt=0, le=1024, description="LoRA rank: the size of the low-rank update.")
    lora_alpha: int = Field(32, gt=0, description="Scaling numerator; the update is scaled by lora_alpha / r.")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field("all-linear", max_length=limits.MAX_CONFIG_LIST,
                                            description="'all-linear' or a list of module names.")
    bias: Bias = Field("none", description="Which biases to train.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilized scaling lora_alpha / sqrt(r).")
    init_adapter: str | None = Field(None, description="Continue training this adapter from the store (its own LoRA settings replace the ones above); empty starts a fresh adapter.")

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("lora.target_modules is empty: use 'all-linear' or name at least one module")
        return v


class DataConfig(_Section):
    path: str = Field(DEMO_DATASET, description="JSONL, JSON, CSV or Parquet file, a saved datasets folder, a hub id, or builtin:python-docs.")
    format: DataFormat = Field("auto", description="alpaca (instruction/input/output), chat (messages), text, preference (prompt/chosen/rejected); auto detects.")
    split: str = Field("train", description="Split to read from a hub id or datasets folder.")
    validation_path: str | None = Field(None, description="Held-out file; if unset, validation_split of the data is held out.")
    validation_split: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction held out for validation when validation_path is unset.")
    max_seq_length: int = Field(512, gt=0, le=131072, description="Longer sequences are truncated (and counted).")
    max_samples: int | None = Field(None, gt=0, description="Use at most this many training rows.")
    system_prompt: str | None = Field(None, description="System message added to every conversation that has none.")
    seed: int = Field(42, description="Seed of the train/validation split.")


class TrainingConfig(_Section):
    objective: Objective = Field("sft", description="What the model learns: sft = supervised fine-tuning on the answer tokens; dpo = preference tuning on chosen/rejected pairs; distill = learning a teacher model's token distribution.")
    learning_rate: float = Field(2e-4, gt=0.0, lt=1.0, description="Peak learning rate of the optimizer. LoRA on 7B+ models: commonly 1e-4 to 3e-4; small models and short runs often want more (on the 135M demo a sweep chose 2e-3). A sweep finds it for your model and data.")
    num_train_epochs: float = Field(1.0, ge=0.0, description="Passes over the training data, used when max_steps is -1.")
    max_steps: int = Field(-1, description="Optimizer steps; -1 uses num_train_epochs.")
    per_device_train_batch_size: int = Field(4, gt=0, description="Sequences per forward pass; lower it if memory runs out.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Forward passes per optimizer step: effective batch = batch size x this.")
    lr_scheduler_type: Scheduler = Field("cosine", description="How the learning rate changes over the run.")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Fraction of steps spent ramping the learning rate up from 0.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay on the trained (LoRA) weights.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="0 disables clipping.")
    optim: Optimizer = Field("adamw_torch", description="8-bit optimizers need bitsandbytes.")
    seed: int = Field(42, description="Seed of LoRA initialisation and data shuffling.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward: less memory, ~20% slower.")
    gradient_checkpointing_layers: int | None = Field(None, ge=0, description="With gradient_checkpointing: how many decoder layers (the first ones) recompute their activations; the others keep them. Empty: all (least memory). Fewer: faster steps for more memory; the memory plan shows the peak and how few the GPU allows.")
    logging_steps: int = Field(1, gt=0, description="Record the training loss every N steps.")
    eval_steps: int = Field(0, ge=0, description="Validation loss every N steps; 0 only at the end.")
    save_steps: int = Field(50, ge=0, description="Checkpoint every N steps for resume; 0 only at the end.")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept on disk; older ones are deleted.")
    use_liger_kernel: bool = Field(True, description="Fused Triton kernels on a GPU when liger-kernel is installed.")
    padding_free: bool = Field(True, description="Pack each batch into one row with position ids on a GPU: no padding compute.")

    @model_validator(mode="after")
    def _length(self) -> "TrainingConfig":
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError("training.max_steps must be a positive step count, or -1 to use num_train_epochs")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ValueError("training.num_train_epochs must be > 0 when training.max_steps is -1")
        if self.gradient_checkpointing_layers is not None and not self.gradient_checkpointing:
            raise ValueError("training.gradient_checkpointing_layers needs training.gradient_checkpointing on "
                             "(or leave it empty)")
        return self


class EvaluationConfig(_Section):
    enabled: bool = Field(True, description="Evaluate base vs adapter on the validation data when training ends.")
    max_examples: int = Field(16, gt=0, le=limits.MAX_EVAL_EXAMPLES, description="Held-out examples to generate for.")
    max_new_tokens: int = Field(64, gt=0, le=limits.MAX_EVAL_NEW_TOKENS, description="Generation budget per held-out answer.")


class DPOConfig(_Section):
    beta: float = Field(0.1, gt=0.0, le=10.0, description="How far the adapter may move from the reference (the base without the adapter): higher keeps it closer.")
    loss_type: DPOLossType = Field("sigmoid", description="sigmoid = the DPO paper's loss; ipo = squared loss toward a margin of 1/(2 beta); hinge = SLiC's hinge on the margin.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="Assumed fraction of flipped preference labels (conservative DPO, sigmoid loss only).")


class DistillConfig(_Section):
    teacher_model_name_or_path: str | None = Field(None, description="The teacher: a local folder or hub id sharing the student's tokenizer, or adapter:<name> (an adapter from the store on its base).")
    teacher_quantization: Quantization = Field("none", description="Load the teacher's weights in 4-bit or 8-bit to save memory (needs bitsandbytes).")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of cross-entropy on the labels; 1 - alpha weighs the KL to the teacher.")
    temperature: float = Field(2.0, gt=0.0, le=20.0, description="Softens both distributions before the KL; the KL term is scaled by temperature^2.")
    seq_kd: bool = Field(False, description="Sequence-level distillation: the teacher writes the training answers (greedy) before training.")
    max_new_tokens: int = Field(128, gt=0, le=4096, description="Length limit of the teacher's answers with seq_kd.")
    chunk_size: int = Field(256, gt=0, le=65536, description="Tokens per chunk of the loss: only this many rows of either model's logits exist at once.")


class LaunchConfig(_Section):
    """How many processes train one job, and how they share the work (accelerate launch)."""
    num_processes: int | Literal["auto"] = Field(
        "auto", description="Training processes in all, one per GPU: 'auto' = every GPU this host lets the job see "
                            "(times num_machines), or 1 process on a CPU host. On a CPU host N > 1 runs N CPU "
                            "processes (gloo).")
    strategy: Strategy = Field("ddp", description="ddp: every process holds the whole model and LoRA gradients are "
                                                  "averaged; fsdp: the model is sharded across the GPUs (for a model "
                                                  "that does not fit one GPU).")
    num_machines: int = Field(1, ge=1, le=1024, description="Machines taking part; each runs the same command with "
                                                            "its own machine_rank.")
    machine_rank: int = Field(0, ge=0, description="This machine's rank: 0 on the main machine (the one that writes "
                                                   "metrics, checkpoints and the adapter).")
    main_process_ip: str | None = Field(None, description="Address of the machine_rank 0 machine; needed when "
                                                          "num_machines > 1.")
    main_process_port: int | None = Field(None, ge=1, le=65535, description="Free TCP port on the main machine "
                                                                           "(default 29500).")

    @field_validator("num_processes", mode="before")
    @classmethod
    def _processes(cls, v):
        text = str(v).strip().lower() if isinstance(v, (int, str)) and not isinstance(v, bool) else ""
        if text == "auto":
            return "auto"
        if not text.isdigit() or not 1 <= int(text) <= 4096:
            raise ValueError(f"launch.num_processes {v!r}: give 'auto' or a whole number from 1 to 4096")
        return int(text)

    @model_validator(mode="after")
    def _machines(self) -> "LaunchConfig":
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"launch.machine_rank {self.machine_rank} must be below launch.num_machines "
                             f"({self.num_machines})")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("launch.main_process_ip is needed when launch.num_machines > 1")
        if isinstance(self.num_processes, int) and self.num_processes % self.num_machines:
            raise ValueError(f"launch.num_processes ({self.num_processes}) must be a multiple of "
                             f"launch.num_machines ({self.num_machines}): each machine runs the same number")
        return self


def _fsdp_quantization(data: Any) -> Any:
    """4-bit weights under FSDP must be stored in a float dtype it can shard: set bfloat16 when left at uint8."""
    if not isinstance(data, dict):
        return data
    launch, model = data.get("launch"), data.get("model", {})
    quantization = model.get("quantization", ModelConfig.model_fields["quantization"].default) \
        if isinstance(model, dict) else None
    if (isinstance(launch, dict) and launch.get("strategy") == "fsdp" and quantization == "4bit"
            and model.get("bnb_4bit_quant_storage", "uint8") == "uint8"):
        data = {**data, "model": {**model, "bnb_4bit_quant_storage": "bfloat16"}}
    return data


def _check_launch(cfg: "JobConfig") -> None:
    if cfg.launch.strategy != "fsdp":
        return
    if cfg.model.quantization == "8bit":
        raise ValueError("launch.strategy fsdp cannot shard 8-bit weights: use model.quantization 4bit or none, "
                         "or launch.strategy ddp")
    if cfg.model.quantization == "4bit" and cfg.model.bnb_4bit_quant_storage == "uint8":
        raise ValueError("model.bnb_4bit_quant_storage uint8 cannot be sharded by launch.strategy fsdp: use bfloat16")
    if cfg.training.optim == "paged_adamw_8bit":
        raise ValueError("training.optim paged_adamw_8bit does not work on FSDP's sharded parameters: use "
                         "adamw_torch or adamw_8bit")
    if cfg.training.objective == "distill":
        raise ValueError("launch.strategy fsdp does not run distillation (its loss runs the student's output head "
                         "outside FSDP's forward, and the teacher would be whole on every GPU): use launch.strategy ddp")


class JobConfig(_Section):
    adapter_name: str = Field("my-adapter", description="Folder name of the adapter in the store.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)

    _fsdp_storage = model_validator(mode="before")(_fsdp_quantization)

    @field_validator("adapter_name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)

    @model_validator(mode="after")
    def _cross(self) -> "JobConfig":
        needs_bnb = self.model.quantization != "none" or self.training.optim != "adamw_torch"
        if needs_bnb and importlib.util.find_spec("bitsandbytes") is None:
            field = "model.quantization" if self.model.quantization != "none" else "training.optim"
            raise ValueError(f"{field} needs bitsandbytes, which is not installed: pip install bitsandbytes")
        if self.model.quantization != "none" and self.model.torch_dtype == "float16" and self.lora.use_dora:
            raise ValueError("lora.use_dora with a quantized float16 base is unstable: use torch_dtype bfloat16 or auto")
        if self.training.objective == "distill" and not (self.distill.teacher_model_name_or_path or "").strip():
            raise ValueError("distill.teacher_model_name_or_path is empty: training.objective distill needs a teacher")
        if self.distill.teacher_quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("distill.teacher_quantization needs bitsandbytes, which is not installed")
        _check_launch(self)
        return self

    # --- YAML round trip -------------------------------------------------------------------------
    def to_yaml(self) -> str:
        return dump_yaml(self.model_dump(mode="json"))

    @classmethod
    def from_yaml(cls, text: str, source: str = "<yaml>") -> "JobConfig":
        data = load_yaml(text, source)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a job config is a mapping of sections, got {type(data).__name__}")
        return cls.parse(data, source)

    @classmethod
    def load(cls, path: str | Path) -> "JobConfig":
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read the job config ({e})") from None
        return cls.from_yaml(text, str(p))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    @classmethod
    def parse(cls, data: dict, source: str = "<config>") -> "JobConfig":
        """Validate a plain dict, turning pydantic's errors into one message naming each field."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(format_errors(e, source)) from None

    def with_overrides(self, assignments: list[str]) -> "JobConfig":
        """Apply CLI-style `section.field=value` assignments (values parsed as YAML scalars)."""
        data = self.model_dump(mode="json")
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--set {item!r}: expected section.field=value")
            parts = key.strip().split(".")
            node = data
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"--set {item!r}: {'.'.join(parts[:-1])} is not a config section")
                node = node[part]
            if parts[-1] not in node:
                raise ConfigError(f"--set {item!r}: unknown field {key.strip()}")
            try:
                node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else raw
            except yaml.YAMLError:
                node[parts[-1]] = raw
        return JobConfig.parse(data, "--set")


class ConfigError(StudioError):
    """A config that cannot be used; the message names the source and each bad field."""


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (silently, the last one would win)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r} (first given on line {seen[key_node.value]})",
                        key_node.start_mark)
                seen[key_node.value] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def dump_yaml(data) -> str:
    """`data` as YAML that reads back equal, non-ASCII text left readable where that is safe."""
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if yaml.safe_load(text) != data:
        # PyYAML writes the Unicode line breaks (NEL, U+2028, U+2029) raw and reads them back folded; without
        # allow_unicode every non-ASCII character is escaped, those included
        text = yaml.safe_dump(data, sort_keys=False)
    return text


def load_yaml(text: str, source: str = "<yaml>"):
    """A YAML document as plain data; oversized, malformed, duplicated or too deeply nested input is a ConfigError."""
    if len(text) > limits.MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: {len(text)} characters; a job config is at most {limits.MAX_CONFIG_BYTES}")
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}" if mark else source
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a job config") from None


def format_errors(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(config)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (not part of the job config)"
        lines.append(msg if msg.startswith(loc + " ") else f"{loc}: {msg}")
    return f"{source}: " + "; ".join(lines)


def example_config() -> JobConfig:
    """A complete config that trains as it is: QLoRA on the embedded model with the demo domain."""
    return JobConfig(adapter_name="smollm2-python-docs")
