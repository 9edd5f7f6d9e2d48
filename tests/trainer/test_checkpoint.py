"""Checkpoints written by an earlier layout still resume; a checkpoint that does not fit the
model is refused with what to do, not a stack trace (single process, no torchrun); a rank killed
while a checkpoint is written leaves the previous complete one in use (torchrun, 2 ranks)."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import losses, run_trainer, torchrun, trainer_config, wait, write_config  # noqa: E402
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


def test_only_marked_step_folders_are_complete_and_rotation_unmarks_first(tmp_path: Path) -> None:
    for name in ("step-00000003", "step-00000006", "step-00000009.tmp", "step-x", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / checkpoint.MARKER).write_text("marked\n")
    (tmp_path / "step-00000012").mkdir()  # no marker: being written by an older trainer
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == [
        "step-00000003",
        "step-00000006",
    ]
    model, opt, sched = _model()
    checkpoint.Checkpointer(root=tmp_path, keep_last=1, rank=0).save(15, model, opt, sched, {})
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-00000015"]
    assert not (tmp_path / "step-00000009.tmp").exists(), "a stale partial save is removed"


def _ranks(parent: int) -> list[int]:
    """torchrun's worker processes (its children), rank order unknown."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(entry.name))
    return found


def _rank_of(pid: int) -> int:
    environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK=")).split(b"=")[1])


def _catch_a_save(ckpt: Path, steps: list[int], proc: object, timeout: float) -> int | None:
    """Freeze both ranks (SIGSTOP) in the middle of one of the saves of ``steps``: once its
    ``.tmp`` folder holds a rank's DCP shard file and before it is marked. The step caught, with
    the ranks left frozen; None if every save finished first (the ranks run on)."""
    pid = proc.pid  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    for step in steps:
        tmp = ckpt / f"step-{step:08d}.tmp"
        while not tmp.is_dir():
            if time.monotonic() > deadline or proc.poll() is not None:  # type: ignore[attr-defined]
                return None
            time.sleep(0.001)
        shards = time.monotonic() + 2.0
        while time.monotonic() < shards and not any(tmp.glob("*.distcp")):
            time.sleep(0.0005)
        ranks = _ranks(pid)
        for rank in ranks:
            os.kill(rank, signal.SIGSTOP)
        if tmp.is_dir() and not (tmp / checkpoint.MARKER).exists():
            return step
        for rank in ranks:  # too late: it is complete (or as good as); try the next save
            os.kill(rank, signal.SIGCONT)
    return None


def test_a_rank_killed_while_a_checkpoint_is_written_leaves_the_previous_one_in_use(
    small_model_dir: Path, tmp_path: Path
) -> None:
    """2 ranks train 9 steps, saving every 3 and keeping 1 checkpoint. In the middle of a save
    (its .tmp folder has shard files, no marker), both ranks are frozen and rank 1 is SIGKILLed:
    the run fails, the partial save stays unmarked, the checkpoint before it is still the latest
    (the rotation did not remove it). Run again: it resumes from that one, trains the steps after
    it to the same losses as the first run had trained them, and its first save clears the
    partial folder."""
    cfg = trainer_config(small_model_dir, tmp_path, schedule__max_steps=9)
    cfg["hardware"]["procs_per_node"] = 2
    cfg["checkpoint"].update(every_steps=3, keep_last=1)
    config = write_config(cfg, tmp_path / "config.json")
    journal = tmp_path / "journal.jsonl"
    ckpt = tmp_path / "ckpt"
    proc = torchrun(config, 2, journal)
    try:
        caught = _catch_a_save(ckpt, [6, 9], proc, timeout=300)
        assert caught is not None, "every save finished before the test could freeze it"
        ranks = {_rank_of(pid): pid for pid in _ranks(proc.pid)}
        os.kill(ranks[1], signal.SIGKILL)
        os.kill(ranks[0], signal.SIGCONT)
    except BaseException:
        proc.kill()
        raise
    out = wait(proc, timeout=120)
    assert proc.returncode != 0, "a run that lost a rank must not report success"
    partial = ckpt / f"step-{caught:08d}.tmp"
    assert partial.is_dir(), out[-3000:]
    assert not (partial / checkpoint.MARKER).exists()
    assert any(partial.glob("*.distcp")), "the kill came before any shard was written"
    previous = caught - 3
    latest = checkpoint.latest(ckpt)
    assert latest is not None, sorted(p.name for p in ckpt.iterdir())
    assert latest.name == f"step-{previous:08d}"
    first = losses(journal)
    assert max(first) == caught, "the first run trained up to the save it was killed in"

    resumed_journal = tmp_path / "resumed.jsonl"
    log = run_trainer(config, 2, resumed_journal)
    assert f"at step {previous}" in log
    resumed = losses(resumed_journal)
    assert sorted(resumed) == list(range(previous + 1, 10))
    for step in range(previous + 1, caught + 1):  # trained twice: the same losses
        assert resumed[step] == pytest.approx(first[step], abs=1e-5), step
    assert not list(ckpt.glob("*.tmp")), "the partial save is cleared"
    assert [p.name for p in checkpoint.complete_checkpoints(ckpt)] == ["step-00000009"]


def _two_rank_plan(tp: int) -> dict[str, object]:
    """A plan for 2 ranks: FSDP over both, or tensor parallel over both (global batch 8)."""
    fsdp = 2 // tp
    return {
        "data_parallel": 1,
        "fsdp": fsdp,
        "tensor_parallel": tp,
        "pipeline_parallel": 1,
        "pipeline_schedule": "none",
        "virtual_stages": 1,
        "micro_batch_size": 2,
        "gradient_accumulation": 8 // (fsdp * 2),
        "activation_checkpointing": "none",
        "cpu_offload": False,
    }


def test_a_checkpoint_resumes_under_another_layout(small_model_dir: Path, tmp_path: Path) -> None:
    """What a re-plan after out-of-memory relies on: a checkpoint written under tensor
    parallelism (tp2) loads under FSDP (fsdp2), DCP resharding every tensor and the optimizer
    state, and the steps after it train to the tp2 run's losses (as close as two layouts'
    arithmetic agree)."""
    runs = {}
    for name, tp, steps in (("tp2", 2, 5), ("fsdp2", 1, 5)):
        cfg = trainer_config(small_model_dir, tmp_path / name, schedule__max_steps=steps)
        cfg["hardware"]["procs_per_node"] = 2
        cfg["plan"] = _two_rank_plan(tp)
        cfg["checkpoint"].update(every_steps=3, keep_last=3)
        runs[name] = write_config(cfg, tmp_path / name / "config.json")
    run_trainer(runs["tp2"], 2, tmp_path / "tp2" / "journal.jsonl")
    (tmp_path / "fsdp2" / "ckpt").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "tp2" / "ckpt" / "step-00000003", tmp_path / "fsdp2" / "ckpt" / "step-00000003"
    )
    log = run_trainer(runs["fsdp2"], 2, tmp_path / "fsdp2" / "journal.jsonl")
    assert "at step 3" in log
    reference = losses(tmp_path / "tp2" / "journal.jsonl")
    resumed = losses(tmp_path / "fsdp2" / "journal.jsonl")
    assert sorted(resumed) == [4, 5]
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], abs=2e-3), step
