"""Two adapters compared on the same held-out examples, from their stored evaluations (python -m finetune eval):
the paired difference adapter - against per example, with the bootstrap interval of the evaluation's own rule."""
from __future__ import annotations

from finetune.evaluation import metrics as M


def _scores(adapter: str, key: str) -> dict[tuple[str, str], float]:
    from finetune.evaluation.evaluate import cached_results

    results = cached_results(adapter)
    if not results:
        raise ValueError(f"adapter {adapter!r} has no stored evaluation: python -m finetune eval --adapter {adapter}")
    return {(ex["prompt"], ex["reference"]): ex["scores"]["adapter"][key]
            for ex in results[0].get("examples", []) if ex["scores"]["adapter"].get(key) is not None}


def compare(adapter: str, against: str, metric: str = "rouge_l") -> dict:
    """Paired statistics of `metric` (a registry name with per-example scores) over the examples both have."""
    from finetune.evaluation.evaluate import BOOTSTRAP

    m = next((m for m in M.METRICS if m.name == metric and m.example_key), None)
    if m is None:
        raise ValueError(f"metric {metric!r}: one of {', '.join(x.name for x in M.METRICS if x.example_key)}")
    a, b = _scores(adapter, m.example_key), _scores(against, m.example_key)
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError(f"{adapter} and {against} were not evaluated on the same examples")
    stats = M.paired_stats([b[k] for k in common], [a[k] for k in common], higher_is_better=m.higher_is_better,
                           **BOOTSTRAP)
    return {"metric": metric, "adapter": adapter, "against": against, **stats}
