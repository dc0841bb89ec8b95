"""The Train form's objective in real Chromium: choosing dpo or distill shows that objective's own fields (and hides
the other's), and the dataset preview of preference data shows each pair's chosen and rejected sides together."""
from __future__ import annotations

import re

import pytest

from conftest import preference_rows, write_jsonl
from tests.studio_server import running_studio
from tests.browser_env import ARGS, CHROMIUM, SHOTS, sync_api


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    home = tmp_path_factory.mktemp("objectives-studio")
    data = write_jsonl(home / "pairs.jsonl", preference_rows(12))  # STUDIO_HOME is a data root
    with running_studio(home) as (url, proc, log):
        yield url, data


def pick(pg, elem_id: str, option: str) -> None:
    pg.locator(f"#{elem_id}").locator("input").first.click()
    pg.get_by_role("option", name=re.compile(f"^{re.escape(option)}$")).first.click()


def test_objective_fields_and_pair_preview(studio):
    url, data = studio
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(120_000)
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(url)
        pg.wait_for_selector("#main-tabs")
        assert not pg.locator("#group-dpo").is_visible() and not pg.locator("#group-distill").is_visible()
        pick(pg, "field-training-objective", "dpo")
        pg.wait_for_selector("#group-dpo", state="visible")
        assert pg.locator("#field-dpo-beta input").first.input_value() == "0.1"
        assert not pg.locator("#group-distill").is_visible()
        pg.get_by_label("Path or hub id").check()
        pg.locator("#dataset-path input, #dataset-path textarea").first.fill(str(data))
        pg.click("#preview-btn")
        pg.wait_for_selector("#preview-rows .pair")
        pair = pg.locator("#preview-rows .preview-row").first
        text = pair.inner_text()
        assert "chosen" in text and "rejected" in text
        trained = pair.locator(".trained").all_inner_texts()
        assert len(trained) == 2 and trained[0] != trained[1]  # the two answers, each highlighted
        SHOTS.mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(SHOTS / "train-dpo-preview.png"), full_page=True)
        pick(pg, "field-training-objective", "distill")
        pg.wait_for_selector("#group-distill", state="visible")
        assert not pg.locator("#group-dpo").is_visible()
        browser.close()
    assert not errors, errors
