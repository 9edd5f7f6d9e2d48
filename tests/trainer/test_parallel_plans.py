"""Every strategy the planner can emit, applied by ``parallelize.apply_plan`` and run by the
trainer's ``Loop`` under torchrun (gloo, CPU), against a single-process run of the same model,
data and optimizer: per-step loss, global gradient norm (before clipping), evaluation loss and the
parameters after the last step.

All plans of one world size run in one torchrun launch (parallel_worker.py) to keep the tier short.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, trainer_env

pytestmark = pytest.mark.trainer

WORKER = Path(__file__).with_name("parallel_worker.py")

#: float32 throughout; parallel runs reduce in another order (and TP splits the matmuls), so
#: results differ by rounding: measured |delta loss| <= 1e-6, |delta grad norm| / norm <= 1e-5,
#: |delta param| <= 4e-6 after 3 AdamW steps at lr 1e-2. A real bug (a wrong shard, a wrong loss
#: scale, a missing gradient reduction) moves these by 1e-2 or more.
LOSS_TOL = 1e-4
NORM_RTOL = 1e-3
PARAM_TOL = 1e-4


def plan(
    dp: int = 1,
    fsdp: int = 1,
    tp: int = 1,
    pp: int = 1,
    mbs: int = 2,
    schedule: str = "none",
    v: int = 1,
    ac: str = "none",
    offload: bool = False,
) -> dict[str, Any]:
    ga = 8 // (dp * fsdp * mbs)
    return {
        "data_parallel": dp,
        "fsdp": fsdp,
        "tensor_parallel": tp,
        "pipeline_parallel": pp,
        "pipeline_schedule": schedule,
        "virtual_stages": v,
        "micro_batch_size": mbs,
        "gradient_accumulation": ga,
        "activation_checkpointing": ac,
        "cpu_offload": offload,
    }


VOCAB_PARALLEL = {"name": "vocab_parallel_loss", "vocab_parallel_loss": True}
REFERENCE = [
    {"name": "full"},
    {"name": "full3", "layers": 3},
    {"name": "lora", "lora": True},
    {"name": "tied", "tied": True},
    VOCAB_PARALLEL,
]
TWO = [
    {"name": "fsdp2", "plan": plan(fsdp=2)},
    {"name": "ddp2", "plan": plan(dp=2, mbs=4)},
    {"name": "tp2_sp", "plan": plan(tp=2, mbs=4)},
    {"name": "pp2_1f1b", "plan": plan(pp=2, schedule="1f1b")},
    {"name": "pp2_gpipe", "plan": plan(pp=2, schedule="gpipe", mbs=4)},
    {"name": "pp2_interleaved", "plan": plan(pp=2, schedule="interleaved-1f1b", v=2)},
    # 3 layers on 2 stages: 2 + 1 (the first stage takes the extra layer)
    {"name": "pp2_uneven_1f1b", "plan": plan(pp=2, schedule="1f1b"), "layers": 3},
    {"name": "fsdp2_selective_ac", "plan": plan(fsdp=2, ac="selective")},
    {"name": "tp2_full_ac", "plan": plan(tp=2, mbs=4, ac="full")},
    {"name": "fsdp2_cpu_offload", "plan": plan(fsdp=2, offload=True)},
    {"name": "fsdp2_lora", "plan": plan(fsdp=2), "lora": True},
    # adapters on column- (q, v) and row-parallel (o, down) linears, split with them
    {"name": "tp2_lora", "plan": plan(tp=2, mbs=4), "lora": True},
    # LoRA over pipeline stages: frozen base, adapters trained on each stage
    {"name": "pp2_lora", "plan": plan(pp=2, schedule="1f1b"), "lora": True},
    # gradients reduced once per step (2 micro-batches), unsharded in between
    {"name": "fsdp2_sync_last", "plan": {**plan(fsdp=2), "gradient_sync": "last"}},
    # ZeRO-2: parameters kept gathered from forward to backward; with deferred sync also
    # between micro-batches (one all-gather and one reduce-scatter per step)
    {"name": "fsdp2_zero2", "plan": {**plan(fsdp=2), "zero_stage": 2}},
    {
        "name": "fsdp2_zero2_sync_last",
        "plan": {**plan(fsdp=2, mbs=1), "zero_stage": 2, "gradient_sync": "last"},
    },
    # tied embeddings: the vocabulary-split embedding and LM head stay one parameter
    {"name": "tp2_tied", "plan": plan(tp=2, mbs=4), "tied": True},
    VOCAB_PARALLEL,
]
FOUR = [
    {"name": "hsdp_2x2", "plan": plan(dp=2, fsdp=2)},
    {"name": "hsdp_2x2_sync_last", "plan": {**plan(dp=2, fsdp=2, mbs=1), "gradient_sync": "last"}},
    {"name": "tp2_x_fsdp2", "plan": plan(fsdp=2, tp=2)},
    {"name": "tp2_x_fsdp2_lora", "plan": plan(fsdp=2, tp=2, ac="selective"), "lora": True},
    {"name": "tp2_x_fsdp2_zero2", "plan": {**plan(fsdp=2, tp=2, mbs=1), "zero_stage": 2}},
    {
        "name": "pp2_x_fsdp2_1f1b_selective",
        "plan": plan(fsdp=2, pp=2, schedule="1f1b", mbs=1, ac="selective"),
    },
    {"name": "pp2_x_tp2_interleaved", "plan": plan(tp=2, pp=2, schedule="interleaved-1f1b", v=2)},
    {
        "name": "pp2_x_tp2_lora_interleaved",
        "plan": plan(tp=2, pp=2, schedule="interleaved-1f1b", v=2),
        "lora": True,
    },
]


def _run(tmp: Path, name: str, cases: list[dict[str, Any]], nproc: int) -> dict[str, Any]:
    cases_file = tmp / f"{name}-cases.json"
    cases_file.write_text(json.dumps(cases))
    out = tmp / f"{name}.json"
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(out), str(cases_file)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            str(WORKER),
            str(out),
            str(cases_file),
        ]
    env = trainer_env(tmp / "unused.jsonl", nproc)
    env["PYTHONPATH"] = f"{REPO / 'trainer-image'}:{WORKER.parent}"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("plans")
    ref = _run(tmp, "reference", REFERENCE, 1)
    got = {**_run(tmp, "two", TWO, 2), **_run(tmp, "four", FOUR, 4)}
    return {"reference": ref, "parallel": got}


@pytest.mark.parametrize("case", [c["name"] for c in TWO + FOUR if c is not VOCAB_PARALLEL])
def test_plan_matches_single_process(results: dict[str, Any], case: str) -> None:
    spec = next(c for c in TWO + FOUR if c["name"] == case)
    ref = results["reference"][
        "lora"
        if spec.get("lora")
        else "tied"
        if spec.get("tied")
        else f"full{spec['layers']}"
        if spec.get("layers")
        else "full"
    ]
    got = results["parallel"][case]
    assert got["loss"] == pytest.approx(ref["loss"], abs=LOSS_TOL)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=NORM_RTOL)
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], abs=LOSS_TOL)
    # Every parameter of the model comes back (pipeline ranks' parts gathered), and matches.
    assert set(got["params"]) == set(ref["params"])
    worst = max(
        abs(a - b)
        for k in ref["params"]
        for a, b in zip(ref["params"][k], got["params"][k], strict=True)
    )
    assert worst <= PARAM_TOL, f"{case}: parameters differ by {worst}"


def test_vocab_parallel_loss_matches_whole_vocabulary(results: dict[str, Any]) -> None:
    """The chunked cross-entropy on a head split over 2 ranks' vocabulary shards (1,001 rows:
    501 + 500) without gathering the logits, against one process with the whole head: the same
    summed loss, and the same gradients of the hidden states, the weight and the bias."""
    ref = results["reference"]["vocab_parallel_loss"]
    got = results["parallel"]["vocab_parallel_loss"]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    for name in ("hidden", "weight", "bias"):
        worst = max(abs(a - b) for a, b in zip(ref[name], got[name], strict=True))
        assert worst <= 1e-5 * max(abs(x) for x in ref[name]), f"{name}: differs by {worst}"
