"""The studio's named API: what a script does through gradio_client (documented in docs/api.md).

    from gradio_client import Client
    c = Client("http://127.0.0.1:7860/")
    job = c.predict(open("job.yaml").read(), api_name="/submit_job")
    c.predict(job, api_name="/job_status")      # {"state": "running", "step": 3, "total_steps": 50, ...}

Every function here is plain Python with type hints (gr.api derives the endpoint's schema from them) and turns
every failure into a gr.Error with a sentence that names the field, file or job: a client sees the message, never
a traceback. Model work (generate, evaluate) is registered under the shared "model" concurrency group.
Heavy modules (finetune.evaluation.generate, finetune.evaluation.evaluate, and through them torch) are imported inside the functions.
"""
from __future__ import annotations

import functools
import html
import inspect
import json
import logging
import traceback
from pathlib import Path

import gradio as gr

from finetune import limits
from finetune.config import ConfigError, JobConfig
from finetune.errors import expected, plain_message

log = logging.getLogger("studio.api")
MODEL_GROUP = "model"


def user_error(e: BaseException, for_page: bool = False) -> gr.Error:
    """A gr.Error with finetune.errors.plain_message's sentence; an unexpected error's traceback is logged on the
    server, never sent to the client. for_page: the message is shown in the page, where Gradio renders it as HTML,
    and may quote what a client or a file said: it is escaped."""
    err = _as_gr_error(e)
    err.print_exception = False  # a message for the user, not a fault: no traceback in the server log
    if for_page and not getattr(err, "escaped", False):
        err.message, err.escaped = html.escape(str(err.message), quote=False), True
    return err


def _as_gr_error(e: BaseException) -> gr.Error:
    if isinstance(e, gr.Error):
        return e
    if not expected(e):
        log.error("unexpected error: %s", "".join(traceback.format_exception(e)))
    return gr.Error(plain_message(e))


