"""The only module that calls ``torch.distributed``.

Started by torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment) it joins the
process group, NCCL when CUDA is available and gloo otherwise; started by plain ``python`` it
is world size 1 and every collective is the identity, so the engine runs one code path.
The backend knows nothing of algorithms: it sums flat buffers and counts the bytes it moved.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


@dataclass
class Backend:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    bytes_sent: int = 0  # all-reduced training payload per rank, summed over the run

    @classmethod
    def from_env(cls, device: str = "auto", timeout_s: float = 1800.0) -> "Backend":
        """Join the torchrun process group if there is one; pick the device and thread count."""
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
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            torch.set_num_threads(max(1, cores // max(1, local_world)))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s),
                                    **({"device_id": dev} if use_cuda else {}))
        return cls(rank, world, local_rank, local_world, dev)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def assigned(self, clients: list[int]) -> list[int]:
        """This rank's share of the round's clients: position p goes to rank p % world_size."""
        return clients[self.rank::self.world_size]

    def all_reduce_(self, buf: torch.Tensor, count: bool = True) -> torch.Tensor:
        """Sum ``buf`` over ranks, in place: one collective for the whole flat buffer.
        ``count``: add its payload to ``bytes_sent`` (training traffic; evaluation is not)."""
        if count:
            self.bytes_sent += buf.numel() * buf.element_size()
        if self.world_size > 1:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf

    def broadcast_(self, buf: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size > 1:
            dist.broadcast(buf, src)
        return buf

    def broadcast_object(self, obj, src: int = 0):
        """``obj`` from rank ``src`` on every rank (pickled; for small control data)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def shutdown(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
