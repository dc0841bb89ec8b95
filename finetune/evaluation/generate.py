"""Text generation with the base model or an adapter on it, for the Playground, the API and evaluation.

One base model is kept loaded per process (keyed by its resolved path and quantization); adapters are attached to
it with peft and swapped with `set_adapter`, so switching adapters in the Playground costs milliseconds, not a
reload. Base answers come from the same loaded model inside `disable_adapter()`. A lock serialises model use: peft's
active adapter is process-global state, and two threads generating at once would swap it under each other.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

log = logging.getLogger(__name__)

Messages = list[dict]
Prompt = str | Messages

# Held around every use of the shared model. A plain Lock (not RLock) because a Gradio generator may resume on a
# different worker thread than the one that started it; functions named locked_* expect it held.
_lock = threading.Lock()


@dataclass
class LoadedModel:
    key: tuple[str, str]
    model: Any                      # a transformers model, or a PeftModel once an adapter was attached
    tokenizer: Any
    model_cfg: Any
    adapters: dict[str, tuple[str, float]] = field(default_factory=dict)  # studio name -> (peft name, weights mtime)
    active: str | None = None       # peft name of the active adapter


_loaded: LoadedModel | None = None
_stats: dict = {}
# How many times a base model was loaded in this process: tests assert that swapping adapters does not reload.
load_count = 0


# --- resolving what to load ------------------------------------------------------------------------------------
def _adapter_info(adapter: str) -> tuple[Path, Any]:
    """The adapter's folder and the ModelConfig of its base."""
    from finetune.store import adapters

    path = Path(adapter)
    if not (path.is_dir() and (path / "adapter_config.json").exists()):
        path = adapters.adapter_path(adapter)
    return path, adapters.resolve_base(adapter)


def _base_config(base: str | None, quantization: str | None):
    """ModelConfig for plain base generation. With no base named, reuse whatever base is loaded (so the Playground's
    side-by-side base answer comes from the adapter's own base); otherwise the embedded default, unquantized
    (the fastest exact base on a CPU)."""
    from finetune.config import ModelConfig

    if base is None and _loaded is not None and (quantization is None or quantization == _loaded.key[1]):
        return _loaded.model_cfg
    return ModelConfig(**({"name_or_path": base} if base else {}), quantization=quantization or "none")


def _key(model_cfg) -> tuple[str, str]:
    from finetune.model import resolve_model

    return (str(resolve_model(model_cfg.name_or_path, model_cfg.revision)), model_cfg.quantization)


def _locked_base(model_cfg) -> LoadedModel:
    """The loaded base for this config, loading it (and dropping any other base) when needed."""
    global _loaded, load_count
    key = _key(model_cfg)
    if _loaded is not None and _loaded.key == key:
        return _loaded
    from finetune.model import load_model, load_tokenizer

    if _loaded is not None:
        log.info("unloading base %s (%s) to load %s (%s)", *_loaded.key, *key)
        _loaded = None
        _free_memory()
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, for_training=False)
    model.eval()
    load_count += 1
    log.info("loaded base %s (%s) in %.1fs", key[0], key[1], time.perf_counter() - t0)
    _loaded = LoadedModel(key=key, model=model, tokenizer=tokenizer, model_cfg=model_cfg)
    return _loaded


def _free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _peft_name(studio_name: str, taken: dict) -> str:
    # peft keeps adapters in torch ModuleDicts, whose keys cannot contain "." (allowed in studio names).
    base = "a_" + "".join(c if c.isalnum() or c in "_-" else "_" for c in studio_name)
    name, i = base, 1
    while name in {v[0] for k, v in taken.items() if k != studio_name}:
        i += 1
        name = f"{base}_{i}"
    return name


def locked_activate(adapter: str | None, base: str | None = None, quantization: str | None = None) -> LoadedModel:
    """Make the shared model ready for `adapter` (None/"" = the base): load the base if needed, attach the adapter
    once (again only if its weights changed on disk), and set it active."""
    if not adapter:
        return _locked_base(_base_config(base, quantization))
    path, model_cfg = _adapter_info(adapter)
    loaded = _locked_base(model_cfg)
    weights = path / "adapter_model.safetensors"
    mtime = weights.stat().st_mtime if weights.exists() else 0.0
    known = loaded.adapters.get(adapter)
    if known is not None and known[1] != mtime:
        # Retrained under the same name: drop the stale weights before loading the new ones.
        loaded.model.delete_adapter(known[0])
        del loaded.adapters[adapter]
        loaded.active = None
        known = None
    if known is None:
        from peft import PeftModel

        from finetune.model import load_adapter

        name = _peft_name(adapter, loaded.adapters)
        t0 = time.perf_counter()
        if isinstance(loaded.model, PeftModel):
            loaded.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        else:
            loaded.model = load_adapter(loaded.model, path, adapter_name=name, is_trainable=False)
        loaded.model.eval()
        loaded.adapters[adapter] = (name, mtime)
        log.info("attached adapter %s in %.2fs", adapter, time.perf_counter() - t0)
    name = loaded.adapters[adapter][0]
    if loaded.active != name:
        loaded.model.set_adapter(name)
        loaded.active = name
    return loaded


