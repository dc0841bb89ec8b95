"""Playground tab: chat with the base model or any adapter on it (tokens stream in), and a side-by-side mode that
sends one prompt to two targets (base vs adapter, or two adapters). finetune.evaluation.generate keeps one base model loaded
and swaps adapters on it; every event here is in the shared "model" concurrency group, so concurrent users queue."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from app import render
from app.api import MODEL_GROUP, check_generation, friendly
from finetune import limits

BASE_LABEL = "Base model (no adapter)"
UNDOCUMENTED = dict(api_visibility="undocumented")


EXPORT_PREFIX = "export:"


def target_choices() -> list[tuple[str, str]]:
    """The base, every adapter, and every merged Hugging Face export (to check it before shipping it)."""
    from finetune.export import list_exports
    from finetune.store import list_adapters

    merged = [(f"merged export: {r['adapter']}  (hf {r['quant']})", f"{EXPORT_PREFIX}{r['adapter']}/{r['quant']}")
              for r in list_exports() if r.get("format") == "hf"]
    return [(BASE_LABEL, "")] + [(f"{r['name']}  ({r.get('base_model')}, {r.get('quantization')})", r["name"])
                                 for r in list_adapters()] + merged


def resolve_target(tgt: str | None) -> tuple[str | None, dict]:
    """(adapter, generate()'s keyword arguments) for a target: a merged export is loaded as a base of its own."""
    if not tgt or not tgt.startswith(EXPORT_PREFIX):
        return tgt or None, {}
    from finetune.export import export_path

    adapter, _, quant = tgt[len(EXPORT_PREFIX):].partition("/")
    folder = export_path(adapter, "hf", quant)  # validated: a name in the exports store, never a client's path
    if not (folder / "manifest.json").is_file():
        raise gr.Error(f"the merged export {adapter} (hf {quant}) is not in the exports store")
    return None, {"base": str(folder), "quantization": "none"}


def text_of(content) -> str:
    """A chatbot message's content (a string, or gradio 6's list of {"type": "text", "text": ...}) as plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or ""
    if isinstance(content, (list, tuple)):
        return "".join(text_of(c) for c in content)
    return ""


def to_messages(history: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": text_of(m.get("content"))} for m in history if m.get("role") in ("user", "assistant", "system")]


def base_of(adapter: str) -> dict:
    """generate()'s base/quantization arguments for the base model an adapter was trained on."""
    from finetune.store import resolve_base

    base = resolve_base(adapter)
    return {"base": base.name_or_path, "quantization": base.quantization}


def stats_html(st: dict, label: str = "") -> str:
    if not st:
        return ""
    tps = render.num(st.get("tokens_per_second"))
    bits = [f"{render.esc(st.get('new_tokens', '–'))} tokens", f"{tps:.1f} tokens/s" if tps else "– tokens/s",
            f"{render.num(st.get('latency_s')) or 0:.1f}s"]
    if render.num(st.get("peak_memory_mb")):
        bits.append(f"peak {st['peak_memory_mb']:,.0f} MiB")
    if st.get("quantization"):
        bits.append("base unquantized" if st["quantization"] == "none" else f"base {render.esc(st['quantization'])}")
    return f'<div class="gen-stats" data-tps="{tps or 0:.2f}">{render.esc(label)}{" · ".join(bits)}</div>'


def _components() -> SimpleNamespace:
    ui = SimpleNamespace()
    with gr.Row(equal_height=False, elem_classes=["toolbar"]):
        ui.target = gr.Dropdown(label="Chat with", choices=[(BASE_LABEL, "")], value="", scale=4, elem_id="chat-target",
                                info="Adapters are attached to one loaded base model and swapped, not reloaded.")
        ui.refresh = gr.Button("Refresh list", scale=1, elem_id="playground-refresh")
    with gr.Accordion("Generation settings", open=False, elem_id="gen-settings"):
        with gr.Row():
            ui.max_new = gr.Slider(1, 1024, value=128, step=1, label="max_new_tokens", elem_id="gen-max-new")
            ui.temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature",
                                       info="0 = greedy (deterministic)", elem_id="gen-temperature")
            ui.top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top_p", elem_id="gen-top-p")
    with gr.Tabs():
        with gr.Tab("Chat", id="chat"):
            _chat_components(ui)
        with gr.Tab("Side by side", id="side"):
            _side_components(ui)
    return ui


def _chat_components(ui: SimpleNamespace) -> None:
    # Answers are Markdown written by a model someone else may have trained: Gradio's sanitiser stays on.
    ui.chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="chatbot", buttons=["copy"],
                            sanitize_html=True,
                            placeholder="Ask something. Try a question about a Python standard-library function.")
    with gr.Row(equal_height=False, elem_classes=["toolbar"]):
        ui.msg = gr.Textbox(label="Message", placeholder="What does os.path.join do?", scale=6, max_lines=6,
                            elem_id="chat-input", autofocus=False)
        ui.send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        ui.stop = gr.Button("Stop", scale=1, elem_id="chat-stop")
        ui.clear = gr.Button("Clear", scale=1, elem_id="chat-clear")
    ui.chat_stats = gr.HTML(elem_id="chat-stats")


