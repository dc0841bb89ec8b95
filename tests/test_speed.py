"""The GPU fast path's pieces, checked on the CPU against the plain transformers + peft model on a tiny random Llama:
the same loss and gradients, and a padding-free (flattened, position_ids) batch gives the padded batch's loss."""
from __future__ import annotations

import collections
import copy
import os

import pytest

torch = pytest.importorskip("torch")

from finetune import data as D  # noqa: E402
from finetune.recipe import lora_weights, speed  # noqa: E402


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


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / (b.double().norm() + 1e-30))


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
    groups = {id(m._studio_group) for m in fast.modules() if getattr(m, "_studio_group", None) is not None}
    assert len(groups) == 4  # q/k/v and gate/up of each layer
    assert speed.use_varlen_attention(fast)
    assert speed.offload_checkpoints(fast, offload=False) == 2
    exs = examples()
    l_plain, g_plain = loss_and_grads(plain, D.collate(exs, 0, padding_free=False))
    l_fast, g_fast = loss_and_grads(fast, D.collate(exs, 0, padding_free=True))
    assert l_fast == pytest.approx(l_plain, rel=1e-5)
    assert_grads_close(g_plain, g_fast)


def test_grouped_and_single_projections_agree(monkeypatch):
    """q/k/v and gate/up as one node each against one node per projection: same loss and LoRA gradients."""
    single, grouped = twins(checkpointing=True)
    monkeypatch.setenv("STUDIO_SPEED", "-group")
    speed.fuse_lora(single)
    monkeypatch.delenv("STUDIO_SPEED")
    speed.fuse_lora(grouped)
    assert all(getattr(m, "_studio_group", None) is None for m in single.modules())
    batch = D.collate(examples(), 0, padding_free=False)
    l_single, g_single = loss_and_grads(single, batch)
    l_grouped, g_grouped = loss_and_grads(grouped, batch)
    assert l_grouped == pytest.approx(l_single, rel=1e-6)
    assert_grads_close(g_single, g_grouped, rtol=1e-5)


def test_stacked_qkv_agrees_with_one_node_per_projection(monkeypatch):
    """q/k/v as one stacked product (one weight matrix, block-diagonal LoRA B) against one node per projection."""
    single, stacked = twins(checkpointing=True)
    monkeypatch.setenv("STUDIO_SPEED", "-group")
    speed.fuse_lora(single)
    monkeypatch.setenv("STUDIO_SPEED", "+stack")
    speed.fuse_lora(stacked)
    groups = {m._studio_group for m in stacked.modules() if getattr(m, "_studio_group", None) is not None}
    assert sorted(g.stacked for g in groups) == [False, False, True, True]  # q/k/v stacked, gate/up grouped
    assert speed.fused_pieces(stacked) == ["fused_proj", "grouped_proj", "stacked_qkv"]  # dense weights: no 4-bit
    assert speed.fused_pieces(single) == ["fused_proj"]
    batch = D.collate(examples(), 0, padding_free=False)
    l_single, g_single = loss_and_grads(single, batch)
    l_stacked, g_stacked = loss_and_grads(stacked, batch)
    assert l_stacked == pytest.approx(l_single, rel=1e-6)
    assert_grads_close(g_single, g_stacked, rtol=1e-5)


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


