"""The trainer stops cleanly, with its cause in one line for the operator, instead of training on
garbage or waiting for ever: a diverging loss, a rank that stops answering."""

from __future__ import annotations

import json
import math
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    losses,
    poll,
    rank_pid,
    read_journal,
    torchrun,
    trainer_config,
    wait,
    write_config,
)

pytestmark = pytest.mark.trainer


def _termination(path: Path) -> dict[str, Any] | None:
    text = path.read_text() if path.is_file() else ""
    return json.loads(text) if text.strip() else None


def test_a_diverging_loss_stops_with_loss_diverged_and_keeps_the_good_checkpoint(
    small_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A learning rate of 1e30 makes step 1's update blow the weights up: from step 2 the loss
    is NaN on both ranks, the updates are skipped, and after 3 such steps the run stops with
    LossDiverged; the checkpoint of step 1 stays, none is written after it, no model is
    exported."""
    log = tmp_path / "termination-log"
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(log))
    token = "hf_" + secrets.token_urlsafe(27)  # as the pods get it from the user's Secret
    monkeypatch.setenv("HF_TOKEN", token)
    cfg = trainer_config(small_model_dir, tmp_path, schedule__max_steps=10)
    cfg["model"]["token_env"] = "HF_TOKEN"
    cfg["optim"] = {"learning_rate": 1e30, "lr_scheduler": "constant", "warmup_steps": 0}
    cfg["hardware"]["procs_per_node"] = 2
    cfg["checkpoint"].update(every_steps=1, keep_last=5)
    cfg["resilience"] = {"nonfinite_steps": 3}
    journal = tmp_path / "journal.jsonl"
    proc = torchrun(write_config(cfg, tmp_path / "config.json"), 2, journal)
    out = wait(proc)
    assert proc.returncode == 1, out[-3000:]
    curve = losses(journal)
    assert math.isfinite(curve[1]), curve
    assert all(math.isnan(curve[s]) for s in (2, 3, 4)), curve
    assert max(curve) == 4, "the run must stop at the third non-finite step"
    cause = _termination(log)
    assert cause is not None, out[-3000:]
    assert cause["reason"] == "LossDiverged"
    assert "since step 2" in cause["message"]
    assert "through step 4" in cause["message"]
    assert "last good checkpoint (step 1) is kept" in cause["message"]
    assert "learningRate" in cause["message"]  # says what to do
    assert log.read_text().count("\n") == 1  # one line, the first rank's
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000001"]
    assert not (tmp_path / "model").exists()
    assert f"error: LossDiverged: {cause['message']}" in out  # and in the log, as it is
    # The Hub token is in none of what the trainer wrote: log, journal, termination message.
    for written in (out, journal.read_text(), log.read_text()):
        assert token not in written


def test_a_rank_that_stops_answering_ends_the_run_within_the_collective_timeout(
    small_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1 is frozen (SIGSTOP) mid-run: rank 0's next collective times out after the
    configured 20 s and the run ends with CollectiveTimeout in the termination message,
    instead of waiting for ever."""
    timeout_s = 20
    log = tmp_path / "termination-log"
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(log))
    cfg = trainer_config(small_model_dir, tmp_path, schedule__max_steps=10_000)
    cfg["hardware"]["procs_per_node"] = 2
    cfg["resilience"] = {"collective_timeout_seconds": timeout_s}
    journal = tmp_path / "journal.jsonl"
    proc = torchrun(write_config(cfg, tmp_path / "config.json"), 2, journal)
    frozen: int | None = None
    try:
        assert poll(lambda: len(losses(journal)) >= 2, timeout=600), "training never started"
        frozen = rank_pid(proc.pid, 1)
        assert frozen is not None
        os.kill(frozen, signal.SIGSTOP)
        stopped_at = time.monotonic()
        cause = poll(lambda: _termination(log), timeout=timeout_s * 10)
        waited = time.monotonic() - stopped_at
        assert cause is not None, "rank 0 still waits for the frozen rank"
        assert cause["reason"] == "CollectiveTimeout", cause
        assert f"within {timeout_s} s" in cause["message"]
        assert waited >= timeout_s * 0.9, waited  # it did wait for the timeout, not less
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)
    out = wait(proc, timeout=300)
    assert proc.returncode != 0, out[-3000:]
    assert max(losses(journal)) < 10_000
    assert all(r.get("step", 0) < 10_000 for r in read_journal(journal))