class AdapterContext:
    """`with` block in which the shared model answers as the base (adapters disabled) or as the active adapter."""

    def __init__(self, loaded: LoadedModel, adapter: str | None):
        self.loaded, self.adapter, self._cm = loaded, adapter, None

    def __enter__(self):
        from peft import PeftModel

        if not self.adapter and isinstance(self.loaded.model, PeftModel):
            self._cm = self.loaded.model.disable_adapter()
            self._cm.__enter__()
        return self.loaded.model

    def __exit__(self, *exc):
        if self._cm is not None:
            return self._cm.__exit__(*exc)
        return False


def model_for(adapter: str | None, base: str | None = None, quantization: str | None = None) -> tuple[LoadedModel, "AdapterContext"]:
    """For callers that hold `lock()` (evaluation): the loaded state and a context that selects base or adapter."""
    loaded = locked_activate(adapter, base, quantization)
    return loaded, AdapterContext(loaded, adapter)


def lock() -> threading.Lock:
    return _lock


# --- prompts and generation -------------------------------------------------------------------------------------
def to_messages(prompt: Prompt) -> Messages:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    out = []
    for m in prompt:
        content = m.get("content")
        if not isinstance(content, str):  # Gradio chat messages may carry content parts
            content = " ".join(str(p.get("text", p)) if isinstance(p, dict) else str(p) for p in (content or []))
        out.append({"role": m["role"], "content": content})
    return out


def prompt_text(tokenizer, prompt: Prompt) -> str:
    return tokenizer.apply_chat_template(to_messages(prompt), tokenize=False, add_generation_prompt=True)


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus every end-of-turn marker training teaches (data.END_MARKERS) that is one token of this vocabulary: an
    adapter stops where its template ends a turn, whether or not that marker is the tokenizer's EOS."""
    from finetune.data import END_MARKERS

    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    for tok in END_MARKERS:
        tid = tokenizer.convert_tokens_to_ids(tok)
        # A string outside the vocabulary maps to the unknown token; a marker that is the unknown token is real.
        unknown = tid == tokenizer.unk_token_id and tok != tokenizer.unk_token
        if isinstance(tid, int) and tid >= 0 and not unknown and tid not in ids:
            ids.append(tid)
    return ids


def generation_config(tokenizer, max_new_tokens: int, temperature: float, top_p: float):
    from transformers import GenerationConfig

    kw: dict = dict(max_new_tokens=int(max_new_tokens), eos_token_id=stop_token_ids(tokenizer),
                    pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if temperature and temperature > 0:
        kw.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
    else:
        kw.update(do_sample=False)  # greedy: deterministic, the same for base and adapter
    return GenerationConfig(**kw)


class PeakMemory:
    """Peak memory while a block runs: CUDA max allocated on a GPU, else the process RSS sampled every 20 ms
    (getrusage's peak never resets, so it cannot tell one side of an evaluation from the other)."""

    def __init__(self):
        self.peak_mb: float | None = None

    def __enter__(self):
        import torch

        self._cuda = torch.cuda.is_available()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self._stop = threading.Event()
            self._peak = _rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self._peak = max(self._peak, _rss_mb())

    def __exit__(self, *exc):
        import torch

        if self._cuda:
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._peak, _rss_mb())
        return False


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def locked_generate_batch(loaded: LoadedModel, adapter: str | None, prompts: Sequence[Prompt], max_new_tokens: int,
                           temperature: float = 0.0, top_p: float = 1.0, max_prompt_tokens: int | None = None) -> tuple[list[str], dict]:
    """Generate for several prompts at once (left padding), returning texts and this call's stats."""
    import torch

    tok = loaded.tokenizer
    texts = [prompt_text(tok, p) for p in prompts]
    sides = tok.padding_side, tok.truncation_side
    # Decoder-only batching: pad on the left so every row continues from its own end; an over-long prompt loses
    # its beginning, never the end the answer continues from.
    tok.padding_side, tok.truncation_side = "left", "left"
    try:
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False,
                  truncation=max_prompt_tokens is not None, max_length=max_prompt_tokens)
    finally:
        tok.padding_side, tok.truncation_side = sides
    gen_cfg = generation_config(tok, max_new_tokens, temperature, top_p)
    stops = set(gen_cfg.eos_token_id)
    with AdapterContext(loaded, adapter) as model, PeakMemory() as mem, torch.inference_mode():
        enc = enc.to(model.device)
        t0 = time.perf_counter()
        out = model.generate(**enc, generation_config=gen_cfg)
        latency = time.perf_counter() - t0
    new = out[:, enc["input_ids"].shape[1]:]
    results, rows = [], []
    for row in new.tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), None)
        rows.append({"new_tokens": (cut + 1) if cut is not None else len(row), "stopped": cut is not None,
                     "stop_token": tok.convert_ids_to_tokens(row[cut]) if cut is not None else None})
        results.append(tok.decode(row[:cut] if cut is not None else row, skip_special_tokens=True).strip())
    n_tokens = sum(r["new_tokens"] for r in rows)
    stats = {"adapter": adapter or None, "base_model": loaded.key[0], "quantization": loaded.key[1],
             "latency_s": latency, "new_tokens": n_tokens, "batch_size": len(prompts),
             "tokens_per_second": n_tokens / latency if latency > 0 else None, "peak_memory_mb": mem.peak_mb,
             "rows": rows}
    return results, stats


