"""The Sweep panel (an accordion of the Train tab): the search space over the form's own job config, the budget,
objective, sampler and pruner; the trials live (objective, state incl. pruned, best so far), parameter
importances, and "Train the best config". The panel builds a sweep YAML and calls the engine (finetune.sweep),
the same thing /submit_sweep and `python -m finetune sweep` do."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pandas as pd
import yaml

from app import render
from app.api import friendly, store
from app.forms import Form
from app.train_tab import ok_html
from finetune.sweep.config import OBJECTIVES, TARGET_PRESETS, Space, SweepConfig

TRIAL_COLUMNS = ["trial", "state", "objective", "best", "parameters", "job id"]
PRUNERS = ["median", "successive_halving", "none"]


def _choice(label: str, options: list, value: list, info: str) -> gr.Dropdown:
    return gr.Dropdown(choices=options, value=value, multiselect=True, label=label, info=info,
                       elem_id=f"sweep-{label.replace('.', '-')}")


def _space_widgets(ui: SimpleNamespace) -> None:
    with gr.Row():
        ui.lr_low = gr.Number(1e-4, label="learning_rate low", minimum=1e-7, elem_id="sweep-lr-low",
                              info="Log-uniform between low and high.")
        ui.lr_high = gr.Number(3e-3, label="learning_rate high", minimum=1e-7, elem_id="sweep-lr-high")
        ui.r = _choice("lora.r", [4, 8, 16, 32, 64], [8, 16, 32], Space.model_fields["r"].description)
        ui.alpha = _choice("lora_alpha multiple", [0.5, 1, 2, 4], [1, 2], "lora.lora_alpha = r x this.")
    with gr.Row():
        ui.steps = _choice("training.max_steps", [25, 50, 100, 200, 400], [], "Empty: the form's value.")
        ui.dropout = _choice("lora.lora_dropout", [0.0, 0.05, 0.1], [], "Empty: the form's value.")
        ui.batch = _choice("per_device_train_batch_size", [1, 2, 4, 8], [], "Empty: the form's value.")
        ui.targets = _choice("lora.target_modules", list(TARGET_PRESETS), [], "Presets; empty: the form's value.")


def _budget_widgets(ui: SimpleNamespace) -> None:
    with gr.Row():
        ui.n_trials = gr.Number(8, precision=0, minimum=1, maximum=1000, label="n_trials", elem_id="sweep-n-trials")
        ui.timeout = gr.Number(30, minimum=0, label="timeout (minutes)", info="0: no wall-clock budget.",
                               elem_id="sweep-timeout")
        ui.objective = gr.Dropdown(list(OBJECTIVES), value="val_loss", label="objective", elem_id="sweep-objective",
                                   info=SweepConfig.model_fields["objective"].description)
        ui.sampler = gr.Dropdown(["tpe", "random"], value="tpe", label="sampler", elem_id="sweep-sampler")
        ui.pruner = gr.Dropdown(PRUNERS, value="median", label="pruner", elem_id="sweep-pruner")
        ui.report_every = gr.Number(25, precision=0, minimum=0, label="report_every", elem_id="sweep-report-every",
                                    info=SweepConfig.model_fields["report_every"].description)


def sweep_spec(form: Form, values: dict, ui: SimpleNamespace) -> dict:
    """The sweep the panel describes, over the Train form's config (names as in a sweep YAML)."""
    base = form.to_config(values)
    space: dict = {"learning_rate": {"low": values[ui.lr_low], "high": values[ui.lr_high]}}
    for key, comp in (("r", ui.r), ("lora_alpha_multiple", ui.alpha), ("max_steps", ui.steps),
                      ("lora_dropout", ui.dropout), ("per_device_train_batch_size", ui.batch),
                      ("target_modules", ui.targets)):
        if values.get(comp):
            space[key] = list(values[comp])
    return {"name": base.adapter_name[:40], "base": base.model_dump(mode="json"), "space": space,
            "n_trials": int(values[ui.n_trials] or 1), "timeout": float(values[ui.timeout] or 0) * 60 or None,
            "objective": values[ui.objective], "sampler": values[ui.sampler], "pruner": values[ui.pruner],
            "report_every": int(values[ui.report_every] or 0)}


