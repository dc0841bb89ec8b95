"""Pure functions that turn store rows, live job views and evaluation results into what the tabs display
(HTML snippets, pandas frames for plots and tables). No gradio, no I/O: easy to test and to reuse.

What these functions are given may come from files the studio did not write (an imported adapter's studio.json,
evaluation results, a job's status), so every text goes through esc() and every number through num(): a value of
the wrong type shows as "–" instead of breaking the page, and markup shows as text."""
from __future__ import annotations

import html
import math
import time

import pandas as pd

from finetune.evaluation.metrics import METRICS, SORTABLE, metric_for_example_key
from finetune.rundir import FINAL_LOSS_LABEL, MIB_FORMAT, RATE_FORMAT

STATE_COLORS = {"queued": "#6b7280", "running": "#2563eb", "completed": "#16a34a", "failed": "#dc2626",
                "cancelled": "#9ca3af"}


def esc(x) -> str:
    return html.escape("" if x is None else str(x))


def num(x) -> int | float | None:
    """x if it is a finite number (not a bool, not a numeric-looking string), else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return x if math.isfinite(x) else None


def obj(x) -> dict:
    """x if it is a dict, else {}: nested fields of a file may have any shape."""
    return x if isinstance(x, dict) else {}


def signed(x) -> str:
    return "–" if num(x) is None else f"{x:+.3f}"


def diff_ci(p: dict, sep: str = " ") -> str:
    """A paired difference and its 95% interval: '+0.123 [+0.050, +0.190]'."""
    p = obj(p)
    if num(p.get("mean_diff")) is None:
        return "–"
    return f'{signed(p["mean_diff"])}{sep}[{signed(p.get("ci_low"))}, {signed(p.get("ci_high"))}]'


def fmt_num(x, digits: int = 4) -> str:
    x = num(x)
    if x is None:
        return "–"
    if isinstance(x, int):
        return str(x)
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def fmt_duration(seconds) -> str:
    if num(seconds) is None or abs(seconds) > 1e12:
        return "–"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {(s % 3600) // 60:02d}m"


def fmt_time(t) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if num(t) else "–"
    except (OverflowError, OSError, ValueError):
        return "–"


def state_badge(state: str) -> str:
    color = STATE_COLORS.get(state, "#6b7280")
    return f'<span class="badge" style="background:{color}">{esc(state)}</span>'


# --- jobs ------------------------------------------------------------------------------------------------------
JOB_COLUMNS = ["job id", "name", "state", "step", "loss (last logged step)", "adapter", "created", "duration"]


def jobs_frame(views: list[dict]) -> pd.DataFrame:
    """The job table, from each job's view (finetune.rundir.view)."""
    out = []
    for v in views:
        total = v.get("total_steps")
        started = v["state"] != "queued" or v.get("attempts")
        step = f"{v.get('step') or 0}/{total}" if total and started else ("–" if not started else str(v.get("step", "–")))
        if v["state"] == "queued" and v.get("queue_position"):
            step = f"queued #{v['queue_position']}"
        end = v.get("finished_at") or (time.time() if v["state"] == "running" else None)
        dur = fmt_duration(end - v["started_at"]) if v.get("started_at") and end else "–"
        # the name it publishes (queued, running) or published; a failed or cancelled job published nothing
        adapter = v.get("adapter_name") if v["state"] in ("queued", "running", "completed") else None
        state = f"{v['state']} ({v['reason']})" if v.get("reason") else v["state"]
        out.append([v["id"], v["name"], state, step, fmt_num(v.get("loss")), adapter or "–",
                    fmt_time(v["created_at"]), dur])
    return pd.DataFrame(out, columns=JOB_COLUMNS)


def job_choices(rows: list[dict]) -> list[tuple[str, str]]:
    return [(f"{r['id']} · {r['name']} · {r['state']}", r["id"]) for r in rows]


