"""The Ollama Modelfile beside a GGUF: FROM, a TEMPLATE in Go-template syntax that renders a conversation as the
model's own chat template does, and stop PARAMETERs for the end-of-turn markers.

Only ChatML-shaped templates (SmolLM2, Qwen2) are translated. The translation is checked before it is written: a
Python rendering of the Go template must equal the Jinja template's rendering of a few probe conversations; if not,
the Modelfile says so and leaves TEMPLATE out rather than ship a template that prompts the model wrongly.
"""
from __future__ import annotations

import json

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
_PROBE_USER = "PROBE-USER"
PROBES = (
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c"},
     {"role": "user", "content": "{{ .Content }}"}],
)


def _turn(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def default_system(render) -> str | None:
    """The system prompt a ChatML template inserts when the conversation has none ("" when it inserts nothing), or
    None when the template is not ChatML-shaped."""
    text = render([{"role": "user", "content": _PROBE_USER}])
    tail = _turn("user", _PROBE_USER) + f"{IM_START}assistant\n"
    if not text.endswith(tail):
        return None
    head = text[: -len(tail)]
    if head == "":
        return ""
    if head.startswith(f"{IM_START}system\n") and head.endswith(f"{IM_END}\n"):
        return head[len(f"{IM_START}system\n"): -len(f"{IM_END}\n")]
    return None


def chatml_python(messages: list[dict], system: str) -> str:
    """What the Go template below renders, in Python (used to check the translation)."""
    out = _turn("system", system) if system and messages and messages[0]["role"] != "system" else ""
    return out + "".join(_turn(m["role"], m["content"]) for m in messages) + f"{IM_START}assistant\n"


def chatml_go(system: str) -> str:
    """Ollama's TEMPLATE for a ChatML model; `system` is the template's default system prompt ("" for none)."""
    default = ""
    if system:
        # A Go string literal, so that braces or quotes in the prompt are text, never template syntax.
        literal = json.dumps(system, ensure_ascii=False)
        default = (f'{{{{- if .Messages }}}}{{{{- if ne (index .Messages 0).Role "system" }}}}{IM_START}system\n'
                   f"{{{{ {literal} }}}}{IM_END}\n{{{{ end }}}}{{{{- end }}}}")
    return (default + f"{{{{- range .Messages }}}}{IM_START}{{{{ .Role }}}}\n{{{{ .Content }}}}{IM_END}\n"
            f"{{{{ end }}}}{IM_START}assistant\n")


def go_template(render) -> str | None:
    """The Go template equivalent to `render` (messages -> prompt with the generation prompt), or None."""
    system = default_system(render)
    if system is None:
        return None
    if any(render(p) != chatml_python(p, system) for p in PROBES) or '"""' in system:
        return None  # not equivalent, or a prompt that would end the Modelfile's triple-quoted TEMPLATE early
    return chatml_go(system)


def stop_strings(tokenizer) -> list[str]:
    from finetune.evaluation.generate import stop_token_ids

    return [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]


def modelfile(gguf_name: str, tokenizer) -> str:
    """The Modelfile text for `gguf_name` (a file in the same folder)."""

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    template = go_template(render)
    lines = ["# ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{gguf_name}"]
    if template is None:
        lines.append("# The chat template is not ChatML-shaped: no TEMPLATE written; Ollama falls back to the "
                     "template stored in the GGUF metadata (tokenizer.chat_template).")
    else:
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stop_strings(tokenizer)]
    return "\n".join(lines) + "\n"
