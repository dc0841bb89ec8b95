"""Scaling runs: one job at several process counts through the studio's own job queue (the same `accelerate
launch` a user's job gets), one JSON row per run: tokens/s (all ranks), per-rank peak memory, the loss curve.
The batch per process is fixed, so N processes train N times the tokens per step (tokens/s should scale ~N).

    python -m finetune.bench.scaling --model llama-3-8b --models-dir /root/bm --processes 1,2 \
        --quantization 4bit,none --strategy ddp --steps 10 --seq 2048 --batch 2 --out $OUT        # GPUs
    python -m finetune.bench.scaling --processes 1,2 --quantization none --steps 6 --seq 64 --batch 2  # CPU, embedded

`--model` is a shape of finetune/bench/models.py (random weights, built once under --models-dir) or `embedded`
(the studio's default model). Data: synthetic plain-text rows of `--seq` words, trained on every token.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from finetune.config import DEFAULT_MODEL, JobConfig


def text_rows(n: int, words: int) -> list[dict]:
    return [{"text": " ".join(f"t{(i * 31 + j * 7) % 400}" for j in range(words))} for i in range(n)]


def job_config(args, model: str, data: Path, processes: int, quantization: str) -> JobConfig:
    return JobConfig.parse({
        "adapter_name": f"scaling-{quantization}-{args.strategy}-{processes}",
        "model": {"name_or_path": model, "quantization": quantization, "torch_dtype": args.dtype},
        "lora": {"lora_dropout": 0.0},
        "data": {"path": str(data), "format": "text", "max_seq_length": args.seq, "validation_split": 0.0},
        "training": {"max_steps": args.steps, "per_device_train_batch_size": args.batch, "save_steps": 0,
                     "warmup_ratio": 0.0, "lr_scheduler_type": "constant", "seed": args.seed,
                     "gradient_checkpointing": args.gradient_checkpointing},
        "evaluation": {"enabled": False},
        "launch": {"num_processes": processes, "strategy": args.strategy}}, "scaling run")


def run_one(store, cfg: JobConfig, timeout: float, model: str) -> dict:
    """Submit, wait, and read back the run's numbers (steady tokens/s: the median of the logged steps after the
    first, which carries warm-up)."""
    row = store.wait(store.submit(cfg), timeout=timeout)
    run_dir = Path(row["run_dir"])
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").exists() else []
    steps = [s for s in steps if "loss" in s]
    steady = [s["tokens_per_second"] for s in steps[1:]] or [s["tokens_per_second"] for s in steps]
    return {"model": model, "adapter": cfg.adapter_name, "state": row["state"], "error": row["error"],
            "num_processes": cfg.launch.num_processes, "strategy": cfg.launch.strategy,
            "quantization": cfg.model.quantization, "seq": cfg.data.max_seq_length,
            "batch_per_process": cfg.training.per_device_train_batch_size,
            "tokens_per_second": statistics.median(steady) if steady else None,
            "rank_peak_memory_mb": steps[-1].get("rank_peak_memory_mb") if steps else None,
            "peak_memory_mb": json.loads((run_dir / "status.json").read_text()).get("peak_memory_mb"),
            "losses": [s["loss"] for s in steps], "command": row["command"], "run_dir": str(run_dir)}


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m finetune.bench.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded", help="a shape of finetune/bench/models.py, or embedded")
    p.add_argument("--models-dir", default=None, help="where random-weight models are built (default: a temp dir)")
    p.add_argument("--processes", default="1,2", help="comma separated process counts")
    p.add_argument("--quantization", default="none", help="comma separated: none, 4bit, 8bit")
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=2, help="sequences per process per step")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=42, help="training.seed: the LoRA initialisation and the data order")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--out", default=None, help="folder for scaling.jsonl (default: print only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from finetune.jobs.store import JobStore
    from finetune.paths import model_cache_dir

    args = parse(argv)
    work = Path(tempfile.mkdtemp(prefix="scaling-"))
    # the runs' adapters are throw-away: kept out of the user's store; the converted embedded model is shared
    os.environ["STUDIO_ADAPTERS_DIR"] = str(work / "adapters")
    os.environ.setdefault("STUDIO_MODEL_CACHE", str(model_cache_dir()))
    model = DEFAULT_MODEL
    if args.model != "embedded":
        from finetune.bench.models import build_model

        model = str(build_model(args.model, Path(args.models_dir or work / "models")))
    data = work / "text.jsonl"
    rows = text_rows(max(64, 4 * args.batch * args.steps * 8), args.seq)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    store, results = JobStore(work / "home"), []
    for quantization in args.quantization.split(","):
        for processes in [int(n) for n in args.processes.split(",")]:
            result = run_one(store, job_config(args, model, data, processes, quantization), args.timeout, args.model)
            results.append(result)
            print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "scaling.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    return 0 if all(r["state"] == "completed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
