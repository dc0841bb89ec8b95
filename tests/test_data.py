"""The data pipeline with the real SmolLM2 tokenizer (no model): every source and format, assistant-only labels with
the end-of-turn token, every bad-input case named by file/line/field, truncation, splits, collate, preview."""
from __future__ import annotations

import csv
import json

import pytest

from conftest import arithmetic_rows, write_jsonl
from finetune import data as D
from finetune.config import DEMO_DATASET, DataConfig, ModelConfig

CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "What is 2 plus 3?"},
                  {"role": "assistant", "content": "2 plus 3 is 5."},
                  {"role": "user", "content": "And 4 plus 4?"},
                  {"role": "assistant", "content": "4 plus 4 is 8."}]},
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
]
ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
]
SHAREGPT = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello, how can I help?"}]}]
TEXT = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "Lorem ipsum dolor sit amet."}]


@pytest.fixture(scope="module")
def tok():
    from finetune.model import load_tokenizer

    return load_tokenizer(ModelConfig())


def cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


def trained_runs(tok, ex) -> list[str]:
    """The labelled tokens, decoded run by run (a run is a stretch of consecutive labelled positions)."""
    runs, cur = [], []
    for t, l in zip(ex["input_ids"], ex["labels"]):
        if l != D.IGNORE_INDEX:
            assert l == t
            cur.append(l)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def error_of(fn, *args) -> D.DataError:
    with pytest.raises(D.DataError) as info:
        fn(*args)
    return info.value


# --- sources -----------------------------------------------------------------------------------------------------
def test_every_source_gives_the_same_records(tmp_path):
    rows = CHAT + CHAT
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "c.json").write_text(json.dumps({"data": rows}))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    from datasets import Dataset, DatasetDict

    Dataset.from_list(rows).save_to_disk(str(tmp_path / "e"))
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "f"))
    for name in ("a.jsonl", "b.json", "c.json", "d.parquet", "e", "f"):
        got = D.load_records(str(tmp_path / name))
        assert [D.to_messages(r, "chat") for r in got] == [r["messages"] for r in rows], name
        assert D.detect_format(got) == "chat"
    assert len(D.load_records(str(tmp_path / "f"), "validation")) == 1  # alias finds the "test" split
    e = error_of(D.load_records, str(tmp_path / "f"), "dev")
    assert "no split 'dev'" in str(e) and "train" in str(e)


def test_csv_alpaca_and_chat_cells(tmp_path, tok):
    p = tmp_path / "a.csv"
    with p.open("w", newline="") as f:
        w = csv.DictWriter(f, ["instruction", "input", "output"])
        w.writeheader()
        w.writerows(ALPACA)
    recs = D.load_records(str(p))
    assert D.detect_format(recs) == "alpaca"
    assert D.to_messages(recs[0], "alpaca") == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                                                {"role": "assistant", "content": "5"}]
    assert D.to_messages(recs[1], "alpaca")[0] == {"role": "user", "content": "Say hello."}
    q = tmp_path / "chat.csv"
    with q.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["messages"])
        w.writerow([json.dumps(CHAT[1]["messages"])])
    assert D.to_messages(D.load_records(str(q))[0], "chat") == CHAT[1]["messages"]


def test_json_lines_in_a_json_file(tmp_path):
    write_jsonl(tmp_path / "x.json", TEXT)
    assert D.load_records(str(tmp_path / "x.json")) == TEXT