@pytest.mark.gpu
def test_liger_kernels_switch_off_one_by_one(monkeypatch):
    """STUDIO_SPEED turns single liger kernels off (to find which one moves a result): the others still apply."""
    pytest.importorskip("liger_kernel.transformers")
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):  # liger replaces these module-wide
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    monkeypatch.delenv("STUDIO_SPEED", raising=False)
    assert speed.apply_liger(tiny_peft()) == ["liger_rope", "liger_rms_norm", "liger_swiglu",
                                              "liger_fused_linear_cross_entropy"]
    model = tiny_peft()
    monkeypatch.setenv("STUDIO_SPEED", "-liger_rope,-liger_swiglu,-liger_flce")
    assert speed.apply_liger(model) == ["liger_rms_norm"]
    inner = speed.inner_model(model)
    layer = inner.model.layers[0]
    assert "forward" in vars(layer.input_layernorm) and "forward" in vars(inner.model.norm)
    assert "forward" not in vars(layer.mlp) and "forward" not in vars(inner)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_liger_rope_with_fp32_tables_rounds_the_fp32_rotation_once():
    """What fp32_rope_tables is for: liger's RoPE on bf16 q/k with fp32 cos/sin gives the fp32 rotation rounded to
    bf16 once (as transformers computes it on fp32 hidden states), on the stacked q|k|v layout of the fast path."""
    pytest.importorskip("liger_kernel.transformers")
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    qkv = torch.randn(1, 512, (8 + 2 * 2) * 128, device="cuda", dtype=torch.bfloat16)
    q, k, _ = (t.view(1, 512, -1, 128).transpose(1, 2) for t in qkv.split([8 * 128, 2 * 128, 2 * 128], dim=-1))
    angles = torch.arange(512, device="cuda")[:, None] * 500000.0 ** (-torch.arange(0, 128, 2, device="cuda") / 128)
    cos, sin = (torch.cat((f(angles), f(angles)), dim=-1)[None] for f in (torch.cos, torch.sin))
    want = [t.to(torch.bfloat16) for t in apply_rotary_pos_emb(q.float(), k.float(), cos, sin)]
    got = liger_rotary_pos_emb(q, k, cos, sin)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        g, w = g.float(), w.float()
        assert ((g - w).abs() <= w.abs() * torch.finfo(torch.bfloat16).eps).all()  # an ulp apart at most
        assert (g == w).float().mean() > 0.99  # with bf16 tables 78% are (cos/sin rounded first)


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


def test_checkpoint_keeps_random_state_only_for_layers_that_draw_random_numbers():
    with_dropout, without = tiny_peft(dropout=0.1), tiny_peft(dropout=0.0)
    layer = speed.inner_model(with_dropout).model.layers[0]
    assert speed.draws_random_numbers(layer)
    assert not speed.draws_random_numbers(speed.inner_model(without).model.layers[0])
    layer = speed.inner_model(without).model.layers[0]
    layer.self_attn.attention_dropout = 0.1  # attention dropout is a number on the module, not a Dropout
    assert speed.draws_random_numbers(layer)


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


def test_fp32_rope_tables_hand_out_the_fp32_computation_for_bf16_hidden_states():
    inner = speed.inner_model(tiny_peft())
    rotary = inner.model.rotary_emb
    x = torch.randn(2, 9, 64).to(torch.bfloat16)
    positions = torch.arange(9).repeat(2, 1)
    want = rotary(x.float(), positions)
    assert rotary(x, positions)[0].dtype == torch.bfloat16
    assert speed.fp32_rope_tables(inner) == 1
    assert speed.fp32_rope_tables(inner) == 0  # once per module
    for got, ref in zip(rotary(x, positions), want):
        assert got.dtype == torch.float32 and torch.equal(got, ref)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU branch of patch_model_for_speed")
def test_patch_on_cpu_changes_nothing():
    from finetune.config import TrainingConfig

    a, b = twins()
    assert speed.patch_model_for_speed(b, TrainingConfig()) == []
    assert speed.inner_model(b).config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_studio_peft_forward") for m in b.modules())
    batch = D.collate(examples(), 0, padding_free=False)
    assert loss_and_grads(a, batch)[0] == loss_and_grads(b, batch)[0]


def test_segments_are_recomputed_for_new_positions_at_a_reused_address():
    """The next batch's positions often land in the memory the last batch's left: the boundaries must be its own."""
    buf = bytearray(torch.tensor([0, 1, 2, 0, 1, 2]).numpy().tobytes())
    first = torch.frombuffer(buf, dtype=torch.int64)
    assert speed.segment_bounds(first) == ((0, 3, 6), 0)  # a CPU row is never attended as a dense batch
    buf[:] = torch.tensor([0, 1, 2, 3, 0, 1]).numpy().tobytes()
    second = torch.frombuffer(buf, dtype=torch.int64)  # same address, fresh tensor, version 0
    assert second.data_ptr() == first.data_ptr()
    assert speed.segment_bounds(second) == ((0, 4, 6), 0)


