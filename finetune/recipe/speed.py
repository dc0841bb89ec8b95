"""The GPU fast path. The SFT recipe (finetune/recipe/sft.py) calls patch_model_for_speed(model, training_cfg)
after LoRA is applied.

On a CUDA device, by default, each piece applied only where it fits and skipped (with the reason logged) where not:
  keep_bf16        no fp32 copy of the frozen embeddings / lm_head / norms (prepare_model_for_kbit_training upcasts
                   them; on a GPU that costs memory and a cast per use for nothing: the compute runs in bf16 anyway)
  liger            liger-kernel's fused RMSNorm, SwiGLU, RoPE and fused linear + cross-entropy (the [tokens, vocab]
                   logits are never materialised in training) for Llama / Qwen2 / Mistral
  fused_lora       LoRA as one addmm on the base output (base + scale * (x A^T) B^T), computed in the compute dtype
                   from fp32 master weights: no clone, no fp32 copy of x, no separate scale and add passes
  fused_proj       each LoRA projection (frozen base + LoRA) as ONE autograd node with a hand-written backward, the
                   4-bit base weight dequantized by bitsandbytes' CUDA kernels called directly, the LoRA weights cast
                   to the compute dtype once per optimizer step: far less host work per projection than peft + bnb
  group            q/k/v (and gate/up) as one node: one LoRA-A product for the shared input, one input gradient
                   (only without LoRA dropout, whose masks are independent per projection)
  varlen_attention padding-free batches (one row, position_ids restarting at 0 per example) attended per example
                   through torch's variable-length flash attention: no padding compute and no cross-contamination
  fast_checkpoint  activation checkpointing as one autograd function per decoder layer (input kept, layer recomputed
                   in backward): measured faster than torch's non-reentrant checkpoint with its saved-tensor hooks;
                   single process only (DDP forbids a reentrant backward), else torch's non-reentrant checkpoint
  offload_checkpoints  the same, with layer inputs of 128 MiB or more (long sequences) parked in pinned CPU memory
                   (copied on a side stream) and brought back for the recompute
  compile          torch.compile of each decoder layer (opt-in, STUDIO_SPEED=+compile: measured, see docs/benchmarks.md)

On the CPU it changes nothing: the same recipe runs there as the plain transformers + peft model.

STUDIO_SPEED (developer switch, comma separated) turns pieces off or on for experiments and the benchmark:
"-liger", "-fused_lora", "-fused_proj", "-group", "-varlen", "-offload", "-fast_checkpoint", "-keep_bf16", "+compile",
"+bf16_lora" (LoRA weights stored in bf16),
"none" (nothing at all).

`python -m finetune.recipe.speed --selfcheck` prints which pieces this machine can use and checks the attention kernel
against a reference.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import types

log = logging.getLogger(__name__)

LIGER_MODEL_TYPES = ("llama", "qwen2", "mistral")
VARLEN_NAME = "studio_varlen"
# A layer input smaller than this stays on the GPU. Measured on an H200 (docs/benchmarks.md): at 2 x 2048 tokens of
# Llama-3-8B (32 MiB per layer) offloading cost 5-20% of the speed for 0.9 GiB; from 16k tokens (128 MiB per layer)
# on it is what lets a 24 GiB card train 65k-token sequences.
OFFLOAD_MIN_BYTES = int(os.environ.get("STUDIO_OFFLOAD_MIN_MB", "128")) * 2**20


def _switches() -> set[str]:
    return {s.strip() for s in os.environ.get("STUDIO_SPEED", "").split(",") if s.strip()}


def _wanted(piece: str, default: bool = True) -> bool:
    sw = _switches()
    if "none" in sw:
        return False
    if f"-{piece}" in sw:
        return False
    if f"+{piece}" in sw:
        return True
    return default


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
    _apply_liger_kernel_to_instance(model=inner, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=flce)
    return ["liger_rope", "liger_rms_norm", "liger_swiglu"] + (["liger_fused_linear_cross_entropy"] if flce else [])


# --- fused LoRA forward ----------------------------------------------------------------------------------------------
def _plain_adapter(layer) -> str | None:
    """The one active adapter's name when `layer` runs plain LoRA (no DoRA or other variant, not merged, not
    disabled, no LoRA bias); else None."""
    active = layer.active_adapters
    if layer.disable_adapters or layer.merged or len(active) != 1:
        return None
    name = active[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}) or layer.lora_B[name].bias is not None:
        return None
    return name


def _fused_lora_forward(self, x, *args, **kwargs):
    """base(x) + scale * (dropout(x) A^T) B^T as one addmm, in the base output's dtype. Anything unusual (several
    active adapters, DoRA, merged weights, extra arguments, a LoRA bias) takes peft's own forward."""
    import torch
    import torch.nn.functional as F

    name = _plain_adapter(self)
    if args or kwargs or name is None:
        return self._studio_peft_forward(x, *args, **kwargs)
    if self._studio_group is not None:
        out = self._studio_group.output(self, x, name)
        if out is not None:
            return out
    if self._studio_weight is not None:
        out = _projection_forward(self, x, name)
        if out is not None:
            return out
    result = self.base_layer(x)
    dt = result.dtype
    A = self.lora_A[name].weight
    B = self.lora_B[name].weight
    h = F.linear(self.lora_dropout[name](x).to(dt), A.to(dt))
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), B.to(dt).t(),
                      alpha=self.scaling[name])
    return out.view(result.shape)


