"""The Train form's memory plan in Debian's Chromium: the bar follows the fields, a job that does not fit shows
the ranked suggestions, and Start warns before queueing it."""
from __future__ import annotations


import pytest

from conftest import wait_for
from tests.studio_server import running_studio
from tests.browser_env import ARGS, CHROMIUM, SHOTS, sync_api

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    home = tmp_path_factory.mktemp("plan-browser")
    with running_studio(home) as (url, proc, log), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
        pg = ctx.new_page()
        pg.set_default_timeout(60_000)
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(url)
        pg.wait_for_selector("#main-tabs")
        yield pg
        browser.close()
        assert not errors, f"JavaScript errors on the page: {errors}"


def set_number(pg, elem_id: str, value) -> None:
    box = pg.locator(f"#{elem_id}").locator("input, textarea").first
    box.fill(str(value))
    box.press("Tab")


def plan_state(pg) -> tuple[str, float] | None:
    el = pg.locator("#memory-plan .mem-plan[data-needed]")
    if not el.count():
        return None
    return el.get_attribute("data-fits"), float(el.get_attribute("data-needed"))


def test_memory_plan_follows_the_form(page):
    pg = page
    fits, needed = wait_for(lambda: plan_state(pg), 60, "the memory plan panel")
    assert fits == "true" and needed > 0
    assert pg.locator("#memory-plan svg.mem-bar rect").count() >= 4  # background + the breakdown's parts
    set_number(pg, "field-data-max_seq_length", 2048)
    fits2, needed2 = wait_for(lambda: (s := plan_state(pg)) and s[1] != needed and s, 60, "the plan to follow max_seq_length")
    assert needed2 > needed
    set_number(pg, "field-training-per_device_train_batch_size", 512)
    wait_for(lambda: (s := plan_state(pg)) and s[0] == "false" and s, 60, "a plan that does not fit")
    warn = pg.locator("#memory-plan .mem-warn li")
    assert warn.count() >= 2 and "(fits)" in warn.first.inner_text()
    pg.locator("#memory-plan").scroll_into_view_if_needed()
    pg.screenshot(path=str(SHOTS / "train-memory-plan.png"),
                  clip={"x": 0, "y": 0, "width": 1400, "height": 560})
    pg.locator("#start-btn").click()  # warns, queues nothing
    wait_for(lambda: "Press" in pg.locator("#train-message").inner_text(), 60, "the Start warning")
    assert pg.locator("#train-message .mem-warn li").count() >= 2


def test_advanced_options_keep_optional_numbers_empty(page):
    """Opening the Advanced accordions leaves the optional numbers empty (a gradio Number would turn them into 0):
    the plan still follows the form, and leaving every layer whole (gradient_checkpointing_layers 0) raises it."""
    pg = page
    set_number(pg, "field-training-per_device_train_batch_size", 2)
    set_number(pg, "field-data-max_seq_length", 512)
    for accordion in pg.get_by_text("Advanced options").all():
        accordion.click()
    layers = pg.locator("#field-training-gradient_checkpointing_layers").locator("input, textarea").first
    wait_for(lambda: layers.is_visible(), 60, "the training section's advanced options")
    assert layers.input_value() == ""
    assert pg.locator("#field-data-max_samples").locator("input, textarea").first.input_value() == ""
    _, before = wait_for(lambda: (s := plan_state(pg)) and s[0] == "true" and s, 60, "a plan that fits")
    set_number(pg, "field-training-gradient_checkpointing_layers", 0)
    wait_for(lambda: (s := plan_state(pg)) and s[1] > before and s, 60, "the plan to count the layers left whole")
    assert "needs a valid form" not in pg.locator("#memory-plan").inner_text()
