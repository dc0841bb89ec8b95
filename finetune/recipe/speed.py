"""The GPU fast path. The SFT recipe (finetune/recipe/sft.py) calls patch_model_for_speed(model, training_cfg)
after LoRA is applied.

On a CUDA device, by default, each piece applied only where it fits and skipped (with the reason logged) where not:
  keep_bf16        no fp32 copy of the frozen embeddings / lm_head / norms (prepare_model_for_kbit_training upcasts
                   them; on a GPU that costs memory and a cast per use for nothing: the compute runs in bf16 anyway)
  liger            liger-kernel's fused RMSNorm, SwiGLU, RoPE and fused linear + cross-entropy (the [tokens, vocab]
                   logits are never materialised in training) for Llama / Qwen2 / Mistral
  rope_fp32        with liger's RoPE on a 4-bit model (keep_bf16): the rotary tables in fp32, so q and k are rotated
                   in fp32 and rounded once, as in the fp32-upcast model
  fused_lora       LoRA as one addmm on the base output (base + scale * (x A^T) B^T), computed in the compute dtype
                   from fp32 master weights: no clone, no fp32 copy of x, no separate scale and add passes
  fused_proj       each LoRA projection (frozen base + LoRA) as ONE autograd node with a hand-written backward, the
                   4-bit base weight dequantized by bitsandbytes' CUDA kernels called directly, the LoRA weights cast
                   to the compute dtype once per optimizer step: far less host work per projection than peft + bnb
  group            q/k/v (and gate/up) as one node: one LoRA-A product for the shared input, one input gradient
                   (only without LoRA dropout, whose masks are independent per projection)
  stack            q/k/v on 4-bit weights as ONE matrix product: the three dequantized into one stacked weight,
                   the LoRA B's as one block-diagonal matrix (Llama / Qwen2 / Mistral; "+stack" forces it elsewhere)
  lean_dequant     the 4-bit dequantization as bare calls of bitsandbytes' C functions into one reused buffer
  nf4_kernel       inside the layer graphs, an NF4 weight dequantized by one Triton kernel instead of bitsandbytes'
                   three (finetune/recipe/nf4_kernel.py; the same values bit for bit)
  varlen_attention padding-free batches (one row, position_ids restarting at 0 per example) attended per example
                   through torch's variable-length flash attention: no padding compute and no cross-contamination
  dense_rows       a packed row whose examples all have one length (fixed-length data), once that shape recurs,
                   attended as a dense batch through SDPA with cuDNN's kernel first (twice flash varlen's speed)
  fast_checkpoint  activation checkpointing as one autograd function per decoder layer (input kept, layer recomputed
                   in backward): measured faster than torch's non-reentrant checkpoint with its saved-tensor hooks;
                   single process only (DDP forbids a reentrant backward), else torch's non-reentrant checkpoint
  graphs           the checkpointed layers replayed as CUDA graphs (forward, and recompute + backward) once a
                   shape repeats: one launch instead of hundreds of short kernels queued one by one from Python
                   (finetune/recipe/layer_graphs.py; one process, layers without dropout, fixed shapes)
  offload          the fast checkpoint with layer inputs of 16 MiB or more parked in pinned CPU memory: copied out on
                   a side stream, copied back one layer ahead of the recompute (finetune/recipe/offload.py)
  pin_ahead        the offload's pinned buffers for the run's largest batch allocated before the first step
  compile          torch.compile of each decoder layer (opt-in, STUDIO_SPEED=+compile: measured, see docs/benchmarks.md)

On the CPU it changes nothing: the same recipe runs there as the plain transformers + peft model.

STUDIO_SPEED (developer switch, comma separated) turns pieces off or on for experiments and the benchmark:
"-liger" (or one of its kernels: "-liger_rope", "-liger_rms_norm", "-liger_swiglu", "-liger_flce"), "-fused_lora",
"-fused_proj", "-group", "-stack", "-lean_dequant", "-nf4_kernel", "-varlen", "-dense_rows", "-offload",
"-pin_ahead", "-fast_checkpoint", "-graphs", "-keep_bf16", "-rope_fp32", "+compile", "+bf16_lora" (LoRA weights
stored in bf16), "none" (nothing at all).

`python -m finetune.recipe.speed --selfcheck` prints which pieces this machine can use and checks the attention kernel
against a reference.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import sys
import weakref

from finetune.recipe.layer_graphs import LayerGraphs
from finetune.recipe.lora_fused import fuse_lora, fused_pieces
from finetune.recipe.offload import InputOffloader, keep_input, kept_input
from finetune.recipe.speed_switches import switches as _switches
from finetune.recipe.speed_switches import wanted as _wanted

log = logging.getLogger(__name__)

LIGER_MODEL_TYPES = ("llama", "qwen2", "mistral")
VARLEN_NAME = "studio_varlen"
# A layer input smaller than this stays on the GPU (parking it would save little and cost two copies' host work).
# Measured on an H200 (docs/benchmarks.md, run 11): with the copy back started one layer ahead, parking Llama-3-8B's
# 32 MiB inputs at 2 x 2048 tokens saves 0.9 GiB for 0.3% of the speed (within the steps' noise).
OFFLOAD_MIN_BYTES = int(os.environ.get("STUDIO_OFFLOAD_MIN_MB", "16")) * 2**20


def inner_model(model):
    """The transformers *ForCausalLM inside a PeftModel (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


# --- no fp32 upcast ------------------------------------------------------------------------------------------------
def keep_compute_dtype(model, dtype) -> int:
    """Cast frozen fp32 floating parameters (what prepare_model_for_kbit_training upcast) back to `dtype`.
    Trainable (LoRA) parameters and buffers (rotary inv_freq is fp32 by design) are left alone. Returns the count."""
    import torch

    n = 0
    for p in model.parameters():
        if p.requires_grad or not p.is_floating_point() or p.dtype != torch.float32:
            continue
        p.data = p.data.to(dtype)
        n += 1
    return n


def cast_lora(model, dtype) -> int:
    n = 0
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_" in name and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n


# --- liger-kernel ---------------------------------------------------------------------------------------------------
def apply_liger(model) -> list[str]:
    """Liger's kernels on the model instance (and the model's module globals for RoPE). [] when not applicable."""
    inner = inner_model(model)
    model_type = getattr(inner.config, "model_type", None)
    if model_type not in LIGER_MODEL_TYPES:
        log.info("liger-kernel: no kernels for model type %r", model_type)
        return []
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except Exception as e:  # not installed, or incompatible with this transformers
        log.info("liger-kernel unavailable (%s: %s)", type(e).__name__, e)
        return []
    try:
        from peft.tuners.lora import LoraLayer

        flce = not isinstance(getattr(inner, "lm_head", None), LoraLayer)  # a LoRA lm_head needs its own forward
    except ImportError:
        flce = True
    kernels = {k: _wanted(f"liger_{k}") for k in ("rope", "rms_norm", "swiglu")}
    flce = flce and _wanted("liger_flce")
    _apply_liger_kernel_to_instance(model=inner, **kernels, cross_entropy=False, fused_linear_cross_entropy=flce)
    return [f"liger_{k}" for k, on in kernels.items() if on] + (["liger_fused_linear_cross_entropy"] if flce else [])


def fp32_rope_tables(model) -> int:
    """The rotary embeddings' cos/sin handed out in fp32, not in the hidden states' dtype. For a 4-bit model whose
    upcast to fp32 keep_compute_dtype undid: transformers computes its rotary in fp32 there (fp32 tables, q and k
    rounded to bf16 once), and liger's RoPE kernel computes in the tables' dtype, so fp32 tables keep that
    precision at no cost. With bf16 tables, 8B QLoRA's step-1 loss lay 0.0026 from the upcast model's (see
    docs/benchmarks.md). Only for liger's kernel: transformers' own formula would return fp32 q and k. Returns the
    count of rotary modules changed."""
    import torch

    n = 0
    for m in model.modules():
        if not type(m).__name__.endswith("RotaryEmbedding") or not hasattr(m, "inv_freq") or "forward" in vars(m):
            continue
        original = m.forward

        def forward(x, *args, _original=original, **kwargs):
            # The rotary forward reads only x's device and dtype: an empty fp32 stand-in, not a copy of x.
            return _original(x.new_empty(0, dtype=torch.float32), *args, **kwargs)

        m.forward = forward
        n += 1
    return n


# --- variable-length attention -----------------------------------------------------------------------------------
_cu_cache: list = []  # (weak reference, version, value) of the last few position tensors, newest last
CU_CACHE_SIZE = 4
# Packed rows seen whose examples all have one length, by (examples, length). Such a row is a dense batch, and
# cuDNN's attention measured twice as fast as flash varlen on an H200 (docs/benchmarks.md, run 11); but cuDNN builds
# a plan per new shape (~150 ms), so the dense path waits until a shape recurs (fixed-length or truncated data),
# and takes a few shapes only (single-example rows of variable-length data would each be a new shape).
equal_rows: collections.Counter = collections.Counter()
dense_shapes: set = set()
DENSE_AFTER = 1
MAX_DENSE_SHAPES = 8


def _segments(position_ids, count: bool = True):
    """(cu_seqlens int32 [n+1], max_len, bounds tuple, examples if the row is attended as a dense batch else 0) of
    a packed row, computed once per position tensor: every layer, the recompute and the graph key ask. The cache
    knows the tensor by identity and version, not by address: the next batch's positions often land in the memory
    the last batch's left. A new example starts wherever the position does not follow the previous one (the collate
    restarts positions at 0). `count`: a new batch (not a graph's static copy of one) counts toward equal_rows."""
    import torch

    for ref, version, value in _cu_cache:
        if ref() is position_ids and version == position_ids._version:
            return value
    p = position_ids.reshape(-1)
    starts = torch.ones(p.numel(), dtype=torch.bool, device=p.device)
    starts[1:] = p[1:] != p[:-1] + 1
    idx = torch.nonzero(starts).flatten()
    cu = torch.cat([idx, torch.tensor([p.numel()], device=p.device)]).to(torch.int32)
    bounds = tuple(cu.tolist())  # one read-back per forward
    lengths = {b - a for a, b in zip(bounds[:-1], bounds[1:])}
    max_len, dense = max(lengths), 0
    if len(lengths) == 1 and p.is_cuda and _dense_rows_on():
        shape = (len(bounds) - 1, max_len)
        equal_rows[shape] += count
        if equal_rows[shape] > DENSE_AFTER and (shape in dense_shapes or len(dense_shapes) < MAX_DENSE_SHAPES):
            dense_shapes.add(shape)
            dense = shape[0]
    _cu_cache.append((weakref.ref(position_ids), position_ids._version, (cu, max_len, bounds, dense)))
    del _cu_cache[:-CU_CACHE_SIZE]
    return _cu_cache[-1][2]


def segment_bounds(position_ids, count: bool = True) -> tuple:
    """The example boundaries of a packed row as ints (cu_seqlens on the host), and whether it is attended as a
    dense batch (both decide which kernels a layer runs)."""
    _, _, bounds, dense = _segments(position_ids, count)
    return bounds, dense


def cached_segments(position_ids) -> list:
    """The cu_seqlens tensor the attention reads for these positions (a graph captured with it keeps it alive)."""
    return [_segments(position_ids, count=False)[0]]


@functools.lru_cache(maxsize=1)
def _varlen_kernel():
    """torch's flash varlen attention and how its signature spells causality/GQA, or None. Looked up once: every
    attention call of every layer asks (inspect.signature alone costs more than a small kernel launch)."""
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, params


def varlen_usable(device) -> bool:
    kind = device.type if hasattr(device, "type") else str(device).split(":")[0]
    return kind == "cuda" and _varlen_kernel() is not None and os.environ.get("STUDIO_VARLEN_BROKEN") != "1"


def _packed_attention(query, key, value, position_ids, scaling):
    """Causal attention within each example of a packed row. query [1, Hq, T, D], key/value [1, Hkv, T, D] ->
    [1, T, Hq, D]. On CUDA a dense batch through SDPA for a recurring row of one example length, else flash varlen;
    per-example SDPA elsewhere (the reference, and the CPU path)."""
    import torch
    import torch.nn.functional as F

    cu, max_len, _, dense = _segments(position_ids)
    hq, hkv = query.shape[1], key.shape[1]
    if dense:
        return dense_rows_attention(query, key, value, dense, scaling)
    if varlen_usable(query.device):
        varlen_attn, params = _varlen_kernel()
        q = query[0].transpose(0, 1)
        k = key[0].transpose(0, 1)
        v = value[0].transpose(0, 1)
        kw = {"scale": scaling}
        if "enable_gqa" in params and hq != hkv:
            kw["enable_gqa"] = True
        elif hq != hkv:
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
        if "is_causal" in params:
            kw["is_causal"] = True
        else:
            kw["window_size"] = (-1, 0)
        out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_len, max_len, **kw)
        return out.unsqueeze(0)
    outs = []
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        outs.append(F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                                   scale=scaling, enable_gqa=hq != hkv))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


