"""Data a job cannot read is refused when the job is validated or queued (store, API's engine call, CLI), with the
file, line and field of every bad row named; settings that cannot make sense for the data are noted; a queued job
says its place; an adapter name a queued job will publish is not given to a second job."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, tiny_config, write_jsonl
from finetune.config import ConfigError
from finetune.data import DataError
from finetune.datacheck import check_job_data, setting_notes
from finetune.jobs import JobStore

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))


def bad_files(d: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the message must say)."""
    files = {
        "quote": ("q.csv", 'instruction,output\nfine,ok\n"never closed,x\nlast,row\n', "line 3"),
        "binary": ("image.jsonl", PNG, "not UTF-8"),
        "empty": ("empty.jsonl", "", "empty"),
        "missing": ("rows.csv", "instruction,output\na,b\nc,\n,e\n", "line 3: output"),
    }
    out = {}
    for name, (fname, body, says) in files.items():
        p = d / fname
        p.write_bytes(body) if isinstance(body, bytes) else p.write_text(body)
        out[name] = (p, says)
    return out


def test_bad_data_is_refused_naming_file_line_and_field(tmp_path, chat_jsonl):
    for name, (path, says) in bad_files(tmp_path).items():
        cfg = tiny_config(path, f"bad-{name}")
        with pytest.raises(DataError) as e:
            check_job_data(cfg.data)
        assert str(path) in str(e.value) and says in str(e.value), (name, str(e.value))
    e = pytest.raises(DataError, check_job_data, tiny_config(bad_files(tmp_path)["missing"][0], "m").data).value
    assert "line 4: instruction" in str(e), "every bad row is listed, not only the first"


def test_no_job_is_queued_for_unreadable_data(tmp_path, chat_jsonl):
    store = JobStore(tmp_path / "studio", reconcile=False)
    for name, (path, says) in bad_files(tmp_path).items():
        with pytest.raises(DataError, match=says):
            store.submit(tiny_config(path, f"bad-{name}"))
    assert store.list_jobs() == []
    env = dict(os.environ, STUDIO_HOME=str(tmp_path / "studio"), PYTHONPATH=str(ROOT))
    job = tmp_path / "job.yaml"
    tiny_config(bad_files(tmp_path)["quote"][0], "cli-bad").save(job)
    cli = subprocess.run([sys.executable, "-m", "finetune", "jobs", "submit", str(job)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2 and "q.csv, line 3" in cli.stderr and "Traceback" not in cli.stderr, cli.stderr
    assert store.list_jobs() == []


def test_notes_on_settings_that_cannot_fit_the_data(chat_jsonl):
    cfg = tiny_config(chat_jsonl, "notes", steps=3)
    cfg.training.per_device_train_batch_size = 100000
    facts = check_job_data(cfg.data)
    assert facts.num_train == 48
    notes = " ".join(setting_notes(cfg, facts, p95=400))
    assert "larger than the 48 training rows" in notes
    assert "far below the data's p95 length of 400" in notes
    cfg.training.per_device_train_batch_size = 2
    notes = " ".join(setting_notes(cfg, facts))
    assert "fewer than one epoch (24 steps of 2 rows)" in notes and "sees 6 of the 48" in notes
    cfg.training.max_steps = 24
    assert setting_notes(cfg, facts) == []


def test_queue_place_and_adapter_names_taken(tmp_path, chat_jsonl):
    store = JobStore(tmp_path / "studio", reconcile=False, max_concurrent=1)
    first = store.submit(tiny_config(chat_jsonl, "first"))
    second = store.submit(tiny_config(chat_jsonl, "second"))
    assert store.live(first)["queue_position"] == 1 and store.live(second)["queue_position"] == 2
    assert first in store.live(second)["waiting_for"]
    table = {v["id"]: v for v in store.views()}
    assert table[second]["queue_position"] == 2 and table[second]["adapter_name"] == "second"
    with pytest.raises(ConfigError, match=f"adapter_name: job {first} \\(queued\\) will publish"):
        store.submit(tiny_config(chat_jsonl, "first"))
    store.cancel(first)
    assert store.submit(tiny_config(chat_jsonl, "first"))  # free again once that job will not publish it
    assert store.live(second)["queue_position"] == 1
