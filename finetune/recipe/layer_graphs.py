"""CUDA graphs of the checkpointed decoder layers (the "graphs" piece of finetune/recipe/speed.py).

Under the fast checkpoint a layer runs twice per step: without grad in the forward (its input kept), then again inside
the backward (recompute, then its backward). Each run is hundreds of kernels, many of them short (norms, RoPE, the
rank-16 LoRA products), and the host work to queue them (Python, peft, autograd, the dispatcher) is what the GPU waits
for between them. A CUDA graph replays the recorded kernels with one launch.

One layer and one input signature (token count, dtype, the shapes of its keyword tensors, a packed row's example
boundaries) give two graphs: the forward, and the recompute with its backward. Graphs read and write fixed addresses,
so a call copies its inputs into buffers shared by every layer of the signature and copies its outputs out; whatever a
graph allocates inside comes from one private pool per device and is free again by the end of each replay, so the
pool holds one layer's working set, not one per layer.

Used only where a replay is exact and pays: one process, a layer that draws no random numbers, a signature seen
before (its first call runs eagerly: lazy initialisation, Triton compiles, cuBLAS workspaces). A layer that has seen
MAX_SIGNATURES different signatures (variable-length data, where shapes seldom repeat) stops trying and stays eager.
"""
from __future__ import annotations

import logging
import math
import weakref

from finetune.recipe.offload import keep_input, kept_input

log = logging.getLogger(__name__)

MAX_SIGNATURES = 8
DEVICE_TYPES = ("cuda",)
# Read by the LoRA weight caches (finetune/recipe/lora_weights.py): inside a capture they compute afresh and keep
# nothing, since an address baked into a graph must stay the one it reads at every replay.
capturing = [False]
_captured = [0]  # graphs recorded in this process
_failed: list[str] = []  # the first capture error of this process; graphs are off from then on
_pools: dict = {}


def _pool(device):
    import torch

    if device not in _pools:
        _pools[device] = torch.cuda.graph_pool_handle()
    return _pools[device]


def _record(body, device):
    """A CUDA graph of what `body` queues (nothing runs now: replay() runs it). Every graph of a device draws on one
    memory pool; each body frees what it allocated, so they can share it in any order."""
    import torch

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=_pool(device), capture_error_mode="thread_local"):
        body()
    return graph


def status() -> dict:
    """For a benchmark's result: how many graphs were recorded, and the capture error if one failed."""
    return {"captured": _captured[0], "capture_error": _failed[0] if _failed else None}


def _describe(value):
    """The part of a keyword argument a graph depends on: its shape for a tensor, the value itself for a plain
    constant; None for anything else (a cache object, say), which keeps the layer eager."""
    import torch

    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, (tuple, list)):
        parts = tuple(_describe(v) for v in value)
        return None if None in parts else ("seq", parts)
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("value", value)
    return None


def _tensors(value) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _rebuild(value, it):
    """`value` with each tensor replaced by the next of `it` (the static copies, in _tensors' order)."""
    import torch

    if isinstance(value, torch.Tensor):
        return next(it)
    if isinstance(value, (tuple, list)):
        return type(value)(_rebuild(v, it) for v in value)
    return value


def signature(run, hidden):
    """The graph key of a checkpointed call, or None where graphs do not apply. `run` is transformers'
    partial(forward, layer, **kwargs) (older transformers: partial(layer.__call__, **kwargs)); a packed row's
    example boundaries (and whether it is attended as a dense batch) are part of the key, since the attention reads
    them as constants."""
    import functools

    if not isinstance(run, functools.partial) or len(run.args) > 1:
        return None
    kw = tuple((k, _describe(v)) for k, v in sorted(run.keywords.items()))
    if any(d is None for _, d in kw):
        return None
    bounds = None
    pos = run.keywords.get("position_ids")
    if pos is not None and pos.shape[0] == 1 and run.keywords.get("attention_mask") is None:
        from finetune.recipe.speed import segment_bounds

        bounds = segment_bounds(pos)
    return (tuple(hidden.shape), hidden.dtype, hidden.device, kw, bounds)


