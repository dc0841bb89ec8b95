"""Adapters tab: the store with provenance; per adapter its details, a zip download, delete (confirmed), evaluation
against its base on any dataset (bar chart with intervals, win/tie/loss, examples sortable by score difference),
and two adapters' results side by side."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from app import export_panel, render
from app.api import MODEL_GROUP, friendly, import_zip_file
from app.forms import UPLOAD_TYPES, keep_upload

EVAL_OWN = "Its own validation split"
EVAL_UPLOAD = "Upload a held-out file"
EVAL_PATH = "Path on the studio's machine"
UNDOCUMENTED = dict(api_visibility="undocumented")


def adapters() -> list[dict]:
    from finetune.store import list_adapters

    return list_adapters()


def results(name: str) -> list[dict]:
    from finetune.evaluation.evaluate import cached_results

    try:
        return cached_results(name)
    except (ValueError, OSError):
        return []


def result_choices(rs: list[dict]) -> list[tuple[str, str]]:
    out = []
    for r in rs:
        d = render.obj(r.get("data"))
        out.append((f"{render.fmt_time(r.get('created_at'))} · {d.get('n')} examples · {d.get('path')} ({d.get('split')})",
                    r.get("key")))
    return out


def latest_summary(name: str) -> dict | None:
    """The newest evaluation of an adapter (file beside it, else the summary in studio.json), for comparisons."""
    from finetune.store import get_adapter

    rs = results(name)
    if rs:
        return rs[0]
    try:
        meta = get_adapter(name)
    except (ValueError, FileNotFoundError):
        return None
    ev = render.obj(meta.get("eval"))
    return {**ev, "adapter": name, "quantization": meta.get("quantization")} if ev else None


def provenance_html(meta: dict) -> str:
    cfg, m, ds = render.obj(meta.get("config")), render.obj(meta.get("metrics")), render.obj(meta.get("dataset"))
    lora, tr = render.obj(cfg.get("lora")), render.obj(cfg.get("training"))
    cells = [
        ("base model", meta.get("base_model")), ("quantization", meta.get("quantization")),
        ("dataset", ds.get("path")), ("format", ds.get("format")),
        ("rows (train / validation)", f'{ds.get("num_train", "–")} / {ds.get("num_validation", "–")}'),
        ("LoRA", f'r {lora.get("r", "–")}, alpha {lora.get("lora_alpha", "–")}, {lora.get("target_modules", "")}'),
        ("steps", m.get("steps")), ("learning rate", tr.get("learning_rate")),
        (f"loss: first step → {render.FINAL_LOSS_LABEL}",
         f'{render.fmt_num(m.get("first_loss"))} → {render.fmt_num(m.get("final_loss"))}'),
        ("validation loss", render.fmt_num(m.get("eval_loss"))),
        ("training time", render.fmt_duration(m.get("runtime_s"))),
        ("ROUGE-L Δ vs base", render.eval_delta(meta.get("eval"))),
        ("created", render.fmt_time(meta.get("created_at"))), ("job", meta.get("job_id")),
        ("objective", tr.get("objective") or "sft"), ("teacher", render.obj(meta.get("teacher")).get("spec")),
    ]
    return '<div class="stat-grid">' + "".join(
        f'<div class="stat"><div class="k">{k}</div><div class="v">{render.esc(v if v is not None else "–")}</div></div>'
        for k, v in cells) + "</div>" + render.distill_eval_html(meta.get("distill_eval"))


def _components() -> SimpleNamespace:
    ui = SimpleNamespace()
    ui.table = gr.Dataframe(render.adapters_frame([]), interactive=False, wrap=True, max_height=260,
                            label="Stored adapters", elem_id="adapters-table",
                            column_widths=["14%", "15%", "6%", "14%", "6%", "8%", "17%", "13%", "7%"])
    with gr.Row(equal_height=False, elem_classes=["toolbar"]):
        ui.select = gr.Dropdown(label="Adapter", info="Pick one, or click a row of the table above.", choices=[],
                                value=None, scale=4, elem_id="adapter-select")
        ui.download = gr.DownloadButton("Download zip", value=None, scale=1, elem_id="download-btn", interactive=False)
        ui.delete = gr.Button("Delete…", variant="stop", scale=1, elem_id="delete-btn")
        ui.refresh = gr.Button("Refresh", scale=1, elem_id="adapters-refresh")
    with gr.Row(visible=False, elem_id="delete-confirm") as ui.confirm_row:
        ui.confirm_text = gr.Markdown(sanitize_html=True)
        ui.confirm_yes = gr.Button("Yes, delete it", variant="stop", elem_id="delete-yes")
        ui.confirm_no = gr.Button("Keep it", elem_id="delete-no")
    ui.message = gr.HTML()
    with gr.Accordion("Import an adapter (zip)", open=False, elem_id="import-accordion"):
        with gr.Row(equal_height=False):
            ui.import_file = gr.File(label="Adapter zip (a studio download, or a peft folder zipped)",
                                     file_types=[".zip"], scale=3, elem_id="import-file")
            with gr.Column(scale=2):
                ui.import_name = gr.Textbox(label="Store it as", placeholder="the folder name inside the zip",
                                            max_lines=1, info="Letters, digits, '.', '_' or '-'.", elem_id="import-name")
                ui.import_btn = gr.Button("Import", elem_id="import-btn")
    with gr.Tabs():
        with gr.Tab("Details", id="details"):
            ui.provenance = gr.HTML(elem_id="adapter-provenance")
            with gr.Accordion("studio.json (full provenance)", open=False):
                ui.details = gr.JSON(elem_id="adapter-json")
        with gr.Tab("Evaluate", id="evaluate"):
            _evaluate_components(ui)
        with gr.Tab("Export", id="export"):
            export_panel.build(ui.select)
        with gr.Tab("Compare two adapters", id="compare"):
            with gr.Row():
                ui.cmp_a = gr.Dropdown(label="Adapter A", choices=[], elem_id="compare-a")
                ui.cmp_b = gr.Dropdown(label="Adapter B", choices=[], elem_id="compare-b")
            ui.cmp_out = gr.HTML(render.compare_html(None, None), elem_id="compare-out")
    ui.imported = gr.State()
    return ui


def _evaluate_components(ui: SimpleNamespace) -> None:
    with gr.Row():
        with gr.Column(scale=3):
            ui.source = gr.Radio([EVAL_OWN, EVAL_UPLOAD, EVAL_PATH], value=EVAL_OWN, label="Held-out data",
                                 elem_id="eval-source")
            ui.upload = gr.File(label="Held-out file (JSONL, JSON, CSV or Parquet)", file_types=UPLOAD_TYPES,
                                visible=False, elem_id="eval-upload")
            ui.path = gr.Textbox(label="data path", visible=False, max_lines=1, placeholder="/data/heldout.jsonl",
                                 elem_id="eval-path")
        with gr.Column(scale=2):
            ui.max_examples = gr.Number(0, precision=0, minimum=0, maximum=10000, label="max_examples",
                                        info="0 = the adapter's evaluation.max_examples", elem_id="eval-max-examples")
            ui.max_new_tokens = gr.Number(0, precision=0, minimum=0, maximum=4096, label="max_new_tokens",
                                          info="0 = the adapter's evaluation.max_new_tokens", elem_id="eval-max-new")
    ui.run = gr.Button("Evaluate: base vs adapter", variant="primary", elem_id="eval-btn")
    ui.previous = gr.Dropdown(label="Evaluation results of this adapter", choices=[], elem_id="eval-previous")
    ui.chart = gr.HTML(render.eval_chart_html(None), elem_id="eval-chart")
    ui.sort = gr.Dropdown(render.SORT_METRICS, value="rouge_l", label="Score the examples by",
                          info="Rows are sorted by the adapter's gain on this score, largest first; click a column to re-sort.",
                          elem_id="eval-sort")
    ui.examples = gr.Dataframe(render.examples_frame(None), interactive=False, wrap=True, max_height=520,
                               elem_id="eval-examples",
                               column_widths=["4%", "20%", "18%", "18%", "18%", "7%", "8%", "7%"])


@friendly
def on_refresh(selected):
    rows = adapters()
    names = [r["name"] for r in rows]
    if selected not in names:
        selected = names[0] if names else None
    upd = gr.update(choices=names)
    return render.adapters_frame(rows), gr.update(choices=names, value=selected), upd, upd


@friendly
def on_select(name, sort_by):
    from finetune.store import export_zip, get_adapter

    if not name:
        return ("", None, gr.update(value=None, interactive=False), gr.update(choices=[], value=None),
                render.eval_chart_html(None), render.examples_frame(None))
    meta = get_adapter(name)
    rs = results(name)
    shown = {k: v for k, v in meta.items() if k != "chat_template"}
    latest = rs[0] if rs else None
    return (provenance_html(meta), shown, gr.update(value=str(export_zip(name)), interactive=True),
            gr.update(choices=result_choices(rs), value=latest.get("key") if latest else None),
            render.eval_chart_html(latest), render.examples_frame(latest, sort_by))


@friendly
def on_pick_result(name, key, sort_by):
    r = next((r for r in results(name) if r.get("key") == key), None) if name and key else None
    return render.eval_chart_html(r), render.examples_frame(r, sort_by)


@friendly
def on_evaluate(name, src, file, text, n, new_tokens, sort_by, progress=gr.Progress()):
    from finetune.evaluation import evaluate as E

    if not name:
        raise gr.Error("pick an adapter first")
    if src == EVAL_UPLOAD:
        if not file:
            raise gr.Error("data: choose a held-out file to upload")
        data_path = keep_upload(file)
    elif src == EVAL_PATH:
        if not (text or "").strip():
            raise gr.Error("data path is empty")
        data_path = text.strip()
    else:
        data_path = None
    result = E.evaluate(name, data_path, max_examples=int(n or 0) or None, max_new_tokens=int(new_tokens or 0) or None,
                        progress=lambda frac, desc: progress(frac, desc=desc))
    rs = results(name)
    return (gr.update(choices=result_choices(rs), value=result.get("key")), render.eval_chart_html(result),
            render.examples_frame(result, sort_by))


@friendly
def on_compare(a, b):
    return render.compare_html(latest_summary(a) if a else None, latest_summary(b) if b else None)


@friendly
def on_delete_confirmed(name):
    from finetune.store import delete_adapter

    delete_adapter(name)
    return gr.update(visible=False), f'<div class="msg ok">deleted {render.esc(name)}</div>', None


@friendly
def on_import(file, name):
    stored = import_zip_file(file, name)
    return f'<div class="msg ok">imported {render.esc(stored)}</div>', None, "", stored


def pick_row(evt: gr.SelectData):
    row = evt.row_value or []
    return gr.update(value=row[0]) if row else gr.skip()


def _wire_evaluation(ui: SimpleNamespace) -> None:
    ui.refresh.click(on_refresh, ui.select, ui.refreshed, **UNDOCUMENTED)
    shown = [ui.provenance, ui.details, ui.download, ui.previous, ui.chart, ui.examples]
    ui.select.change(on_select, [ui.select, ui.sort], shown, **UNDOCUMENTED)
    ui.previous.input(on_pick_result, [ui.select, ui.previous, ui.sort], [ui.chart, ui.examples], **UNDOCUMENTED)
    ui.sort.change(on_pick_result, [ui.select, ui.previous, ui.sort], [ui.chart, ui.examples], **UNDOCUMENTED)
    ui.source.change(lambda s: (gr.update(visible=s == EVAL_UPLOAD), gr.update(visible=s == EVAL_PATH)), ui.source,
                     [ui.upload, ui.path], **UNDOCUMENTED)
    ui.run.click(on_evaluate, [ui.select, ui.source, ui.upload, ui.path, ui.max_examples, ui.max_new_tokens, ui.sort],
                 [ui.previous, ui.chart, ui.examples], concurrency_limit=1, concurrency_id=MODEL_GROUP, **UNDOCUMENTED)
    ui.cmp_a.change(on_compare, [ui.cmp_a, ui.cmp_b], ui.cmp_out, **UNDOCUMENTED)
    ui.cmp_b.change(on_compare, [ui.cmp_a, ui.cmp_b], ui.cmp_out, **UNDOCUMENTED)


def _wire_store(ui: SimpleNamespace) -> None:
    ui.delete.click(lambda n: (gr.update(visible=bool(n)), f"Delete adapter **{render.esc(n)}** for good?") if n else
                    (gr.update(visible=False), ""), ui.select, [ui.confirm_row, ui.confirm_text], **UNDOCUMENTED)
    ui.confirm_no.click(lambda: gr.update(visible=False), None, ui.confirm_row, **UNDOCUMENTED)
    ui.confirm_yes.click(on_delete_confirmed, ui.select, [ui.confirm_row, ui.message, ui.select], **UNDOCUMENTED).then(
        on_refresh, ui.select, ui.refreshed, **UNDOCUMENTED)
    ui.import_btn.click(on_import, [ui.import_file, ui.import_name], [ui.message, ui.import_file, ui.import_name,
                                                                     ui.imported],
                        **UNDOCUMENTED).success(on_refresh, ui.imported, ui.refreshed, **UNDOCUMENTED)
    ui.table.select(pick_row, None, ui.select, **UNDOCUMENTED)


def build() -> SimpleNamespace:
    ui = _components()
    ui.refreshed = [ui.table, ui.select, ui.cmp_a, ui.cmp_b]
    _wire_evaluation(ui)
    _wire_store(ui)
    return SimpleNamespace(refresh=on_refresh, refreshed=ui.refreshed, select=ui.select)
