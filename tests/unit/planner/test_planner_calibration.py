"""The time model against published measurements: its fit, its left-out-source validation, the
classes of error issue 10 names (small TP GEMMs, pipelines, inter-node bandwidth, gradient sync).

The rows are bench/planner/published.toml, read by the benchmark's own code (bench/planner/run.py)
so the tests and the bench judge the same predictions.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from finetune_trainer.planner import (
    Cluster,
    Constraints,
    ModelFacts,
    Workload,
    known_model,
    plan_parallelism,
)
from finetune_trainer.planner import calibration as cal
from finetune_trainer.planner.cost import (
    _bw,
    estimate_time,
    gemm_efficiency,
    layer_gemm_flops,
)
from finetune_trainer.planner.layout import Layout
from finetune_trainer.planner.search import Candidate, evaluate, search

ROOT = Path(__file__).resolve().parents[3]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("planner_bench", ROOT / "bench/planner/run.py")
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["planner_bench"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


BENCH = _bench()
ROWS = BENCH.load_rows()
FITTABLE = [r for r in ROWS if r.fittable]

# GPT-3 175B (Brown et al. 2020) as Megatron-LM trained it: 96 layers, h 12288, 96 heads,
# vocabulary 51,200, sequence 2048, batch 1536, A100-80GB, full recompute (Narayanan et al.
# 2021, Table 2: TP8 x PP12 at 384 / 768 / 1536 GPUs measured 153 / 149 / 141 TFLOP/s per GPU;
# ZeRO-3 without model parallelism 144 / 88 / 44).
GPT3 = ModelFacts.from_hf_config(
    {"model_type": "gpt2", "n_embd": 12288, "n_layer": 96, "n_head": 96, "vocab_size": 51200},
    name="gpt3-175b",
)
GPT3_WORKLOAD = Workload(seq_len=2048, global_batch_size=1536)
MEGATRON_TABLE_2 = {384: (153.0, 144.0), 768: (149.0, 88.0), 1536: (141.0, 44.0)}


def _ptdp(world: int) -> Layout:
    dp = world // 96
    return Layout(dp, 1, 8, 12, "1f1b", 1, 1, 1536 // dp, "full", False, "last")


def _zero3(world: int) -> Layout:
    return Layout(1, world, 1, 1, "none", 1, 1, 1536 // world, "full", False)


def _tflops(lay: Layout, world: int) -> float:
    """TFLOP/s per GPU as Megatron counts them (eq. 3, with the recompute forward)."""
    cluster = Cluster.of("A100-80GB", nodes=world // 8)
    t = estimate_time(GPT3, cluster, GPT3_WORKLOAD, lay)
    tok = GPT3_WORKLOAD.tokens_per_step / t.step / world
    return tok * BENCH._megatron_flops_per_token(GPT3, 2048, "full") / 1e12


# ---- the fit -----------------------------------------------------------------------------------
def test_the_rows_cover_what_the_fit_needs() -> None:
    """At least 40 published rows from several sources, both GPU generations, TP and PP."""
    assert len(ROWS) >= 40
    assert len({r.source for r in ROWS}) >= 5
    assert {r.cluster.gpu.architecture for r in FITTABLE if r.cluster} >= {"hopper", "ampere"}
    assert any(r.layout and r.layout.tp > 1 for r in FITTABLE)
    assert any(r.layout and r.layout.pp > 1 for r in FITTABLE)


def test_the_shipped_factors_reproduce_the_rows() -> None:
    """In-sample: tokens/s/GPU at each published layout within 12% on average, none off by 35%."""
    errors = {r.id: abs(BENCH.predict_tok(r) / r.measured_tok - 1) for r in FITTABLE}
    assert statistics.fmean(errors.values()) <= 0.12, errors
    assert max(errors.values()) <= 0.35, max(errors.items(), key=lambda kv: kv[1])


def test_the_shipped_factors_are_the_fit() -> None:
    """calibration.py holds what `run.py --fit` finds on the rows (so neither drifts alone)."""
    fitted = BENCH.fit(ROWS)
    f = fitted["factors"]
    for arch in ("hopper", "ampere"):
        assert f.eta[arch] == pytest.approx(cal.GEMM_EFFICIENCY_MAX[arch], rel=0.05), arch
    for name, (attr, *_bounds) in BENCH.SCALARS.items():
        # the GEMM half point is weakly determined (a flat error valley): log-scale tolerance
        rel = 0.5 if name == "half" else 0.1
        assert f.values[name] == pytest.approx(getattr(cal, attr), rel=rel), name
    shipped = BENCH.sse(FITTABLE, BENCH.Factors.shipped())
    assert math.sqrt(shipped / len(FITTABLE)) <= fitted["rms_log_error"] * 1.05


def test_leave_one_source_out_predicts_each_source_from_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """validate(): every left-out number comes from factors fitted without the row's source, the
    in-sample ones from the fit on all rows, and the summary is computed from those rows."""
    monkeypatch.setattr(BENCH, "SWEEPS", 1)  # a coarser fit: the bookkeeping is under test
    monkeypatch.setattr(BENCH, "GOLDEN_STEPS", 8)
    keep = {"torchtitan-docs-2024", "nemo-automodel", "torchtune-readme"}
    rows = [r for r in ROWS if r.source in keep]
    report = BENCH.validate(rows, refit=True)
    assert set(report["fit_per_left_out_source"]) == keep
    everything = BENCH.fit(rows)["factors"]
    by_id = {r.id: r for r in rows}
    for x in report["rows"]:
        r = by_id[x["id"]]
        if x["left_out_source"]["ratio"] is None:
            assert not r.predictable
            continue
        rest = [o for o in rows if o.source != r.source]
        without = BENCH.fit(rest, start=everything)["factors"]
        with BENCH.factors(without):
            assert x["left_out_source"]["ratio"] == pytest.approx(
                BENCH.predict_tok(r) / r.measured_tok, rel=1e-9
            )
        with BENCH.factors(everything):
            assert x["in_sample"]["ratio"] == pytest.approx(
                BENCH.predict_tok(r) / r.measured_tok, rel=1e-9
            )
    out = report["summary"]["left_out_source"]
    ratios = [
        x["left_out_source"]["ratio"]
        for x in report["rows"]
        if x["left_out_source"]["ratio"] and x["precision"] in BENCH.SIXTEEN_BIT
    ]
    assert out["tok_s_mean_abs_error"] == pytest.approx(
        statistics.fmean(abs(q - 1) for q in ratios)
    )
    assert out["degrees_agree"] == sum(
        x["left_out_source"]["degrees_match"] for x in report["rows"]
    )


def test_the_bench_json_reports_these_rows_and_factors() -> None:
    """bench/results/planner.json was produced from today's rows and shipped factors, and its
    summary is what its own per-row numbers say."""
    report: dict[str, Any] = json.loads((ROOT / "bench/results/planner.json").read_text())
    assert [x["id"] for x in report["rows"]] == [r.id for r in ROWS]
    assert report["shipped_factors"]["gemm_efficiency_max_all"] == cal.GEMM_EFFICIENCY_MAX
    for name, (attr, *_bounds) in BENCH.SCALARS.items():
        assert report["shipped_factors"][attr.lower()] == getattr(cal, attr), name
    for side in ("in_sample", "left_out_source"):
        rows = [
            x
            for x in report["rows"]
            if x[side]["ratio"] is not None and x["precision"] in BENCH.SIXTEEN_BIT
        ]
        summary = report["summary"][side]
        assert summary["tok_s_rows_predicted"] == len(rows)
        assert summary["tok_s_mean_abs_error"] == pytest.approx(
            statistics.fmean(abs(x[side]["ratio"] - 1) for x in rows)
        )
        assert summary["degrees_agree"] == sum(x[side]["degrees_match"] for x in report["rows"])


# ---- classes of error of issue 10 -------------------------------------------------------------
def test_tp8_micro_batch_1_gemms_run_near_full_efficiency() -> None:
    """The GEMM's token dimension is the whole micro-batch under TP + SP; only the weight is
    sharded. 175B at TP8 x micro-batch 1 x 2048 tokens: ~1e12 FLOPs per layer pass per GPU."""
    gpu = Cluster.of("A100-80GB").gpu
    flops = layer_gemm_flops(GPT3, 2048, 8)
    assert flops == pytest.approx(2 * 2048 * GPT3.params_per_layer / 8)
    assert gemm_efficiency(gpu, flops) >= 0.95 * cal.GEMM_EFFICIENCY_MAX["ampere"]


@pytest.mark.parametrize("world", sorted(MEGATRON_TABLE_2))
def test_megatron_pipelines_are_predicted_at_their_measured_speed(world: int) -> None:
    """TP8 x PP12 for GPT-3 175B (not a row of the fit: Table 2 of the same paper)."""
    measured = MEGATRON_TABLE_2[world][0]
    assert _tflops(_ptdp(world), world) == pytest.approx(measured, rel=0.15)


def test_a_pipeline_is_a_contender_where_memory_is_tight() -> None:
    """No ranking premium: for 175B on 64 A100s Megatron's TP8 x PP8 layout is among the
    planner's first three, within 5% of the best. (PyTorch keeps a pipelined FSDP stage's
    gradients and parameters unsharded through the step, so FSDP inside pipeline stages does
    not fit there; FSDP over all 64 GPUs and TP x PP are close.)"""
    cluster = Cluster.of("A100-80GB", nodes=8)
    # context parallelism aside: at 2,048 tokens it only trades micro-batch for ring traffic
    # (its own layouts sit between these, within 2%)
    no_cp = Constraints(context_parallel=1)
    res = plan_parallelism(GPT3, cluster, GPT3_WORKLOAD, no_cp, top_k=4)
    ranked = [res.plan, *(alt.plan for alt in res.alternatives)][:3]
    assert any(p.pipeline_parallel == 8 and p.tensor_parallel == 8 for p in ranked), [
        p.summary for p in ranked
    ]
    best = search(GPT3, cluster, GPT3_WORKLOAD).best
    assert best is not None
    assert best.time is not None
    assert best.score() == best.time.step  # the step time, no premium
    pipelined = next(alt.estimate for alt in res.alternatives if alt.plan.pipeline_parallel == 8)
    assert pipelined.step_time_s <= 1.05 * res.estimate.step_time_s


@pytest.mark.xfail(
    strict=True,
    reason="known disagreement (calibration.py): the model charges FSDP at NCCL ring bandwidth "
    "and latency and predicts ~3.7x the 44 TFLOP/s DeepSpeed ZeRO-3 reached in 2021",
)
def test_tp8_pp12_is_ranked_above_zero3_for_175b_on_1536_a100() -> None:
    cluster = Cluster.of("A100-80GB", nodes=192)
    ptdp = evaluate(GPT3, cluster, GPT3_WORKLOAD, _ptdp(1536))
    zero3 = evaluate(GPT3, cluster, GPT3_WORKLOAD, _zero3(1536))
    assert ptdp.fits
    assert zero3.fits
    assert Candidate.key(ptdp) < Candidate.key(zero3)


def test_cross_node_collectives_use_every_nic_of_the_group() -> None:
    """A ring leaves each node once per NIC: FSDP over all 8 GPUs of 8 nodes moves data over 8
    NICs per node, HSDP replicas (one rank per node) over one."""
    cluster = Cluster.of("A100-80GB", nodes=8)
    nic = cluster.gpu.inter_node_bandwidth * cal.COMM_EFFICIENCY_INTER
    nvlink = cluster.gpu.intra_node_bandwidth * cal.COMM_EFFICIENCY_INTRA
    assert _bw(cluster, 1, 64)[0] == pytest.approx(8 * nic)  # fsdp64
    assert _bw(cluster, 8, 8)[0] == pytest.approx(nic)  # dp8 replicas of fsdp8
    assert _bw(cluster, 2, 32)[0] == pytest.approx(4 * nic)  # fsdp32 beside tp2
    assert _bw(cluster, 1, 8)[0] == pytest.approx(nvlink)  # inside a node


def test_deferred_gradient_sync_reduces_once_per_step() -> None:
    """grad_sync="last" pays one reduce-scatter per step instead of one per micro-batch; with
    one micro-batch they are equal; pipelined layouts always defer."""
    model = known_model("meta-llama/Meta-Llama-3-70B")
    cluster = Cluster.of("A100-80GB", nodes=8)
    wl = Workload(seq_len=512, global_batch_size=512)  # HSDP: replicas all-reduce over one NIC
    every = Layout(8, 8, 1, 1, "none", 1, 1, 8, "full", False, "every")
    last = Layout(8, 8, 1, 1, "none", 1, 1, 8, "full", False, "last")
    t_every = estimate_time(model, cluster, wl, every).step
    t_last = estimate_time(model, cluster, wl, last).step
    assert t_last < 0.5 * t_every
    one = Workload(seq_len=2048, global_batch_size=64)
    single = [Layout(1, 64, 1, 1, "none", 1, 1, 1, "full", False, g) for g in ("every", "last")]
    assert estimate_time(model, cluster, one, single[0]) == estimate_time(
        model, cluster, one, single[1]
    )
    piped = [Layout(1, 16, 1, 4, "1f1b", 1, 1, 32, "full", False, g) for g in ("every", "last")]
    assert estimate_time(model, cluster, wl, piped[0]) == estimate_time(
        model, cluster, wl, piped[1]
    )


def test_planning_4096_gpus_finishes() -> None:
    """Speed is measured in bench/planner (above 1,024 GPUs too); here only that it plans."""
    res = plan_parallelism(
        known_model("meta-llama/Meta-Llama-3-70B"),
        Cluster.of("H100-80GB", nodes=512),
        Workload(seq_len=8192, global_batch_size=8192),
    )
    assert res.plan.world == 4096
    assert res.estimate.fits