@functools.lru_cache(maxsize=1)
def _dense_kernel_order():
    """SDPA's backends with cuDNN first, or None where this torch cannot rank them (set_priority, torch >= 2.6)."""
    import inspect

    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    if "set_priority" not in inspect.signature(sdpa_kernel).parameters:
        return None
    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _dense_rows_on() -> bool:
    """Whether rows of one example length may be attended as a dense batch: the piece is wanted, and this torch can
    put cuDNN's kernel first."""
    return _wanted("dense_rows") and _dense_kernel_order() is not None


def dense_rows_attention(query, key, value, rows: int, scaling):
    """_packed_attention for a row of `rows` examples of one length: the row cut into a batch [rows, H, L, D] for
    SDPA, preferring cuDNN's kernel (then flash, memory-efficient, math where one does not apply)."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    hq, t, d = query.shape[1:]

    def batch(x):
        return x[0].unflatten(1, (rows, t // rows)).transpose(0, 1)

    with sdpa_kernel(_dense_kernel_order(), set_priority=True):
        out = F.scaled_dot_product_attention(batch(query), batch(key), batch(value), is_causal=True, scale=scaling,
                                             enable_gqa=hq != key.shape[1])
    return out.transpose(1, 2).reshape(1, t, hq, d)


def studio_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers AttentionInterface function: packed rows (batch 1, no padding mask, position_ids) go through
    _packed_attention; everything else through transformers' own SDPA path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if attention_mask is None and position_ids is not None and query.shape[0] == 1 and query.shape[2] > 1 \
            and dropout == 0.0:
        return _packed_attention(query, key, value, position_ids, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def studio_mask(*args, **kwargs):
    """The mask for studio_attention: none for an unpadded single row (the example boundaries come from
    position_ids); transformers' SDPA mask otherwise (padding, several rows)."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None and kwargs.get("batch_size", 0) == 1:
        return None
    return sdpa_mask(*args, **kwargs)


