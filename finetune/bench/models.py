"""Benchmark models and workloads: real architectures' shapes with random weights, a tokenizer built offline, the
synthetic token batches every arm sees, and the FLOP count behind MFU.

No download is possible (nor needed): speed and memory depend on the shapes, not on the weights' values. Each model
is built once, saved as bf16 safetensors with its tokenizer, and every arm loads the same folder.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path

# The published configs (config.json of each model), written out: hidden size, layers, heads, kv heads,
# intermediate size, vocabulary, RoPE. "llama-3-8b" carries Llama-3.1-8B's RoPE scaling (the same shape and
# weights layout as Llama-3-8B) so the longest-sequence probe can go past 8192 positions.
SHAPES: dict[str, dict] = {
    "llama-3.2-1b": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192,
        "vocab_size": 128256, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
        "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    },
    "llama-3-8b": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336,
        "vocab_size": 128256, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
        "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    },
    "qwen2.5-7b": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
        "tie_word_embeddings": False, "hidden_act": "silu", "use_sliding_window": False,
    },
    # The largest shape a 2 x H200 host builds in minutes (68 GB of bf16 on its 128 GB disk), for the FSDP runs;
    # a Llama architecture, whose tokenizer class keeps the bench's word-level vocabulary as it is.
    "codellama-34b": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "num_hidden_layers": 48,
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 22016,
        "vocab_size": 32000, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 16384,
        "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    },
    # For the CPU test: the same code path, seconds instead of minutes.
    "tiny": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
        "vocab_size": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
        "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    },
}

PAD, EOS, BOS, UNK = "<|pad|>", "<|eot|>", "<|bos|>", "<|unk|>"
# Synthetic tokens are drawn from the ordinary ids only (the specials sit at the top of the vocabulary).
N_SPECIAL = 4

# Dense bf16 tensor-core peak (datasheet, FLOP/s) by device name; MFU is reported against it.
BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def device_peak_flops(name: str) -> float | None:
    for key, peak in BF16_PEAK.items():
        if key in name:
            return peak
    return None


def model_dir(root: Path, shape: str) -> Path:
    return Path(root) / shape


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly `vocab_size` entries ("t0".. plus four specials at the top) whose pad
    token differs from EOS (Unsloth refuses a checkpoint whose pad is its EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    n = vocab_size - N_SPECIAL
    vocab = {f"t{i}": i for i in range(n)}
    for j, tok in enumerate((UNK, BOS, EOS, PAD)):
        vocab[tok] = n + j
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=1 << 20)
    fast.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' ' + eos_token + ' ' }}"
                          "{% endfor %}")
    return fast


def build_model(shape: str, root: Path, seed: int = 0) -> Path:
    """Random bf16 weights in `shape`'s architecture, saved once (atomically) under root/shape."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    target = model_dir(root, shape)
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    spec = dict(SHAPES[shape])
    model_type = spec.pop("model_type")
    tok = build_tokenizer(spec["vocab_size"])
    config = AutoConfig.for_model(model_type, **spec, dtype="bfloat16", bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, use_cache=True)
    torch.manual_seed(seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(prefix=f".{shape}.tmp-", dir=root))
    try:
        model.save_pretrained(tmp, max_shard_size="5GB")
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        # Write the gigabytes out now: left to the kernel's writeback, they compete with the first arm's host.
        os.sync()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# --- workloads ------------------------------------------------------------------------------------------------------
def example_lengths(seq: int | str, batch: int, steps: int, seed: int = 0, cap: int = 2048) -> list[list[int]]:
    """Per step, the lengths of its `batch` examples. seq "var": log-normal, median 350 tokens, capped at `cap`."""
    if seq != "var":
        return [[int(seq)] * batch for _ in range(steps)]
    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        out.append([max(16, min(cap, int(round(rng.lognormvariate(math.log(350), 0.8))))) for _ in range(batch)])
    return out


def make_batches(seq: int | str, batch: int, steps: int, vocab_size: int, seed: int = 0) -> list[list[dict]]:
    """Per step, `batch` examples {"input_ids", "labels"} of random ordinary tokens; every token is trained on.
    Identical for every arm (seeded)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    steps_out = []
    for lengths in example_lengths(seq, batch, steps, seed):
        exs = []
        for n in lengths:
            ids = rng.integers(0, vocab_size - N_SPECIAL, size=n).tolist()
            exs.append({"input_ids": ids, "labels": list(ids)})
        steps_out.append(exs)
    return steps_out


# --- FLOPs ----------------------------------------------------------------------------------------------------------
def matmul_params(shape: str) -> int:
    """Weights that take part in a matmul per token: every projection of every layer, and the lm_head."""
    s = SHAPES[shape]
    h, L = s["hidden_size"], s["num_hidden_layers"]
    hd = s.get("head_dim") or h // s["num_attention_heads"]
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * s["intermediate_size"]
    return L * per_layer + h * s["vocab_size"]


def step_flops(shape: str, lengths: list[int]) -> float:
    """Model FLOPs of one training step over examples of these lengths (padding excluded): 4 * N_matmul per token
    (forward 2N, backward to the activations 2N; the frozen weights get no gradient; a checkpointing recompute is
    not counted), plus causal attention: forward 4 * d_attn * (l(l+1)/2) per layer per example, x3 with backward."""
    s = SHAPES[shape]
    hd = s.get("head_dim") or s["hidden_size"] // s["num_attention_heads"]
    d_attn = s["num_attention_heads"] * hd
    tokens = sum(lengths)
    attn = sum(3 * 4 * d_attn * (n * (n + 1) / 2) for n in lengths) * s["num_hidden_layers"]
    return 4.0 * matmul_params(shape) * tokens + attn


def write_json(path: Path, data) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
