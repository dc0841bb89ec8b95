"""The NF4 dequantization of a bitsandbytes 4-bit weight as ONE Triton kernel (the "nf4_kernel" piece of
finetune/recipe/speed.py).

bitsandbytes needs three kernels for a weight whose absmax is itself quantized ("double quantization", the QLoRA
default): the absmax to fp32, the offset added, then the 4-bit weight. On Llama-3-8B QLoRA at 2 x 2048 tokens that is
672 weights per step, each dequantized in the forward, the recompute and the backward, and the two small kernels cost
about as much GPU time as the large one. Here one program takes a tile of whole absmax blocks: it decodes each block's
scale once (code2[absmax byte] * absmax2[block // blocksize2] + offset) and then the block's packed bytes, both
nibbles of each, high nibble first.

The arithmetic is bitsandbytes' own, rounding for rounding: the scale is an fp32 product, then an fp32 sum (the
kernel is built without multiply-add contraction), and each weight is the fp32 code value times that scale, rounded
once to the output dtype. So the weights are equal bit for bit (a GPU test checks).

Triton compiles a kernel per "specialization" of its arguments (integers and addresses divisible by 16 or not); a
compile cannot happen while a CUDA graph is recorded. A call under capture therefore uses the kernel only for a
specialization an eager call has compiled before (a layer's first call runs eagerly), else the caller takes
bitsandbytes' kernels.
"""
from __future__ import annotations

import functools

TILE_BYTES = 2048  # packed bytes per program: whole absmax blocks (32 bytes each at blocksize 64)
NUM_WARPS = 4


@functools.lru_cache(maxsize=1)
def _kernel():
    """The jitted kernel, or None without Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def nf4_rows(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr, out_ptr, n_blocks,
                 HALF: tl.constexpr, ROWS: tl.constexpr, SHIFT2: tl.constexpr, NESTED: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # absmax blocks of this program
        live = rows < n_blocks
        if NESTED:
            q = tl.load(absmax_ptr + rows, mask=live, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q, mask=live, other=0.0) * \
                tl.load(absmax2_ptr + (rows >> SHIFT2), mask=live, other=0.0)
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + rows, mask=live, other=0.0)
        scale = scale[:, None]
        offs = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
        byte = tl.load(packed_ptr + offs, mask=live[:, None], other=0).to(tl.int32)
        high = tl.load(code_ptr + (byte >> 4)) * scale  # the element first in order sits in the high nibble
        low = tl.load(code_ptr + (byte & 15)) * scale
        pair = tl.interleave(high, low).to(out_ptr.dtype.element_ty)
        out = rows[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
        tl.store(out_ptr + out, pair, mask=live[:, None])

    return nf4_rows


def _usable(packed, qs) -> bool:
    """Whether this weight's layout is one the kernel reads: NF4, contiguous on CUDA, whole power-of-two blocks."""
    import math

    def pow2(n: int) -> bool:
        return n >= 2 and n & (n - 1) == 0

    bs = qs.blocksize
    plain = (_kernel() is not None and packed.is_cuda and packed.is_contiguous() and qs.quant_type == "nf4"
             and pow2(bs) and bs // 2 <= TILE_BYTES and math.prod(qs.shape) % bs == 0
             and qs.absmax.is_contiguous() and qs.code.numel() == 16)
    if not plain or not qs.nested:
        return plain
    return qs.state2.absmax.is_contiguous() and pow2(qs.state2.blocksize) and qs.absmax.dtype.itemsize == 1


_compiled: set = set()  # specializations called eagerly, so compiled and loaded


def _aligned(t) -> bool:
    return t.data_ptr() % 16 == 0


def bind(packed, qs):
    """For one 4-bit weight, a function dequantize(out, capturing) -> bool with the weight's arguments bound once
    (it runs per projection per pass); None where the kernel does not read this weight's layout.

    dequantize writes the weight's dense values into `out` (contiguous, numel = the weight's) and returns True, or
    returns False (nothing written) and leaves it to bitsandbytes' kernels. It is used where it pays and is safe:
    under a graph capture (one launch replayed, instead of three) for a specialization compiled before, and eagerly
    only the first time a specialization is seen, to compile it. Other eager calls return False: there a Triton
    launch costs more host time than bitsandbytes' bare C calls."""
    import math

    if not _usable(packed, qs):
        return None
    nested, bs = bool(qs.nested), qs.blocksize
    absmax = qs.absmax
    # the nested-only slots are never read for a plain absmax: it fills them
    weight = (packed, absmax, qs.state2.code if nested else absmax, qs.state2.absmax if nested else absmax,
              qs.offset if nested else absmax, qs.code)
    n_blocks = math.prod(qs.shape) // bs
    rows = max(1, TILE_BYTES // (bs // 2))
    grid = ((n_blocks + rows - 1) // rows,)
    consts = dict(HALF=bs // 2, ROWS=rows, SHIFT2=qs.state2.blocksize.bit_length() - 1 if nested else 0,
                  NESTED=nested)
    # what Triton specializes on besides the output: addresses and integers divisible by 16 (or equal to 1)
    fixed = (bs, nested, tuple(_aligned(t) for t in weight), n_blocks % 16 == 0, n_blocks == 1)

    def dequantize(out, capturing: bool) -> bool:
        if not out.is_contiguous() or out.numel() != n_blocks * bs:
            return False
        key = (*fixed, out.device, out.dtype, _aligned(out))
        if capturing != (key in _compiled):
            return False
        # no multiply-add contraction: the scale must round after the product, as bitsandbytes' does
        _kernel()[grid](*weight, out, n_blocks, **consts, num_warps=NUM_WARPS, enable_fp_fusion=False)
        _compiled.add(key)
        return True

    return dequantize