def progress_html(live: dict | None) -> str:
    if not live:
        return '<div class="muted">Select a job to see its progress.</div>'
    state = live["state"]
    pct = max(0.0, min(1.0, num(live.get("progress")) or 0.0)) * 100
    color = STATE_COLORS.get(state, "#2563eb")
    step, total = esc(live.get("step") or 0), esc(live.get("total_steps") or 0)
    bits = [f"step {step}/{total}" if live.get("total_steps") else f"step {step}", f"phase: {esc(live.get('phase'))}"]
    if state == "running":
        bits.append(f"ETA {fmt_duration(live.get('eta_seconds'))}" if live.get("eta_seconds") is not None else "ETA –")
    if live.get("elapsed_seconds") is not None:
        bits.append(f"elapsed {fmt_duration(live['elapsed_seconds'])}")
    if state == "queued" and live.get("queue_position"):
        bits.append(f"place {esc(live['queue_position'])} in the queue, waiting for {esc(live.get('waiting_for'))}")
    err = f'<div class="job-error">{esc(live["error"])}</div>' if live.get("error") else ""
    return (f'<div class="job-progress" data-state="{esc(state)}" data-step="{step}">'
            f'<div class="job-head">{state_badge(state)} <b>{esc(live.get("name"))}</b> '
            f'<span class="muted">{esc(live["id"])}</span></div>'
            f'<div class="bar"><div class="fill" style="width:{pct:.1f}%;background:{color}"></div>'
            f'<span class="pct">{pct:.0f}%</span></div>'
            f'<div class="muted">{" · ".join(bits)}</div>{err}</div>')


def rank_memory_cells(ranks) -> list[tuple[str, str]]:
    """Peak memory of each process of a job run over several (GPU ranks, or CPU processes)."""
    if not isinstance(ranks, list) or len(ranks) < 2:
        return []
    values = " / ".join(f"{m:,.0f}" if num(m) else "–" for m in ranks[:64])
    return [(f"peak memory per rank ({len(ranks)})", f"{esc(values)} MiB")]


def objective_cells(metrics) -> list[tuple[str, str]]:
    """An objective's own metrics at the last logged step (DPO rewards and log-probs, distillation CE and KL)."""
    if not isinstance(metrics, dict):
        return []
    return [(f"{esc(k)}, last logged step", fmt_num(v)) for k, v in list(metrics.items())[:12]]


def stats_html(live: dict | None) -> str:
    if not live:
        return ""
    mem = num(live.get("peak_memory_mb"))
    cells = [("train loss, last logged step", fmt_num(live.get("loss"))),
             (FINAL_LOSS_LABEL + ("" if live.get("state") == "completed" else ", so far"), fmt_num(live.get("final_loss"))),
             ("eval loss, validation rows", fmt_num(live.get("eval_loss"))),
             ("tokens/s, last logged steps", fmt_num(live.get("tokens_per_second"), 3)),
             ("peak memory", f"{mem:,.0f} MiB" if mem else "–"), *rank_memory_cells(live.get("rank_peak_memory_mb")),
             *objective_cells(live.get("objective_metrics")),
             ("adapter", esc(live.get("adapter_name") or "–")), ("attempts", esc(live.get("attempts") or 0))]
    return '<div class="stat-grid">' + "".join(
        f'<div class="stat"><div class="k">{k}</div><div class="v">{v}</div></div>' for k, v in cells) + "</div>"


def _points(hist, key: str):
    """Accepts [[step, value], ...] or [{"step":..., key:...}, ...] (rundir.histories' shape may evolve)."""
    for p in hist or []:
        if isinstance(p, dict):
            s, v = p.get("step"), p.get(key, p.get("value"))
        else:
            s, v = p[0], p[1]
        if isinstance(s, (int, float)) and isinstance(v, (int, float)) and math.isfinite(v):
            yield s, v


# --- adapters --------------------------------------------------------------------------------------------------
ADAPTER_COLUMNS = ["name", "base model", "quant", "dataset", "steps", FINAL_LOSS_LABEL,
                   "ROUGE-L Δ vs base [95% CI], latest evaluation: data, examples used",
                   "tokens/s (whole run)", "peak memory MiB", "created", "size MiB"]


def eval_delta(summary: dict | None, metric: str = "rouge_l") -> str:
    """The difference with its interval, and on which data and how many examples it was measured."""
    delta = diff_ci(obj(obj(summary).get("paired")).get(metric))
    return delta if delta == "–" else f"{delta} · {eval_data_label(obj(summary).get('data'))}"


def eval_data_label(data: dict | None) -> str:
    """'heldout.jsonl (held-out file), 16 of 120 examples'."""
    d = obj(data)
    name = str(d.get("path") or "–").rsplit("/", 1)[-1]
    of = f" of {d['available']}" if d.get("available") not in (None, d.get("n")) else ""
    return f"{name} ({d.get('split') or '–'}), {d.get('n', '–')}{of} examples"


