"""Training end to end on the real SmolLM2 on CPU, through `accelerate launch` as the job runner starts it:
LoRA, QLoRA (4-bit) and 8-bit runs of a few steps; the loss falls, the adapter reloads and changes the model's
output, studio.json carries provenance; a run killed mid-way resumes to the same steps and losses; bad input fails
with a plain message in status.json."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import wait_for
from finetune.config import example_config
from finetune.jobs import get_kind
from finetune.paths import adapters_dir, runs_dir

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6
MODES = ["none", "4bit", "8bit"]


def job_yaml(tmp: Path, chat_jsonl: Path, name: str, *overrides: str) -> Path:
    cfg = example_config().with_overrides([
        f"adapter_name={name}", f"data.path={chat_jsonl}", f"data.validation_path={chat_jsonl.parent / 'heldout.jsonl'}",
        "data.max_seq_length=128", f"training.max_steps={STEPS}", "training.per_device_train_batch_size=4",
        "training.learning_rate=1e-3", "training.save_steps=2", "training.eval_steps=3", "evaluation.enabled=false",
        *overrides,
    ])
    path = tmp / f"{name}.yaml"
    cfg.save(path)
    return path


def launch(yaml_path: Path, run_dir: Path, resume: bool = False, env: dict | None = None) -> subprocess.Popen:
    """The command the job runner starts for a training job (its kind's command builder)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(get_kind("train").command(yaml_path, run_dir, resume),
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, chat_jsonl) -> dict:
    """One short run per quantization mode (sequential: the machine has two cores)."""
    tmp = tmp_path_factory.mktemp("train")
    out = {}
    for mode in MODES:
        name = f"t-{mode}"
        extra = ["evaluation.enabled=true", "evaluation.max_examples=2", "evaluation.max_new_tokens=8"] if mode == "4bit" else []
        yaml_path = job_yaml(tmp, chat_jsonl, name, f"model.quantization={mode}", *extra)
        run_dir = tmp / f"run-{mode}"
        t0 = time.time()
        log = finish(launch(yaml_path, run_dir, env={"STUDIO_JOB_ID": f"job-{mode}"}))
        out[mode] = {"name": name, "yaml": yaml_path, "run_dir": run_dir, "log": log, "seconds": time.time() - t0}
    return out