def test_formats_detected_and_converted():
    assert D.detect_format(CHAT) == "chat"
    assert D.detect_format(ALPACA) == "alpaca"
    assert D.detect_format(SHAREGPT) == "chat"
    assert D.detect_format(TEXT) == "text"
    assert D.to_messages(SHAREGPT[0], "chat") == [{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": "Hello, how can I help?"}]
    assert D.to_messages(TEXT[0], "text") == [{"role": "assistant", "content": TEXT[0]["text"]}]
    e = error_of(D.detect_format, D.Records([{"question": "q", "answer": "a"}], "qa.jsonl", [3], "line"))
    assert str(e).startswith("qa.jsonl, line 3: cannot tell the format") and "data.format" in str(e)


def test_system_prompt_only_where_missing():
    msgs = D.to_messages(CHAT[1], "chat", system_prompt="You answer in one word.")
    assert msgs[0] == {"role": "system", "content": "You answer in one word."}
    assert D.to_messages(CHAT[0], "chat", system_prompt="other")[0]["content"] == "Be brief."
    assert D.to_messages(ALPACA[0], "alpaca", system_prompt="S")[0] == {"role": "system", "content": "S"}


# --- labels --------------------------------------------------------------------------------------------------------
def test_labels_only_on_assistant_answers_and_end_of_turn(tmp_path, tok):
    write_jsonl(tmp_path / "chat.jsonl", CHAT)
    prep = D.prepare(cfg(tmp_path / "chat.jsonl", validation_split=0.0), tok)
    assert prep.stats["format"] == "chat" and prep.stats["num_train"] == 2
    assert trained_runs(tok, prep.train[0]) == ["2 plus 3 is 5.<|im_end|>", "4 plus 4 is 8.<|im_end|>"]
    assert trained_runs(tok, prep.train[1]) == ["Blue.<|im_end|>"]
    # the rendered prompt is SmolLM2's template, untouched: the default system prompt appears when none is given
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(prep.train[1]["input_ids"])
    assert prep.train[0]["labels"][-2] == tok.convert_tokens_to_ids("<|im_end|>")
    assert prep.train[0]["labels"][-1] == D.IGNORE_INDEX  # the "\n" after <|im_end|> is not trained
    assert prep.stats["trainable_tokens"] == sum(sum(l != -100 for l in ex["labels"]) for ex in prep.train)


def test_labels_alpaca_sharegpt_and_text(tmp_path, tok):
    for name, rows, expected in (
        ("alpaca", ALPACA, [["5<|im_end|>"], ["Hello!<|im_end|>"]]),
        ("sharegpt", SHAREGPT, [["Hello, how can I help?<|im_end|>"]]),
    ):
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
        prep = D.prepare(cfg(tmp_path / f"{name}.jsonl", validation_split=0.0), tok)
        assert [trained_runs(tok, ex) for ex in prep.train] == expected, name
    write_jsonl(tmp_path / "text.jsonl", TEXT)
    prep = D.prepare(cfg(tmp_path / "text.jsonl", validation_split=0.0), tok)
    assert prep.stats["format"] == "text"
    for ex, row in zip(prep.train, TEXT):
        assert ex["labels"] == ex["input_ids"]  # every token, then EOS
        assert tok.decode(ex["input_ids"]) == row["text"] + tok.eos_token
    pv = D.preview(cfg(tmp_path / "text.jsonl"), tok, n=1)
    assert pv["rows"][0]["segments"] == [(TEXT[0]["text"] + tok.eos_token, True)]


def test_labels_of_a_template_with_a_different_end_token(tok):
    """A Llama-3-like template (header tokens, <|eot_id|> after each turn) and no default system prompt."""
    import copy

    t = copy.copy(tok)
    t.chat_template = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
                       "m['content'] + '<|eot_id|>' }}{% endfor %}"
                       "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
    r = D.render(t, CHAT[0]["messages"], "chat")
    trained = "".join(r.text[a:b] for a, b in r.spans)
    assert trained == "2 plus 3 is 5.<|eot_id|>4 plus 4 is 8.<|eot_id|>"
    # a template that never closes the last answer: EOS is appended and trained
    t.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    r = D.render(t, CHAT[1]["messages"], "chat")
    assert r.input_ids[-1] == tok.eos_token_id and r.labels[-1] == tok.eos_token_id
    # " Blue" carries the space after "assistant:": it is the token the model must generate after the prompt
    assert tok.decode([l for l in r.labels if l != -100]) == " Blue." + tok.eos_token


# --- bad input -------------------------------------------------------------------------------------------------------
def test_broken_json_line_names_the_physical_line(tmp_path):
    p = tmp_path / "broken.jsonl"
    good = json.dumps(CHAT[1])
    p.write_text(f"{good}\n\n{good}\n{{\"messages\": [}}\n{good}\n")
    e = error_of(D.load_records, str(p))
    assert (e.path, e.line) == (str(p), 4)
    assert str(e).startswith(f"{p}, line 4: broken JSON")


def test_missing_column_names_file_line_and_field(tmp_path, tok):
    p = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA + [{"instruction": "Do it.", "input": ""}])
    e = error_of(D.prepare, cfg(p, validation_split=0.0), tok)
    assert (e.path, e.line, e.field) == (str(p), 3, "output")
    assert str(e) == f"{p}, line 3: output: missing column 'output'"
    # a forced format that does not fit: the first row is named
    q = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    e = error_of(D.prepare, cfg(q, format="alpaca", validation_split=0.0), tok)
    assert (e.line, e.field) == (1, "instruction") and "(and 1 more bad rows)" in str(e)


def test_csv_missing_value_names_the_csv_line(tmp_path, tok):
    p = tmp_path / "a.csv"
    p.write_text('instruction,input,output\nSay hi,,hi\n"Multi\nline",,ok\nNo output here\n')
    e = error_of(D.prepare, cfg(p, validation_split=0.0), tok)
    assert (e.path, e.line, e.field) == (str(p), 5, "output")  # the quoted cell spans lines 3-4


def test_empty_files(tmp_path, tok):
    for name, text in (("e.jsonl", ""), ("blank.jsonl", "\n  \n"), ("e.json", "[]"), ("e.csv", "instruction,output\n")):
        p = tmp_path / name
        p.write_text(text)
        e = error_of(D.load_records, str(p))
        assert e.path == str(p) and "empty" in str(e) and str(e).startswith(str(p)), name


def test_unknown_role_and_non_string_content(tmp_path, tok):
    rows = [CHAT[1],
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]}]
    p = write_jsonl(tmp_path / "roles.jsonl", rows)
    e = error_of(D.prepare, cfg(p, validation_split=0.0), tok)
    assert (e.path, e.line, e.field) == (str(p), 2, "messages[1].role")
    assert str(e) == f"{p}, line 2: messages[1].role: unknown role 'bot' (expected system, user, assistant)"
    p = write_jsonl(tmp_path / "content.jsonl", [CHAT[1], CHAT[1],
                                                 {"messages": [{"role": "user", "content": ["Hi"]},
                                                               {"role": "assistant", "content": "Hello"}]}])
    e = error_of(D.prepare, cfg(p, validation_split=0.0), tok)
    assert (e.line, e.field) == (3, "messages[0].content") and "expected a string, got list" in str(e)
    p = write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": [{"from": "human", "value": "Hi"},
                                                                     {"from": "robot", "value": "Hello"}]}])
    e = error_of(D.prepare, cfg(p, validation_split=0.0), tok)
    assert e.field == "conversations[1].from" and "unknown role 'robot'" in str(e)
    p = write_jsonl(tmp_path / "noanswer.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    e = error_of(D.prepare, cfg(p, validation_split=0.0), tok)
    assert (e.line, e.field) == (1, "messages") and "no assistant message" in str(e)


def test_missing_file_and_unsupported_type(tmp_path, tok):
    e = error_of(D.prepare, cfg(tmp_path / "nope.jsonl"), tok)
    assert str(e) == f"{tmp_path / 'nope.jsonl'}: file not found"
    (tmp_path / "x.txt").write_text("hello")
    assert "unsupported file type '.txt'" in str(error_of(D.load_records, str(tmp_path / "x.txt")))
    e = error_of(D.load_records, "someone/not-a-dataset")  # tests run with HF_HUB_OFFLINE=1
    assert e.path == "someone/not-a-dataset" and "Offline" in str(e)


def test_validation_file_errors_name_that_file(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", CHAT)
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps(CHAT[1]) + "\n" + json.dumps({"messages": [{"role": "user", "content": 3},
                                                                         {"role": "assistant", "content": "x"}]}) + "\n")
    e = error_of(D.prepare, cfg(train, validation_path=str(held)), tok)
    assert (e.path, e.line, e.field) == (str(held), 2, "messages[0].content")


# --- truncation, splits, stats -----------------------------------------------------------------------------------------
def test_truncation_counted_and_untrainable_rows_dropped(tmp_path, tok):
    long_answer = " ".join(["word"] * 60)
    rows = arithmetic_rows(3) + [{"messages": [{"role": "user", "content": "Talk."},
                                               {"role": "assistant", "content": long_answer}]},
                                 {"messages": [{"role": "user", "content": " ".join(["long"] * 80)},
                                               {"role": "assistant", "content": "Short."}]}]
    p = write_jsonl(tmp_path / "long.jsonl", rows)
    prep = D.prepare(cfg(p, max_seq_length=64, validation_split=0.0), tok)
    s = prep.stats
    assert (s["truncated"], s["dropped"], s["num_train"]) == (2, 1, 4)  # the long prompt leaves no answer token
    assert all(len(ex["input_ids"]) <= 64 for ex in prep.train)
    assert s["token_lengths"]["max"] > 64 and sum(s["length_histogram"]["counts"]) == 5
    kept = prep.train[3]
    assert kept["labels"][-1] != D.IGNORE_INDEX  # the cut answer still trains on what is left


def test_split_deterministic_and_seeded(tmp_path):
    recs = D.load_records(str(write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(50))))
    a = D.split_records(recs, cfg("x", validation_split=0.2, seed=1))
    b = D.split_records(recs, cfg("x", validation_split=0.2, seed=1))
    c = D.split_records(recs, cfg("x", validation_split=0.2, seed=2))
    assert a == b and a != c
    assert (len(a[0]), len(a[1])) == (40, 10)
    assert sorted(json.dumps(r) for r in a[0] + a[1]) == sorted(json.dumps(r) for r in recs)
    assert a[1].lines == sorted(a[1].lines)  # rows keep their file lines, for error messages
    two = D.load_records(str(write_jsonl(tmp_path / "two.jsonl", arithmetic_rows(2))))
    assert [len(x) for x in D.split_records(two, cfg("x", validation_split=0.01))] == [1, 1]
    assert [len(x) for x in D.split_records(two, cfg("x", validation_split=0.0))] == [2, 0]