def params_text(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def trials_frame(info: dict) -> pd.DataFrame:
    best = (info.get("best") or {}).get("number")
    rows = [[t["number"], t["state"], render.fmt_num(t["value"]) if t["value"] is not None else "–",
             "★" if t["number"] == best else "", params_text(t["params"]), t["job_id"] or "–"]
            for t in info.get("trials", [])]
    return pd.DataFrame(rows, columns=TRIAL_COLUMNS)


def summary_html(info: dict | None) -> str:
    if not info:
        return '<div class="msg">No sweep selected.</div>'
    job, best = info["job"], info.get("best")
    head = (f'{render.state_badge(job["state"])} <b>{render.esc(job["name"])}</b> · {info["finished"]} of '
            f'{info["n_trials"]} trials finished · objective <code>{render.esc(info["objective"])}</code> '
            f'({render.esc(info["direction"])})')
    best_line = (f'Best so far: trial {best["number"]}, {render.esc(info["objective"])} = {render.fmt_num(best["value"])}, '
                 f'<code>{render.esc(params_text(best["params"]))}</code>' if best else "No trial has completed yet.")
    imp = info.get("importances") or {}
    imp_line = ("Parameter importances: " + ", ".join(f"{render.esc(k)} {v:.2f}" for k, v in imp.items())
                if imp else "Parameter importances appear once two trials have completed.")
    error = f'<div class="msg error">{render.esc(job["error"])}</div>' if job.get("error") else ""
    return f'<div class="sweep-summary" data-state="{render.esc(job["state"])}">{head}<br>{best_line}<br>{imp_line}{error}</div>'


def _choices_on_open(current: str | None):
    """The sweeps, newest first; the newest is selected when none is."""
    choices = sweep_choices()
    return gr.update(choices=choices, value=current or (choices[0][1] if choices else None))


def sweep_choices() -> list[tuple[str, str]]:
    return [(f"{r['id']} · {r['name']} · {r['state']}", r["id"]) for r in store().list_jobs() if r["kind"] == "sweep"]


def _view_widgets(ui: SimpleNamespace) -> None:
    with gr.Row():
        ui.start = gr.Button("Start sweep", variant="primary", elem_id="sweep-start-btn")
        ui.select = gr.Dropdown(choices=[], label="sweep", elem_id="sweep-select", scale=3, allow_custom_value=False)
        ui.train_best = gr.Button("Train the best config", elem_id="sweep-train-best-btn")
    ui.message = gr.HTML(elem_id="sweep-message")
    ui.summary = gr.HTML(summary_html(None), elem_id="sweep-summary")
    ui.trials = gr.Dataframe(trials_frame({}), label="trials", interactive=False, elem_id="sweep-trials")
    ui.timer = gr.Timer(3.0)


def build(form: Form) -> SimpleNamespace:
    """Inside the Train tab. Reads the form's values when a sweep starts: the sweep's base is the form's job."""
    ui = SimpleNamespace()
    with gr.Accordion("Hyper-parameter sweep", open=False, elem_id="sweep-accordion") as ui.accordion:
        gr.Markdown("Trials are training jobs of the config above with these changes; each shows in **Jobs**. "
                    "A pruned trial was stopped early because its validation loss trailed the others'.")
        _space_widgets(ui)
        _budget_widgets(ui)
        _view_widgets(ui)
    _wire(ui, form)
    return ui


def _refresh(job_id: str | None):
    from finetune import sweep

    if not job_id:
        return summary_html(None), trials_frame({})
    info = sweep.status_of(store(), job_id)
    return summary_html(info), trials_frame(info)


def _wire(ui: SimpleNamespace, form: Form) -> None:
    quiet = dict(api_visibility="undocumented")
    panel_inputs = {ui.lr_low, ui.lr_high, ui.r, ui.alpha, ui.steps, ui.dropout, ui.batch, ui.targets, ui.n_trials,
                    ui.timeout, ui.objective, ui.sampler, ui.pruner, ui.report_every}

    @friendly
    def on_start(values):
        from finetune import sweep

        job_id = sweep.submit(store(), yaml.safe_dump(sweep_spec(form, values, ui)), "sweep")
        return (ok_html(f"Queued sweep <code>{render.esc(job_id)}</code>."),
                gr.update(choices=sweep_choices(), value=job_id))

    @friendly
    def on_train_best(job_id):
        from finetune import sweep

        if not job_id:
            raise gr.Error("select a sweep first")
        new_id = sweep.train_best(store(), job_id)
        return ok_html(f"Queued job <code>{render.esc(new_id)}</code> with the best trial's config (see Jobs).")

    ui.start.click(on_start, set(form.components()) | panel_inputs, [ui.message, ui.select], **quiet)
    ui.train_best.click(on_train_best, ui.select, ui.message, **quiet)
    ui.select.change(friendly(_refresh), ui.select, [ui.summary, ui.trials], **quiet)
    ui.timer.tick(friendly(_refresh), ui.select, [ui.summary, ui.trials], concurrency_limit=None, **quiet)
    ui.select.focus(lambda: gr.update(choices=sweep_choices()), None, ui.select, **quiet)
    ui.accordion.expand(friendly(_choices_on_open), ui.select, ui.select, **quiet)
