"""SFTRecipe's pieces on their own: one optimizer step over micro-batches equals the step over the same examples in one
batch (the loss is normalised by the label tokens of the whole step), on a tiny random Llama built by the benchmark."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def recipe_for(model_dir):
    from finetune.config import JobConfig
    from finetune.recipe import recipe_class

    config = JobConfig.parse({"model": {"name_or_path": str(model_dir), "quantization": "none", "torch_dtype": "float32"},
                              "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
                              "training": {"max_steps": 1, "gradient_checkpointing": False, "seed": 3,
                                           "lr_scheduler_type": "constant", "warmup_ratio": 0.0},
                              "evaluation": {"enabled": False}})
    recipe = recipe_class(config.training.objective)(config)  # no run folder: nothing is written
    recipe.setup(data=False)
    return recipe


def test_train_step_over_micro_batches_equals_one_batch(tmp_path):
    from finetune.bench.models import build_model, make_batches

    model_dir = build_model("tiny", tmp_path / "models")
    examples = make_batches(24, 4, 1, 512, seed=1)[0]
    for e, n in zip(examples, (24, 10, 17, 5)):  # uneven lengths: micro-batches carry different label counts
        e["input_ids"], e["labels"] = e["input_ids"][:n], e["labels"][:n]
    whole, split = recipe_for(model_dir), recipe_for(model_dir)
    one = whole.train_step([whole.collate(examples)])
    two = split.train_step([split.collate(examples[:1]), split.collate(examples[1:])])
    assert two.loss == pytest.approx(one.loss, rel=1e-5)
    assert two.grad_norm == pytest.approx(one.grad_norm, rel=1e-4)
    assert two.tokens == one.tokens == 24 + 10 + 17 + 5
    after_one = {n: p.detach().clone() for n, p in whole.model.named_parameters() if p.requires_grad}
    after_two = {n: p.detach() for n, p in split.model.named_parameters() if p.requires_grad}
    assert after_one.keys() == after_two.keys() and after_one
    assert all(torch.allclose(after_one[n], after_two[n], atol=1e-6) for n in after_one)


def test_the_heap_is_frozen_only_while_training():
    """Training runs with the objects alive at its start frozen (a full collection skips them); afterwards they are
    unfrozen, so a model dropped then (the evaluator loads its own copy) has its reference cycles collected."""
    import gc
    import weakref

    from finetune.recipe.sft import frozen_heap

    class Node:
        pass

    a = Node()
    a.me = a  # a reference cycle, as a module holding its own bound forward has
    ref = weakref.ref(a)
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        del a
        gc.collect()
        assert ref() is not None
    gc.collect()
    assert gc.get_freeze_count() == 0 and ref() is None


def test_the_run_micro_batches_and_their_positions_are_what_training_collates(tmp_path):
    """The offload pins host memory for the run's largest micro-batch before the first step. It reads the run's
    micro-batches over every epoch the run will see, and counts each one's token positions as collate() makes
    them, padded (CPU) or packed (GPU)."""
    import math

    from finetune import data as D
    from finetune.bench.models import build_model, make_batches
    from finetune.bench.recipe_arm import write_data
    from finetune.config import JobConfig
    from finetune.recipe.sft import SFTRecipe, run_micro_batches

    model_dir = build_model("tiny", tmp_path / "models")
    write_data(tmp_path / "data.jsonl", make_batches("var", 4, 6, 512, seed=2))
    config = JobConfig.parse({
        "model": {"name_or_path": str(model_dir), "quantization": "none", "torch_dtype": "float32"},
        "data": {"path": str(tmp_path / "data.jsonl"), "format": "text", "validation_split": 0.0,
                 "max_seq_length": 512},
        "training": {"max_steps": 7, "per_device_train_batch_size": 3, "gradient_accumulation_steps": 2,
                     "gradient_checkpointing": False},
        "evaluation": {"enabled": False}})
    recipe = SFTRecipe(config)
    recipe.setup()
    epochs = math.ceil(recipe.total_steps / recipe.steps_per_epoch)
    assert epochs == 2  # 24 rows, 8 micro-batches, 4 steps an epoch: the second epoch's shuffle counts too
    batches = list(run_micro_batches(recipe))
    assert batches == [[recipe.train_examples[i] for i in idx]
                       for epoch in range(epochs) for group in recipe.epoch_groups(epoch) for idx in group]
    assert len(list(run_micro_batches(recipe, epoch_limit=1))) == len(batches) // 2 == 8
    pad = recipe.tokenizer.pad_token_id
    for padding_free in (False, True):
        recipe.padding_free = padding_free
        collated = [D.collate(b, pad, padding_free=padding_free) for b in batches]
        assert [recipe.micro_batch_positions(b) for b in batches] == [c["input_ids"].numel() for c in collated]
    assert len({recipe.micro_batch_positions(b) for b in batches}) > 1  # the batches differ: the largest matters


def test_dpo_micro_batch_positions_count_its_collated_pairs(tmp_path):
    from finetune.bench.models import build_model, make_batches
    from finetune.config import JobConfig
    from finetune.recipe.dpo import DPORecipe

    model_dir = build_model("tiny", tmp_path / "models")
    config = JobConfig.parse({"model": {"name_or_path": str(model_dir), "quantization": "none",
                                        "torch_dtype": "float32"},
                              "training": {"objective": "dpo", "max_steps": 1, "gradient_checkpointing": False},
                              "evaluation": {"enabled": False}})
    recipe = DPORecipe(config)
    recipe.setup(data=False)
    rows = make_batches("var", 6, 1, 512, seed=4)[0]
    pairs = [{"chosen": rows[i], "rejected": rows[i + 3]} for i in range(3)]
    assert recipe.micro_batch_positions(pairs) == recipe.collate(pairs)["input_ids"].numel()
