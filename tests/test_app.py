"""The named Gradio API against one real running studio (launch.py in a subprocess), driven with gradio_client as a
user's script would: submit a tiny real training job on SmolLM2, follow it, list / generate / download / evaluate /
delete the adapter, cancel and resume a job, and get clear errors (naming the field) for bad input."""
from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
import yaml

from conftest import arithmetic_rows, wait_for, write_jsonl
from tests.studio_server import ROOT, as_json, free_port, running_studio, studio_env

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

ENDPOINTS = ("/submit_job", "/job_status", "/cancel_job", "/resume_job", "/list_jobs", "/validate_config",
             "/list_adapters", "/download_adapter", "/import_adapter", "/delete_adapter", "/generate", "/evaluate",
             "/export_adapter", "/list_exports", "/submit_sweep", "/sweep_status")
FINISHED = ("completed", "failed", "cancelled")


@pytest.fixture(scope="module")
def studio(tmp_path_factory, data):
    home = tmp_path_factory.mktemp("app-studio")
    # The test data lives outside the studio's own folders: the operator allows that folder.
    with running_studio(home, "--allow-path", str(data[0].parent)) as (url, proc, log):
        client = Client(url, verbose=False)
        yield client, home
        for job in as_json(client.predict(api_name="/list_jobs")):  # leave no training process behind
            if job["state"] in ("queued", "running"):
                client.predict(job["id"], api_name="/cancel_job")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("app-data")
    return write_jsonl(d / "train.jsonl", arithmetic_rows(24, seed=0)), write_jsonl(d / "heldout.jsonl", arithmetic_rows(4, seed=1))


def tiny_job(name: str, train_path, max_steps: int = 3) -> str:
    """A real QLoRA job small enough for 2 CPU cores: 3 steps of 2 rows at 64 tokens, evaluation on 2 examples."""
    cfg = yaml.safe_load(subprocess.run([sys.executable, "-m", "finetune", "config", "--example"], cwd=ROOT,
                                        capture_output=True, text=True, check=True).stdout)
    cfg["adapter_name"] = name
    cfg["data"].update(path=str(train_path), max_seq_length=64)
    cfg["lora"].update(r=4, lora_alpha=8)
    cfg["training"].update(max_steps=max_steps, per_device_train_batch_size=2, save_steps=0)
    cfg["evaluation"].update(enabled=True, max_examples=2, max_new_tokens=8)
    return yaml.safe_dump(cfg)


def wait_state(client, job_id: str, states, timeout: float) -> dict:
    return wait_for(lambda: (st := as_json(client.predict(job_id, api_name="/job_status")))["state"] in states and st,
                    timeout, f"job {job_id} to be {' or '.join(states)}", interval=1)


@pytest.fixture(scope="module")
def trained(studio, data):
    client, _ = studio
    job_id = str(client.predict(tiny_job("api-tiny", data[0]), api_name="/submit_job")).strip()
    st = wait_state(client, job_id, FINISHED, timeout=900)
    assert st["state"] == "completed", st
    return job_id, st


def test_every_named_endpoint_is_listed(studio):
    client, _ = studio
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert set(ENDPOINTS) <= names


def test_validation_errors_name_the_field(studio):
    client, _ = studio
    bad = as_json(client.predict("training:\n  max_steps: 0\nlora:\n  r: -2\n", api_name="/validate_config"))
    assert bad["valid"] is False
    assert "training.max_steps" in bad["error"] and "lora.r" in bad["error"]
    ok = as_json(client.predict("adapter_name: fine\n", api_name="/validate_config"))
    assert ok["valid"] is True and "adapter_name: fine" in ok["config"]
    with pytest.raises(Exception, match="lora.rank.*unknown field|unknown field.*lora.rank|rank"):
        client.predict("lora:\n  rank: 8\n", api_name="/submit_job")
    with pytest.raises(Exception, match="adapter_name"):
        client.predict("adapter_name: ../escape\n", api_name="/submit_job")
    with pytest.raises(Exception, match="not a job id"):
        client.predict("nope", api_name="/job_status")
    with pytest.raises(Exception, match="not in the store"):
        client.predict("no-such-adapter", "hi", 4, api_name="/generate")
    with pytest.raises(Exception, match="adapter name"):
        client.predict("../../etc", api_name="/download_adapter")


