"""The GPU fast path's pieces, checked on the CPU against the plain transformers + peft model on a tiny random Llama:
the same loss and gradients, and a padding-free (flattened, position_ids) batch gives the padded batch's loss."""
from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from finetune import data as D  # noqa: E402
from finetune.recipe import speed  # noqa: E402


def tiny_peft(seed: int = 0, dropout: float = 0.0, checkpointing: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, use_cache=False)
    model = LlamaForCausalLM(cfg).float()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=dropout))
    for name, p in model.named_parameters():  # B=0 at init would hide every LoRA path from the comparison
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    return model


def twins(**kw):
    a = tiny_peft(**kw)
    b = copy.deepcopy(a)
    return a, b


def examples(lengths=(7, 20, 3, 15), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, 256, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


def loss_and_grads(model, batch):
    n = int((batch["labels"][:, 1:] != -100).sum())
    loss = model(**batch, num_items_in_batch=n).loss
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss), grads


def assert_grads_close(ga, gb, rtol=1e-4):
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        scale = float(ga[k].abs().max()) + 1e-12
        assert float((ga[k] - gb[k]).abs().max()) / scale < rtol, k


def test_optimized_path_matches_plain_padded_batch():
    """Plain: peft's LoRA forward, SDPA, padded batch. Optimized: fused LoRA addmm, the packed-row attention,
    the custom checkpoint, on the flattened batch. Same loss, same LoRA gradients."""
    plain, fast = twins(checkpointing=True)
    assert speed.fuse_lora(fast) == 14  # 7 projections x 2 layers
    assert speed.use_varlen_attention(fast)
    assert speed.offload_checkpoints(fast, offload=False) == 2
    exs = examples()
    l_plain, g_plain = loss_and_grads(plain, D.collate(exs, 0, padding_free=False))
    l_fast, g_fast = loss_and_grads(fast, D.collate(exs, 0, padding_free=True))
    assert l_fast == pytest.approx(l_plain, rel=1e-5)
    assert_grads_close(g_plain, g_fast)


def test_padding_free_batch_has_no_cross_contamination():
    """Each example's logits in the packed row equal those of the example run alone (and differ from a plain
    causal pass over the whole row, which would let examples attend to each other)."""
    model = tiny_peft()
    speed.use_varlen_attention(model)
    exs = examples()
    packed = D.collate(exs, 0, padding_free=True)
    inner = speed.inner_model(model).eval()
    with torch.no_grad():
        together = inner(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
        alone = torch.cat([inner(input_ids=torch.tensor([e["input_ids"]])).logits for e in exs], dim=1)
        inner.set_attn_implementation("sdpa")
        leaky = inner(input_ids=packed["input_ids"]).logits  # no position_ids: one long causal sequence
    assert float((together - alone).abs().max()) < 1e-5
    assert float((leaky - alone).abs().max()) > 1e-3


def test_custom_checkpoint_matches_torch_checkpoint_with_dropout():
    a, b = twins(dropout=0.1, checkpointing=True)
    speed.offload_checkpoints(b, offload=True)  # on the CPU nothing is offloaded: the input is kept
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    torch.manual_seed(5)
    la, ga = loss_and_grads(a, batch)
    torch.manual_seed(5)
    lb, gb = loss_and_grads(b, batch)
    assert la == pytest.approx(lb, rel=1e-6)
    assert_grads_close(ga, gb)


def test_fused_lora_falls_back_for_unusual_layers():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64, use_cache=False)
    base = LlamaForCausalLM(cfg)
    dora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    for name, p in dora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        before = dora(input_ids=ids).logits
        speed.fuse_lora(dora)
        after = dora(input_ids=ids).logits
    assert torch.equal(before, after)  # DoRA takes peft's own forward


def test_keep_compute_dtype_casts_only_frozen_fp32_parameters():
    model = tiny_peft()
    inner = speed.inner_model(model)
    inv_freq = inner.model.rotary_emb.inv_freq
    n = speed.keep_compute_dtype(model, torch.bfloat16)
    assert n > 0
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    assert inv_freq.dtype == torch.float32  # buffers stay as the model made them


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU branch of patch_model_for_speed")
def test_patch_on_cpu_changes_nothing():
    from finetune.config import TrainingConfig

    a, b = twins()
    assert speed.patch_model_for_speed(b, TrainingConfig()) == []
    assert speed.inner_model(b).config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_studio_peft_forward") for m in b.modules())
    batch = D.collate(examples(), 0, padding_free=False)
    assert loss_and_grads(a, batch)[0] == loss_and_grads(b, batch)[0]


def test_segments_from_positions():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]])
    cu, max_len = speed.segments_from_positions(pos)
    assert cu.tolist() == [0, 3, 5, 6, 10] and max_len == 4


# --- the CUDA branches (run on a GPU machine; skipped elsewhere) ---------------------------------------------------
def cosine(ga: dict, gb: dict) -> float:
    a = torch.cat([ga[k].double().flatten() for k in sorted(ga)])
    b = torch.cat([gb[k].double().flatten() for k in sorted(ga)])
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.gpu
def test_patch_on_cuda_applies_the_fast_path_and_keeps_loss_and_gradients():
    """On a GPU the whole fast path is applied (bf16 frozen weights, fused LoRA, packed-row attention, the custom
    checkpoint); one packed step gives the plain padded fp32 step's loss and gradient direction within bf16 rounding."""
    from finetune.config import TrainingConfig

    plain, fast = twins(checkpointing=True)
    plain, fast = plain.cuda(), fast.cuda()
    applied = speed.patch_model_for_speed(fast, TrainingConfig(gradient_checkpointing=True))
    assert {"no_fp32_upcast", "fused_lora", "fast_checkpoint"} <= set(applied), applied
    assert "varlen_attention" in applied or "packed_sdpa_attention" in applied, applied
    exs = examples()
    to_cuda = lambda b: {k: v.cuda() for k, v in b.items()}  # noqa: E731
    l_plain, g_plain = loss_and_grads(plain, to_cuda(D.collate(exs, 0, padding_free=False)))
    l_fast, g_fast = loss_and_grads(fast, to_cuda(D.collate(exs, 0, padding_free=True)))
    assert l_fast == pytest.approx(l_plain, rel=3e-2)
    assert g_plain.keys() == g_fast.keys() and cosine(g_plain, g_fast) > 0.98


@pytest.mark.gpu
def test_selfcheck_packed_attention_kernel_on_cuda():
    report = speed.selfcheck()
    assert report["cuda"]
    if report["varlen_kernel"]:
        assert report["varlen_ok"], report
