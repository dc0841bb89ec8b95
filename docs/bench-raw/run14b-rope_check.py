"""RoPE on the studio's layouts (q/k as column slices of one stacked q|k|v product, or contiguous), bf16 cos/sin
as the model makes them: HF's apply_rotary_pos_emb in bf16, liger's Triton function, and liger's dispatcher
(what liger_rotary_pos_emb runs), each against an fp32 reference; and whether one writes into its source."""
import torch
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama as ml
from liger_kernel.backends.dispatch import resolve_impl
from liger_kernel.ops.rope import LigerRopeFunction
from liger_kernel.transformers.rope import liger_rotary_pos_emb
from finetune.bench.models import SHAPES

dev = torch.device("cuda")
hf_rope = ml.apply_rotary_pos_emb
FNS = {"hf_bf16": hf_rope, "triton": LigerRopeFunction.apply, "dispatch": liger_rotary_pos_emb}


def qk(base, layout, grad, H, KV, D):
    y = base.clone()
    if layout == "stacked":
        y.requires_grad_(grad)
        qf, kf, _ = y.split([H * D, KV * D, KV * D], dim=-1)
        src = y
    else:
        qf = y[..., :H * D].clone().requires_grad_(grad)
        kf = y[..., H * D:(H + KV) * D].clone()
        src = qf
    n = base.shape[1]
    return src, qf.view(1, n, H, D).transpose(1, 2), kf.view(1, n, KV, D).transpose(1, 2)


for shape in ("llama-3-8b", "llama-3.2-1b"):
    cfg = LlamaConfig(**{k: v for k, v in SHAPES[shape].items() if k != "architectures"})
    H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rot = ml.LlamaRotaryEmbedding(cfg, device=dev)
    pos = torch.arange(2048, device=dev).repeat(2)[None]  # one packed row, positions restarting
    x16 = torch.zeros(1, 4096, 8, device=dev, dtype=torch.bfloat16)
    cos, sin = rot(x16, pos)
    cos32, sin32 = rot(x16.float(), pos)
    torch.manual_seed(0)
    base = torch.randn(1, 4096, (H + 2 * KV) * D, device=dev, dtype=torch.bfloat16)
    print(shape, "dispatch resolves to", resolve_impl("rope", device=dev).impl_name, flush=True)
    for layout in ("stacked", "contiguous"):
        for grad in (True, False):
            _, q0, k0 = qk(base, layout, False, H, KV, D)
            rq, rk = hf_rope(q0.float(), k0.float(), cos32, sin32)
            line = f"  {layout:10s} grad={grad!s:5s}"
            for name, fn in FNS.items():
                src, q, k = qk(base, layout, grad, H, KV, D)
                before = src.detach().clone()
                oq, ok = fn(q, k, cos, sin)
                eq, ek = oq.detach().float() - rq, ok.detach().float() - rk
                changed = (src.detach() != before).sum().item()
                line += (f" | {name}: max {eq.abs().max().item():.3g}/{ek.abs().max().item():.3g}"
                         f" mean {eq.mean().item():+.1e} rel {(eq.norm() / rq.norm()).item():.2e} src_changed {changed}")
                if grad:
                    (oq.float() * rq).sum().backward()
                    line += f" grad {src.grad.float().norm().item():.5e}"
            print(line, flush=True)
