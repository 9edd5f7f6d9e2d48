"""An unmodified plain training script (plain_script.py: from_pretrained, DataLoader, AdamW,
loss.backward(); optim.step()) with ``finetune_trainer.enable_advanced_parallelization()`` runs
FSDP and tensor parallel under torchrun and matches the same script run as one process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import REPO, trainer_env

pytestmark = pytest.mark.trainer

SCRIPT = Path(__file__).with_name("plain_script.py")
#: float32; every rank's batch has the same number of target tokens, so the mean of the ranks'
#: losses is the single-process loss up to reduction order (measured |delta| <= 2e-6).
TOL = 1e-4


def _losses(model_dir: Path, tmp: Path, nproc: int, fixed: dict[str, int]) -> dict[int, float]:
    env = trainer_env(tmp / "unused.jsonl", nproc)
    env["FINETUNE_PARALLELISM"] = json.dumps(fixed)
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = subprocess.run(
        [*launch, str(SCRIPT), str(model_dir)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    per_step: dict[int, dict[str, float]] = defaultdict(dict)
    for line in proc.stdout.replace("loss ", "\nloss ").splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == "loss":
            per_step[int(parts[2])][parts[1]] = float(parts[3])
    assert per_step, proc.stdout[-2000:]
    # Each data-parallel rank reports the loss of its share; TP peers report the same one.
    return {s: sum(r.values()) / len(r) for s, r in per_step.items()}


@pytest.fixture(scope="module")
def reference(small_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    return _losses(small_model_dir, tmp_path_factory.mktemp("one"), 1, {})


@pytest.mark.parametrize("fixed", [{"fsdp": 2}, {"tensor_parallel": 2}], ids=["fsdp2", "tp2"])
def test_one_line_matches_single_process(
    small_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    reference: dict[int, float],
    fixed: dict[str, int],
) -> None:
    got = _losses(small_model_dir, tmp_path_factory.mktemp("par"), 2, fixed)
    assert sorted(got) == sorted(reference) == [0, 1, 2, 3]
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, abs=TOL)


def test_import_stays_torch_free() -> None:
    code = "import sys, finetune_trainer; assert 'torch' not in sys.modules"
    env = trainer_env(Path("unused"), 1)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)


def test_knobs_are_read_once_from_keywords_or_else_the_environment() -> None:
    from finetune_trainer.advanced import Options

    environ = {
        "FINETUNE_COMPILE": "1",
        "FINETUNE_SEQ_LEN": "256",
        "FINETUNE_PARALLELISM": '{"tensor_parallel": 2}',
    }
    from_env = Options.read({}, environ)
    assert from_env == Options(seq_len=256, parallelism={"tensor_parallel": 2}, compile=True)
    keywords = Options.read({"compile": False, "seq_len": 64, "gpu_type": "A100-80GB"}, environ)
    assert keywords == Options(
        seq_len=64, gpu_type="A100-80GB", parallelism={"tensor_parallel": 2}, compile=False
    )
    assert Options.read({}, {}) == Options()
    with pytest.raises(TypeError, match="unknown options \\['seqlen'\\]"):
        Options.read({"seqlen": 64}, {})
