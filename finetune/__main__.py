"""The CLI: `python -m finetune COMMAND ...`. Each command's module owns its own arguments (`cli(argv) -> int`)."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "config": ("finetune.cli_config", "print an example job config, or validate one"),
    "train": ("finetune.recipe.cli", "train a job config in the foreground (also what the job runner launches)"),
    "eval": ("finetune.evaluation.evaluate", "evaluate an adapter against its base on held-out data, print JSON"),
    "eval-distill": ("finetune.evaluation.distill_eval", "teacher, distilled student and base side by side, print JSON"),
    "jobs": ("finetune.jobs.cli", "list, show, submit, cancel, resume or duplicate studio jobs"),
    "adapters": ("finetune.store.adapters", "list, show, export or delete stored adapters"),
    "plan": ("finetune.plan", "estimate a job's peak memory before launching it (JSON: fits, breakdown, suggestions)"),
    "export": ("finetune.export.cli", "export an adapter merged (hf) or as GGUF for llama.cpp/Ollama, print JSON"),
    "export-job": ("finetune.export.job", "run an export job's spec (what the job runner launches)"),
    "sweep": ("finetune.sweep.cli", "hyper-parameter search: trials are studio train jobs; prints the best config"),
    "sweep-job": ("finetune.sweep.job", "run a sweep job's driver (what the job runner launches)"),
    "bench": ("finetune.bench.harness", "GPU/CPU training speed and memory benchmark"),
    "bench-objectives": ("finetune.bench.objectives", "SFT, DPO and distillation tokens/s and peak memory side by side"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m finetune COMMAND [ARGS]\n\ncommands:")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:<9} {help_}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.cli(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