def fmt_as(value, spec: str) -> str:
    return format(num(value), spec) if num(value) is not None else "–"


def adapters_frame(rows: list[dict]) -> pd.DataFrame:
    out = []
    for r in rows:
        m = obj(r.get("metrics"))
        steps = m.get("steps", m.get("global_step", m.get("total_steps")))
        loss = m.get("final_loss", m.get("train_loss"))
        ds = r.get("dataset") or "–"
        out.append([r["name"], r.get("base_model") or "–", r.get("quantization") or "–", ds,
                    fmt_num(steps), fmt_num(loss), eval_delta(r.get("eval")),
                    fmt_as(m.get("tokens_per_second"), RATE_FORMAT), fmt_as(m.get("peak_memory_mb"), MIB_FORMAT),
                    fmt_time(r.get("created_at")), r.get("size_mb") if r.get("size_mb") is not None else "–"])
    return pd.DataFrame(out, columns=ADAPTER_COLUMNS)


# --- evaluation ------------------------------------------------------------------------------------------------
# (key in the summaries, label, higher is better, bounded to [0, 1]), from the one metrics registry
EVAL_METRICS = [(m.name, m.label, m.higher_is_better, m.bounded) for m in METRICS]
SPEED_METRICS = [("tokens_per_second", "tokens/s", "{:.1f}"), ("latency_s", "seconds per answer", "{:.2f}"),
                 ("mean_new_tokens", "tokens per answer", "{:.1f}"), ("stopped_rate", "answers that ended by themselves", "{:.0%}"),
                 ("peak_memory_mb", "peak memory MiB", "{:,.0f}")]


def _bar(value, scale: float, color: str) -> str:
    value = num(value)
    if value is None or not scale:
        return '<span class="muted">–</span>'
    w = max(0.0, min(1.0, value / scale)) * 100
    return (f'<div class="hbar"><div class="hfill" style="width:{w:.1f}%;background:{color}"></div>'
            f'<span>{fmt_num(value, 3)}</span></div>')


def _forest(p: dict, higher: bool) -> str:
    """A tiny SVG: the mean difference adapter - base with its 95% interval, against zero."""
    lo, hi, m = num(p.get("ci_low")), num(p.get("ci_high")), num(p.get("mean_diff"))
    if None in (lo, hi, m):
        return ""
    span = max(abs(lo), abs(hi), abs(m), 1e-9) * 1.15
    x = lambda v: 100 + 95 * v / span  # noqa: E731
    good = (lo > 0) if higher else (hi < 0)
    bad = (hi < 0) if higher else (lo > 0)
    color = "#16a34a" if good else ("#dc2626" if bad else "#6b7280")
    return (f'<svg width="200" height="22" viewBox="0 0 200 22" role="img" aria-label="95% interval">'
            f'<line x1="100" y1="2" x2="100" y2="20" stroke="#9ca3af" stroke-dasharray="2,2"/>'
            f'<line x1="{x(lo):.1f}" y1="11" x2="{x(hi):.1f}" y2="11" stroke="{color}" stroke-width="3"/>'
            f'<line x1="{x(lo):.1f}" y1="6" x2="{x(lo):.1f}" y2="16" stroke="{color}" stroke-width="2"/>'
            f'<line x1="{x(hi):.1f}" y1="6" x2="{x(hi):.1f}" y2="16" stroke="{color}" stroke-width="2"/>'
            f'<circle cx="{x(m):.1f}" cy="11" r="4" fill="{color}"/></svg>')


