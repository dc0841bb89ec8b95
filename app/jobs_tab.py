"""Jobs tab: every job in the store, and the selected one live (loss curves, progress, ETA, tokens/s, memory,
log tail, the exact command), with cancel / resume / duplicate and an overlay of several runs' loss curves (a sweep
stands for its trials).

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


def overlay_runs(compared: list[str], rows: list[dict]) -> list[str]:
    """The runs the overlay draws: a sweep picked in Compare runs stands for its trials (in trial order)."""
    by_id, out = {r["id"]: r for r in rows}, []
    for c in compared:
        if c not in by_id:
            continue
        trials = [r["id"] for r in reversed(rows) if r.get("parent") == c]
        out += trials if by_id[c].get("kind") == "sweep" else [c]
    return list(dict.fromkeys(out))


def _components() -> SimpleNamespace:
    ui = SimpleNamespace()
    ui.table = gr.Dataframe(render.jobs_frame([]), interactive=False, wrap=True, max_height=260, label="All jobs",
                            elem_id="jobs-table", show_search="search")
    with gr.Row(equal_height=False, elem_classes=["toolbar"]):
        ui.job = gr.Dropdown(label="Job", choices=[], value=None, scale=4, elem_id="job-select",
                             info="Pick a job, or click a row of the table below.")
        ui.cancel = gr.Button("Cancel", variant="stop", scale=1, elem_id="cancel-btn")
        ui.resume = gr.Button("Resume", scale=1, elem_id="resume-btn")
        ui.duplicate = gr.Button("Duplicate to Train", scale=1, elem_id="duplicate-btn")
    ui.action_msg = gr.HTML()
    ui.progress = gr.HTML(render.progress_html(None), elem_id="job-progress")
    ui.stats = gr.HTML(elem_id="job-stats")
    ui.loss_plot = gr.HTML(render.loss_chart(None), elem_id="loss-plot")
    ui.log = gr.Textbox(label="Log (last lines of train.log)", lines=LOG_LINES + 4, max_lines=LOG_LINES + 4,
                        autoscroll=True, interactive=False, elem_id="job-log", elem_classes=["mono"])
    ui.command = gr.Textbox(label="The exact command this job runs (the same job from a terminal)", lines=2,
                            max_lines=4, interactive=False, buttons=["copy"], elem_id="job-command", elem_classes=["mono"])
    with gr.Accordion("Compare runs: overlay loss curves", open=False, elem_id="compare-accordion"):
        ui.compare = gr.Dropdown(label="Runs to overlay", choices=[], multiselect=True, elem_id="compare-select",
                                 info="A sweep stands for all its trials.")
        ui.overlay = gr.HTML(render.overlay_chart([]), elem_id="overlay-plot")
    ui.sig = gr.State({})  # what this browser was last sent, to skip unchanged outputs
    # Not rendered here: main.py renders the timer outside the tabs, so polling does not restart whenever the tab is
    # mounted (with gr.LinePlot, an update landing while the plot mounted left its lines uncoloured in gradio 6.31).
    ui.timer = gr.Timer(POLL_SECONDS, render=False)
    return ui


def _list_updates(ui: SimpleNamespace, rows: list[dict], last: dict, out: dict) -> None:
    # the dropdown's choices only change when jobs or states do (an open dropdown must not flicker)
    list_sig = [(r["id"], r["state"]) for r in rows]
    if list_sig != last.get("list"):
        choices = render.job_choices(rows)
        out[ui.job] = gr.update(choices=choices)
        out[ui.compare] = gr.update(choices=choices)
        last["list"] = list_sig
    table_sig = [(r["id"], r["state"], r["step"], r["loss"]) for r in rows]
    if table_sig != last.get("table"):
        out[ui.table] = render.jobs_frame(rows)
        last["table"] = table_sig


def _detail_updates(ui: SimpleNamespace, selected: str | None, last: dict, out: dict) -> None:
    live = None
    if selected:
        try:
            live = store().live(selected)
        except Exception as e:  # a job removed by hand between list and live
            out[ui.action_msg] = f'<div class="msg error">{render.esc(e)}</div>'
    out[ui.progress] = render.progress_html(live)
    out[ui.stats] = render.stats_html(live)
    detail_sig = (selected, live and len(live["loss_history"]), live and len(live["eval_history"]),
                  live and live["state"])
    if detail_sig != last.get("detail"):
        out[ui.loss_plot] = render.loss_chart(live)
        out[ui.command] = (live or {}).get("command") or ""
        state = (live or {}).get("state")
        out[ui.cancel] = gr.update(interactive=state in ("queued", "running"))
        out[ui.resume] = gr.update(interactive=state in ("failed", "cancelled"))
        last["detail"] = detail_sig
    log_text = short_log((live or {}).get("log_tail") or "")
    if log_text != last.get("log"):
        out[ui.log] = log_text
        last["log"] = log_text


def refresh(ui: SimpleNamespace, selected: str | None, compared: list[str] | None, last: dict | None) -> dict:
    """The updates one poll sends: only what changed since `last` (this browser's signature of what it has)."""
    rows = snapshot()
    by_id = {r["id"]: r for r in rows}
    last = dict(last or {})
    out: dict = {}
    _list_updates(ui, rows, last, out)
    if selected not in by_id:
        selected = default_job(rows)
        out[ui.job] = {**out.get(ui.job, gr.update()), "value": selected}
    _detail_updates(ui, selected, last, out)
    runs = overlay_runs(compared or [], rows)
    ov_sig = [(c, by_id[c]["step"], by_id[c]["state"]) for c in runs]
    if ov_sig != last.get("overlay"):
        out[ui.overlay] = render.overlay_chart([store().live(c) for c in runs])
        last["overlay"] = ov_sig
    out[ui.sig] = last
    return out


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


def pick_row(evt: gr.SelectData):
    row = evt.row_value or []
    return gr.update(value=row[0]) if row else gr.skip()


def build() -> SimpleNamespace:
    ui = _components()
    outputs = [ui.job, ui.table, ui.progress, ui.stats, ui.loss_plot, ui.log, ui.command, ui.compare, ui.overlay,
               ui.sig, ui.cancel, ui.resume, ui.action_msg]
    poll = dict(outputs=outputs, show_progress="hidden", api_visibility="undocumented", concurrency_limit=None)
    inputs = [ui.job, ui.compare, ui.sig]
    ui.timer.tick(friendly(lambda j, c, s: refresh(ui, j, c, s)), inputs, **poll)
    ui.job.change(friendly(lambda j, c, s: refresh(ui, j, c, {**(s or {}), "detail": None, "log": None})), inputs, **poll)
    ui.compare.change(friendly(lambda j, c, s: refresh(ui, j, c, {**(s or {}), "overlay": None})), inputs, **poll)
    ui.table.select(pick_row, None, ui.job, api_visibility="undocumented", concurrency_limit=None)
    ui.cancel.click(on_cancel, ui.job, ui.action_msg, api_visibility="undocumented", concurrency_limit=None)
    ui.resume.click(on_resume, ui.job, ui.action_msg, api_visibility="undocumented", concurrency_limit=None)
    return SimpleNamespace(job=ui.job, duplicate=ui.duplicate, action_msg=ui.action_msg, timer=ui.timer)
