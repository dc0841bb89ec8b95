"""Model loading on the real SmolLM2: the embedded model converts once, names resolve, bitsandbytes configs, the
CPU 4-bit trap, and LoRA placement."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune import model as M
from finetune.config import DEFAULT_MODEL, LoraSettings, ModelConfig

ROOT = Path(__file__).resolve().parent.parent


def test_embedded_default_resolves_from_cache_fast():
    path = Path(M.resolve_model(DEFAULT_MODEL))
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    t0 = time.perf_counter()
    assert Path(M.resolve_model(DEFAULT_MODEL)) == path
    assert time.perf_counter() - t0 < 1.0
    # The conversion dropped the GGUF quantization note: the folder loads as a plain bf16 model.
    assert "quantization_config" not in (path / "config.json").read_text()


def test_concurrent_conversions_convert_once(tmp_path):
    """Two processes preparing an empty cache at once: both succeed, one converts, the other waits for it."""
    env = {**os.environ, "STUDIO_MODEL_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "finetune.model", "--prepare-default"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("converting the embedded" in o for o in outs) == 1, outs
    target = tmp_path / "cache" / DEFAULT_MODEL
    assert (target / "model.safetensors").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name] == []  # no half-written folder


def test_local_folder_passes_through_and_bad_names_are_plain_errors(tmp_path):
    path = M.resolve_model(DEFAULT_MODEL)
    assert M.resolve_model(path) == str(Path(path).resolve())
    with pytest.raises(FileNotFoundError, match="no config.json"):
        M.resolve_model(str(tmp_path))
    # Offline (HF_HUB_OFFLINE=1 in the tests), a hub id that is not cached is one sentence, not a traceback.
    with pytest.raises(FileNotFoundError, match="not in the local hub cache.*HF_HUB_OFFLINE"):
        M.resolve_model("nobody-has/this-model-xyz")


def test_tokenizer_pad_eos_and_template():
    tok = M.load_tokenizer(ModelConfig())
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                   tokenize=False)
    assert "<|im_start|>assistant\nyo<|im_end|>" in text


def test_quantization_configs_and_dtype():
    assert M.quantization_config(ModelConfig(quantization="none")) is None
    q8 = M.quantization_config(ModelConfig(quantization="8bit"))
    assert q8.load_in_8bit and not q8.load_in_4bit
    q4 = M.quantization_config(ModelConfig(quantization="4bit"))
    assert q4.load_in_4bit and q4.bnb_4bit_quant_type == "nf4" and q4.bnb_4bit_use_double_quant
    assert q4.bnb_4bit_compute_dtype == M.compute_dtype(ModelConfig())
    if not torch.cuda.is_available():
        assert M.device() == "cpu" and M.compute_dtype(ModelConfig()) == torch.bfloat16
    assert M.compute_dtype(ModelConfig(torch_dtype="float32")) == torch.float32


def _lora_grads(*, eval_forward_first: bool, bnb_default_flag: bool) -> tuple[float, dict]:
    """LoRA gradients of a 4-bit SmolLM2 on a fixed batch, optionally after an eval-mode forward."""
    model = M.load_model(ModelConfig(quantization="4bit"), for_training=True)
    if bnb_default_flag:  # undo our fix, to show the test can see the trap
        import bitsandbytes as bnb

        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = True
    torch.manual_seed(0)
    model = M.apply_lora(model, LoraSettings(lora_dropout=0.0), gradient_checkpointing=False)
    ids = torch.arange(100, 132).repeat(2, 1)
    if eval_forward_first:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max() / (a[k].abs().max() + 1e-12)) for k in a)


def test_cpu_4bit_trap_is_fixed():
    """On AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights for an inference-only kernel at the first eval-mode
    forward; training afterwards gets wrong gradients. load_model turns that off: gradients after an eval forward
    equal those of a fresh model."""
    import bitsandbytes as bnb

    model = M.load_model(ModelConfig(quantization="4bit"), for_training=False)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    del model

    fresh_loss, fresh = _lora_grads(eval_forward_first=False, bnb_default_flag=False)
    after_loss, after = _lora_grads(eval_forward_first=True, bnb_default_flag=False)
    assert after_loss == pytest.approx(fresh_loss, rel=1e-6)
    assert _max_rel_diff(fresh, after) < 1e-4
    if torch.cuda.is_available() or not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: the trap cannot happen here (the fix above is still checked)")
    _, trapped = _lora_grads(eval_forward_first=True, bnb_default_flag=True)
    assert _max_rel_diff(fresh, trapped) > 1e-2, "expected bitsandbytes' default to corrupt gradients on this CPU"


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_apply_lora_all_linear(quantization):
    model = M.load_model(ModelConfig(quantization=quantization), for_training=True)
    peft_model = M.apply_lora(model, LoraSettings(r=4, lora_alpha=8), gradient_checkpointing=True)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(p.dtype == torch.float32 for p in trainable.values())  # adapters train in fp32 over a bf16/4-bit base
    assert any(getattr(m, "gradient_checkpointing", False) for m in peft_model.modules())
    assert peft_model.peft_config["default"].task_type == "CAUSAL_LM"


def _counted(forward, calls: list, i: int):
    def run(*args, **kwargs):
        calls[i] += 1
        return forward(*args, **kwargs)
    return run


@pytest.mark.parametrize("checkpointed", [None, 1, 0])
def test_only_the_first_layers_checkpoint_and_gradients_stay_equal(checkpointed):
    """training.gradient_checkpointing_layers: the first N decoder layers recompute in backward (their forward runs
    twice), the others run once and keep their activations; the LoRA gradients are those of full checkpointing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def grads_and_calls(n):
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128, use_cache=False)
        model = M.apply_lora(LlamaForCausalLM(cfg), LoraSettings(r=4, lora_alpha=8, lora_dropout=0.0),
                             gradient_checkpointing=True, checkpointed_layers=n)
        for name, p in model.named_parameters():  # B=0 at init would make every LoRA A gradient zero
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        layers = M.checkpointing_layers(model)
        calls = [0] * len(layers)
        for i, layer in enumerate(layers):  # (module hooks do not fire in torch's recompute: count the calls)
            layer.mlp.forward = _counted(layer.mlp.forward, calls, i)
        model.train()
        ids = torch.arange(5, 29).view(2, 12)
        model(input_ids=ids, labels=ids).loss.backward()
        return {k: p.grad for k, p in model.named_parameters() if p.grad is not None}, calls

    grads, calls = grads_and_calls(checkpointed)
    k = 3 if checkpointed is None else checkpointed
    assert calls == [2] * k + [1] * (3 - k)
    full, _ = grads_and_calls(None)
    assert grads.keys() == full.keys() and all(torch.allclose(grads[n], full[n], atol=1e-6) for n in full)
