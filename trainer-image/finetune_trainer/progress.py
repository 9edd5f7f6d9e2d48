"""What a person watching sees: one-line stage messages from rank 0, then a rich bar on a
terminal or plain periodic lines in pod logs."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as Bar


def log(rank: int, text: str) -> None:
    """One ``[finetune]`` line on stderr, from rank 0 only."""
    if rank == 0:
        print(f"[finetune] {text}", file=sys.stderr, flush=True)


def fmt_eta(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class Progress:
    total_steps: int
    log_every: int
    enabled: bool = True
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    _bar: Any = None
    _task: Any = None
    _start: float = field(default_factory=time.perf_counter)
    _start_step: int = 0

    def start(self, step: int) -> None:
        self._start, self._start_step = time.perf_counter(), step
        if not self.enabled or not self.stream.isatty():
            return
        self._bar = Bar(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task("train", total=self.total_steps, completed=step, info="")

    def eta(self, step: int) -> float:
        done = step - self._start_step
        if done <= 0:
            return 0.0
        return (time.perf_counter() - self._start) / done * (self.total_steps - step)

    def step(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        info = f"loss {loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif step % self.log_every == 0 or step in (self.total_steps, 1):
            pct = 100.0 * step / self.total_steps
            print(
                f"step {step}/{self.total_steps} ({pct:.0f}%) {info} eta {fmt_eta(self.eta(step))}",
                file=self.stream,
                flush=True,
            )

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
