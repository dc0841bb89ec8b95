"""Checkpointed layer inputs parked in pinned CPU memory between a layer's forward and its recompute (the "offload"
piece of finetune/recipe/speed.py).

Under the fast checkpoint each decoder layer keeps only its input until the backward reaches it: at Llama-3-8B and
2 x 2048 tokens that is 32 MiB per layer, 1 GiB for the model, the largest thing left on the GPU besides the weights.
Parking it costs two copies over PCIe per layer and step. They stay off the critical path when
  * the copy out runs on a side stream, ordered after the layer's input was written, while the next layers compute;
  * the copy back of layer i-1's input starts on that side stream as the backward of layer i begins, so it is on the
    GPU by the time layer i-1 needs it (the compute stream waits on an event, not on the copy engine's queue).
One InputOffloader serves a model's layers: it links each parked input to the one parked before it, which is the one
the backward needs next.
"""
from __future__ import annotations

import math
import weakref


def keep_input(ctx, hidden, offloader) -> None:
    """Keep a checkpointed layer's input on an autograd ctx for its backward: parked in host memory by
    `offloader`, or (None) on the GPU."""
    ctx.offloader = offloader
    if offloader is not None:
        ctx.parked = offloader.park(hidden)
    else:
        ctx.saved = hidden.detach()


def kept_input(ctx):
    """The input keep_input kept, on the GPU."""
    return ctx.saved if ctx.offloader is None else ctx.offloader.fetch(ctx.parked)


class PinnedPool:
    """Reusable pinned host buffers (a cudaHostAlloc per layer per step costs more than the copy itself). Buffers
    are flat bytes in power-of-two sizes; a request takes the smallest free buffer that holds it, so batches of
    varying length reuse them, and a pool reserved for the run's largest layer input serves every smaller one.
    `pin=False` gives ordinary host memory (what a CPU-only torch can allocate)."""

    def __init__(self, pin: bool = True):
        self.free: dict[int, list] = {}
        self.pin = pin
        self.allocated = 0  # bytes this pool has allocated, in use or free

    @staticmethod
    def capacity(nbytes: int) -> int:
        return 1 << max(20, (nbytes - 1).bit_length())

    def _allocate(self, cap: int):
        import torch

        raw = torch.empty(cap, dtype=torch.uint8, device="cpu", pin_memory=self.pin)
        self.allocated += cap
        return raw

    def take(self, shape, dtype):
        import torch

        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        cap = self.capacity(nbytes)
        fitting = [c for c, bucket in self.free.items() if c >= cap and bucket]
        raw = self.free[min(fitting)].pop() if fitting else self._allocate(cap)
        return raw, raw[:nbytes].view(dtype).view(shape)

    def give(self, raw):
        self.free.setdefault(raw.numel(), []).append(raw)

    def reserve(self, nbytes: int, count: int) -> int:
        """At least `count` free buffers that each hold `nbytes`, allocated now: pinning them at the step that
        first needs them stalls that step (about 1.3 s for 2 GiB on an H200 host). Returns the bytes allocated."""
        cap = self.capacity(nbytes)
        have = sum(len(bucket) for c, bucket in self.free.items() if c >= cap)
        for _ in range(count - have):
            self.give(self._allocate(cap))
        return max(0, count - have) * cap


class Parked:
    """One parked layer input: its pinned host copy until the copy back starts, then its GPU copy until fetched."""

    __slots__ = ("raw", "host", "device", "before", "gpu", "ready", "__weakref__")

    def __init__(self, raw, host, device, before):
        self.raw, self.host, self.device, self.before = raw, host, device, before
        self.gpu = self.ready = None


class InputOffloader:
    def __init__(self, layers: int = 0):
        self.pool = PinnedPool()
        self.layers = layers  # how many inputs one forward parks at most (one per checkpointed layer)
        self.streams: dict = {}
        self.last = None  # weak reference to the input parked last

    def _stream(self, device):
        import torch

        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device=device)
        return self.streams[device]

    def reserve(self, nbytes: int) -> int:
        """Pin now what parking every layer's input of `nbytes` needs (the run's largest batch); returns the bytes
        pinned."""
        return self.pool.reserve(nbytes, self.layers)

    def park(self, hidden) -> Parked:
        """Start copying `hidden` (on a CUDA device) to pinned memory; the caller then drops its own reference."""
        import torch

        side = self._stream(hidden.device)
        raw, host = self.pool.take(hidden.shape, hidden.dtype)
        side.wait_stream(torch.cuda.current_stream(hidden.device))
        with torch.cuda.stream(side):
            host.copy_(hidden, non_blocking=True)
        hidden.record_stream(side)  # the allocator must not hand hidden's memory out before the copy has read it
        parked = Parked(raw, host, hidden.device, self.last)
        self.last = weakref.ref(parked)
        return parked

    def fetch(self, parked: Parked):
        """`parked` back on the GPU, ready for the current stream; the input parked before it starts coming back."""
        import torch

        if parked.gpu is None:
            if parked.raw is None:
                raise RuntimeError("this layer input was fetched already (a second backward through one graph)")
            self._start_copy_back(parked)
        torch.cuda.current_stream(parked.device).wait_event(parked.ready)
        gpu, parked.gpu, parked.ready = parked.gpu, None, None
        before = parked.before() if parked.before is not None else None
        if before is not None and before.raw is not None:
            self._start_copy_back(before)
        return gpu

    def _start_copy_back(self, parked: Parked) -> None:
        import torch

        side = self._stream(parked.device)
        gpu = torch.empty(parked.host.shape, dtype=parked.host.dtype, device=parked.device)
        # gpu's memory was handed out for the current stream: work queued there may still be using it.
        side.wait_stream(torch.cuda.current_stream(parked.device))
        with torch.cuda.stream(side):
            gpu.copy_(parked.host, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(side)
        gpu.record_stream(side)  # dropped unfetched (a failed step), its memory still waits for the copy
        parked.gpu, parked.ready = gpu, ready
        self.pool.give(parked.raw)  # the next copy into it is queued on the same stream, after this one
        parked.raw = parked.host = None