def test_training_job_end_to_end(studio, trained, data):
    client, _ = studio
    job_id, st = trained
    assert isinstance(client.predict(job_id, api_name="/job_status"), str)  # JSON text, as documented
    assert st["step"] == st["total_steps"] == 3
    assert isinstance(st["loss"], float) and st["loss"] > 0
    assert st["adapter_name"] == "api-tiny" and st["error"] is None
    assert any(j["id"] == job_id and j["state"] == "completed" for j in as_json(client.predict(api_name="/list_jobs")))

    adapters = as_json(client.predict(api_name="/list_adapters"))
    row = next(a for a in adapters if a["name"] == "api-tiny")
    assert row["base_model"] and row["metrics"]["steps"] == 3 and "path" not in row

    out = client.predict("api-tiny", "What is 2 plus 3?", 8, api_name="/generate")
    assert isinstance(out, str) and out.strip()
    base = client.predict("", "What is 2 plus 3?", 8, api_name="/generate")
    assert isinstance(base, str) and base.strip()

    z = client.predict("api-tiny", api_name="/download_adapter")
    z = z.get("path") if isinstance(z, dict) else z
    names = zipfile.ZipFile(z).namelist()
    assert "api-tiny/adapter_model.safetensors" in names and "api-tiny/adapter_config.json" in names
    assert "api-tiny/studio.json" in names

    ev = as_json(client.predict("api-tiny", str(data[1]), 2, 8, api_name="/evaluate"))
    assert set(ev["metrics"]) == {"base", "adapter"}
    assert "rouge_l" in ev["metrics"]["adapter"] and "rouge_l" in ev["paired"]
    assert len(ev["examples"]) == 2 and ev["data"]["n"] == 2


def test_cancel_and_resume(studio, trained, data):
    client, _ = studio
    job_id = str(client.predict(tiny_job("api-cancel", data[0], max_steps=500), api_name="/submit_job")).strip()
    wait_state(client, job_id, ("running",) + FINISHED, timeout=120)
    st = as_json(client.predict(job_id, api_name="/cancel_job"))
    assert st["state"] == "cancelled"
    with pytest.raises(Exception, match="only a queued or running job"):
        client.predict(job_id, api_name="/cancel_job")
    st = as_json(client.predict(job_id, api_name="/resume_job"))
    assert st["state"] in ("queued", "running")
    st = as_json(client.predict(job_id, api_name="/cancel_job"))
    assert st["state"] == "cancelled"


def test_import_adapter_round_trip_and_zip_slip(studio, trained, tmp_path):
    from gradio_client import handle_file

    client, home = studio
    z = client.predict("api-tiny", api_name="/download_adapter")
    z = z.get("path") if isinstance(z, dict) else z
    assert as_json(client.predict(handle_file(z), "api-tiny-copy", api_name="/import_adapter")) == {"name": "api-tiny-copy"}
    rows = {a["name"]: a for a in as_json(client.predict(api_name="/list_adapters"))}
    assert rows["api-tiny-copy"]["base_model"] == rows["api-tiny"]["base_model"]
    store = home / "adapters"
    assert (store / "api-tiny-copy" / "adapter_model.safetensors").read_bytes() == \
        (store / "api-tiny" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(Exception, match="already exists"):
        client.predict(handle_file(z), "api-tiny-copy", api_name="/import_adapter")

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as out:
        out.writestr("evil/adapter_config.json", "{}")
        out.writestr("evil/adapter_model.safetensors", b"x")
        out.writestr("../../escaped.json", "{}")
    with pytest.raises(Exception, match="zip-slip"):
        client.predict(handle_file(str(evil)), "", api_name="/import_adapter")
    assert not (home / "escaped.json").exists() and not (store / "evil").exists()
    assert "deleted" in client.predict("api-tiny-copy", api_name="/delete_adapter")


def test_delete_adapter(studio, trained):
    client, _ = studio
    assert "deleted" in client.predict("api-tiny", api_name="/delete_adapter")
    assert all(a["name"] != "api-tiny" for a in as_json(client.predict(api_name="/list_adapters")))
    with pytest.raises(Exception, match="not in the store"):
        client.predict("api-tiny", api_name="/download_adapter")


def test_non_loopback_bind_needs_auth(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--host", "0.0.0.0", "--port", str(free_port())],
                       cwd=ROOT, env=studio_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "--auth" in r.stderr and "--insecure" in r.stderr
