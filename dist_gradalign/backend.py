"""The only module that calls ``torch.distributed``.

Started by torchrun (``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` in the environment) it joins the
process group, NCCL when CUDA is available and gloo otherwise, at any world size (one rank
under torchrun is a real group of one); started by plain ``python`` it is world size 1 and
every collective is the identity, so the engine runs one code path.
The backend knows nothing of algorithms: it sums flat buffers (whole, or in buckets launched
during the backward pass: :class:`BucketReducer`) and counts the bytes it moved.
"""
from __future__ import annotations

import datetime
import functools
import importlib
import itertools
import os
import time
import uuid
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class CommError(RuntimeError):
    """A collective failed: a peer died or hangs (past ``train.timeout_s``), or the network failed."""


def _collective(method):
    """Turn the RuntimeError a failed collective raises (gloo's are plain RuntimeErrors, the
    others torch.distributed.DistError) into :class:`CommError` with a one-line reason."""
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except CommError:
            raise
        except RuntimeError as e:
            lines = [l.strip() for l in str(e).splitlines() if l.strip()]
            reason = next((l for l in lines if "Timed out" in l or "closed" in l or "refused" in l),
                          lines[0] if lines else type(e).__name__)
            raise CommError(f"rank {self.rank}: {reason[:300]} (train.timeout_s = {self.timeout_s:g})") from e
    return wrapped


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


ATTEMPT_KEY = "dist_gradalign/attempt_store"  # the one key this package writes into torchrun's store
PROBE_S = 2.0  # how long a rank tries an address read from ATTEMPT_KEY before reading it again


def attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """A store that only this attempt of the worker group uses, for a group started by a torchrun
    agent that shares its own store with the ranks (``TORCHELASTIC_USE_AGENT_STORE=True``: its
    default, unless ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``).

    Why torch does not prevent it (torch 2.14.1): ``torch.distributed.rendezvous._create_c10d_store``
    makes every rank a client of the agent's store with no per-attempt prefix ("We create a new
    TCPStore for every retry so no need to add prefix for each attempt"), but the dynamic
    rendezvous handler hosts the shared store once (``_shared_tcp_store_server``) and keeps it
    across rounds. A group restarted by ``--max-restarts`` therefore finds the keys of the
    attempt before it, among them gloo's addresses of ranks that no longer exist ("failed to
    connect ... Connection refused"; pytorch/pytorch#135712). A prefix by
    ``TORCHELASTIC_RESTART_COUNT`` would not do across nodes: an agent that restarts its healthy
    workers because another node re-joined does not count a restart, so the counts differ.

    So rank 0 hosts a new store (a free port on its host, ``MASTER_ADDR``) and publishes its port
    with a random token under :data:`ATTEMPT_KEY` of the agent's store; every other rank reads
    the key until the port it names answers with that token (a stale entry names a server that
    is gone, or a port another process took since, and is read again). The group's keys then
    live in a store no other attempt sees."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
    if rank == 0:
        own = dist.TCPStore(host, 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
        token = uuid.uuid4().hex
        own.set("token", token)
        agent.set(ATTEMPT_KEY, f"{token} {own.port}")
        return own
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        token, own_port = agent.get(ATTEMPT_KEY).decode().split()
        try:
            own = dist.TCPStore(host, int(own_port), world, is_master=False,
                                timeout=datetime.timedelta(seconds=PROBE_S))
            if own.get("token").decode() == token:
                own.set_timeout(timeout)
                return own
        except RuntimeError:  # a server that is gone, or one that is not this attempt's
            pass
        if time.monotonic() > deadline:
            raise CommError(f"rank {rank}: rank 0 of this attempt published no store in {timeout.total_seconds():g} s")
        time.sleep(0.2)


@dataclass
class Backend:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False  # a process group is joined (torchrun); else collectives are identities
    bytes_sent: int = 0  # all-reduced training payload per rank, summed over the run
    timeout_s: float = 1800.0  # how long a collective may wait for the other ranks

    @classmethod
    def from_env(cls, device: str = "auto", timeout_s: float = 1800.0) -> "Backend":
        """Join the torchrun process group if there is one; pick the device and thread count.

        torch._dynamo is imported before the group exists (about 1.3 s): imported after, it keeps
        references to the group that ``destroy_process_group`` cannot drop, so the group's threads
        outlive :meth:`shutdown` and a rank could abort at exit ("terminate called without an
        active exception", when a gloo thread frees a finished collective's tensors while Python
        finalizes). ``torch.compile`` imports it, and so do libraries a user's parts import
        (``torchvision.models`` among them), too late to choose."""
        world = _env_int("WORLD_SIZE", 1)
        rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        local_world = _env_int("LOCAL_WORLD_SIZE", world)
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("train.device = 'cuda' but CUDA is not available on this machine")
        if use_cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
            dev = torch.device("cuda", torch.cuda.current_device())
        else:
            dev = torch.device("cpu")
            # Oversubscribed intra-op threads slow CPU runs 4-18x (DESIGN.md section 2).
            # Count the CPUs this process may use (SLURM/cgroups binding), not the machine's.
            # OMP_NUM_THREADS, when set, may lower it (e.g. to leave cores to data.workers).
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            threads = max(1, cores // max(1, local_world))
            torch.set_num_threads(min(threads, _env_int("OMP_NUM_THREADS", threads) or threads))
        launched = "MASTER_ADDR" in os.environ and "RANK" in os.environ  # torchrun, or a SLURM step like it
        if (world > 1 or launched) and not dist.is_initialized():
            importlib.import_module("torch._dynamo")  # before the group: see the docstring
            timeout = datetime.timedelta(seconds=timeout_s)
            # torchrun's agent shares its store with the ranks: build the group on a store of
            # this attempt's own (see attempt_store); otherwise env:// (rank 0 hosts a new store)
            store = {"store": attempt_store(rank, world, timeout), "rank": rank, "world_size": world} \
                if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else {}
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout, **store,
                                    **({"device_id": dev} if use_cuda else {}))
        return cls(rank, world, local_rank, local_world, dev, dist.is_initialized(), timeout_s=timeout_s)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def assigned(self, clients: list[int]) -> list[int]:
        """This rank's share of the round's clients: position p goes to rank p % world_size."""
        return clients[self.rank::self.world_size]

    def owner(self, client: int) -> int:
        """The rank of a client that keeps state across rounds: client i on rank i % world_size
        every round (the state stays where it is; the load follows the sample)."""
        return client % self.world_size

    def owned(self, clients: list[int]) -> list[int]:
        """This rank's share of the round's clients that keep state across rounds (:meth:`owner`)."""
        return [c for c in clients if self.owner(c) == self.rank]

    @_collective
    def all_reduce_(self, buf: torch.Tensor, count: bool = True) -> torch.Tensor:
        """Sum ``buf`` over ranks, in place: one collective for the whole flat buffer.
        ``count``: add its payload to ``bytes_sent`` (training traffic; evaluation is not)."""
        if count:
            self.bytes_sent += buf.numel() * buf.element_size()
        if self.distributed:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf

    @_collective
    def broadcast_(self, buf: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.distributed:
            dist.broadcast(buf, src)
        return buf

    @_collective
    def broadcast_object(self, obj, src: int = 0):
        """``obj`` from rank ``src`` on every rank (pickled; for small control data)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    @_collective
    def gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    @_collective
    def gather_to_main(self, obj) -> list | None:
        """Every rank's ``obj``, in rank order, on rank 0 alone (None elsewhere)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    @_collective
    def scatter_from_main(self, objs: list | None):
        """Rank r receives ``objs[r]`` of rank 0's list (the argument is ignored elsewhere)."""
        if not self.distributed:
            return objs[0]
        out = [None]
        dist.scatter_object_list(out, objs if self.is_main else None, src=0)
        return out[0]

    @_collective
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


