"""Why the trainer stopped, in one line the operator can read.

Kubernetes keeps the first 4 KiB of a container's ``terminationMessagePath`` (by default
``/dev/termination-log``) in the pod's status when the container ends; the operator copies it to
the FineTuneJob's ``status.failure``. The trainer writes one JSON line there,
``{"reason": ..., "message": ...}``, whatever stopped it:

- ``LossDiverged``: the loss or the gradient norm was not finite for several steps in a row;
- ``GPUOutOfMemory``: CUDA could not allocate, with the plan and the bytes it asked for;
- ``CollectiveTimeout``: a collective did not complete in time (a rank stopped, hung or lost its
  network), so the run exits instead of waiting for ever;
- ``BadInput``: a configuration, data or model problem the message says how to fix;
- ``TrainerError``: anything else, with the exception's first line (the log has the traceback);
- ``StagingFailed``: the staging container (:mod:`finetune_trainer.staging`) could not download
  (the Hub or the disk failed; a retry may pass). Staging writes ``BadInput`` for what the user
  must change, and on success its report (a JSON object with ``version``, ``model``, ...).

The first cause written wins: the local ranks of a pod share one file, and the rank that fails
first is the one that saw the cause (the others fail because it stopped).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from finetune_trainer.errors import ConfigError

#: Where the termination message goes (tests and local runs point it elsewhere).
TERMINATION_LOG_ENV = "FINETUNE_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
#: Kubernetes keeps at most this many bytes of a termination message.
MAX_MESSAGE_BYTES = 4096


class LossDivergedError(Exception):
    """The loss or gradient norm stayed NaN or infinite for ``patience`` steps in a row."""

    def __init__(
        self, step: int, since: int, loss: float, grad_norm: float, checkpoint: int | None
    ) -> None:
        kept = (
            f"the last good checkpoint (step {checkpoint}) is kept"
            if checkpoint is not None
            else "no checkpoint was saved before it"
        )
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        super().__init__(
            f"{what} not finite since step {since} (loss {loss}, grad norm {grad_norm}) through "
            f"step {step}; the updates were skipped and {kept}: lower learningRate or raise "
            "warmupSteps, and check the data"
        )
        self.step = step


@dataclass(frozen=True)
class Failure:
    reason: str
    message: str

    def line(self) -> str:
        """The termination message: one JSON line, cut to what Kubernetes keeps."""
        message = self.message
        while True:
            text = json.dumps({"reason": self.reason, "message": message}, ensure_ascii=False)
            if len(text.encode()) < MAX_MESSAGE_BYTES or not message:
                return text + "\n"
            message = message[: len(message) * 3 // 4].rstrip() + "…"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError, checked without importing torch (the staging container and the
    operator's tests use this module without it)."""
    return any(
        cls.__name__ == "OutOfMemoryError" and cls.__module__.startswith("torch")
        for cls in type(exc).__mro__
    )


def _is_timeout(exc: BaseException) -> bool:
    """gloo's and NCCL's timeouts are RuntimeErrors (DistBackendError) that say so."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("timed out" in text or "timeout" in text)


def classify(exc: BaseException, *, plan: str | None, collective_timeout_s: float) -> Failure:
    """The cause of a failed run, in words that say what to do."""
    if isinstance(exc, LossDivergedError):
        return Failure("LossDiverged", str(exc))
    if isinstance(exc, ConfigError):
        return Failure("BadInput", str(exc))
    if _is_out_of_memory(exc):
        under = f" under plan {plan}" if plan else ""
        return Failure(
            "GPUOutOfMemory",
            f"GPU out of memory{under}: {_first_line(exc)} Lower parallelism.microBatchSize, turn "
            "on activationCheckpointing or use more GPUs",
        )
    if _is_timeout(exc):
        return Failure(
            "CollectiveTimeout",
            f"a collective did not complete within {collective_timeout_s:g} s (another rank "
            f"stopped, hung or lost its network): {_first_line(exc)}",
        )
    return Failure("TrainerError", f"{type(exc).__name__}: {_first_line(exc)}")


def termination_log() -> Path | None:
    """The file to write, if this process has one (a container, or a test that asks)."""
    path = Path(os.environ.get(TERMINATION_LOG_ENV) or DEFAULT_TERMINATION_LOG)
    return path if path.parent.is_dir() and os.access(path.parent, os.W_OK) else None


def write_termination_message(failure: Failure, path: Path | None = None) -> bool:
    """Write ``failure`` unless another local rank wrote its cause first; True if written."""
    path = path or termination_log()
    if path is None:
        return False
    try:
        with path.open("a", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            if f.tell() > 0:
                return False
            f.write(failure.line())
            return True
    except OSError:
        return False
