"""Win rates with bootstrap intervals, diversity of generations, and KL from generate's scores."""

from __future__ import annotations

import math
import random
from collections import Counter


def win_rate(outcomes: list[float]) -> float | None:
    """Mean of per-item outcomes: 1 win, 0.5 tie, 0 loss."""
    return sum(outcomes) / len(outcomes) if outcomes else None


def bootstrap_ci(values: list[float], resamples: int, seed: int, level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap interval of the mean (items resampled with replacement)."""
    if not values or resamples == 0:
        return None
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    lo = means[int(math.floor(tail * (resamples - 1)))]
    hi = means[int(math.ceil((1 - tail) * (resamples - 1)))]
    return [lo, hi]


def words(text: str) -> list[str]:
    return text.lower().split()


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct(texts: list[str], n: int) -> float | None:
    """distinct-n: unique n-grams over all n-grams, pooled over the texts (Li et al. 2016)."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else None


def bleu(hypothesis: list[str], references: list[list[str]], max_n: int = 4) -> float:
    """Sentence BLEU with clipped counts over several references, brevity penalty against the
    closest reference length, and add-one smoothing of the n-gram precisions (Lin & Och 2004) so
    short texts do not collapse to zero."""
    if not hypothesis:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        counts = Counter(ngrams(hypothesis, n))
        most = Counter()
        for ref in references:
            for gram, c in Counter(ngrams(ref, n)).items():
                most[gram] = max(most[gram], c)
        clipped = sum(min(c, most[g]) for g, c in counts.items())
        total = sum(counts.values())
        log_p += math.log((clipped + 1) / (total + 1)) if n > 1 else math.log(max(clipped, 1e-9) / max(total, 1))
    closest = min((len(r) for r in references), key=lambda r: (abs(r - len(hypothesis)), r))
    penalty = 1.0 if len(hypothesis) > closest else math.exp(1 - closest / len(hypothesis))
    return penalty * math.exp(log_p / max_n)


def self_bleu(texts: list[str], limit: int = 200, seed: int = 0) -> float | None:
    """Mean BLEU of each text against all the others (Zhu et al. 2018): higher = less diverse.
    Quadratic, so at most ``limit`` texts (a seeded sample) are used."""
    tokenized = [words(t) for t in texts if t.strip()]
    if len(tokenized) < 2:
        return None
    if len(tokenized) > limit:
        tokenized = random.Random(seed).sample(tokenized, limit)
    scores = [bleu(h, tokenized[:i] + tokenized[i + 1:]) for i, h in enumerate(tokenized)]
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
