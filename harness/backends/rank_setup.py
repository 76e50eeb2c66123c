"""One rank's rendezvous, device and process group: the setup every multi-process backend shares.

Megatron-core ranks and DeepSpeed ranks (and any other executor that starts ranks, e.g. Ray
actors) call `init_rank` first: gloo with every rank on the CPU for device "cpu"; NCCL with rank
`local_rank` pinned to GPU `local_rank` (torch.cuda.set_device) for "cuda". A cuda rank that has
no GPU of its own raises: a rank never falls back to the CPU silently.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

# Set by an executor that places ranks itself (the Ray executor): rank 0's host and this rank's local
# rank, so the rank functions keep the local spawn path's signature (rank, world, port, job_path)
MASTER_ADDR_ENV = "HARNESS_RANK_MASTER_ADDR"
LOCAL_RANK_ENV = "HARNESS_RANK_LOCAL_RANK"


@dataclass(frozen=True)
class Placement:
    backend: str  # "gloo" | "nccl"
    device: Any  # torch.device the rank computes on
    local_rank: int

    @property
    def cuda(self) -> bool:
        return self.backend == "nccl"


def init_rank(rank: int, world: int, port: int, device: str = "cpu",
              init: Callable[[str], None] | None = None, local_rank: int | None = None,
              master_addr: str | None = None) -> Placement:
    """Set the rendezvous environment, place the rank, initialise its process group.

    `init(backend)` initialises the group (default: torch.distributed.init_process_group with this
    rank and world; DeepSpeed passes deepspeed.init_distributed, which reads the same environment).
    """
    import torch

    local = int(os.environ.get(LOCAL_RANK_ENV, rank)) if local_rank is None else local_rank
    master_addr = master_addr or os.environ.get(MASTER_ADDR_ENV, "127.0.0.1")
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(local),
                      WORLD_SIZE=str(world))
    if device == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local >= count:
            raise RuntimeError(f"rank {rank} (local rank {local}) needs GPU {local}; {count} visible")
        torch.cuda.set_device(local)
        placement = Placement("nccl", torch.device("cuda", local), local)
    elif device == "cpu":
        placement = Placement("gloo", torch.device("cpu"), local)
    else:
        raise ValueError(f"unknown device {device!r} (cpu or cuda)")
    if init is None:
        torch.distributed.init_process_group(placement.backend, rank=rank, world_size=world)
    else:
        init(placement.backend)
    return placement
