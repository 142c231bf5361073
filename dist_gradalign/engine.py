"""The round loop: sample clients, run the algorithm's two phases, evaluate, log, checkpoint.

The trainer composes parts built outside it: the data and its partition
(:class:`~dist_gradalign.data.clients.ClientData`), the model, loss and algorithm
(:func:`dist_gradalign.components.build`, where a user's parts enter and are checked), the
executor (:func:`dist_gradalign.executor.build_executor`) and the run directory
(:class:`~dist_gradalign.rundir.RunDirectory`). Every rank computes; rank 0 alone writes the
run directory (DESIGN.md section 5).
"""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import checkpoint, components
from .backend import Backend
from .config import Config
from .data import sample_clients
from .data.clients import ClientData
from .algorithms.schedule import is_scheduled
from .executor import batch_size_of, build_executor
from .models import FlatModel, evaluate_sums
from .rundir import RunDirectory, RunDirError
from .tracking import ID_FILE, start_tracker


class DivergenceError(RuntimeError):
    """A loss, gradient or parameter became NaN or infinite. ``local``: this rank saw it."""

    def __init__(self, message: str, local: bool = True):
        super().__init__(message)
        self.local = local


class Preempted(RuntimeError):
    """The run checkpointed and stopped after SIGTERM/SIGUSR1; the same command resumes it."""


@dataclass
class Counters:
    round: int = 0
    comm_rounds: int = 0
    updates: int = 0
    samples: int = 0
    time: float = 0.0  # wall seconds of training rounds (not evaluation or diagnostics), continued across resumes


