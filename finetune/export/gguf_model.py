"""A merged Hugging Face folder -> one GGUF file for llama.cpp and Ollama, written with the `gguf` package.

Names, metadata and tensor layout follow llama.cpp's convert_hf_to_gguf.py for the two families the studio trains:
Llama (SmolLM2 is one) and Qwen2. Llama's q/k projection rows are permuted into the pairing llama.cpp's rope reads;
Qwen2's are not. The tokenizer (gpt2-style byte-level BPE, which both families use), its merges, special tokens,
the end-of-turn token and the chat template go into the metadata, so llama.cpp and Ollama stop at the end of a turn.

Tensors are written in two passes (sizes first, then data one tensor at a time), so memory holds one tensor, not
the model.
"""
from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Callable

import numpy as np

ARCHITECTURES = {"LlamaForCausalLM": "LLAMA", "Qwen2ForCausalLM": "QWEN2"}
# tokenizer.ggml.pre: llama.cpp picks the pre-tokenizer regex from this name. It identifies a tokenizer by the hash
# of its ids for a fixed text, as convert_hf_to_gguf.py's get_vocab_base_pre does (same text, same hashes).
_CHKTXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
           "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
           "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
           "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",     # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",      # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",      # Qwen3 tokenizer
}
QUANTS = ("f16", "q8_0", "q4_0")
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>")

Progress = Callable[[str, int, int], None]


class GGUFExportError(ValueError):
    """A model this writer cannot convert, said in one sentence."""


