"""Runs a rank's clients as one batched computation: ``torch.func.vmap`` over the stacked
parameter vectors of the clients (``train.executor: vectorized``).

Clients whose minibatches have the same size at every step form one group; each group is one
vmapped forward/backward per local step. Batches, augmentation and the algorithms' own hooks
(``client_start``, ``local_direction``) are exactly those of the sequential executor, applied
to the group's stacked (m, n) iterates at once (the hooks are elementwise), and the weighted
sums are one matrix-vector product per group, so the two executors compute the same round
(to floating-point reordering; tested) with a constant number of kernels per step.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.func import grad_and_value, vmap

from .algorithms import Algorithm, ClientState
from .executor import SequentialExecutor, local_batches


class VectorizedExecutor(SequentialExecutor):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # (m, n), (m, b, ...), (m, b) -> (m, n), (m,); with train.compile, as one compiled graph
        self._grads = vmap(grad_and_value(self.fm.functional_loss))
        if self.fm.compiled is not None:
            self._grads = torch.compile(self._grads)

    def _stacked(self, rnd: int, cids: list[int], positions: list[torch.Tensor], aug_step: int):
        """The group's batches as (m, b, ...) inputs and (m, b) labels: indices gathered on CPU,
        one copy to the device, one gather; augmentation per client (its own generator)."""
        xb, yb = self.data.gather(torch.stack([self.shards[c][p] for c, p in zip(cids, positions)]))
        if self.augment != "none":
            xb = torch.stack([self._augment(xb[j], rnd, c, aug_step) for j, c in enumerate(cids)])
        return xb, yb

    def round_reads(self, algo: Algorithm, rnd: int, clients: list[int]) -> list[torch.Tensor]:
        """The gathers of client_grads and local_updates below, in their order."""
        out = []
        if algo.needs_client_grads:
            pos = {c: self._grad_positions(algo, rnd, c)[0] for c in clients}
            for group in self._groups(clients, lambda c: len(pos[c])):
                out.append(torch.stack([self.shards[c][pos[c]] for c in group]))
        batches = {c: local_batches(self.seed, rnd, c, len(self.shards[c]), algo.local_steps(),
                                    algo.cfg.local_batch_size) for c in clients}
        for group in self._groups(clients, lambda c: tuple(len(b) for b in batches[c])):
            out += [torch.stack([self.shards[c][batches[c][k]] for c in group]) for k in range(algo.local_steps())]
        return out

    @staticmethod
    def _groups(clients: list[int], sizes_of) -> list[list[int]]:
        groups = defaultdict(list)
        for c in clients:
            groups[sizes_of(c)].append(c)
        return list(groups.values())

    def _weights(self, group: list[int], weights: dict[int, float], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor([weights[c] for c in group], dtype=like.dtype).to(like.device)

    @torch.no_grad()
    def client_grads(self, algo: Algorithm, rnd: int, clients: list[int], weights: dict[int, float],
                     x: torch.Tensor, buf: torch.Tensor) -> dict[int, torch.Tensor]:
        out = {}
        pos = {c: self._grad_positions(algo, rnd, c) for c in clients}
        for group in self._groups(clients, lambda c: len(pos[c][0])):
            xb, yb = self._stacked(rnd, group, [pos[c][0] for c in group], pos[group[0]][1])
            with torch.enable_grad():
                g, _ = self._grads(x.expand(len(group), -1), xb, yb)
            self._check_rows([f"client {c}: its gradient g_i at x" for c in group], g)
            buf[:x.numel()].addmv_(g.T, self._weights(group, weights, x))  # sum_i w_i g_i
            out.update(zip(group, g))
        return out

    @torch.no_grad()
    def local_updates(self, algo: Algorithm, rnd: int, clients: list[int], weights: dict[int, float],
                      x: torch.Tensor, g: torch.Tensor | None, g_locals: dict[int, torch.Tensor],
                      buf: torch.Tensor) -> None:
        """The algorithm's hooks run once per group on the stacked (m, n) iterates: they are
        elementwise, so row j is exactly client j's computation."""
        lr, steps, n = algo.lr, algo.local_steps(), x.numel()
        batches = {c: local_batches(self.seed, rnd, c, len(self.shards[c]), steps, algo.cfg.local_batch_size)
                   for c in clients}
        for group in self._groups(clients, lambda c: tuple(len(b) for b in batches[c])):
            w = self._weights(group, weights, x)
            g_i = torch.stack([g_locals[c] for c in group]) if g_locals else None
            state = ClientState(cid=tuple(group), x=x, g=g, g_i=g_i)
            ys = x.expand(len(group), -1).clone()
            algo.client_start(state, ys)
            loss_sum = torch.zeros(len(group), dtype=x.dtype, device=x.device)
            for k in range(steps):
                xb, yb = self._stacked(rnd, group, [batches[c][k] for c in group], k + 1)
                with torch.enable_grad():
                    grads, losses = self._grads(ys, xb, yb)
                algo.local_direction(state, ys, grads)
                ys.sub_(grads, alpha=lr)
                loss_sum += losses
            mean_loss = loss_sum / steps
            self._check_rows([f"client {c}: its training loss" for c in group], mean_loss, losses=mean_loss)
            self._check_rows([f"client {c}: its parameters after {steps} local step(s)" for c in group], ys)
            extra = algo.client_finish(state, ys)
            if extra is not None:
                buf[n + 4:n + 4 + extra.shape[1]].addmv_(extra.T, w)
            algo.client_upload(state, ys)
            buf[:n].addmv_(ys.T, w)  # sum_i w_i u_i
            buf[n] += w @ mean_loss
            if g_i is not None and algo.reduces_g:
                buf[n + 1] += w @ (g_i - g).pow(2).sum(1)
