"""The other models a run starts from, resolved and checked before training: the adapter it continues
(lora.init_adapter) and the distillation teacher (distill.teacher_model_name_or_path). Torch-free: the job queue
checks them when a job is submitted, the recipe again when it starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune.config import ConfigError, JobConfig, ModelConfig
from finetune.errors import StudioError

ADAPTER_PREFIX = "adapter:"


class ReferenceModelError(ConfigError):
    """A teacher or starting adapter that cannot be used; the message names the field."""


@dataclass
class Teacher:
    spec: str                  # as configured
    model: ModelConfig         # the teacher's base (for an adapter teacher) or the teacher model itself
    adapter: Path | None       # the adapter folder of an adapter:<name> teacher

    def record(self) -> dict:
        """The teacher's provenance for studio.json."""
        out = {"spec": self.spec, "model": self.model.name_or_path, "revision": self.model.revision,
               "quantization": self.model.quantization}
        if self.adapter is not None:
            from finetune.store import adapters

            meta = adapters.get_adapter(self.adapter.name)
            out.update(adapter=self.adapter.name, adapter_created_at=meta.get("created_at"),
                       adapter_dataset=(meta.get("dataset") or {}).get("fingerprint"))
        return out


def init_adapter_path(config: JobConfig) -> Path | None:
    """The store folder of lora.init_adapter, checked to exist and to sit on this job's base model."""
    name = (config.lora.init_adapter or "").strip()
    if not name:
        return None
    from finetune.store import adapters

    field = "lora.init_adapter"
    try:
        path = adapters.adapter_path(name)
        base = adapters.resolve_base(name)
    except (FileNotFoundError, StudioError) as e:
        raise ReferenceModelError(f"{field} {name!r}: {e}") from None
    if base.name_or_path != config.model.name_or_path:
        raise ReferenceModelError(f"{field} {name!r} was trained on {base.name_or_path!r}, but model.name_or_path is "
                              f"{config.model.name_or_path!r}: an adapter continues on its own base")
    return path


def resolve_teacher(config: JobConfig) -> Teacher:
    """distill.teacher_model_name_or_path as a model config (and adapter folder); a teacher that does not exist is
    refused here, naming the field."""
    dc = config.distill
    spec = (dc.teacher_model_name_or_path or "").strip()
    field = "distill.teacher_model_name_or_path"
    if spec.startswith(ADAPTER_PREFIX):
        from finetune.store import adapters

        name = spec[len(ADAPTER_PREFIX):].strip()
        try:
            path = adapters.adapter_path(name)
            base = adapters.resolve_base(name)
        except (FileNotFoundError, StudioError) as e:
            raise ReferenceModelError(f"{field} {spec!r}: {e}") from None
        model = base.model_copy(update={"quantization": dc.teacher_quantization})
        return Teacher(spec, model, path)
    model = ModelConfig(name_or_path=spec, quantization=dc.teacher_quantization,
                        trust_remote_code=config.model.trust_remote_code)
    from finetune import model as M

    try:
        M.resolve_model(model.name_or_path, model.revision)
    except (FileNotFoundError, StudioError) as e:
        raise ReferenceModelError(f"{field}: {e}".replace("model.name_or_path ", "")) from None
    return Teacher(spec, model, None)


def check(config: JobConfig) -> None:
    """Refuse, before a job is queued, a starting adapter or a teacher that does not exist."""
    init_adapter_path(config)
    if config.training.objective == "distill":
        resolve_teacher(config)
