"""The open tab and the selected job live in the page's address (?tab=jobs&job=<id>): a reload, a bookmark or a
link shared with a colleague lands on the same view. The address is rewritten in the browser (history.replaceState,
no reload); the server only reads it back when the page loads."""
from __future__ import annotations

import gradio as gr

from app import render
from app.api import friendly, store

TABS = ("train", "jobs", "adapters", "playground")

# Reads the tab the user now sees from the page (the Tabs' change event carries no value to a js-only listener).
TAB_TO_URL = """async () => {
  await new Promise(r => setTimeout(r, 30));
  const on = document.querySelector('#main-tabs [role="tab"][aria-selected="true"]');
  if (!on) return;
  const u = new URL(window.location.href);
  u.searchParams.set('tab', on.innerText.trim().toLowerCase());
  window.history.replaceState(null, '', u);
}"""
JOB_TO_URL = """(job) => {
  const u = new URL(window.location.href);
  if (job) { u.searchParams.set('job', job); } else { u.searchParams.delete('job'); }
  window.history.replaceState(null, '', u);
}"""


def restore(request: gr.Request):
    """(tab, job dropdown) from the address the page was loaded with; unknown values are ignored."""
    params = dict(request.query_params) if request else {}
    tab = params.get("tab")
    out_tab = gr.Tabs(selected=tab) if tab in TABS else gr.skip()
    job = params.get("job")
    rows = store().list_jobs() if job else []
    if job and any(r["id"] == job for r in rows):
        return out_tab, gr.update(choices=render.job_choices(rows), value=job)
    return out_tab, gr.skip()


def keep_in_url(demo: gr.Blocks, tabs: gr.Tabs, job: gr.Dropdown) -> None:
    quiet = dict(api_visibility="undocumented", concurrency_limit=None)
    tabs.change(None, None, None, js=TAB_TO_URL, **quiet)
    job.change(None, job, None, js=JOB_TO_URL, **quiet)
    demo.load(friendly(restore), None, [tabs, job], **quiet)