def test_validation_path_and_max_samples(tok, chat_jsonl):
    held = chat_jsonl.parent / "heldout.jsonl"
    prep = D.prepare(cfg(chat_jsonl, validation_path=str(held), max_samples=10), tok)
    assert (prep.stats["num_train"], prep.stats["num_validation"], prep.stats["num_rows"]) == (10, 8, 56)
    assert len(prep.validation_records) == 8
    assert prep.validation_records[0] == json.loads(held.read_text().splitlines()[0])["messages"]


def test_demo_uses_its_heldout_file(tok):
    prep = D.prepare(DataConfig(path=DEMO_DATASET), tok)
    s = prep.stats
    assert (s["format"], s["num_train"], s["num_validation"], s["truncated"], s["dropped"]) == ("chat", 400, 60, 0, 0)
    train_q = {r["messages"][0]["content"] for r in D.load_records(DEMO_DATASET, "train")}
    assert not train_q & {m[0]["content"] for m in prep.validation_records}


def test_fingerprint_tracks_data_and_settings(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(10))
    f1 = D.prepare(cfg(p), tok).stats["fingerprint"]
    assert D.prepare(cfg(p), tok).stats["fingerprint"] == f1
    assert D.prepare(cfg(p, max_seq_length=100), tok).stats["fingerprint"] != f1
    assert D.prepare(cfg(p, seed=7), tok).stats["fingerprint"] != f1  # another split
    write_jsonl(p, arithmetic_rows(10, seed=5))
    assert D.prepare(cfg(p), tok).stats["fingerprint"] != f1


