"""The built-in demo domain: deterministic, a fixed disjoint held-out set, short answers in one learnable style."""
from __future__ import annotations

import json
import re

import pytest

from finetune import data as D
from finetune import demo
from finetune.config import DEMO_DATASET, ModelConfig


@pytest.fixture(scope="module")
def built():
    return demo.build()


def names(rows) -> list[str]:
    return [re.match(r"What does `(.+)` do in Python\?$", r["messages"][0]["content"]).group(1) for r in rows]


def test_build_is_deterministic_with_a_disjoint_heldout(built):
    train, held = built
    assert demo.build() == built
    assert (len(train), len(held)) == (demo.MAX_TRAIN, demo.HELDOUT)
    assert not set(names(train)) & set(names(held))
    assert len(set(names(train))) == len(train) and len(set(names(held))) == len(held)
    assert names(train) == sorted(names(train)) and names(held) == sorted(names(held))


def test_answers_share_one_shape(built):
    for row in built[0] + built[1]:
        (user, assistant) = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        name = names([row])[0]
        # "`textwrap.dedent` removes ...": the name, a verb in the third person, one sentence
        m = re.match(rf"^`{re.escape(name)}` (?:[a-z]+ly )?([a-z]+) (.+)[.!?]$", assistant["content"])
        assert m, assistant["content"]
        assert m.group(1).endswith("s") and "  " not in assistant["content"]


def test_answers_are_short(built):
    from finetune.model import load_tokenizer

    tok = load_tokenizer(ModelConfig())
    lengths = sorted(len(tok(r["messages"][1]["content"])["input_ids"]) for r in built[0] + built[1])
    assert lengths[-1] <= 50 and 12 <= lengths[len(lengths) // 2] <= 30


def test_known_functions_read_well():
    answers = {p["name"]: p["answer"] for p in demo.build_pairs()}
    assert answers["textwrap.dedent"] == "`textwrap.dedent` removes any common leading whitespace from every line in text."
    assert answers["math.sqrt"] == "`math.sqrt` returns the square root of x."
    assert answers["len"] == "`len` returns the number of items in a container."
    assert answers["heapq.heapreplace"] == "`heapq.heapreplace` pops and returns the current smallest value, and adds the new item."


def test_text_helpers():
    assert [demo._verb_3s(w) for w in ("Return", "apply", "do", "push", "copy", "say")] == \
        ["returns", "applies", "does", "pushes", "copies", "says"]
    doc = "sqrt(x)\n\nReturn the square root of x, e.g. sqrt(4) is 2.0. More text."
    assert demo.first_sentence(doc, "math.sqrt") == "Return the square root of x, e.g. sqrt(4) is 2.0."
    assert demo.first_sentence("Return :func:`foo` for ``x``\nacross lines.", "f") == "Return foo for x across lines."
    assert demo._describe("Create and return a temporary file.") == "creates and returns a temporary file."
    assert demo._describe("Recursively delete a directory tree.") == "recursively deletes a directory tree."
    assert demo._describe("Returns a list; read it, and close the file.") == "returns a list; reads it, and closes the file."
    assert demo._describe("The answer.") is None


def test_ensure_demo_writes_once_and_loads(built, studio_home):
    train_path, held_path = demo.ensure_demo()
    assert train_path.parent == studio_home / "datasets" / "python-docs"
    assert [json.loads(x) for x in train_path.read_text().splitlines()] == built[0]
    assert [json.loads(x) for x in held_path.read_text().splitlines()] == built[1]
    stamp = train_path.stat().st_mtime_ns
    assert demo.ensure_demo() == (train_path, held_path) and train_path.stat().st_mtime_ns == stamp
    assert D.load_records(DEMO_DATASET) == built[0]
    assert D.load_records(DEMO_DATASET, "validation") == built[1] == D.load_records(DEMO_DATASET, "heldout")
    # a stale generator version is rewritten
    meta = train_path.parent / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": -1}))
    train_path.write_text("")
    demo.ensure_demo()
    assert [json.loads(x) for x in train_path.read_text().splitlines()] == built[0]
