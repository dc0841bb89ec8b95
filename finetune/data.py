"""The one data pipeline: load -> detect format -> validate every row -> render with the chat template ->
tokenize with assistant-only labels -> split -> pad or pack.

Sources: JSONL, JSON (a list of objects or {"data": [...]}), CSV/TSV, Parquet, a folder saved with
`datasets.save_to_disk`, a hub id (`datasets.load_dataset`), or `builtin:python-docs` (finetune/demo.py).

Formats:
  chat    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}  (OpenAI style; ShareGPT's
          {"conversations": [{"from": "human"|"gpt", "value": ...}]} too)
  alpaca  {"instruction": ..., "input": ... (optional), "output": ...}
  preference {"prompt": ..., "chosen": ..., "rejected": ...}  DPO pairs (finetune/preference.py); other objectives
          see the chosen conversation
  text    {"text": ...}  trained on every token, then EOS. to_messages gives [{"role": "assistant", "content": text}]
          so callers see one shape, but prepare() tokenizes text rows raw, without the chat template.

Labels are -100 everywhere except the assistant turns' content and the end-of-turn token after it (<|im_end|> for
SmolLM2, generally EOS): the model learns to answer and to stop. Every bad row fails before training, as a DataError
whose message names the file, the line (JSONL/CSV: the physical line; other sources: the 1-based row) and the field.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune import limits, policy
from finetune.config import DEMO_DATASET
from finetune.errors import StudioError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
# End-of-turn markers of common chat templates, tried after the tokenizer's own EOS: the first one that follows an
# assistant answer is trained with it, so generation stops.
END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>", "<|end_of_text|>")
FILE_TYPES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
              ".parquet": "parquet", ".pq": "parquet"}
VALIDATION_SPLITS = ("validation", "val", "valid", "heldout", "held_out", "test", "eval")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
MAX_PREVIEW_ROWS = 5000  # rows tokenized for the preview's length histogram


class DataError(StudioError):
    """Data that cannot be trained on. `str(e)` reads "FILE, line N: FIELD: what is wrong"."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None, field: str | None = None,
                 unit: str = "line"):
        self.reason, self.path, self.line, self.field, self.unit = message, path, line, field, unit
        where = ", ".join(p for p in (str(path) if path else "", f"{unit} {line}" if line is not None else "") if p)
        text = f"{field}: {message}" if field else message
        super().__init__(f"{where}: {text}" if where else text)

    def at(self, path: str | None, line: int | None, unit: str = "line") -> "DataError":
        """The same error, located in a file (to_messages knows the field, its caller knows the row)."""
        return DataError(self.reason, path if path is not None else self.path,
                         line if line is not None else self.line, self.field, unit)


class Records(list):
    """Rows (dicts) that remember where they came from, so a bad row can be named by file and line."""

    def __init__(self, rows=(), source: str = "<data>", lines: list[int] | None = None, unit: str = "row"):
        super().__init__(rows)
        self.source, self.unit = source, unit  # unit: "line" (physical line of the file) or "row" (1-based index)
        self.lines = list(lines) if lines is not None else list(range(1, len(self) + 1))

    def where(self, i: int) -> tuple[str, int, str]:
        return self.source, self.lines[i], self.unit

    def subset(self, indices: list[int]) -> "Records":
        return Records([self[i] for i in indices], self.source, [self.lines[i] for i in indices], self.unit)


def _where(records, i: int) -> tuple[str | None, int, str]:
    return records.where(i) if isinstance(records, Records) else (None, i + 1, "row")


# --- loading ---------------------------------------------------------------------------------------------------
def load_records(path: str, split: str = "train", field: str = "data.path") -> Records:
    """Rows of a file, a saved datasets folder, a hub id or the built-in demo, as a list of dicts. In the studio
    (policy.confined) only paths inside the allowed roots are read."""
    path = str(path).strip()
    if not path:
        raise DataError(f"{field} is empty: give a JSONL/JSON/CSV/Parquet file, a datasets folder or a hub id",
                        field=field)
    if policy.confined():
        policy.check_data_path(path, field)
    if path == DEMO_DATASET or path.startswith("builtin:"):
        return _load_builtin(path, split)
    p = Path(path).expanduser()
    if p.is_dir():
        rows = _load_datasets_folder(p, split)
    elif p.is_file():
        kind = FILE_TYPES.get(p.suffix.lower())
        if kind is None:
            raise DataError(f"unsupported file type {p.suffix or '(none)'!r}: use .jsonl, .json, .csv, .tsv or .parquet",
                            path=path)
        rows = {"jsonl": _load_jsonl, "json": _load_json, "csv": _load_csv, "tsv": _load_csv,
                "parquet": _load_parquet}[kind](p)
    elif looks_like_hub_id(path):
        rows = _load_hub(path, split)
    else:
        raise DataError("file not found", path=path)
    if not rows:
        raise DataError("the data is empty (no rows)", path=path)
    _check_sizes(rows)
    return rows