# --- batches -----------------------------------------------------------------------------------------------------
def test_collate_padded():
    import torch

    ex = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    b = D.collate(ex, pad_token_id=2)
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert b["input_ids"].dtype == torch.long


def test_collate_padding_free():
    ex = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]},
          {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}]
    b = D.collate(ex, pad_token_id=2, padding_free=True)
    assert set(b) == {"input_ids", "position_ids", "labels"}
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, 3, 4]]


def test_collate_matches_transformers_flattening_collator():
    from transformers import DataCollatorWithFlattening

    ex = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    ours = D.collate(ex, pad_token_id=0, padding_free=True)
    theirs = DataCollatorWithFlattening(return_tensors="pt")(ex)
    for k in ("input_ids", "position_ids", "labels"):
        assert ours[k].tolist() == theirs[k].tolist(), k


# --- preview -------------------------------------------------------------------------------------------------------
def test_preview_marks_trained_spans(tmp_path, tok):
    p = write_jsonl(tmp_path / "chat.jsonl", CHAT + arithmetic_rows(6))
    pv = D.preview(cfg(p, max_seq_length=128), tok, n=2)
    assert (pv["format"], pv["num_rows"], pv["max_seq_length"], len(pv["rows"])) == ("chat", 8, 128, 2)
    first = pv["rows"][0]
    assert "".join(t for t, _ in first["segments"]) == first["text"]
    assert [t for t, trained in first["segments"] if trained] == ["2 plus 3 is 5.<|im_end|>", "4 plus 4 is 8.<|im_end|>"]
    assert pv["truncated"] == 0 and pv["token_lengths"]["max"] <= 128
    hist = pv["length_histogram"]
    assert len(hist["edges"]) == len(hist["counts"]) + 1 and sum(hist["counts"]) == 8
    json.dumps(pv)  # plain data for the UI
    short = D.preview(cfg(p, max_seq_length=30), tok, n=1)
    row = short["rows"][0]
    assert row["truncated"] and short["truncated"] == 8
    assert len("".join(t for t, _ in row["segments"])) < len(row["text"])


def test_line_separators_inside_values(tmp_path):
    """Raw U+2028 inside a JSON string is one line of JSONL; CRLF CSV files count lines like any other."""
    p = tmp_path / "u.jsonl"
    p.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n" + json.dumps({"text": "c"}) + "\n")
    assert D.load_records(str(p)) == [{"text": "a\u2028b"}, {"text": "c"}]
    q = tmp_path / "crlf.csv"
    q.write_bytes(b"instruction,output\r\nSay hi,hi\r\n\r\nSay bye,\r\n")
    recs = D.load_records(str(q))
    assert recs.lines == [2, 4] and recs[1] == {"instruction": "Say bye", "output": ""}
    e = error_of(D.validate_rows, recs, "alpaca")
    assert (e.path, e.line, e.field) == (str(q), 4, "output") and "is empty" in str(e)