def eval_chart_html(result: dict | None) -> str:
    """Base vs adapter per metric (bars), the paired difference with its 95% bootstrap interval, win/tie/loss."""
    if not result:
        return '<div class="muted">No evaluation yet. Pick a dataset and press Evaluate.</div>'
    metrics = obj(result.get("metrics"))
    base, adapter, paired, data = obj(metrics.get("base")), obj(metrics.get("adapter")), obj(result.get("paired")), obj(result.get("data"))
    head = (f'<div class="eval-head"><b>{esc(result.get("adapter"))}</b> vs its base '
            f'<span class="muted">{esc(result.get("base_model"))} ({esc(result.get("quantization"))})</span> on '
            f'{esc(eval_data_label(data))}: <code>{esc(data.get("path"))}</code></div>')
    rows = []
    for key, label, higher, unit in EVAL_METRICS:
        b, a = num(base.get(key)), num(adapter.get(key))
        if b is None and a is None:
            continue
        scale = 1.0 if unit else max(b or 0, a or 0) or 1.0
        p = obj(paired.get(key))
        diff = diff_ci(p, '<br><span class="muted">') + ("</span>" if num(p.get("mean_diff")) is not None else "")
        wtl = " / ".join(fmt_num(p.get(k)) for k in ("wins", "ties", "losses")) if "wins" in p else "–"
        arrow = "↑" if higher else "↓"
        rows.append(f'<tr><td>{label} <span class="muted" title="{"higher" if higher else "lower"} is better">{arrow}</span></td>'
                    f'<td>{_bar(b, scale, "#9ca3af")}</td><td>{_bar(a, scale, "#2563eb")}</td>'
                    f'<td class="num">{diff}</td><td>{_forest(p, higher)}</td><td class="num">{wtl}</td></tr>')
    speed = []
    for key, label, fmt in SPEED_METRICS:
        b, a = num(base.get(key)), num(adapter.get(key))
        if b is None and a is None:
            continue
        f = lambda v: fmt.format(v) if v is not None else "–"  # noqa: E731
        speed.append(f"<tr><td>{label}</td><td class='num'>{f(b)}</td><td class='num'>{f(a)}</td></tr>")
    table = ('<table class="eval-table"><thead><tr><th>metric</th><th>base</th><th>adapter</th>'
             '<th>adapter − base<br><span class="muted">[95% CI]</span></th><th>interval vs 0</th>'
             '<th>wins / ties / losses</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")
    speed_table = ('<table class="eval-table speed"><thead><tr><th>speed and memory</th><th>base</th><th>adapter</th>'
                   '</tr></thead><tbody>' + "".join(speed) + "</tbody></table>") if speed else ""
    note = ('<div class="muted small">Bars: mean per example. Interval: paired bootstrap of the per-example difference; '
            'green = the whole interval favours the adapter, red = it favours the base, grey = not distinguishable. '
            f'Settings: greedy decoding, max_new_tokens {esc(obj(result.get("settings")).get("max_new_tokens"))}, '
            f'computed in {fmt_duration(result.get("duration_s"))}.</div>')
    return f'<div class="eval">{head}{table}{speed_table}{note}</div>'


SORT_METRICS = list(SORTABLE)


def examples_frame(result: dict | None, sort_by: str = "rouge_l") -> pd.DataFrame:
    """One row per example with its `sort_by` score on each side and the adapter's gain (adapter - base; base - adapter
    for the loss, where lower is better), largest gain first."""
    cols = ["#", "prompt", "reference", "base answer", "adapter answer", "base score", "adapter score", "gain"]
    rows = []
    examples = obj(result).get("examples")
    for i, ex in enumerate(map(obj, examples if isinstance(examples, list) else [])):
        sc = obj(ex.get("scores"))
        b, a, d = (num(obj(sc.get(side)).get(sort_by)) for side in ("base", "adapter", "diff"))
        metric = metric_for_example_key(sort_by)
        if d is not None and metric is not None and not metric.higher_is_better:
            d = -d  # a lower loss is the gain
        r = lambda v: round(v, 4) if v is not None else None  # noqa: E731
        text = lambda v: v if isinstance(v, str) else ("" if v is None else str(v))  # noqa: E731
        rows.append([i + 1, *(text(ex.get(k)) for k in ("prompt", "reference", "base", "adapter")), r(b), r(a), r(d)])
    df = pd.DataFrame(rows, columns=cols)
    if len(df):
        df = df.sort_values("gain", ascending=False, na_position="last", kind="stable").reset_index(drop=True)
    return df


def compare_html(a: dict | None, b: dict | None) -> str:
    """Two adapters' evaluation results side by side."""
    if not a or not b:
        return '<div class="muted">Pick two adapters that have been evaluated.</div>'
    a, b = obj(a), obj(b)
    warn = ""
    da, db = obj(a.get("data")), obj(b.get("data"))
    if da.get("fingerprint") and db.get("fingerprint") and da.get("fingerprint") != db.get("fingerprint"):
        warn = ('<div class="warn">These results come from different examples '
                f'({esc(da.get("path"))} vs {esc(db.get("path"))}): '
                'compare the differences to each base, not the raw numbers.</div>')
    head = ("<tr><th>metric</th>" + "".join(
        f'<th colspan="3">{esc(r.get("adapter"))}<br><span class="muted">{esc(r.get("quantization"))} · '
        f'{esc(obj(r.get("data")).get("n"))} ex.</span></th>' for r in (a, b)) + "</tr>"
        "<tr><th></th>" + "<th>base</th><th>adapter</th><th>Δ [95% CI]</th>" * 2 + "</tr>")
    rows = []
    for key, label, higher, _ in EVAL_METRICS + [(k, l, True, False) for k, l, _ in SPEED_METRICS]:
        cells = []
        present = False
        for r in (a, b):
            metrics = obj(r.get("metrics"))
            base, ad = num(obj(metrics.get("base")).get(key)), num(obj(metrics.get("adapter")).get(key))
            present |= base is not None or ad is not None
            cells += [fmt_num(base, 4), fmt_num(ad, 4), diff_ci(obj(r.get("paired")).get(key))]
        if present:
            rows.append(f"<tr><td>{label}</td>" + "".join(f'<td class="num">{c}</td>' for c in cells) + "</tr>")
    return f'{warn}<table class="eval-table compare"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


# --- dataset preview -------------------------------------------------------------------------------------------
def _segments_html(segs) -> str:
    """Segments [{"text", "trained"}] or [(text, trained)] or plain text, the trained ones highlighted."""
    if isinstance(segs, str):
        segs = [{"text": segs, "trained": False}]
    parts = []
    for s in segs or []:
        if isinstance(s, (list, tuple)):
            s = {"text": s[0], "trained": bool(s[1])}
        text = esc(s.get("text"))
        parts.append(f'<span class="trained" title="trained on (labels)">{text}</span>' if s.get("trained") else
                     f'<span class="context">{text}</span>')
    return "".join(parts)


def preview_html(preview: dict | None) -> str:
    """Rows rendered through the chat template; the trained (assistant) tokens highlighted.
    Accepts each row as a list of segments [{"text", "trained"}] or as {"segments": [...]}, or as plain text."""
    if not preview:
        return ""
    items = []
    for i, row in enumerate(preview.get("rows") or preview.get("rendered") or []):
        segs = row.get("segments") if isinstance(row, dict) else row
        body = f"<pre>{_segments_html(segs)}</pre>"
        if isinstance(row, dict) and isinstance(row.get("rejected"), dict):  # a preference pair, side by side
            body = ('<div class="pair" style="display:flex;gap:8px"><div style="flex:1"><div class="small">chosen</div>'
                    f'{body}</div><div style="flex:1"><div class="small">rejected</div>'
                    f'<pre>{_segments_html(row["rejected"].get("segments"))}</pre></div></div>')
        extra = ""
        if isinstance(row, dict):
            n_tok = row.get("num_tokens", row.get("tokens"))
            bits = [f"{n_tok} tokens" if n_tok is not None else "", "truncated" if row.get("truncated") else ""]
            extra = " · ".join(b for b in bits if b)
        items.append(f'<div class="preview-row"><div class="muted small">row {i + 1}'
                     f'{" · " + esc(extra) if extra else ""}</div>{body}</div>')
    legend = ('<div class="small"><span class="trained">highlighted</span> = the tokens the model is trained to produce '
              '(assistant turns and their end-of-turn token); the rest is context only.</div>')
    return f'<div class="preview">{legend}{"".join(items)}</div>'


def histogram_frame(preview: dict | None) -> pd.DataFrame:
    """Token length histogram for gr.BarPlot: bucket label, rows."""
    hist = (preview or {}).get("histogram") or (preview or {}).get("length_histogram")
    rows = []
    if isinstance(hist, dict) and "counts" in hist:
        edges, counts = hist.get("edges") or hist.get("bins") or [], hist["counts"]
        for i, c in enumerate(counts):
            lo = edges[i] if i < len(edges) else i
            hi = edges[i + 1] if i + 1 < len(edges) else ""
            rows.append((f"{int(lo)}–{int(hi)}" if hi != "" else f"{int(lo)}+", int(c), i))
    elif isinstance(hist, list):
        for i, h in enumerate(hist):
            if isinstance(h, dict):
                lo, hi, c = h.get("lo", h.get("start")), h.get("hi", h.get("end")), h.get("count", 0)
            else:
                lo, hi, c = h
            rows.append((f"{int(lo)}–{int(hi)}", int(c), i))
    return pd.DataFrame(rows, columns=["tokens", "rows", "order"])


# --- line charts (SVG) -----------------------------------------------------------------------------------------
# The loss curves are drawn here rather than with gr.LinePlot: a run's evaluation loss is often a single point (it is
# computed when training ends), which a line plot cannot show, and markers make a short CPU run readable.
PALETTE = ["#2563eb", "#f97316", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04", "#db2777"]


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    if hi <= lo:
        hi = lo + (1 if integer else abs(lo) * 0.1 or 1)
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1, round(step))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 10) for k in range(first, last + 1)]


