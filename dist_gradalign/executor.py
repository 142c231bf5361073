"""Runs the clients a rank holds in a round, one after another.

Every client's randomness (minibatch order, the ``full_grad_batch`` subsample, augmentation)
comes from generators seeded by (seed, round, client id, purpose), never from a rank's global
RNG, so a client computes the same numbers whichever rank runs it: the root of world-size
invariance (DESIGN.md section 2). Results are accumulated as weighted sums into flat buffers
that the engine all-reduces.

The index streams are a pure function of (seed, round, client) that numpy alone re-derives
(tests/test_algorithms.py does). For client ``cid`` (shard of n samples) in round ``rnd``
(1-based) of a run with ``seed``, let ``rng(p) = np.random.default_rng(np.random.SeedSequence(
[seed, rnd, cid, p]))``. Then:

* the minibatches of the K local steps (``local_batches``, batch size b = ``local_batch_size``):
  with b "full" or b >= n, ``arange(n)`` at every step. Otherwise r = rng(1),
  perm = r.permutation(n), pos = 0, and for each step: if pos + b > n then
  perm = r.permutation(n) (the same r), pos = 0; the step's batch is perm[pos:pos + b]; pos += b.
* the g_i subsample of SCAFFOLD and FedGA (``grad_batch``, s = ``full_grad_batch``): with
  s "full" or s >= n, ``arange(n)``; otherwise sorted(rng(2).permutation(n)[:s]).
* GradAlign takes g_i on its single local minibatch, the first of ``local_batches``.
* the fixed per-client sample of the r(x) diagnostic (``train.diagnostics_batch``) is the g_i
  subsample of "round 0" (rounds start at 1): the same positions every time, for every algorithm.

Positions index the client's shard (its dataset indices from the partition). Augmentation
draws from a torch generator, ``client_generator(seed, rnd, cid, 3, step)``.
"""
from __future__ import annotations

import numpy as np
import torch

from .algorithms import Algorithm, ClientState
from .data import augment_batch
from .data.stream import InMemory, Streamed
from .backend import BucketReducer
from .config import ConfigError
from .models import FlatModel, loss_and_grad, num_chunks

# Purposes of the per-client random streams.
_BATCHES, _GRAD_SUBSAMPLE, _AUGMENT, _MODEL = 1, 2, 3, 4


def seed_model_rng(seed: int, rnd: int, cid: int, phase: int) -> None:
    """Seed torch's global RNG from (seed, round, client, phase) before a client's forward passes,
    so that a model that draws from it (dropout) draws the same numbers on whichever rank runs
    the client: world-size invariance for user models too."""
    state = np.random.SeedSequence([seed, rnd, cid, _MODEL, phase]).generate_state(2, np.uint32)
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))