def use_varlen_attention(model) -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(VARLEN_NAME, studio_attention)
    AttentionMaskInterface.register(VARLEN_NAME, studio_mask)
    inner = inner_model(model)
    if getattr(inner.config, "_attn_implementation", None) not in ("sdpa", "eager", None):
        return False  # flash-attention or flex chosen on purpose: they handle packed rows themselves
    try:
        inner.set_attn_implementation(VARLEN_NAME)
    except Exception as e:
        log.info("varlen attention not set (%s: %s)", type(e).__name__, e)
        return False
    return True


# --- the fast checkpoint ------------------------------------------------------------------------------------------
def _checkpoint_function():
    import torch

    class FastCheckpoint(torch.autograd.Function):
        """Run the layer without saving activations, keeping only its input: on the GPU, or parked in pinned CPU
        memory by `offloader` (finetune/recipe/offload.py). In backward: take it back, recompute with grad,
        backpropagate through the recomputation. (The checkpoint torch.utils.checkpoint does, without its
        saved-tensor hooks, which measured slower here.)"""

        @staticmethod
        def forward(ctx, run, hidden, offloader, rng=True):
            ctx.run, ctx.device = run, hidden.device
            keep_input(ctx, hidden, offloader)
            ctx.rng = None
            if rng:
                ctx.rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else torch.get_rng_state()
            with torch.no_grad():
                return run(hidden)

        @staticmethod
        def backward(ctx, grad_out):
            hidden = kept_input(ctx).detach().requires_grad_(True)
            with _rng_restored(ctx.rng, ctx.device), torch.enable_grad():  # the same dropout masks as the forward
                out = ctx.run(hidden)
            torch.autograd.backward(out, grad_out)
            return None, hidden.grad, None, None

    return FastCheckpoint


