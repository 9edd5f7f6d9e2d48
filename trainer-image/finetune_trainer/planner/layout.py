"""The lightweight candidate the search enumerates (a Plan without validation or context)."""

from __future__ import annotations

from dataclasses import dataclass

from .workload import Recompute, Schedule

AC_ORDER: dict[str, int] = {"none": 0, "selective": 1, "full": 2}


@dataclass(frozen=True, slots=True)
class Layout:
    """Degrees and knobs of one candidate. Rank order (outer->inner): pp, dp, fsdp, tp."""

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

    @property
    def world(self) -> int:
        return self.dp * self.fsdp * self.tp * self.pp

    def complexity(self) -> tuple[int, int, int, int, int, int]:
        """Tie-breaker: fewer moving parts first (used only when step times are equal)."""
        hsdp = int(self.dp > 1 and self.fsdp > 1)
        return (
            int(self.offload),
            int(self.pp > 1),
            self.v,
            int(self.tp > 1),
            hsdp,
            AC_ORDER[self.ac],
        )

    def summary(self, lora: bool = False) -> str:
        parts: list[str] = []
        if self.dp > 1:
            parts.append(f"dp{self.dp}")
        if self.fsdp > 1:
            parts.append(f"fsdp{self.fsdp}")
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
        if lora:
            parts.append("lora")
        return " ".join(parts)