def client_generator(seed: int, rnd: int, cid: int, purpose: int, step: int = 0) -> torch.Generator:
    """A CPU torch generator that depends only on (seed, round, client, purpose, step): for
    augmentation (torch ops need a torch generator; the index streams use :func:`index_rng`)."""
    state = np.random.SeedSequence([seed, rnd, cid, purpose, step]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def index_rng(seed: int, rnd: int, cid: int, purpose: int) -> np.random.Generator:
    """The numpy generator of an index stream: ``default_rng(SeedSequence([seed, rnd, cid, purpose]))``."""
    return np.random.default_rng(np.random.SeedSequence([seed, rnd, cid, purpose]))


def local_batches(seed: int, rnd: int, cid: int, n: int, steps: int, batch_size) -> list[torch.Tensor]:
    """Positions (into the client's shard) of the minibatch of each local step: epochs of a
    seeded permutation, reshuffled when fewer than ``batch_size`` samples remain. ``full``
    (or a batch at least the shard) is the whole shard at every step: deterministic.

    Exactly: r = index_rng(seed, rnd, cid, 1); perm = r.permutation(n); pos = 0; then per
    step: if pos + b > n: perm = r.permutation(n), pos = 0; batch = perm[pos:pos + b]; pos += b."""
    if batch_size == "full" or batch_size >= n:
        return [torch.arange(n)] * steps
    rng = index_rng(seed, rnd, cid, _BATCHES)
    perm, pos, out = rng.permutation(n), 0, []
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = rng.permutation(n), 0
        out.append(torch.from_numpy(perm[pos:pos + batch_size]))
        pos += batch_size
    return out


def grad_batch(seed: int, rnd: int, cid: int, n: int, size) -> torch.Tensor:
    """Positions used for g_i: the whole shard (``full`` or size >= n), or the seeded subsample
    ``sorted(index_rng(seed, rnd, cid, 2).permutation(n)[:size])``."""
    if size == "full" or size >= n:
        return torch.arange(n)
    return torch.from_numpy(np.sort(index_rng(seed, rnd, cid, _GRAD_SUBSAMPLE).permutation(n)[:size]))


def batch_size_of(n: int, size) -> int:
    return n if size == "full" else min(n, size)


def choose_executor(requested: str, device: torch.device, module: torch.nn.Module, clients_per_round: int,
                    world_size: int, micro_batch: int | None) -> dict:
    """``train.executor``: the requested one, or for ``auto`` the rule measured in BENCHMARKS.md
    ("Vectorized (vmap) vs sequential executor"): vectorized on a GPU from 5 clients per rank
    (1.7x there, 0.5x at 1); on CPU only for models without convolutions from 10 clients per rank
    (mlp 1.3x at 10; cnn_emnist at most 1.05x, 0.7x at 47); sequential with micro-batches, which
    the vectorized executor does not split. Returns {executor, requested, reason, ...}."""
    m = -(-clients_per_round // world_size)  # clients a rank runs in a round (at most)
    conv = any(isinstance(layer, torch.nn.modules.conv._ConvNd) for layer in module.modules())
    buffers = any(True for _ in module.buffers())
    random = any(isinstance(layer, torch.nn.modules.dropout._DropoutNd) for layer in module.modules())
    out = {"requested": requested, "clients_per_rank": m, "device": device.type, "convolutions": conv}
    if requested == "vectorized" and (buffers or random):
        raise ConfigError("train.executor = 'vectorized' is not allowed for a model with "
                          f"{'buffers (batch norm)' if buffers else 'dropout'}: vmap cannot update running statistics "
                          "or draw per-client random numbers; use train.executor=sequential (or auto)")
    if requested != "auto":
        return {"executor": requested, "reason": "train.executor", **out}
    if buffers or random:
        choice, reason = "sequential", "a model with buffers or dropout (the vectorized executor takes neither)"
    elif micro_batch is not None:
        choice, reason = "sequential", "train.micro_batch_size is set (the vectorized executor runs whole batches)"
    elif device.type == "cuda":
        choice = "vectorized" if m >= 5 else "sequential"
        reason = f"{m} client(s) per rank on a GPU ({'>=' if m >= 5 else '<'} 5)"
    elif conv:
        choice, reason = "sequential", "a model with convolutions on CPU (grouped convolutions are slow there)"
    else:
        choice = "vectorized" if m >= 10 else "sequential"
        reason = f"{m} client(s) per rank on CPU, no convolutions ({'>=' if m >= 10 else '<'} 10)"
    return {"executor": choice, "reason": reason, **out}


def build_executor(cfg, be, fm: FlatModel, data, shards: list, algo: Algorithm):
    """The executor ``train.executor`` chooses (see :func:`choose_executor`), with its bucketed
    reducer (``train.comm: bucketed``; the sequential executor only, for algorithms with a
    gradient pass it can overlap). Returns (executor, reducer or None, executor.json record)."""
    from .vectorized import VectorizedExecutor

    t = cfg.train
    record = choose_executor(t.executor, be.device, fm.module, t.clients_per_round, be.world_size, t.micro_batch_size)
    if be.is_main and t.executor == "auto":
        print(f"executor: {record['executor']} (auto: {record['reason']})", flush=True)
    shards = [torch.as_tensor(s, dtype=torch.long) for s in shards]  # on CPU: indices are gathered there
    if record["executor"] == "vectorized":
        return VectorizedExecutor(fm, data, shards, cfg.seed, cfg.data.augment, t.micro_batch_size), None, record
    overlaps = algo.needs_client_grads or algo.gradient_form
    reducer = (BucketReducer(be, fm.param_list, fm.grads, int(t.bucket_mb * 2**20))
               if t.comm == "bucketed" and overlaps else None)
    return SequentialExecutor(fm, data, shards, cfg.seed, cfg.data.augment, t.micro_batch_size, reducer), reducer, record


class SequentialExecutor:
    """Runs a rank's clients in a plain loop over one :class:`FlatModel`.

    With a ``reducer`` (``train.comm: bucketed``) the all-reduce of a gradient pass overlaps
    the backward pass of the rank's last client: the g pass (g = sum_i w_i g_i), and the local
    step of algorithms whose round average is a gradient step (``Algorithm.gradient_form``).

    Non-finite values are detected without a host sync per client: each check is a device
    flag, summed into the round's all-reduce; the client is named only when a flag is set.
    """

    def __init__(self, fm: FlatModel, data: InMemory | Streamed, shards: list[torch.Tensor], seed: int,
                 augment: str, micro_batch: int | None, reducer: BucketReducer | None = None):
        self.fm, self.data = fm, data
        self.shards, self.seed, self.augment, self.micro_batch = shards, seed, augment, micro_batch
        self.reducer = reducer
        # the round's global float buffers and integer buffers (the trainer's; empty for most models)
        self.global_buffers: tuple[torch.Tensor, list[torch.Tensor]] = (fm.buffers.clone(), [])
        # this round's checks, in order: (descriptions, a non-finite flag per row, losses or None)
        self.checks: list[tuple[list[str], torch.Tensor, torch.Tensor | None]] = []

    def start_round(self) -> None:
        self.checks = []

    def _start_client(self, rnd: int, cid: int, phase: int) -> None:
        """Before a client's forward passes: the module's buffers at the global ones (a gradient
        pass must not carry its running-statistics updates into the local steps), and torch's
        RNG seeded for the client."""
        b, ints = self.global_buffers
        if b.numel():
            self.fm.buffers.copy_(b)
        for t, v in zip(self.fm.int_buffers, ints):
            t.copy_(v)
        seed_model_rng(self.seed, rnd, cid, phase)

    def _check(self, what: str, value: torch.Tensor, loss: torch.Tensor | None = None) -> None:
        """Record a device flag: is ``value`` non-finite anywhere? (``loss``: shown in the message)."""
        self._check_rows([what], value.reshape(1, -1), None if loss is None else loss.reshape(1))

    def _check_rows(self, whats: list[str], rows: torch.Tensor, losses: torch.Tensor | None = None) -> None:
        """One flag per row of ``rows`` (one row per client, described by ``whats``)."""
        bad = ~torch.isfinite(rows.reshape(len(whats), -1)).all(dim=1)
        self.checks.append((whats, bad, losses))

    def nonfinite(self, like: torch.Tensor) -> torch.Tensor:
        """How many of this round's checks failed, as a 0-dim tensor (no host sync)."""
        out = torch.zeros((), dtype=like.dtype, device=like.device)
        for _, bad, _ in self.checks:
            out += bad.sum()
        return out

    def diverged(self) -> str | None:
        """The first non-finite quantity of this round on this rank (syncs: call on failure only)."""
        for whats, bad, losses in self.checks:
            for j in bad.nonzero().flatten().tolist()[:1]:
                return whats[j] if losses is None else f"{whats[j]} ({float(losses[j])})"
        return None

    def _arm(self, out: torch.Tensor, weight: float, n_samples: int, last: bool) -> bool:
        """Arm the reducer for the coming backward pass(es) if this is the rank's last client."""
        if self.reducer is None or not last:
            return False
        self.reducer.arm(out, weight, num_chunks(n_samples, self.micro_batch))
        return True

    def _batch(self, rnd: int, cid: int, positions: torch.Tensor, aug_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels of client ``cid`` at the given shard positions, augmented."""
        xb, yb = self.data.gather(self.shards[cid][positions])  # indices gathered on CPU
        if self.augment != "none":
            xb = self._augment(xb, rnd, cid, aug_step)
        return xb, yb

    def _augment(self, xb: torch.Tensor, rnd: int, cid: int, aug_step: int) -> torch.Tensor:
        """Client ``cid``'s augmentation of its batch at this step, from its own generator."""
        return augment_batch(xb, self.augment, client_generator(self.seed, rnd, cid, _AUGMENT, aug_step))

    def _grad(self, rnd: int, cid: int, positions: torch.Tensor, aug_step: int, hooks: bool = False) -> torch.Tensor:
        """Loss and gradient (left in fm.grads) of client ``cid`` on the given shard positions."""
        return loss_and_grad(self.fm, *self._batch(rnd, cid, positions, aug_step), self.micro_batch, hooks)

    def _grad_positions(self, algo: Algorithm, rnd: int, cid: int) -> tuple[torch.Tensor, int]:
        n = len(self.shards[cid])
        if algo.grad_batch == "local":  # GradAlign: the same minibatch as the local step
            return local_batches(self.seed, rnd, cid, n, 1, algo.cfg.local_batch_size)[0], 1
        return grad_batch(self.seed, rnd, cid, n, algo.cfg.full_grad_batch), 0

    @torch.no_grad()
    def client_grads(self, algo: Algorithm, rnd: int, clients: list[int], weights: dict[int, float],
                     x: torch.Tensor, buf: torch.Tensor) -> dict[int, torch.Tensor]:
        """g_i at x for each client; adds w_i g_i into ``buf[:n]`` (with a reducer, the last
        client's share is added bucket by bucket during its backward pass). Returns {cid: g_i}."""
        self.fm.params.copy_(x)
        out = {}
        for j, cid in enumerate(clients):
            positions, aug_step = self._grad_positions(algo, rnd, cid)
            self._start_client(rnd, cid, 0)
            armed = algo.reduces_g and self._arm(buf[:x.numel()], weights[cid], len(positions), j == len(clients) - 1)
            with torch.enable_grad():
                self._grad(rnd, cid, positions, aug_step, hooks=armed)
            out[cid] = self.fm.grads.clone()
            self._check(f"client {cid}: its gradient g_i at x", out[cid])
            if not armed:
                buf[:x.numel()].add_(out[cid], alpha=weights[cid])
        return out

    # The dataset indices a round gathers, in order: what data.storage = stream prefetches. They
    # follow the loops of client_grads, diagnostic_grads and local_updates exactly.
    def diagnostic_reads(self, clients: list[int], size) -> list[torch.Tensor]:
        return [self.shards[c][grad_batch(self.seed, 0, c, len(self.shards[c]), size)] for c in clients]

    def round_reads(self, algo: Algorithm, rnd: int, clients: list[int]) -> list[torch.Tensor]:
        out = []
        if algo.needs_client_grads:
            out += [self.shards[c][self._grad_positions(algo, rnd, c)[0]] for c in clients]
        for c in clients:
            out += [self.shards[c][p] for p in local_batches(self.seed, rnd, c, len(self.shards[c]), algo.local_steps(),
                                                             algo.cfg.local_batch_size)]
        return out

    @torch.no_grad()
    def diagnostic_grads(self, clients: list[int], weights: dict[int, float], x: torch.Tensor, size,
                         buf: torch.Tensor) -> dict[int, torch.Tensor]:
        """g_i at x for ``train.diagnostics_every``: each client's gradient on its fixed diagnostic
        sample (the whole shard, or the ``grad_batch`` subsample of round 0 of ``size`` samples:
        the same positions every time, for every algorithm), without augmentation. Adds w_i g_i
        into ``buf``; returns {cid: g_i}."""
        self.fm.params.copy_(x)
        out = {}
        for cid, idx in zip(clients, self.diagnostic_reads(clients, size)):
            self._start_client(0, cid, 2)
            with torch.enable_grad():
                loss_and_grad(self.fm, *self.data.gather(idx), self.micro_batch)
            out[cid] = self.fm.grads.clone()
            buf.add_(out[cid], alpha=weights[cid])
        return out

    @torch.no_grad()
    def local_updates(self, algo: Algorithm, rnd: int, clients: list[int], weights: dict[int, float],
                      x: torch.Tensor, g: torch.Tensor | None, g_locals: dict[int, torch.Tensor],
                      buf: torch.Tensor) -> None:
        """Each client's K local steps from x. Adds w_i y_i into ``buf[:n]``, the weighted
        mean local loss into ``buf[n]``, where g is known, w_i ||g_i - g||^2 into ``buf[n+1]``, and
        w_i times the client's extra upload (``algo.client_finish``) into ``buf[n+4:]``.

        With a reducer and ``algo.gradient_form`` (one local step, lbsgd and gradalign), adds
        w_i times the raw minibatch gradient instead (the last client's during its backward
        pass, overlapped with the reducer's all-reduce); ``algo.average_from_gradient`` turns
        the sum into sum_i w_i y_i."""
        lr, fm, steps, n = algo.lr, self.fm, algo.local_steps(), x.numel()
        gradient_form = self.reducer is not None and algo.gradient_form
        for j, cid in enumerate(clients):
            w = weights[cid]
            state = ClientState(cid=cid, x=x, g=g, g_i=g_locals.get(cid))
            y = fm.params
            y.copy_(x)
            self._start_client(rnd, cid, 1)
            algo.client_start(state, y)
            batches = local_batches(self.seed, rnd, cid, len(self.shards[cid]), steps, algo.cfg.local_batch_size)
            loss_sum = torch.zeros((), dtype=x.dtype, device=x.device)
            for k, positions in enumerate(batches):
                armed = gradient_form and self._arm(buf[:n], w, len(positions), j == len(clients) - 1)
                with torch.enable_grad():
                    loss_sum += self._grad(rnd, cid, positions, k + 1, hooks=armed)
                grad = fm.grads
                if gradient_form:
                    self._check(f"client {cid}: its local-step gradient", grad)
                    if not armed:
                        buf[:n].add_(grad, alpha=w)
                    break
                algo.local_direction(state, y, grad)
                y.sub_(grad, alpha=lr)
            if fm.buffers.numel():  # [n params | 4 scalars | extra | buffers]: w_i b_i
                buf[buf.numel() - fm.buffers.numel():].add_(fm.buffers, alpha=w)
            if not gradient_form:
                extra = algo.client_finish(state, y)
                if extra is not None:  # after the round's scalars: [n params | 4 scalars | extra | buffers]
                    buf[n + 4:n + 4 + extra.numel()].add_(extra, alpha=w)
                algo.client_upload(state, y)
            self._finish_client(state, None if gradient_form else y, loss_sum, steps, w, g if algo.reduces_g else None,
                                buf)

    def _finish_client(self, state: ClientState, y: torch.Tensor | None, loss_sum: torch.Tensor, steps: int,
                       w: float, g: torch.Tensor | None, buf: torch.Tensor) -> None:
        """Check the client's result is finite and add w_i y_i (unless ``y`` is None: the
        gradient form added its gradient already), its weighted mean loss and
        w_i ||g_i - g||^2 into the round's buffer."""
        n_params = state.x.numel()
        mean_loss = loss_sum / steps
        self._check(f"client {state.cid}: its training loss", mean_loss, loss=mean_loss)
        if y is not None:
            self._check(f"client {state.cid}: its parameters after {steps} local step(s)", y)
            buf[:n_params].add_(y, alpha=w)
        buf[n_params] += w * mean_loss
        if g is not None:  # the round's all-reduced g: r(x)'s term
            buf[n_params + 1] += w * (state.g_i - g).pow(2).sum()
