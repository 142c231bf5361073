"""SCAFFOLD, in two forms (``algorithm.control``).

``per_round`` (default), as the paper analyses it (Theorem 5): control variates recomputed each
round at x over the sampled clients, c = g and c_i = g_i, so every local gradient gains (g - g_i):
y_k = y_{k-1} - alpha (grad f_i(y_{k-1}; zeta_k) + (g - g_i) + lambda y_{k-1}). Two communication
rounds (g, then the average).

``stateful``: Karimireddy et al. 2020, Algorithm 1 with option II, sample-weighted. A server
control variate c and one c_i per client (all 0 at the start) persist across rounds:

- local step: y <- y - alpha (grad f_i(y; zeta) - c_i + c + lambda y);
- after K steps: c_i+ = c_i - c + (x - y_K) / (K alpha); the client uploads y_K and c_i+ - c_i;
- server: the usual average of y_K, and c <- c + sum_{i in S} p_i (c_i+ - c_i) with
  p_i = n_i / (sum over all clients n_j), so that c = sum_i p_i c_i at every round.

One communication round, whose buffer carries both (twice the model). The c_i live on the rank
that owns the client (client i on rank i mod world size: ``Backend.owned``), in host memory, only
for clients that have been sampled (an absent c_i is 0): num_clients / world_size x model size x
4 bytes per rank at most. Checkpoints gather them to rank 0."""
from __future__ import annotations

from typing import Optional

import torch

from .base import Algorithm, ClientState


class Scaffold(Algorithm):
    name = "scaffold"
    extra_state = ("control",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.control: Optional[torch.Tensor] = None  # stateful: the server's c (None = 0); c_i: client_rows

    @property
    def keeps_client_state(self) -> bool:
        return self.cfg.control == "stateful"

    @property
    def uses_g(self) -> bool:
        return not self.keeps_client_state

    def upload_size(self, n: int) -> int:
        return n if self.keeps_client_state else 0

    def client_start(self, c: ClientState, y) -> None:
        super().client_start(c, y)  # the displacement, if any: it shares the round's g and g_i
        if not self.keeps_client_state:
            c.correction = c.g - c.g_i  # fixed for the round
            return
        cids = c.cid if isinstance(c.cid, tuple) else (c.cid,)
        rows = [self.client_rows.get(i) for i in cids]
        zero = torch.zeros(y.shape[-1], dtype=y.dtype)
        c_i = torch.stack([zero if r is None else r for r in rows]).to(y.device)
        c.control = c_i if isinstance(c.cid, tuple) else c_i[0]
        c.correction = -c.control if self.control is None else self.control - c.control  # c - c_i

    def local_direction(self, c: ClientState, y, grad) -> None:
        super().local_direction(c, y, grad)
        grad.add_(c.correction)

    def client_finish(self, c: ClientState, y) -> Optional[torch.Tensor]:
        """stateful: c_i+ - c_i = (x - y_K) / (K alpha) - c; stores c_i+ and returns the change."""
        if not self.keeps_client_state:
            return None
        change = (c.x - y).div_(self.local_steps() * self.lr)
        if self.control is not None:
            change.sub_(self.control)
        new = c.control + change
        for i, row in zip(c.cid, new) if isinstance(c.cid, tuple) else [(c.cid, new)]:
            self.client_rows.set(i, row)
        return change

    def after_round(self, x, avg, uploads=None, fraction=1.0) -> None:
        """c <- c + sum_S p_i (c_i+ - c_i) = c + fraction sum_S w_i (c_i+ - c_i), where
        fraction = sum_S n_j / sum_all n_j turns the round's weights w_i into p_i."""
        if self.keeps_client_state:
            if self.control is None:
                self.control = torch.zeros_like(x)
            self.control.add_(uploads, alpha=fraction)
