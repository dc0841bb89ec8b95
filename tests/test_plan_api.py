"""/plan_job on a real studio (one server for the module), through gradio_client."""
from __future__ import annotations

import json

import pytest
from gradio_client import Client

from finetune.bench.models import SHAPES
from finetune.config import JobConfig
from tests.studio_server import as_json, running_studio


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    folder = models / "llama-3.2-1b-shape"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SHAPES["llama-3.2-1b"]), encoding="utf-8")
    home = tmp_path_factory.mktemp("plan-studio")
    with running_studio(home, "--allow-path", str(models)) as (url, proc, log):
        yield Client(url, verbose=False), folder, tmp_path_factory.mktemp("outside")


def yaml_for(name_or_path: str, **training) -> str:
    return JobConfig(adapter_name="plan-api", model={"name_or_path": name_or_path, "quantization": "4bit"},
                     data={"max_seq_length": 2048}, training=training or {}).to_yaml()


def test_plan_job_for_a_config_folder(studio):
    client, folder, _ = studio
    plan = as_json(client.predict(yaml_for(str(folder)), 40, "cuda", api_name="/plan_job"))
    assert plan["fits"] is True and plan["device_memory_gib"] == 40 and plan["device"]["kind"] == "cuda"
    assert plan["model"]["hidden_size"] == 2048 and plan["model"]["layers"] == 16
    assert plan["breakdown"]["base_weights"] > 0 and plan["tokens_per_micro_batch"] == 4 * 2048
    small = as_json(client.predict(yaml_for(str(folder), per_device_train_batch_size=8), 3, "cuda",
                                   api_name="/plan_job"))
    assert small["fits"] is False
    assert small["suggestions"] and small["suggestions"][0]["fits"]
    assert small["suggestions"][0]["needed_gib"] <= 3
    here = as_json(client.predict(yaml_for(str(folder)), 0, "", api_name="/plan_job"))  # the studio's own device
    assert here["device"]["kind"] in ("cuda", "cpu") and here["device_memory_gib"] > 0


def test_plan_job_refuses_what_it_cannot_plan(studio):
    client, _, outside = studio
    (outside / "config.json").write_text(json.dumps(SHAPES["tiny"]), encoding="utf-8")
    with pytest.raises(Exception, match="model.name_or_path"):
        client.predict(yaml_for(str(outside)), 0, "", api_name="/plan_job")
    with pytest.raises(Exception, match="config_yaml is empty"):
        client.predict("", 0, "", api_name="/plan_job")
    with pytest.raises(Exception, match="training.per_device_train_batch_size"):
        client.predict("training:\n  per_device_train_batch_size: 0\n", 0, "", api_name="/plan_job")
    with pytest.raises(Exception, match="device must be"):
        client.predict(yaml_for("SmolLM2-135M-Instruct"), 0, "<tpu>", api_name="/plan_job")