class _Statics:
    """The fixed-address buffers of one signature, shared by every layer: the layer input, the gradient that arrives
    from above, the keyword tensors, and one flat buffer for the LoRA gradients of a layer.

    Two activation-sized buffers, not four: a graph writes its result last, once nothing reads the buffer it
    overwrites, so the forward's output goes where its input was (`hidden`) and the input gradient where the output
    gradient was (`grad`). That gradient is handed on as it is, without a copy: the layer below receives it as its
    own output gradient, already in place."""

    def __init__(self, hidden, kw_tensors, params):
        import torch

        self.hidden = torch.empty_like(hidden)
        self.grad = torch.empty_like(hidden)
        self.kw = [torch.empty_like(t) for t in kw_tensors]
        self._src = [None] * len(kw_tensors)
        self.flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=hidden.device)
        self.layout = [(p.shape, p.dtype) for p in params]

    def fits(self, params) -> bool:
        return [(p.shape, p.dtype) for p in params] == self.layout

    def load_kwargs(self, tensors) -> None:
        """Copy the keyword tensors in, skipping one still the very tensor copied last (every layer of a forward
        gets the same rotary tables and positions). Identity, not address: a new step's tensors often reuse the
        last step's memory."""
        for i, t in enumerate(tensors):
            ref = self._src[i]
            if ref is not None and ref[0]() is t and ref[1] == t._version:
                continue
            self.kw[i].copy_(t)
            self._src[i] = (weakref.ref(t), t._version)

    def grad_views(self, flat=None):
        """The LoRA gradients' places in `flat` (the shared flat buffer, or a copy of it), one view per parameter."""
        flat = self.flat if flat is None else flat
        out, off = [], 0
        for shape, _ in self.layout:
            out.append(flat[off:off + math.prod(shape)].view(shape))
            off += math.prod(shape)
        return out


def _layer_grads(forward, hidden, keywords, slots, grad_out):
    """Recompute the layer from `hidden` with grad and backpropagate `grad_out`: (input gradient, LoRA gradients).

    The LoRA weights are differentiated through stand-ins (detached aliases put in the modules' places for the
    recompute): the real parameters' gradient accumulators belong to the step's graph and were made on the
    default stream, and the engine would make a capturing stream wait for that stream, which breaks the capture."""
    import torch

    h = hidden.detach().requires_grad_(True)
    params = [mod._parameters[name] for mod, name in slots]
    aliases = [p.detach().requires_grad_(True) for p in params]
    for (mod, name), alias in zip(slots, aliases):
        mod._parameters[name] = alias
    try:
        with torch.enable_grad():
            out = forward(h, **keywords)
        grads = torch.autograd.grad(out, [h, *aliases], grad_out, allow_unused=True)
    finally:
        for (mod, name), p in zip(slots, params):
            mod._parameters[name] = p
    return grads[0], grads[1:]


class _Entry:
    """The two graphs of one layer for one signature."""

    def __init__(self, statics, forward, keywords, slots):
        self.statics, self.forward, self.slots = statics, forward, slots
        it = iter(statics.kw)
        self.keywords = {k: _rebuild(keywords[k], it) for k in sorted(keywords)}
        self.fwd = self.bwd = None
        self.used = [True] * len(slots)
        self.keep: list = []  # buffers the graphs read that module caches may drop later

    def _capture(self, body):
        from finetune.recipe import lora_weights, speed

        pos = self.keywords.get("position_ids")
        if pos is not None:  # fill the boundaries cache outside the capture (it reads back to the host)
            speed.segment_bounds(pos, count=False)  # the static copy of a batch already counted
        capturing[0] = True
        try:
            graph = _record(body, self.statics.hidden.device)
        finally:
            capturing[0] = False
        self.keep += (speed.cached_segments(pos) if pos is not None else []) + lora_weights.shared_buffers()
        _captured[0] += 1
        return graph

    def run_forward(self, hidden, kw_tensors):
        import torch

        s = self.statics
        s.hidden.copy_(hidden)
        s.load_kwargs(kw_tensors)
        if self.fwd is None:
            def body():
                with torch.no_grad():
                    s.hidden.copy_(self.forward(s.hidden, **self.keywords))
            self.fwd = self._capture(body)
        self.fwd.replay()
        # a copy: the caller keeps it (as the next layer's saved input) past the next replay
        return s.hidden.clone()

    def run_backward(self, hidden, kw_tensors, grad_out):
        """(input gradient, LoRA gradients). The input gradient is the shared buffer itself, valid until the next
        replay of this signature: the engine hands it straight to the layer below (see _Statics)."""
        s = self.statics
        s.hidden.copy_(hidden)
        s.load_kwargs(kw_tensors)
        if grad_out.data_ptr() != s.grad.data_ptr():
            s.grad.copy_(grad_out)
        if self.bwd is None and not _failed:
            views = s.grad_views()

            def body():
                dx, grads = _layer_grads(self.forward, s.hidden, self.keywords, self.slots, s.grad)
                s.grad.copy_(dx)
                self.used = [g is not None for g in grads]
                for view, g in zip(views, grads):
                    if g is not None:
                        view.copy_(g)
            try:
                self.bwd = self._capture(body)
            except Exception as e:
                _fail(e)
        if self.bwd is None:  # the capture failed: the same computation, eagerly
            dx, grads = _layer_grads(self.forward, s.hidden, self.keywords, self.slots, s.grad)
            return dx, list(grads)
        self.bwd.replay()
        # the LoRA gradients are copied: autograd may keep one as a parameter's .grad
        grads = s.grad_views(s.flat.clone())
        return s.grad, [g if used else None for g, used in zip(grads, self.used)]


