"""FedDyn (Acar et al. 2021, "Federated Learning Based on Dynamic Regularization", Algorithm 1),
with partial participation and sample weights.

Client i keeps a state h_i (the gradient of its dynamic regularizer; 0 at first) and minimizes
f_i(y) - <h_i, y> + alpha/2 ||y - x||^2 (alpha = ``algorithm.feddyn_alpha``), so its K local
steps are y <- y - lr (grad f_i(y; zeta) + lambda y - h_i + alpha (y - x)); then
h_i <- h_i - alpha (y_K - x). The server keeps h (0 at first):
h <- h - alpha sum_{i in S} p_i (y_i - x), p_i = n_i / (sum over all clients n_j), and
x <- sum_{i in S} w_i y_i - h / alpha (then ``algorithm.server_opt`` as for every rule). Since
sum_S p_i (y_i - x) = fraction (sum_S w_i y_i - x), with fraction = the round's share of all
samples, the clients upload y_K alone: one communication round of the model's size.

The h_i live where stateful SCAFFOLD's c_i do: client i always runs on the rank that owns it,
in host memory, only for clients that have been sampled; checkpoints gather them to rank 0 and a
resume (on any world size) scatters them to their new owners. With ``algorithm.displacement``
the clients start at the displaced point and the proximal term pulls towards x."""
from __future__ import annotations

from typing import Optional

import torch

from .base import Algorithm, ClientState


class FedDyn(Algorithm):
    name = "feddyn"
    keeps_client_state = True
    extra_state = ("h",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.h: Optional[torch.Tensor] = None  # the server's h (None = 0); h_i: client_rows

    def client_start(self, c: ClientState, y) -> None:
        super().client_start(c, y)  # the displacement, if any
        cids = c.cid if isinstance(c.cid, tuple) else (c.cid,)
        rows = [self.client_rows.get(i) for i in cids]
        zero = torch.zeros(y.shape[-1], dtype=y.dtype)
        h_i = torch.stack([zero if r is None else r for r in rows]).to(y.device)
        c.control = h_i if isinstance(c.cid, tuple) else h_i[0]

    def local_direction(self, c: ClientState, y, grad) -> None:
        super().local_direction(c, y, grad)  # + weight decay at y
        grad.sub_(c.control).add_(y - c.x, alpha=self.cfg.feddyn_alpha)

    def client_finish(self, c: ClientState, y) -> None:
        """h_i <- h_i - alpha (y_K - x), kept on this rank; nothing extra is uploaded."""
        new = c.control - self.cfg.feddyn_alpha * (y - c.x)
        for i, row in zip(c.cid, new) if isinstance(c.cid, tuple) else [(c.cid, new)]:
            self.client_rows.set(i, row)
        return None

    def after_round(self, x, avg, uploads=None, fraction=1.0) -> None:
        """h <- h - alpha fraction (sum_S w_i y_i - x)."""
        super().after_round(x, avg, uploads, fraction)
        if self.h is None:
            self.h = torch.zeros_like(x)
        self.h.sub_(avg - x, alpha=self.cfg.feddyn_alpha * fraction)

    def server_step(self, x, avg) -> None:
        """x <- sum_S w_i y_i - h / alpha, through the configured server optimizer."""
        super().server_step(x, avg - self.h / self.cfg.feddyn_alpha)
