"""The trainer on several processes: torch.distributed directly (torchrun starts the processes;
NCCL on GPUs, gloo on the CPU), one process per device.

A batch is global: every process draws the same prompts, generates its share of the samples with
the noise the whole batch would give them (NoiseKeys), scores them, and the rewards are gathered
before the group advantages are computed, so that a group is normalised over all of its samples
wherever they ran. Training walks the same global minibatches on every process; each process
back-propagates its own samples of a minibatch, weighted by their share of it, and the gradients
are summed once per optimizer step. The result equals the one-process run of the same global
batch to fp32 rounding.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from .config import Config, ConfigError

Tensor = torch.Tensor


def env_world_size() -> int:
    """WORLD_SIZE from the environment (torchrun sets it), 1 without it."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"the environment's WORLD_SIZE must be an integer (got {value!r})") from None


class Dist:
    """This process's place in the job, and the few collectives the trainer needs. With one
    process (no torchrun) every collective is the identity and nothing is initialised."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, group=None,
                 device: Optional[torch.device] = None):
        self.rank, self.world, self.local_rank, self.group = rank, world, local_rank, group
        self.device = device or torch.device("cpu")  # where the backend's tensors live (NCCL: the GPU)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, timeout_s: float, device: Optional[torch.device] = None) -> "Dist":
        """Join the job torchrun started (WORLD_SIZE > 1), or a one-process Dist. The backend is
        NCCL when the process's device is a GPU, gloo otherwise; collectives time out after
        timeout_s (a dead peer ends the job with an error instead of a hang)."""
        world = env_world_size()
        if world <= 1:
            return cls()
        for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise ConfigError(f"WORLD_SIZE is {world} but {key} is not set: start several processes with torchrun "
                                  "(torchrun --nproc_per_node N -m flowsteer train CONFIG)")
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            kwargs = {}
            if backend == "nccl":
                kwargs["device_id"] = device
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        return cls(rank, world, local_rank, dist.group.WORLD, device if backend == "nccl" else None)

    # ------------------------------------------------------------------------- collectives

    def all_gather(self, t: Tensor) -> List[Tensor]:
        """Every process's tensor (the same shape on each), in rank order."""
        if self.world == 1:
            return [t]
        x = t.to(self.device).contiguous()
        out = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(out, x, group=self.group)
        return [o.to(t.device) for o in out]

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        """t reduced over the processes, in place (t is also returned)."""
        if self.world > 1:
            x = t if t.device == self.device else t.to(self.device)
            dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                                   "max": dist.ReduceOp.MAX}[op], group=self.group)
            if x is not t:
                t.copy_(x)
        return t

    def all_gather_object(self, obj: Any) -> List[Any]:
        if self.world == 1:
            return [obj]
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's obj on every process."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every process when flag is true on one of them."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        return bool(self.all_reduce(t, "max").item())


# ------------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class Layout:
    """Which samples of an iteration's global batch (P prompts x G, sample p * G + j) this process
    generates. groups "whole": process r takes prompts [r P/W, (r + 1) P/W) with all of their G
    samples; "split": every process takes every prompt, and members [r G/W, (r + 1) G/W) of each
    group."""

    P: int
    G: int
    world: int
    rank: int
    groups: str

    @classmethod
    def of(cls, cfg: Config, world: int, rank: int) -> "Layout":
        P, G, mode = cfg.train.prompts_per_iteration, cfg.sampling.group_size, cfg.distributed.groups
        if world > 1:
            if mode == "whole" and P % world:
                raise ConfigError(
                    f"distributed.groups = 'whole' puts whole groups on each process, so train.prompts_per_iteration "
                    f"({P}) must divide by the world size ({world}): {P} % {world} = {P % world}. Use "
                    f"prompts_per_iteration = {P - P % world + world}, or distributed.groups = 'split' (then "
                    f"sampling.group_size must divide by {world}: {G} % {world} = {G % world})")
            if mode == "split" and G % world:
                raise ConfigError(
                    f"distributed.groups = 'split' shares each group over the processes, so sampling.group_size ({G}) "
                    f"must divide by the world size ({world}): {G} % {world} = {G % world}. Use group_size = "
                    f"{G - G % world + world}, or distributed.groups = 'whole' (prompts_per_iteration {P} % {world} = "
                    f"{P % world})")
        return cls(P, G, world, rank, mode)

    @property
    def prompts(self) -> List[int]:
        """The global prompt positions (0..P-1) this process samples."""
        if self.world == 1 or self.groups == "split":
            return list(range(self.P))
        k = self.P // self.world
        return list(range(self.rank * k, (self.rank + 1) * k))

    @property
    def members(self) -> range:
        """The group members this process samples of each of its prompts."""
        if self.world == 1 or self.groups == "whole":
            return range(self.G)
        k = self.G // self.world
        return range(self.rank * k, (self.rank + 1) * k)

    def global_index(self, rank: Optional[int] = None) -> Tensor:
        """[N_local] int64: the global sample index of each of rank's samples, in its order."""
        lay = self if rank is None else Layout(self.P, self.G, self.world, rank, self.groups)
        m = list(lay.members)
        return torch.tensor([p * self.G + j for p in lay.prompts for j in m], dtype=torch.long)

    @property
    def num_local(self) -> int:
        return len(self.prompts) * len(self.members)


def gather_rows(d: Dist, layout: Layout, local: Tensor) -> Tensor:
    """[N, ...] in global sample order from each process's [N_local, ...] rows."""
    if d.world == 1:
        return local
    parts = d.all_gather(local)
    out = local.new_empty((layout.P * layout.G,) + tuple(local.shape[1:]))
    for r, part in enumerate(parts):
        out[layout.global_index(r).to(out.device)] = part
    return out