def generate_batch(adapter: str | None, prompts: Sequence[Prompt], max_new_tokens: int = 128, temperature: float = 0.0,
                   top_p: float = 1.0, *, base: str | None = None, quantization: str | None = None) -> tuple[list[str], dict]:
    global _stats
    with _lock:
        loaded = locked_activate(adapter, base, quantization)
        texts, stats = locked_generate_batch(loaded, adapter, prompts, max_new_tokens, temperature, top_p)
    _stats = stats
    return texts, stats


def generate_with_stats(adapter: str | None, prompt: Prompt, max_new_tokens: int = 128, temperature: float = 0.0,
                        top_p: float = 1.0, *, base: str | None = None, quantization: str | None = None) -> tuple[str, dict]:
    texts, stats = generate_batch(adapter, [prompt], max_new_tokens, temperature, top_p, base=base, quantization=quantization)
    return texts[0], stats


def generate(adapter: str | None, prompt: Prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             *, base: str | None = None, quantization: str | None = None) -> str:
    """One answer from `adapter` on its base (None or "" = the base model alone). Greedy when temperature is 0."""
    return generate_with_stats(adapter, prompt, max_new_tokens, temperature, top_p, base=base, quantization=quantization)[0]


def stream(adapter: str | None, prompt: Prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
           *, base: str | None = None, quantization: str | None = None) -> Iterator[str]:
    """Yield the growing answer as tokens arrive. Closing the iterator early (a Stop button) stops the generation."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    with _lock:  # load outside the worker so that loading errors surface here, in the caller
        tokenizer = locked_activate(adapter, base, quantization).tokenizer
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=None)
    cancel = threading.Event()
    failure: list[BaseException] = []

    class _Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return cancel.is_set()

    def work():
        global _stats
        try:
            with _lock:
                # Re-activate under the lock held for the whole generation: another call may have swapped adapters.
                loaded = locked_activate(adapter, base, quantization)
                tok = loaded.tokenizer
                enc = tok(prompt_text(tok, prompt), return_tensors="pt", add_special_tokens=False)
                gen_cfg = generation_config(tok, max_new_tokens, temperature, top_p)
                with AdapterContext(loaded, adapter) as model, PeakMemory() as mem, torch.inference_mode():
                    enc = enc.to(model.device)
                    t0 = time.perf_counter()
                    out = model.generate(**enc, generation_config=gen_cfg, streamer=streamer,
                                         stopping_criteria=StoppingCriteriaList([_Cancelled()]))
                    latency = time.perf_counter() - t0
                row = out[0, enc["input_ids"].shape[1]:].tolist()
                stops = set(gen_cfg.eos_token_id)
                cut = next((i for i, t in enumerate(row) if t in stops), None)
                n = (cut + 1) if cut is not None else len(row)
                _stats = {"adapter": adapter or None, "base_model": loaded.key[0], "quantization": loaded.key[1],
                          "latency_s": latency, "new_tokens": n, "batch_size": 1, "cancelled": cancel.is_set(),
                          "tokens_per_second": n / latency if latency > 0 else None, "peak_memory_mb": mem.peak_mb}
        except BaseException as e:  # handed to the consumer, which re-raises it
            failure.append(e)
            streamer.text_queue.put(streamer.stop_signal)

    thread = threading.Thread(target=work, name="generate-stream", daemon=True)
    thread.start()
    text, finished = "", False
    try:
        for piece in streamer:
            if piece:
                text += piece
                yield text.lstrip()
        finished = True
    finally:
        if not finished:
            cancel.set()  # the consumer went away (Stop button, closed tab): stop generating
        thread.join()
    if failure:
        raise failure[0]
    final = text.strip()
    if final != text.lstrip():
        yield final


def last_stats() -> dict:
    """Latency, tokens/s and peak memory of the last generate()/stream() call in this process (for the UI)."""
    return dict(_stats)


def loaded_info() -> dict:
    """What is loaded now: base path, quantization, attached adapters, load count."""
    if _loaded is None:
        return {"base_model": None, "quantization": None, "adapters": [], "load_count": load_count}
    return {"base_model": _loaded.key[0], "quantization": _loaded.key[1], "adapters": sorted(_loaded.adapters),
            "load_count": load_count}


def unload() -> None:
    """Drop the loaded model (tests, memory pressure)."""
    global _loaded
    with _lock:
        _loaded = None
        _free_memory()
