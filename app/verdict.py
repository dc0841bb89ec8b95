"""The Train tab's verdict on a job, all at once: every bad config field, the data's bad rows (finetune.datacheck,
the same check a submit makes) and notes on settings that cannot make sense for the data. Validate shows it; Start
refuses on any error and queues otherwise."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from app import render
from finetune.config import ConfigError, JobConfig
from finetune.errors import StudioError
from finetune.paths import uploads_dir


@dataclass
class Verdict:
    config: JobConfig | None = None
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def split_problems(message: str) -> list[str]:
    """A ConfigError or DataError message ("form: a.b: msg; c.d: msg") as one line per problem."""
    body = message.split(": ", 1)[1] if message.startswith(("form: ", "submitted config: ")) else message
    return [p for p in body.split("; ") if p.strip()]


def _data_section(form, values) -> JobConfig | None:
    try:
        return form.to_config(values, sections=("model", "data"))
    except ConfigError:
        return None  # the bad data fields are already among the config's errors


def forget_rejected_upload(path: str | None) -> None:
    """An uploaded copy whose data was refused is removed from STUDIO_HOME/uploads (no job can use it)."""
    if path and Path(path).parent.resolve() == uploads_dir().resolve():
        Path(path).unlink(missing_ok=True)


def forget_if_unreadable(data_cfg) -> None:
    """After a failed preview: the upload is removed only when a submit would refuse it too (a template that rejects
    a row fails the preview, yet the same file may feed a queued job)."""
    from finetune.data import DataError
    from finetune.datacheck import check_job_data

    try:
        check_job_data(data_cfg)
    except DataError:
        forget_rejected_upload(data_cfg.path)


def judge(form, values, tokenizer_if_loaded=lambda model_cfg: None) -> Verdict:
    """Check the form and the data it names. tokenizer_if_loaded(model_cfg) gives a tokenizer already in memory
    (or None): the length note needs one, and Validate never waits for a model to load."""
    from finetune.data import DataError
    from finetune.datacheck import check_job_data, setting_notes, token_p95

    v = Verdict()
    try:
        v.config = form.to_config(values)
        data_cfg = v.config
    except ConfigError as e:
        v.errors += split_problems(str(e))
        data_cfg = _data_section(form, values)
    facts = None
    if data_cfg is not None:
        try:
            facts = check_job_data(data_cfg.data)
        except (DataError, StudioError) as e:
            v.errors += split_problems(str(e))
            forget_rejected_upload(data_cfg.data.path)
    if v.config is not None and facts is not None:
        tok = tokenizer_if_loaded(v.config.model)
        v.notes = setting_notes(v.config, facts, token_p95(facts, tok) if tok is not None else None)
    return v


def problems_html(errors: list[str], notes: list[str] = (), refused: bool = False) -> str:
    """Every problem in one list, then the notes: shown in place of the previous verdict. refused: Start was
    pressed (and nothing was queued)."""
    out = ""
    if errors:
        items = "".join(f"<li>{render.esc(p)}</li>" for p in errors)
        head = "Not queued: the job has" if refused else "The job has"
        out += f'<div class="msg error"><b>{head} {len(errors)} problem(s):</b><ul>{items}</ul></div>'
    return out + notes_html(notes)


def notes_html(notes: list[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{render.esc(n)}</li>" for n in notes)
    return f'<div class="msg warn"><b>Worth a look before it runs:</b><ul>{items}</ul></div>'