def _longest(value: Any) -> int:
    """Length of the longest string inside a value (rows nest: messages are lists of dicts)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return max((_longest(v) for v in value), default=0)
    return 0


def _check_sizes(records: Records) -> None:
    """Refuse a field over limits.MAX_DATA_FIELD_CHARS before anything is rendered or tokenized."""
    for i, row in enumerate(records):
        for key, value in row.items():
            n = _longest(value)
            if n > limits.MAX_DATA_FIELD_CHARS:
                source, line, unit = _where(records, i)
                raise DataError(f"a value of {n} characters; the limit is {limits.MAX_DATA_FIELD_CHARS}",
                                path=source, line=line, field=str(key)[:100], unit=unit)


def looks_like_hub_id(path: str) -> bool:
    return bool(HUB_ID.match(path)) and Path(path).suffix.lower() not in FILE_TYPES and not path.startswith(".")


def _load_builtin(path: str, split: str) -> Records:
    if path != DEMO_DATASET:
        raise DataError(f"unknown built-in dataset (the built-in one is {DEMO_DATASET})", path=path)
    from finetune.demo import ensure_demo

    train, heldout = ensure_demo()
    return _load_jsonl(heldout if split.lower() in VALIDATION_SPLITS else train)


def _read_text(p: Path) -> str:
    data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (byte {e.start})", path=str(p), line=data[:e.start].count(b"\n") + 1) from None


def _load_jsonl(p: Path) -> Records:
    rows, lines = [], []
    # split on "\n" only: str.splitlines would also break at U+2028 and friends, which JSON strings may hold raw
    for n, line in enumerate(_read_text(p).split("\n"), start=1):
        if not line.strip():
            continue
        if len(line) > limits.MAX_DATA_LINE_CHARS:
            raise DataError(f"the line is {len(line)} characters long; the limit is {limits.MAX_DATA_LINE_CHARS}",
                            path=str(p), line=n)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"broken JSON ({e.msg} at column {e.colno})", path=str(p), line=n) from None
        if not isinstance(row, dict):
            raise DataError(f"each line must be a JSON object, got {type(row).__name__}", path=str(p), line=n)
        rows.append(row)
        lines.append(n)
    return Records(rows, str(p), lines, "line")


def _load_json(p: Path) -> Records:
    text = _read_text(p)
    if not text.strip():
        return Records([], str(p))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines in a .json file
            return _load_jsonl(p)
        raise DataError(f"broken JSON ({e.msg} at column {e.colno})", path=str(p), line=e.lineno) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError('expected a list of objects or {"data": [...]}', path=str(p))
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"each row must be a JSON object, got {type(row).__name__}", path=str(p), line=i + 1,
                            unit="row")
    return Records(data, str(p), unit="row")


def _load_csv(p: Path) -> Records:
    text = _read_text(p)
    csv.field_size_limit(limits.MAX_DATA_FIELD_CHARS + 1)  # one past ours: _check_sizes names the column
    # strict: a quote that is never closed is an error, not one huge field that swallows the rest of the file
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if p.suffix.lower() == ".tsv" else ",",
                        strict=True)
    start = 1
    try:
        header = next(reader, None)
        if header is None:
            return Records([], str(p))
        header = [h.strip() for h in header]
        rows, lines = [], []
        start = reader.line_num + 1
        for values in reader:
            if any(v.strip() for v in values):
                if len(values) > len(header):
                    raise DataError(f"{len(values)} values but the header has {len(header)} columns", path=str(p),
                                    line=start)
                rows.append(dict(zip(header, values)))  # short rows: the missing columns are reported as missing
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        if "field limit" in str(e):
            raise DataError(f"a value longer than {limits.MAX_DATA_FIELD_CHARS} characters (the limit)", path=str(p),
                            line=reader.line_num) from None
        if "unexpected end of data" in str(e):
            raise DataError("broken CSV: a quote opened in this row is never closed", path=str(p), line=start) from None
        raise DataError(f"broken CSV ({e})", path=str(p), line=reader.line_num) from None
    return Records(rows, str(p), lines, "line")


def _load_parquet(p: Path) -> Records:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as e:
        raise DataError(f"not a readable Parquet file ({type(e).__name__}: {e})", path=str(p)) from None
    return Records(rows, str(p), unit="row")


def _pick_split(dd, split: str, where: str):
    names = list(dd.keys())
    if split in dd:
        return dd[split]
    if split.lower() in VALIDATION_SPLITS:
        for alt in VALIDATION_SPLITS:
            if alt in dd:
                return dd[alt]
    raise DataError(f"no split {split!r} (splits: {', '.join(names)})", path=where, field="data.split")


def _load_datasets_folder(p: Path, split: str) -> Records:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(p))
    except Exception as e:
        raise DataError(f"not a folder saved with datasets' save_to_disk ({type(e).__name__}: {e})", path=str(p)) from None
    if isinstance(ds, DatasetDict):
        ds = _pick_split(ds, split, str(p))
    return Records(ds.to_list(), str(p), unit="row")


def _load_hub(hub_id: str, split: str) -> Records:
    try:
        from datasets import load_dataset

        ds = load_dataset(hub_id, split=split)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise DataError(
            f"not a local file or folder, and loading it as a Hugging Face hub dataset (split {split!r}) failed: "
            f"{type(e).__name__}: {first}. Offline (no network, or HF_HUB_OFFLINE=1) only local files, saved datasets "
            f"folders and {DEMO_DATASET} work.", path=hub_id) from None
    return Records(ds.to_list(), hub_id, unit="row")


# --- formats ---------------------------------------------------------------------------------------------------
def detect_format(records, source: str | None = None) -> str:
    """'chat', 'alpaca' or 'text', from the first row's columns (every row is validated later)."""
    src, line, unit = _where(records, 0) if records else (source, None, "row")
    src = source or src
    if not records:
        raise DataError("the data is empty (no rows)", path=src)
    keys = set(records[0])
    if keys & {"chosen", "rejected"}:
        return "preference"
    if keys & {"messages", "conversations"}:
        return "chat"
    if keys & {"instruction", "output"}:
        return "alpaca"
    if "text" in keys:
        return "text"
    raise DataError(
        f"cannot tell the format from the columns {sorted(keys)}: expected 'messages' (chat), "
        "'instruction'/'input'/'output' (alpaca), 'text' or 'prompt'/'chosen'/'rejected' (preference); "
        "or set data.format", path=src, line=line, unit=unit)


