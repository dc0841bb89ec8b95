"""Where a training step's time goes, from a torch profiler timeline: how long the GPU works and idles per step,
and what the host is doing while the GPU idles (the deepest profiler op open at each moment of GPU idle time,
sampled every 10 microseconds; "python (no op open)" is interpreter time between ops).

Totals alone cannot tell a launch-bound step from a slow kernel; the idle-time attribution can: a gap filled by
`aten::to` or an autograd node names the host work to remove."""
from __future__ import annotations

import bisect
import collections
import gzip
import heapq
import json
import os
import tempfile
import time

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
SAMPLE_US = 10.0


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _gaps(busy: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(busy[i][1], busy[i + 1][0]) for i in range(len(busy) - 1) if busy[i + 1][0] > busy[i][1]]


def _idle_attribution(ops: list[dict], gaps: list[tuple[float, float]], top: int = 25) -> list[dict]:
    """Sample the GPU-idle time; at each sample take the deepest (latest-starting) CPU op open on any thread."""
    samples = []
    for a, b in gaps:
        t = a + SAMPLE_US / 2
        while t < b:
            samples.append(t)
            t += SAMPLE_US
    events = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in ops)
    counts: collections.Counter = collections.Counter()
    open_ops: list[tuple[float, float, str]] = []  # max-heap on start: (-start, end, name)
    i = 0
    for t in samples:
        while i < len(events) and events[i][0] <= t:
            heapq.heappush(open_ops, (-events[i][0], events[i][1], events[i][2]))
            i += 1
        # the latest-starting op that is still open; ops that ended are dropped lazily
        while open_ops and open_ops[0][1] < t:
            heapq.heappop(open_ops)
        name = open_ops[0][2] if open_ops else "python (no op open)"
        counts[name] += 1
    total = max(1, len(samples))
    return [{"op": n, "idle_ms": round(c * SAMPLE_US / 1000, 2), "share": round(c / total, 3)}
            for n, c in counts.most_common(top)]


def analyse(trace: dict, n_steps: int) -> dict:
    evs = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    gpu = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in evs if e.get("cat") in GPU_CATS]
    steps = [e for e in evs if e.get("cat") == "user_annotation" and e["name"].startswith("bench_step")]
    ops = [e for e in evs if e.get("cat") in ("cpu_op", "user_annotation") and not e["name"].startswith("bench_step")
           and e["name"] != "ProfilerStep"]
    if not gpu or not steps:
        return {"error": "no GPU activity or step markers in the trace"}
    lo = min(float(e["ts"]) for e in steps)
    hi = max(float(e["ts"]) + float(e["dur"]) for e in steps)
    busy = _union([(a, b) for a, b in gpu if b > lo and a < hi])
    busy_us = sum(min(b, hi) - max(a, lo) for a, b in busy)
    wall_us = hi - lo
    gaps = [(a, b) for a, b in _gaps(busy)]
    if busy:
        gaps = [(lo, busy[0][0])] * (busy[0][0] > lo) + gaps + [(busy[-1][1], hi)] * (busy[-1][1] < hi)
    big = sorted(gaps, key=lambda g: g[1] - g[0], reverse=True)[:5]
    return {
        "steps": n_steps, "step_wall_ms": round(wall_us / n_steps / 1000, 1),
        "gpu_busy_ms": round(busy_us / n_steps / 1000, 1), "gpu_busy_share": round(busy_us / wall_us, 3),
        "kernels_per_step": round(sum(1 for e in evs if e.get("cat") == "kernel" and lo <= float(e["ts"]) <= hi)
                                  / n_steps),
        "idle_gaps_per_step": round(len(gaps) / n_steps), "longest_gaps_ms": [round((b - a) / 1000, 2) for a, b in big],
        "idle_by_host_op": _idle_attribution(ops, gaps),
        "gpu_ms_by_kernel": _kernel_time(evs, lo, hi, n_steps),
    }


def _kernel_time(evs: list[dict], lo: float, hi: float, n_steps: int, top: int = 25) -> list[dict]:
    """GPU time per step by kernel name, largest first: what the GPU's own work is made of."""
    total: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in evs:
        if e.get("cat") in GPU_CATS and lo <= float(e["ts"]) <= hi:
            total[e["name"][:120]] += float(e["dur"])
            count[e["name"][:120]] += 1
    return [{"kernel": k, "ms": round(us / n_steps / 1000, 2), "calls": round(count[k] / n_steps)}
            for k, us in total.most_common(top)]


def profile_steps(step, batches: list, device, trace_path: str | None = None) -> dict:
    """Run `step` on each batch under the profiler (CPU + CUDA activity) and analyse the timeline."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=acts, record_shapes=False, with_stack=False) as prof:
        for i, examples in enumerate(batches):
            with record_function(f"bench_step_{i}"):
                step(examples)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    fd, tmp = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(tmp)
        with open(tmp, encoding="utf-8") as f:
            trace = json.load(f)
        if trace_path:
            with gzip.open(trace_path, "wt", encoding="utf-8") as g:
                json.dump(trace, g)
    finally:
        os.unlink(tmp)
    out = analyse(trace, len(batches))
    out["profiled_wall_s"] = round(wall, 2)
    return out
