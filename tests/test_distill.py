"""Distillation (training.objective distill) on the real SmolLM2: a teacher that is a trained r=64 adapter on the
base, a fresh r=4 student distilled from it through the job queue ends closer to the teacher than the base is
(held-out KL and ROUGE-L against the teacher's answers); teachers that do not exist or do not share the student's
tokenizer are refused before training, naming the field."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import scheduled_store, tiny_config, wait_for
from finetune.config import ConfigError
from finetune.jobs.store import JobStore
from finetune.paths import adapters_dir, runs_dir
from finetune.recipe.distill import chunk_losses

DEADLINE = 900
TEACHER = "distill-teacher64"
FIELD = "distill.teacher_model_name_or_path"


@pytest.fixture(scope="module")
def store(studio_home):
    with scheduled_store(studio_home) as s:
        yield s


@pytest.fixture(scope="module")
def teacher(chat_jsonl) -> str:
    """One domain adapter (r=64) trained on the arithmetic data, shared by the module's tests."""
    from finetune.recipe import run

    if not (adapters_dir() / TEACHER / "adapter_model.safetensors").exists():
        cfg = tiny_config(chat_jsonl, TEACHER, steps=8, learning_rate=3e-3, per_device_train_batch_size=4)
        cfg.lora.r, cfg.lora.lora_alpha = 64, 64
        run(cfg, runs_dir() / f"test-{TEACHER}")
    return TEACHER


def student_config(chat_jsonl, name: str, steps: int, **distill):
    cfg = tiny_config(chat_jsonl, name, steps, objective="distill", learning_rate=3e-3, per_device_train_batch_size=4)
    cfg.lora.r, cfg.lora.lora_alpha = 4, 8
    cfg.distill.teacher_model_name_or_path = f"adapter:{TEACHER}"
    cfg.distill.chunk_size = 32
    for k, v in distill.items():
        setattr(cfg.distill, k, v)
    return cfg


def run_job(store: JobStore, cfg) -> dict:
    job_id = store.submit(cfg)
    return wait_for(lambda: (r := store.get(job_id))["state"] in ("completed", "failed", "cancelled") and r,
                    DEADLINE, f"job {cfg.adapter_name} to finish", interval=0.5)


def test_chunked_loss_matches_the_whole():
    torch.manual_seed(0)
    s_head, t_head = torch.nn.Linear(8, 11, bias=False), torch.nn.Linear(8, 11, bias=False)
    hs, ht, targets = torch.randn(7, 8), torch.randn(7, 8), torch.randint(0, 11, (7,))
    whole = chunk_losses(s_head, t_head, hs, ht, targets, 11, 2.0)
    parts = chunk_losses(s_head, t_head, hs[:3], ht[:3], targets[:3], 11, 2.0) + \
        chunk_losses(s_head, t_head, hs[3:], ht[3:], targets[3:], 11, 2.0)
    assert torch.allclose(whole, parts, atol=1e-5)
    t_logp = torch.log_softmax(t_head(ht) / 2.0, -1)
    kl = torch.nn.functional.kl_div(torch.log_softmax(s_head(hs) / 2.0, -1), t_logp, log_target=True, reduction="sum")
    assert torch.allclose(whole[1], kl, atol=1e-5)
    assert chunk_losses(t_head, t_head, ht, ht, targets, 11, 2.0)[1].abs() < 1e-5


def test_student_ends_closer_to_the_teacher_than_the_base(store, teacher, chat_jsonl):
    cfg = student_config(chat_jsonl, "distill-student4", steps=6)
    cfg.data.validation_path = str(chat_jsonl.parent / "heldout.jsonl")
    cfg.evaluation.enabled, cfg.evaluation.max_examples, cfg.evaluation.max_new_tokens = True, 6, 16
    row = run_job(store, cfg)
    assert row["state"] == "completed", (row["error"], store.live(row["id"])["log_tail"])
    meta = json.loads((adapters_dir() / "distill-student4" / "studio.json").read_text())
    assert meta["objective"] == "distill" and meta["teacher"]["adapter"] == TEACHER
    assert meta["teacher"]["model"] == "SmolLM2-135M-Instruct" and meta["distill"]["alpha"] == 0.5
    models = meta["distill_eval"]["models"]
    print(json.dumps(models, indent=1))
    assert models["teacher"]["kl_to_teacher"] == 0 and models["teacher"]["rouge_l_vs_teacher"] == 1
    assert models["student"]["kl_to_teacher"] < models["base"]["kl_to_teacher"]
    assert models["student"]["rouge_l_vs_teacher"] > models["base"]["rouge_l_vs_teacher"]
    assert set(meta["eval"]["metrics"]) == {"base", "adapter"}  # the usual base-vs-adapter evaluation too
    for side in ("teacher", "student", "base"):
        assert models[side]["tokens_per_second"] > 0 and models[side]["latency_s"] > 0
    # the Adapters tab shows the three side by side (escaped)
    from app import adapters_tab, render

    html = adapters_tab.provenance_html(meta)
    assert f"teacher: {TEACHER}" in html and "student: distill-student4" in html and "adapter:" in html
    hostile = {"models": {"teacher": {"model": "<script>x</script>", "tokens_per_second": 1.0}}, "data": {}}
    assert "<script>" not in render.distill_eval_html(hostile)
    rows = [r for r in json.loads("[" + ",".join(open(f"{row['run_dir']}/metrics.jsonl")) + "]") if "loss" in r]
    assert all(r["distill/kl"] >= 0 for r in rows) and len(rows) == 6


