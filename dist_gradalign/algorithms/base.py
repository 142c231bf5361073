"""The shared base of every algorithm (DESIGN.md section 1).

A round, as the executor runs it on each rank:

1. if ``needs_client_grads``: g_i = grad f_i(x) for every sampled client, g = sum_i w_i g_i
   (one all-reduce: the extra communication round of SCAFFOLD, FedGA and GradAlign);
2. per client: y = x; ``client_start`` (e.g. FedGA's displacement); then ``local_steps()``
   times y <- y - lr * ``local_direction`` (the minibatch gradient plus the algorithm's
   terms, plus weight decay at the current iterate);
3. one all-reduce forms sum_i w_i y_i (and, for an algorithm with per-client state, sum_i w_i
   of what ``client_finish`` returns, in the same buffer); ``server_step`` moves x towards it.

Algorithms are pure math on flat parameter vectors: they never communicate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..config import AlgorithmConfig
from .schedule import lr_factor


@dataclass
class ClientState:
    """What one client's local work may read: the round's x, g and its own g_i.

    The vectorized executor passes a group of clients at once: ``cid`` a tuple, ``g_i`` and the
    iterates stacked as (m, n) rows. Hooks are elementwise with broadcasting, so they serve both."""

    cid: Union[int, tuple]
    x: torch.Tensor
    g: Optional[torch.Tensor] = None
    g_i: Optional[torch.Tensor] = None
    correction: Optional[torch.Tensor] = None  # SCAFFOLD's g - g_i (or c - c_i), fixed for the round
    control: Optional[torch.Tensor] = None  # stateful SCAFFOLD's c_i


class ClientRows:
    """Per-client vectors (stateful SCAFFOLD's c_i) on the host, in blocks of ``block`` rows
    allocated once: a client's row is written in place each round. (One allocation per vector,
    interleaved with the round's transients of the same size, fragmented the heap to twice the
    table's size.) An absent client's row is 0."""

    def __init__(self, block: int = 64):
        self.block, self.blocks, self.slots = block, [], {}

    def __len__(self) -> int:
        return len(self.slots)

    def get(self, cid: int) -> Optional[torch.Tensor]:
        slot = self.slots.get(cid)
        return None if slot is None else self.blocks[slot // self.block][slot % self.block]

    def set(self, cid: int, row: torch.Tensor) -> None:
        if cid not in self.slots:
            if len(self.slots) == len(self.blocks) * self.block:
                self.blocks.append(torch.empty(self.block, row.numel(), dtype=row.dtype))
            self.slots[cid] = len(self.slots)
        self.get(cid).copy_(row)

    def items(self) -> list[tuple[int, torch.Tensor]]:
        """(client, row) in client order; the rows are views into the blocks."""
        return [(cid, self.get(cid)) for cid in sorted(self.slots)]


class Algorithm:
    name = "base"
    uses_g = False  # the rule itself needs g = sum_i w_i g_i and g_i (per-round SCAFFOLD's correction)
    default_displacement = "none"  # what algorithm.displacement: null means (fedga, gradalign: fresh)
    grad_batch = "full"  # g_i on `full_grad_batch` samples, or "local": the first local minibatch
    # One local step whose round average is a gradient step, sum_i w_i y_i =
    # x - lr (sum_i w_i grad_i + lambda x): then the step's all-reduce can carry the gradient,
    # bucket by bucket during the backward pass (train.comm: bucketed).
    gradient_form = False

    def __init__(self, cfg: AlgorithmConfig):
        self.cfg = cfg
        # this round's step sizes (algorithm.lr_schedule; set_round): hooks read these, not cfg's
        self.lr, self.beta, self.server_lr = cfg.lr, cfg.beta, cfg.server_lr
        self.server_m: Optional[torch.Tensor] = None  # m of the server optimizer
        self.server_v: Optional[torch.Tensor] = None  # v of the adaptive server optimizers
        self.direction: Optional[torch.Tensor] = None  # d of global_grad: previous
        self.client_rows = ClientRows()  # per-client state of this rank's clients (keeps_client_state)

    def set_round(self, rnd: int, rounds: int) -> None:
        """This round's lr (and beta, server_lr where scheduled): the schedule's factor s(rnd)
        (``dist_gradalign/algorithms/schedule.py``); exactly the config's values when s = 1."""
        f = lr_factor(self.cfg, rnd, rounds)
        c = self.cfg
        self.lr = c.lr if f == 1.0 else c.lr * f
        self.beta = c.beta * f if c.beta_schedule == "scaled" and f != 1.0 else c.beta
        self.server_lr = c.server_lr * f if c.schedule_server and f != 1.0 else c.server_lr

    def local_steps(self) -> int:
        """K: local updates per client per round."""
        return self.cfg.local_steps

    @property
    def displacement(self) -> str:
        """``algorithm.displacement``: none, fresh (y_0 = x - beta (g - g_i) with this round's g:
        the paper's Algorithms 1 and 2) or previous (g replaced by the previous round's
        direction d: no extra communication round). Null: the algorithm's default (``previous``
        for fedga and gradalign when ``global_grad: previous``)."""
        d = self.cfg.displacement
        if d is None:
            d = self.default_displacement
            if d != "none" and self.cfg.global_grad == "previous":
                d = "previous"
        return d

    @property
    def needs_client_grads(self) -> bool:
        """Whether clients compute g_i at x (for the rule, or for the displacement)."""
        return self.uses_g or self.displacement != "none"

    @property
    def reduces_g(self) -> bool:
        """Whether the round all-reduces g = sum_i w_i g_i (the extra communication round)."""
        return self.uses_g or self.displacement == "fresh"

    # Per-client state that persists across rounds (stateful SCAFFOLD's c_i): client i then always
    # runs on the rank that owns it, and checkpoints gather the state to rank 0.
    keeps_client_state = False

    def upload_size(self, n: int) -> int:
        """Numbers a client uploads besides its n parameters (``client_finish``'s result)."""
        return 0

    def client_finish(self, c: ClientState, y: torch.Tensor) -> Optional[torch.Tensor]:
        """After the local steps, before ``client_upload``: update the client's own state and
        return the extra upload (``upload_size`` numbers), or None."""
        return None

    def client_state(self) -> dict:
        """This rank's per-client state, {client id: tensor} (for checkpoints)."""
        return dict(self.client_rows.items())

    def load_client_state(self, rows: dict) -> None:
        """Restore this rank's per-client state from a checkpoint's rows for its clients."""
        self.client_rows = ClientRows()
        for cid, row in sorted(rows.items()):
            self.client_rows.set(int(cid), row)

    def comm_rounds(self) -> int:
        return 2 if self.reduces_g else 1

    def round_g(self, g: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The g the clients see this round: the all-reduced one (``reduces_g``), else, with
        ``displacement: previous``, the previous round's direction d (None in round 1)."""
        return self.direction if self.displacement == "previous" else g

    def client_upload(self, c: ClientState, y: torch.Tensor) -> None:
        """Modify the iterate a client uploads, in place. Default: y_K, with ``displacement:
        previous`` its displacement undone, u_i = y_K + beta v_i (the v_i = d - g_i no longer sum
        to zero, so they must not move x at zeroth order; with ``fresh`` they sum to zero)."""
        if self.displacement == "previous" and self.beta and c.g is not None:
            y.add_(c.g - c.g_i, alpha=self.beta)

    def after_round(self, x: torch.Tensor, avg: torch.Tensor, uploads: Optional[torch.Tensor] = None,
                    fraction: float = 1.0) -> None:
        """Called with the round's x and sum_i w_i u_i, before the server step; ``uploads`` is
        sum_i w_i of the clients' extra uploads, ``fraction`` the round's share of all samples.
        With ``displacement: previous``: the next round's d = (x - sum_i w_i u_i) / (alpha K)."""
        if self.displacement == "previous":
            self.direction = (x - avg).div_(self.lr * self.local_steps())

    def client_start(self, c: ClientState, y: torch.Tensor) -> None:
        """Modify the starting iterate y (a copy of x) in place: the displacement (Algorithm 2,
        lines 3-6), y_0 = x - beta (g - g_i), where ``displacement`` is not none; else y_0 = x."""
        if self.displacement != "none" and self.beta and c.g is not None:
            y.sub_(c.g - c.g_i, alpha=self.beta)

    def local_direction(self, c: ClientState, y: torch.Tensor, grad: torch.Tensor) -> None:
        """Turn the minibatch gradient at y into the step direction, in place.
        Weight decay (coupled L2) is added at the current iterate, never to g_i or g."""
        if self.cfg.weight_decay:
            grad.add_(y, alpha=self.cfg.weight_decay)

    def average_from_gradient(self, x: torch.Tensor, grad_sum: torch.Tensor) -> torch.Tensor:
        """sum_i w_i y_i from sum_i w_i grad_i, for a ``gradient_form`` algorithm:
        x - lr (grad_sum + lambda x), in place in ``grad_sum``."""
        if self.cfg.weight_decay:
            grad_sum.add_(x, alpha=self.cfg.weight_decay)
        return grad_sum.mul_(-self.lr).add_(x)

    extra_state: tuple = ()  # names of a subclass's own server tensors carried across rounds

    def state_dict(self) -> dict:
        """The server state carried across rounds (for checkpoints)."""
        pairs = [("momentum", self.server_m), ("second", self.server_v), ("direction", self.direction)]
        pairs += [(k, getattr(self, k)) for k in self.extra_state]
        return {k: None if t is None else t.detach().cpu() for k, t in pairs}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        m, v, d = state["momentum"], state.get("second"), state.get("direction")
        self.server_m = None if m is None else m.to(device)
        self.server_v = None if v is None else v.to(device)
        self.direction = None if d is None else d.to(device)
        for k in self.extra_state:
            t = state.get(k)
            setattr(self, k, None if t is None else t.to(device))

    @torch.no_grad()
    def server_step(self, x: torch.Tensor, avg: torch.Tensor) -> None:
        """Move x with the round's average ``avg`` = sum_i w_i y_i (``algorithm.server_opt``).

        sgd: x <- x + eta_s (avg - x), with optional heavy-ball momentum (FedAvgM):
        m <- mu_s m + (x - avg); x <- x - eta_s m.

        adam, yogi, adagrad (Reddi et al. 2021, Adaptive Federated Optimization, Algorithm 2, as
        Flower implements it, without bias correction): Delta = avg - x;
        m <- b1 m + (1 - b1) Delta (m_0 = 0, b1 = ``server_momentum``); v_0 = 0 and
        adagrad v <- v + Delta^2, adam v <- b2 v + (1 - b2) Delta^2,
        yogi v <- v - (1 - b2) Delta^2 sign(v - Delta^2); x <- x + eta_s m / (sqrt(v) + tau)."""
        c = self.cfg
        lr, mom = self.server_lr, c.server_momentum
        if c.server_opt == "sgd":
            if lr == 1.0 and mom == 0.0:
                x.copy_(avg)
                return
            delta = x - avg
            if mom:
                if self.server_m is None:
                    self.server_m = torch.zeros_like(x)
                delta = self.server_m.mul_(mom).add_(delta)
            x.sub_(delta, alpha=lr)
            return
        if self.server_m is None:
            self.server_m, self.server_v = torch.zeros_like(x), torch.zeros_like(x)
        delta = avg - x
        m, v, sq = self.server_m, self.server_v, delta * delta
        m.mul_(mom).add_(delta, alpha=1 - mom)
        if c.server_opt == "adagrad":
            v.add_(sq)
        elif c.server_opt == "adam":
            v.mul_(c.server_beta2).add_(sq, alpha=1 - c.server_beta2)
        else:  # yogi
            v.sub_(sq * torch.sign(v - sq), alpha=1 - c.server_beta2)
        x.addcdiv_(m, v.sqrt().add_(c.server_eps), value=lr)
