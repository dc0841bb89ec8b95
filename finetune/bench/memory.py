"""Measured peak memory of real training steps against the memory plan (finetune/plan.py).

    python -m finetune.bench.memory --out DIR [--models DIR] [--groups 1b-lora,8b-qlora,...] [--steps 2]

Each group (a shape, a quantization, LoRA dropout, checkpointing, optimizer) runs in its own process, all at once
on one GPU (each process has its own caching allocator, so the peaks do not mix): the model is loaded once through
the studio's own path (finetune.model.load_model / apply_lora, finetune.recipe.speed.patch_model_for_speed, the optimizer
SFTRecipe builds, the padding-free collate and the same forward/backward call), then every (max_seq_length, batch)
case trains `steps` full steps with every example at full length. Per case: torch.cuda.max_memory_allocated and
max_memory_reserved over those steps. Results: DIR/results.jsonl (one line per case, with the job config's --set
list, so the plan of the same JobConfig can be computed anywhere), DIR/context.json (device, library versions, the
CUDA context: device memory in use minus what the allocator reserved) and DIR/workers.log.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# name: (shape, overrides of the job config, [(max_seq_length, batch), ...] in increasing size)
LONG = [(512, 1), (2048, 1), (512, 8), (2048, 2), (2048, 4), (8192, 1), (4096, 4), (8192, 2), (8192, 8)]
GROUPS: dict[str, tuple[str, list[str], list[tuple[int, int]]]] = {
    "8b-qlora": ("llama-3-8b", ["model.quantization=4bit", "lora.lora_dropout=0.0"], LONG),
    "8b-lora": ("llama-3-8b", ["model.quantization=none", "lora.lora_dropout=0.0"], LONG),
    "1b-qlora": ("llama-3.2-1b", ["model.quantization=4bit"], LONG),
    "1b-lora": ("llama-3.2-1b", ["model.quantization=none"], LONG),
    "1b-int8-opt8": ("llama-3.2-1b", ["model.quantization=8bit", "training.optim=adamw_8bit"],
                     [(512, 1), (2048, 2), (4096, 4)]),
    "1b-lora-nockpt": ("llama-3.2-1b", ["model.quantization=none", "lora.lora_dropout=0.0",
                                        "training.gradient_checkpointing=false"], [(512, 1), (2048, 1), (512, 4),
                                                                                   (2048, 2), (4096, 1)]),
    "1b-lora-noliger": ("llama-3.2-1b", ["model.quantization=none", "training.use_liger_kernel=false"],
                        [(512, 1), (2048, 2), (4096, 2)]),
    "tiny-qlora": ("tiny", ["model.quantization=4bit"], [(64, 1), (128, 2)]),
    "tiny-lora": ("tiny", ["model.quantization=none", "training.gradient_checkpointing=false"], [(64, 1), (128, 2)]),
}
# LoRA as the benchmark trains it; quantization / dropout / checkpointing per group.
COMMON = ["lora.r=16", "lora.lora_alpha=16", "model.torch_dtype=bfloat16", "training.optim=adamw_torch"]


def job_config(model_dir: str, overrides: list[str], seq: int, batch: int):
    from finetune.config import JobConfig

    sets = [*COMMON, *overrides, f"data.max_seq_length={seq}", f"training.per_device_train_batch_size={batch}"]
    return JobConfig(adapter_name="memory-bench", model={"name_or_path": model_dir}).with_overrides(sets), sets


def _peaks(device) -> dict:
    import torch

    if device.type == "cuda":
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    from finetune.recipe.tracker import memory_mb

    return {"rss_gib": (memory_mb()[0] or 0) / 1024}


def _train_steps(model, tok, optimizer, params, tc, device, padding_free, steps) -> dict:
    """Full training steps as SFTRecipe.train_step runs them; the peak of each phase (forward with the loss, backward,
    optimizer step) over all steps, and what is allocated before a step and right after its forward."""
    import torch

    from finetune import data as D
    from finetune.recipe.sft import count_label_tokens

    cuda = device.type == "cuda"
    out: dict = {}

    def mark(name):
        if cuda:
            torch.cuda.synchronize(device)
            out[name] = max(out.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
            out["peak_reserved_gib"] = max(out.get("peak_reserved_gib", 0.0),
                                           torch.cuda.max_memory_reserved(device) / 2**30)
            torch.cuda.reset_peak_memory_stats(device)

    for examples in steps:
        batch_t = {k: v.to(device) for k, v in D.collate(examples, tok.pad_token_id, padding_free).items()}
        if cuda:
            out["before_step_gib"] = torch.cuda.memory_allocated(device) / 2**30
        mark("before_gib")
        result = model(**batch_t, num_items_in_batch=max(1, count_label_tokens(batch_t)))
        mark("forward_gib")
        if cuda:
            out["after_forward_gib"] = torch.cuda.memory_allocated(device) / 2**30
        result.loss.backward()
        mark("backward_gib")
        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark("optimizer_gib")
        del result, batch_t
    if cuda:
        out["peak_allocated_gib"] = max(out[k] for k in ("forward_gib", "backward_gib", "optimizer_gib"))
    else:
        out.update(_peaks(device))
    return out


def run_group(name: str, model_dir: str, out: Path, steps: int) -> int:
    import torch

    from finetune import model as M
    from finetune.bench.models import make_batches
    from finetune.recipe import speed
    from finetune.recipe.sft import build_optimizer

    shape, overrides, cases = GROUPS[name]
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    config, _ = job_config(model_dir, overrides, *cases[0])
    tc = config.training
    torch.manual_seed(0)
    t0 = time.perf_counter()
    tok = M.load_tokenizer(config.model)
    model = M.load_model(config.model, for_training=True)
    model = M.apply_lora(model, config.lora, gradient_checkpointing=tc.gradient_checkpointing,
                         checkpointed_layers=tc.gradient_checkpointing_layers)
    speedups = speed.patch_model_for_speed(model, tc)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, tc)
    setup = {"setup_s": round(time.perf_counter() - t0, 1), "speedups": speedups, **_peaks(device),
             "offload_min_bytes": speed.OFFLOAD_MIN_BYTES}
    padding_free = tc.padding_free and device.type == "cuda"
    for seq, batch in cases:
        config, sets = job_config(model_dir, overrides, seq, batch)
        row = {"group": name, "shape": shape, "seq": seq, "batch": batch, "set": sets, "setup": setup}
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        try:
            phases = _train_steps(model, tok, optimizer, params, tc, device, padding_free,
                                  make_batches(seq, batch, steps, model.config.vocab_size, seed=seq * 100 + batch))
            row.update(phases, seconds=round(time.perf_counter() - t, 2))
        except Exception as e:  # out of memory (or a broken kernel): record it, go on with the next case
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            optimizer.zero_grad(set_to_none=True)
        with open(out / "results.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row.get(k) for k in ("group", "seq", "batch", "peak_allocated_gib", "peak_reserved_gib",
                                                    "rss_gib", "error")}), flush=True)
    return 0


def cuda_context(out: Path) -> None:
    """Device memory a CUDA process holds outside its caching allocator once cuBLAS has run."""
    import torch

    if not torch.cuda.is_available():
        return
    free0, total = torch.cuda.mem_get_info()
    x = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    (x @ x).sum().item()
    free, total = torch.cuda.mem_get_info()
    used_other = total - free - torch.cuda.memory_reserved()
    from finetune.bench.arms import versions

    (out / "context.json").write_text(json.dumps({"device": torch.cuda.get_device_name(0), "total_gib": total / 2**30,
                                                  "context_gib": used_other / 2**30, "versions": versions(),
                                                  "python": sys.version.split()[0]}) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.bench.memory")
    p.add_argument("--out", required=True)
    p.add_argument("--models", default=os.environ.get("STUDIO_BENCH_MODELS", "/tmp/studio-bench-models"))
    p.add_argument("--groups", default=",".join(g for g in GROUPS if not g.startswith("tiny")))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=420, help="seconds the workers get, all together")
    p.add_argument("--logs", default="/tmp/bench-memory-logs", help="each worker's own log (tails go to DIR)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from finetune.bench.models import build_model, model_dir

    if a.worker:
        shape = GROUPS[a.worker][0]
        return run_group(a.worker, str(model_dir(Path(a.models), shape)), out, a.steps)
    groups = [g.strip() for g in a.groups.split(",") if g.strip()]
    cuda_context(out)
    for shape in dict.fromkeys(GROUPS[g][0] for g in groups):
        t = time.perf_counter()
        build_model(shape, Path(a.models))
        print(f"built {shape} in {time.perf_counter() - t:.1f}s", flush=True)
    logs = Path(a.logs)
    logs.mkdir(parents=True, exist_ok=True)
    gc.collect()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.empty_cache()  # the workers need the memory the builds reserved here
    procs = {g: subprocess.Popen([sys.executable, "-m", "finetune.bench.memory", "--out", str(out), "--models",
                                  a.models, "--steps", str(a.steps), "--worker", g],
                                 stdout=open(logs / f"{g}.log", "w"), stderr=subprocess.STDOUT) for g in groups}
    deadline = time.monotonic() + a.timeout
    for g, proc in procs.items():
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            print(f"{g}: killed at the time limit", flush=True)
        print(f"{g}: exit {proc.returncode}", flush=True)
    with open(out / "workers.log", "w", encoding="utf-8") as f:
        for g in groups:
            f.write(f"==> {g}\n" + (logs / f"{g}.log").read_text(errors="replace")[-6000:] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --- the plan beside the measurements ------------------------------------------------------------------------------
def shape_folder(shape: str, root: Path) -> Path:
    """A folder holding only the shape's config.json: what the planner reads (no weights needed)."""
    from finetune.bench.models import SHAPES

    folder = Path(root) / shape
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(SHAPES[shape]), encoding="utf-8")
    return folder


