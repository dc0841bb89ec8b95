"""The "recipe" arm: the real training job end to end (`python -m finetune train`), on the bench's model and the
same token batches as the other arms, timed by the trainer's own per-step metrics. It runs beside the "studio" arm
so that what the bench measures and what a user's job gets can never drift apart unnoticed: the ratio of the two
is the cost of everything a real job does around the step (data pipeline, metrics, status writes, scheduler).
Its losses are not step-for-step those of the other arms: the recipe renders each row through the chat template
(a few more tokens) and shuffles the rows with its own seed."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from finetune.bench.arms import LORA, LR, TARGETS, steadiness


def job_config(job: dict, data_path: Path, n_steps: int) -> dict:
    """The job YAML's content: the bench's LoRA, optimizer and model settings, every step logged, nothing saved or
    evaluated in between (the bench measures training steps only)."""
    max_len = 2048 if job["seq"] == "var" else int(job["seq"])
    return {
        "adapter_name": "bench-recipe",
        "model": {"name_or_path": job["model_dir"], "quantization": "4bit" if job["mode"] == "qlora" else "none",
                  "torch_dtype": "bfloat16"},
        "lora": {**LORA, "target_modules": TARGETS},
        "data": {"path": str(data_path), "format": "text", "validation_split": 0.0, "max_seq_length": max_len},
        "training": {"learning_rate": LR, "max_steps": n_steps, "per_device_train_batch_size": job["batch"],
                     "gradient_accumulation_steps": 1, "lr_scheduler_type": "constant", "warmup_ratio": 0.0,
                     "weight_decay": 0.0, "max_grad_norm": 1.0, "optim": "adamw_torch", "seed": job.get("seed", 0),
                     "gradient_checkpointing": True, "gradient_checkpointing_layers": job.get("checkpointed_layers"),
                     "logging_steps": 1, "eval_steps": 0, "save_steps": 0},
        "evaluation": {"enabled": False},
    }


def write_data(path: Path, batches: list[list[dict]]) -> None:
    """The batches' token ids as text rows: the bench tokenizer is word-level over "t<id>", so each row tokenizes
    back to the same ids (plus the chat template's few tokens)."""
    with open(path, "w", encoding="utf-8") as f:
        for examples in batches:
            for e in examples:
                f.write(json.dumps({"text": " ".join(f"t{i}" for i in e["input_ids"])}) + "\n")


def run_recipe(job: dict, device, result: dict) -> dict:
    import yaml

    from finetune.bench.models import make_batches

    vocab = json.loads((Path(job["model_dir"]) / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    n_steps = job["warmup"] + job["steps"]
    work = Path(tempfile.mkdtemp(prefix="bench-recipe-"))
    write_data(work / "data.jsonl", make_batches(job["seq"], job["batch"], n_steps, vocab, seed=job.get("data_seed", 0)))
    (work / "job.yaml").write_text(yaml.safe_dump(job_config(job, work / "data.jsonl", n_steps)), encoding="utf-8")
    try:
        return _train_and_read(job, device, result, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _train_and_read(job: dict, device, result: dict, work: Path) -> dict:
    env = dict(os.environ, STUDIO_HOME=str(work / "home"))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "finetune", "train", str(work / "job.yaml"), "--run-dir",
                           str(work / "run")], env=env, capture_output=True, text=True,
                          timeout=job.get("timeout_s", 600))
    result["setup_s"] = round(time.perf_counter() - t0, 1)  # the whole job, loading included
    if proc.returncode != 0:
        raise RuntimeError(f"finetune train exited {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}")
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    rows = [r for r in rows if "tokens_per_second" in r]
    measured = rows[job["warmup"]:] or rows
    status = json.loads((work / "run" / "status.json").read_text(encoding="utf-8"))
    peak_mb = status.get("peak_memory_mb")
    rates = [r["tokens_per_second"] for r in measured]
    result.update(speedups=["the real recipe: python -m finetune train"], tokens_per_s=statistics.median(rates),
                  slowest_vs_median=steadiness(rates), tflops=None, mfu=None, losses=[r["loss"] for r in rows],
        steps=[{"step": r["step"], "tokens_per_s": r["tokens_per_second"], "loss": r["loss"]} for r in rows],
        peak_allocated_gib=peak_mb / 1024 if peak_mb and device.type == "cuda" else None)
    return result