def test_dense_rows_attention_equals_attention_per_example():
    """A packed row of examples of one length, cut into a batch for one SDPA call: the output of attending each
    example alone (grouped-query heads included)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 3 * 5, 8, generator=g) for h in (4, 2, 2))
    pos = torch.arange(5).repeat(3)[None]
    per_example = speed._packed_attention(q, k, v, pos, 0.3)  # on the CPU: one SDPA call per example
    dense = speed.dense_rows_attention(q, k, v, 3, 0.3)
    assert dense.shape == per_example.shape == (1, 15, 4, 8)
    assert float((dense - per_example).abs().max()) < 1e-6
    assert float((speed.dense_rows_attention(q, k, v, 1, 0.3) - per_example).abs().max()) > 1e-2  # it is per example


def test_segments_from_positions():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]])
    cu, max_len, _, _ = speed._segments(pos)
    assert cu.tolist() == [0, 3, 5, 6, 10] and max_len == 4


def test_lora_projection_with_dropout_matches_its_definition():
    """One LoRA projection through the single autograd function: base(x) + s * (dropout(x) A^T) B^T and its
    gradients, against autograd over the same formula with the same dropout mask (the function draws it first)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(24, 40, bias=True))
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=0.25))
    layer = model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    assert speed.fuse_lora(model) == 1 and layer._studio_weight is not None
    x = torch.randn(3, 5, 24, requires_grad=True)
    torch.manual_seed(7)
    out = layer(x)
    out.backward(torch.ones_like(out) * torch.linspace(-1, 1, 40))
    got = (out.detach(), x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad)

    x_ref = x.detach().clone().requires_grad_(True)
    A = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    B = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    torch.manual_seed(7)
    mask = torch.empty(15, 24, dtype=torch.bool).bernoulli_(0.75).view(3, 5, 24)
    base = layer.base_layer
    ref = base(x_ref) + 2.0 * ((x_ref * mask / 0.75) @ A.t()) @ B.t()
    ref.backward(torch.ones_like(ref) * torch.linspace(-1, 1, 40))
    for a, b in zip(got, (ref.detach(), x_ref.grad, A.grad, B.grad)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert 0 < int(mask.sum()) < mask.numel()  # the mask did drop something


@pytest.mark.parametrize("opt_kwargs", [{"foreach": True}, {"fused": True}, {"foreach": False}])
def test_lora_projection_recasts_weights_after_each_optimizer_step(opt_kwargs):
    """fp32 LoRA weights on a bf16 layer: the compute-dtype copies kept between passes follow every update."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32, bias=False, dtype=torch.bfloat16))
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=4, target_modules=["0"]))
    layer = model.base_model.model[0]
    layer.lora_A["default"].float()
    layer.lora_B["default"].float()
    speed.fuse_lora(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.1, **opt_kwargs)
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    for i in range(3):
        out = layer(x)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        base = layer.base_layer(x).float()
        ref = base + (x.float() @ A.detach().bfloat16().float().t()) @ B.detach().bfloat16().float().t()
        assert rel_err(out.detach(), ref) < 1e-2
        if i:  # the LoRA term is large by now: a stale copy of the weights would miss the bound above
            assert rel_err(base, ref) > 0.1
        out.float().pow(2).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert float(layer.lora_B["default"].weight.abs().sum()) > 0  # the updates did happen


def test_lora_projection_is_skipped_when_switched_off(monkeypatch):
    monkeypatch.setenv("STUDIO_SPEED", "-fused_proj")
    model = tiny_peft()
    speed.fuse_lora(model)
    assert all(m._studio_weight is None for m in model.modules() if hasattr(m, "_studio_peft_forward"))


# --- on a CUDA GPU (skipped elsewhere) -------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nf4_lora_projection_matches_bitsandbytes_and_peft():
    """The single-node projection on a double-quantized NF4 layer against peft + bitsandbytes' own forward and
    backward (the same LoRA weights, the same input): bf16-level agreement in output and every gradient."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    dense = torch.nn.Linear(512, 768, bias=False, dtype=torch.bfloat16)
    q = bnb.nn.Linear4bit(512, 768, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                          quant_type="nf4")
    q.load_state_dict(dense.state_dict())
    model = get_peft_model(torch.nn.Sequential(q).cuda(), LoraConfig(r=16, lora_alpha=16, target_modules=["0"]))
    layer = model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    speed.fuse_lora(model)
    assert layer._studio_weight is not None
    x = torch.randn(2, 300, 512, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(2, 300, 768, device="cuda", dtype=torch.bfloat16)
    outs = []
    for forward in (layer.forward, layer._studio_peft_forward):
        xi = x.clone().requires_grad_(True)
        y = forward(xi)
        y.backward(g)
        outs.append([y.detach(), xi.grad, layer.lora_A["default"].weight.grad.clone(),
                     layer.lora_B["default"].weight.grad.clone()])
        model.zero_grad(set_to_none=True)
    for got, ref in zip(*outs):
        assert torch.isfinite(got).all() and rel_err(got, ref) < 2e-2


def nf4_linear(n_in: int, n_out: int, nested: bool = True):
    """A bitsandbytes NF4 layer (bf16 compute) holding a random bf16 dense layer's weights, on the GPU."""
    import bitsandbytes as bnb

    dense = torch.nn.Linear(n_in, n_out, bias=False, dtype=torch.bfloat16)
    q = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.bfloat16, compress_statistics=nested,
                          quant_type="nf4")
    q.load_state_dict(dense.state_dict())
    return q.cuda()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lean_dequantization_equals_bitsandbytes():
    """The bare-call dequantization into the shared buffer gives bitsandbytes' own dense weight bit for bit, for
    weights of different shapes dequantized one after another, with double-quantized and plain absmax."""
    import bitsandbytes.functional as BF

    for nested in (True, False):
        torch.manual_seed(0)
        layers = [nf4_linear(i, o, nested) for i, o in ((512, 768), (256, 1024), (1024, 128))]
        refs = [BF.dequantize_4bit(q.weight.data, q.weight.quant_state).to(torch.bfloat16) for q in layers]
        fns = [lora_weights._lean_nf4(q.weight.data, q.weight.quant_state) for q in layers]
        assert all(fn is not None for fn in fns)
        for _ in range(2):
            for fn, ref in zip(fns, refs):
                got = fn(torch.bfloat16)
                assert got.shape == ref.shape and torch.equal(got, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_kernel_nf4_equals_bitsandbytes_eagerly_and_in_a_graph(monkeypatch):
    """The single-kernel NF4 dequantization gives bitsandbytes' weight bit for bit, eagerly (which compiles it) and
    replayed from a CUDA graph; under a capture it declines a specialization no eager call compiled."""
    import bitsandbytes.functional as BF

    from finetune.recipe import nf4_kernel

    monkeypatch.setattr(nf4_kernel, "_compiled", set())  # as in a fresh process: nothing compiled yet
    for nested in (True, False):
        torch.manual_seed(1)
        for dt in (torch.bfloat16, torch.float16):
            q = nf4_linear(1024, 384, nested)
            packed, qs = q.weight.data, q.weight.quant_state
            dequantize = nf4_kernel.bind(packed, qs)
            assert dequantize is not None
            ref = BF.dequantize_4bit(packed, qs).to(dt)
            out = torch.full_like(ref, float("nan"))
            assert dequantize(out, capturing=False)
            assert torch.equal(out, ref)
            graph_out = torch.zeros_like(ref)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                assert dequantize(graph_out, capturing=True)
                unaligned = torch.empty(ref.numel() + 1, dtype=dt, device="cuda")[1:].view(ref.shape)
                assert not dequantize(unaligned, capturing=True)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(graph_out, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("switches", ["", "+stack"])
def test_grouped_nf4_projections_match_peft(switches, monkeypatch):
    """q/k/v as one node on NF4 weights (lean dequantization, one reused buffer; grouped, or stacked into one
    product) against peft + bitsandbytes' own forward and backward of each projection: outputs, the input
    gradient and every LoRA gradient at bf16 level."""
    from peft import LoraConfig, get_peft_model

    monkeypatch.setenv("STUDIO_SPEED", switches)
    torch.manual_seed(0)
    attn = torch.nn.Module()
    attn.q_proj, attn.k_proj, attn.v_proj = nf4_linear(512, 768), nf4_linear(512, 256), nf4_linear(512, 256)
    model = get_peft_model(attn, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj"]))
    layers = [getattr(model.base_model.model, n) for n in ("q_proj", "k_proj", "v_proj")]
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    speed.fuse_lora(model)
    assert all(layer._studio_group is not None for layer in layers)
    assert layers[0]._studio_group.stacked == (switches == "+stack")
    x = torch.randn(2, 300, 512, device="cuda", dtype=torch.bfloat16)
    gs = [torch.randn(2, 300, n, device="cuda", dtype=torch.bfloat16) for n in (768, 256, 256)]
    runs = []
    for fused in (True, False):
        xi = x.clone().requires_grad_(True)
        ys = [layer(xi) if fused else layer._studio_peft_forward(xi) for layer in layers]
        torch.autograd.backward(ys, gs)
        runs.append([y.detach() for y in ys] + [xi.grad] + [w.grad.clone() for layer in layers
                                                            for w in (layer.lora_A["default"].weight,
                                                                      layer.lora_B["default"].weight)])
        model.zero_grad(set_to_none=True)
    for got, ref in zip(*runs):
        assert torch.isfinite(got).all() and rel_err(got, ref) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_path_on_gpu_matches_plain_4bit_model(tmp_path, monkeypatch):
    """The whole fast path (liger, single-node LoRA projections, varlen attention, custom checkpoint) on a real
    4-bit load of a tiny Llama, packed batch, against the same load with nothing patched on the padded batch."""
    from finetune import model as M
    from finetune.bench.models import build_model
    from finetune.config import LoraSettings, ModelConfig, TrainingConfig

    path = build_model("tiny", tmp_path)
    mcfg = ModelConfig(name_or_path=str(path), quantization="4bit", torch_dtype="bfloat16")
    lora = LoraSettings(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    results = []
    for switches, padding_free in (("none", False), ("", True)):
        monkeypatch.setenv("STUDIO_SPEED", switches)
        torch.manual_seed(0)
        model = M.apply_lora(M.load_model(mcfg, for_training=True), lora, gradient_checkpointing=True)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator(device=p.device).manual_seed(1))
        applied = speed.patch_model_for_speed(model, TrainingConfig(gradient_checkpointing=True))
        model.train()
        batch = {k: v.cuda() for k, v in D.collate(examples(), 0, padding_free=padding_free).items()}
        results.append((applied, *loss_and_grads(model, batch)))
    (plain_applied, l_plain, g_plain), (fast_applied, l_fast, g_fast) = results
    assert plain_applied == [] and "fused_lora" in fast_applied and "varlen_attention" in fast_applied
    assert l_fast == pytest.approx(l_plain, rel=2e-2)
    assert g_plain.keys() == g_fast.keys() and g_plain
    assert max(rel_err(g_fast[k], g_plain[k]) for k in g_plain) < 5e-2


def train_with_graphs(model, batches, optimizer, lr):
    """One optimizer step per batch: (losses, the trained LoRA weights in fp32, each checkpointed layer's graphs)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params, lr=lr)
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    graphs = [m._studio_graphs for m in speed._checkpointed_layers(model)]
    return losses, [p.detach().float().clone() for p in params], graphs


class RerunGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: replay() runs the recorded body again. What it checks is the
    graphs' plumbing (static inputs and outputs, keyword tensors, LoRA gradients handed to autograd)."""

    def __init__(self, body):
        self.body = body

    def replay(self):
        self.body()


def test_layer_graph_key_reads_both_checkpoint_call_forms():
    """transformers hands the checkpoint partial(forward, layer, **kw); older releases partial(layer.__call__, **kw)."""
    import functools

    from finetune.recipe import layer_graphs

    class Scale(torch.nn.Module):
        def forward(self, x, factor=1.0):
            return x * factor

    layer, h = Scale(), torch.ones(2, 3)
    runs = (functools.partial(Scale.forward, layer, factor=2.0), functools.partial(layer.__call__, factor=2.0))
    assert layer_graphs.signature(runs[0], h) == layer_graphs.signature(runs[1], h) is not None
    for run in runs:
        assert torch.equal(layer_graphs._bound(run)(h, factor=3.0), h * 3)


def test_layer_graph_plumbing_gives_the_eager_training(monkeypatch):
    """Three SGD steps of a tiny Llama on same-shape packed rows, the checkpointed layers once eager and once
    through LayerGraphs (signature seen at step 1, recorded at 2, replayed at 2 and 3): equal losses and weights."""
    from finetune.recipe import layer_graphs

    monkeypatch.setattr(layer_graphs, "DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(layer_graphs, "_record", lambda body, device: RerunGraph(body))
    monkeypatch.setenv("WORLD_SIZE", "1")
    batches = [D.collate(examples((9, 14), seed=i), 0, padding_free=True) for i in range(3)]
    runs = []
    for switches in ("-graphs", ""):
        monkeypatch.setenv("STUDIO_SPEED", switches)
        model = tiny_peft(checkpointing=True)
        speed.use_varlen_attention(model)
        assert speed.offload_checkpoints(model, offload=False)
        losses, params, graphs = train_with_graphs(model, batches, torch.optim.SGD, lr=0.5)
        runs.append((losses, params, graphs))
    (eager_losses, eager_w, eager_graphs), (losses, w, graphs) = runs
    assert eager_graphs == [None, None] and len(graphs) == 2
    assert all(len(g.entries) == 1 and next(iter(g.entries.values())).bwd is not None for g in graphs)
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert max(rel_err(a, b) for a, b in zip(w, eager_w)) < 1e-5
    assert max(rel_err(a, b) for a, b in zip(w, [p.detach() for p in tiny_peft().parameters()
                                                  if p.requires_grad])) > 1e-3  # it trained


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_layer_graphs_and_offload_train_like_the_eager_layers(tmp_path, monkeypatch):
    """Five AdamW steps on a real 4-bit tiny Llama with packed rows of two 32-token examples (attended by flash
    varlen at step 1, as a dense batch from step 2 on): with the decoder layers replayed as CUDA graphs (the dense
    signature seen at step 2, captured at 3, replayed at 3 to 5, the LoRA weights changing in between), and with
    every layer input parked in host memory (eagerly and under graphs), the losses and the trained LoRA weights are
    those of the eager layers that keep their inputs. Each backward waits for one copy back only (its first
    layer's): the rest were started a layer ahead."""
    from finetune import model as M
    from finetune.bench.models import build_model
    from finetune.config import LoraSettings, ModelConfig, TrainingConfig
    from finetune.recipe.offload import InputOffloader

    path = build_model("tiny", tmp_path)
    mcfg = ModelConfig(name_or_path=str(path), quantization="4bit", torch_dtype="bfloat16")
    lora = LoraSettings(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    batches = [{k: v.cuda() for k, v in D.collate(examples((32, 32), seed=i), 0, padding_free=True).items()}
               for i in range(5)]
    monkeypatch.setattr(speed, "OFFLOAD_MIN_BYTES", 0)
    fetch, counts = InputOffloader.fetch, {"late": 0, "fetched": 0}

    def counted_fetch(self, parked):
        counts["late"] += parked.gpu is None
        counts["fetched"] += 1
        return fetch(self, parked)

    monkeypatch.setattr(InputOffloader, "fetch", counted_fetch)
    runs = {}
    for switches in ("-graphs,-offload", "-graphs", ""):
        monkeypatch.setenv("STUDIO_SPEED", switches)
        torch.manual_seed(0)
        model = M.apply_lora(M.load_model(mcfg, for_training=True), lora, gradient_checkpointing=True)
        applied = speed.patch_model_for_speed(model, TrainingConfig(gradient_checkpointing=True))
        model.train()
        counts.update(late=0, fetched=0)
        monkeypatch.setattr(speed, "equal_rows", collections.Counter())  # each run counts its own rows
        monkeypatch.setattr(speed, "dense_shapes", set())
        runs[switches] = (applied, *train_with_graphs(model, batches, torch.optim.AdamW, lr=1e-2), dict(counts))
        assert speed.equal_rows[(2, 32)] == len(batches) and speed.segment_bounds(batches[-1]["position_ids"])[1] == 2
    eager_applied, eager_losses, eager_w, _, eager_counts = runs["-graphs,-offload"]
    assert "cuda_graph_layers" not in eager_applied and "offload_checkpoints" not in eager_applied
    assert eager_counts["fetched"] == 0
    for switches in ("-graphs", ""):
        applied, losses, w, graphs, parked = runs[switches]
        assert "offload_checkpoints" in applied
        assert parked == {"late": len(batches), "fetched": 2 * len(batches)}  # two layers, five steps
        assert losses == pytest.approx(eager_losses, rel=1e-3)
        assert max(rel_err(a, b) for a, b in zip(w, eager_w)) < 1e-2
    applied, graphs = runs[""][0], runs[""][3]
    assert "cuda_graph_layers" in applied
    assert graphs and all(g.entries and all(e.fwd is not None and e.bwd is not None for e in g.entries.values())
                          for g in graphs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_selfcheck_varlen_kernel_against_float64_reference():
    report = speed.selfcheck()
    assert report["cuda"] and report["varlen_kernel"] and report["varlen_ok"], report


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dense_rows_attention_matches_flash_varlen_on_gpu(monkeypatch):
    """A row of four 256-token examples (Llama-3's 32 query and 8 key/value heads, bf16): the dense batch through
    SDPA (cuDNN where it applies) and flash varlen give the same output and the same gradients."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, 4 * 256, 128, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (32, 8, 8))
    pos = torch.arange(256, device="cuda").repeat(4)[None]
    monkeypatch.setattr(speed, "equal_rows", collections.Counter())
    monkeypatch.setattr(speed, "dense_shapes", set())
    outs = []
    for _ in range(1 + speed.DENSE_AFTER):  # flash varlen until the row's shape recurs, then the dense batch
        pos = pos.clone()  # a new batch's positions
        out = speed._packed_attention(q, k, v, pos, 128 ** -0.5)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        outs.append((out, grads, speed.segment_bounds(pos)[1]))
    (flash, flash_grads, was_dense), (dense, dense_grads, is_dense) = outs[0], outs[-1]
    assert (was_dense, is_dense) == (0, 4)
    assert rel_err(dense.float(), flash.float()) < 1e-2
    assert max(rel_err(a.float(), b.float()) for a, b in zip(dense_grads, flash_grads)) < 2e-2


def test_every_studio_optimizer_marks_the_lora_copies_stale():
    """The bf16 copies of the LoRA weights are redone after any optimizer step, and the stale ones are let go: the
    step hook fires for each optimizer training.optim can name (bitsandbytes' update in place without bumping the
    tensor version)."""
    import bitsandbytes as bnb

    lora_weights._count_optimizer_steps()
    p = torch.nn.Parameter(torch.zeros(4096))
    for cls in (torch.optim.AdamW, bnb.optim.AdamW8bit, bnb.optim.PagedAdamW8bit):
        before = lora_weights._updates[0]
        copy = lora_weights._cast(p, torch.bfloat16)
        assert lora_weights._cast(p, torch.bfloat16) is copy  # kept until the step
        p.grad = torch.ones_like(p)
        cls([p], lr=0.1).step()
        assert lora_weights._updates[0] > before, cls.__name__
        assert not hasattr(p, "_studio_cast"), cls.__name__
        assert float(lora_weights._cast(p, torch.bfloat16)[0]) != 0.0  # the new copy is of the updated weight


def test_pinned_pool_reserved_for_the_largest_input_serves_every_smaller_one():
    """What the offload pins ahead for the run's largest batch is all it ever needs: a smaller layer input takes a
    reserved buffer, and only a request beyond the reservation allocates."""
    from finetune.recipe.offload import PinnedPool

    pool = PinnedPool(pin=False)  # ordinary host memory: the bookkeeping is the same
    reserved = pool.reserve(3 * 2**20, count=4)
    assert reserved == pool.allocated == 4 * 4 * 2**20  # power-of-two buffers
    assert pool.reserve(3 * 2**20, count=4) == 0
    taken = [pool.take((n, 1024), torch.float32) for n in (768, 300, 1, 700)]  # 3 MiB, 1.2 MiB, 4 KiB, 2.7 MiB
    assert pool.allocated == reserved
    assert [host.shape for _, host in taken] == [(768, 1024), (300, 1024), (1, 1024), (700, 1024)]
    pool.take((10, 1024), torch.float32)  # a fifth input at once: beyond the reservation
    assert pool.allocated == reserved + 2**20
    for raw, _ in taken:
        pool.give(raw)
    raw, host = pool.take((1024, 1024), torch.float32)  # 4 MiB: a reserved buffer holds it exactly
    assert pool.allocated == reserved + 2**20 and raw.numel() == 4 * 2**20


def test_reserve_offload_pins_for_the_largest_batch_and_reads_nothing_where_it_does_not_offload(monkeypatch):
    from finetune.recipe.offload import PinnedPool

    def positions(read: list):
        for n in (300, 9000, 40):
            read.append(n)
            yield n

    plain, read = tiny_peft(checkpointing=True), []
    assert speed.reserve_offload(plain, positions(read)) == 0 and read == []  # no offload: nothing to pin for
    model = tiny_peft(checkpointing=True)
    assert speed.offload_checkpoints(model, offload=True) == 2
    offloader = speed.inner_model(model)._studio_offloader
    offloader.pool = PinnedPool(pin=False)  # a CPU-only torch cannot pin
    monkeypatch.setenv("STUDIO_SPEED", "-pin_ahead")
    assert speed.reserve_offload(model, positions(read)) == 0 and read == []
    monkeypatch.setenv("STUDIO_SPEED", "")
    assert speed.reserve_offload(model, positions(read)) == 0 and read == [300, 9000, 40]  # below the threshold
    monkeypatch.setattr(speed, "OFFLOAD_MIN_BYTES", 2**20)
    largest = 9000 * 64 * 4  # positions x hidden size x fp32: 2.2 MiB, parked in 4 MiB buffers
    assert speed.reserve_offload(model, iter([300, 9000, 40])) == 2 * 4 * 2**20 == offloader.pool.allocated
    assert PinnedPool.capacity(largest) == 4 * 2**20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_recipe_pins_the_offload_buffers_before_the_first_step(tmp_path, monkeypatch):
    """The real recipe on a 4-bit tiny Llama, rows of varying length packed, every layer input parked: setup pins the
    host buffers for the run's largest micro-batch and no training step pins more. With -pin_ahead the pool starts
    empty and grows during training: the steps would otherwise pay for it."""
    from finetune.bench.models import build_model, make_batches
    from finetune.bench.recipe_arm import write_data
    from finetune.config import JobConfig
    from finetune.recipe.offload import InputOffloader
    from finetune.recipe.sft import SFTRecipe

    park, parks = InputOffloader.park, collections.Counter()

    def counted_park(self, hidden):
        parks[os.environ["STUDIO_SPEED"]] += 1
        return park(self, hidden)

    monkeypatch.setattr(InputOffloader, "park", counted_park)
    path = build_model("tiny", tmp_path / "models")
    write_data(tmp_path / "data.jsonl", make_batches("var", 4, 3, 512, seed=5))
    monkeypatch.setattr(speed, "OFFLOAD_MIN_BYTES", 0)
    pinned = {}
    for switches in ("", "-pin_ahead"):
        monkeypatch.setenv("STUDIO_SPEED", switches)
        recipe = SFTRecipe(JobConfig.parse({
            "model": {"name_or_path": str(path), "quantization": "4bit", "torch_dtype": "bfloat16"},
            "data": {"path": str(tmp_path / "data.jsonl"), "format": "text", "validation_split": 0.0},
            "training": {"max_steps": 3, "per_device_train_batch_size": 4, "gradient_checkpointing": True},
            "evaluation": {"enabled": False}}))
        recipe.setup()
        assert recipe.padding_free
        pool = speed.inner_model(recipe.accelerator.unwrap_model(recipe.model))._studio_offloader.pool
        at_setup = pool.allocated
        recipe.model.train()  # as SFTRecipe.train does: checkpointing (and so parking) runs in training mode only
        for group in recipe.epoch_groups(0):
            recipe.train_step([recipe.collate([recipe.train_examples[i] for i in idx]) for idx in group])
        pinned[switches] = (at_setup, pool.allocated, "pin_ahead" in recipe.speedups)
    assert parks[""] == parks["-pin_ahead"] == 3 * 2  # three steps, two layers
    assert pinned[""][0] > 0 and pinned[""] == (pinned[""][0], pinned[""][0], True)
    assert pinned["-pin_ahead"][0] == 0 and pinned["-pin_ahead"][1] > 0 and not pinned["-pin_ahead"][2]
