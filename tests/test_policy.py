"""What a file or a job config can make the engine do: remote code only when the operator allows it, paths confined
to the allowed roots in the studio, imported metadata trusted for nothing, size limits with messages that name the
file, line and field, and a store that never loses an adapter or lets two imports share a name."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import ROOT, adapter_zip, arithmetic_rows, write_jsonl
from finetune import limits, policy
from finetune.store import adapters
from finetune.store.zip_import import ZipImportError, import_zip
from finetune.config import ConfigError, JobConfig, check_name
from finetune.data import DataError, load_records
from finetune.paths import OutsideRootsError, confine, uploads_dir


@pytest.fixture
def studio_policy(monkeypatch):
    """The environment launch.py gives the studio and its training processes (no operator flags)."""
    monkeypatch.setenv("STUDIO_CONFINED", "1")
    for name in ("STUDIO_ALLOW_REMOTE_CODE", "STUDIO_ALLOWED_PATHS", "STUDIO_ALLOW_HUB"):
        monkeypatch.delenv(name, raising=False)


# --- remote code -----------------------------------------------------------------------------------------------
def test_imported_studio_json_cannot_turn_remote_code_on(tmp_path, monkeypatch):
    monkeypatch.delenv("STUDIO_ALLOW_REMOTE_CODE", raising=False)
    meta = {"config": {"model": {"name_or_path": "SmolLM2-135M-Instruct", "trust_remote_code": True}}}
    with pytest.raises(ZipImportError, match=r"config\.model\.trust_remote_code.*--allow-remote-code"):
        import_zip(adapter_zip(tmp_path / "rc.zip", "remote-code", meta))
    assert not adapters.adapter_path("remote-code").exists()


def test_generation_never_trusts_remote_code_from_metadata(monkeypatch):
    """A folder copied into the store by hand (not imported) still cannot switch remote code on for /generate."""
    monkeypatch.delenv("STUDIO_ALLOW_REMOTE_CODE", raising=False)
    from finetune.evaluation.generate import _adapter_info

    folder = adapters.adapters_dir() / "copied-remote"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (folder / "studio.json").write_text(json.dumps({"config": {"model": {"trust_remote_code": True}}}))
    try:
        with pytest.raises(policy.PolicyError, match="model.trust_remote_code"):
            _adapter_info("copied-remote")
        monkeypatch.setenv("STUDIO_ALLOW_REMOTE_CODE", "1")  # the operator's flag, and only it, allows it
        assert _adapter_info("copied-remote")[1].trust_remote_code is True
    finally:
        adapters.delete_adapter("copied-remote")


def _train_cli(job: JobConfig, tmp_path: Path, env_extra: dict) -> tuple[subprocess.CompletedProcess, dict]:
    job_yaml, run_dir = tmp_path / "job.yaml", tmp_path / "run"
    job.save(job_yaml)
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    env.pop("STUDIO_ALLOW_REMOTE_CODE", None)
    env.pop("STUDIO_ALLOWED_PATHS", None)
    proc = subprocess.run([sys.executable, "-m", "finetune", "train", str(job_yaml), "--run-dir", str(run_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc, json.loads((run_dir / "status.json").read_text())


def test_training_process_launched_by_the_studio_enforces_the_policy(tmp_path):
    """The job YAML is client-controlled: the training process re-checks it before loading anything."""
    job = JobConfig(adapter_name="rc-job")
    job.model.trust_remote_code = True
    job.training.max_steps = 1
    proc, status = _train_cli(job, tmp_path, {"STUDIO_CONFINED": "1"})
    assert proc.returncode == 1 and "model.trust_remote_code" in proc.stderr, proc.stderr[-2000:]
    assert status["phase"] == "failed" and "--allow-remote-code" in status["error"]
    outside = write_jsonl(tmp_path / "elsewhere" / "train.jsonl", arithmetic_rows(4))
    job = JobConfig(adapter_name="path-job")
    job.data.path = str(outside)
    proc, status = _train_cli(job, tmp_path, {"STUDIO_CONFINED": "1"})
    assert proc.returncode == 1 and "data.path: not a path this studio may read" in status["error"]


def test_submit_in_the_studio_refuses_remote_code_and_outside_paths(studio_policy, tmp_path):
    from finetune.jobs import JobStore

    store = JobStore(tmp_path / "home")
    job = JobConfig(adapter_name="x")
    job.model.trust_remote_code = True
    with pytest.raises(policy.PolicyError, match="model.trust_remote_code"):
        store.submit(job)
    for field, value in (("model.name_or_path", str(tmp_path)), ("data.path", "/etc/hostname"),
                         ("data.validation_path", str(tmp_path / "v.jsonl")),
                         ("distill.teacher_model_name_or_path", str(tmp_path))):
        data = JobConfig(adapter_name="x").model_dump(mode="json")
        section, key = field.split(".")
        data[section][key] = value
        with pytest.raises(OutsideRootsError, match=field.replace(".", r"\.")):
            store.submit(data)
    assert not list((tmp_path / "home" / "runs").iterdir())  # nothing queued, no run folder


# --- paths -----------------------------------------------------------------------------------------------------
def test_confinement_resolves_symlinks_and_never_tells_existence(studio_policy, tmp_path):
    secret = tmp_path / "secret.jsonl"
    secret.write_text(json.dumps({"text": "TOP-SECRET-CONTENT"}) + "\n")
    link = uploads_dir() / "innocent.jsonl"
    link.unlink(missing_ok=True)
    link.symlink_to(secret)
    try:
        messages = set()
        for path in (secret, tmp_path / "missing.jsonl", link, "../" * 12 + str(secret)):
            with pytest.raises(OutsideRootsError) as e:
                load_records(str(path), field="data_path")
            messages.add(str(e.value))
        assert len(messages) == 1 and "TOP-SECRET" not in messages.pop()
        inside = write_jsonl(uploads_dir() / "ok.jsonl", arithmetic_rows(2))
        assert len(load_records(str(inside))) == 2
    finally:
        link.unlink(missing_ok=True)


def test_operator_roots_widen_the_confinement(studio_policy, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "mine" / "train.jsonl", arithmetic_rows(2))
    with pytest.raises(OutsideRootsError):
        confine(data, "data.path")
    monkeypatch.setenv("STUDIO_ALLOWED_PATHS", str(tmp_path / "mine"))
    assert confine(data, "data.path") == data.resolve()


def test_model_folder_outside_the_roots_and_hub_without_network(studio_policy, tmp_path):
    from finetune.model import resolve_model

    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}))
    with pytest.raises(OutsideRootsError, match="model.name_or_path"):
        resolve_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not download"):
        resolve_model("some-org/not-cached-model-xyz")


# --- imports ---------------------------------------------------------------------------------------------------
def test_import_keeps_only_adapter_files_and_drops_evaluations(tmp_path):
    meta = {"base_model": "SmolLM2-135M-Instruct", "eval": {"win": 999, "loss": 0}}
    forged = json.dumps({"adapter": "forged", "summary": {"win": 999}}).encode()
    z = adapter_zip(tmp_path / "f.zip", "forged", meta, {"eval/0123456789abcdef0123.json": forged,
                                                          "tokenizer.json": b"{}", "notes.txt": b"x" * 1000})
    name = import_zip(z)
    try:
        folder = adapters.adapter_path(name)
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                           "studio.json"]
        assert "eval" not in json.loads((folder / "studio.json").read_text())
        from finetune.evaluation.evaluate import cached_results

        assert cached_results(name) == []
    finally:
        adapters.delete_adapter(name)


def test_oversized_metadata_member_refused(tmp_path):
    big = adapter_zip(tmp_path / "big.zip", "big", extra={"README.md": os.urandom(limits.MAX_ZIP_SMALL_FILE_BYTES + 1)})
    with pytest.raises(ZipImportError, match="README.md.*at most"):
        import_zip(big)


def test_publish_never_replaces_when_told_not_to(tmp_path):
    name = import_zip(adapter_zip(tmp_path / "a.zip", "only-once"))
    stage = adapters.staging_dir(name)
    (stage / "adapter_config.json").write_text("{}")
    with pytest.raises(adapters.AdapterError, match="already exists"):
        adapters.publish(stage, name, replace=False)
    adapters.delete_adapter(name)


def test_parallel_imports_under_one_name_exactly_one_wins(tmp_path):
    zips = [adapter_zip(tmp_path / f"p{i}.zip", "racer", {"n": i}) for i in range(4)]
    results: list = [None] * 4
    start = threading.Barrier(4)

    def run(i):
        start.wait()
        try:
            results[i] = import_zip(zips[i])
        except adapters.AdapterError as e:  # the early check (ZipImportError) or the publish under the lock
            results[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r == "racer"]
    assert len(winners) == 1 and all("already exists" in str(r) for r in results if r != "racer"), results
    adapters.delete_adapter("racer")


def test_a_crash_between_the_publish_renames_loses_nothing(tmp_path):
    name = import_zip(adapter_zip(tmp_path / "c.zip", "survivor"))
    folder = adapters.adapter_path(name)
    # What a kill between "old out of the way" and "new into place" leaves: the old version under .old-, a staging copy.
    os.replace(folder, folder.with_name(f".old-{name}-0badc0de"))
    (adapters.adapters_dir() / f".tmp-{name}-dead").mkdir()
    assert name in [r["name"] for r in adapters.list_adapters()]
    assert (folder / "adapter_model.safetensors").is_file()
    adapters.delete_adapter(name)


@pytest.mark.parametrize("bad", ["name\n", "tab\tname", "cr\r", "nul\0x", "esc\x1b"])
def test_control_characters_refused_in_names(bad, tmp_path):
    with pytest.raises(ValueError):
        check_name(bad)
    with pytest.raises(adapters.AdapterError):
        adapters.adapter_path(bad)
    with pytest.raises(ZipImportError):
        import_zip(adapter_zip(tmp_path / "n.zip"), name=bad)


# --- YAML and configs ------------------------------------------------------------------------------------------
def test_duplicate_yaml_keys_are_refused_with_the_line():
    text = "adapter_name: a\nmodel:\n  trust_remote_code: false\n  quantization: none\n  trust_remote_code: true\n"
    with pytest.raises(ConfigError, match=r"line 5.*duplicate key 'trust_remote_code' \(first given on line 3\)"):
        JobConfig.from_yaml(text, "job.yaml")


def test_deep_nesting_and_huge_configs_are_config_errors():
    for text in ("a: " + "[" * 20000 + "]" * 20000, "a: " + "{b: " * 5000 + "1" + "}" * 5000,
                 "data:\n  path: " + "x" * (limits.MAX_CONFIG_BYTES + 1)):
        with pytest.raises(ConfigError):
            JobConfig.from_yaml(text, "job.yaml")
    with pytest.raises(ConfigError, match=r"data\.system_prompt.*at most 16384"):
        JobConfig.parse({"data": {"system_prompt": "s" * (limits.MAX_CONFIG_STRING + 1)}})
    with pytest.raises(ConfigError, match=r"lora\.target_modules"):
        JobConfig.parse({"lora": {"target_modules": ["q_proj"] * (limits.MAX_CONFIG_LIST + 1)}})


# --- data size limits ------------------------------------------------------------------------------------------
def test_an_oversized_jsonl_line_is_refused_before_parsing(tmp_path):
    p = tmp_path / "long.jsonl"
    rows = arithmetic_rows(2)
    huge = json.dumps({"text": "y" * (limits.MAX_DATA_LINE_CHARS + 10)})
    p.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]) + "\n" + huge + "\n")
    with pytest.raises(DataError, match=rf"long\.jsonl, line 3: the line is \d+ characters long; the limit is"):
        load_records(str(p))


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_an_oversized_field_is_refused_with_file_line_and_field(tmp_path, suffix):
    big = "z" * (limits.MAX_DATA_FIELD_CHARS + 1)
    p = tmp_path / f"big{suffix}"
    if suffix == ".json":
        p.write_text(json.dumps([{"text": "fine"}, {"text": "ok", "messages": [{"role": "user", "content": big}]}]))
        where = r"big\.json, row 2: messages"
    else:
        p.write_text(f"instruction,output\nq,a\nq2,{big}\n")
        where = r"big\.csv, line 3: output"
    with pytest.raises(DataError, match=where + r": a value of \d+ characters; the limit is"):
        load_records(str(p))

