"""The benchmark harness on the CPU with a tiny random Llama: correctness only (no speed assertions). The arms run
in their own processes exactly as on a GPU; the table comes out and the studio arm's losses match naive's."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.bench import harness as bench
from finetune.bench import models as BM

ROOT = Path(__file__).resolve().parent.parent


def test_bench_cli_tiny_cpu(tmp_path):
    out = tmp_path / "benchmarks.md"
    out.write_text(f"# Benchmarks\n\nnotes kept\n\n{bench.START}\nold\n{bench.END}\n\nmore notes\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "finetune", "bench", "--model", "tiny", "--mode", "lora", "--seq", "48",
           "--batch", "2", "--steps", "2", "--warmup", "1", "--arms", "naive,naive@1,studio",
           "--models-dir", str(tmp_path / "models"), "--raw", str(tmp_path / "raw"), "--out", str(out),
           "--devices", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "raw" / "results.json").read_text())["results"]
    arms = {r["job"]["arm_label"]: r for r in results.values() if r["job"]["type"] == "arm"}
    assert set(arms) == {"naive", "naive@1", "studio"} and all(r["ok"] for r in arms.values())
    for r in arms.values():
        assert len(r["losses"]) == 3 and r["tokens_per_s"] > 0 and r["device"] == "cpu"
        assert r["slowest_vs_median"] >= 1.0  # the slowest measured step against the median one
    # The tiny model's config and tokenizer were built once, with a pad token that is not EOS.
    tok = json.loads((tmp_path / "models" / "tiny" / "tokenizer_config.json").read_text())
    assert tok["pad_token"] != tok["eos_token"]
    # Parity: step 1 is the same computation (LoRA B starts at 0); later steps within the two naive seeds' spread.
    naive, naive1, studio = arms["naive"]["losses"], arms["naive@1"]["losses"], arms["studio"]["losses"]
    assert studio[0] == pytest.approx(naive[0], abs=1e-4)
    seed_noise = max(abs(a - b) for a, b in zip(naive, naive1))
    assert max(abs(a - b) for a, b in zip(naive, studio)) <= max(seed_noise, 1e-3)
    text = out.read_text()
    assert "notes kept" in text and "more notes" in text and "old" not in text
    assert "| naive | " in text and "| studio | " in text and "tiny lora seq=48 batch=2" in text
    assert "slowest / median step" in text
    measured = arms["studio"]["steps"][1:]  # after the one warm-up step
    whole = sum(s["tokens"] for s in measured) / sum(s["seconds"] for s in measured)
    studio_row = next(line for line in text.splitlines() if line.startswith("| studio | "))
    assert studio_row.split(" | ")[4] == f"{whole:,.0f}"  # the all-steps rate, beside the median
    assert (f"the naive seeds (naive, naive@1) lie up to {seed_noise:.4f} apart; from naive with the same seed: studio "
            f"{max(abs(a - b) for a, b in zip(naive, studio)):.4f}") in text


def test_shapes_match_the_published_parameter_counts():
    # Llama-3-8B: 8.03B parameters, of which the embedding (0.525B) is not a matmul; Qwen2.5-7B: 7.62B.
    assert BM.matmul_params("llama-3-8b") == 8_030_261_248 - 128256 * 4096 - 4096 * 65  # minus embedding and norms
    assert abs(BM.matmul_params("qwen2.5-7b") / 1e9 - 7.07) < 0.01
    assert abs(BM.matmul_params("llama-3.2-1b") / 1e9 - 1.236) < 0.01  # tied: the lm_head is the embedding


def test_step_flops_counts_only_real_tokens():
    one = BM.step_flops("llama-3-8b", [2048])
    assert BM.step_flops("llama-3-8b", [2048, 2048]) == pytest.approx(2 * one)
    assert one / 2048 == pytest.approx(4 * BM.matmul_params("llama-3-8b") + 12 * 4096 * 32 * 2049 / 2, rel=1e-9)


def test_variable_lengths_are_log_normal_around_350_and_capped():
    lengths = [n for step in BM.example_lengths("var", 8, 200, seed=3) for n in step]
    assert 300 <= statistics.median(lengths) <= 400
    assert max(lengths) <= 2048 and min(lengths) >= 16
    batches = BM.make_batches("var", 4, 3, vocab_size=512, seed=1)
    assert batches == BM.make_batches("var", 4, 3, vocab_size=512, seed=1)  # every arm sees the same data
    assert all(max(e["input_ids"]) < 512 - BM.N_SPECIAL for step in batches for e in step)


def test_plan_jobs_build_each_model_once_before_its_arms(tmp_path):
    jobs = bench.plan_jobs(bench.PLANS["reference"], tmp_path, 300)
    builds = [j for j in jobs if j["type"] == "build"]
    assert [b["shape"] for b in builds] == ["llama-3-8b", "llama-3.2-1b", "qwen2.5-7b"]
    for j in jobs:
        if j["type"] == "arm":
            assert jobs.index(next(b for b in builds if b["id"] == j["needs"])) < jobs.index(j)
    assert {j["arm"].split(":")[0] for j in jobs if j["type"] == "arm"} == {"naive", "unsloth", "studio"}
    again = bench.plan_jobs([{"shape": "tiny", "mode": "lora", "seq": 48, "batch": 2, "arms": ["naive"]},
                             {"shape": "tiny", "mode": "lora", "seq": 48, "batch": 2, "arms": ["naive"], "data_seed": 3}],
                            tmp_path, 300)
    arms = [j for j in again if j["type"] == "arm"]
    assert [j["data_seed"] for j in arms] == [0, 3] and arms[0]["case_key"] != arms[1]["case_key"]


def test_profile_analysis_attributes_gpu_idle_time_to_host_ops():
    from finetune.bench.profile import analyse

    def x(cat, name, ts, dur):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    trace = {"traceEvents": [
        x("user_annotation", "bench_step_0", 0, 1000),
        x("kernel", "k1", 0, 300), x("kernel", "k2", 250, 150),   # busy 0-400
        x("cpu_op", "aten::to", 400, 200),                        # host busy while the GPU idles 400-700
        x("cpu_op", "aten::copy_", 450, 50),                      # nested: the deeper op wins its 50 us
        x("kernel", "k3", 700, 300),                              # busy 700-1000
    ]}
    out = analyse(trace, 1)
    assert out["step_wall_ms"] == 1.0 and out["gpu_busy_ms"] == 0.7 and out["kernels_per_step"] == 3
    idle = {r["op"]: r["idle_ms"] for r in out["idle_by_host_op"]}
    assert idle == {"aten::to": 0.15, "aten::copy_": 0.05, "python (no op open)": 0.1}
    assert out["gpu_ms_by_kernel"] == [{"kernel": "k1", "ms": 0.3, "calls": 1}, {"kernel": "k3", "ms": 0.3, "calls": 1},
                                       {"kernel": "k2", "ms": 0.15, "calls": 1}]


def test_recipe_arm_runs_the_real_training_job(tmp_path):
    """The recipe arm trains through `python -m finetune train` on the bench model and reports the trainer's own
    per-step numbers: one row per step, every step's loss finite."""
    from finetune.bench import arms

    path = BM.build_model("tiny", tmp_path / "models")
    job = {"arm": "recipe", "model_dir": str(path), "shape": "tiny", "mode": "lora", "seq": 40, "batch": 2,
           "steps": 2, "warmup": 1, "seed": 0, "timeout_s": 500}
    result = arms.run_job(job)
    assert result["tokens_per_s"] > 0 and result["device"] == "cpu"
    assert [r["step"] for r in result["steps"]] == [1, 2, 3]
    assert all(0 < loss < 20 for loss in result["losses"])
    assert result["slowest_vs_median"] >= 1.0