def _legend_width(name: str) -> float:
    return 14 + 7.2 * len(name) + 24


def _legend(names: list[str], right: float, left: float, title: str) -> tuple[list[str], int]:
    """The legend's SVG and how many rows it adds under the title: beside the title, right-aligned, when it fits
    there; else in right-aligned rows under it (many series, e.g. a sweep's trials, never overlap the title)."""
    rows: list[list[str]] = [list(names)]
    room = right - left - (9 * len(title) + 24)
    if sum(_legend_width(n) for n in names) > room:
        rows, used = [[]], 0.0
        for n in names:
            if rows[-1] and used + _legend_width(n) > right - left:
                rows.append([])
                used = 0.0
            rows[-1].append(n)
            used += _legend_width(n)
        rows.insert(0, [])  # the title's line stays free
    out = []
    for r, row in enumerate(rows):
        lx, y = right, 16 + 18 * r
        for name in reversed(row):
            color = PALETTE[names.index(name) % len(PALETTE)]
            lx -= _legend_width(name)
            out.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="3"/>'
                       f'<circle cx="{lx + 9}" cy="{y}" r="3.5" fill="{color}"/>'
                       f'<text x="{lx + 24}" y="{y + 4}" class="legend">{esc(name)}</text>')
    return out, len(rows) - 1


