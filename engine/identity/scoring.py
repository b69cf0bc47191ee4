"""Verification metrics: ROC AUC, equal error rate and their bootstrap confidence intervals."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

Scores = npt.NDArray[np.float64]
Labels = npt.NDArray[np.bool_]


def roc_auc(scores: Scores, labels: Labels) -> float:
    """Area under the ROC curve, by the rank-sum formula.

    The chance a random positive outscores a random negative (ties count half).

    Raises:
        ValueError: there are no positives or no negatives.
    """
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        raise ValueError("AUC needs both positive and negative pairs")
    values, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1
    mean_rank = first_rank + (counts - 1) / 2  # ties share their average rank
    ranks = mean_rank[inverse]
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def eer(scores: Scores, labels: Labels) -> float:
    """Equal error rate: where the false-accept and false-reject rates meet (interpolated)."""
    pos, neg = np.sort(scores[labels]), np.sort(scores[~labels])
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("EER needs both positive and negative pairs")
    thresholds = np.unique(scores)
    far = 1.0 - np.searchsorted(neg, thresholds, side="left") / len(neg)
    frr = np.searchsorted(pos, thresholds, side="left") / len(pos)
    i = int(np.argmin(np.abs(far - frr)))
    return float((far[i] + frr[i]) / 2)


def bootstrap_ci(
    metric: Callable[[Scores, Labels], float],
    scores: Scores,
    labels: Labels,
    groups: npt.NDArray[np.int64],
    *,
    rounds: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric``, resampling whole groups (identities).

    Pairs of one identity are not independent, so identities are drawn with replacement and all
    their pairs come along; ``groups[i]`` is the group of pair ``i``.
    """
    rng = np.random.default_rng(seed)
    names = np.unique(groups)
    members = {g: np.flatnonzero(groups == g) for g in names}
    values = []
    for _ in range(rounds):
        drawn = rng.choice(names, size=len(names), replace=True)
        index = np.concatenate([members[g] for g in drawn])
        if labels[index].all() or not labels[index].any():
            continue
        values.append(metric(scores[index], labels[index]))
    if not values:
        raise ValueError("no bootstrap round had both positive and negative pairs")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)
