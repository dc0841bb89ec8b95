"""The sweep config: errors name the field, a trial's parameters map onto the job config, a client of the studio
cannot name files outside the allowed folders or choose the study's storage, and a driver takes no device slot."""
from __future__ import annotations

import pytest

from conftest import arithmetic_rows, tiny_config, write_jsonl
from finetune.config import ConfigError
from finetune.errors import StudioError
from finetune.sweep.config import SweepConfig, space_values, with_params


def spec(tmp_path, **over) -> dict:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(data, arithmetic_rows(8))
    base = tiny_config(data, "base").model_dump(mode="json")
    return {"base": base, "space": {"r": [4, 8]}, **over}


@pytest.mark.parametrize("over, field", [
    ({"space": {"r": [8, 2048]}}, "space.r"),
    ({"space": {"rank": [8]}}, "space.rank"),
    ({"space": {"learning_rate": {"low": 1e-2, "high": 1e-4}}}, "space.learning_rate"),
    ({"space": {"max_steps": [2], "num_train_epochs": [1.0]}}, "space"),
    ({"objective": "bleu"}, "objective"),
    ({"pruner": "threshold"}, "prune_above"),
    ({"n_trials": 0}, "n_trials"),
    ({"name": "../x"}, "name"),
])
def test_errors_name_the_field(tmp_path, over, field):
    with pytest.raises(ConfigError) as e:
        SweepConfig.parse(spec(tmp_path, **over), "sweep.yaml")
    assert "sweep.yaml" in str(e.value) and field in str(e.value), str(e.value)


def test_base_file_is_read_relative_to_the_sweep_file(tmp_path):
    tiny_config(tmp_path / "train.jsonl", "from-file").save(tmp_path / "job.yaml")
    (tmp_path / "sweep.yaml").write_text("base: job.yaml\nspace: {r: [4]}\nobjective: rouge_l\n")
    loaded = SweepConfig.load(tmp_path / "sweep.yaml")
    assert loaded.base_config().adapter_name == "from-file" and loaded.direction == "maximize"
    (tmp_path / "bad.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        SweepConfig.load(tmp_path / "bad.yaml")


def test_trial_parameters_map_onto_the_job(tmp_path):
    base = tiny_config(tmp_path / "train.jsonl", "base")
    cfg = with_params(base, {"r": 8, "lora_alpha_multiple": 2.0, "target_modules": "attention-qv",
                             "learning_rate": 1e-3, "num_train_epochs": 2.0}, "base-t3")
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.target_modules) == (8, 16, ["q_proj", "v_proj"])
    assert (cfg.training.learning_rate, cfg.training.num_train_epochs, cfg.training.max_steps) == (1e-3, 2.0, -1)
    assert cfg.adapter_name == "base-t3"
    s = SweepConfig.parse(spec(tmp_path, space={"learning_rate": {"low": 1e-4, "high": 1e-2}, "r": [4, 8]}))
    assert space_values(s.space) == [("learning_rate", 1e-4), ("learning_rate", 1e-2), ("r", 4), ("r", 8)]


def test_a_studio_client_is_held_to_the_policy(tmp_path, monkeypatch):
    import yaml

    from finetune import sweep
    from finetune.jobs.store import JobStore

    monkeypatch.setenv("STUDIO_CONFINED", "1")
    store = JobStore(tmp_path / "home", reconcile=False)
    with pytest.raises(StudioError, match="base: not a path this studio may read"):
        sweep.submit(store, "base: /etc/passwd\n")
    with pytest.raises(ConfigError, match="storage"):
        sweep.submit(store, yaml.safe_dump({**spec(tmp_path), "storage": "sqlite:////tmp/elsewhere.db"}))
    assert store.list_jobs() == []


def test_a_sweep_driver_takes_no_slot(tmp_path):
    from finetune.jobs.store import JobStore

    store = JobStore(tmp_path / "home", reconcile=False, max_concurrent=1, gpus=())
    sweep_id = store.submit(SweepConfig.parse(spec(tmp_path)), kind="sweep")
    train_id = store.submit(tiny_config(tmp_path / "train.jsonl", "other", steps=1))
    assert store.scheduler._slot(store.get(sweep_id)) is False
    try:
        launched = store.tick()
        assert set(launched) == {sweep_id, train_id}  # one CPU slot, and both start: the driver does not hold it
    finally:
        for job_id in (sweep_id, train_id):
            if store.get(job_id)["state"] in ("queued", "running"):
                store.cancel(job_id, grace_s=5)


def test_a_lost_driver_is_queued_again_and_a_lost_trainer_is_not(tmp_path):
    import subprocess

    from finetune.jobs.store import JobStore

    store = JobStore(tmp_path / "home", reconcile=False, gpus=())
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid whose process has ended: the job's process is lost
    ids = {"sweep": store.submit(SweepConfig.parse(spec(tmp_path)), kind="sweep"),
           "train": store.submit(tiny_config(tmp_path / "train.jsonl", "lost", steps=1))}
    for job_id in ids.values():
        store.claim(job_id, "")
        store.launched(job_id, gone.pid, gone.pid, "lost", None)
    store.reconcile()
    sweep_row, train_row = store.get(ids["sweep"]), store.get(ids["train"])
    assert (sweep_row["state"], sweep_row["resume"]) == ("queued", 1)
    assert train_row["state"] == "failed"
    store.cancel(ids["sweep"])


def test_the_sweep_panel_builds_a_valid_sweep_from_the_train_form():
    import gradio as gr

    from app import sweep_panel, train_tab

    with gr.Blocks():
        train = train_tab.build()
        ui = sweep_panel.build(train.form)
    values = {c: c.value for c in train.form.components()}
    values.update({c: c.value for c in (ui.lr_low, ui.lr_high, ui.r, ui.alpha, ui.steps, ui.dropout, ui.batch,
                                        ui.targets, ui.n_trials, ui.timeout, ui.objective, ui.sampler, ui.pruner,
                                        ui.report_every)})
    values[ui.steps], values[ui.targets] = [25, 50], ["attention"]
    spec = SweepConfig.parse(sweep_panel.sweep_spec(train.form, values, ui), "panel")
    assert spec.base_config() == train.form.to_config(values)  # the base is the form's job, unchanged
    assert spec.space.max_steps == [25, 50] and spec.space.target_modules == ["attention"]
    assert spec.space.r == [8, 16, 32] and spec.space.learning_rate.low == 1e-4 and spec.timeout == 1800
