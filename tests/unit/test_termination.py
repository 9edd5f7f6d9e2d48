"""The operator reads the trainer's one-line cause from a pod's termination message."""

from __future__ import annotations

import pytest

from finetune_operator.termination import TrainerCause, parse


def test_the_trainers_line_is_read() -> None:
    line = '{"reason": "LossDiverged", "message": "loss not finite since step 7"}\n'
    assert parse(line) == TrainerCause("LossDiverged", "loss not finite since step 7")


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "simulated by the test bed: exit code 3",
        "Traceback (most recent call last):\n  File ...",  # FallbackToLogsOnError's log tail
        '{"reason": "loss diverged", "message": "x"}',  # not a reason
        '{"message": "no reason"}',
        '["LossDiverged"]',
        '{"reason": "LossDiverged", "mess',  # cut
    ],
)
def test_anything_else_is_not_taken_for_a_trainer_cause(text: str | None) -> None:
    assert parse(text) is None
