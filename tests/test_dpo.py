"""Preference tuning (training.objective dpo) on the real SmolLM2 through the job queue: reward accuracy and margin
rise over a few steps, an SFT adapter can be continued, and a pair missing its rejected answer is refused before
training with the file, line and field named."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from app import render
from conftest import preference_rows, scheduled_store, tiny_config, wait_for, write_jsonl
from finetune import data as D
from finetune import preference
from finetune.jobs.store import JobStore
from finetune.paths import adapters_dir
from finetune.recipe.dpo import dpo_loss
from finetune.rundir import read_metrics

DEADLINE = 600


@pytest.fixture(scope="module")
def store(studio_home):
    with scheduled_store(studio_home) as s:
        yield s


@pytest.fixture(scope="module")
def pref_jsonl(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pref") / "pref.jsonl", preference_rows(32))


def run_job(store: JobStore, cfg) -> dict:
    job_id = store.submit(cfg)
    row = wait_for(lambda: (r := store.get(job_id))["state"] in ("completed", "failed", "cancelled") and r,
                   DEADLINE, f"job {cfg.adapter_name} to finish", interval=0.5)
    return row


def dpo_config(data, name: str, steps: int, **training):
    cfg = tiny_config(data, name, steps, objective="dpo", learning_rate=2e-3, per_device_train_batch_size=4,
                      **training)
    cfg.dpo.beta = 0.1
    return cfg


def test_loss_variants():
    zero = torch.zeros(2)
    losses, rc, rr = dpo_loss(zero, zero, zero, zero, beta=0.1)
    assert torch.allclose(losses, torch.full((2,), math.log(2))) and not rc.any() and not rr.any()
    better = torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    assert dpo_loss(*better, beta=0.1)[0].item() < math.log(2)
    assert dpo_loss(*better, beta=0.1, loss_type="ipo")[0].item() == pytest.approx((4 - 5) ** 2)
    assert dpo_loss(*better, beta=0.1, loss_type="hinge")[0].item() == pytest.approx(0.6)
    assert dpo_loss(*better, beta=0.5, loss_type="hinge")[0].item() == 0.0


def full_logits_logps(model, batch: dict):
    """The reference: every position's logits at once, log-softmax through logsumexp."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    picked = torch.gather(logits, -1, torch.where(mask, labels, 0).unsqueeze(-1)).squeeze(-1).float()
    return ((picked - torch.logsumexp(logits.float(), -1)) * mask).sum(-1)