class BucketReducer:
    """Sums a flat gradient over ranks in buckets, each launched (asynchronously) as soon as the
    backward pass has produced it, so communication overlaps the rest of the backward pass.

    ``grads`` is the flat gradient vector whose slices are the parameters' ``.grad`` (see
    ``models.FlatModel``); a bucket is a contiguous slice of it of about ``bucket_bytes``,
    starting from the last parameters, which backward reaches first. Buckets are launched
    strictly in index order, so every rank issues the same collectives in the same order (a
    rank whose backward finishes its buckets in another order waits for the earlier ones, and
    a rank that holds no client launches them all at :meth:`finish`). The summed payload is the
    same as one flat all-reduce of ``out``, and is counted the same.
    """

    def __init__(self, backend: Backend, params: list[torch.nn.Parameter], grads: torch.Tensor, bucket_bytes: int):
        """``params``: the parameters in flat order, whose ``.grad`` are consecutive slices of ``grads``."""
        self.backend, self.grads = backend, grads
        ends = list(itertools.accumulate(p.numel() for p in params))
        self.buckets: list[tuple[int, int]] = []  # (start, end) in grads, last parameters first
        self.members: list[int] = []  # parameters per bucket
        bucket_of = [0] * len(params)
        for i in reversed(range(len(params))):
            start, end = ends[i] - params[i].numel(), ends[i]
            if self.buckets and (self.buckets[-1][1] - start) * grads.element_size() <= bucket_bytes:
                self.buckets[-1] = (start, self.buckets[-1][1])
                self.members[-1] += 1
            else:
                self.buckets.append((start, end))
                self.members.append(1)
            bucket_of[i] = len(self.buckets) - 1
        self.out: torch.Tensor | None = None
        self._weight, self._pending, self._next, self._handles = 0.0, [], 0, []
        for p, b in zip(params, bucket_of):
            p.register_post_accumulate_grad_hook(lambda _p, b=b: self._ready(b))

    def arm(self, out: torch.Tensor, weight: float, passes: int = 1) -> None:
        """The next ``passes`` backward passes (micro-batches) make this rank's last gradient:
        as each bucket completes, add ``weight`` times it into ``out`` and launch its all-reduce."""
        self.out, self._weight = out, weight
        self._pending = [m * passes for m in self.members]

    def _ready(self, b: int) -> None:
        if self.out is None:
            return
        self._pending[b] -= 1
        while self._next < len(self.buckets) and self._pending[self._next] <= 0:
            self._launch(self._next, add=True)

    @_collective
    def _launch(self, b: int, add: bool) -> None:
        start, end = self.buckets[b]
        if add:
            self.out[start:end].add_(self.grads[start:end], alpha=self._weight)
        if self.backend.distributed:
            self._handles.append(dist.all_reduce(self.out[start:end], op=dist.ReduceOp.SUM, async_op=True))
        self._next += 1

    @_collective
    def finish(self, out: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Launch the buckets not launched yet (all of them if this rank ran no armed backward),
        then the all-reduce of ``extra`` (a small buffer that became known after the backward
        pass), wait for every one, and return ``out``, now summed over ranks."""
        armed = self.out is not None
        self.out = out
        while self._next < len(self.buckets):
            self._launch(self._next, add=armed)
        if extra is not None and self.backend.distributed:
            self._handles.append(dist.all_reduce(extra, op=dist.ReduceOp.SUM, async_op=True))
        for h in self._handles:
            h.wait()
        self.backend.bytes_sent += (out.numel() + (0 if extra is None else extra.numel())) * out.element_size()
        self.out, self._next, self._handles = None, 0, []
        return out

    @property
    def rank(self) -> int:  # for the error message of a failed collective
        return self.backend.rank

    @property
    def timeout_s(self) -> float:
        return self.backend.timeout_s