def _side_components(ui: SimpleNamespace) -> None:
    with gr.Row():
        ui.side_a = gr.Dropdown(label="Left", choices=[(BASE_LABEL, "")], value="", elem_id="side-a")
        ui.side_b = gr.Dropdown(label="Right", choices=[(BASE_LABEL, "")], value="", elem_id="side-b")
    with gr.Row(equal_height=False, elem_classes=["toolbar"]):
        ui.side_prompt = gr.Textbox(label="One prompt for both", scale=6, max_lines=6, elem_id="side-prompt",
                                    placeholder="What does json.dumps do?")
        ui.side_run = gr.Button("Send to both", variant="primary", scale=1, elem_id="side-send")
        ui.side_stop = gr.Button("Stop", scale=1, elem_id="side-stop")
    with gr.Row():
        with gr.Column():
            ui.out_a = gr.Chatbot(label="Left", height=360, elem_id="side-out-a", sanitize_html=True)
            ui.stats_a = gr.HTML(elem_id="side-stats-a")
        with gr.Column():
            ui.out_b = gr.Chatbot(label="Right", height=360, elem_id="side-out-b", sanitize_html=True)
            ui.stats_b = gr.HTML(elem_id="side-stats-b")


@friendly
def on_chat(message, history, tgt, n, temp, p):
    from finetune.evaluation import generate as G

    message = (message or "").strip()
    if not message:
        yield gr.skip(), gr.skip(), gr.skip()
        return
    check_generation(n, temp, p)
    history = list(history or []) + [{"role": "user", "content": message}]
    limits.check_text("the conversation", "".join(str(m.get("content") or "") for m in history))
    prompt = to_messages(history)
    history.append({"role": "assistant", "content": ""})
    yield history, "", '<div class="gen-stats muted">loading the model and generating…</div>'
    adapter, kw = resolve_target(tgt)
    for text in G.stream(adapter, prompt, max_new_tokens=int(n), temperature=float(temp), top_p=float(p), **kw):
        history[-1]["content"] = text
        yield history, gr.skip(), gr.skip()
    yield history, gr.skip(), stats_html(G.last_stats())


@friendly
def on_side(prompt, a, b, n, temp, p):
    from finetune.evaluation import generate as G

    prompt = (prompt or "").strip()
    if not prompt:
        raise gr.Error("the prompt is empty")
    limits.check_text("the prompt", prompt)
    check_generation(n, temp, p)
    # One loaded model and one lock: the two answers are generated one after the other, each streamed.
    # "Base" next to an adapter means that adapter's own base, loaded as it was trained (same quantization).
    lone = a or b
    base_kw = base_of(lone) if not (a and b) and lone and not lone.startswith(EXPORT_PREFIX) else {}
    sides = [[{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}] for _ in range(2)]
    yield sides[0], sides[1], '<div class="gen-stats muted">generating…</div>', '<div class="gen-stats muted">waiting…</div>'
    for i, tgt in enumerate((a, b)):
        adapter, kw = resolve_target(tgt) if tgt else (None, base_kw)
        for text in G.stream(adapter, prompt, max_new_tokens=int(n), temperature=float(temp), top_p=float(p), **kw):
            sides[i][-1]["content"] = text
            yield (sides[0], gr.skip(), gr.skip(), gr.skip()) if i == 0 else (gr.skip(), sides[1], gr.skip(), gr.skip())
        st = stats_html(G.last_stats())
        yield (gr.skip(), gr.skip(), st, '<div class="gen-stats muted">generating…</div>') if i == 0 else \
            (gr.skip(), gr.skip(), gr.skip(), st)


@friendly
def on_refresh(tgt, a, b):
    ch = target_choices()
    values = {v for _, v in ch}
    keep = lambda v: v if v in values else ""  # noqa: E731
    return (gr.update(choices=ch, value=keep(tgt)), gr.update(choices=ch, value=keep(a)),
            gr.update(choices=ch, value=keep(b)))


def _wire(ui: SimpleNamespace) -> None:
    model_event = dict(concurrency_limit=1, concurrency_id=MODEL_GROUP, **UNDOCUMENTED)
    chat_inputs = [ui.msg, ui.chatbot, ui.target, ui.max_new, ui.temperature, ui.top_p]
    chat_outputs = [ui.chatbot, ui.msg, ui.chat_stats]
    ev1 = ui.send.click(on_chat, chat_inputs, chat_outputs, **model_event)
    ev2 = ui.msg.submit(on_chat, chat_inputs, chat_outputs, **model_event)
    ui.stop.click(None, None, None, cancels=[ev1, ev2])
    ui.clear.click(lambda: ([], ""), None, [ui.chatbot, ui.chat_stats], **UNDOCUMENTED)
    side_inputs = [ui.side_prompt, ui.side_a, ui.side_b, ui.max_new, ui.temperature, ui.top_p]
    side_outputs = [ui.out_a, ui.out_b, ui.stats_a, ui.stats_b]
    ev3 = ui.side_run.click(on_side, side_inputs, side_outputs, **model_event)
    ev4 = ui.side_prompt.submit(on_side, side_inputs, side_outputs, **model_event)
    ui.side_stop.click(None, None, None, cancels=[ev3, ev4])
    ui.targets = [ui.target, ui.side_a, ui.side_b]
    ui.refresh.click(on_refresh, ui.targets, ui.targets, **UNDOCUMENTED)


def build() -> SimpleNamespace:
    ui = _components()
    _wire(ui)
    return SimpleNamespace(refresh=on_refresh, targets=ui.targets, target=ui.target)
