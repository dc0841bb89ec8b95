"""Shared fixtures. Every test session gets its own STUDIO_HOME and adapter store, and shares one converted
copy of the embedded model (converting the GGUF takes ~20 s) in the project's studio_data/models."""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Guarded so that a second import of this module (as `tests.conftest`) cannot swap the home mid-session.
_owns_home = "STUDIO_TEST_HOME" not in os.environ
_home = Path(os.environ.get("STUDIO_TEST_HOME") or tempfile.mkdtemp(prefix="studio-test-"))
os.environ["STUDIO_TEST_HOME"] = str(_home)
os.environ["STUDIO_HOME"] = str(_home)
os.environ["STUDIO_ADAPTERS_DIR"] = str(_home / "adapters")
# Gradio keeps a copy of every file a studio serves (adapter zips, exported models) in its temp dir: inside the
# session's home, it goes with the home instead of piling up in the machine's /tmp run after run.
os.environ.setdefault("GRADIO_TEMP_DIR", str(_home / "gradio"))
os.environ.setdefault("STUDIO_MODEL_CACHE", str(ROOT / "studio_data" / "models"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll `predicate` until it returns something truthy, and return that; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def tiny_config(data: Path, name: str, steps: int = 2, **training):
    """A job that trains the embedded model for `steps` steps in seconds on a CPU: float32 LoRA, 64 tokens, batch 2,
    no validation split, no checkpoints, no evaluation. `training` overrides TrainingConfig fields."""
    from finetune.config import JobConfig

    cfg = JobConfig(adapter_name=name)
    cfg.model.quantization = "none"  # bitsandbytes 4-bit is a GPU path; the CPU run stays in float32
    cfg.data.path = str(data)
    cfg.data.max_seq_length = 64
    cfg.data.validation_split = 0.0
    cfg.training.max_steps = steps
    cfg.training.per_device_train_batch_size = 2
    cfg.training.gradient_checkpointing = False
    cfg.training.warmup_ratio = 0.0
    cfg.training.save_steps = 0
    cfg.evaluation.enabled = False
    for k, v in training.items():
        setattr(cfg.training, k, v)
    return cfg


@pytest.fixture
def tiny_job_config(chat_jsonl):
    """tiny_config on the shared arithmetic data: tiny_job_config("name", steps=3, save_steps=1)."""
    return lambda name, steps=2, **training: tiny_config(chat_jsonl, name, steps, **training)


@pytest.fixture(scope="session")
def studio_home() -> Path:
    return _home


def arithmetic_rows(n: int, seed: int = 0) -> list[dict]:
    """A tiny chat dataset the model can visibly learn in a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return rows


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Preference pairs the model can learn in a few steps: the chosen sum is right, the rejected one is wrong."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        wrong = a + b + rng.choice([-10, -3, 2, 7, 11])
        rows.append({"prompt": f"What is {a} plus {b}?", "chosen": f"{a} plus {b} is {a + b}.",
                     "rejected": f"{a} plus {b} is {wrong}."})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_jsonl(d / "heldout.jsonl", arithmetic_rows(8, seed=1))
    return write_jsonl(d / "train.jsonl", arithmetic_rows(48, seed=0))


QLORA_ADAPTER = "export-qlora"


def train_qlora_adapter(data: Path) -> str:
    """A real 4-bit (QLoRA) adapter from the real trainer, with a learning rate high enough to change answers."""
    from finetune.config import JobConfig
    from finetune.paths import adapters_dir, runs_dir

    if (adapters_dir() / QLORA_ADAPTER / "adapter_model.safetensors").exists():
        return QLORA_ADAPTER
    from finetune.recipe import run as train_run

    cfg = JobConfig(adapter_name=QLORA_ADAPTER).with_overrides([
        "model.quantization=4bit", f"data.path={data}", "data.max_seq_length=64", "training.max_steps=3",
        "training.learning_rate=0.01", "training.per_device_train_batch_size=2", "training.gradient_checkpointing=false",
        "training.save_steps=0", "training.warmup_ratio=0", "training.lr_scheduler_type=constant", "lora.r=8",
        "lora.lora_alpha=16", "evaluation.enabled=false"])
    train_run(cfg, runs_dir() / f"test-{QLORA_ADAPTER}")
    return QLORA_ADAPTER


@contextlib.contextmanager
def scheduled_store(home: Path):
    """A job store on `home` with its scheduler running; on exit the scheduler stops and any job still running is
    stopped with its whole process group, so no test leaves a training process behind."""
    from finetune.jobs import JobStore, process

    store = JobStore(home, poll_interval=0.2).start_scheduler()
    try:
        yield store
    finally:
        store.stop_scheduler()
        for row in store.list_jobs(states=("running",)):
            process.stop_group(row["pgid"], row["run_dir"], grace_s=2)


def pytest_sessionfinish(session, exitstatus):
    """The session's home (adapters, runs, exports, Gradio's copies: a gigabyte or more) ends with the session."""
    if _owns_home:
        shutil.rmtree(_home, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA is available (the fast path's CUDA branches); elsewhere they skip."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def adapter_zip(path: Path, folder: str = "imp", meta: dict | None = None, extra: dict[str, bytes] | None = None,
                base: str = "SmolLM2-135M-Instruct") -> Path:
    """A minimal adapter zip as an attacker would craft one: `meta` becomes studio.json, `extra` adds files."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{folder}/adapter_config.json", json.dumps({"peft_type": "LORA", "r": 4,
                                                                "base_model_name_or_path": base}))
        z.writestr(f"{folder}/adapter_model.safetensors", b"\0" * 64)
        if meta is not None:
            z.writestr(f"{folder}/studio.json", json.dumps(meta))
        for k, v in (extra or {}).items():
            z.writestr(f"{folder}/{k}", v)
    return path
