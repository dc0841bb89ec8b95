"""`python -m finetune bench`: training speed and memory, arms side by side, each in its own process.

    python -m finetune bench --model llama-3-8b --mode qlora,lora --seq 2048 --batch 2 --steps 8 \
        --arms naive,unsloth,studio --out docs/benchmarks.md
    python -m finetune bench --model llama-3-8b --mode qlora --longest --mem-gib 24 --arms naive,unsloth,studio
    python -m finetune bench --plan plan.json          # a list of cases, run in order, spread over the GPUs
    python -m finetune bench --model tiny --mode lora --seq 64 --batch 2 --steps 3 --arms naive,studio   # CPU

Models are random-weight copies of real architectures (finetune/bench/models.py), built once per --models-dir.
Every (case, arm) runs `python -m finetune.bench.arms` in a fresh process, one per GPU at a time (several GPUs run
several arms at once, each on its own device). Arms: naive, unsloth, studio, plus experiments "naive:bf16" (bf16
hidden states, see finetune/bench/arms.py), "studio:<switches>" (finetune/recipe/speed.py's STUDIO_SPEED, e.g.
studio:-offload+compile) and "<arm>@<seed>" (another LoRA-init seed).
A plan entry's "checkpointed_layers": N sets training.gradient_checkpointing_layers of its studio and recipe arms.
A plan entry's "data_seed": K draws another workload (other example lengths and tokens; the same for every arm).
The table reports the median tokens/s (non-padding tokens) of the steps after --warmup, CUDA-synchronised, and the
tokens of all those steps over their summed time (where a one-off stall in one step shows, which the median hides); peak
allocated and reserved memory over the training steps (after loading); MFU = model FLOPs (4 x matmul weights +
causal attention, padding excluded) per second over the device's dense bf16 peak; and the per-step losses.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"

ARMS3 = ["naive", "unsloth", "studio"]
# The reference measurements in priority order (GPU time may run out: what matters most runs first).
PLANS: dict[str, list[dict]] = {
    "reference": [
        {"shape": "llama-3-8b", "mode": "qlora", "seq": 2048, "batch": 2, "arms": ARMS3 + ["naive@1"]},
        {"shape": "llama-3-8b", "mode": "lora", "seq": 2048, "batch": 2, "arms": ARMS3 + ["studio:-offload"]},
        {"shape": "llama-3-8b", "mode": "qlora", "seq": "var", "batch": 8, "steps": 12, "arms": ARMS3},
        {"shape": "llama-3-8b", "mode": "qlora", "seq": "longest", "batch": 1, "kind": "longest",
         "mem_limit_gib": 24, "time_budget_s": 150, "arms": ARMS3},
        {"shape": "llama-3-8b", "mode": "qlora", "seq": 8192, "batch": 1, "arms": ARMS3},
        {"shape": "llama-3.2-1b", "mode": "qlora", "seq": 2048, "batch": 2, "arms": ARMS3 + ["studio:-offload"]},
        {"shape": "qwen2.5-7b", "mode": "qlora", "seq": 2048, "batch": 2, "arms": ARMS3},
    ],
}


def _cases_from_args(a) -> list[dict]:
    cases = []
    for model in a.model.split(","):
        for mode in a.mode.split(","):
            if a.longest:
                cases.append({"shape": model, "mode": mode, "seq": "longest", "batch": 1, "kind": "longest",
                              "mem_limit_gib": a.mem_gib, "arms": a.arms.split(",")})
                continue
            for seq in a.seq.split(","):
                seq_v = seq if seq == "var" else int(seq)
                batch = a.batch if a.batch else (8 if seq == "var" else 2)
                cases.append({"shape": model, "mode": mode, "seq": seq_v, "batch": batch, "steps": a.steps,
                              "warmup": a.warmup, "kind": "throughput", "arms": a.arms.split(","),
                              "profile": a.profile})
    return cases


def _gpus() -> list[str]:
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:
        n = 0
    return [str(i) for i in range(n)] or ["cpu"]


def case_key(c: dict) -> str:
    if c.get("kind") == "longest":
        return f"{c['shape']} {c['mode']} longest@{c.get('mem_limit_gib')}GiB"
    ckpt = "" if c.get("checkpointed_layers") is None else f" checkpointed_layers={c['checkpointed_layers']}"
    data = f" data_seed={c['data_seed']}" if c.get("data_seed") else ""
    return f"{c['shape']} {c['mode']} seq={c['seq']} batch={c['batch']}{ckpt}{data}"


class Scheduler:
    """Jobs in priority order; each free device takes the first job whose model is built."""

    def __init__(self, devices, work: Path, budget_s: float, timeout_s: float, log, hard_s: float = 1e9,
                 on_done=None):
        self.devices, self.work, self.log = devices, work, log
        self.deadline = time.monotonic() + budget_s
        self.hard_deadline = time.monotonic() + hard_s  # running jobs are stopped here (a caller's time limit)
        self.on_done = on_done or (lambda done: None)
        self.timeout_s = timeout_s
        self.pending: list[dict] = []
        self.running: dict[str, tuple] = {}
        self.done: dict[str, dict] = {}

    def add(self, job: dict):
        self.pending.append(job)

    def _ready(self, job) -> bool | None:
        dep = job.get("needs")
        if dep is None:
            return True
        if dep in self.done:
            return True if self.done[dep].get("ok") else None  # None: its model failed to build
        return False

    def _launch(self, dev: str, job: dict):
        jid = job["id"]
        jdir = self.work / jid
        jdir.mkdir(parents=True, exist_ok=True)
        (jdir / "job.json").write_text(json.dumps(job, indent=1), encoding="utf-8")
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   UNSLOTH_COMPILE_LOCATION=str(jdir / "unsloth_compiled_cache"))
        env.pop("STUDIO_SPEED", None)
        root = str(Path(__file__).resolve().parents[2])  # the arm runs in its own folder; finetune stays importable
        env["PYTHONPATH"] = os.pathsep.join([root] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
        if dev != "cpu":
            env["CUDA_VISIBLE_DEVICES"] = dev
        if job["type"] == "build":
            cmd = [sys.executable, "-m", "finetune.bench.harness", "--build", job["shape"], "--models-dir", job["models_dir"]]
        else:
            cmd = [sys.executable, "-m", "finetune.bench.arms", str(jdir / "job.json"), str(jdir / "result.json")]
        logf = open(jdir / "log.txt", "w", encoding="utf-8")
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=str(jdir),
                                start_new_session=True)
        self.running[dev] = (proc, job, time.monotonic(), logf)
        self.log(f"[{time.strftime('%H:%M:%S')}] gpu {dev}: start {jid}")

    def _finish(self, dev: str, rc: int | None, why: str | None = None):
        proc, job, t0, logf = self.running.pop(dev)
        logf.close()
        jdir = self.work / job["id"]
        tail = (jdir / "log.txt").read_text(encoding="utf-8", errors="replace")[-3000:]
        res: dict = {"ok": rc == 0, "job": job, "wall_s": round(time.monotonic() - t0, 1), "log_tail": tail}
        if (jdir / "result.json").is_file():
            res.update(json.loads((jdir / "result.json").read_text(encoding="utf-8")))
            res["ok"] = rc == 0 and "error" not in res
        if why:
            res["error"] = why
        elif rc != 0 and "error" not in res:
            res["error"] = f"exit code {rc}: " + (tail.strip().splitlines() or [""])[-1][:300]
        self.done[job["id"]] = res
        summary = (f"{res.get('tokens_per_s') or 0:.0f} tok/s, peak {_f(res.get('peak_allocated_gib'), '{:.2f}')} GiB"
                   if res["ok"] and job["type"] == "arm" else ("ok" if res["ok"] else res.get("error", "")[:200]))
        self.log(f"[{time.strftime('%H:%M:%S')}] gpu {dev}: done  {job['id']} ({res['wall_s']} s): {summary}")
        self.on_done(self.done)

    def run(self):
        while self.pending or self.running:
            for dev, (proc, job, t0, _) in list(self.running.items()):
                rc = proc.poll()
                if rc is not None:
                    self._finish(dev, rc)
                elif time.monotonic() - t0 > job.get("timeout_s", self.timeout_s) or time.monotonic() > self.hard_deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    self._finish(dev, -9, f"stopped after {time.monotonic() - t0:.0f} s (job or call time limit)")
            for dev in self.devices:
                if dev in self.running:
                    continue
                for job in list(self.pending):
                    ready = self._ready(job)
                    if ready is None:
                        self.pending.remove(job)
                        self.done[job["id"]] = {"ok": False, "job": job, "error": f"model {job['needs']} not built"}
                        continue
                    if not ready:
                        continue
                    self.pending.remove(job)
                    if time.monotonic() > self.deadline:
                        self.done[job["id"]] = {"ok": False, "job": job, "error": "skipped: time budget spent"}
                        continue
                    self._launch(dev, job)
                    break
            if self.pending and not self.running and not any(self._ready(j) for j in self.pending):
                # nothing can start (deps failed are removed above); avoid spinning forever
                for job in self.pending:
                    self.done[job["id"]] = {"ok": False, "job": job, "error": "dependency never finished"}
                self.pending.clear()
            time.sleep(0.3)
        return self.done


def plan_jobs(cases: list[dict], models_dir: Path, timeout_s: float) -> list[dict]:
    """Build jobs for each model (in order of first need), then one job per (case, arm)."""
    jobs, built = [], set()
    for ci, c in enumerate(cases):
        if c["shape"] not in built:
            built.add(c["shape"])
            jobs.append({"type": "build", "id": f"build-{c['shape']}", "shape": c["shape"],
                         "models_dir": str(models_dir), "timeout_s": 900})
        for arm in c["arms"]:
            seed = 0
            base_arm = arm
            if "@" in arm:
                base_arm, s = arm.split("@", 1)
                seed = int(s)
            jid = f"c{ci:02d}-{c['shape']}-{c['mode']}-{c['seq']}-{arm}".replace(":", "_").replace("+", "p")
            jobs.append({"type": "arm", "id": jid, "case": ci, "case_key": case_key(c), "arm": base_arm,
                         "arm_label": arm, "seed": seed, "needs": f"build-{c['shape']}",
                         "model_dir": str(models_dir / c["shape"]), "shape": c["shape"], "mode": c["mode"],
                         "seq": c["seq"], "batch": c["batch"], "steps": c.get("steps", 8),
                         "warmup": c.get("warmup", 2), "kind": c.get("kind", "throughput"),
                         "mem_limit_gib": c.get("mem_limit_gib"), "ladder": c.get("ladder"),
                         "time_budget_s": c.get("time_budget_s", 240), "max_len": c.get("max_len"),
                         "timeout_s": c.get("timeout_s", timeout_s), "profile": c.get("profile", 0),
                         "checkpointed_layers": c.get("checkpointed_layers"), "data_seed": c.get("data_seed", 0)})
    return jobs


# --- the report ----------------------------------------------------------------------------------------------------
def _f(v, fmt="{:,.0f}"):
    return "-" if v is None else fmt.format(v)


def tables(results: dict[str, dict]) -> str:
    """Markdown: one table per case, rows in arm order, ratios against naive and unsloth."""
    by_case: dict[str, list[dict]] = {}
    order: list[str] = []
    for r in results.values():
        job = r["job"]
        if job["type"] != "arm":
            continue
        key = job["case_key"]
        if key not in by_case:
            by_case[key] = []
            order.append(key)
        by_case[key].append(r)
    out = []
    for key in sorted(order, key=lambda k: min(r["job"]["case"] for r in by_case[k])):
        rows = sorted(by_case[key], key=lambda r: r["job"]["id"])
        first = rows[0]["job"]
        if first["kind"] == "longest":
            out.append(f"#### {key} (one step of batch 1 must fit under the cap)\n")
            out.append("| arm | longest sequence that fits | tokens/s there | peak allocated GiB | tried |")
            out.append("| --- | --- | --- | --- | --- |")
            for r in rows:
                if not r.get("ok"):
                    out.append(f"| {r['job']['arm_label']} | failed: {r.get('error', '')[:160]} | | | |")
                    continue
                tried = ", ".join(f"{t['seq']}{'' if t['ok'] else ' (OOM)' if t['ok'] is False else ' (no time)'}"
                                  for t in r.get("tried", []))
                out.append(f"| {r['job']['arm_label']} | {_f(r.get('longest'))} | {_f(r.get('tokens_per_s'))} | "
                           f"{_f(r.get('peak_allocated_gib'), '{:.2f}')} | {tried} |")
            out.append("")
            continue
        base = {r["job"]["arm_label"]: r for r in rows if r.get("ok")}
        # "Unsloth" is the better of its padded and padding-free (unsloth:packed) modes where both ran.
        unsloths = [r for label, r in base.items() if label.split(":")[0] == "unsloth" and "@" not in label]
        naive, uns = base.get("naive"), max(unsloths, key=lambda r: r["tokens_per_s"], default=None)
        out.append(f"#### {key}, steps {first['warmup']} warm-up + {first['steps']} measured\n")
        out.append("| arm | tokens/s | vs naive | vs unsloth | all steps tokens/s | peak alloc GiB | peak reserved GiB | "
                   "MFU | slowest / median step | loss step 1 / last | max abs loss diff vs naive | setup s | speed-ups |")
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            label = r["job"]["arm_label"]
            if not r.get("ok"):
                out.append(f"| {label} | failed: {str(r.get('error', ''))[:200]} | | | | | | | | | | | |")
                continue
            tps = r["tokens_per_s"]
            diff = _max_diff(r, naive) if naive and naive is not r else None
            out.append(
                f"| {label} | {_f(tps)} | {_f(tps / naive['tokens_per_s'] if naive else None, '{:.2f}x')} | "
                f"{_f(tps / uns['tokens_per_s'] if uns else None, '{:.2f}x')} | {_f(all_steps_rate(r))} | "
                f"{_f(r.get('peak_allocated_gib'), '{:.2f}')} | {_f(r.get('peak_reserved_gib'), '{:.2f}')} | "
                f"{_f(r['mfu'] * 100 if r.get('mfu') is not None else None, '{:.1f}%')} | "
                f"{_f(r.get('slowest_vs_median'), '{:.3f}')} | {r['losses'][0]:.4f} / {r['losses'][-1]:.4f} | {_f(diff, '{:.4f}')} | {_f(r.get('setup_s'), '{:.0f}')} | "
                f"{', '.join(r.get('speedups') or []) or '-'} |")
        out.append("")
        out += _parity(base)
        out += _profile_table(rows)
    return "\n".join(out)


def all_steps_rate(r: dict) -> float | None:
    """Tokens of the measured steps over their summed time (None where the arm recorded no step times)."""
    measured = r.get("steps", [])[r["job"].get("warmup", 0):]
    if not measured or any("seconds" not in s for s in measured):
        return None
    return sum(s["tokens"] for s in measured) / sum(s["seconds"] for s in measured)


def _max_diff(a: dict, b: dict) -> float:
    return max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))


def _parity(arms: dict[str, dict]) -> list[str]:
    """One line: how far the naive arm's LoRA-init seeds lie apart per step (the noise floor) and which other arms
    stay within that of naive with their own seed ("studio@1" against "naive@1": the same LoRA init and batches, so
    the difference is the implementation's alone)."""
    seeds = sorted(label for label in arms if label == "naive" or label.startswith("naive@"))
    if "naive" not in seeds or len(seeds) < 2:
        return []
    spread = max(_max_diff(arms[a], arms[b]) for i, a in enumerate(seeds) for b in seeds[i + 1:])
    others = []
    for label, r in arms.items():
        if label in seeds:
            continue
        seed = label.partition("@")[2]
        ref = f"naive@{seed}" if seed and f"naive@{seed}" in arms else "naive"
        d = _max_diff(r, arms[ref])
        others.append(f"{label} {d:.4f}{'' if ref == 'naive' else f' from {ref}'} "
                      f"({'within' if d <= spread else 'outside'})")
    return [f"Loss parity, largest per-step difference: the naive seeds ({', '.join(seeds)}) lie up to {spread:.4f} "
            f"apart; from naive with the same seed: {'; '.join(others) or '-'}.", ""]


def _profile_table(rows: list[dict]) -> list[str]:
    prof = [r for r in rows if r.get("ok") and isinstance(r.get("profile"), dict) and "step_wall_ms" in r["profile"]]
    if not prof:
        return []
    out = ["Under the torch profiler (it slows every arm; compare the arms, not the absolute times):\n",
           "| arm | step wall ms | GPU busy ms | GPU busy share | kernels / step | GPU idle: host busy in (top 6, ms/step) |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in prof:
        p = r["profile"]
        top = ", ".join(f"{o['op']} {o['idle_ms'] / p['steps']:.1f}" for o in p["idle_by_host_op"][:6])
        out.append(f"| {r['job']['arm_label']} | {p['step_wall_ms']} | {p['gpu_busy_ms']} | "
                   f"{p['gpu_busy_share'] * 100:.0f}% | {p['kernels_per_step']:,} | {top} |")
    return out + [""]


def write_report(path: Path, text: str, header: str) -> None:
    """Replace the generated block between the markers, keeping what is written around it; append it to a file
    without markers; or create the file."""
    block = f"{START}\n{header}\n\n{text}\n{END}"
    if path.is_file():
        old = path.read_text(encoding="utf-8")
        if START in old and END in old:
            new = old[:old.index(START)] + block + old[old.index(END) + len(END):]
            path.write_text(new, encoding="utf-8")
            return
        path.write_text(old.rstrip("\n") + "\n\n## Latest generated tables\n\n" + block + "\n", encoding="utf-8")
        return  # a hand-written page without the markers: append, never overwrite
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# Benchmarks\n\n{block}\n", encoding="utf-8")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m finetune bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3-8b", help="comma list of: llama-3.2-1b, llama-3-8b, qwen2.5-7b, tiny")
    p.add_argument("--mode", default="qlora", help="comma list of: qlora (NF4 + double quant), lora (bf16)")
    p.add_argument("--seq", default="2048", help="comma list of sequence lengths, or var (log-normal, median ~350, cap 2048)")
    p.add_argument("--batch", type=int, default=0, help="sequences per step (default 2; 8 for var)")
    p.add_argument("--steps", type=int, default=8, help="measured steps")
    p.add_argument("--warmup", type=int, default=2, help="steps before measuring (kernel autotuning, compiles)")
    p.add_argument("--arms", default="naive,unsloth,studio")
    p.add_argument("--longest", action="store_true", help="find the longest batch-1 sequence that fits under --mem-gib")
    p.add_argument("--mem-gib", type=float, default=24.0)
    p.add_argument("--plan", help=f"a named plan ({', '.join(PLANS)}) or a JSON list of cases (shape, mode, seq, batch, steps, warmup, arms, kind, ...)")
    p.add_argument("--models-dir", help="where the random-weight models are built (default STUDIO_HOME/bench/models)")
    p.add_argument("--work", help="per-job folders (default: a temporary folder)")
    p.add_argument("--raw", help="folder for results.json, tables.md and the scheduler log")
    p.add_argument("--out", help="markdown file whose generated block gets the tables")
    p.add_argument("--budget-s", type=float, default=1e9, help="launch no new job after this many seconds")
    p.add_argument("--timeout-s", type=float, default=600, help="per-job limit")
    p.add_argument("--hard-s", type=float, default=1e9, help="stop running jobs after this many seconds (and report)")
    p.add_argument("--profile", type=int, default=0,
                   help="after the timed steps, run this many more under the torch profiler and report where the "
                        "GPU idles and what the host does then (finetune.bench.profile.py)")
    p.add_argument("--devices", help="comma list of CUDA device ids to use (default: all; cpu without CUDA)")
    p.add_argument("--build", help=argparse.SUPPRESS)
    p.add_argument("--report", help="re-render the tables from a results.json")
    return p


def cli(argv: list[str]) -> int:
    p = _parser()
    a = p.parse_args(argv)

    from finetune.bench.models import build_model
    from finetune.paths import studio_home

    models_dir = Path(a.models_dir or studio_home() / "bench" / "models").resolve()
    if a.build:
        t0 = time.perf_counter()
        path = build_model(a.build, models_dir)
        print(f"built {a.build} in {time.perf_counter() - t0:.1f}s: {path}")
        return 0
    if a.report:
        results = json.loads(Path(a.report).read_text(encoding="utf-8"))
        text = tables(results["results"])
        print(text)
        if a.out:
            write_report(Path(a.out), text, results.get("header", ""))
        return 0

    cases = _cases(a, p)
    devices = a.devices.split(",") if a.devices else _gpus()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="studio-bench-"))
    raw = Path(a.raw) if a.raw else None
    if raw:
        raw.mkdir(parents=True, exist_ok=True)
    log_lines: list[str] = []

    def log(msg: str):
        print(msg, flush=True)
        log_lines.append(msg)
        if raw:
            (raw / "scheduler.log").write_text("\n".join(log_lines) + "\n", encoding="utf-8")

    def save(done):
        if raw:
            (raw / "results.json").write_text(json.dumps({"header": _header(done, devices), "results": done},
                                                         indent=1, default=str), encoding="utf-8")

    sched = Scheduler(devices, work, a.budget_s, a.timeout_s, log, hard_s=a.hard_s, on_done=save)
    for job in plan_jobs(cases, models_dir, a.timeout_s):
        sched.add(job)
    log(f"devices: {', '.join(devices)}; {len(sched.pending)} jobs; work folder {work}")
    results = sched.run()
    header = _header(results, devices)
    text = tables(results)
    print("\n" + header + "\n\n" + text)
    if raw:
        (raw / "results.json").write_text(json.dumps({"header": header, "results": results}, indent=1, default=str),
                                          encoding="utf-8")
        (raw / "tables.md").write_text(header + "\n\n" + text + "\n", encoding="utf-8")
    if a.out:
        write_report(Path(a.out), text, header)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    arms = [r for r in results.values() if r["job"]["type"] == "arm"]
    return 0 if arms and all(r.get("ok") for r in arms) else 1


def _cases(a, p: argparse.ArgumentParser) -> list[dict]:
    """The cases to run: a named plan, a JSON plan file, or the command line's models x modes x lengths."""
    from finetune.bench.models import SHAPES

    if a.plan in PLANS:
        cases = PLANS[a.plan]
    elif a.plan:
        cases = json.loads(Path(a.plan).read_text(encoding="utf-8"))
    else:
        cases = _cases_from_args(a)
    for c in cases:
        if c["shape"] not in SHAPES:
            p.error(f"--model {c['shape']!r}: not one of {', '.join(SHAPES)}")
        if c["mode"] not in ("qlora", "lora"):
            p.error(f"--mode {c['mode']!r}: qlora or lora")
    return cases


def _header(results: dict, devices: list[str]) -> str:
    device, versions = "?", {}
    for r in results.values():
        if r.get("device"):
            device, versions = r["device"], r.get("versions", {})
            if "unsloth" in versions:
                break
    vs = ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
    return (f"Device: {device} ({len(devices)} used, one arm per device at a time). Libraries: {vs}. "
            f"Python {sys.version.split()[0]}.")


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
