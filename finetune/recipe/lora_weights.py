"""The weights a fused LoRA projection (finetune/recipe/lora_fused.py) multiplies by, in the compute dtype: the
frozen base weight (dequantized from 4-bit by bitsandbytes' CUDA kernels called directly) and the LoRA weights (cast
from their fp32 masters once per optimizer step, not in every pass)."""
from __future__ import annotations

from finetune.recipe import layer_graphs, nf4_kernel
from finetune.recipe.speed_switches import wanted

def _nf4_dequantizer(weight):
    """A function dtype -> the dense [out, in] weight of a bitsandbytes 4-bit parameter, calling the library's
    CUDA kernels directly: bnb's own forward goes through Params4bit.__torch_function__, a Python-registered
    torch op and fresh allocations for the double-quantized absmax, all host time per projection per pass."""
    qs = weight.quant_state
    packed = weight.data
    lean = _lean_nf4(packed, qs) if wanted("lean_dequant") else None
    if lean is not None:
        return lean
    try:
        from bitsandbytes.backends.cuda.ops import _dequantize_4bit_impl, _dequantize_blockwise_impl
    except ImportError:
        _dequantize_4bit_impl = None
    if _dequantize_4bit_impl is None or not packed.is_cuda or (qs.nested and qs.state2.blocksize != 256):
        import bitsandbytes.functional as BF

        return lambda dt, out=None: _into(BF.dequantize_4bit(packed, qs).to(dt), out)

    def dense(dt, out=None):
        import torch

        absmax = qs.absmax
        if qs.nested:
            absmax = _scratch(qs.absmax.numel(), packed.device)
            _dequantize_blockwise_impl(qs.absmax, qs.state2.absmax, qs.state2.code, qs.state2.blocksize,
                                       torch.float32, out=absmax)
            absmax.add_(qs.offset)
        out = torch.empty(qs.shape, dtype=dt, device=packed.device) if out is None else out
        _dequantize_4bit_impl(packed, absmax, qs.blocksize, qs.quant_type, dt, out=out)
        return out

    return dense


