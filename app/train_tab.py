"""Train tab: the job form (built from JobConfig by app.forms), the dataset picker with a preview of what the model
will be trained on, validation, YAML + CLI, YAML import, and Start (which queues the job in the store)."""
from __future__ import annotations

import functools
import threading
from types import SimpleNamespace

import gradio as gr

from app import render
from app.api import friendly, store
from app.forms import GROUPS, OBJECTIVE_GROUPS, Form
from app.verdict import Verdict, forget_if_unreadable, judge, notes_html, problems_html, split_problems
from finetune.config import ConfigError, JobConfig, ModelConfig, example_config
from finetune.errors import StudioError

_tokenizers: dict[tuple, object] = {}
_tok_lock = threading.Lock()
UNDOCUMENTED = dict(api_visibility="undocumented")


def _tokenizer(model_cfg: ModelConfig):
    """The tokenizer for previews, loaded once per model (transformers is imported here, never at app import)."""
    key = (model_cfg.name_or_path, model_cfg.revision)
    with _tok_lock:
        if key not in _tokenizers:
            from finetune.model import load_tokenizer

            _tokenizers[key] = load_tokenizer(model_cfg)
        return _tokenizers[key]


def waits_for_conversion(model_cfg: ModelConfig) -> bool:
    """The embedded model's first use converts it (tens of seconds): the page says so instead of a bare spinner."""
    from finetune.model import default_ready, is_embedded

    return is_embedded(model_cfg.name_or_path) and not default_ready()


def preparing_html() -> str:
    from finetune.paths import model_cache_dir

    return ('<div class="msg warn">Preparing the embedded model for its first use: converting SmolLM2 from its '
            f'GGUF file into <code>{render.esc(model_cache_dir())}</code> (once per machine, about a minute). '
            'The preview follows.</div>')


def loaded_tokenizer(model_cfg: ModelConfig):
    """The preview's tokenizer when it is already loaded, else None (a verdict never waits for a model)."""
    with _tok_lock:
        return _tokenizers.get((model_cfg.name_or_path, model_cfg.revision))


def judge_form(form: Form, values) -> Verdict:
    """Every problem of the form and its data at once (app.verdict), the stored-adapter rule included."""
    verdict = judge(form, values, loaded_tokenizer)
    if verdict.config is not None and existing_adapter(verdict.config.adapter_name):
        verdict.errors.append(f"adapter_name: an adapter named {verdict.config.adapter_name!r} is already in the "
                              "store: choose another name, or delete that adapter in the Adapters tab first")
    return verdict


def errors_html(message: str) -> str:
    """A ConfigError ("form: a.b: msg; c.d: msg") as a list, one bad field per line."""
    return problems_html(split_problems(message))


def ok_html(text: str) -> str:
    return f'<div class="msg ok">{text}</div>'


def _group(form: Form, default: JobConfig, title: str, shown: str | None = None, columns: int = 2,
           visible: bool = True) -> gr.Group:
    section, basic = {t: (s, b) for t, s, b in GROUPS}[title]
    return form.group(shown or title, section, basic, default, columns, visible)


def _objective_groups(ui: SimpleNamespace, default: JobConfig) -> None:
    """Each objective's own fields, shown while training.objective names it."""
    chosen = default.training.objective
    ui.objective_groups = {objective: _group(ui.form, default, title, visible=objective == chosen)
                           for objective, title in OBJECTIVE_GROUPS.items()}
    ui.form.fields["training.objective"].change(
        lambda o: [gr.update(visible=o == k) for k in ui.objective_groups], ui.form.fields["training.objective"],
        list(ui.objective_groups.values()), api_visibility="undocumented", concurrency_limit=None)