def test_sequence_level_distillation_trains_on_the_teachers_answers(store, teacher, chat_jsonl):
    cfg = student_config(chat_jsonl, "distill-seqkd", steps=1, seq_kd=True, max_new_tokens=16)
    cfg.data.max_samples = 4
    row = run_job(store, cfg)
    assert row["state"] == "completed", (row["error"], store.live(row["id"])["log_tail"])
    meta = json.loads((adapters_dir() / "distill-seqkd" / "studio.json").read_text())
    assert meta["dataset"]["answers"] == "written by the teacher (seq_kd)" and meta["distill"]["seq_kd"] is True


def test_distillation_over_two_processes_matches_one(store, teacher, chat_jsonl):
    """DDP over 2 CPU processes (gloo): the student's pass goes through the DDP wrapper, so its LoRA gradients are
    all-reduced; the adapter equals a 1-process run of the same global batch (4 rows a step)."""
    from safetensors.torch import load_file

    def config(name: str, processes: int, batch: int):
        cfg = student_config(chat_jsonl, name, steps=2)
        cfg.training.per_device_train_batch_size, cfg.training.lr_scheduler_type = batch, "constant"
        cfg.lora.lora_dropout, cfg.model.torch_dtype = 0.0, "float32"
        cfg.launch.num_processes = processes
        return cfg

    for name, processes, batch in (("distill-ddp2", 2, 2), ("distill-one", 1, 4)):
        row = run_job(store, config(name, processes, batch))
        assert row["state"] == "completed", row["error"]
    two, one = (load_file(str(adapters_dir() / n / "adapter_model.safetensors")) for n in ("distill-ddp2", "distill-one"))
    assert two.keys() == one.keys() and two
    assert max(float(one[k].abs().max()) for k in one if "lora_B" in k) > 1e-3  # the student did train
    diff = torch.cat([(two[k] - one[k]).abs().flatten() for k in two])
    # Adam's first steps move each weight by about the learning rate whatever its gradient's size, so the few
    # weights whose gradient is ~0 carry the two runs' rounding differences; an unsynchronised run differs everywhere
    assert float(diff.mean()) < 1e-7 and float((diff > 1e-5).float().mean()) < 1e-3, float(diff.max())
    meta = json.loads((adapters_dir() / "distill-ddp2" / "studio.json").read_text())
    assert meta["num_processes"] == 2 and meta["objective"] == "distill"


@pytest.mark.parametrize("spec", ["adapter:no-such-teacher", "/nonexistent/teacher-model"])
def test_a_teacher_that_does_not_exist_is_refused_at_submit(store, chat_jsonl, spec):
    cfg = student_config(chat_jsonl, "distill-missing", steps=1)
    cfg.distill.teacher_model_name_or_path = spec
    with pytest.raises(ConfigError, match=FIELD):
        store.submit(cfg)


def test_a_teacher_with_another_tokenizer_is_refused_before_training(chat_jsonl, tmp_path):
    from finetune.config import ModelConfig
    from finetune.model import load_tokenizer, resolve_model
    from finetune.recipe.checkpoints import TrainError
    from finetune.recipe.distill import DistillRecipe

    folder = tmp_path / "other-tokenizer"
    folder.mkdir()
    shutil.copy(resolve_model("SmolLM2-135M-Instruct") + "/config.json", folder)
    tok = load_tokenizer(ModelConfig())
    tok.add_tokens(["<unseen-a>", "<unseen-b>"])
    tok.save_pretrained(folder)
    cfg = student_config(chat_jsonl, "distill-badtok", steps=1)
    cfg.distill.teacher_model_name_or_path = str(folder)
    recipe = DistillRecipe(cfg, tmp_path / "run")
    with pytest.raises(TrainError, match=f"{FIELD} .*tokenizer differs"):
        recipe.setup()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
