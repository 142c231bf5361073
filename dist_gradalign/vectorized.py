"""Runs a rank's clients as one batched computation: ``torch.func.vmap`` over the stacked
parameter vectors of the clients (``train.executor: vectorized``).

Clients whose minibatches have the same size at every step form one group; each group is one
vmapped forward/backward per local step. Batches, augmentation and the algorithms' own hooks
(``client_start``, ``local_direction``) are exactly those of the sequential executor, applied
to each client's row of the stacked tensors, so the two executors compute the same round
(to floating-point reordering; tested).
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from .algorithms import Algorithm, ClientState
from .executor import SequentialExecutor, local_batches
from .models import autocast


class VectorizedExecutor(SequentialExecutor):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        module = self.fm.module
        self._names = [n for n, _ in module.named_parameters()]
        self._shapes = [p.shape for _, p in module.named_parameters()]
        self._sizes = [p.numel() for _, p in module.named_parameters()]

        def loss(flat: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            params = {n: t.view(s) for n, t, s in zip(self._names, flat.split(self._sizes), self._shapes)}
            with autocast(self.fm):
                logits = functional_call(module, params, (xb,))
            return F.cross_entropy(logits.float() if self.fm.autocast else logits, yb)

        self._grads = vmap(grad_and_value(loss))  # (m, n), (m, b, ...), (m, b) -> (m, n), (m,)

    def _stacked(self, rnd: int, cids: list[int], positions: list[torch.Tensor], aug_step: int):
        batches = [self._batch(rnd, c, p, aug_step) for c, p in zip(cids, positions)]
        return torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])

    @staticmethod
    def _groups(clients: list[int], sizes_of) -> list[list[int]]:
        groups = defaultdict(list)
        for c in clients:
            groups[sizes_of(c)].append(c)
        return list(groups.values())

    @torch.no_grad()
    def client_grads(self, algo: Algorithm, rnd: int, clients: list[int], weights: dict[int, float],
                     x: torch.Tensor, buf: torch.Tensor) -> dict[int, torch.Tensor]:
        out = {}
        pos = {c: self._grad_positions(algo, rnd, c) for c in clients}
        for group in self._groups(clients, lambda c: len(pos[c][0])):
            xb, yb = self._stacked(rnd, group, [pos[c][0] for c in group], pos[group[0]][1])
            with torch.enable_grad():
                g, _ = self._grads(x.expand(len(group), -1), xb, yb)
            for c, g_i in zip(group, g):
                out[c] = g_i
                self._check(f"client {c}: its gradient g_i at x", g_i)
                buf[:x.numel()].add_(g_i, alpha=weights[c])
        return out

    @torch.no_grad()
    def local_updates(self, algo: Algorithm, rnd: int, clients: list[int], weights: dict[int, float],
                      x: torch.Tensor, g: torch.Tensor | None, g_locals: dict[int, torch.Tensor],
                      buf: torch.Tensor) -> None:
        lr, steps = algo.cfg.lr, algo.local_steps()
        batches = {c: local_batches(self.seed, rnd, c, len(self.shards[c]), steps, algo.cfg.local_batch_size)
                   for c in clients}
        for group in self._groups(clients, lambda c: tuple(len(b) for b in batches[c])):
            states = [ClientState(cid=c, x=x, g=g, g_i=g_locals.get(c)) for c in group]
            ys = x.expand(len(group), -1).clone()
            for state, y in zip(states, ys):
                algo.client_start(state, y)
            loss_sum = torch.zeros(len(group), dtype=x.dtype, device=x.device)
            for k in range(steps):
                xb, yb = self._stacked(rnd, group, [batches[c][k] for c in group], k + 1)
                with torch.enable_grad():
                    grads, losses = self._grads(ys, xb, yb)
                for state, y, grad in zip(states, ys, grads):
                    algo.local_direction(state, y, grad)
                ys.sub_(grads, alpha=lr)
                loss_sum += losses
            for state, y, loss in zip(states, ys, loss_sum):
                self._finish_client(state, y, loss, steps, weights[state.cid], g, buf)
