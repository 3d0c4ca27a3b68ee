"""The length-controlled win rate (AlpacaEval 2) and Bradley-Terry scores (Arena-Hard), with
bootstrap intervals over items.

**Length control** (Dubois et al. 2024, "Length-Controlled AlpacaEval: A Simple Way to Debias
Automatic Evaluators"): a logistic regression of the judge's preference for the candidate on an
intercept and tanh((len_candidate - len_baseline) / std(len differences)), lengths in characters
as alpaca_eval counts them; the length-controlled win rate is the predicted preference with the
length term set to zero, sigmoid(intercept). The published GLM also has an instruction-difficulty
term, which needs many models per instruction: with two models it is omitted. Preferences may be
soft (AlpacaEval's logprob preferences): the fit maximizes the Bernoulli likelihood with the
preference as the target, as alpaca_eval does.

**Bradley-Terry** (as arena-hard-auto's compute_mle_elo): P(i beats j) = sigmoid(θ_i - θ_j),
fitted by maximum likelihood on weighted battles (a tie is half a win for each side), one player
(the baseline) anchored at θ = 0; a player's score is its predicted win rate against the anchor,
sigmoid(θ_i). With two players the fit is the weighted wins over all battles: the strength ratio
exp(θ_candidate - θ_baseline) equals the odds of the battles.

Both fits add a vanishing L2 penalty (RIDGE) so that separable data (all wins; 0/1 preferences
that length predicts exactly) give a large but finite estimate instead of diverging. Intervals
are percentile bootstrap intervals: items (prompts) are resampled with replacement, seeded, and
the model refitted on each resample (arena-hard-auto resamples battles; alpaca_eval reports no
interval for the length-controlled win rate).
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

RIDGE = 1e-6
MAX_ITER = 200
TOL = 1e-10


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def _newton(loglik, grad_hess, start: np.ndarray) -> np.ndarray:
    """Maximize a concave function by Newton's method with step halving."""
    beta, value = start, loglik(start)
    for _ in range(MAX_ITER):
        g, h = grad_hess(beta)
        step = np.linalg.solve(h, g)
        scale = 1.0
        while True:
            trial = beta + scale * step
            new = loglik(trial)
            if new >= value - 1e-12 * abs(value) or scale < 1e-8:
                break
            scale /= 2
        beta, value = trial, new
        if np.max(np.abs(scale * step)) < TOL:
            break
    return beta


# ---------------------------------------------------------------- length control

def length_feature(deltas: np.ndarray) -> tuple[np.ndarray, float]:
    """tanh(delta / std(deltas)) (sample std, as pandas'), and the std; all zeros where the
    differences do not vary (fewer than two items, or all the same)."""
    deltas = np.asarray(deltas, dtype=float)
    std = float(np.std(deltas, ddof=1)) if len(deltas) > 1 else 0.0
    if not std > 0:
        return np.zeros_like(deltas), 0.0
    return np.tanh(deltas / std), std