def test_chunked_log_probabilities_equal_full_logits_without_holding_them():
    """sequence_logps runs the output head over chunks of trained positions: the same log-probabilities and LoRA
    gradients as the full-logits computation, and no tensor larger than one chunk's logits is allocated."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from finetune import model as M
    from finetune.config import JobConfig
    from finetune.recipe.dpo import sequence_logps

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not any(r.alias_info is not None for r in func._schema.returns):  # views allocate nothing
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    self.numel = max(self.numel, t.numel() if isinstance(t, torch.Tensor) else 0)
            return out

    torch.manual_seed(0)
    cfg = JobConfig.parse({"model": {"quantization": "none", "torch_dtype": "float32"}, "lora": {"lora_dropout": 0.0}})
    model = M.apply_lora(M.load_model(cfg.model, for_training=True), cfg.lora, gradient_checkpointing=True)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.02)
    ids = torch.randint(0, 1000, (4, 40))
    attention, labels = torch.ones_like(ids), ids.clone()
    attention[1, 30:], labels[:, :10], labels[1, 30:] = 0, -100, -100
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels}
    model.train()

    def run(fn):
        model.zero_grad(set_to_none=True)
        with Largest() as largest:
            logps = fn()
            logps.sum().backward()
        return logps.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, largest.numel

    full, full_grads, full_numel = run(lambda: full_logits_logps(model, batch))
    chunked, grads, numel = run(lambda: sequence_logps(model, batch, chunk_size=16)[0])
    assert torch.allclose(chunked, full, rtol=1e-5, atol=1e-4), (chunked, full)
    whole, _, _ = run(lambda: sequence_logps(model, batch, chunked=False)[0])  # FSDP's way: the model's logits
    assert torch.allclose(whole, full, rtol=1e-5, atol=1e-4), (whole, full)
    assert max(float((grads[n] - full_grads[n]).abs().max()) for n in grads) < 1e-5
    vocab = model.get_output_embeddings().weight.shape[0]
    assert full_numel >= 4 * 39 * vocab and numel <= 16 * vocab  # one chunk's logits, not the batch's


def test_preference_shapes_detect_and_agree(tmp_path):
    plain = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}
    trl = {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello."}],
           "rejected": [{"role": "assistant", "content": "Go away."}]}
    full = {side: [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": plain[side]}]
            for side in ("chosen", "rejected")}
    pairs = [preference.to_pair(r) for r in (plain, trl, full)]
    assert pairs[0] == pairs[1] == pairs[2]
    assert D.detect_format([plain]) == D.detect_format([full]) == "preference"
    # SFT and evaluation see the chosen conversation
    assert D.to_messages(plain, "preference")[-1] == {"role": "assistant", "content": "Hello."}


def test_labels_cover_only_the_answer():
    from finetune.config import ModelConfig
    from finetune.model import load_tokenizer

    tok = load_tokenizer(ModelConfig(quantization="none"))
    pair = preference.to_pair({"chosen": [
        {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Yes indeed."}],
        "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello there."},
                     {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "No."}]})
    ex = preference.tokenize_side(tok, pair, "chosen", 512)
    trained = tok.decode([t for t in ex["labels"] if t != D.IGNORE_INDEX])
    assert trained.strip() == "Yes indeed.<|im_end|>", trained


def test_dpo_raises_reward_accuracy_and_margin(store, pref_jsonl):
    row = run_job(store, dpo_config(pref_jsonl, "dpo-arith", steps=6))
    assert row["state"] == "completed", (row["error"], store.live(row["id"])["log_tail"])
    rows = [r for r in read_metrics(row["run_dir"]) if "rewards/margins" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    first, last = rows[0], rows[-1]
    # step 1 runs before any update: policy == reference, every reward is 0
    assert first["rewards/margins"] == 0 and first["rewards/accuracies"] == 0
    late = rows[-3:]
    assert sum(r["rewards/margins"] for r in late) / 3 > 0.2, rows
    assert sum(r["rewards/accuracies"] for r in late) / 3 >= 0.75, rows
    assert sum(r["logps/chosen"] - r["logps/rejected"] for r in late) > 0, rows
    meta = json.loads((adapters_dir() / "dpo-arith" / "studio.json").read_text())
    assert meta["objective"] == "dpo" and meta["config"]["training"]["objective"] == "dpo"
    assert meta["dpo"]["beta"] == 0.1 and meta["dataset"]["format"] == "preference"
    live = store.live(row["id"])
    assert live["objective_metrics"]["rewards/accuracies"] == last["rewards/accuracies"]
    assert "rewards/margins, last logged step" in render.stats_html(live)  # the Jobs tab's numbers
    # evaluation reads preference rows as their chosen conversations
    from finetune.evaluation.evaluate import evaluate

    result = evaluate("dpo-arith", data_path=str(pref_jsonl), split="train", max_examples=2, max_new_tokens=8,
                      use_cache=False)
    assert set(result["metrics"]) == {"base", "adapter"} and len(result["examples"]) == 2


def test_dpo_continues_an_sft_adapter(store, pref_jsonl, chat_jsonl):
    sft = tiny_config(chat_jsonl, "dpo-sft-start", steps=2, learning_rate=1e-3)
    sft.lora.r, sft.lora.lora_alpha = 8, 16
    assert run_job(store, sft)["state"] == "completed"
    cfg = dpo_config(pref_jsonl, "dpo-from-sft", steps=2)
    cfg.lora.init_adapter = "dpo-sft-start"
    row = run_job(store, cfg)
    assert row["state"] == "completed", (row["error"], store.live(row["id"])["log_tail"])
    rows = [r for r in read_metrics(row["run_dir"]) if "rewards/margins" in r]
    # the SFT adapter is on from the first step, so the policy already differs from the reference (the base)
    assert rows[0]["rewards/chosen"] != 0
    saved = json.loads((adapters_dir() / "dpo-from-sft" / "adapter_config.json").read_text())
    assert saved["r"] == 8  # the continued adapter's own rank, not lora.r


def test_pair_missing_rejected_is_refused_before_training(store, tmp_path):
    from finetune.config import ModelConfig
    from finetune.model import load_tokenizer

    rows = preference_rows(4)
    del rows[2]["rejected"]
    path = write_jsonl(tmp_path / "broken.jsonl", rows)
    expected = f"{path}, line 3: rejected: missing column 'rejected'"
    cfg = dpo_config(path, "dpo-broken", steps=2)
    with pytest.raises(D.DataError, match=re.escape(expected)):  # the queue refuses it
        store.submit(cfg)
    with pytest.raises(D.DataError, match=re.escape(expected)):  # and so does the recipe's own data step
        preference.prepare(cfg.data, load_tokenizer(ModelConfig(quantization="none")))
    assert not (adapters_dir() / "dpo-broken").exists()


def test_missing_init_adapter_is_refused_at_submit(store, pref_jsonl):
    from finetune.config import ConfigError

    cfg = dpo_config(pref_jsonl, "dpo-no-start", steps=2)
    cfg.lora.init_adapter = "no-such-adapter"
    with pytest.raises(ConfigError, match="lora.init_adapter 'no-such-adapter'"):
        store.submit(cfg)
