"""The UI's pure parts, without a server: the form <-> JobConfig mapping (the only one), the rendering helpers, and
that importing the app never imports torch or transformers."""
from __future__ import annotations

import subprocess
import sys

import gradio as gr
import pytest

from app import forms, render
from finetune.config import DEMO_DATASET, ConfigError, JobConfig, example_config
from tests.studio_server import ROOT


@pytest.fixture(scope="module")
def form():
    f = forms.Form()
    cfg = example_config()
    with gr.Blocks():
        f.adapter_name = gr.Textbox(value=cfg.adapter_name)
        f.dataset_picker(cfg)
        for title, section, basic in forms.GROUPS:
            f.group(title, section, basic, cfg)
    return f


def values_of(form: forms.Form, cfg: JobConfig) -> dict:
    """What the browser would send for a form showing `cfg`."""
    out = {}
    for comp, v in form.from_config(cfg).items():
        out[comp] = v.get("value") if isinstance(v, dict) else v
    return out


def test_every_config_field_has_one_widget(form):
    paths = {f"{s}.{n}" for s in ("model", "lora", "data", "training", "evaluation", "launch", "dpo", "distill")
             for n in JobConfig.model_fields[s].annotation.model_fields}
    assert set(form.fields) == paths - forms.PICKED


def test_widgets_follow_the_field_types(form):
    f = form.fields
    assert isinstance(f["model.quantization"], gr.Dropdown)
    assert [c[0] for c in f["model.quantization"].choices] == ["none", "8bit", "4bit"]
    assert isinstance(f["training.gradient_checkpointing"], gr.Checkbox)
    r = f["lora.r"]
    assert isinstance(r, gr.Number) and r.precision == 0 and r.minimum == 1 and r.maximum == 1024
    assert f["lora.lora_dropout"].minimum == 0.0 and f["lora.lora_dropout"].maximum == 1.0
    assert f["training.max_steps"].minimum == -1
    assert f["lora.r"].info == JobConfig.model_fields["lora"].annotation.model_fields["r"].description
    assert f["training.learning_rate"].value == 2e-4


def test_round_trip_through_the_form(form, tmp_path):
    cfg = example_config().with_overrides(["training.max_steps=7", "lora.target_modules=[q_proj, v_proj]",
                                           "data.system_prompt=Be brief.", "model.quantization=none",
                                           f"data.path={tmp_path / 'x.jsonl'}", "data.max_samples=10"])
    back = form.to_config(values_of(form, cfg))
    assert back == cfg


def test_processes_and_strategy_in_the_form(form):
    w = form.fields["launch.num_processes"]
    assert isinstance(w, gr.Dropdown) and w.value == "auto" and w.allow_custom_value
    assert [c[0] for c in form.fields["launch.strategy"].choices] == ["ddp", "fsdp"]
    cfg = example_config().with_overrides(["launch.num_processes=3", "model.quantization=none",
                                           "launch.strategy=fsdp"])
    values = values_of(form, cfg)
    assert values[w] == "3" and form.to_config(values) == cfg
    values[w] = "two"
    with pytest.raises(ConfigError, match="launch.num_processes 'two'"):
        form.to_config(values)
    cells = render.stats_html({"peak_memory_mb": 1900.0, "rank_peak_memory_mb": [1875.3, 1900.0]})
    assert "peak memory per rank (2)" in cells and "1,875 / 1,900 MiB" in cells


def test_demo_dataset_and_empty_optionals(form):
    cfg = example_config()
    values = values_of(form, cfg)
    assert values[form.source] == forms.SOURCE_DEMO
    back = form.to_config(values)
    assert back.data.path == DEMO_DATASET and back.data.max_samples is None and back.model.revision is None


def test_optional_numbers_stay_empty_and_name_bad_text(form):
    """Optional numbers are text boxes: empty is not set (a gradio Number would send 0, which for
    training.gradient_checkpointing_layers means no layer checkpointed), a number is parsed, anything else is named."""
    w = form.fields["training.gradient_checkpointing_layers"]
    assert isinstance(w, gr.Textbox) and w.value == ""
    values = values_of(form, example_config())
    assert form.to_config(values).training.gradient_checkpointing_layers is None
    values[w], values[form.fields["data.max_samples"]] = " 12 ", "40"
    cfg = form.to_config(values)
    assert cfg.training.gradient_checkpointing_layers == 12 and cfg.data.max_samples == 40
    values[w] = "half"
    with pytest.raises(ConfigError, match="training.gradient_checkpointing_layers"):
        form.to_config(values)


def test_errors_name_the_fields(form):
    values = values_of(form, example_config())
    values[form.fields["training.max_steps"]] = 0
    values[form.adapter_name] = "../up"
    with pytest.raises(ConfigError) as e:
        form.to_config(values)
    assert "training.max_steps" in str(e.value) and "adapter_name" in str(e.value)
    values = values_of(form, example_config())
    values[form.source] = forms.SOURCE_UPLOAD
    with pytest.raises(ConfigError, match="data.path"):
        form.to_config(values)


