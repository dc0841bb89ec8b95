"""The one place where UI fields map to JobConfig.

Widgets are derived from the pydantic fields: a number widget for numbers (bounds from the field's constraints),
a dropdown for Literal choices, a checkbox for booleans, defaults from the config, the field's description as help.
A new config field therefore appears in the form by itself (folded under "Advanced" unless listed in BASIC below).
The dataset picker (demo / upload / path) is the one hand-made mapping: it becomes `data.path`.
"""
from __future__ import annotations

import math
import shlex
import shutil
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import annotated_types as at
import gradio as gr

from finetune.config import DEMO_DATASET, ConfigError, JobConfig, choices, example_config
from finetune.fsutil import sha256_file
from finetune.paths import uploads_dir

# Sections of the form (title, JobConfig section, fields shown up front). Every other field of the section goes into
# the section's "Advanced" accordion, folded.
GROUPS: list[tuple[str, str, list[str]]] = [
    ("Model", "model", ["name_or_path"]),
    ("Quantization", "model", ["quantization"]),
    ("LoRA", "lora", ["r", "lora_alpha", "lora_dropout"]),
    ("Data", "data", ["format", "max_seq_length"]),
    ("Training", "training", ["objective", "max_steps", "num_train_epochs", "learning_rate",
                              "per_device_train_batch_size"]),
    ("Evaluation after training", "evaluation", ["enabled", "max_examples", "max_new_tokens"]),
    ("DPO (preference tuning)", "dpo", ["beta", "loss_type"]),
    ("Distillation", "distill", ["teacher_model_name_or_path", "teacher_quantization", "alpha", "temperature"]),
    ("Processes and GPUs", "launch", ["num_processes", "strategy"]),
]
# The section of each training.objective's own fields (shown only while that objective is chosen).
OBJECTIVE_GROUPS = {"dpo": "DPO (preference tuning)", "distill": "Distillation"}
# A count that may also be "auto" (launch.num_processes): a dropdown of common counts that takes any other number.
COUNT_CHOICES = ["auto", "1", "2", "4", "8"]
# Model fields that belong to the Quantization group rather than the Model group.
QUANT_FIELDS = ["quantization", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant"]
# data.path is set by the dataset picker, not by a field widget.
PICKED = {"data.path"}

SOURCE_DEMO = "Demo: Python docs Q&A (built in)"
SOURCE_UPLOAD = "Upload a file"
SOURCE_PATH = "Path or hub id"
SOURCES = [SOURCE_DEMO, SOURCE_UPLOAD, SOURCE_PATH]
UPLOAD_TYPES = [".jsonl", ".json", ".csv", ".parquet"]


def name_bounds_errors(number: gr.Number, field_path: str) -> gr.Number:
    """Let an out-of-range number through to the config's validation instead of gradio's toast: JobConfig has the
    same bounds and reports every bad field at once, by name. Wrapped on the instance: subclassing a gradio
    component makes gradio write a .pyi stub beside this module."""
    original = number.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except gr.Error:
            return payload  # out of the widget's range: JobConfig names it with the other bad fields

    number.preprocess = preprocess
    return number


def _host_note(path: str) -> str:
    """What 'auto' means on this studio's host, beside launch.num_processes."""
    if path != "launch.num_processes":
        return ""
    from finetune.jobs.process import host_gpus

    n = len(host_gpus())
    return f" This host: {n} GPU{'s' if n != 1 else ''}." if n else " This host has no GPU."


# --- field introspection ----------------------------------------------------------------------------------------
def _section_class(section: str):
    return JobConfig.model_fields[section].annotation


def _strip_optional(tp) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def _kind(tp) -> str:
    base, _ = _strip_optional(tp)
    if typing.get_origin(base) is Literal:
        return "choice"
    members = [typing.get_origin(a) or a for a in typing.get_args(base)]
    if typing.get_origin(base) in (typing.Union, types.UnionType) and set(members) == {int, Literal}:
        return "count"
    if base is bool:
        return "bool"
    if base is int:
        return "int"
    if base is float:
        return "float"
    if typing.get_origin(base) in (typing.Union, types.UnionType) and list in [typing.get_origin(a) or a for a in typing.get_args(base)]:
        return "list_or_str"
    return "str"


def _bounds(info, kind: str) -> tuple[float | None, float | None]:
    lo = hi = None
    for m in info.metadata:
        if isinstance(m, at.Ge):
            lo = m.ge
        elif isinstance(m, at.Gt):
            lo = m.gt + 1 if kind == "int" else m.gt  # exclusive float bounds: the validator names the field
        elif isinstance(m, at.Le):
            hi = m.le
        elif isinstance(m, at.Lt):
            hi = m.lt - 1 if kind == "int" else m.lt
    return lo, hi


def _step(default, kind: str) -> float:
    if kind == "int":
        return 1
    if isinstance(default, (int, float)) and default > 0:
        return 10 ** math.floor(math.log10(default))
    return 0.01


def _to_widget_value(value, kind: str):
    if kind == "count":
        return str(value)
    if kind == "list_or_str":
        return ", ".join(value) if isinstance(value, list) else (value or "")
    if kind == "str":
        return "" if value is None else str(value)
    return value


def _from_widget_value(value, kind: str, optional: bool):
    if kind in ("str", "list_or_str"):
        text = (value or "").strip() if isinstance(value, str) else value
        if text in ("", None):
            return None if optional else ""
        if kind == "list_or_str" and isinstance(text, str) and "," in text:
            return [p.strip() for p in text.split(",") if p.strip()]
        return text
    if kind in ("int", "float") and value is None:
        return None  # optional number left empty (a required one is then named by the validator)
    return value


@dataclass
class Form:
    """The Train form's widgets. `fields` maps a config path ("training.max_steps") to its component."""

    fields: dict[str, gr.components.Component] = field(default_factory=dict)
    kinds: dict[str, tuple[str, bool]] = field(default_factory=dict)
    adapter_name: gr.Textbox | None = None
    source: gr.Radio | None = None
    upload: gr.File | None = None
    path: gr.Textbox | None = None

    # --- building (inside a gr.Blocks context) -------------------------------------------------------------------
    def widget(self, section: str, name: str, default_cfg: JobConfig):
        info = _section_class(section).model_fields[name]
        path = f"{section}.{name}"
        kind = _kind(info.annotation)
        _, optional = _strip_optional(info.annotation)
        if optional and kind in ("int", "float"):
            # A gradio Number cannot stay empty: once its accordion opens it shows, and sends, 0. As text, empty
            # means not set and the config parses (and names) what is typed.
            kind = "str"
        value = getattr(getattr(default_cfg, section), name)
        common = dict(label=name, info=info.description + _host_note(path), elem_id=f"field-{section}-{name}")
        if kind == "choice":
            base, _ = _strip_optional(info.annotation)
            w = gr.Dropdown(choices=choices(base), value=value, **common)
        elif kind == "bool":
            w = gr.Checkbox(value=bool(value), **common)
        elif kind == "count":
            w = gr.Dropdown(choices=COUNT_CHOICES, value=str(value), allow_custom_value=True, **common)
        elif kind in ("int", "float"):
            lo, hi = _bounds(info, kind)
            if path == "training.max_steps":
                lo = -1
            w = name_bounds_errors(gr.Number(value=value, precision=0 if kind == "int" else None, minimum=lo, maximum=hi,
                                             step=_step(info.default, kind),
                                             placeholder="empty = not set" if optional else None, **common), path)
        else:
            w = gr.Textbox(value=_to_widget_value(value, kind), max_lines=1 if name != "system_prompt" else 4,
                           placeholder="empty = not set" if optional else None, **common)
        self.fields[path] = w
        self.kinds[path] = (kind, optional)
        return w

    def group(self, title: str, section: str, basic: list[str], default_cfg: JobConfig, columns: int = 2,
              visible: bool = True) -> gr.Group:
        """One titled group: its basic fields, then the rest of the section folded under Advanced."""
        names = list(_section_class(section).model_fields)
        if section == "model":
            names = [n for n in names if (n in QUANT_FIELDS) == (title == "Quantization")]
        names = [n for n in names if f"{section}.{n}" not in PICKED]
        advanced = [n for n in names if n not in basic]
        with gr.Group(elem_classes=["form-group"], visible=visible, elem_id=f"group-{section}") as box:
            gr.Markdown(f"**{title}**", elem_classes=["group-title"])
            self._rows(section, basic, default_cfg, columns)
            if advanced:
                with gr.Accordion("Advanced options", open=False):
                    self._rows(section, advanced, default_cfg, columns)
        return box

    def _rows(self, section: str, names: list[str], default_cfg: JobConfig, columns: int) -> None:
        for i in range(0, len(names), columns):
            with gr.Row(equal_height=True):
                for n in names[i:i + columns]:
                    self.widget(section, n, default_cfg)

    def dataset_picker(self, default_cfg: JobConfig) -> None:
        source, text = picker_value(default_cfg.data.path)
        self.source = gr.Radio(SOURCES, value=source, label="Training data", elem_id="dataset-source",
                               info="The demo teaches the model what Python standard-library functions do.")
        self.upload = gr.File(label="Training file (JSONL, JSON, CSV or Parquet)", file_types=UPLOAD_TYPES,
                              visible=source == SOURCE_UPLOAD, elem_id="dataset-upload")
        self.path = gr.Textbox(value=text, label="data.path", max_lines=1, visible=source == SOURCE_PATH,
                               info="A local file or folder on the studio's machine, or a Hugging Face hub id.",
                               placeholder="/data/my_train.jsonl", elem_id="dataset-path")
        self.source.change(lambda s: (gr.update(visible=s == SOURCE_UPLOAD), gr.update(visible=s == SOURCE_PATH)),
                           self.source, [self.upload, self.path], api_visibility="undocumented", concurrency_limit=None)

    # --- values <-> config ---------------------------------------------------------------------------------------
    def components(self) -> list:
        return [self.adapter_name, self.source, self.upload, self.path, *self.fields.values()]

    def to_config(self, values: dict, sections: tuple[str, ...] | None = None) -> JobConfig:
        """Form values (the dict gradio passes for `inputs=set(form.components())`) -> a validated JobConfig.
        With `sections`, only those sections come from the form (the dataset preview needs just model and data).
        Raises ConfigError naming each bad field."""
        data: dict[str, Any] = {} if sections else {"adapter_name": (values.get(self.adapter_name) or "").strip()}
        for path, comp in self.fields.items():
            section, name = path.split(".")
            if sections and section not in sections:
                continue
            kind, optional = self.kinds[path]
            data.setdefault(section, {})[name] = _from_widget_value(values.get(comp), kind, optional)
        data.setdefault("data", {})["path"] = dataset_path(values.get(self.source), values.get(self.upload),
                                                          values.get(self.path))
        return JobConfig.parse(data, "form")

    def from_config(self, cfg: JobConfig) -> dict:
        """Updates that load a config into the form (Duplicate, Import YAML)."""
        out: dict = {self.adapter_name: cfg.adapter_name}
        for path, comp in self.fields.items():
            section, name = path.split(".")
            out[comp] = _to_widget_value(getattr(getattr(cfg, section), name), self.kinds[path][0])
        source, text = picker_value(cfg.data.path)
        out[self.source] = source
        out[self.upload] = gr.update(value=None, visible=source == SOURCE_UPLOAD)
        out[self.path] = gr.update(value=text, visible=source == SOURCE_PATH)
        return out


# --- the dataset picker -----------------------------------------------------------------------------------------
def picker_value(path: str) -> tuple[str, str]:
    """(source, path text) that show a config's data.path in the picker."""
    if path == DEMO_DATASET:
        return SOURCE_DEMO, ""
    return SOURCE_PATH, path


def keep_upload(tmp_path: str) -> str:
    """Copy an uploaded file out of gradio's temporary cache into STUDIO_HOME/uploads/ (content-addressed), so a job
    queued now still finds it after the studio restarts or gradio cleans its cache."""
    src = Path(tmp_path)
    suffix = src.suffix.lower()
    if suffix not in UPLOAD_TYPES:
        raise ConfigError(f"data.path: {src.name} is not a {', '.join(UPLOAD_TYPES)} file")
    digest = sha256_file(src)
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in src.stem)[:60] or "data"
    dest = uploads_dir() / f"{stem}-{digest[:12]}{suffix}"
    if not dest.exists():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(dest)
    return str(dest)