def model_arch(config: dict):
    import gguf

    arch = (config.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise GGUFExportError(f"GGUF export supports the Llama and Qwen2 families ({', '.join(ARCHITECTURES)}); "
                              f"this model is {arch}. Export it as a Hugging Face folder (format hf) instead.")
    rope = config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or (config.get("rope_parameters") or {}).get("rope_type")
    if rope_type not in (None, "default"):
        raise GGUFExportError(f"GGUF export does not write rope scaling {rope_type!r} ({arch}); export format hf instead.")
    return getattr(gguf.MODEL_ARCH, ARCHITECTURES[arch])


def _rope_theta(config: dict) -> float | None:
    return config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")


def _write_hparams(w, config: dict, arch) -> None:
    n_head = config["num_attention_heads"]
    w.add_block_count(config["num_hidden_layers"])
    if config.get("max_position_embeddings"):
        w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(config.get("num_key_value_heads", n_head))
    if (theta := _rope_theta(config)) is not None:
        w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    import gguf

    if arch == gguf.MODEL_ARCH.LLAMA:
        w.add_vocab_size(config["vocab_size"])
        w.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // n_head)


# --- tokenizer ----------------------------------------------------------------------------------------------------
def pre_tokenizer(tokenizer) -> str:
    chkhsh = sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
    if chkhsh not in PRE_TOKENIZERS:
        raise GGUFExportError("GGUF export: this tokenizer's pre-tokenizer is not one llama.cpp knows by name "
                              f"(hash {chkhsh[:16]}); export format hf instead.")
    return PRE_TOKENIZERS[chkhsh]


def _vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and their types, as convert_hf_to_gguf.py's get_vocab_base lists them for a BPE vocab."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = reverse[i]
        if tok in added:
            if not decoder[i].normalized:
                tok = tokenizer.decode(tokenizer.encode(tok, add_special_tokens=False))
            special = decoder[i].special or (tok.startswith("<|") and tok.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(tok)
    return tokens, types


def end_of_turn_id(tokenizer) -> int | None:
    vocab = tokenizer.get_vocab()
    return next((vocab[t] for t in END_OF_TURN if t in vocab), None)


def _write_tokenizer(w, folder: Path, config: dict) -> None:
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not getattr(tokenizer, "is_fast", False) or \
            json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"] != "BPE":
        raise GGUFExportError("GGUF export writes byte-level BPE tokenizers (Llama 3, SmolLM, Qwen2); this model's "
                              "tokenizer is not one. Export format hf instead.")
    tokens, types = _vocab(tokenizer, config["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer(tokenizer))
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True).add_to_gguf(w, quiet=True)
    if (eot := end_of_turn_id(tokenizer)) is not None:
        w.add_eot_token_id(eot)


# --- tensors ------------------------------------------------------------------------------------------------------
def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF's split-half rope rows -> llama.cpp's interleaved pairs (LlamaModel.permute in convert_hf_to_gguf.py)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _qtype(gguf_name: str, shape: tuple, quant: str):
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return Q.F32  # norms and biases stay float32, as llama.cpp keeps them
    if quant == "f16":
        return Q.F16
    want = Q.Q8_0 if quant == "q8_0" or gguf_name in ("token_embd.weight", "output.weight") else Q.Q4_0
    block = gguf.GGML_QUANT_SIZES[want][0]
    return want if shape[-1] % block == 0 else Q.F16


class _Tensors:
    """The folder's safetensors as (gguf name, hf name, shape) with the conversion llama.cpp applies."""

    def __init__(self, folder: Path, config: dict, arch):
        import gguf

        self.folder, self.config, self.arch = folder, config, arch
        self.names = gguf.TensorNameMap(arch, config["num_hidden_layers"])
        index = folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
        self.entries = []
        from safetensors import safe_open

        for f in files:
            with safe_open(folder / f, framework="pt") as st:
                for key in st.keys():
                    if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and config.get("tie_word_embeddings")):
                        continue
                    gname = self.names.get_name(key, try_suffixes=(".weight", ".bias"))
                    if gname is None:
                        raise GGUFExportError(f"GGUF export: no llama.cpp name for tensor {key!r} ({f})")
                    self.entries.append((gname, key, f, tuple(st.get_slice(key).get_shape())))

    def data(self, key: str, file: str) -> np.ndarray:
        import gguf
        import torch
        from safetensors import safe_open

        with safe_open(self.folder / file, framework="pt") as st:
            t = st.get_tensor(key).to(torch.float32).numpy()
        if self.arch == gguf.MODEL_ARCH.LLAMA:
            n_head = self.config["num_attention_heads"]
            if key.endswith(("q_proj.weight", "q_proj.bias")):
                t = permute_qk(t, n_head)
            elif key.endswith(("k_proj.weight", "k_proj.bias")):
                t = permute_qk(t, self.config.get("num_key_value_heads", n_head))
        return t


def _converted(t: np.ndarray, qtype) -> np.ndarray:
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return t.astype(np.float32)
    if qtype == Q.F16:
        return t.astype(np.float16)
    return gguf.quants.quantize(t.astype(np.float32), qtype)


def _byte_shape(shape: tuple, qtype) -> tuple[tuple, np.dtype]:
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype in (Q.F32, Q.F16):
        return shape, np.dtype(np.float32 if qtype == Q.F32 else np.float16)
    return tuple(gguf.quants.quant_shape_to_byte_shape(shape, qtype)), np.dtype(np.uint8)


FILE_TYPES = {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}


def write_gguf(folder: Path, out_path: Path, quant: str, name: str, progress: Progress | None = None) -> dict:
    """Convert the merged model in `folder` into `out_path`. Returns {"tensors": n, "quant": quant}."""
    import gguf

    if quant not in QUANTS:
        raise GGUFExportError(f"quant {quant!r} is not one of {', '.join(QUANTS)} (the types the gguf package writes)")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    arch = model_arch(config)
    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[quant]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_hparams(w, config, arch)
    _write_tokenizer(w, folder, config)
    tensors = _Tensors(folder, config, arch)
    plan = []
    for gname, key, file, shape in tensors.entries:
        qtype = _qtype(gname, shape, quant)
        byte_shape, dtype = _byte_shape(shape, qtype)
        w.add_tensor_info(gname, byte_shape, dtype, int(np.prod(byte_shape)) * dtype.itemsize,
                          raw_dtype=None if dtype != np.uint8 else qtype)
        plan.append((key, file, qtype))
    w.write_header_to_file(out_path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (key, file, qtype) in enumerate(plan):
        w.write_tensor_data(_converted(tensors.data(key, file), qtype))
        if progress:
            progress(f"writing {out_path.name}", i + 1, len(plan))
    w.close()
    return {"tensors": len(plan), "quant": quant, "architecture": gguf.MODEL_ARCH_NAMES[arch]}
