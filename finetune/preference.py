"""Preference pairs for DPO: one prompt, a chosen and a rejected answer, rendered through the chat template with
labels on the answer only.

Row shapes (detected as data.format "preference"):
  {"prompt": "...", "chosen": "...", "rejected": "..."}                  plain strings (an optional "system")
  {"prompt": [messages], "chosen": [assistant message], "rejected": [...]}  TRL's conversational shape
  {"chosen": [full conversation], "rejected": [full conversation]}        the last assistant turn differs, the
                                                                          turns before it are the shared prompt
"""
from __future__ import annotations

from dataclasses import dataclass

from finetune import data as D
from finetune.data import DataError

SIDES = ("chosen", "rejected")


@dataclass
class Pair:
    prompt: list[dict]  # the conversation up to the answer
    chosen: str
    rejected: str

    def conversation(self, side: str) -> list[dict]:
        return [*self.prompt, {"role": "assistant", "content": getattr(self, side)}]


def _prompt_only(value) -> list[dict]:
    # A prompt has no assistant turn; borrow the chat validation by appending a placeholder answer.
    msgs = D.to_messages({"messages": [*value, {"role": "assistant", "content": "-"}]}, "chat")
    return msgs[:-1]


def _answer(value, side: str) -> tuple[list[dict], str]:
    """(turns before the answer, answer text) of a chosen/rejected value: a string, or messages ending with an
    assistant turn."""
    if isinstance(value, str):
        return [], D._string(value, side)
    if not isinstance(value, list) or not value:
        raise DataError(f"expected a string or a non-empty list of messages, got {type(value).__name__}", field=side)
    try:
        msgs = D.to_messages({"messages": value}, "chat")
    except DataError as e:
        raise DataError(e.reason, field=f"{side}.{e.field}" if e.field else side) from None
    if msgs[-1]["role"] != "assistant":
        raise DataError("the last message must be the assistant's answer", field=side)
    return msgs[:-1], msgs[-1]["content"]


def _prompt(record: dict, system_prompt: str | None) -> list[dict]:
    value = record.get("prompt")
    if value is None:
        return []
    if isinstance(value, str):
        msgs = [{"role": "user", "content": D._string(value, "prompt")}]
    elif isinstance(value, list):
        try:
            msgs = _prompt_only(value)
        except DataError as e:
            raise DataError(e.reason, field=f"prompt.{e.field}" if e.field else "prompt") from None
    else:
        raise DataError(f"expected a string or a list of messages, got {type(value).__name__}", field="prompt")
    system = record.get("system")
    if isinstance(system, str) and system.strip() and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def to_pair(record: dict, system_prompt: str | None = None) -> Pair:
    """One preference row, validated; a DataError names the field (the caller adds file and line)."""
    if not isinstance(record, dict):
        raise DataError(f"a row must be an object, got {type(record).__name__}")
    for side in SIDES:
        if record.get(side) is None:
            raise DataError(f"missing column {side!r} (a preference row has prompt, chosen and rejected)", field=side)
    prompt = _prompt(record, system_prompt)
    (c_before, chosen), (r_before, rejected) = (_answer(record[s], s) for s in SIDES)
    if c_before != r_before:
        raise DataError("chosen and rejected must share the turns before their last answer", field="rejected")
    prompt = prompt + c_before
    if not any(m["role"] == "user" for m in prompt):
        raise DataError("no prompt: give 'prompt', or conversations whose turns before the answer hold the user's "
                        "message", field="prompt")
    if system_prompt and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": system_prompt})
    return Pair(prompt, chosen, rejected)


def validate_pairs(records, system_prompt: str | None = None) -> list[Pair]:
    """Every row as a Pair; the first bad row raises with its file and line."""
    out = []
    for i, rec in enumerate(records):
        try:
            out.append(to_pair(rec, system_prompt))
        except DataError as e:
            raise e.at(*D._where(records, i)) from None
    return out


def _rendered(tokenizer, pair: Pair, side: str) -> tuple[D.Rendered, list[int]]:
    """prompt + one answer rendered, and its labels: the answer (and its end-of-turn token) only."""
    r = D.render(tokenizer, pair.conversation(side), "chat")
    labels = list(r.labels)
    if r.offsets is not None:  # earlier assistant turns belong to the prompt: only the last answer is scored
        prompt_len = len(tokenizer.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True))
        for j, (start, _) in enumerate(r.offsets):
            if start < prompt_len:
                labels[j] = D.IGNORE_INDEX
    return r, labels


def tokenize_side(tokenizer, pair: Pair, side: str, max_len: int) -> dict | None:
    """input_ids and labels of prompt + one answer; None when truncation leaves no answer token."""
    r, labels = _rendered(tokenizer, pair, side)
    ids, labels = r.input_ids[:max_len], labels[:max_len]
    if all(l == D.IGNORE_INDEX for l in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def preview_side(tokenizer, record: dict, side: str, data_cfg) -> dict:
    """One side of a pair as the dataset preview shows it: segments (text, trained) and token counts."""
    r, labels = _rendered(tokenizer, to_pair(record, data_cfg.system_prompt), side)
    labels = labels[:data_cfg.max_seq_length]
    return {"segments": D.preview_segments(r, labels), "num_tokens": r.length,
            "trained_tokens": sum(1 for l in labels if l != D.IGNORE_INDEX),
            "truncated": r.length > data_cfg.max_seq_length}


def tokenize_pairs(tokenizer, pairs: list[Pair], max_len: int) -> tuple[list[dict], int]:
    """[{"chosen": example, "rejected": example}] and how many pairs truncation dropped."""
    out, dropped = [], 0
    for pair in pairs:
        sides = {s: tokenize_side(tokenizer, pair, s, max_len) for s in SIDES}
        if None in sides.values():
            dropped += 1
            continue
        out.append(sides)
    return out, dropped


def prepare(data_cfg, tokenizer) -> D.Prepared:
    """Load, split, validate every pair (before training) and tokenize both sides."""
    records = D.load_records(data_cfg.path, data_cfg.split)
    train_recs, val_recs = D.split_records(records, data_cfg)
    if data_cfg.max_samples is not None and len(train_recs) > data_cfg.max_samples:
        train_recs = train_recs.subset(list(range(data_cfg.max_samples)))
    train_pairs = validate_pairs(train_recs, data_cfg.system_prompt)
    val_pairs = validate_pairs(val_recs, data_cfg.system_prompt)
    train, t_drop = tokenize_pairs(tokenizer, train_pairs, data_cfg.max_seq_length)
    validation, v_drop = tokenize_pairs(tokenizer, val_pairs, data_cfg.max_seq_length)
    rows = lambda pairs: [p.conversation("chosen") for p in pairs]  # noqa: E731
    stats = {"format": "preference", "num_rows": len(records), "num_train": len(train),
             "num_validation": len(validation), "dropped": t_drop + v_drop, "max_seq_length": data_cfg.max_seq_length,
             "fingerprint": D.fingerprint([[*p.conversation("chosen"), {"role": "rejected", "content": p.rejected}]
                                           for p in train_pairs], rows(val_pairs), "preference", data_cfg, tokenizer)}
    return D.Prepared(train, validation, rows(val_pairs), stats)