def line_chart_svg(series: dict[str, list], title: str = "", x_label: str = "step", y_label: str = "loss",
                   empty: str = "No points yet: the first one appears after the first logged step.",
                   faint: tuple[str, ...] = ()) -> str:
    """Several named series of (x, y) points as one SVG chart with axes, markers, hover titles and a legend.
    Series named in `faint` are drawn thin and pale (the raw values behind a smoothed line)."""
    pts = {k: [(float(x), float(y)) for x, y in v if math.isfinite(float(y))] for k, v in series.items()}
    pts = {k: v for k, v in pts.items() if v}
    if not pts:
        return f'<div class="chart empty"><div class="chart-title">{esc(title)}</div><div class="muted">{esc(empty)}</div></div>'
    W, H, L, R, T, B = 900, 300, 64, 16, 34, 44
    legend, rows = _legend(list(pts), W - R, L, title)
    T, H = T + 18 * rows, H + 18 * rows
    xs = [x for v in pts.values() for x, _ in v]
    ys = [y for v in pts.values() for _, y in v]
    xt = nice_ticks(min(xs), max(xs), 8, integer=True)
    pad = (max(ys) - min(ys)) * 0.08 or abs(max(ys)) * 0.05 or 0.1
    yt = nice_ticks(min(ys) - pad, max(ys) + pad, 5)
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    sx = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)  # noqa: E731
    sy = lambda y: H - B - (y - y0) / (y1 - y0) * (H - T - B)  # noqa: E731
    out = [f'<svg viewBox="0 0 {W} {H}" width="100%" role="img" aria-label="{esc(title)}" class="line-chart">']
    for y in yt:
        out.append(f'<line x1="{L}" x2="{W - R}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#e5e7eb"/>'
                   f'<text x="{L - 6}" y="{sy(y) + 4:.1f}" text-anchor="end" class="tick">{y:.4g}</text>')
    for x in xt:
        out.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{T}" y2="{H - B}" stroke="#f3f4f6"/>'
                   f'<text x="{sx(x):.1f}" y="{H - B + 16}" text-anchor="middle" class="tick">{x:g}</text>')
    out.append(f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="none" stroke="#d1d5db"/>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 8}" text-anchor="middle" class="axis">{esc(x_label)}</text>')
    out.append(f'<text x="14" y="{(T + H - B) / 2}" text-anchor="middle" class="axis" '
               f'transform="rotate(-90 14 {(T + H - B) / 2})">{esc(y_label)}</text>')
    out.append(f'<text x="{L}" y="20" class="chart-title">{esc(title)}</text>')
    out += legend
    for i, (name, v) in enumerate(pts.items()):
        color = PALETTE[i % len(PALETTE)]
        v = sorted(v)
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in v)
        look = 'stroke-width="1.2" stroke-opacity="0.35"' if name in faint else 'stroke-width="2.2"'
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" {look} '
                   f'stroke-linejoin="round" data-series="{esc(name)}" data-points="{len(v)}"/>')
        marks = v if len(v) <= 60 else [v[-1]]
        for x, y in marks:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{color}">'
                       f'<title>{esc(name)} at step {x:g}: {y:.4f}</title></circle>')
    out.append("</svg>")
    return f'<div class="chart">{"".join(out)}</div>'


