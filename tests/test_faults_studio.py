"""Fault injection on the running studio, through its named API as a user's script would:
- the studio is SIGKILLed mid-run and started again: the job is re-attached and completes;
- 20 concurrent playground requests: all answered, none lost, the studio's memory stays bounded (one model);
- path traversal in names and downloads: every attempt refused, nothing outside the store read or written."""
from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from conftest import arithmetic_rows, wait_for, write_jsonl
from tests.studio_server import as_json, free_port, running_studio

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

from finetune.config import example_config  # noqa: E402


def rss_mb(pid: int) -> float:
    """Resident memory of the studio process and its children (the model lives in the studio process)."""
    total = 0.0
    for p in [pid] + [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except FileNotFoundError:
            pass
    return total


def status(client, job_id: str) -> dict:
    return as_json(client.predict(job_id, api_name="/job_status"))


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fault-studio")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("fault-data") / "train.jsonl", arithmetic_rows(32))


def job_yaml(name: str, data: Path, steps: int) -> str:
    cfg = example_config().model_dump(mode="json")
    cfg["adapter_name"] = name
    cfg["model"]["quantization"] = "none"
    cfg["data"].update(path=str(data), max_seq_length=64, validation_split=0.0)
    cfg["training"].update(max_steps=steps, per_device_train_batch_size=2, gradient_checkpointing=False, save_steps=2)
    cfg["evaluation"]["enabled"] = False
    return yaml.safe_dump(cfg)


def test_studio_killed_mid_run_reattaches_job(home, train_file):
    port = free_port()
    with running_studio(home, "--allow-path", str(train_file.parent), port=port) as (url, proc, _):
        client = Client(url, verbose=False)
        job = str(client.predict(job_yaml("survivor", train_file, 10), api_name="/submit_job")).strip()
        wait_for(lambda: status(client, job).get("step", 0) >= 1, 300, "training to make progress")
        os.kill(proc.pid, signal.SIGKILL)  # the studio dies; training runs in its own session and goes on
        proc.wait(timeout=10)
    st_dir = home / "runs" / job
    assert (st_dir / "status.json").exists()
    with running_studio(home, "--allow-path", str(train_file.parent), port=port) as (url, proc, _):
        client = Client(url, verbose=False)
        first = status(client, job)
        assert first["state"] in ("running", "completed"), first  # re-attached, not failed
        final = wait_for(lambda: (s := status(client, job))["state"] in ("completed", "failed", "cancelled") and s,
                         300, "the re-attached job to finish")
        assert final["state"] == "completed", final
        assert final["step"] == final["total_steps"] == 10
        names = [a["name"] for a in as_json(client.predict(api_name="/list_adapters"))]
        assert "survivor" in names


def test_twenty_concurrent_playground_requests(home):
    with running_studio(home) as (url, proc, _):
        Client(url, verbose=False).predict("", "Say hi.", 2, api_name="/generate")  # load the model once
        before = rss_mb(proc.pid)
        peak = [before]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mb(proc.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        prompts = [f"What is {i} plus {i + 1}?" for i in range(20)]

        def ask(p):
            return Client(url, verbose=False).predict("", p, 8, api_name="/generate")

        t0 = time.monotonic()
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(ask, prompts))
        stop.set()
        sampler.join()
        elapsed = time.monotonic() - t0
        assert len(answers) == 20 and all(str(a).strip() for a in answers), answers
        print(f"\n20 concurrent /generate: {elapsed:.1f} s, studio RSS {before:.0f} -> peak {peak[0]:.0f} MB")
        # The model is shared behind a concurrency limit of 1: 20 users must not mean 20 copies (~0.5 GB each).
        assert peak[0] - before < 1024, (before, peak[0])


TRAVERSALS = ["../../etc/passwd", "/etc/passwd", "..", "../adapters", "a/../../b", "x\x00y", "~root", "..\\..\\x"]


def test_path_traversal_refused_everywhere(home, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    with running_studio(home) as (url, proc, _):
        client = Client(url, verbose=False)
        refused = 0
        for evil in TRAVERSALS + [str(outside)]:
            for api, args in (("/download_adapter", (evil,)), ("/delete_adapter", (evil,)),
                              ("/generate", (evil, "hi", 2))):
                with pytest.raises(Exception) as e:
                    client.predict(*args, api_name=api)
                assert "Traceback" not in str(e.value)
                refused += 1
            bad = yaml.safe_load(job_yaml("ok", outside, 1))
            bad["adapter_name"] = evil
            with pytest.raises(Exception, match="adapter_name"):
                client.predict(yaml.safe_dump(bad), api_name="/submit_job")
            refused += 1
        assert refused == 4 * (len(TRAVERSALS) + 1)
        assert outside.read_text() == "secret"
        assert not any(p.name in ("passwd", "b", "x") for p in (home / "adapters").glob("*"))
