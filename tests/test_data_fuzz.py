"""Property-based tests of the data loader: at least 1,000 generated malformed inputs per property.
Loading, detecting the format and validating every row either succeed or raise DataError naming the file;
nothing else escapes (no KeyError, TypeError, UnicodeDecodeError, ...)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.data import DataError, detect_format, load_records, validate_rows

SETTINGS = settings(max_examples=1000, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
DIR = Path(tempfile.mkdtemp(prefix="data-fuzz-"))

keys = st.sampled_from(["messages", "conversations", "role", "from", "content", "value", "instruction", "input",
                        "output", "text", "system", "x"])
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12),
                    st.sampled_from(["user", "assistant", "system", "human", "gpt", "bot"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.one_of(keys, st.text(max_size=5)), inner,
                                                                       max_size=4)), max_leaves=12)
rows = st.lists(st.dictionaries(keys, values, max_size=4), min_size=0, max_size=5)


def _check(path: Path) -> None:
    try:
        recs = load_records(str(path))
        validate_rows(recs, detect_format(recs))
    except DataError as e:
        assert str(path) in str(e), str(e)


@SETTINGS
@given(rows)
def test_jsonl_structures(data):
    p = DIR / "rows.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in data))
    _check(p)


@SETTINGS
@given(st.binary(max_size=200))
def test_jsonl_bytes(blob):
    p = DIR / "bytes.jsonl"
    p.write_bytes(blob)
    _check(p)


@SETTINGS
@given(st.one_of(values, rows))
def test_json_documents(doc):
    p = DIR / "doc.json"
    p.write_text(json.dumps(doc))
    _check(p)


@SETTINGS
@given(st.text(max_size=200))
def test_csv_text(text):
    p = DIR / "table.csv"
    p.write_text(text)
    _check(p)