def _components(default: JobConfig) -> SimpleNamespace:
    ui = SimpleNamespace(form=Form())
    with gr.Row(equal_height=False, elem_classes=["toolbar"]):
        ui.form.adapter_name = gr.Textbox(value=default.adapter_name, label="adapter_name", scale=3, max_lines=1,
                                          info=JobConfig.model_fields["adapter_name"].description,
                                          elem_id="field-adapter_name")
        ui.validate = gr.Button("Validate", scale=1, elem_id="validate-btn")
        ui.start = gr.Button("Start training", variant="primary", scale=1, elem_id="start-btn")
    ui.message = gr.HTML(elem_id="train-message")
    ui.plan = gr.HTML(plan_html(default), elem_id="memory-plan")
    with gr.Row():
        with gr.Column(scale=1):
            _data_column(ui, default)
        with gr.Column(scale=1):
            with gr.Row(equal_height=True):
                _group(ui.form, default, "Model", columns=1)
                _group(ui.form, default, "Quantization", columns=1)
            _group(ui.form, default, "LoRA", columns=3)
            _group(ui.form, default, "Training")
            _objective_groups(ui, default)
            _group(ui.form, default, "Processes and GPUs")
            _group(ui.form, default, "Evaluation after training", columns=3)
    with gr.Accordion("YAML and command line", open=False, elem_id="yaml-accordion"):
        with gr.Row():
            with gr.Column(scale=1):
                ui.show_yaml = gr.Button("Show YAML and CLI command", elem_id="show-yaml-btn")
                ui.cli_code = gr.Code(language="shell", label="The same job from a terminal", interactive=False,
                                      elem_id="cli-code")
                ui.import_file = gr.File(label="Import a job YAML into the form", file_types=[".yaml", ".yml"],
                                         height=140, elem_id="import-yaml")
            with gr.Column(scale=1):
                ui.yaml_code = gr.Code(language="yaml", label="job.yaml", interactive=False, elem_id="yaml-code")
    ui.inputs = set(ui.form.components())
    return ui


def _data_column(ui: SimpleNamespace, default: JobConfig) -> None:
    with gr.Group(elem_classes=["form-group"]):
        gr.Markdown("**Dataset**", elem_classes=["group-title"])
        ui.form.dataset_picker(default)
    _group(ui.form, default, "Data", "Data options")
    ui.preview_btn = gr.Button("Preview dataset", elem_id="preview-btn")
    ui.preview_summary = gr.HTML(elem_id="preview-summary")
    ui.preview_plot = gr.BarPlot(render.histogram_frame(None), x="tokens", y="rows", sort=None,
                                 title="Rows per token length (after the chat template)", x_title="tokens per row",
                                 height=220, visible=False, elem_id="preview-hist")
    ui.preview_rows = gr.HTML(elem_id="preview-rows")


def _wire_config(ui: SimpleNamespace) -> None:
    """Validate, Show YAML and CLI, and import a job YAML into the form."""
    form, message = ui.form, ui.message

    @friendly
    def on_validate(values):
        verdict = judge_form(form, values)
        if verdict.errors:
            return problems_html(verdict.errors, verdict.notes)
        cfg = verdict.config
        return ok_html(f"Valid: <code>{render.esc(cfg.adapter_name)}</code> trains "
                       f"{render.esc(cfg.model.name_or_path)} ({cfg.model.quantization}) on "
                       f"<code>{render.esc(cfg.data.path)}</code>.") + notes_html(verdict.notes)

    @friendly
    def on_show_yaml(values):
        from app.forms import cli_commands

        try:
            cfg = form.to_config(values)
        except ConfigError as e:
            return errors_html(str(e)), gr.skip(), gr.skip()
        return "", cfg.to_yaml(), cli_commands(cfg)

    @friendly
    def on_import(path):
        if not path:
            return {message: gr.skip()}
        try:
            cfg = JobConfig.load(path)
        except ConfigError as e:
            return {message: errors_html(str(e))}
        out = form.from_config(cfg)
        out[message] = ok_html(f"Imported <code>{render.esc(cfg.adapter_name)}</code> into the form.")
        out[ui.yaml_code] = cfg.to_yaml()
        return out

    ui.validate.click(on_validate, ui.inputs, message, **UNDOCUMENTED)
    ui.show_yaml.click(on_show_yaml, ui.inputs, [message, ui.yaml_code, ui.cli_code], **UNDOCUMENTED)
    ui.import_file.upload(on_import, ui.import_file, [message, ui.yaml_code, *form.components()], **UNDOCUMENTED)


def _wire_preview(ui: SimpleNamespace) -> None:
    """The dataset preview: on the button, and whenever a file is uploaded."""
    @friendly
    def on_preview(values):
        from finetune import data as D

        try:
            cfg = ui.form.to_config(values, sections=("model", "data"))
            if waits_for_conversion(cfg.model):
                yield preparing_html(), gr.skip(), gr.skip()
            pv = D.preview(cfg.data, _tokenizer(cfg.model), n=5)
        except (ConfigError, D.DataError) as e:
            if isinstance(e, D.DataError):
                forget_if_unreadable(cfg.data)
            yield f'<div class="msg error">{render.esc(e)}</div>', gr.update(visible=False), ""
            return
        hist = render.histogram_frame(pv)
        yield (preview_summary_html(pv), gr.update(value=hist, sort=list(hist["tokens"]), visible=True),
               render.preview_html(pv))

    outputs = [ui.preview_summary, ui.preview_plot, ui.preview_rows]
    ui.preview_btn.click(on_preview, ui.inputs, outputs, **UNDOCUMENTED)
    ui.form.upload.upload(on_preview, ui.inputs, outputs, **UNDOCUMENTED)


