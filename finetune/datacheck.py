"""Whether the data a job will read can be trained on, checked before the job is queued.

The Train tab's Validate and Start, /validate_config, /submit_job and `python -m finetune jobs submit` all come here
(submits through the train job kind's prepare step): the same loading and row checks the training process runs
first (finetune/data.py), on every row of the training and held-out data, without a tokenizer. A job is therefore
never queued for data it cannot read. Hub ids are left to the job: reading them may need the network.

    facts = check_job_data(cfg.data)           # raises DataError listing up to five bad rows, by file and line
    notes = setting_notes(cfg, facts, p95)     # settings that cannot make sense for this data
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from finetune import data as D
from finetune.config import DEMO_DATASET

MAX_LISTED = 5        # bad rows named in one message
SAMPLE_FOR_TOKENS = 200  # rows tokenized to estimate the data's p95 length
FAR_BELOW = 2.0       # max_seq_length this many times under the p95 length is worth a warning


@dataclass
class DataFacts:
    source: str
    format: str
    num_train: int
    num_validation: int
    train_rows: list  # messages of the first training rows, for length estimates


def _local(path: str | None) -> bool:
    if not path:
        return False
    return path == DEMO_DATASET or path.startswith("builtin:") or Path(path).expanduser().exists() or \
        not D.looks_like_hub_id(path)


def _rows(records, data_cfg) -> tuple[list, str, list, int]:
    """(every good row as messages, the format, the first bad rows' errors, how many rows are bad)."""
    fmt = data_cfg.format if data_cfg.format != "auto" else D.detect_format(records, getattr(records, "source", None))
    rows, errors, bad = D.row_problems(records, fmt, data_cfg.system_prompt, limit=MAX_LISTED)
    return rows, fmt, errors, bad


def check_job_data(data_cfg) -> DataFacts | None:
    """Facts about the data (rows for training and validation), or None for a hub dataset that is not read here.
    Raises DataError naming the file, line and field of each bad row (up to MAX_LISTED of them)."""
    if not _local(data_cfg.path) or (data_cfg.validation_path and not _local(data_cfg.validation_path)):
        return None
    records = D.load_records(data_cfg.path, data_cfg.split)
    train, val = D.split_records(records, data_cfg)
    if data_cfg.max_samples is not None and len(train) > data_cfg.max_samples:
        train = train.subset(list(range(data_cfg.max_samples)))
    train_rows, fmt, errors, bad = _rows(train, data_cfg)
    if len(val):
        _, _, val_errors, val_bad = _rows(val, data_cfg)
        errors, bad = errors + val_errors, bad + val_bad
    if errors:
        errors = sorted(errors, key=lambda e: (str(e.path), e.line or 0))[:MAX_LISTED]
        more = f" (and {bad - len(errors)} more bad rows)" if bad > len(errors) else ""
        problem = D.DataError("; ".join(str(e) for e in errors) + more)
        problem.path = errors[0].path
        raise problem
    return DataFacts(records.source, fmt, len(train_rows), len(val), train_rows[:SAMPLE_FOR_TOKENS])


def token_p95(facts: DataFacts, tokenizer) -> int | None:
    """The p95 token length of the first training rows, rendered as training renders them."""
    lengths = []
    for msgs in facts.train_rows:
        try:
            lengths.append(D.render(tokenizer, msgs, facts.format).length)
        except Exception:  # noqa: BLE001 - a row the template rejects is the job's error to report, not a length
            continue
    return D.length_summary(lengths)["p95"] if lengths else None


def setting_notes(cfg, facts: DataFacts | None, p95: int | None = None) -> list[str]:
    """Plain sentences about settings that cannot make sense for this data (information, not errors)."""
    if facts is None:
        return []
    t, notes = cfg.training, []
    if t.per_device_train_batch_size > facts.num_train:
        notes.append(f"training.per_device_train_batch_size {t.per_device_train_batch_size} is larger than the "
                     f"{facts.num_train} training rows: a batch can hold at most {facts.num_train}")
    per_step = min(t.per_device_train_batch_size, max(1, facts.num_train)) * t.gradient_accumulation_steps
    epoch_steps = max(1, math.ceil(facts.num_train / per_step))
    if t.max_steps > 0 and t.max_steps < epoch_steps:
        seen = min(facts.num_train, t.max_steps * per_step)
        notes.append(f"training.max_steps {t.max_steps} is fewer than one epoch ({epoch_steps} steps of {per_step} "
                     f"rows): the job sees {seen} of the {facts.num_train} training rows")
    if p95 and p95 > FAR_BELOW * cfg.data.max_seq_length:
        notes.append(f"data.max_seq_length {cfg.data.max_seq_length} is far below the data's p95 length of {p95} "
                     f"tokens: most rows will be cut")
    return notes
