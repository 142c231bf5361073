"""Learning-rate schedules by round (``algorithm.lr_schedule``; Goyal et al. 2017's linear
warmup, then step or cosine decay), as a factor s(t) of round t = 1, 2, ..., T
(T = ``train.rounds``, W = ``algorithm.warmup_rounds``):

- warmup, t <= W: s(t) = t / W (linear, reaching 1 at round W);
- ``constant`` (the default, the paper's): s(t) = 1;
- ``step``: s(t) = gamma^k, k the number of milestones m with t > m (``lr_milestones``,
  ``lr_gamma``): the factor drops from round m + 1;
- ``cosine``: s(t) = f + (1 - f) (1 + cos(pi p)) / 2 with p = (t - W - 1) / (T - W), so s = 1
  at round W + 1 and falls towards f = ``lr_min_factor`` (reached one round after T).

Round t's local step size is alpha_t = lr s(t); with ``schedule_server`` the server's is
``server_lr`` s(t); beta is fixed, or with ``beta_schedule: scaled`` beta s(t). (The paper ties
FedGA's implicit regularizer to alpha beta K r (Theorem 4): with a fixed beta it shrinks as
alpha_t does; scaled, as alpha_t^2.) A pure function of the round: a resumed run continues the
schedule exactly, on any world size.
"""
from __future__ import annotations

import math

from ..config import AlgorithmConfig


def lr_factor(cfg: AlgorithmConfig, rnd: int, rounds: int) -> float:
    """s(t) for round ``rnd`` (1-based) of a run of ``rounds`` rounds."""
    w = cfg.warmup_rounds
    if w and rnd <= w:
        return rnd / w
    if cfg.lr_schedule == "step":
        return cfg.lr_gamma ** sum(rnd > m for m in cfg.lr_milestones)
    if cfg.lr_schedule == "cosine":
        p = (rnd - w - 1) / (rounds - w)
        return cfg.lr_min_factor + (1 - cfg.lr_min_factor) * 0.5 * (1 + math.cos(math.pi * p))
    return 1.0


def is_scheduled(cfg: AlgorithmConfig) -> bool:
    return cfg.lr_schedule != "constant" or cfg.warmup_rounds > 0
