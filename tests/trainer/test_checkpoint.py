"""Checkpoints written by an earlier layout still resume; a checkpoint that does not fit the
model is refused with what to do, not a stack trace (single process, no torchrun)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from finetune_trainer import checkpoint  # noqa: E402
from finetune_trainer.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.trainer


def _model(width: int = 8) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return model, opt, sched


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    for _ in range(steps):
        model(torch.ones(4, model[0].in_features)).sum().backward()
        opt.step()
        opt.zero_grad()


def test_a_checkpoint_of_the_first_layout_resumes(tmp_path: Path) -> None:
    """Format 1 (nested optimizer state, no format recorded) is still read."""
    model, opt, sched = _model()
    _train(model, opt)
    path = tmp_path / "step-00000003"
    checkpoint.dcp_save({"app": checkpoint._AppState(model, opt, 1)}, checkpoint_id=str(path))
    torch.save({"step": 3, "scheduler": sched.state_dict()}, path / "trainer.pt")

    fresh, fresh_opt, fresh_sched = _model()
    _train(fresh, fresh_opt, steps=1)  # different values everywhere
    ckpt = checkpoint.Checkpointer(root=tmp_path, keep_last=2, rank=0)
    state = ckpt.load(path, fresh, fresh_opt, fresh_sched)
    assert state["step"] == 3
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg"], fresh_opt.state[b]["exp_avg"])


def test_the_current_layout_round_trips(tmp_path: Path) -> None:
    model, opt, sched = _model()
    _train(model, opt)
    ckpt = checkpoint.Checkpointer(root=tmp_path, keep_last=2, rank=0)
    path, _ = ckpt.save(3, model, opt, sched, {})
    fresh, fresh_opt, fresh_sched = _model()
    assert ckpt.load(path, fresh, fresh_opt, fresh_sched)["format"] == checkpoint.FORMAT
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg_sq"], fresh_opt.state[b]["exp_avg_sq"])


def test_a_checkpoint_of_another_model_is_refused_with_what_to_do(tmp_path: Path) -> None:
    model, opt, sched = _model(width=8)
    _train(model, opt)
    ckpt = checkpoint.Checkpointer(root=tmp_path, keep_last=2, rank=0)
    path, _ = ckpt.save(3, model, opt, sched, {})
    files = {p.name: p.read_bytes() for p in path.iterdir()}
    other, other_opt, other_sched = _model(width=16)
    with pytest.raises(ConfigError, match=r"cannot resume from checkpoint .*resume to never") as e:
        ckpt.load(path, other, other_opt, other_sched)
    assert "Size mismatch" in str(e.value)  # the reason, without the remote traceback
    assert "Traceback" not in str(e.value)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == files, "the checkpoint is kept"
