"""The `accelerate launch` command of a training job, and the accelerate config file it reads.

The file is written into the run folder (runs/<id>/accelerate.yaml) so the command the UI shows is the whole story:
a user can run it by hand, or on another machine with `--machine_rank 1`.

    python -m accelerate.commands.launch --config_file runs/<id>/accelerate.yaml -m finetune train runs/<id>/job.yaml ...

distributed_type by case (accelerate's config keys):
  one process                 NO            (use_cpu on a host without GPUs)
  DDP over GPUs               MULTI_GPU     torchrun starts one process per GPU, NCCL
  DDP over CPU processes      MULTI_GPU + use_cpu: torchrun starts the processes, and the recipe's Accelerator(cpu=True)
                              makes each one join as MULTI_CPU over gloo. (distributed_type MULTI_CPU would make
                              accelerate start only one process and expect mpirun to start the rest.)
  FSDP                        FSDP with fsdp_version 2, decoder layers wrapped (the model's _no_split_modules)
"""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import yaml

from finetune.config import ConfigError, JobConfig, LaunchConfig

ALL_GPUS = -1  # a job's GPU need meaning "every GPU of the host" (launch.num_processes auto)
ACCELERATE_YAML = "accelerate.yaml"


def gpus_needed(cfg: JobConfig) -> int:
    """GPUs this host gives the job: its share of launch.num_processes, or ALL_GPUS for auto."""
    n = cfg.launch.num_processes
    return ALL_GPUS if n == "auto" else n // cfg.launch.num_machines


def local_processes(launch: LaunchConfig, gpus: int) -> int:
    """Processes on this machine: one per GPU admitted, or on a host without GPUs the configured count (auto = 1)."""
    if gpus > 0:
        return gpus
    n = launch.num_processes
    return 1 if n == "auto" else n // launch.num_machines


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_type(cfg: JobConfig, total: int, on_gpu: bool) -> str:
    if cfg.launch.strategy == "fsdp":
        if not on_gpu:
            raise ValueError("launch.strategy fsdp needs CUDA GPUs and this job has none: use launch.strategy ddp")
        return "FSDP"
    return "MULTI_GPU" if total > 1 else "NO"


def fsdp_config() -> dict:
    """FSDP2: each decoder layer is one shard group (accelerate takes the classes from the model's _no_split_modules),
    sharded state dicts for checkpoints. RAM-efficient loading: rank 0 alone reads the (unquantized) weights into CPU
    memory and accelerate sends each GPU its shards, so no GPU ever holds the whole model (a 4-bit model is loaded
    onto each GPU, then sharded)."""
    return {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_offload_params": False, "fsdp_activation_checkpointing": False}


def accelerate_config(cfg: JobConfig, processes_here: int, on_gpu: bool) -> dict:
    """The accelerate config file's contents for this job on this machine."""
    launch = cfg.launch
    total = processes_here * launch.num_machines
    out = {"compute_environment": "LOCAL_MACHINE", "distributed_type": _distributed_type(cfg, total, on_gpu),
           "num_processes": total, "num_machines": launch.num_machines, "machine_rank": launch.machine_rank,
           "use_cpu": not on_gpu, "gpu_ids": "all",
           "mixed_precision": "no",  # the recipe's choice (bf16 where supported), not the launcher's "dynamo_config": {},
           "downcast_bf16": "no", "main_training_function": "main", "rdzv_backend": "static", "same_network": True}
    if total > 1:
        out["main_process_ip"] = launch.main_process_ip or "127.0.0.1"
        # a port of its own: two multi-process jobs side by side on one host must not meet at accelerate's 29500
        out["main_process_port"] = launch.main_process_port or (free_port() if launch.num_machines == 1 else 29500)
    if out["distributed_type"] == "FSDP":
        out["fsdp_config"] = fsdp_config()
    return out


def check_host(cfg: JobConfig) -> None:
    """At submission: a job this host can never launch is refused with the field to change."""
    from finetune.jobs.process import host_gpus

    if cfg.launch.strategy == "fsdp" and not host_gpus():
        raise ConfigError("launch.strategy fsdp needs CUDA GPUs and this host has none: use launch.strategy ddp")


def write_accelerate_config(cfg: JobConfig, path: Path, gpus: int | None) -> None:
    from finetune.jobs.process import host_gpus

    if gpus is None:
        need = gpus_needed(cfg)
        visible = len(host_gpus())
        gpus = visible if need == ALL_GPUS or not visible else need
    path.parent.mkdir(parents=True, exist_ok=True)
    content = accelerate_config(cfg, local_processes(cfg.launch, gpus), gpus > 0)
    path.write_text(yaml.safe_dump(content, sort_keys=False), encoding="utf-8")


def train_command(job_yaml: Path, run_dir: Path, resume: bool = False, gpus: int | None = None) -> list[str]:
    """The exact command a training job runs (the UI shows it). gpus: the GPUs the scheduler admitted it with
    (None: this host's visible GPUs, the count a job started now would get). Writes run_dir/accelerate.yaml."""
    config_file = Path(run_dir) / ACCELERATE_YAML
    try:
        cfg = JobConfig.load(job_yaml)
    except ConfigError:
        cfg = None  # the command still reads as it will run; the training process reports the unreadable job.yaml
    if cfg is not None:
        write_accelerate_config(cfg, config_file, gpus)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
           "-m", "finetune", "train", str(job_yaml), "--run-dir", str(run_dir)]
    return cmd + (["--resume"] if resume else [])
