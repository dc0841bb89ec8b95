"""A newcomer's careless inputs in Chromium (Debian's, driven by Playwright): data the job could not read and
several bad numbers at once are refused at Validate and at Start with every problem listed in place, nothing is
queued, and a rejected upload is not kept; settings that cannot fit the data are noted. Two reloads keep the Jobs
tab and the selected job, and a queued job shows its place. The studio runs without a scheduler: no job trains."""
from __future__ import annotations

import shutil

import pytest

from conftest import tiny_config, wait_for
from test_datacheck import bad_files
from tests.studio_server import running_studio
from tests.browser_env import ARGS, CHROMIUM, SHOTS, sync_api

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    home, data = tmp_path_factory.mktemp("walk-studio"), tmp_path_factory.mktemp("walk-data")
    with running_studio(home, "--no-scheduler", "--allow-path", str(data)) as (url, proc, log):
        yield url, home, data


@pytest.fixture(scope="module")
def page(studio):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(60_000)
        pg.goto(studio[0])
        pg.wait_for_selector("#main-tabs")
        yield pg
        browser.close()


def field(pg, elem_id: str):
    return pg.locator(f"#{elem_id}").locator("input, textarea").first


def set_value(pg, elem_id: str, value) -> None:
    box = field(pg, elem_id)
    box.fill(str(value))
    box.press("Tab")


def verdict(pg, button: str) -> str:
    """Press Validate or Start and return the verdict that replaces the previous one."""
    msg = pg.locator("#train-message .msg")
    before = msg.all_inner_texts()
    pg.click(button)
    return wait_for(lambda: msg.count() and msg.all_inner_texts() != before and "\n".join(msg.all_inner_texts()), 120,
                    f"the verdict of {button}")


def test_bad_inputs_are_refused_at_validate_and_start(page, studio, chat_jsonl):
    from finetune.jobs import JobStore
    pg, (url, home, data) = page, studio
    files = bad_files(data)
    pg.get_by_label("Upload a file").check()
    pg.locator("#dataset-upload input[type=file]").set_input_files(str(files["quote"][0]))
    wait_for(lambda: "line 3" in pg.locator("#preview-summary").inner_text(), 180, "the preview's refusal")
    set_value(pg, "field-training-learning_rate", -0.001)
    set_value(pg, "field-lora-r", 0)
    set_value(pg, "field-training-per_device_train_batch_size", 100000)
    for button in ("#validate-btn", "#start-btn"):
        text = verdict(pg, button)
        for says in ("uploads/q-", ".csv, line 3", "lora.r", "training.learning_rate"):
            assert says in text, (button, text)
        assert not pg.locator("#train-message .msg.ok").count(), "a stale verdict beside the errors"
    pg.locator("#train-message").screenshot(path=str(SHOTS / "train-problems.png"))
    assert not list((home / "uploads").glob("q-*.csv")), "a rejected upload was kept"
    set_value(pg, "field-training-learning_rate", 0.0002)
    set_value(pg, "field-lora-r", 8)
    pg.get_by_label("Path or hub id").check()
    for name, (path, says) in files.items():
        set_value(pg, "dataset-path", str(path))
        for button in ("#validate-btn", "#start-btn"):
            text = verdict(pg, button)
            assert path.name in text and says in text, (name, button, text)
    assert JobStore(home, reconcile=False).list_jobs() == [], "a job was queued for data that cannot be read"
    good = data / "good.jsonl"
    shutil.copy(chat_jsonl, good)
    set_value(pg, "dataset-path", str(good))
    text = verdict(pg, "#validate-btn")
    assert "Valid" in text and "larger than the" in text and "training rows" in text, text


def test_reloads_keep_the_jobs_tab_and_the_queued_job(page, studio, chat_jsonl):
    from finetune.jobs import JobStore
    pg, (url, home, data) = page, studio
    store = JobStore(home, reconcile=False)
    first, second = (store.submit(tiny_config(chat_jsonl, name)) for name in ("walk-first", "walk-second"))
    pg.get_by_role("tab", name="Jobs", exact=True).click()
    field(pg, "job-select").click()
    pg.get_by_role("option", name=second).first.click()
    wait_for(lambda: f"job={second}" in pg.url and "tab=jobs" in pg.url, 30, "the tab and job in the address")
    for _ in range(2):
        pg.reload()
        pg.wait_for_selector("#main-tabs")
        wait_for(lambda: "place 2 in the queue" in pg.locator("#job-progress").inner_text(), 60,
                 "the selected queued job after a reload")
        assert pg.locator("#job-progress").is_visible() and not pg.locator("#validate-btn").is_visible()
        assert first in pg.locator("#job-progress").inner_text()  # what it waits for: the job before it
        assert "walk-second" in pg.locator("#jobs-table").inner_text()
    pg.screenshot(path=str(SHOTS / "jobs-queued.png"), clip={"x": 0, "y": 0, "width": 1400, "height": 640})
