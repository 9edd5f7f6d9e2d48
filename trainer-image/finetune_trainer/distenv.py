"""Where this process sits, from what torchrun / the PyTorchJob injects."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int

    @classmethod
    def from_env(cls) -> DistEnv:
        """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; the PyTorchJob sets PET_* for torchrun."""
        nproc = _int("LOCAL_WORLD_SIZE", _int("PET_NPROC_PER_NODE", 1))
        nnodes = _int("PET_NNODES", max(1, _int("WORLD_SIZE", 1) // max(nproc, 1)))
        return cls(
            rank=_int("RANK", 0),
            world_size=_int("WORLD_SIZE", 1),
            local_rank=_int("LOCAL_RANK", 0),
            local_world_size=nproc,
            node_rank=_int("GROUP_RANK", _int("PET_NODE_RANK", 0)),
            num_nodes=nnodes,
        )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or "MASTER_ADDR" in os.environ
