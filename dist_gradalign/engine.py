"""The round loop: sample clients, run the algorithm's two phases, evaluate, log, checkpoint.

Every rank computes; rank 0 alone writes the run directory (DESIGN.md section 5):
``config.yaml``, ``partition.json``, ``metrics.jsonl`` (one row per round), ``checkpoints/``,
``summary.json`` and ``model.pt``.
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
from .backend import Backend, BucketReducer
from .config import Config, ConfigError, dump_config
from .data import holdout, keys_of, partition, sample_clients
from .data.sources import ImageSplit, Source, drop_corrupt, materialize, open_source
from .data.stream import InMemory, Streamed, cast, choose_storage, find_corrupt
from .executor import SequentialExecutor, batch_size_of, choose_executor
from .models import FlatModel, build_model, evaluate_sums
from .rundir import RunDirError, RunDirLock, lock_run_dir
from .tracking import ID_FILE, start_tracker
from .vectorized import VectorizedExecutor


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
        unknown = set(self.user) - {"model", "data", "loss", "algorithm"}
        if unknown:
            raise ConfigError(f"unknown part(s) {', '.join(sorted(unknown))}: fit takes model, data, loss, algorithm")
        be.bytes_sent = 0  # this run's traffic (a backend may serve several runs; resume restores it)
        if be.is_main and cfg.train.clients_per_round < be.world_size:
            print(f"note: train.clients_per_round = {cfg.train.clients_per_round} < {be.world_size} ranks: "
                  f"{be.world_size - cfg.train.clients_per_round} rank(s) hold no client in a round",
                  file=sys.stderr, flush=True)
        dtype = torch.float64 if cfg.train.precision == "float64" else torch.float32
        if cfg.train.precision == "bf16" and be.device.type == "cpu" and be.is_main:
            print("note: train.precision = 'bf16' on CPU: autocast runs, but bfloat16 is rarely faster there",
                  file=sys.stderr, flush=True)
        src = self._open_source()
        dev = be.device
        self.data_record = choose_storage(cfg.data, src, be.local_world_size, dev, dtype.itemsize)
        stream = self.data_record["storage"] == "stream"
        if be.is_main and stream:
            rec = self.data_record
            print(f"data: storage stream ({rec['reason']}), {cfg.data.workers} loader worker(s) per rank",
                  file=sys.stderr, flush=True)
        if stream:
            self._drop_corrupt(src)
            targets = src.train.labels
            first = src.normalizer(src.train.read(np.arange(min(2, len(targets))))), targets[:2]
        else:
            ds = materialize(src, cfg.data)  # with on_corrupt = skip, undecodable images are dropped here
            self.data_record["skipped"] = ds.skipped
            targets = ds.y_train.numpy()
            first = ds.x_train[:2], targets[:2]
        # partition keys: class ids, or a user dataset's partition_keys (iid needs neither)
        keys = keys_of(targets, src.train.keys, cfg.partition.scheme, src.name)
        # the validation hold-out leaves the training set before partitioning (disjoint from every shard)
        self.val_np, rest = holdout(keys, cfg.data.val_fraction, cfg.seed)
        if cfg.data.val_fraction > 0 and len(self.val_np) == 0:
            raise ConfigError(f"data.val_fraction = {cfg.data.val_fraction} holds out no sample: every class has "
                              f"fewer than {0.5 / cfg.data.val_fraction:.0f} training samples; raise it")
        self.shards_np = [rest[s] for s in partition(keys[rest], cfg.partition, cfg.seed)]
        self.sizes = [len(s) for s in self.shards_np]
        if min(self.sizes) == 0:
            raise ConfigError(f"partition.num_clients = {cfg.partition.num_clients} leaves a client with no data "
                              f"({len(keys)} training samples, scheme {cfg.partition.scheme!r})")
        # evaluation: each rank a slice of the test set and of the validation hold-out
        if stream:
            self.data = Streamed(src, self.val_np, be.rank, be.world_size, dev, dtype, cfg.data, self._reads,
                                 cfg.train.rounds)
        else:
            self.data = InMemory(ds, self.val_np, be.rank, be.world_size, dev, dtype)
            del ds
        shards = [torch.as_tensor(s, dtype=torch.long) for s in self.shards_np]  # on CPU: indices are gathered there

        # the model, its loss and the algorithm: built-in or the user's, checked in components
        torch.manual_seed(cfg.seed)  # the same initial x on every rank (rank 0's is broadcast too)
        module, model_from = components.build_model(cfg, src.train.input_shape, src.num_classes, self.user.get("model"))
        module = module.to(dev, dtype)
        loss, loss_from = components.build_loss(cfg, self.user.get("loss"))
        self.algo, algo_from = components.build_algorithm(cfg, self.user.get("algorithm"))
        self.components = {"model": model_from, "data": src.name, "loss": loss_from, "algorithm": algo_from}
        components.check_batch(module, loss, cast(torch.as_tensor(first[0]), dev, dtype),
                               cast(torch.as_tensor(first[1]), dev, dtype), self.components)
        if cfg.train.compile and any(True for _ in module.buffers()):
            raise ConfigError("train.compile = true is not supported for a model with buffers (batch norm): its "
                              "running statistics change inside the compiled graph; set train.compile=false")
        self.fm = FlatModel(module, autocast=cfg.train.precision == "bf16", compile=cfg.train.compile, loss=loss)
        self.x = self.fm.params.clone()
        be.broadcast_(self.x)
        # the global buffers: float ones averaged each round, integer ones counting local steps
        self.b = self.fm.buffers.clone()
        if self.b.numel():
            be.broadcast_(self.b)
        self.b_int = [t.clone() for t in self.fm.int_buffers]
        self.executor_record = choose_executor(cfg.train.executor, dev, module, cfg.train.clients_per_round,
                                               be.world_size, cfg.train.micro_batch_size)
        sequential = self.executor_record["executor"] == "sequential"
        if be.is_main and cfg.train.executor == "auto":
            print(f"executor: {self.executor_record['executor']} (auto: {self.executor_record['reason']})", flush=True)
        # Bucketed overlap needs a backward pass per client: the sequential executor only.
        overlaps = self.algo.needs_client_grads or self.algo.gradient_form
        self.reducer = (BucketReducer(be, self.fm.param_list, self.fm.grads, int(cfg.train.bucket_mb * 2**20))
                        if cfg.train.comm == "bucketed" and sequential and overlaps else None)
        if not sequential:
            self.executor = VectorizedExecutor(self.fm, self.data, shards, cfg.seed,
                                               cfg.data.augment, cfg.train.micro_batch_size)
        else:
            self.executor = SequentialExecutor(self.fm, self.data, shards, cfg.seed,
                                               cfg.data.augment, cfg.train.micro_batch_size, self.reducer)
        self.executor.global_buffers = (self.b, self.b_int)
        self.counters = Counters()
        self.last_row: dict = {}
        self.stop_requested = False  # set by SIGTERM/SIGUSR1 on this rank
        self.stop_agreed = False  # some rank asked: all stop after this round
        self.lock: Optional[RunDirLock] = None  # rank 0's lock on run_dir while fit runs

    def _open_source(self) -> Source:
        """Open the data source (with ``data.download``, local rank 0 fetches it first, once per node)."""
        cfg, be, data = self.cfg, self.backend, self.user.get("data")
        if cfg.data.download and be.world_size > 1:
            src = open_source(cfg.data, data) if be.local_rank == 0 else None
            be.barrier()
            return src or open_source(cfg.data, data)
        return open_source(cfg.data, data)

    def _drop_corrupt(self, src: Source) -> None:
        """``data.on_corrupt: skip`` when streaming: every image is decoded once, each rank a slice
        (with ``data.workers`` processes), and the ranks agree on the list by one all-reduce."""
        cfg, be = self.cfg, self.backend
        skipped = []
        for name in ("train", "test"):
            split = getattr(src, name)
            if cfg.data.on_corrupt != "skip" or not isinstance(split, ImageSplit):
                continue
            if be.is_main:
                print(f"data.on_corrupt = skip: decoding the {len(split)} {name} images once to find corrupt "
                      "ones", file=sys.stderr, flush=True)
            mask = torch.zeros(len(split), device=be.device)
            mask[find_corrupt(split, np.arange(be.rank, len(split), be.world_size), cfg.data.workers)] = 1
            bad = be.all_reduce_(mask, count=False).nonzero().flatten().tolist()
            skipped += [split.describe(i) for i in bad]
            setattr(src, name, drop_corrupt(split, bad, name))
        self.data_record["skipped"] = skipped

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
    def _prepare(self, run_dir: Path, ckpt_dir: Path, overwrite: bool, resume: str) -> Optional[dict]:
        """Rank 0: make the run directory ready; return the checkpoint state to resume from."""
        cfg = self.cfg
        _check_writable(run_dir)
        if overwrite:
            for name in ("metrics.jsonl", "summary.json", "model.pt"):
                (run_dir / name).unlink(missing_ok=True)
            for old in checkpoint.list_checkpoints(ckpt_dir):
                old.unlink()
                old.with_suffix(".pt.sha256").unlink(missing_ok=True)
        latest = None if overwrite or resume == "never" else checkpoint.load_latest(ckpt_dir)
        if latest:
            path, state = latest
            diffs = checkpoint.config_differences(state["config"], cfg.to_dict(), Config().to_dict())
            if diffs:
                raise checkpoint.CheckpointError(
                    f"checkpoint {str(path)!r} was made with another config ({'; '.join(diffs)}): resume with "
                    "the original config, or choose another run_dir, or pass --overwrite to start again")
            _truncate_metrics(run_dir / "metrics.jsonl", state["round"])
            print(f"resuming from {path} (round {state['round']})", flush=True)
        elif (run_dir / "metrics.jsonl").exists():
            if resume == "never" or (run_dir / "summary.json").exists():
                raise RunDirError(f"run_dir = {str(run_dir)!r} already holds a run (metrics.jsonl) and no usable "
                                  "checkpoint to resume from; choose another run_dir or pass --overwrite")
            print(f"warning: {run_dir} holds an unfinished run without a usable checkpoint; "
                  "starting again from round 1", file=sys.stderr, flush=True)
            (run_dir / "metrics.jsonl").unlink()
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        (run_dir / "partition.json").write_text(json.dumps(
            {"scheme": cfg.partition.scheme, "clients": {str(i): s.tolist() for i, s in enumerate(self.shards_np)}}))
        (run_dir / "data.json").write_text(json.dumps(self.data_record, indent=1))
        (run_dir / "components.json").write_text(json.dumps(self.components, indent=1))
        (run_dir / "executor.json").write_text(json.dumps(self.executor_record, indent=1))
        if len(self.val_np):
            (run_dir / "val_indices.json").write_text(json.dumps(
                {"val_fraction": cfg.data.val_fraction, "indices": self.val_np.tolist()}))
        return latest[1] if latest else None

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

    def _checkpoint(self, ckpt_dir: Path) -> Optional[Path]:
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
        return checkpoint.save(ckpt_dir, state, self.cfg.train.keep_checkpoints)

    # ------------------------------------------------------------------ the run
    def fit(self, overwrite: bool = False, resume: str = "auto") -> dict:
        """Run (or resume) the rounds. Rank 0 writes the run directory and checkpoints every
        ``train.checkpoint_every`` rounds, at the end, and at the round boundary after SIGTERM or
        SIGUSR1 (then raises :class:`Preempted`). Rank 0 locks the run directory first and
        holds it until fit returns or raises: a second run on it stops at once (RunDirError)."""
        try:
            return self._fit(overwrite, resume)
        finally:
            if self.lock:
                self.lock.release()
                self.lock = None

    def _fit(self, overwrite: bool, resume: str) -> dict:
        cfg, be = self.cfg, self.backend
        run_dir = Path(cfg.run_dir)
        ckpt_dir = run_dir / "checkpoints"
        decision: tuple = ("ok", None)
        if be.is_main:
            try:
                self.lock = lock_run_dir(run_dir)  # before anything in run_dir is written
                decision = ("ok", self._prepare(run_dir, ckpt_dir, overwrite, resume))
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
                if not ((run_dir / "model.pt").is_file() and (run_dir / "summary.json").is_file()):
                    self._write_final(run_dir, summary)  # the run stopped between its last checkpoint and these
                print(f"{run_dir}: finished at round {self.counters.round}; nothing to do "
                      "(raise train.rounds to continue, or pass --overwrite)", flush=True)
            return summary

        metrics = open(run_dir / "metrics.jsonl", "a") if be.is_main else None
        tracker = start_tracker(cfg, run_dir, fresh=overwrite) if be.is_main else None
        bar = None
        if be.is_main and cfg.train.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.train.rounds, initial=self.counters.round, desc=cfg.algorithm.name,
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
                if metrics:
                    _append(metrics, row)
                if tracker:
                    tracker.log(row)
                if bar:
                    bar.update(1)
                    bar.set_postfix({k: f"{row[k]:.4f}" for k in ("train_loss", "val_acc", "test_acc") if k in row}, refresh=False)
                every = cfg.train.checkpoint_every
                if self.stop_agreed or (every and rnd % every == 0) or rnd == cfg.train.rounds:
                    path = self._checkpoint(ckpt_dir)
                    if self.stop_agreed and rnd < cfg.train.rounds:
                        raise Preempted(f"stopped by a signal after round {rnd} of {cfg.train.rounds}; "
                                        f"checkpoint {path or ckpt_dir}; run the same command again to resume")
        except BaseException:
            if tracker:
                tracker.finish(None, exit_code=1)
            raise
        finally:
            self.data.close()
            _restore_handlers(handlers)
            if bar:
                bar.close()
            if metrics:
                metrics.close()
        summary = self._summary()
        if tracker:
            tracker.finish(summary)
        if be.is_main:
            self._write_final(run_dir, summary)
            acc = f"test_acc {summary['test_acc']:.4f}, " if summary.get("test_acc") is not None else ""
            print(f"{cfg.algorithm.name}: {summary['round']} rounds, {summary['updates']} updates, "
                  f"{acc}test_loss {summary['test_loss']:.4f}, "
                  f"{summary['time']:.1f}s, {be.world_size} rank(s) -> {run_dir}", flush=True)
        return summary

    def _write_final(self, run_dir: Path, summary: dict) -> None:
        """Rank 0: the final parameters and buffers (``model.pt``) and ``summary.json``."""
        self.load_global()
        torch.save(self.fm.state_dict(), run_dir / "model.pt")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))

    def _summary(self) -> dict:
        row = self.last_row
        summary = {k: row.get(k) for k in ("round", "comm_rounds", "updates", "samples", "bytes",
                                            "train_loss", "test_acc", "test_loss", "time")}
        summary.update({k: row[k] for k in ("val_acc", "val_loss") if k in row})
        summary["algorithm"] = self.cfg.algorithm.name
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


def _append(metrics, row: dict) -> None:
    try:
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
    except OSError as e:
        raise RunDirError(f"cannot write {metrics.name!r}: {e.strerror or e}; the rows and checkpoints "
                          "written before are kept: free space and run the same command to resume") from None


def _truncate_metrics(path: Path, last_round: int) -> None:
    """Drop the rows after the checkpoint's round: the resumed run writes them again."""
    if not path.is_file():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["round"] <= last_round]
    path.write_text("".join(l + "\n" for l in keep))


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"run_dir = {str(run_dir)!r} is not writable: {e.strerror or e}") from None
