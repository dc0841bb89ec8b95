"""Export as a job: the "export" kind of the job system. The queue, cancel, re-attach after a restart and failure
diagnosis are the job system's; this module gives the spec, the command and the process's entry point, which
reports progress through the run folder (status.json phase/step/total_steps, train.log).

    store.submit(ExportSpec(adapter="my-adapter", format="gguf", quant="q8_0"), kind="export")
    python -m finetune export-job runs/<id>/job.yaml --run-dir runs/<id>     (what the job runs)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from finetune.config import check_name
from finetune.export.store import DEFAULT_QUANT, check_request


class ExportSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str = Field(description="The stored adapter to export.")
    format: Literal["hf", "gguf"] = Field("hf", description="hf: a merged Hugging Face folder; gguf: llama.cpp/Ollama.")
    quant: str | None = Field(None, description="hf: bf16|f16|f32; gguf: f16|q8_0|q4_0 (default: bf16 / q8_0).")
    reserve_bytes: int = Field(0, ge=0, description="Free disk to leave after the export; refused up front otherwise.")

    @field_validator("adapter")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "adapter")

    @model_validator(mode="after")
    def _quant(self) -> "ExportSpec":
        self.__dict__["quant"] = check_request(self.adapter, self.format, self.quant or DEFAULT_QUANT[self.format])
        return self


def export_command(job_yaml: Path, run_dir: Path, resume: bool = False) -> list[str]:
    """An export starts over when resumed: the staging folder of a killed attempt is swept, nothing is half-used."""
    return [sys.executable, "-m", "finetune", "export-job", str(job_yaml), "--run-dir", str(run_dir)]


def _register() -> None:
    from finetune.jobs.kinds import JobKind, register_kind

    register_kind(JobKind(name="export", spec=ExportSpec, command=export_command, gpus=lambda spec: 0,
                          label=lambda spec: f"export {spec.adapter} ({spec.format} {spec.quant})"))


def run_job(spec: ExportSpec, run_dir: Path) -> dict:
    from finetune.errors import plain_message
    from finetune.export.exporter import run_export
    from finetune.rundir import Status

    status = Status(run_dir, spec.adapter)
    status.update(phase="exporting", message=f"export {spec.adapter} as {spec.format} {spec.quant}")

    def progress(message: str, step: int, total: int) -> None:
        print(f"[{step}/{total}] {message}", flush=True)
        status.update(step=step, total_steps=total, message=message)

    try:
        manifest = run_export(spec.adapter, spec.format, spec.quant, progress, spec.reserve_bytes)
    except Exception as e:
        status.update(phase="failed", error=plain_message(e))
        raise
    status.update(phase="completed", step=1, total_steps=1, message="published", export_path=manifest["path"],
                  export_bytes=manifest["total_bytes"])
    print(f"published {manifest['path']} ({manifest['total_bytes']} bytes)", flush=True)
    return manifest


def cli(argv: list[str]) -> int:
    import yaml

    from finetune.config import ConfigError, format_errors

    p = argparse.ArgumentParser(prog="python -m finetune export-job", description=__doc__)
    p.add_argument("job_yaml")
    p.add_argument("--run-dir", required=True)
    a = p.parse_args(argv)
    run_dir = Path(a.run_dir)
    try:
        spec = ExportSpec.model_validate(yaml.safe_load(Path(a.job_yaml).read_text(encoding="utf-8")) or {})
    except Exception as e:  # noqa: BLE001 - a bad spec is the job's failure, said in the run folder
        from pydantic import ValidationError

        from finetune.rundir import write_failure

        msg = format_errors(e, a.job_yaml) if isinstance(e, ValidationError) else f"{a.job_yaml}: {e}"
        write_failure(run_dir, msg)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    try:
        run_job(spec, run_dir)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


_register()
