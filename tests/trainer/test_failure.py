"""The one-line cause the trainer leaves for the operator (the container's termination message)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune_trainer.errors import ConfigError
from finetune_trainer.failure import (
    MAX_MESSAGE_BYTES,
    Failure,
    LossDivergedError,
    classify,
    write_termination_message,
)


@pytest.mark.parametrize(
    ("exc", "reason", "says"),
    [
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has"),
            "GPUOutOfMemory",
            ["under plan fsdp8 mbs4 ga1 ac=none", "Tried to allocate 2.00 GiB", "microBatchSize"],
        ),
        (
            RuntimeError("[gloo] Timed out waiting 20000ms for recv operation to complete"),
            "CollectiveTimeout",
            ["within 20 s", "Timed out waiting 20000ms"],
        ),
        (ConfigError("model folder /m has no config.json"), "BadInput", ["no config.json"]),
        (
            LossDivergedError(step=9, since=7, loss=float("nan"), grad_norm=3.0, checkpoint=None),
            "LossDiverged",
            ["loss not finite since step 7", "through step 9", "no checkpoint was saved"],
        ),
        (KeyError("input_ids"), "TrainerError", ["KeyError: 'input_ids'"]),
    ],
)
def test_each_cause_has_its_reason_and_says_what_happened(
    exc: BaseException, reason: str, says: list[str]
) -> None:
    failure = classify(exc, plan="fsdp8 mbs4 ga1 ac=none", collective_timeout_s=20)
    assert failure.reason == reason
    for text in says:
        assert text in failure.message


def test_a_long_message_is_cut_to_what_kubernetes_keeps_and_stays_one_json_line() -> None:
    line = Failure("TrainerError", "x" * 10_000 + " é").line()
    assert len(line.encode()) <= MAX_MESSAGE_BYTES
    assert line.count("\n") == 1
    assert json.loads(line)["message"].endswith("…")


def test_the_first_cause_written_wins(tmp_path: Path) -> None:
    """Local ranks share the pod's termination log: the first rank's cause stays."""
    path = tmp_path / "termination-log"
    path.touch()  # Kubernetes mounts it empty
    assert write_termination_message(Failure("LossDiverged", "first"), path)
    assert not write_termination_message(Failure("CollectiveTimeout", "second"), path)
    assert json.loads(path.read_text()) == {"reason": "LossDiverged", "message": "first"}
