"""Training objectives side by side: SFT, DPO and distillation tokens/s and peak memory of the real recipe
(`python -m finetune train`, one job per objective) on the bench's random-weight models. The student is one shape
(e.g. llama-3.2-1b), the distillation teacher another with the same vocabulary (e.g. llama-3-8b); every job sees
rows of the same length.

tokens/s counts the tokens the student's forward pass takes (padding excluded): for DPO both the chosen and the
rejected row of each pair (the reference pass, the same model with the adapter off, is not counted again); for
distillation the student's tokens (the teacher's forward on the same tokens is not counted again). Peak memory is
the trainer's own (CUDA max allocated on a GPU, the process's resident set on a CPU).

CLI: python -m finetune bench-objectives --student llama-3.2-1b --teacher llama-3-8b --mode qlora --seq 1024
     --batch 4 --steps 8 --warmup 2 --out docs/bench-raw/objectives.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from finetune.bench.models import N_SPECIAL, build_model
from finetune.bench.recipe_arm import job_config

OBJECTIVES = ("sft", "dpo", "distill")


def _words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(f"t{rng.randrange(vocab - N_SPECIAL)}" for _ in range(n))


def write_data(path: Path, objective: str, rows: int, seq: int, vocab: int, seed: int = 0) -> None:
    """`rows` rows of about `seq` tokens: plain text rows, or for DPO pairs whose prompt is half the row."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            if objective == "dpo":
                row = {"prompt": _words(rng, seq // 2, vocab), "chosen": _words(rng, seq // 2 - 8, vocab),
                       "rejected": _words(rng, seq // 2 - 8, vocab)}
            else:
                row = {"text": _words(rng, seq, vocab)}
            f.write(json.dumps(row) + "\n")


def objective_job(objective: str, job: dict, data_path: Path, teacher_dir: Path | None) -> dict:
    """The recipe arm's job config with the objective's own settings."""
    cfg = job_config(job, data_path, job["warmup"] + job["steps"])
    cfg["data"]["format"] = "preference" if objective == "dpo" else "text"
    cfg["data"]["max_seq_length"] = int(job["seq"]) + 16
    cfg["training"]["objective"] = objective
    if objective == "distill":
        cfg["distill"] = {"teacher_model_name_or_path": str(teacher_dir),
                          "teacher_quantization": "4bit" if job["mode"] == "qlora" else "none"}
    return cfg


def measure(objective: str, job: dict, work: Path, teacher_dir: Path | None) -> dict:
    """One objective's job run to the end; the median tokens/s after warm-up and the peak memory."""
    import yaml

    vocab = json.loads((Path(job["model_dir"]) / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    folder = work / objective
    folder.mkdir(parents=True, exist_ok=True)
    rows = job["batch"] * (job["warmup"] + job["steps"])
    write_data(folder / "data.jsonl", objective, rows, int(job["seq"]), vocab)
    cfg = objective_job(objective, job, folder / "data.jsonl", teacher_dir)
    (folder / "job.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "finetune", "train", str(folder / "job.yaml"), "--run-dir",
                           str(folder / "run")], env=dict(os.environ, STUDIO_HOME=str(folder / "home")),
                          capture_output=True, text=True, timeout=job.get("timeout_s", 1800))
    if proc.returncode != 0:
        return {"objective": objective, "error": (proc.stderr or proc.stdout)[-1500:]}
    lines = (folder / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    steps = [r for r in (json.loads(x) for x in lines if x.strip()) if "tokens_per_second" in r]
    measured = steps[job["warmup"]:] or steps
    status = json.loads((folder / "run" / "status.json").read_text(encoding="utf-8"))
    return {"objective": objective, "tokens_per_s": statistics.median(r["tokens_per_second"] for r in measured),
            "peak_memory_mb": status.get("peak_memory_mb"), "steps": len(steps), "job_s": round(time.perf_counter() - t0, 1),
            "losses": [r["loss"] for r in steps]}


def table(results: list[dict], job: dict, teacher: str) -> str:
    head = (f"student {job['shape']} ({job['mode']}), teacher {teacher}, seq {job['seq']}, batch {job['batch']}, "
            f"{job['steps']} measured steps after {job['warmup']}\n\n"
            "| objective | tokens/s | peak memory (MiB) |\n| --- | --- | --- |\n")
    rows = [f"| {r['objective']} | {r.get('tokens_per_s', 'failed')} | {r.get('peak_memory_mb')} |" for r in results]
    errors = [f"{r['objective']} failed: {r['error'].strip().splitlines()[-1]}" for r in results if r.get("error")]
    return head + "\n".join(rows) + "\n" + "".join(f"\n{e}\n" for e in errors)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m finetune bench-objectives", description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default="llama-3.2-1b", help="student shape (finetune/bench/models.py SHAPES)")
    p.add_argument("--teacher", default="llama-3-8b", help="distillation teacher shape (same vocabulary)")
    p.add_argument("--mode", default="qlora", choices=["qlora", "lora"], help="4-bit base (and teacher) or bf16")
    p.add_argument("--seq", type=int, default=1024, help="tokens per row (a DPO pair: per side)")
    p.add_argument("--batch", type=int, default=4, help="rows (DPO: pairs) per step")
    p.add_argument("--steps", type=int, default=8, help="measured steps")
    p.add_argument("--warmup", type=int, default=2, help="steps before measuring")
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument("--models-dir", help="where the random-weight models are built (default STUDIO_HOME/bench/models)")
    p.add_argument("--out", help="write the results as JSON here")
    return p


def cli(argv: list[str]) -> int:
    from finetune.paths import studio_home

    a = _parser().parse_args(argv)
    root = Path(a.models_dir) if a.models_dir else studio_home() / "bench" / "models"
    student_dir = build_model(a.student, root)
    wanted = [o.strip() for o in a.objectives.split(",") if o.strip()]
    teacher_dir = build_model(a.teacher, root) if "distill" in wanted else None
    job = {"shape": a.student, "model_dir": str(student_dir), "mode": a.mode, "seq": a.seq, "batch": a.batch,
           "steps": a.steps, "warmup": a.warmup}
    work = Path(tempfile.mkdtemp(prefix="bench-objectives-"))
    try:
        results = [measure(o, job, work, teacher_dir) for o in wanted]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results, job, a.teacher))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"job": job, "teacher": a.teacher, "results": results}, indent=1))
    return 0 if all("error" not in r for r in results) else 1