@contextlib.contextmanager
def _rng_restored(state, device):
    """Run the block with the random generator at `state` (saved in the forward), then put it back where it was.
    A None state (a layer that draws no random numbers) skips both."""
    import torch

    if state is None:
        yield
        return
    cuda = device.type == "cuda"
    now = torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state()
    torch.cuda.set_rng_state(state, device) if cuda else torch.set_rng_state(state)
    try:
        yield
    finally:
        torch.cuda.set_rng_state(now, device) if cuda else torch.set_rng_state(now)


def draws_random_numbers(layer) -> bool:
    """Whether a training forward of `layer` can draw random numbers: a dropout module with p > 0, or a float
    "...dropout..." setting above 0 (attention dropout is a number, not a module). Without, the checkpoint needs
    no generator state saved and restored around the recompute."""
    import torch

    for m in layer.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        if any("dropout" in k and isinstance(v, (int, float)) and v > 0 for k, v in vars(m).items()):
            return True
    return False


def _checkpointed_layers(model) -> list:
    """The decoder layers that checkpoint themselves (transformers' GradientCheckpointingLayer with it turned on)."""
    from finetune.model import checkpointing_layers

    return [m for m in checkpointing_layers(inner_model(model))
            if m.gradient_checkpointing and hasattr(m, "_gradient_checkpointing_func")]


