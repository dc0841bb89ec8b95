"""Every number says what it is measured on, and the Jobs and Adapters tabs agree on a finished run's final loss
(one definition: finetune.rundir.final_loss). One real, tiny training run on the embedded model."""
from __future__ import annotations

import re

from conftest import tiny_config
from app import render
from finetune.jobs import JobStore
from finetune.rundir import FINAL_LOSS_LABEL, FINAL_LOSS_WINDOW
from finetune.store import adapter_path, list_adapters

RUN_DEADLINE = 900


def test_jobs_and_adapters_agree_on_the_final_loss(tmp_path, chat_jsonl):
    store = JobStore(tmp_path / "studio", poll_interval=0.2)
    job = store.submit(tiny_config(chat_jsonl, "numbers-agree", steps=3, logging_steps=1))
    assert store.wait(job, timeout=RUN_DEADLINE)["state"] == "completed", store.live(job)["error"]
    live = store.live(job)
    losses = [loss for _, loss in live["loss_history"]]
    expected = sum(losses[-FINAL_LOSS_WINDOW:]) / len(losses[-FINAL_LOSS_WINDOW:])
    assert abs(live["final_loss"] - expected) < 1e-6 and live["final_loss"] != losses[-1]
    jobs_tab = render.stats_html(live)
    table = render.adapters_frame([a for a in list_adapters() if a["name"] == "numbers-agree"])
    shown = table[FINAL_LOSS_LABEL].iloc[0]
    assert shown == render.fmt_num(live["final_loss"]) and f'{FINAL_LOSS_LABEL}</div><div class="v">{shown}<' in jobs_tab
    assert "last logged step" in jobs_tab and "tokens/s, last logged steps" in jobs_tab
    card = (adapter_path("numbers-agree") / "README.md").read_text()
    assert re.search(r"\d\.\d\d tokens/s \(whole run\)", card) and not re.search(r"\d\.\d{4} tokens/s", card), card
    assert re.search(r"peak memory [\d,]+ MiB", card) and FINAL_LOSS_LABEL in card
    # the Adapters table's cost columns are the model card's numbers
    rate, peak = table["tokens/s (whole run)"].iloc[0], table["peak memory MiB"].iloc[0]
    assert rate != "–" and f"{rate} tokens/s (whole run)" in card and f"peak memory {peak} MiB" in card, card
    assert 'from_pretrained("/' in card and "hub id" in card  # the base it was trained on, and where else to get it


def test_memory_is_labelled_in_the_unit_it_is_counted_in():
    """Every peak memory and size the studio stores is counted in 2**20 bytes, so each tab says MiB, never MB."""
    shown = [render.stats_html({"peak_memory_mb": 1900.0, "rank_peak_memory_mb": [1875.0, 1900.0]}),
             render.eval_chart_html({"metrics": {"base": {"peak_memory_mb": 1316.0}, "adapter": {"peak_memory_mb": 1346.0}}}),
             render.distill_eval_html({"models": {"teacher": {"peak_memory_mb": 900.0}}}),
             " ".join(render.adapters_frame([{"name": "a", "metrics": {"peak_memory_mb": 974.0}, "size_mb": 3.5}]).columns)]
    for html in shown:
        assert "MiB" in html and not re.search(r"\bMB\b", html), html