def fit_glm(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float]:
    """(intercept, slope) of logit P = intercept + slope * x, by maximum likelihood on soft labels y."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=float)
    design = np.column_stack([np.ones_like(x), x])

    def loglik(beta):
        eta = design @ beta
        return float(-(w * (y * _softplus(-eta) + (1 - y) * _softplus(eta))).sum() - RIDGE / 2 * beta @ beta)

    def grad_hess(beta):
        p = expit(design @ beta)
        g = design.T @ (w * (y - p)) - RIDGE * beta
        h = design.T @ (design * (w * p * (1 - p))[:, None]) + RIDGE * np.eye(2)
        return g, h

    a, b = _newton(loglik, grad_hess, np.zeros(2))
    return float(a), float(b)


def length_controlled(deltas, preferences) -> dict:
    """The length-controlled win rate of preferences (the candidate's, in [0, 1]) given the
    candidate-minus-baseline length differences of the same items."""
    deltas, y = np.asarray(deltas, dtype=float), np.asarray(preferences, dtype=float)
    x, std = length_feature(deltas)
    a, b = fit_glm(x, y)
    return {"lc_win_rate": float(expit(a)), "intercept": a, "length_slope": b, "length_std_chars": std,
            "n": int(len(y))}


def _percentile(values: np.ndarray, level: float) -> list[float]:
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail], axis=0)
    return [float(lo), float(hi)] if np.ndim(lo) == 0 else [lo, hi]


def length_controlled_ci(deltas, preferences, resamples: int, seed: int, level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap interval of the length-controlled win rate: items resampled, the length
    scale recomputed and the GLM refitted on each resample."""
    deltas, y = np.asarray(deltas, dtype=float), np.asarray(preferences, dtype=float)
    if len(y) == 0 or resamples == 0:
        return None
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for r in range(resamples):
        idx = rng.integers(0, len(y), len(y))
        x, _ = length_feature(deltas[idx])
        stats[r] = expit(fit_glm(x, y[idx])[0])
    return _percentile(stats, level)


# ---------------------------------------------------------------- Bradley-Terry

def bt_fit(players: int, pairs: list[tuple[int, int]], wins, anchor: int = 0) -> np.ndarray:
    """Log-strengths θ (θ[anchor] = 0) of a Bradley-Terry model. ``pairs[k] = (i, j)`` and
    ``wins[k] = (w_i, w_j)``: the weighted battles of that pair won by i and by j (ties split half
    and half beforehand). A player with no battle, or none linked to the anchor, stays near 0."""
    wins = np.asarray(wins, dtype=float).reshape(len(pairs), 2)
    first = np.array([i for i, _ in pairs], dtype=int)
    second = np.array([j for _, j in pairs], dtype=int)
    total = wins.sum(axis=1)
    free = np.array([p for p in range(players) if p != anchor], dtype=int)

    def full(beta):
        theta = np.zeros(players)
        theta[free] = beta
        return theta

    def loglik(beta):
        theta = full(beta)
        d = theta[first] - theta[second]
        return float(-(wins[:, 0] * _softplus(-d) + wins[:, 1] * _softplus(d)).sum() - RIDGE / 2 * beta @ beta)

    def grad_hess(beta):
        theta = full(beta)
        p = expit(theta[first] - theta[second])
        gd = wins[:, 0] - total * p  # d loglik / d (θ_i - θ_j)
        hd = total * p * (1 - p)
        g = np.zeros(players)
        np.add.at(g, first, gd)
        np.add.at(g, second, -gd)
        h = np.zeros((players, players))
        np.add.at(h, (first, first), hd)
        np.add.at(h, (second, second), hd)
        np.add.at(h, (first, second), -hd)
        np.add.at(h, (second, first), -hd)
        return g[free] - RIDGE * beta, h[np.ix_(free, free)] + RIDGE * np.eye(len(free))

    if len(free) == 0:
        return np.zeros(players)
    return full(_newton(loglik, grad_hess, np.zeros(len(free))))


def bt_scores(players: int, pairs: list[tuple[int, int]], table, resamples: int, seed: int, anchor: int = 0,
              level: float = 0.95) -> dict:
    """Bradley-Terry fit on per-item battle tables and its bootstrap over items.

    ``table[item, k] = (w_i, w_j)`` for ``pairs[k] = (i, j)`` (zeros where that pair has no battle
    on that item). Returns ``theta`` (log-strengths, anchor 0), ``win_rate`` (sigmoid(θ): each
    player's predicted win rate against the anchor) and ``ci95`` (per player, percentile interval
    of the win rate over resampled items; None without resamples)."""
    table = np.asarray(table, dtype=float).reshape(-1, len(pairs), 2)
    theta = bt_fit(players, pairs, table.sum(axis=0), anchor)
    out = {"theta": theta.tolist(), "win_rate": expit(theta).tolist(), "ci95": None}
    n = table.shape[0]
    if resamples == 0 or n == 0:
        return out
    rng = np.random.default_rng(seed)
    draws = np.empty((resamples, players))
    for r in range(resamples):
        counts = np.bincount(rng.integers(0, n, n), minlength=n).astype(float)
        draws[r] = expit(bt_fit(players, pairs, np.tensordot(counts, table, axes=1), anchor))
    lo, hi = _percentile(draws, level)
    out["ci95"] = [[float(a), float(b)] for a, b in zip(lo, hi)]
    return out


# ---------------------------------------------------------------- Arena-Hard battles

STRONG_WEIGHT = 3  # arena-hard-auto's WEIGHT: a [[A>>B]] verdict counts as three battles won


def arena_battles(judgments: list[dict], unparseable: str = "exclude") -> tuple[float, float]:
    """(candidate, baseline): the weighted battles of one item's games won by each side, a tie
    being half a battle for each (as Bradley-Terry counts it). A game is ``{"winner":
    "candidate" | "baseline" | "tie" | None, "strong": bool}``; a game without a verdict counts per
    ``unparseable``: exclude (no battle, as arena-hard-auto drops it), tie, or loss (one battle won
    by the baseline)."""
    cand = base = 0.0
    for game in judgments:
        winner, weight = game.get("winner"), STRONG_WEIGHT if game.get("strong") else 1
        if winner is None:
            if unparseable == "exclude":
                continue
            winner, weight = ("tie" if unparseable == "tie" else "baseline"), 1
        if winner == "tie":
            cand, base = cand + 0.5, base + 0.5
        elif winner == "candidate":
            cand += weight
        else:
            base += weight
    return cand, base