@pytest.mark.parametrize("mode", MODES)
def test_run_files_and_loss_falls(trained, mode):
    run = trained[mode]
    status = json.loads((run["run_dir"] / "status.json").read_text())
    assert status["phase"] == "completed" and status["error"] is None
    assert status["step"] == status["total_steps"] == STEPS and status["adapter_name"] == run["name"]
    assert status["peak_memory_mb"] > 100 and status["tokens_per_second"] > 0
    steps, evals = read_metrics(run["run_dir"])
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert set(steps[0]) >= {"step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "memory_mb", "elapsed_s"}
    assert [r["step"] for r in evals] == [3, STEPS]
    losses = [r["loss"] for r in steps]
    assert sum(losses[-2:]) / 2 < losses[0] * 0.8, losses
    assert evals[-1]["eval_loss"] < losses[0]
    # Checkpoints every 2 steps, the last save_total_limit=2 kept, none left half-written.
    assert sorted(p.name for p in (run["run_dir"] / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert (run["run_dir"] / "job.yaml").is_file()


@pytest.mark.parametrize("mode", MODES)
def test_studio_json_provenance(trained, mode):
    run = trained[mode]
    folder = adapters_dir() / run["name"]
    assert {p.name for p in folder.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json", "studio.json", "README.md"}
    meta = json.loads((folder / "studio.json").read_text())
    base = meta["base_model_info"]
    assert meta["base_model"] == "SmolLM2-135M-Instruct" and meta["quantization"] == mode
    weights = Path(base["path"]) / base["weights_file"]
    assert base["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert "<|im_start|>" in meta["chat_template"]
    assert meta["dataset"]["fingerprint"] and meta["dataset"]["num_train"] > 0
    assert meta["config"] == json.loads(json.dumps(example_config().from_yaml(run["yaml"].read_text()).model_dump(mode="json")))
    assert set(meta["versions"]) >= {"torch", "transformers", "peft", "accelerate", "bitsandbytes"}
    assert all(meta["versions"][k] for k in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"))
    m = meta["metrics"]
    assert m["steps"] == STEPS and m["final_loss"] < m["first_loss"] and m["runtime_s"] > 0
    assert m["tokens_per_second"] > 0 and m["peak_memory_mb"] > 0 and m["eval_loss"] is not None
    assert meta["job_id"] == f"job-{mode}"
    assert run["name"] in (folder / "README.md").read_text()
    if mode == "4bit":  # evaluation enabled for this run: its summary is recorded beside the provenance
        assert set(meta["eval"]["metrics"]) == {"base", "adapter"}
    # No staging folders left in the store.
    assert not [p for p in adapters_dir().iterdir() if p.name.startswith(f".tmp-{run['name']}")]


@pytest.fixture(scope="module")
def base_model():
    from transformers import AutoModelForCausalLM

    from finetune.model import resolve_model

    return AutoModelForCausalLM.from_pretrained(resolve_model("SmolLM2-135M-Instruct"), dtype=torch.float32).eval()


@pytest.mark.parametrize("mode", MODES)
def test_adapter_reloads_and_changes_output(trained, base_model, mode):
    from peft import PeftModel

    from finetune.model import load_tokenizer
    from finetune.config import ModelConfig

    tok = load_tokenizer(ModelConfig())
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 12 plus 30?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = base_model(input_ids=ids).logits
    model = PeftModel.from_pretrained(base_model, str(adapters_dir() / trained[mode]["name"]))
    try:
        with torch.no_grad():
            tuned_logits = model(input_ids=ids).logits
        assert (tuned_logits - base_logits).abs().max() > 0.1
        # The adapter learned the answer format of the data ("A plus B is C.") and to stop: greedy decoding ends
        # with EOS rather than running on. (Six steps teach the format, not yet the sums.)
        out = model.generate(input_ids=ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        answer = tok.decode(out[0, ids.shape[1]:])
        assert answer.startswith("12 plus 30 is ") and answer.endswith("<|im_end|>"), answer
    finally:
        model.unload()  # give the shared base back without LoRA layers


def test_killed_run_resumes_to_the_same_steps_and_losses(trained, tmp_path, chat_jsonl):
    """Same config as the uninterrupted LoRA run: killed right after checkpoint-2, --resume finishes all steps and
    logs the same losses (data order, LoRA dropout RNG, optimizer and scheduler state all restored)."""
    name = "t-resume"
    yaml_path = job_yaml(tmp_path, chat_jsonl, name, "model.quantization=none")
    run_dir = tmp_path / "run"
    proc = launch(yaml_path, run_dir)

    def saved_checkpoint_2() -> bool:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        return (run_dir / "checkpoints" / "checkpoint-2").is_dir()

    wait_for(saved_checkpoint_2, 300, "checkpoint-2")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["phase"] == "training" and status["step"] < STEPS, "the run finished before it could be killed"
    assert not (adapters_dir() / name).exists()

    finish(launch(yaml_path, run_dir, resume=True))
    status = json.loads((run_dir / "status.json").read_text())
    assert status["phase"] == "completed" and status["step"] == status["total_steps"] == STEPS
    steps, _ = read_metrics(run_dir)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))  # no step logged twice
    reference, _ = read_metrics(trained["none"]["run_dir"])
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in reference], rel=1e-3)
    meta = json.loads((adapters_dir() / name / "studio.json").read_text())
    assert meta["metrics"]["steps"] == STEPS


def test_resume_without_checkpoint_starts_fresh_and_default_run_dir(tmp_path, chat_jsonl):
    """`python -m finetune train` (no accelerate) with --resume and nothing to resume: trains from step 0 into
    STUDIO_HOME/runs/cli-<time>-<name>."""
    yaml_path = job_yaml(tmp_path, chat_jsonl, "t-plain", "model.quantization=none", "training.max_steps=2",
                         "training.save_steps=0", "training.eval_steps=0")
    before = set(runs_dir().glob("cli-*-t-plain"))
    out = subprocess.run([sys.executable, "-m", "finetune", "train", str(yaml_path), "--resume"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = set(runs_dir().glob("cli-*-t-plain")) - before
    assert json.loads((run_dir / "status.json").read_text())["step"] == 2
    assert (adapters_dir() / "t-plain" / "adapter_model.safetensors").is_file()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", "train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_bad_data_fails_before_training_with_file_and_line(tmp_path, chat_jsonl):
    bad = tmp_path / "bad.jsonl"
    lines = chat_jsonl.read_text().splitlines()
    bad.write_text("\n".join(lines[:3] + ['{"messages": [broken'] + lines[3:]) + "\n")
    yaml_path = job_yaml(tmp_path, chat_jsonl, "t-bad", f"data.path={bad}", "data.validation_path=null")
    run_dir = tmp_path / "run"
    out = run_cli(str(yaml_path), "--run-dir", str(run_dir))
    assert out.returncode == 1
    status = json.loads((run_dir / "status.json").read_text())
    assert status["phase"] == "failed" and "bad.jsonl, line 4" in status["error"]
    assert status["error"] in out.stderr and "Traceback" not in out.stderr
    assert not (adapters_dir() / "t-bad").exists()


def test_config_error_is_plain_and_recorded(tmp_path, chat_jsonl):
    yaml_path = job_yaml(tmp_path, chat_jsonl, "t-cfg")
    run_dir = tmp_path / "run"
    out = run_cli(str(yaml_path), "--set", "lora.rank=8", "--run-dir", str(run_dir))
    assert out.returncode == 1 and "lora.rank" in out.stderr and "Traceback" not in out.stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["phase"] == "failed" and "lora.rank" in status["error"]
