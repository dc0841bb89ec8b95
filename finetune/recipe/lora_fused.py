"""LoRA projections with less host work per pass than peft + bitsandbytes: LoRA as one addmm on the base output
(fused_lora), each projection as one autograd node with a hand-written backward (fused_proj), and the projections
that read one input (q/k/v, gate/up) as one node (group). See finetune/recipe/speed.py for the switches."""
from __future__ import annotations

import types

from finetune.recipe.lora_weights import (_cast, _cast_cat, _count_optimizer_steps, _dense_weight, block_diagonal,
                                          stacked_weight)
from finetune.recipe.speed_switches import switches, wanted


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
STACK_MODEL_TYPES = ("llama", "qwen2", "mistral")


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


_stacked_cls = None


def _stacked_function():
    """LoraStackedProjection.apply(x, weight_fns, sizes, bias, scales, A1, B1, A2, B2, ...) -> the outputs of the
    projections of one input side by side ([..., sum(sizes)]): their dense weights stacked into one matrix, so the
    base is ONE matrix product, the LoRA one A product and one product with the block-diagonal [scale_i * B_i].
    Backward: one product each for the input gradient, dB (the diagonal blocks of one [sum out, sum r] product),
    dh and dA. No dropout."""
    global _stacked_cls
    if _stacked_cls is not None:
        return _stacked_cls
    import torch
    import torch.nn.functional as F

    class LoraStackedProjection(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight_fns, sizes, bias, scales, *ab):
            dt = x.dtype
            x2 = x.reshape(-1, x.shape[-1])
            a = _cast_cat(ab[0::2], dt)
            bd = block_diagonal(ab[1::2], scales, dt)
            h = torch.mm(x2, a.t())
            y = F.linear(x2, stacked_weight(weight_fns, sizes, x2.shape[-1], dt, x.device), bias)
            y.addmm_(h, bd.t())
            ctx.save_for_backward(x, a, h, bd)
            ctx.weight_fns, ctx.sizes, ctx.scales = weight_fns, sizes, scales
            ctx.ranks, ctx.dtypes = [p.shape[0] for p in ab[0::2]], [p.dtype for p in ab]
            return y.view(*x.shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            x, a, h, bd = ctx.saved_tensors
            x2 = x.reshape(-1, x.shape[-1])
            g = grad.reshape(-1, grad.shape[-1]).to(a.dtype)
            dbd = torch.mm(g.t(), h)
            dh = torch.mm(g, bd)
            dA = torch.mm(dh.t(), x2)
            dx = None
            if ctx.needs_input_grad[0]:
                dx = torch.mm(g, stacked_weight(ctx.weight_fns, ctx.sizes, x2.shape[-1], a.dtype, x.device))
                dx = dx.addmm_(dh, a).view(x.shape)
            out, r, c = [dx, None, None, None, None], 0, 0
            for i, (n, k, s) in enumerate(zip(ctx.sizes, ctx.ranks, ctx.scales)):
                out += [dA[c:c + k].to(ctx.dtypes[2 * i]), dbd[r:r + n, c:c + k].mul(s).to(ctx.dtypes[2 * i + 1])]
                r, c = r + n, c + k
            return tuple(out)

    _stacked_cls = LoraStackedProjection
    return LoraStackedProjection


class _ProjectionGroup:
    """Sibling LoRA projections fed the same tensor (q/k/v of an attention, gate/up of an MLP). The first one
    called computes all of them as one node and keeps the others' outputs until they are called with that same
    tensor; any other call order or input falls back to one node per projection."""

    def __init__(self, members, stacked: bool = False):
        self.members = members
        self.pending: dict = {}
        self.stacked = stacked  # one matrix product for all (outputs are column slices of one result)
        self.sizes = tuple(m.out_features for m in members)

    def output(self, member, x, name):
        import torch

        hit = self.pending.pop(id(member), None)
        if hit is not None and hit[0] is x:
            return hit[1]
        for m in self.members:
            if _plain_adapter(m) != name or m._studio_weight is None or _dropout_p(m.lora_dropout[name]) != 0.0:
                return None
        ab = []
        for m in self.members:
            ab += [m.lora_A[name].weight, m.lora_B[name].weight]
        fns = tuple(m._studio_weight for m in self.members)
        biases = tuple(getattr(m.base_layer, "bias", None) for m in self.members)
        scales = tuple(m.scaling[name] for m in self.members)
        if self.stacked:
            bias = None if biases[0] is None else torch.cat(biases)
            ys = _stacked_function().apply(x, fns, self.sizes, bias, scales, *ab).split(self.sizes, dim=-1)
        else:
            ys = _group_function().apply(x, fns, biases, scales, *ab)
        self.pending = {id(m): (x, y) for m, y in zip(self.members, ys) if m is not member}
        return ys[self.members.index(member)]


def group_projections(model) -> int:
    """Give each set of sibling projections in GROUPS (all fused, all with a dense-weight path) a shared group."""
    n = 0
    for parent in model.modules():
        for names in GROUPS:
            members = [getattr(parent, nm, None) for nm in names]
            if all(getattr(m, "_studio_weight", None) is not None for m in members):
                group = _ProjectionGroup(members, stacked=_stackable(model, names, members))
                for m in members:
                    m._studio_group = group
                n += 1
    return n


def _stackable(model, names, members) -> bool:
    """Whether the group may run as one stacked product (its outputs then are column slices of one tensor, not
    contiguous): q/k/v of the model types whose attention reads them through ordinary torch ops and liger's RoPE
    (which makes its inputs contiguous), not gate/up (liger's SwiGLU kernel assumes contiguous rows); all biases
    or none; on by default only where the weights fill a stacked matrix at no extra cost (4-bit), "+stack" forces
    it (tests)."""
    get = getattr(model, "get_base_model", None)
    config = getattr(get() if callable(get) else model, "config", None)
    no_bias = [getattr(m.base_layer, "bias", None) is None for m in members]
    if names != GROUPS[0] or not wanted("stack") or len({m.in_features for m in members}) != 1 \
            or (any(no_bias) and not all(no_bias)):
        return False
    if "+stack" in switches():
        return True
    return getattr(config, "model_type", None) in STACK_MODEL_TYPES and \
        all(getattr(m._studio_weight, "stacks", False) for m in members)


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
            module._studio_weight = _dense_weight(module.base_layer) if wanted("fused_proj") else None
            module._studio_group = None
            module.forward = types.MethodType(_fused_lora_forward, module)
            n += 1
    if n and wanted("fused_proj") and wanted("group"):
        group_projections(model)
    return n


def fused_pieces(model) -> list[str]:
    """The names of the projection paths fuse_lora set up on `model` (for the log and studio.json)."""
    mods = [m for m in model.modules() if hasattr(m, "_studio_peft_forward")]
    found = {"fused_proj": any(m._studio_weight is not None for m in mods),
             "grouped_proj": any(m._studio_group is not None for m in mods),
             "stacked_qkv": any(m._studio_group is not None and m._studio_group.stacked for m in mods),
             "lean_dequant": any(getattr(m._studio_weight, "stacks", False) for m in mods),
             "nf4_kernel": any(getattr(m._studio_weight, "one_kernel", False) for m in mods)}
    return [name for name, on in found.items() if on]
