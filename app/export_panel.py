"""The Export panel of the Adapters tab: format and quantization, Start (queues an export job), its progress, and
download links for the adapter's finished exports."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from app import render
from app.api import friendly, store

FORMAT_LABELS = [("Merged Hugging Face folder (transformers, vLLM)", "hf"), ("GGUF (llama.cpp, Ollama)", "gguf")]


def _formats():
    from finetune.export import DEFAULT_QUANT, FORMATS

    return FORMATS, DEFAULT_QUANT


def exports_html(rows: list[dict]) -> str:
    if not rows:
        return '<div class="msg">No exports of this adapter yet.</div>'
    items = []
    for r in rows:
        merge = render.obj(r.get("merge"))
        files = ", ".join(f'{render.esc(f["path"])} ({f["bytes"] / 2**20:.1f} MiB)' for f in r.get("files", []))
        items.append(f'<li><b>{render.esc(r.get("format"))} {render.esc(r.get("quant"))}</b>, '
                     f'{render.fmt_time(r.get("created_at"))}, {render.esc(r.get("export_seconds"))} s; max abs logit '
                     f'difference vs base + adapter {render.esc(merge.get("max_abs_logit_diff_vs_peft", "–"))}; '
                     f'files: {files}</li>')
    return '<ul class="exports">' + "".join(items) + "</ul>"


def downloads(adapter: str | None) -> tuple[str, list[str]]:
    from finetune.export import list_exports

    rows = list_exports(adapter) if adapter else []
    paths = [f'{r["path"]}/{f["path"]}' for r in rows for f in r.get("files", [])
             if f["path"].endswith((".gguf", "Modelfile", "README.md", "manifest.json"))]
    return exports_html(rows), paths


def job_html(job_id: str | None) -> str:
    if not job_id:
        return ""
    info = store().live(job_id)
    state, error = info.get("state"), info.get("error")
    text = f'export job {render.esc(job_id)}: {render.esc(state)}'
    if state in ("queued", "running"):
        text += f' — {render.esc(info.get("phase"))} ({info.get("step") or 0}/{info.get("total_steps") or "?"})'
    if error:
        text += f': {render.esc(error)}'
    return f'<div class="msg {"ok" if state == "completed" else ""}" id="export-job-state">{text}</div>'


def build(select: gr.Dropdown) -> SimpleNamespace:
    undocumented = dict(api_visibility="undocumented")
    formats, default = _formats()
    with gr.Row():
        fmt = gr.Radio(FORMAT_LABELS, value="gguf", label="Format", elem_id="export-format")
        quant = gr.Dropdown(list(formats["gguf"]), value=default["gguf"], label="Quantization",
                            info="GGUF: f16 (exact), q8_0, q4_0. HF: the saved dtype.", elem_id="export-quant")
        start = gr.Button("Start export", variant="primary", elem_id="export-start")
    job = gr.State(None)
    state = gr.HTML(elem_id="export-state")
    listing = gr.HTML(elem_id="export-list")
    files = gr.File(label="Download", file_count="multiple", interactive=False, elem_id="export-files")
    timer = gr.Timer(2.0, active=False)

    fmt.change(lambda f: gr.update(choices=list(formats[f]), value=default[f]), fmt, quant, **undocumented)

    @friendly
    def on_start(adapter, f, q):
        if not adapter:
            raise gr.Error("pick an adapter first")
        job_id = store().submit({"adapter": adapter, "format": f, "quant": q}, kind="export")
        return job_id, job_html(job_id), gr.Timer(active=True)

    @friendly
    def on_tick(job_id, adapter):
        html = job_html(job_id)
        done = store().get(job_id)["state"] in ("completed", "failed", "cancelled") if job_id else True
        listed, paths = downloads(adapter)
        return html, (listed if done else gr.skip()), (paths or None) if done else gr.skip(), gr.Timer(active=not done)

    @friendly
    def on_select(adapter):
        listed, paths = downloads(adapter)
        return listed, paths or None

    start.click(on_start, [select, fmt, quant], [job, state, timer], **undocumented)
    timer.tick(on_tick, [job, select], [state, listing, files, timer], **undocumented)
    select.change(on_select, select, [listing, files], **undocumented)
    return SimpleNamespace(fmt=fmt, quant=quant, start=start)
