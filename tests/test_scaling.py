"""One job over several processes through accelerate: real DDP over 2 CPU processes (gloo) through the job queue,
compared with one process taking the same global batch; the launch command and its accelerate config; GPU admission
by a given device inventory; resume refused for another world size; two machine ranks over loopback."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import tiny_config
from finetune.config import ConfigError, JobConfig
from finetune.jobs.launch import ALL_GPUS, ACCELERATE_YAML, accelerate_config, gpus_needed, train_command
from finetune.jobs.process import host_gpus
from finetune.jobs.scheduler import admit
from finetune.jobs.store import JobStore
from finetune.paths import adapters_dir

# fp32 on CPU, dropout 0, same seeds: two ranks of batch 2 against one process of batch 4 differ only by the order
# of floating-point sums (padding per rank, the gradient all-reduce), measured at ~1e-7 on the weights.
WEIGHT_TOLERANCE = 1e-5
LOSS_TOLERANCE = 1e-5


def equal_batch_config(data: Path, name: str, processes: int, batch: int, **launch) -> JobConfig:
    cfg = tiny_config(data, name, steps=2, learning_rate=1e-3, lr_scheduler_type="constant", save_steps=1,
                      per_device_train_batch_size=batch)
    cfg.lora.lora_dropout = 0.0
    cfg.model.torch_dtype = "float32"
    data_ = cfg.model_dump(mode="json")
    data_["launch"] = {"num_processes": processes, **launch}
    return JobConfig.parse(data_, name)


def metric_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def adapter_weights(name: str) -> dict:
    return load_file(str(adapters_dir() / name / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, chat_jsonl):
    """The same global batch (4) trained by 2 CPU processes x 2 and by 1 process x 4, through one job queue."""
    store = JobStore(tmp_path_factory.mktemp("scale-home"), gpus=())
    ids = {"ddp": store.submit(equal_batch_config(chat_jsonl, "scale-ddp2", 2, 2)),
           "one": store.submit(equal_batch_config(chat_jsonl, "scale-one", 1, 4))}
    rows = {k: store.wait(v, timeout=900) for k, v in ids.items()}
    for row in rows.values():
        assert row["state"] == "completed", (Path(row["run_dir"]) / "train.log").read_text()[-3000:]
    return {k: Path(r["run_dir"]) for k, r in rows.items()}, rows


def test_two_process_job_matches_one_process_with_the_same_global_batch(runs):
    dirs, rows = runs
    assert "--config_file" in rows["ddp"]["command"] and str(dirs["ddp"] / ACCELERATE_YAML) in rows["ddp"]["command"]
    acc = yaml.safe_load((dirs["ddp"] / ACCELERATE_YAML).read_text())
    assert (acc["distributed_type"], acc["num_processes"], acc["use_cpu"]) == ("MULTI_GPU", 2, True)
    two, one = adapter_weights("scale-ddp2"), adapter_weights("scale-one")
    assert two.keys() == one.keys() and two
    diff = max(float((two[k] - one[k]).abs().max()) for k in two)
    moved = max(float(one[k].abs().max()) for k in one if "lora_B" in k)
    assert moved > 100 * WEIGHT_TOLERANCE  # the adapters did train: the comparison is not between zeros
    assert diff < WEIGHT_TOLERANCE, diff
    meta = json.loads((adapters_dir() / "scale-ddp2" / "studio.json").read_text())
    assert meta["num_processes"] == 2 and meta["strategy"] == "ddp"


def test_logged_loss_is_the_average_over_ranks(runs):
    dirs, _ = runs
    two, one = metric_rows(dirs["ddp"]), metric_rows(dirs["one"])
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2]
    for r2, r1 in zip(two, one):
        assert r2["num_processes"] == 2 and len(r2["rank_loss"]) == 2 and "rank_loss" not in r1
        weights = r2["rank_label_tokens"]
        mean = sum(loss * n for loss, n in zip(r2["rank_loss"], weights)) / sum(weights)
        assert abs(r2["loss"] - mean) < LOSS_TOLERANCE
        assert r2["rank_loss"][0] != r2["rank_loss"][1]  # two ranks with different data
        assert abs(r2["loss"] - r1["loss"]) < LOSS_TOLERANCE  # the one-process loss of the same global batch
        assert len(r2["rank_memory_mb"]) == 2 and all(m > 0 for m in r2["rank_peak_memory_mb"])
    status = json.loads((dirs["ddp"] / "status.json").read_text())
    assert len(status["rank_peak_memory_mb"]) == 2


def test_resume_with_another_world_size_is_refused(runs):
    from accelerate import Accelerator

    from finetune.recipe.checkpoints import TrainError, load_latest

    dirs, _ = runs
    with pytest.raises(TrainError, match=r"written by 2 processes.*launch.num_processes 2"):
        load_latest(Accelerator(cpu=True), dirs["ddp"])


def test_resume_with_the_same_world_size_continues_exactly(runs, tmp_path):
    """The 2-process run's checkpoint of step 1, resumed by 2 processes: step 2 and the adapter as without the stop."""
    import os
    import shutil

    dirs, _ = runs
    run_dir = tmp_path / "resumed"
    shutil.copytree(dirs["ddp"] / "checkpoints" / "checkpoint-1", run_dir / "checkpoints" / "checkpoint-1")
    cfg = JobConfig.load(dirs["ddp"] / "job.yaml")
    cfg.adapter_name = "scale-ddp2-resumed"
    cfg.save(run_dir / "job.yaml")
    proc = subprocess.run(train_command(run_dir / "job.yaml", run_dir, resume=True, gpus=0), env=dict(os.environ),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "resumed from checkpoint-1" in proc.stderr
    (again,), first = metric_rows(run_dir), metric_rows(dirs["ddp"])
    assert again["step"] == 2 and abs(again["loss"] - first[1]["loss"]) < LOSS_TOLERANCE
    resumed, straight = adapter_weights("scale-ddp2-resumed"), adapter_weights("scale-ddp2")
    assert max(float((resumed[k] - straight[k]).abs().max()) for k in straight) < WEIGHT_TOLERANCE


def test_gpu_jobs_get_free_gpus_from_the_inventory(tmp_path, chat_jsonl):
    gpus = ["0", "1", "2", "3"]
    store = JobStore(tmp_path / "home", gpus=tuple(gpus))
    ids = [store.submit(equal_batch_config(chat_jsonl, f"inv-{i}", n, 2)) for i, n in enumerate(("auto", 2, 1, 1))]
    needs = [store.scheduler._need(store.get(i)) for i in ids]
    assert needs == [4, 2, 1, 1]  # auto: every GPU of the host, resolved at admission
    running = [("0",)]
    assert admit(list(zip(ids, needs)), running, gpus) == []  # auto waits for all four
    got = admit(list(zip(ids[1:], needs[1:])), running, gpus)
    assert [a.devices for a in got] == [("1", "2"), ("3",)]  # the 2-GPU job, then a single one beside it
    assert gpus_needed(equal_batch_config(chat_jsonl, "x", "auto", 2)) == ALL_GPUS


def test_launch_command_and_accelerate_config(tmp_path, chat_jsonl):
    cfg = equal_batch_config(chat_jsonl, "cmd", 4, 2, strategy="fsdp")
    assert cfg.model.bnb_4bit_quant_storage == "uint8"  # unquantized: nothing to store
    fsdp = accelerate_config(cfg, 4, on_gpu=True)
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
    assert fsdp["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is True  # no GPU ever holds the whole model
    assert fsdp["main_process_port"] and not fsdp["use_cpu"]
    with pytest.raises(ValueError, match="launch.strategy fsdp needs CUDA"):
        accelerate_config(cfg, 4, on_gpu=False)
    if not host_gpus():  # a host without GPUs refuses an FSDP job at submission
        with pytest.raises(ConfigError, match="launch.strategy fsdp needs CUDA"):
            JobStore(tmp_path / "home").submit(cfg)
    ddp = accelerate_config(equal_batch_config(chat_jsonl, "cmd", 2, 2), 2, on_gpu=True)
    assert (ddp["distributed_type"], ddp["num_processes"]) == ("MULTI_GPU", 2)
    cfg.save(tmp_path / "job.yaml")
    cmd = train_command(tmp_path / "job.yaml", tmp_path / "run", gpus=4)
    assert cmd[cmd.index("--config_file") + 1] == str(tmp_path / "run" / ACCELERATE_YAML)
    assert yaml.safe_load((tmp_path / "run" / ACCELERATE_YAML).read_text())["num_processes"] == 4


def test_launch_validation_names_the_field():
    q4 = JobConfig.parse({"launch": {"strategy": "fsdp"}, "model": {"quantization": "4bit"}})
    assert q4.model.bnb_4bit_quant_storage == "bfloat16"  # set for FSDP, said in the field's help
    cases = {"launch.strategy fsdp cannot shard 8-bit": {"launch": {"strategy": "fsdp"},
                                                         "model": {"quantization": "8bit"}},
             "launch.main_process_ip": {"launch": {"num_machines": 2}},
             "launch.num_processes 'x'": {"launch": {"num_processes": "x"}},
             "launch.machine_rank 2": {"launch": {"num_machines": 2, "machine_rank": 2, "main_process_ip": "h"}},
             "launch.strategy fsdp does not run distillation": {"launch": {"strategy": "fsdp"},
                                                                "training": {"objective": "distill"},
                                                                "distill": {"teacher_model_name_or_path": "t"}}}
    for message, data in cases.items():
        with pytest.raises(ConfigError, match=message):
            JobConfig.parse(data)


@pytest.mark.slow
def test_two_machine_ranks_over_loopback(tmp_path, chat_jsonl, runs):
    """Two `accelerate launch`es of one job, machine_rank 0 and 1 on one host: the adapter equals the 2-process one."""
    import os

    from finetune.jobs.launch import free_port

    port, procs = free_port(), []
    for rank in (0, 1):
        cfg = equal_batch_config(chat_jsonl, "scale-nodes", 2, 2, num_machines=2, machine_rank=rank,
                                 main_process_ip="127.0.0.1", main_process_port=port)
        run_dir = tmp_path / f"machine{rank}"
        run_dir.mkdir()
        cfg.save(run_dir / "job.yaml")
        procs.append(subprocess.Popen(train_command(run_dir / "job.yaml", run_dir, gpus=0), env=dict(os.environ),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    try:
        outs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert not (tmp_path / "machine1" / "metrics.jsonl").exists()  # one writer: machine_rank 0
    nodes, ddp = adapter_weights("scale-nodes"), adapter_weights("scale-ddp2")
    assert max(float((nodes[k] - ddp[k]).abs().max()) for k in ddp) < WEIGHT_TOLERANCE


@pytest.fixture(scope="module")
def random_1b(tmp_path_factory):
    from finetune.bench.models import build_model

    return build_model("llama-3.2-1b", tmp_path_factory.mktemp("models"))


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_fsdp_job_on_one_gpu(tmp_path, random_1b, quantization):
    """FSDP2 through the job queue on one GPU (the code path of a sharded run: wrapping, the adapter gathered from
    its shards, a sharded checkpoint), LoRA and QLoRA on a random Llama-3.2-1B shape."""
    from conftest import write_jsonl

    rows = [{"text": " ".join(f"t{(i * 7 + j) % 500}" for j in range(48))} for i in range(32)]
    data = write_jsonl(tmp_path / "text.jsonl", rows)
    cfg = JobConfig.parse({
        "adapter_name": f"fsdp-{quantization}", "model": {"name_or_path": str(random_1b), "quantization": quantization,
                                                          "torch_dtype": "bfloat16"},
        "data": {"path": str(data), "format": "text", "max_seq_length": 64, "validation_split": 0.0},
        "training": {"max_steps": 3, "per_device_train_batch_size": 2, "save_steps": 2, "warmup_ratio": 0.0},
        "evaluation": {"enabled": False}, "launch": {"num_processes": 1, "strategy": "fsdp"}})
    assert cfg.model.bnb_4bit_quant_storage == ("bfloat16" if quantization == "4bit" else "uint8")
    store = JobStore(tmp_path / "home")
    row = store.wait(store.submit(cfg), timeout=600)
    run_dir = Path(row["run_dir"])
    log = (run_dir / "train.log").read_text()
    assert row["state"] == "completed", log[-4000:]
    assert yaml.safe_load((run_dir / ACCELERATE_YAML).read_text())["distributed_type"] == "FSDP"
    assert "speed-ups: off under launch.strategy fsdp" in log
    weights = adapter_weights(cfg.adapter_name)
    assert weights and all(bool(t.isfinite().all()) for t in weights.values())
    assert max(float(t.abs().max()) for k, t in weights.items() if "lora_B" in k) > 0  # trained
    meta = json.loads((adapters_dir() / cfg.adapter_name / "studio.json").read_text())
    assert meta["strategy"] == "fsdp" and meta["num_processes"] == 1 and meta["speedups"] == []


def test_memory_plan_suggests_fsdp_when_one_gpu_is_too_small():
    from finetune.plan import Device, estimate

    small = 2**28  # 256 MiB GPUs: SmolLM2-135M in fp32 with its optimizer does not fit one
    cfg = JobConfig.parse({"model": {"quantization": "none"}})
    notes = estimate(cfg, Device(kind="cuda", memory_bytes=small, name="small", gpus=(small, small)), suggest=False).notes
    assert any("launch.strategy fsdp shards the model across the 2 GPUs" in n for n in notes)
    one = estimate(cfg, Device(kind="cuda", memory_bytes=small, name="small", gpus=(small,)), suggest=False).notes
    assert not any("fsdp" in n for n in one)  # nothing to shard across
    # the suggestion comes with its own estimate: each GPU's share under FSDP
    two = estimate(cfg, Device(kind="cuda", memory_bytes=small, name="small", gpus=(small, small)))
    (row,) = [r for r in two.suggestions if r["set"].get("launch.strategy") == "fsdp"]
    assert row["set"]["launch.num_processes"] == 2 and row["needed_gib"] < two.summary()["needed_gib"]
    sharded = estimate(JobConfig.parse({"model": {"quantization": "none"}, "launch": {"strategy": "fsdp"}}),
                       Device(kind="cuda", memory_bytes=small, name="small", gpus=(small, small)), suggest=False)
    assert sharded.breakdown["fsdp_unsharded"] > 0 and any("FSDP over 2 processes" in n for n in sharded.notes)


def test_fast_checkpoint_under_ddp_gives_the_plain_gradients(tmp_path):
    """The GPU fast path's reentrant checkpoint under DistributedDataParallel (2 CPU processes, gloo; gradient
    accumulation with no_sync): the all-reduced LoRA gradients equal those of torch's non-reentrant checkpoint."""
    import os
    import sys

    from finetune.bench.models import build_model

    model = build_model("tiny", tmp_path / "models")
    worker = Path(__file__).parent / "ddp_checkpoint_worker.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker),
                           str(model)], env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["layers"] == 2 and result["tensors"] > 0 and result["grad_norm"] > 0
    assert result["max_diff"] < 1e-6 and result["across_ranks"] == 0.0


def test_fsdp_shards_gather_into_the_adapter(tmp_path):
    """The FSDP save path on 2 CPU processes: LoRA tensors sharded by torch's fully_shard come back whole, equal to
    the unsharded ones, and peft saves them under the adapter's names. (accelerate's FSDP itself needs CUDA.)"""
    import os
    import sys

    from finetune.bench.models import build_model

    model = build_model("tiny", tmp_path / "models")
    worker = Path(__file__).parent / "fsdp_gather_worker.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker),
                           str(model), str(tmp_path / "adapter")], env=dict(os.environ), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["sharded"] == "DTensor" and result["same_names"] and result["tensors"] == result["saved"] > 0
    assert result["max_diff"] == 0.0
