"""Evaluation end to end with the real SmolLM2 and a real (tiny) adapter: both sides scored on the same prompts,
paired statistics, per-example rows, the cache, the CLI, multiple choice and clear errors."""
import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT, write_jsonl
from finetune.evaluation import evaluate as E
from finetune.store.adapters import get_adapter
from test_generate import ensure_tiny_adapter

SIDE_METRICS = {"val_loss", "perplexity", "exact_match", "token_f1", "rouge_l", "tokens_per_second", "latency_s",
                "peak_memory_mb"}
PAIRED = {"mean_diff", "ci_low", "ci_high", "wins", "ties", "losses"}
# The default recipe made short: 20 steps at a higher learning rate (~1 min of training on 2 idle cores). Measured on
# the 60 held-out rows it already gives ROUGE-L 0.21 -> 0.47 and token F1 0.18 -> 0.41, every CI far above zero.
DIRECTION_RECIPE = ["training.max_steps=20", "training.learning_rate=0.001", "data.max_seq_length=128"]
DIRECTION_EXAMPLES = 16


@pytest.fixture(scope="module")
def adapter(chat_jsonl) -> str:
    return ensure_tiny_adapter(chat_jsonl)


def test_evaluate_heldout_both_sides_paired_and_cached(adapter, chat_jsonl):
    heldout = chat_jsonl.parent / "heldout.jsonl"
    r = E.evaluate(adapter, str(heldout), max_examples=8, max_new_tokens=24)
    assert r["adapter"] == adapter and r["data"]["n"] == 8 and r["data"]["path"] == str(heldout)
    for side in ("base", "adapter"):
        assert SIDE_METRICS <= set(r["metrics"][side]), side
        assert r["metrics"][side]["tokens_per_second"] > 0 and r["metrics"][side]["peak_memory_mb"] > 0
        assert 0 <= r["metrics"][side]["rouge_l"] <= 1
    for m in ("exact_match", "token_f1", "rouge_l", "val_loss"):
        p = r["paired"][m]
        assert PAIRED <= set(p) and p["wins"] + p["ties"] + p["losses"] == 8
        assert p["ci_low"] <= p["mean_diff"] <= p["ci_high"]
    assert len(r["examples"]) == 8
    ex = r["examples"][0]
    assert ex["prompt"].startswith("What is") and ex["reference"].endswith(".")
    assert ex["base"] and ex["adapter"]
    assert ex["scores"]["diff"]["rouge_l"] == pytest.approx(ex["scores"]["adapter"]["rouge_l"] - ex["scores"]["base"]["rouge_l"])
    # 12 steps on the same kind of rows: the adapter's reference loss must drop below the base's
    assert r["metrics"]["adapter"]["val_loss"] < r["metrics"]["base"]["val_loss"]

    t0 = time.perf_counter()
    again = E.evaluate(adapter, str(heldout), max_examples=8, max_new_tokens=24)
    assert time.perf_counter() - t0 < 2.0, "the second call should come from the cache"
    assert again == r
    assert get_adapter(adapter)["eval"]["key"] == r["key"]
    assert E.cached_results(adapter)[0]["key"] == r["key"]

    # the CLI prints the same (cached) JSON on stdout
    out = subprocess.run([sys.executable, "-m", "finetune", "eval", "--adapter", adapter, "--data", str(heldout),
                          "--max-examples", "8", "--max-new-tokens", "24"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == r

    # asking for more examples than the file holds is the same evaluation: served from the cache
    t0 = time.perf_counter()
    assert E.evaluate(adapter, str(heldout), max_examples=20, max_new_tokens=24)["key"] == r["key"]
    assert time.perf_counter() - t0 < 2.0

    # a different setting is a different evaluation, not a stale cache hit
    other = E.evaluate(adapter, str(heldout), max_examples=2, max_new_tokens=8)
    assert other["key"] != r["key"] and other["data"]["n"] == 2


def test_multiple_choice_accuracy_by_log_likelihood(adapter, tmp_path):
    rows = [{"question": f"What is {a} plus {b}?", "choices": [f"{a} plus {b} is {a + b + d}." for d in (3, 0, -2)],
             "answer": 1} for a, b in ((3, 4), (10, 20), (7, 8))]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    r = E.evaluate(adapter, str(path), max_new_tokens=8)
    assert r["data"]["n"] == 3
    for side in ("base", "adapter"):
        assert 0.0 <= r["metrics"][side]["mc_accuracy"] <= 1.0
    assert {"wins", "ci_low"} <= set(r["paired"]["mc_accuracy"])
    assert r["examples"][0]["reference"] == "3 plus 4 is 7." and r["examples"][0]["answer"] == 1
    # the arithmetic adapter prefers the right sum
    assert r["metrics"]["adapter"]["mc_accuracy"] >= 2 / 3


def test_errors_name_the_problem(adapter, tmp_path):
    with pytest.raises(E.EvalError, match="no-such-adapter"):
        E.evaluate("no-such-adapter", max_examples=1)
    only_text = write_jsonl(tmp_path / "text.jsonl", [{"text": "just prose"}, {"text": "more prose"}])
    with pytest.raises(E.EvalError, match="text.jsonl.*user prompt followed by an assistant answer"):
        E.evaluate(adapter, str(only_text), max_examples=1)
    out = subprocess.run([sys.executable, "-m", "finetune", "eval", "--adapter", "no-such-adapter"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "no-such-adapter" in out.stderr and out.stdout == ""


@pytest.mark.slow
def test_adapter_beats_base_on_the_demo_domain():
    """The adapter improves on its base, on a shorter version of the default recipe (QLoRA on SmolLM2, built-in python-docs
    domain): on held-out questions the adapter's answers overlap the references more than the base's do."""
    from finetune.recipe import run as train_run
    from finetune.config import example_config
    from finetune.paths import runs_dir

    cfg = example_config().with_overrides(["adapter_name=demo-direction", *DIRECTION_RECIPE, "evaluation.enabled=false",
                                           "training.save_steps=0"])
    train_run(cfg, runs_dir() / "test-demo-direction")
    r = E.evaluate("demo-direction", max_examples=DIRECTION_EXAMPLES, max_new_tokens=48)
    assert r["data"]["path"] == "builtin:python-docs" and r["data"]["n"] == DIRECTION_EXAMPLES
    base, adapter = r["metrics"]["base"], r["metrics"]["adapter"]
    assert adapter["rouge_l"] > base["rouge_l"], r["paired"]["rouge_l"]
    assert adapter["token_f1"] > base["token_f1"], r["paired"]["token_f1"]
    assert adapter["val_loss"] < base["val_loss"]
