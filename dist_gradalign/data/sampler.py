"""The per-round client sampler: a pure function of (seed, round)."""
from __future__ import annotations

import numpy as np

_TAG = 0x5A3F1  # separates this stream from every other use of the run's seed


def sample_clients(seed: int, round: int, num_clients: int, k: int) -> list[int]:
    """Return ``k`` distinct client ids in ``[0, num_clients)``, sorted ascending.

    Chosen uniformly without replacement by a generator seeded with ``(seed, round)`` alone,
    so every rank draws the same clients and a resumed run draws what the original would have.
    ``k == num_clients`` returns every id.
    """
    if not 1 <= k <= num_clients:
        raise ValueError(f"cannot sample {k} clients out of {num_clients}: need 1 <= k <= num_clients")
    if k == num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(np.random.SeedSequence([seed, round, _TAG]))
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))
