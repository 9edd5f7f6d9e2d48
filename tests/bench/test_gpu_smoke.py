"""bench/gpu/run: the GPU bench's code paths, run for real on CPU in its --smoke mode (how CI
runs it), and its clear refusals (no CUDA device, missing packages)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "bench" / "gpu" / "run"
OURS = ["ours:chosen", "ours:runner-up-1", "ours:runner-up-2"]
RUNS = [*OURS, "hf_trainer", "seed_loop"]
TARGETS = {
    "memory_model_within_10pct",
    "tokens_per_second_within_15pct",
    "mfu_at_least_45pct",
    "ours_vs_hf_trainer_at_least_1_5x",
    "ours_vs_seed_loop_at_least_3x",
}

pytestmark = [pytest.mark.trainer, pytest.mark.slow]


def bench(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": python, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [str(RUN), *args], capture_output=True, text=True, env=env, timeout=840, check=False
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-gpu") / "smoke.json"
    proc = bench("--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ours:chosen" in proc.stdout  # the table
    return dict(json.loads(out.read_text(encoding="utf-8")))


def test_every_run_measured_with_sane_numbers(smoke: dict[str, Any]) -> None:
    assert smoke["mode"] == "smoke"
    assert smoke["planner_gpu_type"] == "CPU"
    assert smoke["machine"]["torch"]
    assert isinstance(smoke["machine"]["cpu_flags"], list)
    assert {c["case"] for c in smoke["cases"]} == {"tiny-llama-full", "tiny-mistral-lora"}
    for case in smoke["cases"]:
        runs = {r["run"]: r for r in case["runs"]}
        assert list(runs) == RUNS, case["case"]
        for name, r in runs.items():
            assert r["status"] == "ok", (case["case"], name, r.get("error"), r.get("traceback"))
            assert r["tokens"] > 0
            assert r["tokens_per_second"] > 0
            assert 0 < r["mfu"] < 1
            assert math.isfinite(r["last_loss"])
            # No CUDA here: the CUDA peaks are null, never made up.
            assert r["memory"]["max_memory_allocated_bytes"] is None
            assert r["memory"]["max_memory_reserved_bytes"] is None


def test_planner_prediction_beside_each_of_our_plans(smoke: dict[str, Any]) -> None:
    for case in smoke["cases"]:
        runs = {r["run"]: r for r in case["runs"]}
        summaries = [runs[n]["plan_summary"] for n in OURS]
        assert len(set(summaries)) == 3, summaries  # the plan and two different runners-up
        assert summaries[0] == case["planner"]["chosen"]
        for name in OURS:
            pred = runs[name]["predicted"]
            assert pred["summary"] == runs[name]["plan_summary"]
            assert pred["tokens_per_second"] > 0
            assert pred["peak_memory_bytes"] > 0
            plan, applied = runs[name]["plan"], runs[name]["applied"]
            mbs, ga = plan["micro_batch_size"], plan["gradient_accumulation"]
            assert mbs * ga == case["global_batch_size"]
            # The run did what the plan says: its micro-batch, accumulation and checkpointing.
            assert applied["rows_per_micro_batch"] == mbs
            assert applied["micro_batches_per_step"] == ga
            recompute = plan["activation_checkpointing"] != "none"
            assert applied["checkpointed_layers"] == (applied["layers"] if recompute else 0)
        # The plans split the same global batch differently: the same training, the same loss.
        losses = [runs[n]["last_loss"] for n in OURS]
        assert losses == pytest.approx([losses[0]] * 3, rel=1e-3)
        for name in ("hf_trainer", "seed_loop"):
            assert "predicted" not in runs[name]


def test_targets_section(smoke: dict[str, Any]) -> None:
    assert set(smoke["targets"]) == {c["case"] for c in smoke["cases"]}
    for case, t in smoke["targets"].items():
        assert set(t) >= TARGETS, case
        assert all(t[k] is None or isinstance(t[k], bool) for k in TARGETS)
        assert t["memory_model_within_10pct"] is None  # no CUDA peak to compare on CPU
        assert isinstance(t["tokens_per_second_within_15pct"], bool)
        assert t["ours_vs_hf_trainer_tokens_per_second"] > 0
        assert t["ours_vs_seed_loop_tokens_per_second"] > 0
    assert smoke["targets"]["tiny-mistral-lora"]["mfu_at_least_45pct"] is None  # full only


def test_refuses_without_a_cuda_device() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    proc = bench()
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
    assert "--smoke" in proc.stderr


def test_says_what_is_missing() -> None:
    bare = shutil.which("python3", path="/usr/bin:/bin")
    if bare is None:
        pytest.skip("no system python3")
    has_torch = subprocess.run([bare, "-c", "import torch"], capture_output=True, check=False)
    if has_torch.returncode == 0:
        pytest.skip("the system python3 has torch")
    proc = bench("--smoke", python=bare)
    assert proc.returncode == 2
    assert "missing Python packages: torch" in proc.stderr
    assert "bench/gpu/README.md" in proc.stderr
