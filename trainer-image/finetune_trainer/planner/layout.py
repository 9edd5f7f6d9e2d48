"""The lightweight candidate the search enumerates (a Plan without validation or context)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .workload import Recompute, Schedule

GradSync = Literal["every", "last"]
"""When gradients are reduced under gradient accumulation: on every micro-batch's backward
("every", what the memory model counts: sharded gradients only), or only on the last one
("last": FSDP2 ``set_requires_gradient_sync(False)`` on the others, DDP ``no_sync``: one
reduction per step, but every GPU keeps its stage's unsharded gradients, in the reduce dtype,
between micro-batches). With one micro-batch per step the two are the same. Pipelined layouts
always reduce on the last micro-batch (torch.distributed.pipelining's stages do)."""

ZeroStage = Literal[2, 3]
"""ZeRO stage of the FSDP group (``Layout.zero``)."""

AC_ORDER: dict[str, int] = {"none": 0, "selective": 1, "full": 2}


@dataclass(frozen=True, slots=True)
class Layout:
    """Degrees and knobs of one candidate. Rank order (outer->inner): pp, dp, fsdp, cp, tp."""

    dp: int
    fsdp: int
    tp: int
    pp: int
    schedule: Schedule
    v: int
    mbs: int
    ga: int
    ac: Recompute
    offload: bool
    grad_sync: GradSync = "every"
    # TP collectives overlapped with the GEMMs (Megatron-Core --tp-comm-overlap, torch async TP
    # under torch.compile). The trainer does neither, so the search never sets it; it exists to
    # predict published runs that did.
    tp_overlap: bool = False
    # 3: ZeRO-3, each FSDP unit's parameters resharded after its forward and gathered again for
    # its backward; 2: ZeRO-2 (FSDP2 reshard_after_forward=False, FSDP1 SHARD_GRAD_OP,
    # DeepSpeed ZeRO-2): gathered once per micro-batch and kept until the unit's backward,
    # gradients and optimizer states sharded over the fsdp group. With grad_sync "last" the
    # trainer also keeps them gathered between micro-batches (one all-gather and one
    # reduce-scatter per step: the communication and memory of ZeRO-1 / Megatron's distributed
    # optimizer, whose published rows are planned as this).
    zero: ZeroStage = 3
    # Context parallelism: each sequence split over cp ranks (load-balanced causal ring
    # attention, torch's context_parallel); the cp ranks read the same rows and FSDP shards the
    # parameters over fsdp x cp. GPU-only, never with a pipeline (search._cp_options).
    cp: int = 1

    @property
    def world(self) -> int:
        return self.dp * self.fsdp * self.cp * self.tp * self.pp

    @property
    def shard(self) -> int:
        """Ranks of one FSDP shard group: fsdp x cp (the context-parallel ranks hold different
        parts of the same sequences, so they shard parameters and reduce gradients together)."""
        return self.fsdp * self.cp

    def complexity(self) -> tuple[int, int, int, int, int, int, int, int, int]:
        """Fewer moving parts first: the tie-breaker among equal step times, and what decides
        among near ties (search.NEAR_TIE). Fewer pipeline stages and smaller TP groups count as
        fewer parts (less bubble, smaller collectives on the critical path); context
        parallelism (GPU-only, ring attention) counts before TP."""
        hsdp = int(self.dp > 1 and self.shard > 1)
        return (
            int(self.offload),
            int(self.zero == 2),
            self.pp,
            self.v,
            self.cp,
            self.tp,
            hsdp,
            AC_ORDER[self.ac],
            int(self.grad_sync == "last"),  # unsharded gradients held across micro-batches
        )

    def summary(self, lora: bool = False) -> str:
        parts: list[str] = []
        if self.dp > 1:
            parts.append(f"dp{self.dp}")
        if self.fsdp > 1:
            parts.append(f"fsdp{self.fsdp}")
        if self.cp > 1:
            parts.append(f"cp{self.cp}")
        if self.tp > 1:
            parts.append(f"tp{self.tp}")
        if self.pp > 1:
            sched = self.schedule if self.v == 1 else f"{self.schedule}x{self.v}"
            parts.append(f"pp{self.pp}({sched})")
        if not parts:
            parts.append("single")
        parts += [f"mbs{self.mbs}", f"ga{self.ga}", f"ac={self.ac}"]
        if self.offload:
            parts.append("offload")
        if self.zero == 2 and self.shard > 1:
            parts.append("zero2")
        if self.grad_sync == "last" and self.ga > 1 and self.pp == 1:
            parts.append("sync=last")
        if lora:
            parts.append("lora")
        return " ".join(parts)