def loss_chart(live: dict | None) -> str:
    if not live:
        return line_chart_svg({}, "Loss", empty="Select a job to see its loss curve.")
    raw = list(_points(live.get("loss_history"), "loss"))
    series = {"train loss": raw, "eval loss": list(_points(live.get("eval_history"), "eval_loss"))}
    if len(raw) >= SMOOTH_FROM:
        series["train loss, smoothed"] = smoothed(raw)
    empty = ("Waiting for the first logged step (the model is loading or the data is being prepared)."
             if live.get("state") in ("queued", "running") else "This job logged no loss.")
    smooth = len(raw) >= SMOOTH_FROM
    return line_chart_svg(series, "Loss (raw train loss faint)" if smooth else "Loss", "optimizer step", "loss",
                          empty=empty, faint=("train loss",) if smooth else ())


SMOOTH_FROM = 4  # points before a smoothed line says more than the raw one


def smoothed(points: list, weight: float = 0.8) -> list:
    """Exponential moving average of (x, y) points, bias-corrected so the line starts at the first value."""
    out, avg = [], 0.0
    for i, (x, y) in enumerate(sorted(points), start=1):
        avg = weight * avg + (1 - weight) * y
        out.append((x, avg / (1 - weight ** i)))
    return out


def overlay_chart(lives: list[dict]) -> str:
    series = {f"{live['name']} ({live['id'][-4:]})": list(_points(live.get("loss_history"), "loss")) for live in lives}
    return line_chart_svg(series, "Training loss of the selected runs", "optimizer step", "loss",
                          empty="Pick two or more runs to overlay their training loss.")


# --- memory plan ---------------------------------------------------------------------------------------------------
PLAN_COLORS = {"base_weights": "#2563eb", "embeddings_lm_head_norms": "#60a5fa", "lora_weights": "#16a34a",
               "optimizer_states": "#4ade80", "lora_gradients": "#86efac", "runtime": "#9ca3af",
               "saved_layer_inputs": "#f59e0b", "layer_recompute": "#f97316", "logits_loss": "#ef4444",
               "optimizer_workspace": "#a3e635", "loading_transient": "#a855f7", "fsdp_unsharded": "#7c3aed",
               "heap_retained": "#d1d5db",
               "allocator_cache": "#e5e7eb", "cuda_context": "#6b7280"}


def plan_segments(plan: dict) -> list[tuple[str, float]]:
    """(part, GiB) from the bottom of the bar up: the peak's breakdown, then what the device needs beside it."""
    parts = [(k, float(v)) for k, v in (plan.get("breakdown") or {}).items() if num(v) and v > 0]
    cache = (num(plan.get("reserved_gib")) or 0) - (num(plan.get("peak_gib")) or 0)
    context = (num(plan.get("needed_gib")) or 0) - (num(plan.get("reserved_gib")) or 0)
    parts += [(k, v) for k, v in (("allocator_cache", cache), ("cuda_context", context)) if v > 0.0005]
    return parts