def test_naive_bf16_arm_keeps_the_hidden_states_in_bf16(tmp_path):
    """prepare_model_for_kbit_training upcasts the frozen embeddings and norms (so the naive arm's hidden states
    between layers are fp32); the naive:bf16 arm casts them back and leaves the LoRA weights fp32."""
    import torch

    from finetune.bench import arms

    path = BM.build_model("tiny", tmp_path / "models")
    frozen = {}
    for arm in ("naive", "naive:bf16"):
        model, step, _ = arms.setup_naive({"arm": arm, "model_dir": str(path), "mode": "qlora"}, torch.device("cpu"))
        frozen[arm] = {p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad}
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
        ids = torch.arange(3, 19).tolist()
        assert 0 < step([{"input_ids": ids, "labels": ids}]) < 20
    assert torch.float32 in frozen["naive"]
    assert frozen["naive:bf16"] == {torch.bfloat16}


def test_loss_parity_compares_each_arm_with_naive_of_its_own_seed():
    from finetune.bench.harness import _parity

    arms = {"naive": {"losses": [2.0, 1.5]}, "naive@1": {"losses": [2.0, 1.503]},
            "studio@1": {"losses": [2.0, 1.5035]}, "studio": {"losses": [2.0, 1.504]}}
    line = _parity(arms)[0]
    assert "lie up to 0.0030 apart" in line
    assert "studio@1 0.0005 from naive@1 (within)" in line  # against naive (seed 0) it would be 0.0035, outside
    assert "studio 0.0040 (outside)" in line
    assert _parity({"naive": arms["naive"], "studio": arms["studio"]}) == []  # one seed: no noise floor to judge by
