"""Jobs tab: every job in the store, and the selected one live (loss curves, progress, ETA, tokens/s, memory,
log tail, the exact command), with cancel / resume / duplicate and an overlay of several runs' loss curves.

Everything is read back from the store on each gr.Timer tick, so the view survives a page refresh, a closed tab and
an app restart. The only per-browser state is which job is selected (the dropdown) and a signature of what was last
sent, so that unchanged plots are skipped instead of redrawn every two seconds."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from app import render
from app.api import friendly, store

POLL_SECONDS = 2.0
LOG_LINES = 14
LOG_WIDTH = 240  # characters per log line shown; the full line is in train.log


def short_log(text: str) -> str:
    """The end of the log, sized to fit the box without scrolling (autoscroll only acts on changes)."""
    lines = text.splitlines()[-LOG_LINES:]
    return "\n".join(ln if len(ln) <= LOG_WIDTH else ln[:LOG_WIDTH - 1] + "…" for ln in lines)


def snapshot() -> list[dict]:
    """Every job's view (finetune.rundir.view, without curves and log), newest first."""
    return store().views(limit=300)


def default_job(rows: list[dict]) -> str | None:
    """What to show when nothing is selected (a fresh page): the running job, else the newest."""
    for r in rows:
        if r["state"] == "running":
            return r["id"]
    return rows[0]["id"] if rows else None


def build() -> SimpleNamespace:
    table = gr.Dataframe(render.jobs_frame([]), interactive=False, wrap=True, max_height=260, label="All jobs",
                         elem_id="jobs-table", show_search="search")
    with gr.Row(equal_height=False, elem_classes=["toolbar"]):
        job = gr.Dropdown(label="Job", choices=[], value=None, scale=4, elem_id="job-select",
                          info="Pick a job, or click a row of the table below.")
        cancel = gr.Button("Cancel", variant="stop", scale=1, elem_id="cancel-btn")
        resume = gr.Button("Resume", scale=1, elem_id="resume-btn")
        duplicate = gr.Button("Duplicate to Train", scale=1, elem_id="duplicate-btn")
    action_msg = gr.HTML()
    progress = gr.HTML(render.progress_html(None), elem_id="job-progress")
    stats = gr.HTML(elem_id="job-stats")
    loss_plot = gr.HTML(render.loss_chart(None), elem_id="loss-plot")
    log = gr.Textbox(label="Log (last lines of train.log)", lines=LOG_LINES + 4, max_lines=LOG_LINES + 4, autoscroll=True,
                     interactive=False, elem_id="job-log", elem_classes=["mono"])
    command = gr.Textbox(label="The exact command this job runs (the same job from a terminal)", lines=2, max_lines=4,
                         interactive=False, buttons=["copy"], elem_id="job-command", elem_classes=["mono"])
    with gr.Accordion("Compare runs: overlay loss curves", open=False, elem_id="compare-accordion"):
        compare = gr.Dropdown(label="Runs to overlay", choices=[], multiselect=True, elem_id="compare-select")
        overlay = gr.HTML(render.overlay_chart([]), elem_id="overlay-plot")
    sig = gr.State({})  # what this browser was last sent, to skip unchanged outputs
    # Not rendered here: main.py renders the timer outside the tabs, so polling does not restart whenever the tab is
    # mounted (with gr.LinePlot, an update landing while the plot mounted left its lines uncoloured in gradio 6.31).
    timer = gr.Timer(POLL_SECONDS, render=False)

    outputs = [job, table, progress, stats, loss_plot, log, command, compare, overlay, sig, cancel, resume]

    def refresh(selected, compared, last):
        rows = snapshot()
        by_id = {r["id"]: r for r in rows}
        last = dict(last or {})
        out: dict = {}
        # the list: the dropdown's choices only change when jobs or states do (an open dropdown must not flicker)
        list_sig = [(r["id"], r["state"]) for r in rows]
        if list_sig != last.get("list"):
            choices = render.job_choices(rows)
            out[job] = gr.update(choices=choices)
            out[compare] = gr.update(choices=choices)
            last["list"] = list_sig
        table_sig = [(r["id"], r["state"], r["step"], r["loss"]) for r in rows]
        if table_sig != last.get("table"):
            out[table] = render.jobs_frame(rows)
            last["table"] = table_sig
        ids = set(by_id)
        if selected not in ids:
            selected = default_job(rows)
            out[job] = {**out.get(job, gr.update()), "value": selected}
        live = None
        if selected:
            try:
                live = store().live(selected)
            except Exception as e:  # a job removed by hand between list and live
                out[action_msg] = f'<div class="msg error">{render.esc(e)}</div>'
        out[progress] = render.progress_html(live)
        out[stats] = render.stats_html(live)
        detail_sig = (selected, live and len(live["loss_history"]), live and len(live["eval_history"]),
                      live and live["state"])
        if detail_sig != last.get("detail"):
            out[loss_plot] = render.loss_chart(live)
            out[command] = (live or {}).get("command") or ""
            state = (live or {}).get("state")
            out[cancel] = gr.update(interactive=state in ("queued", "running"))
            out[resume] = gr.update(interactive=state in ("failed", "cancelled"))
            last["detail"] = detail_sig
        log_text = short_log((live or {}).get("log_tail") or "")
        if log_text != last.get("log"):
            out[log] = log_text
            last["log"] = log_text
        compared = [c for c in (compared or []) if c in ids]
        ov_sig = [(c, by_id[c]["step"], by_id[c]["state"]) for c in compared]
        if ov_sig != last.get("overlay"):
            out[overlay] = render.overlay_chart([store().live(c) for c in compared])
            last["overlay"] = ov_sig
        out[sig] = last
        return out

    poll = dict(outputs=outputs + [action_msg], show_progress="hidden", api_visibility="undocumented",
                concurrency_limit=None)
    timer.tick(friendly(refresh), [job, compare, sig], **poll)
    job.change(friendly(lambda j, c, s: refresh(j, c, {**(s or {}), "detail": None, "log": None})),
               [job, compare, sig], **poll)
    compare.change(friendly(lambda j, c, s: refresh(j, c, {**(s or {}), "overlay": None})), [job, compare, sig], **poll)

    def pick_row(evt: gr.SelectData):
        row = evt.row_value or []
        return gr.update(value=row[0]) if row else gr.skip()

    table.select(pick_row, None, job, api_visibility="undocumented", concurrency_limit=None)

    @friendly
    def on_cancel(selected):
        if not selected:
            raise gr.Error("select a job first")
        row = store().cancel(selected)
        return f'<div class="msg ok">job {render.esc(selected)} is {render.esc(row["state"])}</div>'

    @friendly
    def on_resume(selected):
        if not selected:
            raise gr.Error("select a job first")
        store().resume(selected)
        return (f'<div class="msg ok">job {render.esc(selected)} is queued again; it continues from its latest '
                'checkpoint</div>')

    cancel.click(on_cancel, job, action_msg, api_visibility="undocumented", concurrency_limit=None)
    resume.click(on_resume, job, action_msg, api_visibility="undocumented", concurrency_limit=None)
    return SimpleNamespace(job=job, duplicate=duplicate, action_msg=action_msg, timer=timer)