def _lean_nf4(packed, qs):
    """The same two bitsandbytes kernels as _nf4_dequantizer's, called with the arguments bound once (pointers,
    sizes, the C functions) and into one reused output buffer per device and dtype: each dense weight is consumed
    by the next kernel on the same stream before another dequantization overwrites it, so one buffer (the largest
    weight's size) serves every projection and the allocator is not asked per pass. None where it does not apply
    (not CUDA, not contiguous, not NF4 / FP4 in 16-bit, no bitsandbytes CUDA library)."""
    import math

    import torch

    try:
        from bitsandbytes.backends.cuda import ops as bnb_cuda
    except ImportError:
        return None
    lib = bnb_cuda.lib
    if not packed.is_cuda or not packed.is_contiguous() or qs.quant_type not in ("nf4", "fp4"):
        return None
    fns = {dt: getattr(lib, f"cdequantize_blockwise_{name}_{qs.quant_type}", None)
           for dt, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"))}
    if None in fns.values() or not qs.absmax.is_contiguous() or (qs.nested and not qs.state2.absmax.is_contiguous()):
        return None
    device, n, shape, stream = packed.device, math.prod(qs.shape), tuple(qs.shape), torch._C._cuda_getCurrentRawStream
    double = lib.cdequantize_blockwise_fp32

    one_kernel = nf4_kernel.bind(packed, qs) if wanted("nf4_kernel") else None

    def dense(dt, out=None):  # pointers are read per call (cheap): the tensors stay referenced and valid
        out = _dense_buffer(n, dt, device).view(shape) if out is None else out
        if one_kernel is not None and one_kernel(out, capturing=layer_graphs.capturing[0]):
            return out
        s = stream(device.index)
        absmax = qs.absmax
        if qs.nested:
            absmax = _scratch(qs.absmax.numel(), device)
            double(qs.state2.code.data_ptr(), qs.absmax.data_ptr(), qs.state2.absmax.data_ptr(), absmax.data_ptr(),
                   qs.state2.blocksize, absmax.numel(), s)
            absmax.add_(qs.offset)
        fns[dt](None, packed.data_ptr(), absmax.data_ptr(), out.data_ptr(), qs.blocksize, n, s)
        return out

    dense.stacks = True  # writing into a slice of a stacked weight costs nothing extra
    dense.one_kernel = one_kernel is not None
    return dense


_scratch_buffers: dict = {}


def _scratch(n: int, device):
    """An fp32 buffer of n elements, reused by every dequantization on `device`: each one consumes it before the
    next is queued on the same stream, so one allocation serves them all (and the allocator call is saved)."""
    import torch

    buf = _scratch_buffers.get(device)
    if (buf is None or buf.numel() < n) and layer_graphs.capturing[0]:
        return torch.empty(n, dtype=torch.float32, device=device)  # graph-pool memory must not outlive the capture
    if buf is None or buf.numel() < n:
        buf = _scratch_buffers[device] = torch.empty(n, dtype=torch.float32, device=device)
    return buf[:n]


_dense_buffers: dict = {}


def _dense_buffer(n: int, dt, device):
    """A flat buffer of n elements of dt for dense weights, reused like _scratch's (grown to the largest asked)."""
    import torch

    buf = _dense_buffers.get((device, dt))
    if (buf is None or buf.numel() < n) and layer_graphs.capturing[0]:
        return torch.empty(n, dtype=dt, device=device)  # graph-pool memory must not outlive the capture
    if buf is None or buf.numel() < n:
        _dense_buffers[(device, dt)] = None  # free the smaller one before taking the larger
        buf = _dense_buffers[(device, dt)] = torch.empty(n, dtype=dt, device=device)
    return buf[:n]


def shared_buffers() -> list:
    """The reused dequantization buffers as they are now (a graph that writes into them keeps them alive)."""
    return [b for b in (*_scratch_buffers.values(), *_dense_buffers.values()) if b is not None]


_updates = [0]  # optimizer steps taken in this process (a global step hook counts them)
_holders: dict = {}  # id -> weak reference of each parameter holding a compute-dtype copy
_COPIES = ("_studio_cast", "_studio_cat", "_studio_block_diag")


def _keep(p, attr: str, value) -> None:
    import weakref

    setattr(p, attr, value)
    _holders[id(p)] = weakref.ref(p)


def _after_optimizer_step(*_) -> None:
    """Count the step and drop the copies it made stale: a layer replayed as a CUDA graph casts inside the graph
    and never reads them again, so kept they would be memory held for nothing (the LoRA weights once more in bf16)."""
    _updates[0] += 1
    for ref in _holders.values():
        p = ref()
        for attr in _COPIES if p is not None else ():
            p.__dict__.pop(attr, None)
    _holders.clear()


def _count_optimizer_steps() -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    if not getattr(_count_optimizer_steps, "done", False):
        register_optimizer_step_post_hook(_after_optimizer_step)
        _count_optimizer_steps.done = True


def _cast(p, dt):
    """p (a LoRA weight, fp32 master) in the compute dtype, cast once per optimizer update rather than in every
    forward, recompute and backward. The copy is kept with the parameter and redone after any optimizer step
    (fused and bitsandbytes optimizers update in place without bumping the tensor's version), any other in-place
    change (version) or a new storage."""
    if p.dtype == dt:
        return p.detach()
    if layer_graphs.capturing[0]:  # a graph casts at every replay: a cached copy's address would go stale
        return p.detach().to(dt)
    key = (_updates[0], p._version, p.data_ptr(), dt)
    hit = getattr(p, "_studio_cast", None)
    if hit is not None and hit[0] == key:
        return hit[1]
    c = p.detach().to(dt)
    _keep(p, "_studio_cast", (key, c))
    return c


def _into(w, out):
    return w if out is None else out.copy_(w)


def _dense_weight(base):
    """(dtype, out=None) -> the frozen base weight of a LoRA projection (written into `out`, a contiguous
    [out_features, in_features] tensor, when given), or None where this path does not apply (8-bit, a trainable
    base weight or bias, anything unknown). A function whose `stacks` attribute is true fills `out` at no extra
    cost; the others copy into it."""
    import torch

    bias = getattr(base, "bias", None)
    if (bias is not None and bias.requires_grad) or base.weight.requires_grad:
        return None
    if type(base) is torch.nn.Linear:
        w = base.weight
        return lambda dt, out=None: _into(w if w.dtype == dt else w.to(dt), out)
    if type(base).__name__ == "Linear4bit" and getattr(base.weight, "quant_state", None) is not None:
        return _nf4_dequantizer(base.weight)
    return None


def _cast_cat(params, dt):
    """torch.cat of the compute-dtype copies of `params` (the LoRA A's of a group), kept like _cast's copies."""
    import torch

    if layer_graphs.capturing[0]:
        return torch.cat([p.detach().to(dt) for p in params])
    key = tuple((_updates[0], p._version, p.data_ptr()) for p in params) + (dt,)
    hit = getattr(params[0], "_studio_cat", None)
    if hit is not None and hit[0] == key:
        return hit[1]
    c = torch.cat([p.detach().to(dt) for p in params])
    _keep(params[0], "_studio_cat", (key, c))
    return c


def stacked_weight(weight_fns, sizes, n_in: int, dt, device):
    """The dense weights of projections that read one input, stacked into one [sum(sizes), n_in] matrix in the
    shared dense-weight buffer (so one matrix product computes all of them)."""
    buf = _dense_buffer(sum(sizes) * n_in, dt, device).view(sum(sizes), n_in)
    off = 0
    for fn, n in zip(weight_fns, sizes):
        fn(dt, out=buf[off:off + n])
        off += n
    return buf


def block_diagonal(params, scales, dt):
    """The LoRA B's of stacked projections as one block-diagonal matrix of scale_i * B_i in the compute dtype
    ([sum out, sum r]): one product with it applies every projection's LoRA. Kept like _cast's copies."""
    import torch

    key = tuple((_updates[0], p._version, p.data_ptr()) for p in params) + (tuple(scales), dt)
    hit = getattr(params[0], "_studio_block_diag", None)
    if hit is not None and hit[0] == key and not layer_graphs.capturing[0]:
        return hit[1]
    bd = torch.zeros(sum(p.shape[0] for p in params), sum(p.shape[1] for p in params), dtype=dt,
                     device=params[0].device)
    r = c = 0
    for p, s in zip(params, scales):
        bd[r:r + p.shape[0], c:c + p.shape[1]] = (p.detach() * s).to(dt)
        r, c = r + p.shape[0], c + p.shape[1]
    if not layer_graphs.capturing[0]:
        _keep(params[0], "_studio_block_diag", (key, bd))
    return bd