def offload_checkpoints(model, offload: bool = True) -> int:
    """Swap each decoder layer's checkpoint function for FastCheckpoint (inputs >= OFFLOAD_MIN_BYTES on CUDA
    go to pinned CPU memory when `offload`). Needs checkpointing already on. Under DDP the recompute runs inside
    backward (reentrant): DDP accepts that because every LoRA weight is used once per step; measured 11% faster
    than torch's non-reentrant checkpoint on 2 GPUs (docs/scaling.md; "-ddp_fast_checkpoint" turns it off there).
    Returns the layer count."""
    import functools

    import torch
    from torch.utils.checkpoint import checkpoint

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _wanted("ddp_fast_checkpoint"):
        return 0
    layers = _checkpointed_layers(model)
    if not layers:
        return 0
    inner = inner_model(model)
    fn_cls = _checkpoint_function()
    plain = functools.partial(checkpoint, use_reentrant=False)
    offloader = InputOffloader(layers=len(layers)) if offload else None
    inner._studio_offloader = offloader  # for reserve_offload

    def checkpoint_for(rng: bool, graphs):
        def ckpt(run, *args, **kwargs):
            hidden = args[0] if args else None
            if len(args) == 1 and not kwargs and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                big = hidden.is_cuda and hidden.numel() * hidden.element_size() >= OFFLOAD_MIN_BYTES
                parker = offloader if big else None
                out = graphs(run, hidden, parker) if graphs is not None else None
                return fn_cls.apply(run, hidden, parker, rng) if out is None else out
            return plain(run, *args, **kwargs)
        return ckpt

    # Graphs replay exactly only what draws no random numbers, and in one process (DDP's hooks are untested there).
    use_graphs = _wanted("graphs") and int(os.environ.get("WORLD_SIZE", "1")) == 1
    shared: dict = {}  # the layers' shared graph buffers, by signature
    for layer in layers:
        rng = draws_random_numbers(layer)
        graphs = LayerGraphs(layer, shared) if use_graphs and not rng else None
        layer._gradient_checkpointing_func = checkpoint_for(rng, graphs)
        layer._studio_graphs = graphs
    # The first layer's input must require grad for the custom function to be part of the graph.
    inner.enable_input_require_grads()
    return len(layers)


def reserve_offload(model, positions) -> int:
    """Pin now the host buffers that parking the largest of `positions` (the token positions of each of the run's
    micro-batches, an iterable read only where the model offloads) needs, so no step stalls on cudaHostAlloc when a
    batch longer than any before it arrives: 32 buffers of 64 MiB take 1.3 s on an H200 host, which a variable-length
    run would otherwise pay in the middle of training (docs/benchmarks.md). Returns the bytes pinned (0 where
    nothing is offloaded)."""
    inner = inner_model(model)
    offloader = getattr(inner, "_studio_offloader", None)
    if offloader is None or not _wanted("pin_ahead"):
        return 0
    nbytes = max(positions, default=0) * inner.config.hidden_size * inner.get_input_embeddings().weight.element_size()
    if nbytes <= 0 or nbytes < OFFLOAD_MIN_BYTES:
        return 0
    return offloader.reserve(nbytes)


def ensure_non_reentrant(model) -> bool:
    """Checkpointing on with use_reentrant=False where the model has it on at all (the engine turns it on)."""
    import functools

    from torch.utils.checkpoint import checkpoint

    layers = _checkpointed_layers(model)
    for layer in layers:
        fn = layer._gradient_checkpointing_func
        if isinstance(fn, functools.partial) and fn.keywords.get("use_reentrant") is False:
            continue
        layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
    return bool(layers)


