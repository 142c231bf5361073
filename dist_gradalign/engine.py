"""The round loop: sample clients, run the algorithm's two phases, evaluate, log.

Every rank computes; rank 0 alone writes the run directory (DESIGN.md section 5):
``config.yaml``, ``partition.json``, ``metrics.jsonl`` (one row per round), ``summary.json``
and ``model.pt``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .algorithms import build_algorithm
from .backend import Backend
from .config import Config, ConfigError, dump_config
from .data import load_dataset, partition, sample_clients
from .executor import SequentialExecutor, batch_size_of
from .models import FlatModel, build_model, evaluate_sums
from .tracking import start_tracker


class DivergenceError(RuntimeError):
    """A loss or the parameters became NaN or infinite."""


class RunDirError(RuntimeError):
    """The run directory cannot be used."""


@dataclass
class Counters:
    round: int = 0
    comm_rounds: int = 0
    updates: int = 0
    samples: int = 0


@dataclass
class Trainer:
    """Builds data, partition, model and algorithm from a Config; ``fit`` runs the rounds."""

    cfg: Config
    backend: Backend = field(default_factory=Backend)

    def __post_init__(self) -> None:
        cfg, be = self.cfg, self.backend
        dtype = torch.float64 if cfg.train.precision == "float64" else torch.float32
        data = load_dataset(cfg.data)
        self.num_classes = data.num_classes
        labels = data.y_train.numpy()
        self.shards_np = partition(labels, cfg.partition, cfg.seed)
        self.sizes = [len(s) for s in self.shards_np]
        if min(self.sizes) == 0:
            raise ConfigError(f"partition.num_clients = {cfg.partition.num_clients} leaves a client with no data "
                              f"({len(labels)} training samples, scheme {cfg.partition.scheme!r})")
        dev = be.device
        self.x_train, self.y_train = data.x_train.to(dev, dtype), data.y_train.to(dev)
        self.x_test, self.y_test = data.x_test[be.rank::be.world_size].to(dev, dtype), data.y_test[be.rank::be.world_size].to(dev)
        shards = [torch.as_tensor(s, dtype=torch.long, device=dev) for s in self.shards_np]

        torch.manual_seed(cfg.seed)  # the same initial x on every rank
        module = build_model(cfg.model, data.input_shape, data.num_classes).to(dev, dtype)
        self.fm = FlatModel(module)
        self.x = self.fm.params.clone()
        be.broadcast_(self.x)
        self.algo = build_algorithm(cfg.algorithm)
        self.executor = SequentialExecutor(self.fm, self.x_train, self.y_train, shards, cfg.seed,
                                           cfg.data.augment, cfg.train.micro_batch_size)
        self.counters = Counters()

    # ------------------------------------------------------------------ one round
    def round_clients(self, rnd: int) -> list[int]:
        return sample_clients(self.cfg.seed, rnd, self.cfg.partition.num_clients, self.cfg.train.clients_per_round)

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
        be, algo, x = self.backend, self.algo, self.x
        clients = self.round_clients(rnd)
        total = sum(self.sizes[c] for c in clients)
        weights = {c: self.sizes[c] / total for c in clients}  # w_i = n_i / sum_j n_j
        mine = be.assigned(clients)
        n = x.numel()

        g, g_locals = None, {}
        if algo.needs_client_grads:  # extra communication round: g = sum_i w_i g_i
            gbuf = torch.zeros_like(x)
            g_locals = self.executor.client_grads(algo, rnd, mine, weights, x, gbuf)
            g = be.all_reduce_(gbuf)

        buf = torch.zeros(n + 2, dtype=x.dtype, device=x.device)
        self.executor.local_updates(algo, rnd, mine, weights, x, g, g_locals, buf)
        be.all_reduce_(buf)
        algo.server_step(x, buf[:n])

        c = self.counters
        c.round = rnd
        c.comm_rounds += algo.comm_rounds()
        c.updates += algo.local_steps()
        c.samples += self._samples(clients)
        row = {"round": rnd, "comm_rounds": c.comm_rounds, "updates": c.updates, "samples": c.samples,
               "bytes": be.bytes_sent, "clients": clients, "train_loss": float(buf[n])}
        if g is not None:
            r = 0.5 * float(buf[n + 1])  # r(x) = 1/2 sum_i w_i ||g_i - g||^2
            row["grad_variance"] = r
            row["grad_variance_normalized"] = r / max(float(g.pow(2).sum()), 1e-30)
        if not math.isfinite(row["train_loss"]) or not bool(torch.isfinite(x).all()):
            raise DivergenceError(f"round {rnd}: the training loss is {row['train_loss']} and the parameters "
                                  f"are {'finite' if torch.isfinite(x).all() else 'not finite'}; "
                                  f"lower algorithm.lr (now {algo.cfg.lr})")
        return row

    def evaluate(self) -> tuple[float, float]:
        """Test accuracy and mean loss at x; each rank evaluates a slice, one all-reduce."""
        self.fm.params.copy_(self.x)
        sums = self.backend.all_reduce_(evaluate_sums(self.fm, self.x_test, self.y_test,
                                                      self.cfg.train.eval_batch_size), count=False)
        correct, loss, count = sums.tolist()
        return correct / count, loss / count

    # ------------------------------------------------------------------ the run
    def fit(self, overwrite: bool = False) -> dict:
        cfg, be = self.cfg, self.backend
        run_dir = Path(cfg.run_dir)
        if be.is_main:
            _prepare_run_dir(run_dir, overwrite)
            (run_dir / "config.yaml").write_text(dump_config(cfg))
            (run_dir / "partition.json").write_text(json.dumps(
                {"scheme": cfg.partition.scheme, "clients": {str(i): s.tolist() for i, s in enumerate(self.shards_np)}}))
        be.barrier()
        metrics = open(run_dir / "metrics.jsonl", "w") if be.is_main else None
        tracker = start_tracker(cfg, run_dir, fresh=overwrite) if be.is_main else None
        bar = None
        if be.is_main and cfg.train.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.train.rounds, desc=f"{cfg.algorithm.name}", unit="round", dynamic_ncols=True)
        start, row = time.perf_counter(), {}
        try:
            for rnd in range(1, cfg.train.rounds + 1):
                row = self.run_round(rnd)
                if rnd % cfg.train.eval_every == 0 or rnd == cfg.train.rounds:
                    row["test_acc"], row["test_loss"] = self.evaluate()
                row["time"] = time.perf_counter() - start
                if metrics:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                if tracker:
                    tracker.log(row)
                if bar:
                    bar.update(1)
                    post = {"loss": f"{row['train_loss']:.4f}"}
                    if "test_acc" in row:
                        post["acc"] = f"{row['test_acc']:.4f}"
                    bar.set_postfix(post, refresh=False)
        except BaseException:
            if tracker:
                tracker.finish(None, exit_code=1)
            raise
        finally:
            if bar:
                bar.close()
            if metrics:
                metrics.close()
        summary = {k: row[k] for k in ("round", "comm_rounds", "updates", "samples", "bytes",
                                        "train_loss", "test_acc", "test_loss", "time")}
        summary["algorithm"] = cfg.algorithm.name
        if tracker:
            tracker.finish(summary)
        if be.is_main:
            self.fm.params.copy_(self.x)
            torch.save(self.fm.state_dict(), run_dir / "model.pt")
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            print(f"{cfg.algorithm.name}: {summary['round']} rounds, {summary['updates']} updates, "
                  f"test_acc {summary['test_acc']:.4f}, test_loss {summary['test_loss']:.4f}, "
                  f"{summary['time']:.1f}s, {be.world_size} rank(s) -> {run_dir}", flush=True)
        return summary


def _prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    if (run_dir / "metrics.jsonl").exists() and not overwrite:
        raise RunDirError(f"run_dir = {str(run_dir)!r} already holds a run (metrics.jsonl); "
                          "choose another run_dir or pass --overwrite")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"run_dir = {str(run_dir)!r} is not writable: {e.strerror or e}") from None


def train(cfg: Config, overwrite: bool = False, backend: Optional[Backend] = None) -> dict:
    """Run a whole training job (the ``train`` command)."""
    be = backend or Backend.from_env(cfg.train.device)
    try:
        return Trainer(cfg, be).fit(overwrite)
    finally:
        if backend is None:
            be.shutdown()
