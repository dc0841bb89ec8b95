"""The Sweep panel in Debian's Chromium: a sweep queued through /submit_sweep shows its trials live (state, objective,
best so far) in the Train tab's accordion, and "Train the best config" queues the best trial's job."""
from __future__ import annotations


import pytest
import yaml
from gradio_client import Client

from conftest import arithmetic_rows, tiny_config, wait_for, write_jsonl
from tests.browser_env import ARGS, CHROMIUM, SHOTS, sync_api
from test_sweep import sweep_status
from tests.studio_server import running_studio

pytestmark = pytest.mark.browser


@pytest.mark.timeout(2400)  # one real trial on a shared 2-core machine, then the browser
def test_sweep_panel_shows_trials_and_trains_the_best(tmp_path):
    data = write_jsonl(tmp_path / "data" / "train.jsonl", arithmetic_rows(24))
    base = tiny_config(data, "ui", steps=2, eval_steps=1)
    base.data.validation_split = 0.25
    spec = {"name": "ui", "base": base.model_dump(mode="json"), "n_trials": 1, "pruner": "none",
            "space": {"learning_rate": {"low": 1e-4, "high": 1e-3}}}
    home = tmp_path / "home"
    with running_studio(home, "--allow-path", str(data.parent)) as (url, proc, _):
        client = Client(url, verbose=False)
        job = str(client.predict(yaml.safe_dump(spec), api_name="/submit_sweep")).strip()
        wait_for(lambda: sweep_status(client, job)["job"]["state"] == "completed", 1200, "the one-trial sweep to finish")
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url)
            page.locator("#sweep-accordion").get_by_text("Hyper-parameter sweep").click()
            # opening the panel lists the sweeps and selects the newest: this one
            page.wait_for_selector("#sweep-summary .sweep-summary[data-state='completed']")
            summary = page.locator("#sweep-summary").inner_text()
            assert "Best so far: trial 0" in summary and "1 of 1 trials finished" in summary, summary
            table = page.locator("#sweep-trials").inner_text()
            assert "completed" in table and "★" in table and "learning_rate=" in table
            page.locator("#sweep-trials").scroll_into_view_if_needed()
            page.screenshot(path=str(SHOTS / "sweep.png"), full_page=False)
            page.locator("#sweep-train-best-btn").click()
            page.wait_for_selector("#sweep-message .msg.ok")
            browser.close()
        from finetune.jobs.store import JobStore

        store = JobStore(home, reconcile=False)
        best = [r for r in store.list_jobs() if r["name"] == "ui-best"]
        assert len(best) == 1 and best[0]["kind"] == "train"
        if best[0]["state"] in ("queued", "running"):
            store.cancel(best[0]["id"], grace_s=5)