def test_out_of_range_numbers_are_all_named_together(form):
    """The widgets' range checks do not stop at the first number: the config names every bad one at once."""
    values = values_of(form, example_config())
    for path, bad in (("lora.lora_dropout", 1.5), ("lora.r", 0), ("training.learning_rate", -0.1)):
        values[form.fields[path]] = form.fields[path].preprocess(bad)
    with pytest.raises(ConfigError) as e:
        form.to_config(values)
    assert all(p in str(e.value) for p in ("lora.lora_dropout", "lora.r", "training.learning_rate")), e.value


def test_upload_is_kept_in_the_studio(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    src = tmp_path / "my data.jsonl"
    src.write_text('{"text": "hi"}\n')
    kept = forms.keep_upload(str(src))
    assert kept.startswith(str(tmp_path / "home" / "uploads")) and kept.endswith(".jsonl")
    assert forms.keep_upload(str(src)) == kept  # content-addressed: no duplicate copies
    bad = tmp_path / "evil.sh"
    bad.write_text("rm -rf /")
    with pytest.raises(ConfigError, match="data.path"):
        forms.keep_upload(str(bad))


def test_cli_command_names_the_changes():
    cfg = example_config().with_overrides(["training.max_steps=3", "adapter_name=mine"])
    text = forms.cli_commands(cfg)
    assert "--set training.max_steps=3" in text and "--set adapter_name=mine" in text
    assert "python -m finetune train job.yaml" in text


def test_eval_chart_and_examples():
    paired = {"rouge_l": {"mean_diff": 0.1, "ci_low": 0.02, "ci_high": 0.2, "wins": 3, "ties": 1, "losses": 0},
              "val_loss": {"mean_diff": -0.2, "ci_low": -0.3, "ci_high": 0.05, "wins": 2, "ties": 0, "losses": 2}}
    result = {"adapter": "a", "metrics": {"base": {"rouge_l": 0.3, "val_loss": 2.0}, "adapter": {"rouge_l": 0.4, "val_loss": 1.8}},
              "paired": paired, "data": {"n": 4, "path": "h.jsonl", "split": "validation"},
              "examples": [{"prompt": "p1", "reference": "r", "base": "b", "adapter": "a",
                            "scores": {"base": {"rouge_l": 0.5}, "adapter": {"rouge_l": 0.4}, "diff": {"rouge_l": -0.1}}},
                           {"prompt": "p2", "reference": "r", "base": "b", "adapter": "a",
                            "scores": {"base": {"rouge_l": 0.1}, "adapter": {"rouge_l": 0.6}, "diff": {"rouge_l": 0.5}}}]}
    html = render.eval_chart_html(result)
    assert "+0.100" in html and "[+0.020, +0.200]" in html and "3 / 1 / 0" in html
    assert "#16a34a" in html and "#6b7280" in html  # ROUGE-L interval above 0: green; loss interval crosses 0: grey
    df = render.examples_frame(result, "rouge_l")
    assert list(df["prompt"]) == ["p2", "p1"] and df["gain"].iloc[0] == 0.5


def test_loss_chart_shows_single_points():
    html = render.loss_chart({"state": "completed", "loss_history": [[1, 2.5], [2, 2.0]], "eval_history": [[2, 2.2]]})
    assert 'data-series="train loss" data-points="2"' in html and 'data-series="eval loss" data-points="1"' in html
    assert html.count("<circle") >= 3 + 2  # every point is marked (and the legend has a marker per series)
    assert render.nice_ticks(1.6, 2.7, 5) == [1.5, 1.75, 2.0, 2.25, 2.5, 2.75]


def test_a_long_legend_wraps_under_the_title():
    import re

    few = render.line_chart_svg({"a": [(1, 1.0)], "b": [(1, 2.0)]}, "Loss")
    many = render.line_chart_svg({f"demo-sweep-trial-{i} (abcd)": [(1, float(i))] for i in range(6)}, "Loss")
    assert 'viewBox="0 0 900 300"' in few and re.search(r'<text x="[\d.]+" y="20" class="legend">a<', few)
    legend_rows = {int(y) for y in re.findall(r'<text x="[\d.-]+" y="(\d+)" class="legend">', many)}
    assert 20 not in legend_rows and len(legend_rows) >= 2  # the title's line stays free, the rest wraps
    x_min = min(float(x) for x in re.findall(r'<line x1="([\d.-]+)" x2="[\d.-]+" y1="\d+" y2="\d+" stroke="#', many))
    assert x_min >= 64  # no legend item runs off the chart's left edge


def test_importing_the_app_does_not_import_torch():
    code = ("import sys, app.main, launch; app.main.build_app(); "
            "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
