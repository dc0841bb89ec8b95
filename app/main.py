"""The studio's Blocks: four tabs (Train, Jobs, Adapters, Playground) and the named API.

Importing this module never imports torch or transformers: the engine is imported inside event handlers, so the
page is up in seconds and a broken GPU stack cannot take the UI down with it.
"""
from __future__ import annotations

import gradio as gr

from app import adapters_tab, api, jobs_tab, playground_tab, render, sweep_panel, train_tab, url_state
from app.api import friendly

TITLE = "PEFT Studio"

CSS = """
.toolbar { align-items: flex-end !important; }
.toolbar > button { min-height: 2.7rem; max-height: 3.2rem; margin-bottom: 2px; }
.group-title p { margin: 0 0 .25rem 0; font-size: 1.02rem; }
.form-group { padding: .6rem .75rem; margin-bottom: .6rem; }
.muted { color: #6b7280; }
.small { font-size: .85em; }
.badge { color: #fff; border-radius: 999px; padding: 1px 10px; font-size: .85em; font-weight: 600; }
.msg { padding: .5rem .75rem; border-radius: 6px; margin: .25rem 0; }
.msg ul { margin: .25rem 0 0 1.2rem; }
.msg.ok { background: #ecfdf5; border: 1px solid #86efac; color: #14532d; }
.msg.error { background: #fef2f2; border: 1px solid #fca5a5; color: #7f1d1d; }
.msg.warn, .warn { background: #fffbeb; border: 1px solid #fcd34d; color: #78350f; padding: .5rem .75rem; border-radius: 6px; }
.job-progress .job-head { margin-bottom: .35rem; }
.job-progress .bar { position: relative; height: 22px; background: #e5e7eb; border-radius: 6px; overflow: hidden; }
.job-progress .fill { height: 100%; transition: width .6s ease; }
.job-progress .pct { position: absolute; inset: 0; text-align: center; font-size: .8rem; line-height: 22px; font-weight: 600; color: #111827; }
.job-progress .muted { margin-top: .3rem; }
.job-error { margin-top: .4rem; color: #7f1d1d; background: #fef2f2; border: 1px solid #fca5a5; border-radius: 6px; padding: .4rem .6rem; white-space: pre-wrap; }
.stat-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: .5rem; margin: .3rem 0; }
.stat { border: 1px solid #e5e7eb; border-radius: 6px; padding: .35rem .55rem; overflow-wrap: anywhere; }
.stat .k { font-size: .75rem; color: #6b7280; text-transform: uppercase; letter-spacing: .03em; }
.stat .v { font-size: 1.02rem; font-weight: 600; }
.preview-row { margin: .5rem 0; }
.preview-row pre { white-space: pre-wrap; word-break: break-word; font-size: .8rem; line-height: 1.35; padding: .5rem; border: 1px solid #e5e7eb; border-radius: 6px; max-height: 260px; overflow: auto; margin: .2rem 0; }
.preview .context { color: #4b5563; }
.preview .trained, .small .trained { background: #dcfce7; color: #14532d; border-radius: 3px; box-shadow: 0 0 0 1px #86efac; }
.eval-head { margin-bottom: .5rem; }
.eval-table { border-collapse: collapse; width: 100%; margin: .4rem 0 .8rem 0; font-size: .9rem; }
.eval-table th, .eval-table td { border-bottom: 1px solid #e5e7eb; padding: .35rem .5rem; text-align: left; vertical-align: middle; }
.eval-table td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.hbar { position: relative; background: #f3f4f6; height: 20px; border-radius: 4px; min-width: 120px; }
.hbar .hfill { height: 100%; border-radius: 4px; }
.hbar span { position: absolute; left: 6px; top: 0; line-height: 20px; font-size: .8rem; font-weight: 600; color: #111827; }
#job-log textarea, .mono textarea { font-family: ui-monospace, monospace; font-size: .78rem; line-height: 1.3; }
.chart { border: 1px solid #e5e7eb; border-radius: 8px; padding: .4rem .6rem; background: #fff; }
.chart.empty { min-height: 5rem; }
.chart-title { font-weight: 600; font-size: 15px; fill: #111827; }
.line-chart .tick { font-size: 12px; fill: #6b7280; }
.line-chart .axis { font-size: 13px; fill: #374151; }
.line-chart .legend { font-size: 13px; fill: #374151; }
.mem-plan { border: 1px solid #e5e7eb; border-radius: 8px; padding: .45rem .65rem; margin: .3rem 0; background: #fff; }
.mem-head { margin-bottom: .25rem; }
.mem-legend { display: flex; flex-wrap: wrap; gap: .2rem .8rem; margin: .2rem 0; }
.mem-key i { display: inline-block; width: .8em; height: .8em; border-radius: 2px; margin-right: .25em; vertical-align: -1px; }
.mem-warn ol { margin: .25rem 0 0 1.2rem; }
.gen-stats { font-size: .85rem; color: #374151; padding: .2rem 0; }
#side-out-a .bubble-wrap, #side-out-b .bubble-wrap { padding-top: 2.2rem; }
"""