# --- one autograd function per LoRA projection ------------------------------------------------------------------
def _nf4_dequantizer(weight):
    """A function dtype -> the dense [out, in] weight of a bitsandbytes 4-bit parameter, calling the library's
    CUDA kernels directly: bnb's own forward goes through Params4bit.__torch_function__, a Python-registered
    torch op and fresh allocations for the double-quantized absmax, all host time per projection per pass."""
    import torch

    qs = weight.quant_state
    packed = weight.data
    try:
        from bitsandbytes.backends.cuda.ops import _dequantize_4bit_impl, _dequantize_blockwise_impl
    except ImportError:
        _dequantize_4bit_impl = None
    if _dequantize_4bit_impl is None or not packed.is_cuda or (qs.nested and qs.state2.blocksize != 256):
        import bitsandbytes.functional as BF

        return lambda dt: BF.dequantize_4bit(packed, qs).to(dt)

    def dense(dt):
        absmax = qs.absmax
        if qs.nested:
            absmax = _scratch(qs.absmax.numel(), packed.device)
            _dequantize_blockwise_impl(qs.absmax, qs.state2.absmax, qs.state2.code, qs.state2.blocksize,
                                       torch.float32, out=absmax)
            absmax.add_(qs.offset)
        out = torch.empty(qs.shape, dtype=dt, device=packed.device)
        _dequantize_4bit_impl(packed, absmax, qs.blocksize, qs.quant_type, dt, out=out)
        return out

    return dense


_scratch_buffers: dict = {}


def _scratch(n: int, device):
    """An fp32 buffer of n elements, reused by every dequantization on `device`: each one consumes it before the
    next is queued on the same stream, so one allocation serves them all (and the allocator call is saved)."""
    import torch

    buf = _scratch_buffers.get(device)
    if buf is None or buf.numel() < n:
        buf = _scratch_buffers[device] = torch.empty(n, dtype=torch.float32, device=device)
    return buf[:n]


_updates = [0]  # optimizer steps taken in this process (a global step hook counts them)


def _count_optimizer_steps() -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    if not getattr(_count_optimizer_steps, "done", False):
        register_optimizer_step_post_hook(lambda *_: _updates.__setitem__(0, _updates[0] + 1))
        _count_optimizer_steps.done = True


def _cast(p, dt):
    """p (a LoRA weight, fp32 master) in the compute dtype, cast once per optimizer update rather than in every
    forward, recompute and backward. The copy is kept with the parameter and redone after any optimizer step
    (fused and bitsandbytes optimizers update in place without bumping the tensor's version), any other in-place
    change (version) or a new storage."""
    if p.dtype == dt:
        return p.detach()
    key = (_updates[0], p._version, p.data_ptr(), dt)
    hit = getattr(p, "_studio_cast", None)
    if hit is not None and hit[0] == key:
        return hit[1]
    c = p.detach().to(dt)
    p._studio_cast = (key, c)
    return c


