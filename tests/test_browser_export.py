"""Export from the Adapters tab in Debian's Chromium (Playwright): pick an adapter, choose GGUF q8_0, start the
export job, watch it finish and download the GGUF file through its link."""
from __future__ import annotations

import shutil

import pytest

from conftest import train_qlora_adapter, wait_for
from finetune.paths import adapters_dir
from tests.studio_server import running_studio
from tests.browser_env import ARGS, CHROMIUM, SHOTS, sync_api

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def studio(tmp_path_factory, chat_jsonl):
    home = tmp_path_factory.mktemp("export-studio")
    name = train_qlora_adapter(chat_jsonl)
    shutil.copytree(adapters_dir() / name, home / "adapters" / name)
    with running_studio(home) as (url, proc, log):
        yield url, home, name
        from finetune.jobs import JobStore

        store = JobStore(home, reconcile=False)
        for job in store.list_jobs(states=("queued", "running")):
            store.cancel(job["id"], grace_s=5)


def test_export_gguf_from_the_adapters_tab_and_download_it(studio, tmp_path):
    url, home, name = studio
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True).new_page()
        page.set_default_timeout(60_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.get_by_role("tab", name="Adapters", exact=True).click()
        box = page.locator("#adapter-select").locator("input").first
        box.click()
        page.get_by_role("option", name=name, exact=True).click()
        page.get_by_role("tab", name="Export", exact=True).click()
        page.get_by_label("GGUF (llama.cpp, Ollama)").check()
        assert page.locator("#export-quant input").first.input_value() == "q8_0"
        page.locator("#export-start").click()
        page.wait_for_selector("#export-job-state")
        link = page.locator(f'#export-files a[download="{name}-q8_0.gguf"]')
        wait_for(lambda: link.count() > 0 or "failed" in page.locator("#export-state").inner_text(), 900,
                 "the export's download link", interval=2)
        assert "completed" in page.locator("#export-state").inner_text()
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "export.png"), full_page=True)
        with page.expect_download() as dl:
            link.first.click()
        saved = tmp_path / "model.gguf"
        dl.value.save_as(saved)
        published = home / "exports" / name / "gguf-q8_0" / f"{name}-q8_0.gguf"
        assert saved.read_bytes()[:4] == b"GGUF" and saved.stat().st_size == published.stat().st_size
        browser.close()
        assert not errors, errors


def test_export_adapter_endpoint_queues_a_job_and_refuses_bad_requests(studio):
    import json

    from gradio_client import Client

    url, home, name = studio
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="quant 'q3_k' is not available for format gguf"):
        client.predict(name, "gguf", "q3_k", api_name="/export_adapter")
    with pytest.raises(Exception, match="not in the store"):
        client.predict("no-such-adapter", "hf", "", api_name="/export_adapter")
    job_id = json.loads(client.predict(name, "gguf", "f16", api_name="/export_adapter"))["job_id"]
    status = wait_for(lambda: (s := json.loads(client.predict(job_id, api_name="/job_status")))["state"]
                      in ("completed", "failed") and s, 900, "the export job", interval=2)
    assert status["state"] == "completed", status
    rows = json.loads(client.predict(name, api_name="/list_exports"))
    row = next(r for r in rows if r["format"] == "gguf" and r["quant"] == "f16")
    assert any(f["path"] == f"{name}-f16.gguf" and len(f["sha256"]) == 64 for f in row["files"])
    assert "path" not in row  # server paths stay on the server