def _fail(e: Exception) -> None:
    if not _failed:
        _failed.append(f"{type(e).__name__}: {e}")
        log.warning("CUDA graphs of the decoder layers are off: a capture failed (%s)", _failed[0], exc_info=e)


_function_cls = None


def _graphed_function():
    global _function_cls
    if _function_cls is not None:
        return _function_cls
    import torch

    class GraphedCheckpoint(torch.autograd.Function):
        """The fast checkpoint through an _Entry's graphs: forward replays the forward graph and keeps the input
        (or has `offloader` park it in host memory); backward replays the recompute-and-backward graph and hands the
        LoRA gradients to autograd as this node's input gradients (the graph cannot accumulate into .grad, which
        optimizers reset)."""

        @staticmethod
        def forward(ctx, entry, kw_tensors, offloader, hidden, *params):
            ctx.entry, ctx.kw_tensors = entry, kw_tensors
            keep_input(ctx, hidden, offloader)
            return entry.run_forward(hidden, kw_tensors)

        @staticmethod
        def backward(ctx, grad_out):
            dx, grads = ctx.entry.run_backward(kept_input(ctx), ctx.kw_tensors, grad_out.contiguous())
            return (None, None, None, dx if ctx.needs_input_grad[3] else None, *grads)

    _function_cls = GraphedCheckpoint
    return GraphedCheckpoint


class LayerGraphs:
    """The graphs of one checkpointed decoder layer, by signature."""

    def __init__(self, layer, shared: dict):
        """`shared`: the signature -> _Statics map of the model's layers (one dict per model, so it goes with it)."""
        self.shared = shared
        # (module, name) of each trainable parameter, in layer.parameters() order
        self.slots, ids = [], set()
        for mod in layer.modules():
            for name, p in mod._parameters.items():
                if p is not None and p.requires_grad and id(p) not in ids:
                    ids.add(id(p))
                    self.slots.append((mod, name))
        self.params = [mod._parameters[name] for mod, name in self.slots]
        self.lora = [m for m in layer.modules() if hasattr(m, "active_adapters") and hasattr(m, "merged")]
        self.seen: set = set()
        self.entries: dict = {}
        self.off = not self.params or len({p.dtype for p in self.params}) != 1  # one flat gradient buffer

    def __call__(self, run, hidden, offloader=None):
        """The layer's output through its graphs, or None: the caller then runs the eager checkpoint. `offloader`
        (finetune/recipe/offload.py), if given, parks the layer's input until the backward."""
        if self.off or _failed or hidden.device.type not in DEVICE_TYPES or not hidden.is_contiguous():
            return None
        key = signature(run, hidden)
        if key is None:
            return None
        # A graph bakes in which adapter runs: switching it off (a reference pass) or merging must not replay it.
        key += tuple((m.disable_adapters, m.merged, tuple(m.active_adapters)) for m in self.lora)
        entry = self.entries.get(key)
        if entry is None:
            if key not in self.seen:
                self.seen.add(key)
                self.off = len(self.seen) > MAX_SIGNATURES
                return None  # the eager first call warms everything the capture needs ready
            entry = self.entries[key] = _Entry(self._statics(key, hidden, run), _bound(run), run.keywords,
                                               self.slots)
        kw_tensors = _kw_tensors(run)
        try:
            return _graphed_function().apply(entry, kw_tensors, offloader, hidden, *self.params)
        except Exception as e:  # a layer doing something a graph cannot hold (a host read, say)
            _fail(e)
            return None

    def _statics(self, key, hidden, run):
        s = self.shared.get(key)
        if s is None or not s.fits(self.params):
            s = self.shared[key] = _Statics(hidden, _kw_tensors(run), self.params)
        return s


def _bound(run):
    """forward(hidden, **keywords) of the layer a checkpoint `run` partial wraps."""
    func, args = run.func, run.args
    return lambda hidden, **kw: func(*args, hidden, **kw)


def _kw_tensors(run) -> list:
    """The tensors among a checkpoint call's keyword arguments, in the order the static copies follow."""
    return [t for k in sorted(run.keywords) for t in _tensors(run.keywords[k])]