def compile_layers(model) -> int:
    inner = inner_model(model)
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if layers is None:
        return 0
    for layer in layers:
        layer.compile(dynamic=None)
    return len(layers)


# --- the hook the recipe calls -----------------------------------------------------------------------------------
def patch_model_for_speed(model, training_cfg) -> list[str]:
    """Apply whatever speed-ups this device supports; return the names of those applied (for the log and studio.json)."""
    import torch

    applied: list[str] = []
    if not torch.cuda.is_available() or "none" in _switches():
        return applied
    inner = inner_model(model)
    dtype = getattr(inner, "dtype", torch.bfloat16)
    dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    if _wanted("keep_bf16"):
        if keep_compute_dtype(model, dtype):
            applied.append("no_fp32_upcast")
            torch.cuda.empty_cache()  # hand the freed fp32 copies back
    if _wanted("bf16_lora", default=False) and cast_lora(model, dtype):
        applied.append("bf16_lora_weights")
    if getattr(training_cfg, "use_liger_kernel", True) and _wanted("liger"):
        applied += apply_liger(model)
        lowered = "no_fp32_upcast" in applied  # the hidden states were fp32 and are bf16 now
        if lowered and "liger_rope" in applied and _wanted("rope_fp32") and fp32_rope_tables(model):
            applied.append("fp32_rope_tables")
    if _wanted("fused_lora") and fuse_lora(model):
        applied += ["fused_lora"] + fused_pieces(model)
    if getattr(training_cfg, "padding_free", True) and _wanted("varlen") and use_varlen_attention(model):
        applied.append("varlen_attention" if varlen_usable("cuda") else "packed_sdpa_attention")
        if _dense_rows_on():
            applied.append("dense_rows_attention")  # rows of one example length, once their shape recurs
    if getattr(training_cfg, "gradient_checkpointing", False):
        if ensure_non_reentrant(model):
            applied.append("non_reentrant_checkpointing")
        if _wanted("fast_checkpoint"):
            offload = _wanted("offload")
            if offload_checkpoints(model, offload=offload):
                applied += ["fast_checkpoint"] + (["offload_checkpoints"] if offload else [])
                if any(getattr(m, "_studio_graphs", None) is not None for m in _checkpointed_layers(model)):
                    applied.append("cuda_graph_layers")
    if _wanted("compile", default=False) and compile_layers(model):
        applied.append("compile_layers")
    log.info("speed-ups: %s", ", ".join(applied) or "none")
    return applied


# --- self check -----------------------------------------------------------------------------------------------------
def selfcheck() -> dict:
    """What this machine can use, and the packed attention kernel against per-example SDPA (CUDA only)."""
    import importlib.util

    import torch

    report = {"cuda": torch.cuda.is_available(), "torch": torch.__version__,
              "liger_kernel": importlib.util.find_spec("liger_kernel") is not None,
              "varlen_kernel": _varlen_kernel() is not None}
    if torch.cuda.is_available() and report["varlen_kernel"]:
        import torch.nn.functional as F

        g = torch.Generator(device="cuda").manual_seed(0)
        lens = [5, 300, 77, 1024, 1]
        T, hq, hkv, d = sum(lens), 8, 2, 128
        q = torch.randn(1, hq, T, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, hkv, T, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, hkv, T, d, device="cuda", dtype=torch.bfloat16, generator=g)
        pos = torch.cat([torch.arange(n, device="cuda") for n in lens]).unsqueeze(0)
        try:
            out = _packed_attention(q, k, v, pos, d ** -0.5)
            ref, a = [], 0
            for n in lens:
                ref.append(F.scaled_dot_product_attention(q[:, :, a:a + n].double(), k[:, :, a:a + n].double(),
                                                          v[:, :, a:a + n].double(), is_causal=True, enable_gqa=True))
                a += n
            ref = torch.cat(ref, dim=2).transpose(1, 2)
            err = float((out.double() - ref).norm() / ref.norm())
            report["varlen_rel_error"] = err
            report["varlen_ok"] = err < 2e-2
        except Exception as e:
            report["varlen_ok"] = False
            report["varlen_error"] = f"{type(e).__name__}: {e}"
    return report


if __name__ == "__main__":
    import json

    if "--selfcheck" in sys.argv:
        print(json.dumps(selfcheck(), indent=1))
    else:
        print(__doc__)