def friendly(fn, for_page: bool = True):
    """Wrap an event handler (function or generator) so that any exception reaches the user as a gr.Error.
    for_page=False for the named API: its clients read the message as text, not HTML."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as e:
                raise user_error(e, for_page) from None
        return gen

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise user_error(e, for_page) from None
    return wrapper


def store():
    from finetune.jobs import get_store

    return get_store()


def to_json(data) -> str:
    """Structured results go out as JSON text (json.loads on the client). Not as objects: gradio_client treats any
    object with a string "path" key (an evaluation's data.path, say) as a file to download, and fails."""
    return json.dumps(data, default=str, ensure_ascii=False)


# --- jobs ------------------------------------------------------------------------------------------------------
STATUS_KEYS = ("id", "name", "state", "phase", "step", "total_steps", "progress", "loss", "eval_loss",
               "tokens_per_second", "peak_memory_mb", "rank_peak_memory_mb", "eta_seconds", "elapsed_seconds",
               "adapter_name", "error", "attempts", "command", "queue_position", "waiting_for")


def _job_id(job_id: str) -> str:
    job_id = (job_id or "").strip()
    if not job_id:
        raise gr.Error("job_id is empty: give the id /submit_job returned (like 20261128-161502-ab12)")
    return job_id


def submit_job(config_yaml: str) -> str:
    """Queue a training job from its YAML text (the format of `python -m finetune config --example`).
    Returns the job id. Unknown or invalid fields are refused with a message naming them."""
    if not (config_yaml or "").strip():
        raise gr.Error("config_yaml is empty: send a job config (python -m finetune config --example prints one)")
    cfg = JobConfig.from_yaml(config_yaml, "submitted config")
    return store().submit(cfg)


def job_status(job_id: str) -> str:
    """JSON: a job's state (queued, running, completed, failed, cancelled), step, total_steps, loss, adapter_name,
    error and progress figures."""
    live = store().live(_job_id(job_id))
    return to_json({k: live.get(k) for k in STATUS_KEYS})


def cancel_job(job_id: str) -> str:
    """Cancel a queued or running job; returns its status afterwards (JSON, as /job_status)."""
    store().cancel(_job_id(job_id))
    return job_status(job_id)


def resume_job(job_id: str) -> str:
    """Re-queue a failed or cancelled job; it continues from its latest checkpoint. Returns its status (JSON)."""
    store().resume(_job_id(job_id))
    return job_status(job_id)


def list_jobs() -> str:
    """JSON list of every job, newest first: id, name, state, adapter_name, created_at, started_at, finished_at, error."""
    keys = ("id", "name", "state", "adapter_name", "created_at", "started_at", "finished_at", "error", "attempts")
    return to_json([{k: r.get(k) for k in keys} for r in store().list_jobs()])


def submit_sweep(sweep_yaml: str) -> str:
    """Queue a hyper-parameter sweep from its YAML text (base: the job config inline, space, n_trials, objective,
    sampler, pruner; docs/sweeps.md). Returns the sweep's job id; its trials are training jobs of their own."""
    from finetune import sweep

    if not (sweep_yaml or "").strip():
        raise gr.Error("sweep_yaml is empty: send a sweep config (examples/demo-sweep.yaml shows one)")
    return sweep.submit(store(), sweep_yaml)


def sweep_status(job_id: str) -> str:
    """JSON: the sweep job's status, its trials (number, state incl. pruned, objective value, parameters, job id),
    the best trial so far, parameter importances and the best trial's job config."""
    from finetune import sweep

    return to_json(sweep.status_of(store(), _job_id(job_id)))


def validate_config(config_yaml: str) -> str:
    """Check a job YAML and the data it names without queueing it (the check /submit_job makes):
    {"valid": true, "config": normalised YAML, "notes": [settings that cannot make sense for the data]} or
    {"valid": false, "error": "... names each bad field, and each bad row by file and line ..."}."""
    from finetune import policy
    from finetune.datacheck import check_job_data, setting_notes

    try:
        cfg = JobConfig.from_yaml(config_yaml or "", "config")
        if policy.confined():
            policy.check_job(cfg)
        facts = check_job_data(cfg.data)
    except ValueError as e:  # ConfigError, DataError, and what the operator did not allow
        return to_json({"valid": False, "error": str(e)})
    return to_json({"valid": True, "config": cfg.to_yaml(), "notes": setting_notes(cfg, facts)})


def plan_job(config_yaml: str, device_memory_gib: float = 0.0, device: str = "") -> str:
    """JSON: the job's memory plan before it runs, from the model's config.json alone (no weights are loaded or
    downloaded): peak_gib, reserved_gib, needed_gib, fits, the breakdown by part, the longest max_seq_length and
    the largest batch that fit, and, when it does not fit, ranked suggestions each with its own estimate.
    device_memory_gib 0 = the studio machine's device (its first GPU, else its RAM); device "cuda" or "cpu" plans
    for that kind of device instead of the one detected."""
    from finetune import policy
    from finetune.plan import detect_device, estimate, with_memory

    if not (config_yaml or "").strip():
        raise gr.Error("config_yaml is empty: send a job config (python -m finetune config --example prints one)")
    gib = float(device_memory_gib or 0)
    if not 0 <= gib <= 1_000_000:
        raise gr.Error(f"device_memory_gib must be between 0 and 1000000, got {device_memory_gib}")
    kind = (device or "").strip().lower() or None
    if kind not in (None, "cuda", "cpu"):
        raise gr.Error(f"device must be 'cuda', 'cpu' or empty (the detected one), got {device!r}")
    cfg = JobConfig.from_yaml(config_yaml, "submitted config")
    if policy.confined():  # the plan reads the model's config.json: only from folders the operator allows
        policy.check_model_name(cfg.model.name_or_path)
    target = detect_device()
    if gib > 0 or kind:
        target = with_memory(target, gib or None, kind)
    return to_json(estimate(cfg, target).to_dict())


# --- adapters --------------------------------------------------------------------------------------------------
def list_adapters() -> str:
    """JSON list of the stored adapters, newest first: name, base_model, quantization, dataset, metrics, eval summary,
    created_at."""
    from finetune.store import list_adapters as _list

    rows = _list()
    for r in rows:
        r.pop("path", None)  # server-side paths are no business of a client
    return to_json(rows)


def _adapter_name(name: str) -> str:
    from finetune.store import adapter_path

    name = (name or "").strip(" ")  # spaces only: a name with a newline is refused, not repaired
    if not name:
        raise gr.Error("adapter name is empty")
    p = adapter_path(name)
    if not (p / "adapter_config.json").is_file():
        raise gr.Error(f"adapter {name!r} is not in the store (see /list_adapters)")
    return name


def download_adapter(name: str) -> str:
    """A zip of the adapter's folder (adapter_model.safetensors, adapter_config.json, studio.json, README.md)."""
    from finetune.store import export_zip

    return str(export_zip(_adapter_name(name)))


def delete_adapter(name: str) -> str:
    """Delete an adapter from the store."""
    from finetune.store import delete_adapter as _delete

    _delete(_adapter_name(name))
    return f"deleted {name}"


def import_zip_file(zip_file, name: str = "") -> str:
    """Import an uploaded zip (a path, or gradio's file dict) into the store; the stored name. Shared by the
    Adapters tab and /import_adapter."""
    from finetune.store import import_zip

    path = zip_file.get("path") if isinstance(zip_file, dict) else zip_file
    if not path:
        raise gr.Error("zip_file is empty: upload an adapter zip (what /download_adapter returns)")
    if not str(path).lower().endswith(".zip"):
        raise gr.Error(f"zip_file {Path(str(path)).name!r} is not a .zip file")
    return import_zip(path, (name or "").strip(" ") or None)


def import_adapter(zip_file: str, name: str = "") -> str:
    """Add an adapter to the store from a zip: a /download_adapter export, or any peft `save_pretrained` folder
    zipped. name "" = the folder's name inside the zip. Returns JSON {"name": ...}. Members that leave the folder
    (zip-slip), symlinks, zip bombs, non-adapter files and a name already in the store are refused."""
    return to_json({"name": import_zip_file(zip_file, name)})


# --- exports ---------------------------------------------------------------------------------------------------
def export_adapter(adapter: str, format: str = "hf", quant: str = "") -> str:
    """Queue an export job: the adapter merged into its base as a Hugging Face folder (format "hf", quant
    bf16|f16|f32) or as GGUF for llama.cpp and Ollama with a Modelfile (format "gguf", quant f16|q8_0|q4_0).
    quant "" = the format's default (bf16 / q8_0). Returns JSON {"job_id": ...}; follow it with /job_status."""
    spec = {"adapter": _adapter_name(adapter), "format": (format or "hf").strip(), "quant": (quant or "").strip() or None}
    return to_json({"job_id": store().submit(spec, kind="export")})


def list_exports(adapter: str = "") -> str:
    """JSON list of finished exports (of one adapter, or all), newest first: adapter, format, quant, files with
    bytes and sha256, the merge's measured logit differences."""
    from finetune.export import list_exports as _list

    name = _adapter_name(adapter) if (adapter or "").strip(" ") else None
    return to_json([{k: v for k, v in r.items() if k not in ("path", "disk")} for r in _list(name)])


# --- model work --------------------------------------------------------------------------------------------------
def generate(adapter: str, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0) -> str:
    """One answer from the base model (adapter "") or base + adapter. Greedy when temperature is 0."""
    from finetune.evaluation import generate as G

    if not (prompt or "").strip():
        raise gr.Error("prompt is empty")
    limits.check_text("prompt", prompt)
    check_generation(max_new_tokens, temperature, top_p)
    name = _adapter_name(adapter) if (adapter or "").strip(" ") else None
    return G.generate(name, prompt, max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p))