def _string(value: Any, field: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=field)
    if not allow_empty and not value.strip():
        raise DataError("is empty", field=field)
    return value


def to_messages(record: dict, fmt: str, system_prompt: str | None = None) -> list[dict]:
    """One row as chat messages [{"role", "content"}], validated. Raises DataError naming the field (the caller
    adds the file and line: see validate_rows)."""
    if not isinstance(record, dict):
        raise DataError(f"a row must be an object, got {type(record).__name__}")
    if fmt == "preference":  # a pair's chosen conversation: what SFT and evaluation see of it
        from finetune.preference import to_pair

        return to_pair(record, system_prompt).conversation("chosen")
    if fmt == "text":
        if "text" not in record or record["text"] is None:
            raise DataError("missing column 'text'", field="text")
        return [{"role": "assistant", "content": _string(record["text"], "text")}]
    if fmt == "alpaca":
        for col in ("instruction", "output"):
            if col not in record or record[col] is None:
                raise DataError(f"missing column {col!r}", field=col)
        instruction = _string(record["instruction"], "instruction")
        output = _string(record["output"], "output")
        extra = record.get("input")
        extra = "" if extra is None else _string(extra, "input", allow_empty=True)
        user = f"{instruction.strip()}\n\n{extra.strip()}" if extra.strip() else instruction.strip()
        system = record.get("system")
        system = _string(system, "system") if isinstance(system, str) and system.strip() else system_prompt
        msgs = [{"role": "system", "content": system}] if system else []
        return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if fmt == "chat":
        key = "messages" if "messages" in record else "conversations" if "conversations" in record else None
        if key is None or record[key] is None:
            raise DataError("missing column 'messages'", field="messages")
        turns = record[key]
        if isinstance(turns, str):  # CSV cells hold the list as JSON text
            try:
                turns = json.loads(turns)
            except json.JSONDecodeError as e:
                raise DataError(f"not a JSON list of messages ({e.msg})", field=key) from None
        if not isinstance(turns, list) or not turns:
            raise DataError(f"expected a non-empty list of messages, got {_describe(turns)}", field=key)
        msgs = []
        for i, turn in enumerate(turns):
            f = f"{key}[{i}]"
            if not isinstance(turn, dict):
                raise DataError(f"expected an object with role and content, got {type(turn).__name__}", field=f)
            role_key = "role" if "role" in turn else "from" if "from" in turn else None
            content_key = "content" if "content" in turn else "value" if "value" in turn else None
            if role_key is None:
                raise DataError("missing 'role'", field=f)
            if content_key is None:
                raise DataError("missing 'content'", field=f)
            role = turn[role_key]
            if not isinstance(role, str):
                mapped = None
            elif role_key == "role":
                mapped = role if role in ROLES else None
            else:  # ShareGPT
                mapped = SHAREGPT_ROLES.get(role)
            if mapped is None:
                expected = ", ".join(ROLES) if role_key == "role" else "human, gpt, system"
                raise DataError(f"unknown role {role!r} (expected {expected})", field=f"{f}.{role_key}")
            content = _string(turn[content_key], f"{f}.{content_key}", allow_empty=mapped != "assistant")
            msgs.append({"role": mapped, "content": content})
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError("no assistant message: nothing to learn from", field=key)
        if system_prompt and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": system_prompt})
        return msgs
    raise DataError(f"unknown format {fmt!r} (expected alpaca, chat, text or preference)", field="data.format")