def build(default: JobConfig | None = None) -> SimpleNamespace:
    ui = _components(default or example_config())
    follow_plan(ui.form, ui.inputs, ui.plan)
    _wire_config(ui)
    _wire_preview(ui)
    return SimpleNamespace(form=ui.form, start=ui.start, message=ui.message, inputs=ui.inputs, plan=ui.plan)


def follow_plan(form: Form, inputs: set, panel: gr.HTML) -> None:
    """The memory plan panel follows every field of the form."""
    @friendly
    def on_plan(values):
        try:
            return plan_html(form.to_config(values))
        except ConfigError as e:
            return f'<div class="mem-plan muted small">The memory plan needs a valid form: {render.esc(e)}</div>'

    gr.on([c.change for c in form.components()], on_plan, inputs, panel, show_progress="hidden",
          trigger_mode="always_last", api_visibility="undocumented")


@functools.lru_cache(maxsize=1)
def studio_device():
    """The device jobs of this studio train on (nvidia-smi, else RAM), detected once per process."""
    from finetune.plan import detect_device

    return detect_device()


def job_plan(cfg: JobConfig) -> dict | None:
    """The memory plan of cfg on the studio's device, or None when it cannot be made (no config.json to read)."""
    from finetune.plan import estimate

    try:
        return estimate(cfg, studio_device()).to_dict()
    except ConfigError:
        return None


def plan_html(cfg: JobConfig) -> str:
    from finetune.plan import find_config

    plan = job_plan(cfg)
    if plan is not None:
        return render.memory_plan_html(plan)
    try:
        find_config(cfg.model.name_or_path, cfg.model.revision)
    except ConfigError as e:
        return f'<div class="mem-plan muted small">No memory plan: {render.esc(e)}</div>'
    return '<div class="mem-plan muted small">No memory plan for this model.</div>'



def preview_summary_html(pv: dict) -> str:
    """Detected format, row count, token lengths and how many rows max_seq_length would cut."""
    lengths = pv.get("token_lengths") or {}
    sampled, truncated = pv.get("sampled_rows"), pv.get("truncated") or 0
    of = f" of {sampled}" if sampled and sampled != pv.get("num_rows") else ""
    cells = [("detected format", pv.get("format")), ("rows", pv.get("num_rows")),
             ("tokens per row (median / p95 / max)", f'{lengths.get("p50", "–")} / {lengths.get("p95", "–")} / {lengths.get("max", "–")}'),
             ("max_seq_length", pv.get("max_seq_length")), (f"rows truncated{of}", truncated)]
    warn = ""
    if truncated:
        warn = (f'<div class="msg warn">{render.esc(truncated)} row(s){render.esc(of)} are longer than max_seq_length and will be cut: '
                'raise data.max_seq_length or shorten them.</div>')
    source = f'<div class="muted small">source: <code>{render.esc(pv.get("source"))}</code></div>' if pv.get("source") else ""
    return ('<div class="stat-grid">' + "".join(
        f'<div class="stat"><div class="k">{k}</div><div class="v">{render.esc(v)}</div></div>'
        for k, v in cells if v is not None) + "</div>" + warn + source)


def existing_adapter(name: str) -> bool:
    from finetune.store import adapter_path

    return (adapter_path(name) / "adapter_config.json").is_file()


def start_job(form: Form, values, warned: str = "") -> tuple[str | None, str, str]:
    """Validate and queue; returns (job id or None, message HTML, the config warned about). The form never replaces
    a stored adapter by accident (a script may, through /submit_job). A job whose memory plan does not fit is
    queued only when Start is pressed again for the same config, after the warning with the suggestions."""
    verdict = judge_form(form, values)
    if verdict.errors:
        return None, problems_html(verdict.errors, verdict.notes, refused=True), ""
    cfg = verdict.config
    plan = job_plan(cfg)
    key = cfg.to_yaml()
    if plan is not None and not plan["fits"] and warned != key:
        return None, (render.plan_warning_html(plan) + '<div class="msg warn">Press <b>Start training</b> again to '
                      'queue it anyway.</div>'), key
    try:
        job_id = store().submit(cfg)  # checks the data again: the file may have changed since the verdict
    except StudioError as e:
        return None, problems_html(split_problems(str(e)), refused=True), ""
    return job_id, ok_html(f"Queued job <code>{render.esc(job_id)}</code> for adapter <code>{render.esc(cfg.adapter_name)}</code>.") + notes_html(verdict.notes), ""