HEADER = (
    "## PEFT Studio\n"
    "Fine-tune **SmolLM2-135M-Instruct** (or a model of yours) with LoRA / QLoRA, watch it learn, measure it against "
    "its base on held-out data, chat with it, and download it. Everything runs on this machine. "
    "**Train** → **Jobs** → **Adapters** → **Playground**."
)


def build_app() -> gr.Blocks:
    with gr.Blocks(title=TITLE, fill_width=False) as demo:
        gr.Markdown(HEADER, elem_id="header")
        with gr.Tabs(selected="train", elem_id="main-tabs") as tabs:
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = train_tab.build()
                sweep_panel.build(train.form)
            with gr.Tab("Jobs", id="jobs", elem_id="tab-jobs"):
                jobs = jobs_tab.build()
            with gr.Tab("Adapters", id="adapters", elem_id="tab-adapters") as adapters_tab_:
                adapters = adapters_tab.build()
            with gr.Tab("Playground", id="playground", elem_id="tab-playground") as playground_tab_:
                playground = playground_tab.build()
        jobs.timer.render()
        api.register()
        url_state.keep_in_url(demo, tabs, jobs.job)

        undocumented = dict(api_visibility="undocumented")

        # Start: queue the job, then show it in the Jobs tab.
        warned = gr.State("")  # the config whose memory warning was shown: a second Start queues it

        @friendly
        def on_start(values):
            job_id, message, warned_now = train_tab.start_job(train.form, values, values[warned])
            if job_id is None:
                return message, gr.skip(), gr.skip(), warned_now
            # the new job must be among the dropdown's choices before it is selected
            return message, gr.Tabs(selected="jobs"), gr.update(choices=render.job_choices(api.store().list_jobs()),
                                                                value=job_id), ""

        train.start.click(on_start, train.inputs | {warned}, [train.message, tabs, jobs.job, warned],
                          concurrency_limit=None, **undocumented)

        # Duplicate: the selected job's config back into the Train form.
        @friendly
        def on_duplicate(job_id):
            if not job_id:
                raise gr.Error("select a job first")
            cfg = api.store().duplicate(job_id)
            out = train.form.from_config(cfg)
            out[train.message] = train_tab.ok_html(f"Loaded the config of job <code>{render.esc(job_id)}</code>: change what you "
                                                   "like (the adapter_name, at least) and press Start.")
            out[tabs] = gr.Tabs(selected="train")
            return out

        jobs.duplicate.click(on_duplicate, jobs.job, [train.message, tabs, *train.form.components()], **undocumented)

        # Lists of adapters are read when their tab opens (a job may have published one since).
        adapters_tab_.select(adapters.refresh, adapters.select, adapters.refreshed, **undocumented)
        playground_tab_.select(playground.refresh, playground.targets, playground.targets, **undocumented)
        demo.load(adapters.refresh, adapters.select, adapters.refreshed, **undocumented)
        demo.load(playground.refresh, playground.targets, playground.targets, **undocumented)
    return demo