def _describe(value: Any) -> str:
    return "an empty list" if value == [] else type(value).__name__


def row_problems(records, fmt: str, system_prompt: str | None = None, source: str | None = None,
                 limit: int = 5) -> tuple[list[list[dict]], list[DataError], int]:
    """(every good row as messages, the first `limit` bad rows' errors located by file and line, how many are bad)."""
    out, errors, bad = [], [], 0
    for i, rec in enumerate(records):
        try:
            out.append(to_messages(rec, fmt, system_prompt))
        except DataError as e:
            bad += 1
            if len(errors) < limit:
                path, line, unit = _where(records, i)
                errors.append(e.at(source or path, line, unit))
    return out, errors, bad


def validate_rows(records, fmt: str, system_prompt: str | None = None, source: str | None = None) -> list[list[dict]]:
    """Every row as messages; the first bad row raises, with the count of the other bad rows."""
    out, errors, bad = row_problems(records, fmt, system_prompt, source, limit=1)
    if errors:
        first = errors[0]
        if bad > 1:
            first = DataError(f"{first.reason} (and {bad - 1} more bad rows)", first.path, first.line, first.field,
                              first.unit)
        raise first
    return out


# --- splitting -------------------------------------------------------------------------------------------------
def split_records(records, data_cfg) -> tuple[Records, Records]:
    """(train, validation): validation_path if set; the demo's held-out file for the demo; else a seeded random
    validation_split fraction (at least one row when the fraction is > 0 and there are 2+ rows). Rows keep their
    file order inside each part."""
    if not isinstance(records, Records):
        records = Records(records)
    if data_cfg.validation_path:
        return records, load_records(data_cfg.validation_path, "validation", "data.validation_path")
    if data_cfg.path == DEMO_DATASET:
        return records, load_records(DEMO_DATASET, "heldout")
    n = len(records)
    if data_cfg.validation_split <= 0 or n < 2:
        return records, Records([], records.source, [], records.unit)
    n_val = min(n - 1, max(1, round(n * data_cfg.validation_split)))
    order = list(range(n))
    random.Random(data_cfg.seed).shuffle(order)
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return records.subset(train), records.subset(val)


# --- rendering and tokenizing ------------------------------------------------------------------------------------
@dataclass
class Rendered:
    """One row tokenized: input_ids, labels, and the character spans of `text` that are trained (for the preview)."""
    text: str
    input_ids: list[int]
    labels: list[int]
    offsets: list[tuple[int, int]] | None
    spans: list[tuple[int, int]]
    length: int  # tokens before truncation


