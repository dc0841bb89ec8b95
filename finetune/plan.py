"""Know before you launch: the memory a job needs, from the model's config.json alone (no weights, no torch).

    python -m finetune plan JOB.yaml [--device-memory-gib N] [--device cuda|cpu] [--set section.field=value ...]

The estimate follows what the engine really keeps, phase by phase of a training step:
  weights      quantized linears (NF4 / FP4: half a byte per weight plus the block constants, 8-bit: a byte plus
               a scale per row, else the compute dtype), embeddings / lm_head / norms in the compute dtype on a GPU
               (the fast path casts back what prepare_model_for_kbit_training upcast) or in fp32 on a quantized
               CPU run (nothing casts them back there)
  LoRA         fp32 master weights, fp32 gradients, optimizer states by training.optim (AdamW: two fp32 moments;
               8-bit: two bytes plus block scales; paged on a GPU: unified memory the driver can evict, not counted)
  activations  per token: with checkpointing the input of every decoder layer (parked in pinned host memory on a
               GPU once it reaches Device.offload_min_bytes, by default speed.OFFLOAD_MIN_BYTES) plus one layer's
               recompute and backward; without it every layer's; attention workspace (flash kernels: O(tokens);
               the CPU's math path: O(seq^2)); logits and loss (liger's fused linear cross-entropy on a GPU: a
               chunk; else the [tokens, vocab] logits in the compute dtype, their fp32 copy, log-softmax and its
               gradient)
  device       CUDA context beside the allocator; reserved = allocated plus the caching allocator's slack. On a CPU
               host the "device" is RAM and the baseline is the Python process with the libraries loaded.
The peak is the largest of the phases (loading, the loss, the first layer's backward, the optimizer step).
Its constants were fitted to measured peaks (docs/benchmarks.md, "Memory plan vs measured").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from finetune.config import DEFAULT_MODEL, ConfigError, JobConfig
from finetune.recipe.offload import PinnedPool  # torch-free at import
from finetune.recipe.speed import LIGER_MODEL_TYPES, OFFLOAD_MIN_BYTES  # torch-free at import

GIB = 2**30
MIB = 2**20

# Fitted to the H200 measurements (docs/benchmarks.md, "Memory plan vs measured"), one constant per physical effect:
# a layer's backward holds its recomputed activations and their gradients at once: this many times the activations
LAYER_BACKWARD_FACTOR = 1.37
# LoRA dropout, per element of a LoRA input, still held at that peak (its bool mask; the copies are freed by then)
DROPOUT_BYTES = 1.2
# LLM.int8: the int32 product of the widest projection, per token, before it is scaled to the compute dtype
INT8_ACCUMULATOR_BYTES = 3
# layer inputs in flight while checkpoints are offloaded: the one copied back, the one copied out, the recompute's
OFFLOAD_IN_FLIGHT = 2.75
# cuBLAS / cuBLASLt workspaces and small buffers the caching allocator holds from the first matmul on
CUDA_WORKSPACE_BYTES = 64 * MIB
# CUDA context + kernels loaded, outside the caching allocator (device memory in use minus reserved, measured)
CUDA_CONTEXT_BYTES = 685 * MIB
# The caching allocator's reserved memory over its peak: a share of the step's transient tensors (block rounding,
# fragmentation between differently sized activations), plus a little
ALLOCATOR_SLACK = 0.10
ALLOCATOR_SLACK_BYTES = 64 * MIB
# A CPU run: the Python process with torch, transformers, peft, accelerate, datasets (and their threads) loaded.
CPU_PROCESS_BYTES = 530 * MIB
# glibc's heap keeps memory a step frees for reuse: the CPU's peak resident set holds this many times the step's
# live activations (fitted to peak RSS of real SmolLM2 runs on CPU)
CPU_HEAP_FACTOR = 2.0
NF4_BLOCK, NF4_DQ_BLOCK, OPT8_BLOCK = 64, 256, 256
# The SmolLM2-135M-Instruct shape, for planning before the embedded model was ever converted.
EMBEDDED_CONFIG = {
    "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152,
    "tie_word_embeddings": True, "hidden_act": "silu",
}


class PlanError(ConfigError):
    """The plan cannot be made (no config.json found, an architecture it cannot read); names the field."""


# --- the model's shape ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    gated_mlp: bool = True
    qkv_bias: bool = False

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder block, by its usual module name."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        out = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        if self.gated_mlp:
            out.update(gate_proj=(h, i), up_proj=(h, i), down_proj=(i, h))
        else:
            out.update(up_proj=(h, i), down_proj=(i, h))
        return out

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears().values())

    def other_params(self) -> int:
        """Embeddings, lm_head (unless tied), norms, biases: what stays unquantized."""
        norms = self.hidden * (2 * self.layers + 1)
        bias = self.layers * (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return self.vocab * self.hidden * (1 if self.tied else 2) + norms + bias


def _first(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def shape_from_config(cfg: dict, source: str = "config.json") -> Shape:
    """A decoder's shape from its config.json (Llama-style names, with the common GPT-style aliases)."""
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers carry the language model inside
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    try:
        hidden = int(_first(cfg, "hidden_size", "n_embd", "d_model"))
        layers = int(_first(cfg, "num_hidden_layers", "n_layer", "num_layers"))
        heads = int(_first(cfg, "num_attention_heads", "n_head"))
        vocab = int(cfg["vocab_size"])
    except (TypeError, KeyError, ValueError):
        raise PlanError(f"{source}: not a decoder config this planner reads (needs hidden_size, num_hidden_layers, "
                        "num_attention_heads, vocab_size)") from None
    if min(hidden, layers, heads, vocab) <= 0:
        raise PlanError(f"{source}: hidden_size, num_hidden_layers, num_attention_heads and vocab_size must be > 0")
    model_type = str(cfg.get("model_type", ""))
    gated = model_type not in ("gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi")
    return Shape(
        model_type=model_type, hidden=hidden, layers=layers, heads=heads,
        kv_heads=int(_first(cfg, "num_key_value_heads", "num_kv_heads", default=heads)),
        head_dim=int(_first(cfg, "head_dim", default=hidden // heads)),
        intermediate=int(_first(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
        vocab=vocab, tied=bool(cfg.get("tie_word_embeddings", True)), gated_mlp=gated,
        qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
    )


def find_config(name_or_path: str, revision: str | None = None) -> tuple[dict, str]:
    """(config.json as a dict, where it came from) without loading weights or downloading anything: the embedded
    model's converted folder (or its known shape), a local folder, or a hub id already in the Hugging Face cache."""
    name = name_or_path.strip()
    if name == DEFAULT_MODEL:
        from finetune.paths import model_cache_dir

        path = model_cache_dir() / DEFAULT_MODEL / "config.json"
        return (_read_json(path), str(path)) if path.is_file() else (dict(EMBEDDED_CONFIG), f"{DEFAULT_MODEL} (built in)")
    local = Path(name).expanduser()
    if local.exists():
        path = local / "config.json"  # only this file of a folder is ever read
        if not local.is_dir() or not path.is_file():
            raise PlanError(f"model.name_or_path {name!r}: not a model folder with a config.json")
        return _read_json(path), str(path)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:  # an id the hub client refuses (bad characters): not in the cache either
        cached = None
    if isinstance(cached, str) and Path(cached).is_file():
        return _read_json(Path(cached)), cached
    raise PlanError(f"model.name_or_path {name!r}: no config.json in the Hugging Face cache and not a local folder; "
                    "the plan reads only config.json (download it, or give a folder that holds it)")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"{path}: cannot read config.json ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise PlanError(f"{path}: config.json is not a JSON object")
    return data


# --- the device -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    kind: str                      # "cuda" or "cpu"
    memory_bytes: int              # of the device that trains (GPU 0, or the host's RAM)
    name: str = ""
    gpus: tuple[int, ...] = ()     # every visible GPU's memory, bytes
    fused_loss: bool | None = None  # liger-kernel present where the job runs; None: as on this machine
    offload_min_bytes: int = OFFLOAD_MIN_BYTES  # the fast path parks layer inputs of this size on in host memory

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB


def detect_device() -> Device:
    """Every visible GPU through nvidia-smi (or torch, only if this process imported it already), else the RAM."""
    gpus = _nvidia_smi()
    if not gpus and "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            gpus = [(torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory)
                    for i in range(torch.cuda.device_count())]
    if gpus:
        return Device("cuda", gpus[0][1], gpus[0][0], tuple(m for _, m in gpus))
    return Device("cpu", _ram_bytes(), "CPU RAM")


def _nvidia_smi() -> list[tuple[str, int]]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    for idx, line in enumerate(out.strip().splitlines()):
        name, _, mib = line.rpartition(",")
        if visible is not None and str(idx) not in [v.strip() for v in visible.split(",")]:
            continue
        try:
            gpus.append((name.strip(), int(float(mib)) * MIB))
        except ValueError:
            continue
    return gpus


def _ram_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def with_memory(device: Device, gib: float | None = None, kind: str | None = None) -> Device:
    """The device with its memory (and kind) overridden, e.g. to plan for a GPU from a laptop."""
    kind = kind or device.kind
    mem = int(gib * GIB) if gib is not None else (device.memory_bytes if kind == device.kind else 0)
    name = device.name if kind == device.kind else ("GPU" if kind == "cuda" else "CPU RAM")
    return Device(kind, mem, name, device.gpus if kind == device.kind else (), device.fused_loss,
                  device.offload_min_bytes)


# --- the estimate ---------------------------------------------------------------------------------------------------
@dataclass
class Setting:
    """What the estimate depends on, resolved from a JobConfig and a device."""
    gpu: bool
    quant: str               # none / 8bit / 4bit
    double_quant: bool
    a: int                   # bytes per element of the compute dtype
    r: int
    targets: list[str]
    dropout: bool
    dora: bool
    batch: int
    seq: int
    accumulation: int
    checkpointing: bool
    checkpointed: int | None  # with checkpointing: how many decoder layers recompute (None: all)
    optim: str
    fused_loss: bool
    packed: bool             # padding-free rows (GPU): attention per example, no padding
    shards: int = 0          # FSDP: the processes the model is sharded over (0: not sharded)
    logp_chunk: int = 0      # DPO: the output head runs on chunks of this many positions (0: SFT's loss)

    @property
    def fast_path(self) -> bool:
        """The GPU fast path (fused LoRA, liger, the fast checkpoint): on a GPU, and off under FSDP."""
        return self.gpu and not self.shards

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def residual_bytes(self) -> int:
        """The hidden states' dtype: fp32 on a quantized CPU run (its embeddings stay upcast), else compute."""
        return 4 if (not self.gpu and self.quant != "none") else self.a


def setting(config: JobConfig, shape: Shape, device: Device) -> Setting:
    gpu = device.kind == "cuda"
    m, lo, tr = config.model, config.lora, config.training
    a = 4 if m.torch_dtype == "float32" else 2
    fused = device.fused_loss if device.fused_loss is not None else _liger_installed()
    shards = fsdp_shards(config, device)
    fused = bool(gpu and fused and tr.use_liger_kernel and shape.model_type in LIGER_MODEL_TYPES
                 and not _targets_lm_head(lo.target_modules) and not shards)
    fields = dict(gpu=gpu, quant=m.quantization, double_quant=m.bnb_4bit_use_double_quant, a=a, r=lo.r,
                  targets=_targets(lo.target_modules, shape), dropout=lo.lora_dropout > 0, dora=lo.use_dora,
                  batch=tr.per_device_train_batch_size, seq=config.data.max_seq_length,
                  accumulation=tr.gradient_accumulation_steps, checkpointing=tr.gradient_checkpointing,
                  checkpointed=tr.gradient_checkpointing_layers, optim=tr.optim, fused_loss=fused,
                  packed=gpu and tr.padding_free and not shards, shards=shards)
    return Setting(**(fields | _objective(config)))


def _objective(config: JobConfig) -> dict:
    """DPO trains on both answers of each pair (twice the rows, padded, the chosen and rejected in one batch) and
    takes its log-probabilities chunk by chunk (finetune/recipe/dpo.py), except under FSDP."""
    if config.training.objective != "dpo":
        return {}
    from finetune.recipe.dpo import LOGP_CHUNK

    chunk = 0 if config.launch.strategy == "fsdp" else LOGP_CHUNK  # under FSDP: the whole batch's logits
    return {"batch": 2 * config.training.per_device_train_batch_size, "packed": False, "fused_loss": False,
            "logp_chunk": chunk}


def fsdp_shards(config: JobConfig, device: Device) -> int:
    """How many processes an FSDP job shards the model over (all of them, on every machine); 0 without FSDP."""
    launch = config.launch
    if launch.strategy != "fsdp" or device.kind != "cuda":
        return 0
    if launch.num_processes == "auto":
        return max(1, len(device.gpus)) * launch.num_machines
    return max(1, int(launch.num_processes))


def _liger_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def _targets_lm_head(targets) -> bool:
    return not isinstance(targets, str) and "lm_head" in targets


def _targets(targets, shape: Shape) -> list[str]:
    names = list(shape.linears())
    if isinstance(targets, str):
        return names if targets == "all-linear" else [n for n in names if n == targets or n.endswith(targets)]
    return [n for n in names if any(n == t or n.endswith("." + t) or t.endswith(n) for t in targets)]


def linear_weight_bytes(shape: Shape, s: Setting) -> float:
    """The decoder's linear layers as loaded: NF4/FP4 with block constants, LLM.int8 with row scales, or dense."""
    p = shape.linear_params()
    modules = shape.layers * len(shape.linears())
    if s.quant == "4bit":
        constants = p / NF4_BLOCK * (1 + 4 / NF4_DQ_BLOCK) if s.double_quant else p / NF4_BLOCK * 4
        return p / 2 + constants + modules * 16 * 4  # + each module's 16-entry code table
    if s.quant == "8bit":
        rows = shape.layers * sum(out for _, out in shape.linears().values())
        return p + rows * 4
    return p * s.a


def lora_params(shape: Shape, s: Setting) -> int:
    lin = shape.linears()
    per_layer = sum(s.r * (lin[n][0] + lin[n][1]) + (lin[n][1] if s.dora else 0) for n in s.targets)
    return shape.layers * per_layer


def optimizer_bytes(n: int, s: Setting) -> float:
    """Optimizer states of n fp32 LoRA parameters (paged states on a GPU live in evictable unified memory)."""
    if s.optim == "adamw_torch":
        return 8 * n
    if s.optim == "paged_adamw_8bit" and s.gpu:
        return 0
    return 2 * n * (1 + 4 / OPT8_BLOCK)


def layer_bytes_per_token(shape: Shape, s: Setting) -> float:
    """Activations one decoder layer keeps for its backward, per token (its input excluded)."""
    h, i, a = shape.hidden, shape.intermediate, s.a
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    lin = shape.linears()
    lora_in = sum(lin[n][0] for n in s.targets)
    if s.fast_path:  # liger norms / in-place rope / swiglu, fused LoRA addmm, flash attention
        dense = a * (h + (q + 2 * kv) + q + 3 * h + 3 * i) + 4 * (2 + shape.heads)
        lora = a * s.r * len(s.targets) + DROPOUT_BYTES * lora_in * s.dropout
        if s.quant == "8bit":  # LLM.int8 writes an int32 product before scaling it to the compute dtype
            lora += INT8_ACCUMULATOR_BYTES * i
    else:      # transformers + peft as they are: fp32 norms, fp32 LoRA input copies
        res = s.residual_bytes
        dense = 2 * h * (8 + 2 * res) + a * (2 * (q + 2 * kv) + q + 2 * h + 4 * i)
        lora = 4 * (lora_in + s.r * len(s.targets)) + 5 * lora_in * s.dropout
    return dense + lora


def attention_bytes(shape: Shape, s: Setting) -> float:
    """The attention workspace of one layer: flash kernels keep O(tokens); the CPU's math path a [seq, seq] score
    matrix per head (scores, probabilities and their gradient)."""
    if s.gpu:
        return s.tokens * shape.heads * 4
    return s.batch * shape.heads * s.seq * s.seq * (4 + 2 * s.a)


def loss_bytes(shape: Shape, s: Setting) -> dict[str, float]:
    """Logits and loss: the forward's peak, the peak of the loss's own backward, and what stays held while the
    layers run backward (the output keeps its logits until the step ends)."""
    t, h, v, a = s.tokens, shape.hidden, shape.vocab, s.a
    if s.logp_chunk:  # one chunk's logits, their fp32 copy and logsumexp's; recomputed with its gradient
        c = min(t, s.logp_chunk)
        return {"forward": c * v * (a + 8), "backward": c * v * (a + 12), "held": t * h * a}
    if s.fused_loss:  # liger: logits of one chunk at a time, the input gradient computed in the forward
        chunk = 1 << max(0, math.ceil(t / math.ceil(v / h)) - 1).bit_length()
        return {"forward": 2 * t * h * a + chunk * v * (a + 4), "backward": 0.0, "held": t * h * a}
    out = 4 if (not s.gpu and s.quant != "none") else a  # an fp32 lm_head on a quantized CPU run
    # forward: logits, their fp32 copy, log-softmax; its backward adds the gradient in and out
    return {"forward": t * v * (out + 8), "backward": t * v * (out + 12), "held": t * v * out}


@dataclass
class Plan:
    config: JobConfig
    device: Device
    shape: Shape
    source: str
    phase: str                                   # which part of the step sets the peak
    breakdown: dict[str, float]                  # bytes at the peak, by part (they sum to peak)
    phases: dict[str, float]                     # every phase's allocated bytes
    training_peak: float                         # the largest phase of a training step (loading left out)
    host_offload_bytes: float = 0.0              # layer inputs parked in pinned host memory (GPU)
    notes: list[str] = field(default_factory=list)
    suggestions: list[dict] = field(default_factory=list)
    longest_seq: int | None = None
    largest_batch: int | None = None
    fewest_checkpointed: int | None = None       # with checkpointing: the fewest checkpointed layers that fit

    @property
    def peak(self) -> float:
        return self.phases[self.phase]

    @property
    def reserved(self) -> float:
        return self.reserved_for(self.peak)

    def reserved_for(self, allocated: float) -> float:
        """What the caching allocator holds when `allocated` bytes are in use (a CPU has no such cache)."""
        if self.device.kind != "cuda":
            return allocated
        transient = max(0.0, allocated - self.phases["optimizer_step"])
        return allocated + transient * ALLOCATOR_SLACK + ALLOCATOR_SLACK_BYTES

    @property
    def needed(self) -> float:
        """What the device must hold: reserved plus the CUDA context (a CPU run: the process's peak RSS)."""
        return self.reserved + (CUDA_CONTEXT_BYTES if self.device.kind == "cuda" else 0)

    @property
    def fits(self) -> bool:
        return self.device.memory_bytes <= 0 or self.needed <= self.device.memory_bytes

    def summary(self) -> dict:
        return {"peak_gib": _gib(self.peak), "training_peak_gib": _gib(self.training_peak), "reserved_gib": _gib(self.reserved), "needed_gib": _gib(self.needed),
                "device_memory_gib": _gib(self.device.memory_bytes), "fits": self.fits}

    def to_dict(self) -> dict:
        out = {**self.summary(), "device": {"kind": self.device.kind, "name": self.device.name,
                                            "gpus_gib": [_gib(m) for m in self.device.gpus]},
               "model": {"name_or_path": self.config.model.name_or_path, "config_json": self.source,
                         "model_type": self.shape.model_type, "layers": self.shape.layers,
                         "hidden_size": self.shape.hidden, "vocab_size": self.shape.vocab},
               "tokens_per_micro_batch": self.config.training.per_device_train_batch_size
               * self.config.data.max_seq_length,
               "peak_phase": self.phase,
               "breakdown": {k: _gib(v) for k, v in self.breakdown.items()},
               "phases_gib": {k: _gib(v) for k, v in self.phases.items()},
               "host_offload_gib": _gib(self.host_offload_bytes), "notes": self.notes,
               "suggestions": self.suggestions,
               "longest_max_seq_length_that_fits": self.longest_seq,
               "largest_batch_that_fits": self.largest_batch,
               "fewest_checkpointed_layers_that_fit": self.fewest_checkpointed}
        return out


def _gib(b: float) -> float:
    return round(b / GIB, 3)


def _parts(config: JobConfig, shape: Shape, device: Device) -> tuple[dict, dict, dict, Setting]:
    """(what lives through the whole step, what each phase adds on top, facts for the notes) in bytes."""
    s = setting(config, shape, device)
    n_lora = lora_params(shape, s)
    other_dtype = 4 if (not s.gpu and s.quant != "none") else s.a
    static = {"base_weights": linear_weight_bytes(shape, s),
              "embeddings_lm_head_norms": shape.other_params() * other_dtype,
              "lora_weights": 4 * n_lora,
              "optimizer_states": optimizer_bytes(n_lora, s),
              "runtime": CUDA_WORKSPACE_BYTES if s.gpu else CPU_PROCESS_BYTES}
    grads = 4 * n_lora
    t, h, res = s.tokens, shape.hidden, s.residual_bytes
    layer_in = t * h * res
    k = checkpointed_layers(shape, s)
    offload = s.fast_path and k > 0 and layer_in >= device.offload_min_bytes
    layer = t * layer_bytes_per_token(shape, s) + attention_bytes(shape, s)
    # the checkpointed layers keep their input (or park it in host memory), the others (the last ones) everything
    kept = (0 if offload else k * layer_in) + (shape.layers - k) * (layer_in + layer)
    # The backward reaches the whole layers first, each freeing its activations; the checkpointed ones come when
    # those are gone, and recompute theirs one layer at a time: the larger of the two moments is the peak.
    top = kept + layer * (LAYER_BACKWARD_FACTOR - 1) if k < shape.layers else 0.0
    low = (0 if offload else k * layer_in) + layer * LAYER_BACKWARD_FACTOR + \
        (OFFLOAD_IN_FLIGHT * layer_in if offload else 0) if k else 0.0
    held = kept if top >= low else kept - (shape.layers - k) * (layer_in + layer)
    loss = loss_bytes(shape, s)
    in_fwd = grads if s.accumulation > 1 else 0  # earlier micro-batches' gradients
    layer_fwd = t * s.a * (3 * shape.intermediate + h) if k else 0  # a layer run without grad
    phases = {
        "forward": {"lora_gradients": in_fwd, "saved_layer_inputs": kept + layer_in,
                    "logits_loss": max(loss["forward"], layer_fwd)},
        "loss_backward": {"lora_gradients": in_fwd, "saved_layer_inputs": kept + layer_in,
                          "logits_loss": loss["backward"]},
        "backward": {"lora_gradients": grads, "saved_layer_inputs": held, "logits_loss": loss["held"],
                     "layer_recompute": max(top, low) - held + 2 * layer_in},
        "optimizer_step": {"lora_gradients": grads,
                           "optimizer_workspace": 2 * 4 * n_lora if s.optim == "adamw_torch" else 4 * n_lora},
    }
    # the offload pins its buffers in power-of-two sizes before the first step (PinnedPool.reserve)
    info = {"offload": offload, "host": k * PinnedPool.capacity(int(layer_in)) if offload else 0, "n_lora": n_lora}
    if s.shards:
        _shard(static, phases, shape, s)
    return static, phases, info, s


def checkpointed_layers(shape: Shape, s: Setting) -> int:
    """How many decoder layers recompute their activations in backward (0 without checkpointing)."""
    if not s.checkpointing:
        return 0
    return shape.layers if s.checkpointed is None else min(s.checkpointed, shape.layers)


def _shard(static: dict, phases: dict, shape: Shape, s: Setting) -> None:
    """FSDP: each GPU keeps 1/shards of the weights, LoRA, optimizer states and gradients, and holds unsharded the
    layer being run and the next one (prefetched), and the output head from the forward to its backward."""
    for key in ("base_weights", "embeddings_lm_head_norms", "lora_weights", "optimizer_states"):
        static[key] /= s.shards
    for extra in phases.values():
        for key in ("lora_gradients", "optimizer_workspace"):
            if key in extra:
                extra[key] /= s.shards
    layer = linear_weight_bytes(shape, s) / shape.layers + 4 * lora_params(shape, s) / shape.layers
    static["fsdp_unsharded"] = 2 * layer + shape.vocab * shape.hidden * s.a


def _load_phase(shape: Shape, s: Setting, static: dict) -> dict:
    """Loading (no LoRA or optimizer state yet): a quantized model goes through prepare_model_for_kbit_training,
    which upcasts embeddings / lm_head / norms to fp32 one tensor at a time (the fast path casts them back on a
    GPU): the fp32 copies plus the compute-dtype original of the one being cast."""
    not_yet = -(static["lora_weights"] + static["optimizer_states"])
    if s.quant == "none":
        return {"not_loaded_yet": not_yet}
    upcast = shape.other_params() * (4 - s.a) if s.gpu else 0  # on a CPU they stay fp32 (counted already)
    return {"not_loaded_yet": not_yet, "loading_transient": upcast + shape.vocab * shape.hidden * s.a}


def estimate(config: JobConfig, device: Device | None = None, *, suggest: bool = True) -> Plan:
    """The memory plan of `config` on `device` (detected when None)."""
    device = device or detect_device()
    cfg, source = find_config(config.model.name_or_path, config.model.revision)
    shape = shape_from_config(cfg, source)
    plan = _estimate(config, device, shape, source)
    if suggest:
        plan.longest_seq = _search(lambda n: _fits(config, device, shape, **{"data.max_seq_length": n}), 16, 131072)
        plan.largest_batch = _search(
            lambda n: _fits(config, device, shape, **{"training.per_device_train_batch_size": n}), 1, 1024)
        if not plan.fits:
            plan.suggestions = suggestions(config, device, shape, source, plan)
        elif config.training.gradient_checkpointing:
            _fewest_checkpointed(plan, config, device, shape)
    if not plan.fits and device.kind == "cuda" and len(device.gpus) > 1 and config.launch.strategy == "ddp":
        plan.notes.append(f"does not fit one GPU: launch.strategy fsdp shards the model across the "
                          f"{len(device.gpus)} GPUs (this plan is for one GPU holding all of it)")
    return plan


def _estimate(config: JobConfig, device: Device, shape: Shape, source: str) -> Plan:
    static, phases, info, s = _parts(config, shape, device)
    if not s.gpu:
        for extra in phases.values():
            extra["heap_retained"] = (CPU_HEAP_FACTOR - 1) * sum(extra.values())
    phases["loading"] = _load_phase(shape, s, static)
    totals = {name: sum(static.values()) + sum(extra.values()) for name, extra in phases.items()}
    training = max(v for k, v in totals.items() if k != "loading")
    worst = max(totals, key=totals.get)
    parts = {**static, **phases[worst]}
    if parts.pop("not_loaded_yet", None) is not None:
        parts.pop("lora_weights"), parts.pop("optimizer_states")
    breakdown = {k: v for k, v in parts.items() if v > 0}
    notes = []
    if info["offload"]:
        notes.append(f"layer inputs go to {_gib(info['host'])} GiB of pinned host memory, pinned before the first "
                     "step (checkpoint offload)")
    if s.optim == "paged_adamw_8bit" and s.gpu:
        notes.append(f"paged optimizer states ({_gib(2 * info['n_lora'])} GiB) live in unified memory the driver "
                     "can evict to the host")
    if not s.gpu:
        notes.append("CPU run: the estimate is the training process's peak resident memory")
    if s.shards:
        notes.append(f"per GPU under FSDP over {s.shards} processes: 1/{s.shards} of the weights, LoRA, optimizer "
                     "states and gradients, plus one layer and the output head whole (the fast path is off)")
    return Plan(config, device, shape, source, worst, breakdown, totals, training, info["host"], notes)


def _fewest_checkpointed(plan: Plan, config: JobConfig, device: Device, shape: Shape) -> None:
    """Record, and note when it is fewer than now, how few decoder layers need to checkpoint for the job to fit:
    the others skip the recompute (a third of their work), so steps are faster for the memory left unused."""
    key, n = "training.gradient_checkpointing_layers", shape.layers
    whole = _search(lambda w: _fits(config, device, shape, **{key: n - w}), 0, n)
    if whole is None:
        return
    plan.fewest_checkpointed = n - whole
    now = checkpointed_layers(shape, setting(config, shape, device))
    if plan.fewest_checkpointed < now:
        faster = _estimate(_variant(config, **{key: n - whole}), device, shape, "")
        some = (f"checkpointing only {n - whole} of the {n} decoder layers ({key}={n - whole}): the others skip"
                if whole < n else f"no checkpointing ({key}=0): the layers skip")
        plan.notes.append(f"the memory allows {some} the recompute, for faster steps at {_gib(faster.needed)} GiB "
                          "needed")


def _variant(config: JobConfig, **changes) -> JobConfig:
    data = config.model_dump(mode="json")
    for key, value in changes.items():
        section, name = key.split(".")
        data[section][name] = value
    return JobConfig.model_validate(data)


def _fits(config: JobConfig, device: Device, shape: Shape, **changes) -> bool:
    return _estimate(_variant(config, **changes), device, shape, "").fits


def _search(fits, lo: int, hi: int) -> int | None:
    """The largest n in [lo, hi] with fits(n), assuming fits is monotone (None when even lo does not fit)."""
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


# --- suggestions ----------------------------------------------------------------------------------------------------
def _candidates(config: JobConfig, device: Device, shape: Shape) -> list[tuple[str, dict]]:
    """Changes that lower the peak, in the order we would recommend them when they fit (least effect on the
    result first: checkpointing and the optimizer change no numbers that matter; a smaller batch with more
    accumulation keeps the effective batch; 4-bit changes the base slightly; a shorter sequence drops data)."""
    tr, out = config.training, []
    if not tr.gradient_checkpointing:
        out.append(("turn gradient checkpointing on (about 20% slower)", {"training.gradient_checkpointing": True}))
    elif tr.gradient_checkpointing_layers is not None and tr.gradient_checkpointing_layers < shape.layers:
        out.append((f"checkpoint all {shape.layers} decoder layers (slower: each recomputes its activations)",
                    {"training.gradient_checkpointing_layers": shape.layers}))
    if tr.optim == "adamw_torch":
        optim = "paged_adamw_8bit" if device.kind == "cuda" else "adamw_8bit"
        out.append((f"8-bit optimizer states ({optim})", {"training.optim": optim}))
    batch, effective = tr.per_device_train_batch_size, tr.per_device_train_batch_size * tr.gradient_accumulation_steps
    if batch > 1:
        b = _search(lambda n: _fits(config, device, shape, **{"training.per_device_train_batch_size": n}), 1, batch - 1)
        b = next(n for n in range(b or 1, 0, -1) if effective % n == 0)  # keeps the effective batch exactly
        acc = effective // b
        out.append((f"batch {b} with {acc} accumulation steps (the same effective batch of {b * acc})",
                    {"training.per_device_train_batch_size": b, "training.gradient_accumulation_steps": acc}))
    gpus = len(device.gpus) * config.launch.num_machines
    if (device.kind == "cuda" and gpus > 1 and config.launch.strategy == "ddp" and config.model.quantization != "8bit"
            and tr.optim != "paged_adamw_8bit"):
        out.append((f"shard the model over the {gpus} GPUs (FSDP; slower per token than DDP)",
                    {"launch.strategy": "fsdp", "launch.num_processes": gpus}))
    if config.model.quantization != "4bit":
        out.append(("load the base in 4-bit (QLoRA)", {"model.quantization": "4bit"}))
    seq = config.data.max_seq_length
    longest = _search(lambda n: _fits(config, device, shape, **{"data.max_seq_length": n}), 16, seq - 1) if seq > 16 else None
    if longest:
        out.append((f"max_seq_length {_round_seq(longest)} (longer examples are truncated)",
                    {"data.max_seq_length": _round_seq(longest)}))
    return out


def _round_seq(n: int) -> int:
    return n - n % 64 if n >= 128 else n


def suggestions(config: JobConfig, device: Device, shape: Shape, source: str, plan: Plan | None = None) -> list[dict]:
    """Ranked changes, each with its own estimate: those that fit first (in recommended order), then the rest by
    how close they come; when no single change fits, every cheap one together (plus batch / length limits)."""
    rows = []
    for rank, (why, changes) in enumerate(_candidates(config, device, shape)):
        p = _estimate(_variant(config, **changes), device, shape, source)
        rows.append({"change": why, "set": changes, **p.summary(), "_rank": rank})
    if not any(r["fits"] for r in rows if "data.max_seq_length" not in r["set"]):  # only truncation fits, or nothing
        rows.append(_combined(config, device, shape, source, rows))
    rows.sort(key=lambda r: (not r["fits"], r["_rank"] if r["fits"] else r["needed_gib"]))
    for r in rows:
        r.pop("_rank")
    return rows


def _combined(config: JobConfig, device: Device, shape: Shape, source: str, rows: list[dict]) -> dict:
    changes: dict = {}
    for r in rows:
        # FSDP is left out: it refuses the paged optimizer another row may bring
        if not any(k in r["set"] for k in ("data.max_seq_length", "training.per_device_train_batch_size",
                                           "launch.strategy")):
            changes.update(r["set"])
    base = _variant(config, **changes)
    tr = base.training
    effective = tr.per_device_train_batch_size * tr.gradient_accumulation_steps
    b = _search(lambda n: _fits(base, device, shape, **{"training.per_device_train_batch_size": n}), 1,
                tr.per_device_train_batch_size)
    if b is not None:
        changes.update({"training.per_device_train_batch_size": b,
                        "training.gradient_accumulation_steps": math.ceil(effective / b)})
    else:
        changes["training.per_device_train_batch_size"] = 1
        changes["training.gradient_accumulation_steps"] = effective
        one = _variant(base, **{"training.per_device_train_batch_size": 1})
        n = _search(lambda n: _fits(one, device, shape, **{"data.max_seq_length": n}), 16, base.data.max_seq_length)
        if n:
            changes["data.max_seq_length"] = _round_seq(n)
    p = _estimate(_variant(config, **changes), device, shape, source)
    why = "all of: " + ", ".join(f"{k}={v}" for k, v in changes.items())
    return {"change": why, "set": changes, **p.summary(), "_rank": len(rows)}


def smallest_fix(plan: Plan) -> dict | None:
    """The first suggestion that fits (what an out-of-memory message names), or None."""
    return next((s for s in plan.suggestions if s["fits"]), None)


# --- CLI ------------------------------------------------------------------------------------------------------------
def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune plan",
                                description="estimate a job's peak memory from the model's config.json; print JSON")
    p.add_argument("config", help="job YAML")
    p.add_argument("--device-memory-gib", type=float, help="plan for a device of this much memory (default: detected)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="plan for a GPU or a CPU run (default: detected)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a field")
    a = p.parse_args(argv)
    if a.device_memory_gib is not None and not a.device_memory_gib > 0:
        print("error: --device-memory-gib must be a positive number of GiB", file=sys.stderr)
        return 2
    try:
        config = JobConfig.load(a.config)
        if a.set:
            config = config.with_overrides(a.set)
        device = detect_device()
        if a.device_memory_gib is not None or a.device:
            device = with_memory(device, a.device_memory_gib, a.device)
        plan = estimate(config, device)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=1))
    return 0


def oom_hint(config: JobConfig, exc: BaseException, device: Device | None = None) -> str:
    """For a run that ran out of memory: the plan's numbers and the smallest change it says fits ("" for any
    other error, or when no plan can be made). When the plan thought the job fits (another process holds memory,
    or the estimate is low here), the change is the first that leaves a quarter of the device free."""
    from finetune.errors import is_out_of_memory

    if not is_out_of_memory(exc):
        return ""
    try:
        device = device or detect_device()
        plan = estimate(config, device)
        text = (f" The memory plan: {_gib(plan.needed)} GiB needed of {_gib(device.memory_bytes)} GiB "
                f"(peak while {plan.phase.replace('_', ' ')}).")
        if plan.fits:
            text += " It was expected to fit: another process may hold device memory."
            tighter = with_memory(device, 0.75 * plan.needed / GIB)
            plan = estimate(config, tighter)
        fix = smallest_fix(plan)
    except Exception:  # the plan is advice: never let it hide the error itself
        return ""
    if fix is None:
        return text
    sets = " ".join(f"--set {k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in fix["set"].items())
    return text + f" Smallest change that fits: {fix['change']} ({sets}), planned at {fix['needed_gib']} GiB."