def dataset_path(source: str | None, upload, path: str | None) -> str:
    if source == SOURCE_UPLOAD:
        if not upload:
            raise ConfigError("data.path: choose a file to upload (or pick the demo dataset)")
        return keep_upload(upload if isinstance(upload, str) else getattr(upload, "name", str(upload)))
    if source == SOURCE_PATH:
        if not (path or "").strip():
            raise ConfigError("data.path: give a file path or hub id (or pick the demo dataset)")
        return path.strip()
    return DEMO_DATASET


# --- YAML and the command line ---------------------------------------------------------------------------------
def overrides(cfg: JobConfig, base: JobConfig | None = None) -> list[str]:
    """`section.field=value` for every field that differs from `base` (the CLI's --example config)."""
    import yaml

    base = base or example_config()
    a, b = cfg.model_dump(mode="json"), base.model_dump(mode="json")
    out = []
    for key, value in a.items():
        if isinstance(value, dict):
            for name, v in value.items():
                if v != b[key].get(name):
                    out.append(f"{key}.{name}={_scalar(v, yaml)}")
        elif value != b.get(key):
            out.append(f"{key}={_scalar(value, yaml)}")
    return out


def _scalar(v, yaml) -> str:
    text = yaml.safe_dump(v, default_flow_style=True).strip()
    return text.removesuffix("\n...").strip()


def cli_commands(cfg: JobConfig) -> str:
    sets = " ".join(f"--set {shlex.quote(o)}" for o in overrides(cfg))
    return "\n".join([
        "# the same job from a terminal (in the project folder):",
        "python -m finetune config --example > job.yaml",
        f"python -m finetune train job.yaml {sets}".rstrip(),
        "",
        "# or save the YAML above as job.yaml and queue it in the studio's job list:",
        "python -m finetune jobs submit job.yaml",
    ])