def _chat_text(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _end_marker(tokenizer, tail: str) -> int:
    """Length of `tail` up to and including the first end-of-turn marker in it, or -1 when none."""
    markers = [m for m in (getattr(tokenizer, "eos_token", None), *END_MARKERS) if m]
    hits = [(tail.find(m), m) for m in markers if tail.find(m) >= 0]
    if not hits:
        return -1
    pos, marker = min(hits)
    return pos + len(marker)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]], bool]:
    """The rendered conversation, the character spans to train (each assistant answer + its end-of-turn marker) and
    whether the last answer lacks a marker (then EOS is appended).

    Rendering prefix by prefix finds each answer exactly where the template puts it: the text of messages[:i] with
    the generation prompt ends where answer i starts, and messages[:i+1] ends after its end-of-turn marker."""
    full = _chat_text(tokenizer, messages, False)
    spans, cursor, needs_eos = [], 0, False
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        content = m["content"].strip()
        upto = _chat_text(tokenizer, messages[: i + 1], False)
        prompt = _chat_text(tokenizer, messages[:i], True) if i else ""
        if full.startswith(upto) and upto.startswith(prompt) and len(prompt) >= cursor:
            start = len(prompt)
        else:  # a template that renders differently by prefix: find the answer after the previous one
            start = cursor
        k = full.find(content, start) if content else -1
        if k < 0:
            raise DataError("the chat template does not render this assistant answer verbatim", field=f"messages[{i}]")
        after = k + len(content)
        end_of_turn = len(upto) if upto.startswith(prompt) and full.startswith(upto) else len(full)
        n = _end_marker(tokenizer, full[after:end_of_turn])
        end = after + n if n >= 0 else after
        needs_eos = n < 0
        spans.append((k, end))
        cursor = end
    return full, spans, needs_eos


def render(tokenizer, messages: list[dict], fmt: str) -> Rendered:
    """Tokens and labels of one validated row (before truncation)."""
    eos = tokenizer.eos_token_id
    if fmt == "text":
        text = messages[-1]["content"]
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=bool(getattr(tokenizer, "is_fast", False)))
        ids = list(enc["input_ids"])
        offsets = [tuple(o) for o in enc["offset_mapping"]] if "offset_mapping" in enc else None
        if eos is not None and (not ids or ids[-1] != eos):
            text = _append_eos(tokenizer, text, ids, offsets)
        return Rendered(text, ids, list(ids), offsets, [(0, len(text))], len(ids))
    text, spans, needs_eos = assistant_spans(tokenizer, messages)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        labels = [IGNORE_INDEX] * len(ids)
        for j, (s, e) in enumerate(offsets):
            # a token that starts inside an answer, or whose only part before it is whitespace (" Blue" after
            # "assistant:"): the model has to generate exactly that token after the prompt
            if e > s and any(s < b and e > a and (s >= a or not text[s:a].strip()) for a, b in spans):
                labels[j] = ids[j]
    else:  # slow tokenizers have no offsets: tokenize trained and untrained pieces separately
        ids, labels, offsets, pos = [], [], None, 0
        for a, b in [*spans, (len(text), len(text))]:
            for piece, trained in ((text[pos:a], False), (text[a:b], True)):
                if piece:
                    piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                    ids += piece_ids
                    labels += piece_ids if trained else [IGNORE_INDEX] * len(piece_ids)
            pos = b
    if needs_eos and eos is not None:
        start = len(text)
        text = _append_eos(tokenizer, text, ids, offsets)
        labels.append(eos)
        spans = [*spans, (start, len(text))]
    return Rendered(text, ids, labels, offsets, spans, len(ids))


def _append_eos(tokenizer, text: str, ids: list[int], offsets: list | None) -> str:
    """Append EOS to the tokens (in place) and its text to the rendered text, which is returned."""
    ids.append(tokenizer.eos_token_id)
    eos_text = tokenizer.eos_token or ""
    if offsets is not None:
        offsets.append((len(text), len(text) + len(eos_text)))
    return text + eos_text


# --- the pipeline -------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    train: list[dict]                # {"input_ids": [...], "labels": [...]}
    validation: list[dict]
    validation_records: list[list[dict]]  # validation rows as messages, for generation-based evaluation
    stats: dict = field(default_factory=dict)


