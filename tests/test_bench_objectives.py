"""The objectives benchmark on the CPU with tiny random Llamas: SFT, DPO and distillation each run as a real training
job and report tokens/s and peak memory (correctness only, no speed assertions)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_objectives_tiny_cpu(tmp_path):
    out = tmp_path / "objectives.json"
    cmd = [sys.executable, "-m", "finetune", "bench-objectives", "--student", "tiny", "--teacher", "tiny",
           "--mode", "lora", "--seq", "32", "--batch", "2", "--steps", "2", "--warmup", "1",
           "--models-dir", str(tmp_path / "models"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {r["objective"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"sft", "dpo", "distill"}
    for r in results.values():
        assert r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 and r["steps"] == 3, r
    assert "| dpo | " in proc.stdout and "| distill | " in proc.stdout
