"""Win rates with bootstrap intervals, diversity of generations, and KL from generate's scores.

Intervals come from ``scipy.stats.bootstrap`` (BCa, the bias-corrected and accelerated bootstrap);
self-BLEU is sacreBLEU's sentence BLEU (13a tokens, exp smoothing, effective order: what
``sacrebleu.sentence_bleu`` gives), so figures compare with published ones.
"""

from __future__ import annotations

import math
import random
import re
import warnings

# Bootstrap work is done in batches of about this many resampled values (memory stays ~100 MB
# whatever the number of items; BCa's jackknife is quadratic in them).
BATCH_VALUES = 4_000_000
BLEU_ORDER = 4


def win_rate(outcomes: list[float]) -> float | None:
    """Mean of per-item outcomes: 1 win, 0.5 tie, 0 loss."""
    return sum(outcomes) / len(outcomes) if outcomes else None


def bootstrap_ci(values: list[float], resamples: int, seed: int, level: float = 0.95) -> list[float] | None:
    """BCa bootstrap interval of the mean (items resampled with replacement), seeded: the same
    values and seed give the same interval. Values that are all equal have the interval [v, v];
    where BCa is undefined (its acceleration needs spread in the jackknife) the percentile
    interval is given."""
    if not values or resamples == 0:
        return None
    import numpy as np
    from scipy import stats as sps

    data = np.asarray(values, dtype=float)
    if data.min() == data.max():
        return [float(data[0]), float(data[0])]
    interval = None
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():  # DegenerateDataWarning & co: handled below, not printed
            warnings.simplefilter("ignore")
            result = sps.bootstrap((data,), np.mean, n_resamples=resamples, confidence_level=level, method=method,
                                   rng=np.random.default_rng(seed), batch=max(1, BATCH_VALUES // len(data)))
        interval = [float(result.confidence_interval.low), float(result.confidence_interval.high)]
        if all(math.isfinite(v) for v in interval):
            break
    return interval


def words(text: str) -> list[str]:
    return text.lower().split()


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct(texts: list[str], n: int) -> float | None:
    """distinct-n: unique n-grams over all n-grams, pooled over the texts (Li et al. 2016)."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else None


def _sacrebleu():
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=True)  # sacrebleu.sentence_bleu's settings


def bleu_signature() -> str:
    """sacreBLEU's signature of the sentence BLEU used for self-BLEU, without nrefs (each text has
    all the others as references)."""
    metric = _sacrebleu()
    metric.sentence_score("a", ["a"])  # the signature is known once the metric has been used
    return re.sub(r"^nrefs:\d+\|", "", str(metric.get_signature()))


def self_bleu(texts: list[str], limit: int = 1000, seed: int = 0) -> float | None:
    """Mean sentence BLEU of each text against all the others as references (Zhu et al. 2018),
    in [0, 1]: higher = less diverse. Each term is exactly ``sacrebleu.sentence_bleu(text,
    others).score / 100``; n-gram counts are taken once per text, and the clip of an n-gram "over
    the others" is its largest count in any text but this one, so the cost is linear in the texts
    instead of quadratic. At most ``limit`` texts (a seeded sample) are used."""
    kept = [t for t in texts if t.strip()]
    if len(kept) < 2:
        return None
    if len(kept) > limit:
        kept = random.Random(seed).sample(kept, limit)
    metric = _sacrebleu()
    from sacrebleu.metrics.helpers import extract_all_word_ngrams

    counts, lengths = [], []
    for text in kept:
        grams, length = extract_all_word_ngrams(metric.tokenizer(text.rstrip()), 1, BLEU_ORDER)
        counts.append(grams)
        lengths.append(length)
    # Per n-gram: the largest count, the text holding it, and the second largest.
    best: dict[tuple, list] = {}
    for i, grams in enumerate(counts):
        for gram, c in grams.items():
            top = best.setdefault(gram, [0, -1, 0])
            if c > top[0]:
                top[:] = [c, i, top[0]]
            elif c > top[2]:
                top[2] = c
    scores = []
    for i, grams in enumerate(counts):
        correct, total = [0] * BLEU_ORDER, [0] * BLEU_ORDER
        for gram, c in grams.items():
            top = best[gram]
            other = top[2] if top[1] == i else top[0]
            total[len(gram) - 1] += c
            correct[len(gram) - 1] += min(c, other)
        others = lengths[:i] + lengths[i + 1:]
        ref_len = min(others, key=lambda r: (abs(lengths[i] - r), r))  # closest; a tie: the shorter
        score = metric.compute_bleu(correct, total, lengths[i], ref_len, smooth_method="exp",
                                    effective_order=True, max_ngram_order=BLEU_ORDER)
        scores.append(score.score / 100)
    return sum(scores) / len(scores)


def diversity(texts: list[str], seed: int = 0) -> dict:
    lengths = [len(words(t)) for t in texts]
    return {
        "distinct_1": distinct(texts, 1),
        "distinct_2": distinct(texts, 2),
        "self_bleu": self_bleu(texts, seed=seed),
        "mean_words": sum(lengths) / len(lengths) if lengths else None,
    }


def kl(records: list[dict]) -> dict | None:
    """KL(π‖π_ref) estimated from samples of π: mean over completions of log π(y|x) - log π_ref(y|x)
    (the quantity the TR-DPO paper plots against win rate), and the same per token."""
    scored = [r for r in records if isinstance(r.get("logp"), (int, float)) and isinstance(r.get("ref_logp"), (int, float))]
    if not scored:
        return None
    diffs = [r["logp"] - r["ref_logp"] for r in scored]
    tokens = sum(r.get("n_tokens") or len(r.get("token_logps") or []) for r in scored)
    return {
        "mean": sum(diffs) / len(diffs),
        "per_token": sum(diffs) / tokens if tokens else None,
        "mean_tokens": tokens / len(scored),
        "n": len(scored),
    }