def _tokenize(rows: list[list[dict]], fmt: str, tokenizer, max_len: int, records) -> tuple[list[dict], list[int], int, int]:
    examples, lengths, truncated, dropped = [], [], 0, 0
    for i, msgs in enumerate(rows):
        try:
            r = render(tokenizer, msgs, fmt)
        except DataError as e:
            raise e.at(*_where(records, i)) from None
        except Exception as e:  # a template that rejects the conversation (e.g. roles must alternate)
            path, line, unit = _where(records, i)
            raise DataError(f"the chat template rejected it ({type(e).__name__}: {e})", path, line, "messages", unit) from None
        lengths.append(r.length)
        ids, labels = r.input_ids, r.labels
        if len(ids) > max_len:
            truncated += 1
            ids, labels = ids[:max_len], labels[:max_len]
        if all(l == IGNORE_INDEX for l in labels):
            dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    return examples, lengths, truncated, dropped


def histogram(lengths: list[int], max_seq_length: int, bins: int = 10) -> dict:
    """Equal-width bins from 0 to max(longest, max_seq_length): {"edges": [bins+1 ints], "counts": [bins ints]}."""
    top = max([max_seq_length, *lengths]) if lengths else max_seq_length
    width = max(1, -(-top // bins))
    edges = [k * width for k in range(bins + 1)]
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, n // width)] += 1
    return {"edges": edges, "counts": counts}


def length_summary(lengths: list[int]) -> dict:
    if not lengths:
        return {"min": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    s = sorted(lengths)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return {"min": s[0], "mean": round(sum(s) / len(s), 1), "p50": pick(0.5), "p95": pick(0.95), "max": s[-1]}


def fingerprint(train_rows: list[list[dict]], val_rows: list[list[dict]], fmt: str, data_cfg, tokenizer) -> str:
    """sha256 of the normalised rows and every setting that changes the tokens trained on."""
    h = hashlib.sha256()
    settings = {"format": fmt, "max_seq_length": data_cfg.max_seq_length, "system_prompt": data_cfg.system_prompt,
                "chat_template": getattr(tokenizer, "chat_template", None), "eos": getattr(tokenizer, "eos_token", None)}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for name, rows in (("train", train_rows), ("validation", val_rows)):
        h.update(name.encode())
        for msgs in rows:
            h.update(json.dumps(msgs, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def _format(records, data_cfg, source: str) -> str:
    return data_cfg.format if data_cfg.format != "auto" else detect_format(records, source)


def prepare(data_cfg, tokenizer, rewrite=None) -> Prepared:
    """Load, split, validate every row (before any training), tokenize with assistant-only labels, truncate.
    `rewrite` (training rows as messages -> new rows) replaces the training answers before tokenizing."""
    records = load_records(data_cfg.path, data_cfg.split)
    fmt = _format(records, data_cfg, records.source)
    train_recs, val_recs = split_records(records, data_cfg)
    if data_cfg.max_samples is not None and len(train_recs) > data_cfg.max_samples:
        train_recs = train_recs.subset(list(range(data_cfg.max_samples)))
    val_fmt = _format(val_recs, data_cfg, getattr(val_recs, "source", None)) if val_recs else fmt
    train_rows = validate_rows(train_recs, fmt, data_cfg.system_prompt)
    val_rows = validate_rows(val_recs, val_fmt, data_cfg.system_prompt)
    if rewrite is not None:
        train_rows = rewrite(train_rows)

    max_len = data_cfg.max_seq_length
    train, t_len, t_trunc, t_drop = _tokenize(train_rows, fmt, tokenizer, max_len, train_recs)
    validation, v_len, v_trunc, v_drop = _tokenize(val_rows, val_fmt, tokenizer, max_len, val_recs)
    lengths = t_len + v_len
    separate_validation = bool(data_cfg.validation_path) or data_cfg.path == DEMO_DATASET
    stats = {
        "format": fmt,
        "num_rows": len(records) + (len(val_recs) if separate_validation else 0),
        "num_train": len(train),
        "num_validation": len(validation),
        "truncated": t_trunc + v_trunc,
        "dropped": t_drop + v_drop,
        "max_seq_length": max_len,
        "token_lengths": length_summary(lengths),
        "length_histogram": histogram(lengths, max_len),
        "trainable_tokens": sum(sum(1 for l in ex["labels"] if l != IGNORE_INDEX) for ex in train),
        "total_tokens": sum(len(ex["input_ids"]) for ex in train),
        "fingerprint": fingerprint(train_rows, val_rows, fmt, data_cfg, tokenizer),
    }
    # validation rows keep only the kept ones' messages in order (dropped rows have nothing to score)
    return Prepared(train, validation, val_rows, stats)


def collate(examples: list[dict], pad_token_id: int, padding_free: bool = False) -> dict:
    """A batch of tensors.

    padded: input_ids / attention_mask / labels of shape [batch, longest], right padded (labels -100 at pads).
    padding_free: one row [1, total tokens] with position_ids restarting at 0 for each example (HF's
    DataCollatorWithFlattening convention: flash-attention / sdpa varlen kernels read example boundaries from them),
    and label -100 on each example's first token so no example learns to predict from the one before it."""
    import torch

    if not examples:
        raise ValueError("collate: no examples")
    if padding_free:
        ids, pos, labels = [], [], []
        for ex in examples:
            n = len(ex["input_ids"])
            ids += ex["input_ids"]
            pos += range(n)
            labels += [IGNORE_INDEX, *ex["labels"][1:]]
        return {"input_ids": torch.tensor([ids], dtype=torch.long),
                "position_ids": torch.tensor([pos], dtype=torch.long),
                "labels": torch.tensor([labels], dtype=torch.long)}
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[b, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        attention[b, :n] = 1
        labels[b, :n] = torch.tensor(ex["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


# --- the UI's view -------------------------------------------------------------------------------------------------
def preview_segments(r: Rendered, labels: list[int]) -> list[tuple[str, bool]]:
    """The rendered text, up to the truncation point, cut into (text, trained) pieces: exactly the tokens that carry
    a label (from their offsets), or the trained character spans for tokenizers without offsets."""
    if r.offsets is not None:
        pieces, pos = [], 0
        for (s, e), label in zip(r.offsets, labels):
            if e <= pos:
                continue
            s = max(s, pos)
            if s > pos:
                pieces.append((r.text[pos:s], False))
            pieces.append((r.text[s:e], label != IGNORE_INDEX))
            pos = e
        if len(labels) == len(r.input_ids) and pos < len(r.text):  # not truncated: the text after the last token
            pieces.append((r.text[pos:], False))
    else:
        pieces, pos = [], 0
        for a, b in r.spans:
            pieces += [(r.text[pos:a], False), (r.text[a:b], True)]
            pos = b
        pieces.append((r.text[pos:], False))
    out: list[tuple[str, bool]] = []
    for text, trained in pieces:
        if not text:
            continue
        if out and out[-1][1] == trained:
            out[-1] = (out[-1][0] + text, trained)
        else:
            out.append((text, trained))
    return out


def preview(data_cfg, tokenizer, n: int = 5) -> dict:
    """What training will see, HTML-free: the first n rows rendered with trained spans marked, the format, row count,
    token length histogram (of up to MAX_PREVIEW_ROWS rows) and how many of them max_seq_length truncates."""
    records = load_records(data_cfg.path, data_cfg.split)
    fmt = _format(records, data_cfg, records.source)
    sample = records.subset(list(range(min(len(records), MAX_PREVIEW_ROWS))))
    rows = validate_rows(sample, fmt, data_cfg.system_prompt)
    max_len = data_cfg.max_seq_length
    shown, lengths = [], []
    for i, msgs in enumerate(rows):
        try:
            r = render(tokenizer, msgs, fmt)
        except DataError as e:
            raise e.at(*_where(sample, i)) from None
        lengths.append(r.length)
        if i < n:
            labels = r.labels[:max_len]
            trained = sum(1 for l in labels if l != IGNORE_INDEX)
            shown.append({"text": r.text, "segments": preview_segments(r, labels), "num_tokens": r.length,
                          "trained_tokens": trained, "truncated": r.length > max_len})
            if fmt == "preference":  # both sides as DPO trains them: only the last answer carries labels
                from finetune.preference import preview_side

                shown[-1].update(preview_side(tokenizer, sample[i], "chosen", data_cfg))
                shown[-1]["rejected"] = preview_side(tokenizer, sample[i], "rejected", data_cfg)
    return {"format": fmt, "num_rows": len(records), "rows": shown,
            "length_histogram": histogram(lengths, max_len), "token_lengths": length_summary(lengths),
            "truncated": sum(1 for x in lengths if x > max_len), "sampled_rows": len(sample),
            "max_seq_length": max_len, "source": records.source}
