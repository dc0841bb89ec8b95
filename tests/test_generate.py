"""Generation with the real SmolLM2: base answers, streaming, and adapters swapped on one loaded base."""
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from finetune.evaluation import generate as G
from finetune.config import JobConfig
from finetune.paths import adapters_dir, runs_dir

ADAPTER = "tiny-arith"  # the same tiny adapter test_evaluate.py trains; whichever module runs first trains it


def ensure_tiny_adapter(chat_jsonl: Path) -> str:
    """A real adapter from the real training entry point: 8 steps of LoRA on arithmetic, unquantized, short rows."""
    if (adapters_dir() / ADAPTER / "adapter_model.safetensors").exists():
        return ADAPTER
    from finetune.recipe import run as train_run

    cfg = JobConfig(adapter_name=ADAPTER).with_overrides([
        "model.quantization=none", f"data.path={chat_jsonl}", f"data.validation_path={chat_jsonl.parent / 'heldout.jsonl'}",
        "data.max_seq_length=128", "training.max_steps=8", "training.learning_rate=0.001",
        "training.per_device_train_batch_size=4", "training.gradient_checkpointing=false", "training.save_steps=0",
        "training.warmup_ratio=0", "training.lr_scheduler_type=constant", "lora.r=8", "lora.lora_alpha=16",
        "evaluation.enabled=false"])
    train_run(cfg, runs_dir() / f"test-{ADAPTER}")
    return ADAPTER


@pytest.fixture(scope="module")
def adapter(chat_jsonl) -> str:
    return ensure_tiny_adapter(chat_jsonl)


def test_base_answers_a_question():
    text, stats = G.generate_with_stats(None, "What is 2 plus 3?", max_new_tokens=24)
    assert text.strip(), "the base model answered nothing"
    assert "<|im_end|>" not in text and "<|im_start|>" not in text
    assert stats["new_tokens"] > 0 and stats["tokens_per_second"] > 0 and stats["latency_s"] > 0
    assert G.last_stats()["latency_s"] == stats["latency_s"]
    # greedy decoding is deterministic; a chat history works as well as a bare prompt
    assert G.generate("", [{"role": "user", "content": "What is 2 plus 3?"}], max_new_tokens=24) == text


def test_stream_yields_growing_text_that_ends_as_generate():
    chunks = list(G.stream(None, "Name three colours.", max_new_tokens=20))
    assert len(chunks) >= 3
    assert all(len(b) >= len(a) for a, b in zip(chunks, chunks[1:]))
    assert chunks[-1] == G.generate(None, "Name three colours.", max_new_tokens=20)
    assert G.last_stats()["new_tokens"] > 0


def test_stream_stops_when_the_consumer_goes_away():
    it = G.stream(None, "Write a long story about a dragon.", max_new_tokens=200)
    next(it), next(it)
    it.close()  # what a Stop button does; the worker must stop early and release the model lock
    assert G.last_stats().get("cancelled") is True and G.last_stats()["new_tokens"] < 200
    assert G.lock().acquire(timeout=5)
    G.lock().release()


def test_adapters_swap_on_one_loaded_base(adapter):
    # A second stored adapter: the same folder with its LoRA B matrices zeroed, so it must answer exactly as the base.
    zero = "tiny-arith-zero"
    src, dst = adapters_dir() / adapter, adapters_dir() / zero
    if not dst.exists():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("eval"))
        weights = load_file(dst / "adapter_model.safetensors")
        save_file({k: (v * 0 if "lora_B" in k else v) for k, v in weights.items()}, dst / "adapter_model.safetensors")
    prompt = "What is 12 plus 7?"
    first = G.generate(adapter, prompt, max_new_tokens=16)
    loads = G.load_count
    as_zero = G.generate(zero, prompt, max_new_tokens=16)
    base = G.generate(None, prompt, max_new_tokens=16)
    again = G.generate(adapter, prompt, max_new_tokens=16)
    streamed = list(G.stream(zero, prompt, max_new_tokens=16))[-1]
    assert G.load_count == loads, "swapping adapters reloaded the base model"
    assert set(G.loaded_info()["adapters"]) >= {adapter, zero}
    assert as_zero == base == streamed, "a zeroed adapter must answer like the base: the swap did not take effect"
    assert again == first, "swapping back did not restore the first adapter"
    assert first != base, "the trained adapter should change the answer"
    assert first.startswith("12 plus 7 is")  # the training rows' phrasing, not the base's "12 + 7 = 19"