def memory_plan_html(plan: dict) -> str:
    """A stacked bar of the plan's breakdown against the device's memory, the verdict, and (when it does not fit)
    the ranked suggestions, each with its own estimate."""
    device = num(plan.get("device_memory_gib")) or 0
    needed = num(plan.get("needed_gib")) or 0
    fits = bool(plan.get("fits"))
    dev = plan.get("device") or {}
    width = max(device, needed, 1e-9)
    x, rects, legend = 0.0, [], []
    for name, gib in plan_segments(plan):
        w = 1000 * gib / width
        color = PLAN_COLORS.get(name, "#cbd5e1")
        rects.append(f'<rect x="{x:.1f}" y="8" width="{max(w, 0.5):.1f}" height="26" fill="{color}">'
                     f'<title>{esc(name.replace("_", " "))}: {gib:.2f} GiB</title></rect>')
        legend.append(f'<span class="mem-key"><i style="background:{color}"></i>{esc(name.replace("_", " "))} '
                      f'{gib:.2f}</span>')
        x += w
    mark = 1000 * device / width
    svg = (f'<svg class="mem-bar" viewBox="0 0 1000 42" preserveAspectRatio="none" width="100%" height="42" '
           f'role="img" aria-label="memory plan">'
           f'<rect x="0" y="8" width="1000" height="26" fill="#f3f4f6"/>{"".join(rects)}'
           f'<line x1="{mark:.1f}" x2="{mark:.1f}" y1="2" y2="40" stroke="#111827" stroke-width="3"/></svg>')
    verdict = (f'<span class="badge" style="background:{"#16a34a" if fits else "#dc2626"}">'
               f'{"fits" if fits else "does not fit"}</span>')
    head = (f'<div class="mem-head">{verdict} <b>{needed:.2f} GiB</b> needed of {device:.2f} GiB '
            f'({esc(dev.get("name") or dev.get("kind"))}); peak {"allocated" if dev.get("kind") == "cuda" else "resident"} {num(plan.get("peak_gib")) or 0:.2f} GiB '
            f'while {esc(str(plan.get("peak_phase", "")).replace("_", " "))}, '
            f'{esc(plan.get("tokens_per_micro_batch"))} tokens per micro-batch</div>')
    limits = (f'<div class="muted small">longest max_seq_length that fits: '
              f'{esc(plan.get("longest_max_seq_length_that_fits") or "none")}; largest batch that fits: '
              f'{esc(plan.get("largest_batch_that_fits") or "none")}'
              + (f'; fewest checkpointed layers that fit: {esc(plan["fewest_checkpointed_layers_that_fit"])}'
                 if plan.get("fewest_checkpointed_layers_that_fit") is not None else "") + '</div>')
    notes = "".join(f'<div class="muted small">{esc(n)}</div>' for n in plan.get("notes") or [])
    return (f'<div class="mem-plan" data-fits="{str(fits).lower()}" data-needed="{needed:.3f}">{head}{svg}'
            f'<div class="mem-legend small">{"".join(legend)} <span class="muted">(GiB; the black line is the '
            f'device)</span></div>{limits}{notes}{plan_warning_html(plan)}</div>')


def plan_warning_html(plan: dict) -> str:
    """The ranked suggestions of a plan that does not fit ("" when it fits)."""
    if plan.get("fits"):
        return ""
    items = []
    for s in plan.get("suggestions") or []:
        sets = ", ".join(f"{k}={v}" for k, v in (s.get("set") or {}).items())
        items.append(f'<li><b>{esc(s.get("change"))}</b> <code>{esc(sets)}</code>: needs '
                     f'{num(s.get("needed_gib")) or 0:.2f} GiB{" (fits)" if s.get("fits") else " (still too much)"}</li>')
    return (f'<div class="msg warn mem-warn"><b>This job does not fit the device\'s memory.</b> Changes that lower '
            f'it, best first:<ol>{"".join(items)}</ol></div>')


# --- distillation: teacher, student and base side by side -------------------------------------------------------
DISTILL_COLUMNS = [("rouge_l_vs_teacher", "ROUGE-L vs teacher's answers"), ("kl_to_teacher", "KL(teacher ‖ model) per token"),
                   ("tokens_per_second", "tokens/s"), ("latency_s", "latency (s)"), ("peak_memory_mb", "peak memory (MiB)")]


def distill_eval_html(result: dict | None) -> str:
    """studio.json's distill_eval as a table: one row per model (teacher, student, base), quality and cost."""
    models = obj(obj(result).get("models"))
    if not models:
        return ""
    head = "<tr><th>model</th>" + "".join(f"<th>{esc(label)}</th>" for _, label in DISTILL_COLUMNS) + "</tr>"
    rows = []
    for side in ("teacher", "student", "base"):
        m = obj(models.get(side))
        cells = "".join(f'<td class="num">{fmt_num(m.get(key))}</td>' for key, _ in DISTILL_COLUMNS)
        rows.append(f"<tr><td>{esc(side)}: {esc(m.get('model'))}</td>{cells}</tr>")
    n = obj(result.get("data")).get("examples")
    return (f'<div class="distill-eval"><b>Teacher, student and base on {esc(n)} held-out prompts</b>'
            f'<table class="eval-table"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></div>')