def compare(rows: list[dict], device_gib: float, root: Path) -> list[dict]:
    """Each measured case beside the plan of the same JobConfig (on a GPU of device_gib, liger-kernel as the
    measurement had it)."""
    from finetune.config import JobConfig
    from finetune.plan import GIB, Device, estimate

    out = []
    for row in rows:
        if row.get("error") or row.get("peak_allocated_gib") is None:
            continue
        folder = shape_folder(row["shape"], root)
        config = JobConfig(adapter_name="memory-bench", model={"name_or_path": str(folder)}).with_overrides(row["set"])
        liger = "liger_fused_linear_cross_entropy" in row["setup"].get("speedups", [])
        # rows that do not record the offload threshold were measured while it was 128 MiB
        device = Device("cuda", int(device_gib * GIB), fused_loss=liger,
                        offload_min_bytes=row["setup"].get("offload_min_bytes", 128 * 2**20))
        plan = estimate(config, device, suggest=False)
        measured = row["peak_allocated_gib"]
        out.append({"group": row["group"], "seq": row["seq"], "batch": row["batch"], "measured_gib": measured,
                    "measured_reserved_gib": row.get("peak_reserved_gib"), "plan_gib": plan.training_peak / GIB,
                    "plan_reserved_gib": plan.reserved_for(plan.training_peak) / GIB, "plan_phase": plan.phase,
                    "error": plan.training_peak / GIB / measured - 1, "row": row, "plan": plan})
    return out
