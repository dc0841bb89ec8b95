import torch
from liger_kernel.transformers.rope import liger_rotary_pos_emb
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
torch.manual_seed(0)
qkv = torch.randn(1, 512, 12 * 128, device="cuda", dtype=torch.bfloat16)
q, k, _ = (t.view(1, 512, -1, 128).transpose(1, 2) for t in qkv.split([8 * 128, 2 * 128, 2 * 128], dim=-1))
angles = torch.arange(512, device="cuda")[:, None] * 500000.0 ** (-torch.arange(0, 128, 2, device="cuda") / 128)
cos, sin = (torch.cat((f(angles), f(angles)), dim=-1)[None] for f in (torch.cos, torch.sin))
want = [t.to(torch.bfloat16).float() for t in apply_rotary_pos_emb(q.float(), k.float(), cos, sin)]
for name, (c, s) in {"fp32 tables": (cos, sin), "bf16 tables": (cos.bfloat16(), sin.bfloat16())}.items():
    got = [t.float() for t in liger_rotary_pos_emb(q, k, c, s)]
    print(name, "share equal to fp32-rounded-once:", [round((g == w).float().mean().item(), 4) for g, w in zip(got, want)])