def check_generation(max_new_tokens, temperature, top_p) -> None:
    limits.check_range("max_new_tokens", max_new_tokens, 1, limits.MAX_NEW_TOKENS)
    if temperature is None or not 0 <= float(temperature) <= 5:
        raise gr.Error(f"temperature must be between 0 and 5, got {temperature}")
    if top_p is None or not 0 < float(top_p) <= 1:
        raise gr.Error(f"top_p must be in (0, 1], got {top_p}")


def evaluate(adapter: str, data_path: str = "", max_examples: int = 0, max_new_tokens: int = 0) -> str:
    """JSON: the adapter against its base on held-out data (a file or folder path on the studio's machine; "" = the
    adapter's own validation split): metrics per side, paired differences with 95% intervals, win/tie/loss and
    per-example answers. max_examples / max_new_tokens 0 = the adapter's job settings. Cached beside the adapter."""
    from finetune.evaluation import evaluate as E

    from finetune.paths import confine

    name = _adapter_name(adapter)
    path = (data_path or "").strip() or None
    if path and not path.startswith("builtin:"):
        confine(path, "data_path")  # one answer for "outside" and "missing": a client learns nothing of other files
    examples = limits.check_range("max_examples", max_examples or 0, 0, limits.MAX_EVAL_EXAMPLES)
    new_tokens = limits.check_range("max_new_tokens", max_new_tokens or 0, 0, limits.MAX_EVAL_NEW_TOKENS)
    return to_json(E.evaluate(name, path, max_examples=examples or None, max_new_tokens=new_tokens or None))


# The public endpoints, in the order docs/api.md lists them. Registered by app.main with gr.api.
ENDPOINTS = [
    (submit_job, {}), (job_status, {}), (cancel_job, {}), (resume_job, {}), (list_jobs, {}),
    (validate_config, {}), (plan_job, {}), (list_adapters, {}), (delete_adapter, {}), (export_adapter, {}),
    (list_exports, {}), (submit_sweep, {}), (sweep_status, {}),
    (generate, {"concurrency_limit": 1, "concurrency_id": MODEL_GROUP}),
    (evaluate, {"concurrency_limit": 1, "concurrency_id": MODEL_GROUP}),
]


def register() -> None:
    """Inside a gr.Blocks: every endpoint with api_name = its function name. /download_adapter returns a file, so it
    goes through hidden components (a File output makes gradio_client download it)."""
    for fn, kw in ENDPOINTS:
        gr.api(friendly(fn, for_page=False), api_name=fn.__name__, **kw)
    with gr.Row(visible=False):
        name = gr.Textbox(label="name")
        out = gr.File(label="adapter zip")
        btn = gr.Button("download")
    btn.click(friendly(download_adapter, for_page=False), name, out, api_name="download_adapter",
              api_description=download_adapter.__doc__)
    # /import_adapter takes a file, so it too goes through components (gradio_client: handle_file(path)).
    with gr.Row(visible=False):
        zip_in = gr.File(label="zip_file", file_types=[".zip"])
        zip_name = gr.Textbox(label="name")
        imported = gr.Textbox(label="result")
        import_btn = gr.Button("import")
    import_btn.click(friendly(import_adapter, for_page=False), [zip_in, zip_name], imported, api_name="import_adapter",
                     api_description=import_adapter.__doc__)
