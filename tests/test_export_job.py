"""Export as a job through the real queue: to completion, killed mid-export (nothing half-written is published),
and refused up front when the disk is too small."""
from __future__ import annotations

import os
import signal

import pytest

from conftest import scheduled_store, train_qlora_adapter, wait_for
from finetune.export import exports_dir, list_exports
from finetune.export.job import ExportSpec
from finetune.jobs import JobStore

DEADLINE = 900


@pytest.fixture(scope="module")
def adapter(chat_jsonl) -> str:
    return train_qlora_adapter(chat_jsonl)


@pytest.fixture
def store(studio_home):
    with scheduled_store(studio_home) as s:
        yield s


def finished(store: JobStore, job_id: str) -> dict | None:
    row = store.get(job_id)
    return row if row["state"] in ("completed", "failed", "cancelled") else None


def test_an_export_job_runs_through_the_queue_to_a_published_export(store, adapter):
    job_id = store.submit(ExportSpec(adapter=adapter, format="hf"), kind="export")
    row = wait_for(lambda: finished(store, job_id), DEADLINE, "the export job to finish", interval=0.5)
    info = store.live(job_id)
    assert row["state"] == "completed", (row["error"], info["log_tail"])
    assert info["command"].split()[1:4] == ["-m", "finetune", "export-job"]
    assert "published" in info["log_tail"] and info["step"] == info["total_steps"]
    assert [r for r in list_exports(adapter) if r["format"] == "hf" and r["quant"] == "bf16"]


def _staging_has_files() -> bool:
    return any(p.is_file() for d in exports_dir().glob(".tmp-*") for p in d.rglob("*"))


def test_sigkill_mid_export_fails_the_job_and_publishes_nothing(store, adapter):
    target = exports_dir() / adapter / "gguf-q4_0"
    if target.exists():  # a studio home reused across runs
        import shutil

        shutil.rmtree(target)
    job_id = store.submit(ExportSpec(adapter=adapter, format="gguf", quant="q4_0"), kind="export")
    wait_for(lambda: finished(store, job_id) or _staging_has_files(), DEADLINE, "the export to write files")
    row = store.get(job_id)
    assert row["state"] == "running", row["error"]
    os.killpg(row["pgid"], signal.SIGKILL)
    row = wait_for(lambda: finished(store, job_id), 120, "the killed job to be marked finished")
    assert row["state"] == "failed" and "killed" in row["error"]
    assert not target.exists()
    assert not [r for r in list_exports(adapter) if r["quant"] == "q4_0"]
    assert not list(exports_dir().glob(".tmp-*")), "the killed export's staging folder is swept"


def test_a_disk_too_small_fails_the_job_up_front_with_the_numbers(store, adapter):
    spec = ExportSpec(adapter=adapter, format="gguf", quant="f16", reserve_bytes=2**62)
    before = {(str(p), p.stat().st_mtime_ns) for p in exports_dir().rglob("*")}
    job_id = store.submit(spec, kind="export")
    row = wait_for(lambda: finished(store, job_id), DEADLINE, "the export job to finish", interval=0.5)
    assert row["state"] == "failed" and "not enough free disk" in row["error"] and "MiB free" in row["error"]
    assert {(str(p), p.stat().st_mtime_ns) for p in exports_dir().rglob("*")} == before