@dataclass
class Trainer:
    """Runs the rounds of one run (``fit``) on parts built from a Config: data and partition,
    model, loss and algorithm (:mod:`dist_gradalign.components`; ``user`` holds objects given to
    :func:`dist_gradalign.fit` in place of the config's choices)."""

    cfg: Config
    backend: Backend = field(default_factory=Backend)
    user: dict = field(default_factory=dict)  # model, data, loss, algorithm: objects or factories

    def __post_init__(self) -> None:
        cfg, be = self.cfg, self.backend
        be.bytes_sent = 0  # this run's traffic (a backend may serve several runs; resume restores it)
        if be.is_main and cfg.train.clients_per_round < be.world_size:
            print(f"note: train.clients_per_round = {cfg.train.clients_per_round} < {be.world_size} ranks: "
                  f"{be.world_size - cfg.train.clients_per_round} rank(s) hold no client in a round",
                  file=sys.stderr, flush=True)
        dtype = torch.float64 if cfg.train.precision == "float64" else torch.float32
        if cfg.train.precision == "bf16" and be.device.type == "cpu" and be.is_main:
            print("note: train.precision = 'bf16' on CPU: autocast runs, but bfloat16 is rarely faster there",
                  file=sys.stderr, flush=True)
        # the parts, each built outside: data and partition, then model, loss and algorithm
        self.clients = ClientData.build(cfg, be, dtype, self.user.get("data"), plan=self._reads)
        self.parts = components.build(cfg, self.clients.source, self.clients.first, self.user, be.device, dtype)
        self.algo = self.parts.algorithm
        self.fm = FlatModel(self.parts.module, autocast=cfg.train.precision == "bf16", compile=cfg.train.compile,
                            loss=self.parts.loss)
        # the global state: x (rank 0's, broadcast), float buffers (averaged each round) and
        # integer buffers (counting local steps)
        self.x = self.fm.params.clone()
        be.broadcast_(self.x)
        self.b = self.fm.buffers.clone()
        if self.b.numel():
            be.broadcast_(self.b)
        self.b_int = [t.clone() for t in self.fm.int_buffers]
        self.executor, self.reducer, self.executor_record = build_executor(cfg, be, self.fm, self.data,
                                                                           self.shards_np, self.algo)
        self.executor.global_buffers = (self.b, self.b_int)
        self.run_dir = RunDirectory(Path(cfg.run_dir))
        self.counters = Counters()
        self.last_row: dict = {}
        self.stop_requested = False  # set by SIGTERM/SIGUSR1 on this rank
        self.stop_agreed = False  # some rank asked: all stop after this round

    # the data side, as the executors and tests read it
    @property
    def data(self):
        return self.clients.store

    @property
    def shards_np(self) -> list[np.ndarray]:
        return self.clients.shards

    @property
    def sizes(self) -> list[int]:
        return self.clients.sizes

    @property
    def val_np(self) -> np.ndarray:
        return self.clients.val

    @property
    def data_record(self) -> dict:
        return self.clients.record

    def _reads(self, rnd: int) -> list[torch.Tensor]:
        """The dataset indices this rank gathers in round ``rnd``, in order (``data.storage: stream``
        prefetches them): the diagnostic's, then the executor's."""
        mine = self._mine(self.round_clients(rnd))
        diag = self.executor.diagnostic_reads(mine, self.cfg.train.diagnostics_batch) if self._diag_round(rnd) else []
        return diag + self.executor.round_reads(self.algo, rnd, mine)

    def _diag_round(self, rnd: int) -> bool:
        every = self.cfg.train.diagnostics_every
        return bool(every) and (rnd == 1 or rnd % every == 0)

    # ------------------------------------------------------------------ one round
    def round_clients(self, rnd: int) -> list[int]:
        return sample_clients(self.cfg.seed, rnd, self.cfg.partition.num_clients, self.cfg.train.clients_per_round)

    def _mine(self, clients: list[int]) -> list[int]:
        """The round's clients this rank runs: by position, or by owner when clients keep state."""
        be = self.backend
        return be.owned(clients) if self.algo.keeps_client_state else be.assigned(clients)

    def _weights(self, clients: list[int]) -> dict[int, float]:
        """w_i = n_i / sum_j n_j over the round's clients (DESIGN.md section 1)."""
        total = sum(self.sizes[c] for c in clients)
        return {c: self.sizes[c] / total for c in clients}

    def _samples(self, clients: list[int]) -> int:
        """Examples processed by forward passes this round, all clients (known without communication)."""
        a = self.algo
        steps, total = a.local_steps(), 0
        for c in clients:
            n = self.sizes[c]
            total += steps * batch_size_of(n, a.cfg.local_batch_size)
            if a.needs_client_grads:
                size = a.cfg.local_batch_size if a.grad_batch == "local" else a.cfg.full_grad_batch
                total += batch_size_of(n, size)
        return total

    def run_round(self, rnd: int) -> dict:
        """One round of the algorithm (DESIGN.md section 1); returns the metrics row."""
        be, algo, x, ex = self.backend, self.algo, self.x, self.executor
        ex.start_round()
        algo.set_round(rnd, self.cfg.train.rounds)
        clients = self.round_clients(rnd)
        weights = self._weights(clients)
        mine = self._mine(clients)
        n = x.numel()

        g, g_locals = None, {}
        if algo.needs_client_grads:
            gbuf = torch.zeros_like(x)
            g_locals = ex.client_grads(algo, rnd, mine, weights, x, gbuf)
            if algo.reduces_g:  # the extra communication round: g = sum_i w_i g_i
                g = self.reducer.finish(gbuf) if self.reducer else be.all_reduce_(gbuf)
        g = algo.round_g(g)

        # [sum_i w_i y_i (or w_i grad_i) | train loss | sum_i w_i ||g_i - g||^2 | stop requested | non-finite
        #  | sum_i w_i (the clients' extra uploads: stateful SCAFFOLD's c_i+ - c_i) | sum_i w_i b_i (float buffers)]
        up, nb = algo.upload_size(n), self.b.numel()
        buf = torch.zeros(n + 4 + up + nb, dtype=x.dtype, device=x.device)
        ex.local_updates(algo, rnd, mine, weights, x, g, g_locals, buf)
        buf[n + 2] = float(self.stop_requested)
        buf[n + 3] = ex.nonfinite(buf)
        gradient_form = self.reducer is not None and algo.gradient_form
        if gradient_form:  # the gradient buckets are in flight: the scalars follow them
            self.reducer.finish(buf[:n], extra=buf[n:])
        else:
            be.all_reduce_(buf)
        if buf[n + 3] > 0:
            mine_bad = ex.diverged()
            where = (f"{mine_bad} (rank {be.rank})" if mine_bad
                     else "a loss, gradient or parameter of a client on another rank (that rank names it)")
            raise DivergenceError(f"round {rnd}: {where} is not finite; the last good checkpoint is kept in "
                                  f"{Path(self.cfg.run_dir) / 'checkpoints'}; lower algorithm.lr (now {algo.cfg.lr})",
                                  local=mine_bad is not None)
        self.stop_agreed = bool(buf[n + 2] > 0)
        avg = algo.average_from_gradient(x, buf[:n]) if gradient_form else buf[:n]
        algo.after_round(x, avg, buf[n + 4:n + 4 + up], sum(self.sizes[c] for c in clients) / sum(self.sizes))
        algo.server_step(x, avg)
        if nb:  # buffers (batch-norm statistics): the clients' weighted average, as FedAvg averages them
            self.b.copy_(buf[n + 4 + up:])
        for t in self.b_int:  # integer buffers (num_batches_tracked) count a client's local steps
            t += algo.local_steps()

        c = self.counters
        c.round = rnd
        c.comm_rounds += algo.comm_rounds()
        c.updates += algo.local_steps()
        c.samples += self._samples(clients)
        row = {"round": rnd, "comm_rounds": c.comm_rounds, "updates": c.updates, "samples": c.samples,
               "bytes": be.bytes_sent, "clients": clients, "train_loss": float(buf[n])}
        if is_scheduled(algo.cfg):
            row["lr"] = algo.lr
        if algo.reduces_g:
            r = 0.5 * float(buf[n + 1])  # r(x) = 1/2 sum_i w_i ||g_i - g||^2
            row["grad_variance"] = r
            row["grad_variance_normalized"] = r / max(float(g.pow(2).sum()), 1e-30)
        if not bool(torch.isfinite(x).all()):  # e.g. overflow in the server step
            raise DivergenceError(f"round {rnd}: the global parameters x are not finite after the server step; "
                                  f"lower algorithm.lr (now {algo.cfg.lr}) or algorithm.server_lr")
        return row

    def evaluate(self) -> dict:
        """Test (and, with a hold-out, validation) accuracy and mean loss at x; each rank
        evaluates a slice, one all-reduce (not counted as training traffic)."""
        self.load_global()
        bs = self.cfg.train.eval_batch_size
        parts = [evaluate_sums(self.fm, self.data.eval_batches("test", bs))]
        if len(self.val_np):
            parts.append(evaluate_sums(self.fm, self.data.eval_batches("val", bs)))
        sums = self.backend.all_reduce_(torch.cat(parts), count=False).tolist()
        out = {"test_acc": sums[0] / sums[2], "test_loss": sums[1] / sums[2]}
        if len(self.val_np):
            out.update(val_acc=sums[3] / sums[5], val_loss=sums[4] / sums[5])
        if not hasattr(self.fm.loss, "correct"):  # a loss without accuracy: losses only
            out = {k: v for k, v in out.items() if not k.endswith("_acc")}
        return out

    def load_global(self) -> None:
        """Put the global state into the module: x and the global buffers."""
        self.fm.params.copy_(self.x)
        self.fm.buffers.copy_(self.b)
        for t, v in zip(self.fm.int_buffers, self.b_int):
            t.copy_(v)

    def diagnostics(self, rnd: int) -> dict:
        """r(x) = 1/2 sum_i w_i ||g_i - g||^2 at the round's x over the round's clients (DESIGN.md
        section 1), for every algorithm, each g_i on the client's fixed ``train.diagnostics_batch``
        sample. Two all-reduces that are not training traffic (not in ``bytes`` or ``comm_rounds``)."""
        be, x = self.backend, self.x
        clients = self.round_clients(rnd)
        weights = self._weights(clients)
        g = torch.zeros_like(x)
        g_locals = self.executor.diagnostic_grads(self._mine(clients), weights, x,
                                                  self.cfg.train.diagnostics_batch, g)
        be.all_reduce_(g, count=False)
        s = torch.zeros(1, dtype=x.dtype, device=x.device)
        for cid, g_i in g_locals.items():
            s += weights[cid] * (g_i - g).pow(2).sum()
        r, g_sq = 0.5 * float(be.all_reduce_(s, count=False)), float(g.pow(2).sum())
        return {"diag_grad_variance": r, "diag_grad_variance_normalized": r / max(g_sq, 1e-30), "diag_grad_sq": g_sq}

    # ------------------------------------------------------------------ checkpoints
    def _records(self) -> dict[str, str]:
        """How the run was composed, for rank 0 to write into run_dir beside config.yaml."""
        cfg = self.cfg
        out = {"partition.json": json.dumps({"scheme": cfg.partition.scheme,
                                             "clients": {str(i): s.tolist() for i, s in enumerate(self.shards_np)}}),
               "data.json": json.dumps(self.data_record, indent=1),
               "components.json": json.dumps(self.parts.record, indent=1),
               "executor.json": json.dumps(self.executor_record, indent=1)}
        if len(self.val_np):
            out["val_indices.json"] = json.dumps({"val_fraction": cfg.data.val_fraction, "indices": self.val_np.tolist()})
        return out

    def _restore(self, state: dict) -> None:
        be = self.backend
        self.x.copy_(state["x"])
        if "buffers" in state:  # (checkpoints before version 0.2 have none: their models had none)
            self.b.copy_(state["buffers"])
            for t, v in zip(self.b_int, state["int_buffers"]):
                t.copy_(v)
        self.algo.load_state_dict(state["algorithm"], self.x.device)
        self.counters = Counters(**state["counters"])
        be.bytes_sent = state["bytes"]
        self.last_row = state["last_row"]
        if state["world_size"] == be.world_size:
            checkpoint.set_rng_state(state["rng"][be.rank])
        elif be.is_main:  # the trajectory does not depend on them: clients seed their own
            print(f"note: checkpoint made with {state['world_size']} ranks, resumed with {be.world_size}: "
                  "process RNG states not restored (training randomness is per client)", flush=True)

    def _gather_client_state(self, chunk: int = 64) -> Optional[dict]:
        """Every rank's per-client state (stateful SCAFFOLD's c_i) on rank 0, ``chunk`` rows per
        rank at a time, so that the transient copies stay small; None on the other ranks. (Rank
        0's own rows go to ``torch.save`` as they are: views, whose blocks it writes once.)"""
        be = self.backend
        state = self.algo.client_state()
        if be.world_size == 1:
            return state
        mine = [] if be.is_main else sorted(state.items())  # rank 0's own rows are not sent
        most = max(be.gather_object(len(mine)))
        out: dict = dict(state) if be.is_main else {}
        for start in range(0, most, chunk):
            # copies: a pickled view would carry its whole block
            parts = be.gather_to_main({c: t.clone() for c, t in mine[start:start + chunk]})
            if be.is_main:
                for part in parts:
                    out.update(part)
        return out if be.is_main else None

    def _scatter_client_state(self, rows: Optional[dict]) -> None:
        """From rank 0's checkpoint ``rows`` (ignored elsewhere), each rank loads the per-client
        state of the clients it owns now (the inverse of :meth:`_gather_client_state`)."""
        be = self.backend
        parts = None
        if be.is_main:
            parts = [{} for _ in range(be.world_size)]
            for cid, row in (rows or {}).items():
                parts[be.owner(cid)][cid] = row
        self.algo.load_client_state(be.scatter_from_main(parts))

    def _checkpoint(self) -> Optional[Path]:
        """Every rank contributes its RNG states; rank 0 writes."""
        be = self.backend
        rngs = be.gather_object(checkpoint.rng_state())
        per_client = self._gather_client_state() if self.algo.keeps_client_state else None
        if not be.is_main:
            return None
        id_file = Path(self.cfg.run_dir) / ID_FILE
        state = {"round": self.counters.round, "x": self.x.detach().cpu(), "buffers": self.b.detach().cpu(),
                 "int_buffers": [t.cpu() for t in self.b_int], "algorithm": self.algo.state_dict(),
                 "counters": asdict(self.counters), "bytes": be.bytes_sent, "rng": rngs,
                 "world_size": be.world_size, "config": self.cfg.to_dict(), "last_row": self.last_row,
                 "wandb_id": id_file.read_text().strip() if id_file.is_file() else None,
                 "clients": per_client}
        return self.run_dir.save_checkpoint(state, self.cfg.train.keep_checkpoints)

    # ------------------------------------------------------------------ the run
    def fit(self, overwrite: bool = False, resume: str = "auto") -> dict:
        """Run (or resume) the rounds. Rank 0 writes the run directory and checkpoints every
        ``train.checkpoint_every`` rounds, at the end, and at the round boundary after SIGTERM or
        SIGUSR1 (then raises :class:`Preempted`). Rank 0 locks the run directory first and
        holds it until fit returns or raises: a second run on it stops at once (RunDirError)."""
        try:
            return self._fit(overwrite, resume)
        finally:
            self.run_dir.close()

    def _fit(self, overwrite: bool, resume: str) -> dict:
        cfg, be = self.cfg, self.backend
        decision: tuple = ("ok", None)
        if be.is_main:
            try:
                decision = ("ok", self.run_dir.open(cfg, overwrite, resume, self._records()))
            except (RunDirError, checkpoint.CheckpointError) as e:
                decision = ("error", e)
        # every c_i of stateful SCAFFOLD goes only to the rank that owns the client, not to all
        clients = decision[1].pop("clients", None) if decision[0] == "ok" and decision[1] else None
        decision = be.broadcast_object(decision)
        if decision[0] == "error":
            raise decision[1]
        if decision[1] is not None:
            if self.algo.keeps_client_state:
                self._scatter_client_state(clients)
            self._restore(decision[1])
        if self.counters.round >= cfg.train.rounds:
            summary = self._summary()
            if be.is_main:
                if not self.run_dir.finished():
                    self._write_final(summary)  # the run stopped between its last checkpoint and these
                print(f"{cfg.run_dir}: finished at round {self.counters.round}; nothing to do "
                      "(raise train.rounds to continue, or pass --overwrite)", flush=True)
            return summary

        if be.is_main:
            self.run_dir.start_metrics()
        tracker = start_tracker(cfg, Path(cfg.run_dir), fresh=overwrite) if be.is_main else None
        bar = None
        if be.is_main and cfg.train.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.train.rounds, initial=self.counters.round, desc=self.parts.record["algorithm"],
                       unit="round", dynamic_ncols=True)
        handlers = _install_stop_handlers(self)
        try:
            for rnd in range(self.counters.round + 1, cfg.train.rounds + 1):
                self.data.start_round(rnd)
                diag = self.diagnostics(rnd) if self._diag_round(rnd) else {}
                start = time.perf_counter()
                row = self.run_round(rnd)
                # training wall time: evaluation and diagnostics are not counted
                row["time"] = self.counters.time = self.counters.time + time.perf_counter() - start
                row.update(diag)
                if rnd % cfg.train.eval_every == 0 or rnd == cfg.train.rounds:
                    row.update(self.evaluate())
                self.last_row = row
                if be.is_main:
                    self.run_dir.append(row)
                if tracker:
                    tracker.log(row)
                if bar:
                    bar.update(1)
                    bar.set_postfix({k: f"{row[k]:.4f}" for k in ("train_loss", "val_acc", "test_acc") if k in row}, refresh=False)
                every = cfg.train.checkpoint_every
                if self.stop_agreed or (every and rnd % every == 0) or rnd == cfg.train.rounds:
                    path = self._checkpoint()
                    if self.stop_agreed and rnd < cfg.train.rounds:
                        raise Preempted(f"stopped by a signal after round {rnd} of {cfg.train.rounds}; "
                                        f"checkpoint {path or self.run_dir.checkpoints}; run the same command "
                                        "again to resume")
        except BaseException:
            if tracker:
                tracker.finish(None, exit_code=1)
            raise
        finally:
            self.data.close()
            _restore_handlers(handlers)
            if bar:
                bar.close()
        summary = self._summary()
        if tracker:
            tracker.finish(summary)
        if be.is_main:
            self._write_final(summary)
            acc = f"test_acc {summary['test_acc']:.4f}, " if summary.get("test_acc") is not None else ""
            print(f"{summary['algorithm']}: {summary['round']} rounds, {summary['updates']} updates, "
                  f"{acc}test_loss {summary['test_loss']:.4f}, "
                  f"{summary['time']:.1f}s, {be.world_size} rank(s) -> {cfg.run_dir}", flush=True)
        return summary

    def _write_final(self, summary: dict) -> None:
        """Rank 0: the final parameters and buffers (``model.pt``) and ``summary.json``."""
        self.load_global()
        self.run_dir.write_final(self.fm.state_dict(), summary)

    def _summary(self) -> dict:
        row = self.last_row
        summary = {k: row.get(k) for k in ("round", "comm_rounds", "updates", "samples", "bytes",
                                            "train_loss", "test_acc", "test_loss", "time")}
        summary.update({k: row[k] for k in ("val_acc", "val_loss") if k in row})
        summary["algorithm"] = self.parts.record["algorithm"]  # the config's name, or the object given to fit
        return summary


def _install_stop_handlers(trainer: Trainer) -> dict:
    """SIGTERM and SIGUSR1 (SLURM's warning before preemption) ask for a checkpoint and a stop at
    the next round boundary; the ranks agree on it through the round's all-reduce."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    def request_stop(signum, frame):
        trainer.stop_requested = True
    return {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGUSR1)}


def _restore_handlers(handlers: dict) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
