"""An adapter stops generating where its chat template ends a turn, also when that end-of-turn marker is not the
tokenizer's EOS: training teaches the marker (data.END_MARKERS) and generation stops on the same list."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import tiny_config, write_jsonl

MARKER = "<|endoftext|>"  # a single token of SmolLM2's vocabulary, and not its EOS (<|im_end|>)
# ChatML with every turn ended by MARKER instead of <|im_end|>.
TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}" + MARKER +
            "\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ADAPTER = "endoftext-turns"


@pytest.fixture(scope="module")
def marker_model(tmp_path_factory) -> Path:
    """The embedded SmolLM2 with its chat template replaced (weights linked, not copied)."""
    from finetune.config import DEFAULT_MODEL
    from finetune.model import resolve_model

    src = Path(resolve_model(DEFAULT_MODEL))
    dst = tmp_path_factory.mktemp("marker-model")
    for f in src.iterdir():
        if f.name == "model.safetensors":
            (dst / f.name).symlink_to(f)
        elif f.name != "chat_template.jinja":
            shutil.copy(f, dst / f.name)
    (dst / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
    return dst


def test_generation_stops_at_a_trained_end_of_turn_marker_that_is_not_eos(marker_model, tmp_path):
    from finetune.data import END_MARKERS
    from finetune.evaluation import generate as G
    from finetune.model import load_tokenizer
    from finetune.recipe import run

    rows = [{"messages": [{"role": "user", "content": f"Say the word {w}."}, {"role": "assistant", "content": w}]}
            for w in ("apple", "river", "stone", "cloud", "green", "table", "light", "paper") * 4]
    cfg = tiny_config(write_jsonl(tmp_path / "words.jsonl", rows), ADAPTER, steps=6, learning_rate=3e-3,
                      per_device_train_batch_size=4, lr_scheduler_type="constant")
    cfg.model.name_or_path = str(marker_model)
    tok = load_tokenizer(cfg.model)
    assert tok.eos_token != MARKER and MARKER in END_MARKERS
    assert MARKER in tok.apply_chat_template(rows[0]["messages"], tokenize=False)
    run(cfg, tmp_path / "run")

    # Generation stops on every marker training can teach that is one token here, EOS among them.
    stops = G.stop_token_ids(tok)
    assert stops[0] == tok.eos_token_id and tok.convert_tokens_to_ids(MARKER) in stops
    # The Playground and evaluation generate through the same call: the adapter ends its turn with MARKER there.
    try:
        text, stats = G.generate_with_stats(ADAPTER, "Say the word river.", max_new_tokens=24)
    finally:
        G.unload()
    row = stats["rows"][0]
    assert row["stopped"] and row["stop_token"] == MARKER, (text, row)
    assert row["new_tokens"] < 24 and "user" not in text and "\n" not in text, (text, row)


def test_every_single_token_end_marker_stops_generation(marker_model):
    """The stop list is data.END_MARKERS (those that are one token of the vocabulary) plus EOS, nothing less."""
    from finetune.config import ModelConfig
    from finetune.data import END_MARKERS
    from finetune.evaluation import generate as G
    from finetune.model import load_tokenizer

    tok = load_tokenizer(ModelConfig(name_or_path=str(marker_model), quantization="none"))
    vocab = tok.get_vocab()
    expected = {tok.eos_token_id} | {vocab[m] for m in END_MARKERS if m in vocab}
    assert set(G.stop_token_ids(tok)) == expected and len(expected) >= 2