def _dense_weight(base):
    """dtype -> the frozen base weight of a LoRA projection, or None where this path does not apply (8-bit,
    a trainable base weight or bias, anything unknown)."""
    import torch

    bias = getattr(base, "bias", None)
    if (bias is not None and bias.requires_grad) or base.weight.requires_grad:
        return None
    if type(base) is torch.nn.Linear:
        w = base.weight
        return lambda dt: w if w.dtype == dt else w.to(dt)
    if type(base).__name__ == "Linear4bit" and getattr(base.weight, "quant_state", None) is not None:
        return _nf4_dequantizer(base.weight)
    return None


_projection_cls = None


def _projection_function():
    """LoraProjection.apply(x, A, B, weight_fn, bias, scale, p): base(x) + scale * (dropout_p(x) A^T) B^T as ONE
    autograd node with a hand-written backward (peft + bnb make about eight: the 4-bit matmul, two casts, the
    LoRA products, transposes, reshapes and the add, each a Python dispatch on the way in and a node on the way
    back). Saves x (shared by q/k/v, so no copy), the dropout mask, the [T, r] LoRA activation and the
    compute-dtype casts of A and B; the base weight is dequantized again in backward instead of being kept."""
    global _projection_cls
    if _projection_cls is not None:
        return _projection_cls
    import torch
    import torch.nn.functional as F

    class LoraProjection(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, A, B, weight_fn, bias, scale, p):
            dt = x.dtype
            x2 = x.reshape(-1, x.shape[-1])
            a, b = _cast(A, dt), _cast(B, dt)
            mask = None
            xd = x2
            if p > 0.0:
                mask = torch.empty_like(x2, dtype=torch.bool).bernoulli_(1.0 - p)
                xd = x2 * mask * (1.0 / (1.0 - p))
            h = torch.mm(xd, a.t())
            out = F.linear(x2, weight_fn(dt), bias)
            out.addmm_(h, b.t(), alpha=scale)
            ctx.save_for_backward(xd, a, b, h, mask)
            ctx.weight_fn, ctx.scale, ctx.p, ctx.x_shape = weight_fn, scale, p, x.shape
            ctx.dtypes = (A.dtype, B.dtype)
            return out.view(*x.shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            xd, a, b, h, mask = ctx.saved_tensors
            g = grad.reshape(-1, grad.shape[-1]).to(a.dtype)
            dB = torch.mm(g.t(), h).mul_(ctx.scale)
            dh = torch.mm(g, b).mul_(ctx.scale)
            dA = torch.mm(dh.t(), xd)
            dx = None
            if ctx.needs_input_grad[0]:
                dx = torch.mm(g, ctx.weight_fn(a.dtype))
                if mask is None:
                    dx.addmm_(dh, a)
                else:
                    dx.add_(torch.mm(dh, a).mul_(mask).mul_(1.0 / (1.0 - ctx.p)))
                dx = dx.view(ctx.x_shape)
            return dx, dA.to(ctx.dtypes[0]), dB.to(ctx.dtypes[1]), None, None, None, None

    _projection_cls = LoraProjection
    return LoraProjection


def _dropout_p(module) -> float | None:
    """The LoRA dropout probability (0 for none), or None for a dropout this path does not reproduce."""
    import torch

    if isinstance(module, torch.nn.Identity):
        return 0.0
    if type(module) is torch.nn.Dropout:
        return float(module.p) if module.training else 0.0
    return None


def _projection_forward(self, x, name):
    """The LoRA projection through LoraProjection, or None where it does not apply."""
    weight_fn = self._studio_weight
    p = _dropout_p(self.lora_dropout[name])
    if weight_fn is None or p is None:
        return None
    base = self.base_layer
    return _projection_function().apply(x, self.lora_A[name].weight, self.lora_B[name].weight, weight_fn,
                                        getattr(base, "bias", None), self.scaling[name], p)


# --- projections that read the same input, as one node ------------------------------------------------------------
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _cast_cat(params, dt):
    """torch.cat of the compute-dtype copies of `params` (the LoRA A's of a group), kept like _cast's copies."""
    import torch

    key = tuple((_updates[0], p._version, p.data_ptr()) for p in params) + (dt,)
    hit = getattr(params[0], "_studio_cat", None)
    if hit is not None and hit[0] == key:
        return hit[1]
    c = torch.cat([p.detach().to(dt) for p in params])
    params[0]._studio_cat = (key, c)
    return c


_group_cls = None


def _group_function():
    """LoraGroupProjection.apply(x, weight_fns, biases, scales, A1, B1, A2, B2, ...): the projections of one input
    (q/k/v, gate/up) as one autograd node: one LoRA-A product for all of them ([A1; A2; ...] x), and in backward
    one dA product and the input gradient accumulated in place instead of autograd summing one per projection.
    No dropout (its masks would have to be independent per projection)."""
    global _group_cls
    if _group_cls is not None:
        return _group_cls
    import torch
    import torch.nn.functional as F

    class LoraGroupProjection(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight_fns, biases, scales, *ab):
            dt = x.dtype
            x2 = x.reshape(-1, x.shape[-1])
            a = _cast_cat(ab[0::2], dt)
            bs = [_cast(B, dt) for B in ab[1::2]]
            h = torch.mm(x2, a.t())
            outs, off = [], 0
            for weight_fn, bias, scale, b in zip(weight_fns, biases, scales, bs):
                y = F.linear(x2, weight_fn(dt), bias)
                y.addmm_(h[:, off:off + b.shape[1]], b.t(), alpha=scale)
                off += b.shape[1]
                outs.append(y.view(*x.shape[:-1], y.shape[-1]))
            ctx.save_for_backward(x, a, h, *bs)
            ctx.weight_fns, ctx.scales, ctx.dtypes = weight_fns, scales, [p.dtype for p in ab]
            return tuple(outs)

        @staticmethod
        def backward(ctx, *grads):
            x, a, h, *bs = ctx.saved_tensors
            x2 = x.reshape(-1, x.shape[-1])
            dBs, dhs, dx, off = [], [], None, 0
            for grad, b, scale, weight_fn in zip(grads, bs, ctx.scales, ctx.weight_fns):
                g = grad.reshape(-1, grad.shape[-1]).to(a.dtype)
                dBs.append(torch.mm(g.t(), h[:, off:off + b.shape[1]]).mul_(scale))
                dhs.append(torch.mm(g, b).mul_(scale))
                off += b.shape[1]
                if ctx.needs_input_grad[0]:
                    dx = torch.mm(g, weight_fn(a.dtype)) if dx is None else dx.addmm_(g, weight_fn(a.dtype))
            dh = torch.cat(dhs, dim=1)
            dAs = torch.mm(dh.t(), x2).split([b.shape[1] for b in bs])
            if dx is not None:
                dx = dx.addmm_(dh, a).view(x.shape)
            out = [dx, None, None, None]
            for i, (dA, dB) in enumerate(zip(dAs, dBs)):
                out += [dA.to(ctx.dtypes[2 * i]), dB.to(ctx.dtypes[2 * i + 1])]
            return tuple(out)

    _group_cls = LoraGroupProjection
    return LoraGroupProjection


class _ProjectionGroup:
    """Sibling LoRA projections fed the same tensor (q/k/v of an attention, gate/up of an MLP). The first one
    called computes all of them as one node and keeps the others' outputs until they are called with that same
    tensor; any other call order or input falls back to one node per projection."""

    def __init__(self, members):
        self.members = members
        self.pending: dict = {}

    def output(self, member, x, name):
        hit = self.pending.pop(id(member), None)
        if hit is not None and hit[0] is x:
            return hit[1]
        for m in self.members:
            if _plain_adapter(m) != name or m._studio_weight is None or _dropout_p(m.lora_dropout[name]) != 0.0:
                return None
        ab = []
        for m in self.members:
            ab += [m.lora_A[name].weight, m.lora_B[name].weight]
        ys = _group_function().apply(x, tuple(m._studio_weight for m in self.members),
                                     tuple(getattr(m.base_layer, "bias", None) for m in self.members),
                                     tuple(m.scaling[name] for m in self.members), *ab)
        self.pending = {id(m): (x, y) for m, y in zip(self.members, ys) if m is not member}
        return ys[self.members.index(member)]


def group_projections(model) -> int:
    """Give each set of sibling projections in GROUPS (all fused, all with a dense-weight path) a shared group."""
    n = 0
    for parent in model.modules():
        for names in GROUPS:
            members = [getattr(parent, nm, None) for nm in names]
            if all(getattr(m, "_studio_weight", None) is not None for m in members):
                group = _ProjectionGroup(members)
                for m in members:
                    m._studio_group = group
                n += 1
    return n


def fuse_lora(model) -> int:
    """Bind the fused forward on every peft LoRA Linear / Linear4bit / Linear8bitLt. Returns the count."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return 0
    _count_optimizer_steps()
    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and type(module).__name__ in ("Linear", "Linear4bit", "Linear8bitLt") \
                and not hasattr(module, "_studio_peft_forward"):
            module._studio_peft_forward = module.forward
            module._studio_weight = _dense_weight(module.base_layer) if _wanted("fused_proj") else None
            module._studio_group = None
            module.forward = types.MethodType(_fused_lora_forward, module)
            n += 1
    if n and _wanted("fused_proj") and _wanted("group"):
        group_projections(model)
    return n


# --- variable-length attention -----------------------------------------------------------------------------------
_cu_cache: dict = {}


def segments_from_positions(position_ids):
    """(cu_seqlens int32 [n+1], max_len) of a packed row: a new example starts wherever the position does not
    follow the previous one (the collate restarts positions at 0)."""
    import torch

    p = position_ids.reshape(-1)
    key = (p.data_ptr(), p.numel(), p._version, p.device)
    hit = _cu_cache.get("key")
    if hit == key:
        return _cu_cache["value"]
    starts = torch.ones(p.numel(), dtype=torch.bool, device=p.device)
    starts[1:] = p[1:] != p[:-1] + 1
    idx = torch.nonzero(starts).flatten()
    cu = torch.cat([idx, torch.tensor([p.numel()], device=p.device)]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())  # one sync per forward (cached for every layer and the recompute)
    _cu_cache["key"], _cu_cache["value"] = key, (cu, max_len)
    return cu, max_len


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
    [1, T, Hq, D]. Flash varlen on CUDA; per-example SDPA elsewhere (the reference, and the CPU path)."""
    import torch
    import torch.nn.functional as F

    cu, max_len = segments_from_positions(position_ids)
    hq, hkv = query.shape[1], key.shape[1]
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


# --- checkpoint offload ---------------------------------------------------------------------------------------------
class _PinnedPool:
    """Reusable pinned host buffers (a cudaHostAlloc per layer per step costs more than the copy itself). Buffers
    are flat bytes in power-of-two sizes, so batches of varying length reuse them instead of allocating anew."""

    def __init__(self):
        self.free: dict[int, list] = {}

    def take(self, shape, dtype):
        import math

        import torch

        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        cap = 1 << max(20, (nbytes - 1).bit_length())
        bucket = self.free.get(cap)
        raw = bucket.pop() if bucket else torch.empty(cap, dtype=torch.uint8, device="cpu", pin_memory=True)
        return raw, raw[:nbytes].view(dtype).view(shape)

    def give(self, raw):
        self.free.setdefault(raw.numel(), []).append(raw)


_pool = _PinnedPool()
_side_stream = None


def _offloaded_function():
    import torch

    class OffloadedCheckpoint(torch.autograd.Function):
        """Run the layer without saving activations, keeping only its input: on the GPU, or parked in pinned CPU
        memory (copied on a side stream) when `offload`. In backward: bring it back, recompute with grad,
        backpropagate through the recomputation. (The checkpoint torch.utils.checkpoint does, without its
        saved-tensor hooks, which measured slower here.)"""

        @staticmethod
        def forward(ctx, run, hidden, offload):
            global _side_stream
            ctx.run, ctx.device, ctx.raw = run, hidden.device, None
            if offload:
                if _side_stream is None:
                    _side_stream = torch.cuda.Stream(device=hidden.device)
                raw, buf = _pool.take(hidden.shape, hidden.dtype)
                _side_stream.wait_stream(torch.cuda.current_stream(hidden.device))
                with torch.cuda.stream(_side_stream):
                    buf.copy_(hidden, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(_side_stream)
                hidden.record_stream(_side_stream)  # the allocator must not hand hidden's memory out before the copy
                ctx.raw, ctx.buf, ctx.done = raw, buf, done
            else:
                ctx.saved = hidden.detach()
            ctx.rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else torch.get_rng_state()
            with torch.no_grad():
                return run(hidden)

        @staticmethod
        def backward(ctx, grad_out):
            if ctx.raw is not None:
                torch.cuda.current_stream(ctx.device).wait_event(ctx.done)
                hidden = ctx.buf.to(ctx.device, non_blocking=True)
                _pool.give(ctx.raw)  # later copies into it are ordered after this one on the streams
            else:
                hidden = ctx.saved
            hidden = hidden.detach().requires_grad_(True)
            cuda = ctx.device.type == "cuda"
            rng = torch.cuda.get_rng_state(ctx.device) if cuda else torch.get_rng_state()
            # the same dropout masks as the forward
            torch.cuda.set_rng_state(ctx.rng, ctx.device) if cuda else torch.set_rng_state(ctx.rng)
            with torch.enable_grad():
                out = ctx.run(hidden)
            torch.cuda.set_rng_state(rng, ctx.device) if cuda else torch.set_rng_state(rng)
            torch.autograd.backward(out, grad_out)
            return None, hidden.grad, None

    return OffloadedCheckpoint


def _checkpointed_layers(model) -> list:
    """The decoder layers that checkpoint themselves (transformers' GradientCheckpointingLayer with it turned on)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return []
    return [m for m in inner_model(model).modules() if isinstance(m, GradientCheckpointingLayer)
            and m.gradient_checkpointing and hasattr(m, "_gradient_checkpointing_func")]


def offload_checkpoints(model, offload: bool = True) -> int:
    """Swap each decoder layer's checkpoint function for OffloadedCheckpoint (inputs >= OFFLOAD_MIN_BYTES on CUDA
    go to pinned CPU memory when `offload`). Needs checkpointing already on, and one process: a recompute inside
    backward is reentrant, which DistributedDataParallel does not allow. Returns the layer count."""
    import functools

    import torch
    from torch.utils.checkpoint import checkpoint

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return 0
    layers = _checkpointed_layers(model)
    if not layers:
        return 0
    inner = inner_model(model)
    fn_cls = _offloaded_function()
    plain = functools.partial(checkpoint, use_reentrant=False)

    def ckpt(run, *args, **kwargs):
        hidden = args[0] if args else None
        if len(args) == 1 and not kwargs and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            big = hidden.is_cuda and hidden.numel() * hidden.element_size() >= OFFLOAD_MIN_BYTES
            return fn_cls.apply(run, hidden, offload and big)
        return plain(run, *args, **kwargs)

    for layer in layers:
        layer._gradient_checkpointing_func = ckpt
    # The first layer's input must require grad for the custom function to be part of the graph.
    inner.enable_input_require_grads()
    return len(layers)


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
    if _wanted("fused_lora") and fuse_lora(model):
        applied.append("fused_lora")
    if getattr(training_cfg, "padding_free", True) and _wanted("varlen") and use_varlen_attention(model):
        applied.append("varlen_attention" if varlen_usable("cuda") else "packed_sdpa_attention")
    if getattr(training_cfg, "gradient_checkpointing", False):
        if ensure_non_reentrant(model):
            applied.append("non_reentrant_checkpointing")
        if _wanted("fast_checkpoint"):
            offload = _wanted("offload")
            if offload_checkpoints(model, offload=offload):
                applied += ["fast_checkpoint"] + (["offload_long_checkpoints"] if offload else [])
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
