"""Analysis: pure functions over embeddings and scores (no awaits, no I/O).

Offline and live pipelines call the same functions, so a number in a report and the same number
on a live stream come from one implementation.
"""

from engine.analysis.sync import (
    SyncEstimate,
    estimate_sync,
    lip_match,
    medfilt,
    pairwise_shift_distances,
)

__all__ = [
    "SyncEstimate",
    "estimate_sync",
    "lip_match",
    "medfilt",
    "pairwise_shift_distances",
]
