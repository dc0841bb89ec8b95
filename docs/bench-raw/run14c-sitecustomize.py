"""Device diagnostic: log what liger's RoPE gets inside the real model (layouts, dtypes) and how far its output
lies from an fp32 computation with the same cos/sin, beside HF's bf16 formula. Only where ROPE_DIAG is set."""
import os

if os.environ.get("ROPE_DIAG"):
    import torch
    import liger_kernel.ops.rope as lr

    _orig = lr.rope_forward
    _n = [0]

    def _desc(t):
        return f"{tuple(t.shape)} {tuple(t.stride())} {str(t.dtype)[6:]} c={int(t.is_contiguous())}"

    def _rot(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    def rope_forward(q, k, cos, sin, *a, **kw):
        _n[0] += 1
        capturing = torch.cuda.is_current_stream_capturing()
        if capturing or _n[0] > 40:
            return _orig(q, k, cos, sin, *a, **kw)
        c4, s4 = (cos.unsqueeze(1), sin.unsqueeze(1)) if cos.ndim == 3 else (cos, sin)
        ref_q = q.float() * c4.float() + _rot(q.float()) * s4.float()
        hf_q = q * c4 + _rot(q) * s4
        q_before = q.detach().clone()
        oq, ok, oc, os_ = _orig(q, k, cos, sin, *a, **kw)
        rel = lambda t: ((t.float() - ref_q).norm() / ref_q.norm()).item()
        line = (f"call {_n[0]} grad={int(torch.is_grad_enabled())} q {_desc(q)} k {_desc(k)} cos {_desc(cos)} "
                f"out {_desc(oq)} liger_rel {rel(oq):.3e} hf_rel {rel(hf_q):.3e} "
                f"q_changed {int((q.detach() != q_before).any().item())} cos[0,5,1] {cos.flatten()[5 * cos.shape[-1] + 1].item():.6f}")
        with open(os.environ["ROPE_DIAG"], "a") as f:
            f.write(line + "\n")
        return oq, ok, oc, os_

    lr.rope_forward = rope_forward
