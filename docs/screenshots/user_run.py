"""The README's first screenshots: a real short run on a user's own CSV (examples/capitals.csv) uploaded in the Train
tab, validated, started and watched to the end in the Jobs tab, in Debian's Chromium.

    PYTHONPATH=. .venv/bin/python docs/screenshots/user_run.py      (a few minutes on a CPU)
"""
from __future__ import annotations

import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from studio_server import running_studio  # noqa: E402

SHOTS = ROOT / "docs" / "screenshots"


def fill(pg, elem_id: str, value) -> None:
    box = pg.locator(f"#{elem_id}").locator("input, textarea").first
    box.fill(str(value))
    box.press("Tab")


def train_form(pg) -> None:
    pg.get_by_label("Upload a file").check()
    pg.locator("#dataset-upload input[type=file]").set_input_files(str(ROOT / "examples" / "capitals.csv"))
    pg.wait_for_selector("#preview-rows .preview-row", timeout=600_000)
    fill(pg, "field-adapter_name", "capitals")
    pg.locator("#field-model-quantization input").click()
    pg.get_by_role("option", name=re.compile("^none")).first.click()
    for elem_id, value in (("field-training-max_steps", 6), ("field-training-per_device_train_batch_size", 4),
                           ("field-data-max_seq_length", 64), ("field-evaluation-max_examples", 4),
                           ("field-evaluation-max_new_tokens", 16)):
        fill(pg, elem_id, value)
    pg.click("#validate-btn")
    pg.wait_for_selector("#train-message .msg.ok")
    pg.wait_for_timeout(800)
    pg.screenshot(path=str(SHOTS / "train-user-data.png"), full_page=True)


def main() -> None:
    from playwright.sync_api import sync_playwright

    home = Path(tempfile.mkdtemp(prefix="studio-shots-"))
    with running_studio(home) as (url, proc, log), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox", "--disable-gpu"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(120_000)
        pg.goto(url)
        pg.wait_for_selector("#main-tabs")
        train_form(pg)
        pg.click("#start-btn")
        state = pg.locator("#job-progress .job-progress")
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline and state.get_attribute("data-state") not in ("completed", "failed"):
            time.sleep(3)
        pg.wait_for_timeout(2500)
        pg.screenshot(path=str(SHOTS / "jobs-user-data.png"), full_page=True)
        print("job", state.get_attribute("data-state"), "; screenshots in", SHOTS)
        browser.close()


if __name__ == "__main__":
    main()
