"""Scores for generated answers and paired base-vs-adapter statistics. Pure Python (+ numpy, rouge-score), no torch,
so the UI and tests can import it cheaply.

Text metrics follow the SQuAD evaluation script (normalise, then exact match / bag-of-tokens F1), and ROUGE-L is
Google's `rouge-score` implementation, so the numbers mean what readers of papers expect them to mean.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from functools import lru_cache
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)

# Differences smaller than this count as ties: float noise must not turn into "wins".
TIE_EPSILON = 1e-9


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over the normalised bags of words (SQuAD F1)."""
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not pred or not ref:
        # SQuAD's convention: two empty answers agree, one empty answer scores 0.
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred)
    recall = overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    # No stemmer: the same choice as Hugging Face `evaluate`'s default, and easy to check by hand.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of tokens), from `rouge-score`."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def perplexity(mean_loss: float | None) -> float | None:
    """exp(mean token cross-entropy); inf when it overflows, None when there is no loss."""
    if mean_loss is None or (isinstance(mean_loss, float) and math.isnan(mean_loss)):
        return None
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class Metric:
    """One evaluation metric: the one table that evaluation, rendering and sorting read."""
    name: str                 # key in the per-side summaries and the paired statistics
    label: str                # what the UI calls it
    higher_is_better: bool
    fn: Callable[[str, str], float] | None = None  # per-example text score (prediction, reference), else None
    example_key: str | None = None  # key of the per-example score (paired and sortable), when there is one
    bounded: bool = True      # values in [0, 1]: bars share one scale


METRICS: tuple[Metric, ...] = (
    Metric("rouge_l", "ROUGE-L", True, rouge_l, "rouge_l"),
    Metric("token_f1", "token F1", True, token_f1, "token_f1"),
    Metric("exact_match", "exact match", True, exact_match, "exact_match"),
    Metric("mc_accuracy", "multiple-choice accuracy", True, example_key="mc_correct"),
    Metric("val_loss", "validation loss", False, example_key="loss", bounded=False),
    Metric("perplexity", "perplexity", False, bounded=False),
)
TEXT_METRICS: tuple[Metric, ...] = tuple(m for m in METRICS if m.fn is not None)
# Per-example scores the examples table can sort by (multiple choice is right or wrong: nothing to sort).
SORTABLE: tuple[str, ...] = tuple(m.example_key for m in METRICS if m.fn is not None or m.name == "val_loss")


def metric_for_example_key(key: str) -> Metric | None:
    """The metric whose per-example score is stored under `key`, or None for an unknown key."""
    return next((m for m in METRICS if m.example_key == key), None)


def text_scores(prediction: str, reference: str) -> dict[str, float]:
    """All per-example generation metrics at once."""
    return {m.name: m.fn(prediction, reference) for m in TEXT_METRICS}


def mean(values: Sequence[float]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def paired_stats(base: Sequence[float], adapter: Sequence[float], *, higher_is_better: bool = True, n_resamples: int = 2000,
                 seed: int = 0, epsilon: float = TIE_EPSILON, confidence: float = 0.95) -> dict:
    """Per-example differences adapter - base: mean, bootstrap percentile CI of the mean, win/tie/loss counts.

    The difference is always adapter - base; a "win" is the adapter being better, i.e. a positive difference, or a
    negative one when lower is better (losses, perplexity).

    The bootstrap resamples examples (the pairs stay together), so the interval reflects how much the mean difference
    would move on another held-out sample of the same size. A fixed seed keeps a cached result reproducible.
    """
    if len(base) != len(adapter):
        raise ValueError(f"paired_stats: {len(base)} base scores but {len(adapter)} adapter scores")
    diffs = np.asarray(adapter, dtype=float) - np.asarray(base, dtype=float)
    n = int(diffs.size)
    better = diffs if higher_is_better else -diffs
    wins = int((better > epsilon).sum())
    losses = int((better < -epsilon).sum())
    out = {"n": n, "higher_is_better": higher_is_better, "mean_diff": None, "ci_low": None, "ci_high": None,
           "wins": wins, "ties": n - wins - losses, "losses": losses,
           "base_mean": mean(base), "adapter_mean": mean(adapter)}
    if n == 0:
        return out
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    means = diffs[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    out.update(mean_diff=float(diffs.mean()), ci_low=float(lo), ci_high=float(hi))
    return out
