"""Search: valid degrees, never an unfit plan, and the optimum of an exhaustive sweep."""

import time
from dataclasses import replace
from typing import Any

import pytest

from finetune_trainer.planner import (
    Cluster,
    Constraints,
    Plan,
    PlanInfeasible,
    Workload,
    estimate,
    known_model,
    plan_parallelism,
    search,
    sweep,
    sweep_best,
)
from finetune_trainer.planner.layout import Layout
from finetune_trainer.planner.memory import usable_host_memory, usable_memory
from finetune_trainer.planner.search import NEAR_TIE, rank

CASES: list[tuple[str, str, int, int, int, int, str]] = [
    # model, gpu, nodes, gpus/node, seq, global batch, method
    ("tiny-llama", "CPU", 1, 4, 256, 8, "full"),
    ("tiny-qwen2", "CPU", 2, 4, 512, 16, "full"),
    ("tiny-mistral", "CPU", 1, 8, 1024, 8, "lora"),
    ("mistralai/Mistral-7B-v0.3", "H100-80GB", 1, 8, 2048, 64, "full"),
    ("meta-llama/Meta-Llama-3-8B", "H100-80GB", 2, 8, 4096, 64, "full"),
    ("meta-llama/Meta-Llama-3-70B", "H100-80GB", 4, 8, 2048, 64, "full"),
    ("meta-llama/Meta-Llama-3-70B", "A100-40GB", 4, 8, 4096, 32, "full"),
    ("Qwen/Qwen2-7B", "L40S", 2, 4, 4096, 32, "full"),
    ("meta-llama/Meta-Llama-3-8B", "H100-80GB", 1, 8, 8192, 16, "lora"),
    ("mosaicml/mpt-13b", "H100-80GB", 1, 8, 4096, 240, "full"),
    ("meta-llama/Meta-Llama-3-8B", "H100-80GB", 2, 8, 65536, 32, "full"),  # long context
]
IDS = [f"{c[0]}-{c[2]}x{c[3]}{c[1]}-{c[6]}" for c in CASES]
TOP_K = 4  # alternatives plan_parallelism returns


def inputs(case: tuple[str, str, int, int, int, int, str]) -> tuple[Any, Cluster, Workload]:
    mid, gpu, nodes, gpn, seq, gbs, method = case
    return (
        known_model(mid),
        Cluster.of(gpu, nodes=nodes, gpus_per_node=gpn),
        Workload(seq_len=seq, global_batch_size=gbs, method=method),
    )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_chosen_plan_is_the_exhaustive_optimum(case: Any) -> None:
    model, cluster, wl = inputs(case)
    best = search(model, cluster, wl).best
    exhaustive = sweep_best(model, cluster, wl)
    assert best is not None
    assert exhaustive is not None
    assert best.layout == exhaustive.layout


def test_near_ties_go_to_the_simpler_layout_and_clear_wins_to_the_faster() -> None:
    """Step times within NEAR_TIE are below what the time model can tell apart: the layout with
    fewer moving parts (here FSDP alone, not FSDP with TP) is chosen; a clear win is not given
    up for simplicity."""
    model, cluster, wl = inputs(CASES[3])  # Mistral-7B on 8 H100s: FSDP8 and FSDP4xTP2 both fit
    found = search(model, cluster, wl, keep=1000).ranked
    simple = next(c for c in found if c.layout.tp == 1 and c.layout.pp == 1)
    with_tp = next(c for c in found if c.layout.tp > 1 and c.layout.pp == 1)
    assert simple.layout.complexity() < with_tp.layout.complexity()

    def timed(c: Any, step: float) -> Any:
        return replace(c, time=replace(c.time, step=step))

    near = [timed(with_tp, 1.0), timed(simple, 1.0 + NEAR_TIE / 2)]
    assert [c.layout for c in rank(near)] == [simple.layout, with_tp.layout]
    clear = [timed(with_tp, 1.0), timed(simple, 1.0 + 2 * NEAR_TIE)]
    assert [c.layout for c in rank(clear)] == [with_tp.layout, simple.layout]


def test_lora_is_planned_over_pipelines_too() -> None:
    """LoRA runs over pipeline stages (parity-tested in tests/trainer): the search offers it."""
    model, cluster, wl = inputs(CASES[8])  # Llama-3-8B LoRA on 8 H100s
    res = plan_parallelism(model, cluster, wl, Constraints(pipeline_parallel=2))
    assert res.plan.pipeline_parallel == 2
    assert res.plan.summary.endswith(" lora")
    assert res.estimate.fits


def test_the_reason_names_the_faster_layout_a_near_tie_passed_over() -> None:
    model, cluster, wl = inputs(CASES[6])  # Llama-3-70B on 32 A100-40GB: a near tie
    res = plan_parallelism(model, cluster, wl)
    chosen, fastest = search(model, cluster, wl).ranked[:2]
    assert fastest.score() < chosen.score()
    assert f"chosen over {fastest.layout.summary()}" in res.reason
    assert "for fewer moving parts" in res.reason
    llama8b = plan_parallelism(*inputs(CASES[4]))  # its plan is the model's fastest
    assert llama8b.estimate.step_time_s == search(*inputs(CASES[4])).ranked[0].score()
    assert "chosen over" not in llama8b.reason


@pytest.mark.parametrize("case", CASES[:8], ids=IDS[:8])
def test_every_candidate_is_a_valid_plan(case: Any) -> None:
    model, cluster, wl = inputs(case)
    candidates = sweep(model, cluster, wl)
    assert candidates, "the sweep found no layout at all"
    for c in candidates:
        lay = c.layout
        assert lay.tp <= cluster.gpus_per_node
        assert cluster.gpus_per_node % lay.tp == 0
        assert model.num_heads % lay.tp == 0
        assert model.num_kv_heads % lay.tp == 0
        assert lay.pp * lay.v <= model.num_layers  # uneven stages, never an empty one
        if lay.v > 1:  # interleaving is searched over even splits only
            assert model.num_layers % (lay.pp * lay.v) == 0
        assert lay.dp * lay.fsdp * lay.cp * lay.tp * lay.pp == cluster.world
        assert lay.dp * lay.fsdp * lay.mbs * lay.ga == wl.global_batch_size
        if lay.cp > 1:  # GPU-only, no pipeline, 2 x cp equal chunks of each sequence
            assert cluster.gpu.architecture != "cpu"
            assert lay.pp == 1
            assert wl.seq_len % (2 * lay.cp) == 0
        Plan.from_layout(model, cluster, wl, lay)  # validates


def test_the_sweeps_cover_every_kind_of_layout() -> None:
    """The validity check above sees each parallelism at work, not only plain FSDP."""
    layouts = [c.layout for case in CASES[:8] for c in sweep(*inputs(case))]
    long = Workload(seq_len=32768, global_batch_size=16)  # context parallelism: long sequences
    layouts += [c.layout for c in sweep(*inputs(CASES[4])[:2], long)]
    kinds = {
        "dp": any(lay.dp > 1 for lay in layouts),
        "fsdp": any(lay.fsdp > 1 for lay in layouts),
        "tp": any(lay.tp > 1 for lay in layouts),
        "pp": any(lay.pp > 1 for lay in layouts),
        "interleaved": any(lay.v > 1 for lay in layouts),
        "gradient accumulation": any(lay.ga > 1 for lay in layouts),
        "recompute": any(lay.ac != "none" for lay in layouts),
        "offload": any(lay.offload for lay in layouts),
        "zero2": any(lay.zero == 2 for lay in layouts),
        "cp": any(lay.cp > 1 for lay in layouts),
    }
    assert [k for k, seen in kinds.items() if not seen] == []


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_result_fits_and_alternatives_are_slower(case: Any) -> None:
    model, cluster, wl = inputs(case)
    res = plan_parallelism(model, cluster, wl, top_k=TOP_K)
    assert res.estimate.fits
    assert res.estimate.peak_memory_bytes <= res.estimate.usable_memory_bytes
    best = search(model, cluster, wl, keep=100).ranked
    runners_up = best[1 : 1 + TOP_K]
    assert runners_up, "nothing to compare the alternatives with"
    fastest = min(c.score() for c in best)
    assert best[0].score() <= fastest * (1 + NEAR_TIE)
    for alt, cand in zip(res.alternatives, runners_up, strict=True):
        assert alt.estimate.fits
        assert alt.plan.layout() == cand.layout
        # slower, or a near tie the chosen plan wins by having fewer moving parts
        assert cand.score() >= best[0].score() or (
            cand.layout.complexity() >= best[0].layout.complexity()
        )
    scores = [c.score() for c in runners_up]
    assert scores == sorted(scores)
    assert estimate(res.plan) == res.estimate
    assert 0 < res.estimate.mfu < 1
    status = res.to_status()
    assert status["summary"] == res.summary
    assert status["world"] == cluster.world
    assert isinstance(status["estMFU"], str)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_no_unfit_plan_is_ranked(case: Any) -> None:
    """Re-checked from each candidate's own memory breakdown, not from its ``fits`` flag."""
    model, cluster, wl = inputs(case)
    ranked = search(model, cluster, wl, keep=100).ranked
    assert ranked, "nothing was ranked"
    gpu, per_node = cluster.gpu, cluster.gpus_per_node
    for c in ranked:
        assert c.fits
        assert c.memory.peak <= usable_memory(gpu), c.layout
        assert c.memory.host * per_node <= usable_host_memory(gpu), c.layout


def test_the_cases_include_plans_that_do_not_fit() -> None:
    """Without candidates that overflow memory the test above would check nothing."""
    tight = [
        i
        for case, i in zip(CASES, IDS, strict=True)
        if any(not c.fits for c in sweep(*inputs(case)))
    ]
    assert len(tight) >= len(CASES) // 2, tight


@pytest.mark.parametrize(
    ("con", "check"),
    [
        (Constraints(tensor_parallel=2), lambda p: p.tensor_parallel == 2),
        (Constraints(micro_batch_size=1), lambda p: p.micro_batch_size == 1),
        (
            Constraints(activation_checkpointing="full"),
            lambda p: p.activation_checkpointing == "full",
        ),
        (Constraints(fsdp=4, data_parallel=2), lambda p: (p.fsdp, p.data_parallel) == (4, 2)),
        (Constraints(pipeline_parallel=2), lambda p: p.pipeline_parallel == 2),
    ],
)
def test_constraints_are_honoured(con: Constraints, check: Any) -> None:
    model, cluster, wl = inputs(CASES[4])
    res = plan_parallelism(model, cluster, wl, con)
    assert check(res.plan)
    assert search(model, cluster, wl, con).best.layout == sweep_best(model, cluster, wl, con).layout  # type: ignore[union-attr]


def test_manual_mode_validates_and_estimates() -> None:
    model, cluster, wl = inputs(CASES[3])
    con = Constraints(fsdp=8, micro_batch_size=2, activation_checkpointing="selective")
    res = plan_parallelism(model, cluster, wl, con, mode="manual")
    assert res.mode == "manual"
    assert res.summary == "fsdp8 mbs2 ga4 ac=selective"
    assert res.reason.startswith("manual: FSDP over 8 GPUs, micro-batch 2 x 4")
    with pytest.raises(PlanInfeasible, match=r"invalid.*globalBatchSize"):
        plan_parallelism(model, cluster, wl, Constraints(micro_batch_size=3), mode="manual")
    with pytest.raises(PlanInfeasible, match="does not divide kv heads"):
        plan_parallelism(
            known_model("tiny-llama"),
            Cluster.of("CPU", 1, 8),
            Workload(seq_len=64, global_batch_size=8),
            Constraints(tensor_parallel=8),
            mode="manual",
        )
    with pytest.raises(PlanInfeasible, match=r"needs .* GiB per GPU.*automatic planner would"):
        plan_parallelism(model, cluster, wl, Constraints(micro_batch_size=8), mode="manual")


def test_reason_reads_well() -> None:
    model, cluster, wl = inputs(CASES[3])
    res = plan_parallelism(model, cluster, wl)
    assert res.reason.startswith("FSDP over 8 GPUs, micro-batch")
    assert "GiB of 80 GiB" in res.reason
    assert "tok/s/GPU" in res.reason


def test_lora_fallback_says_so() -> None:
    model = known_model("meta-llama/Meta-Llama-3-70B")
    cluster = Cluster.of("A100-40GB", 1, 2)  # 1 TB of host RAM: too little to offload 70B
    wl = Workload(seq_len=1024, global_batch_size=8)
    with pytest.raises(PlanInfeasible):
        plan_parallelism(model, cluster, wl)
    res = plan_parallelism(model, cluster, wl, allow_lora_fallback=True)
    assert res.plan.workload.method == "lora"
    assert res.reason.startswith("Full fine-tune does not fit")
    assert res.summary.endswith("lora")


@pytest.mark.parametrize("nodes", [1, 16, 128])
def test_planning_is_fast(nodes: int) -> None:
    """CPU seconds, not wall seconds: the test machine's cores are shared (the bench reports
    both, up to 4,096 GPUs)."""
    model = known_model("meta-llama/Meta-Llama-3-70B")
    cluster = Cluster.of("H100-80GB", nodes=nodes)
    t0 = time.process_time()
    plan_parallelism(model, cluster, Workload(seq_len=8192, global_batch_size=2 * cluster.world))
    assert time.process_time() - t0 < 1.0


def test_deferred_gradient_sync_is_planned_and_reaches_the_trainer_config() -> None:
    """Where the unsharded gradients fit, the search offers reducing once per step; the choice
    travels Layout -> Plan -> the trainer's PlanConfig (as the operator builds it)."""
    from finetune_trainer.config import PlanConfig
    from finetune_trainer.planner.search import evaluate

    model = known_model("mistralai/Mistral-7B-v0.3")
    cluster = Cluster.of("H100-80GB", nodes=2)
    wl = Workload(seq_len=2048, global_batch_size=64)
    ranked = search(model, cluster, wl, keep=100).ranked
    deferred = [c for c in ranked if c.layout.grad_sync == "last"]
    assert deferred, [c.layout.summary() for c in ranked]
    for c in deferred:
        assert c.layout.ga > 1
        assert c.layout.pp == 1
        assert c.layout.dp * c.layout.shard > 1
        same = evaluate(model, cluster, wl, replace(c.layout, grad_sync="every"))
        assert c.score() < same.score()  # one reduction per step instead of one per micro-batch
        if c.layout.shard > 1:  # unsharded gradients in between (DDP's are whole anyway)
            assert c.memory.peak > same.memory.peak
        else:
            assert c.memory.peak == same.memory.peak
    plan = Plan.from_layout(model, cluster, wl, deferred[0].layout)
    assert plan.gradient_sync == "last"
    assert plan.layout() == deferred[0].layout
    assert "sync=last" in plan.summary
    config = PlanConfig(**{name: getattr(plan, name) for name in PlanConfig.model_fields})
    assert config.gradient_sync == "last"


def test_any_interleave_depth_that_splits_the_layers_evenly() -> None:
    """Interleaved 1F1B with v chunks per rank needs the layers to split into pp x v equal
    stages (the trainer's pipeline); every such v is searched, no other."""
    model = known_model("meta-llama/Meta-Llama-3-70B")  # 80 layers: 20 per rank on pp4
    cluster = Cluster.of("H100-80GB", nodes=4)
    wl = Workload(seq_len=4096, global_batch_size=64)
    depths = {
        c.layout.v
        for c in sweep(model, cluster, wl, Constraints(pipeline_parallel=4))
        if c.layout.schedule == "interleaved-1f1b"
    }
    assert depths == {2, 4, 5, 10, 20}
    best = search(model, cluster, wl, Constraints(pipeline_parallel=4, virtual_stages=5)).best
    assert best is not None
    assert best.layout.v == 5


def test_zero2_is_planned_and_reaches_the_trainer_config() -> None:
    """ZeRO-2 (parameters kept gathered from forward to backward) is offered wherever there is
    an FSDP group and no pipeline or offload: it saves one all-gather per micro-batch (and, with
    deferred sync, every one but the first) for the memory of the gathered layers. The choice
    travels Layout -> Plan -> the trainer's PlanConfig (as the operator builds it)."""
    from finetune_trainer.config import PlanConfig
    from finetune_trainer.planner.search import evaluate

    model = known_model("meta-llama/Meta-Llama-3-8B")
    cluster = Cluster.of("H100-80GB", nodes=4)
    wl = Workload(seq_len=4096, global_batch_size=128)
    every = sweep(model, cluster, wl)
    zero2 = [c for c in every if c.layout.zero == 2]
    assert zero2
    for c in zero2:
        assert c.layout.shard > 1  # an FSDP group: fsdp x cp ranks
        assert c.layout.pp == 1
        assert not c.layout.offload
        same = evaluate(model, cluster, wl, replace(c.layout, zero=3))
        assert c.memory.peak > same.memory.peak
        if same.fits and c.fits:
            assert c.score() <= same.score()
    best = search(model, cluster, wl).best
    assert best is not None
    assert best.layout == sweep_best(model, cluster, wl).layout  # type: ignore[union-attr]
    fitting = [c for c in zero2 if c.fits]
    assert fitting
    plan = Plan.from_layout(model, cluster, wl, fitting[0].layout)
    assert plan.zero_stage == 2
    assert plan.layout() == fitting[0].layout
    assert "zero2" in plan.summary
    config = PlanConfig(**{name: getattr(plan, name) for name in PlanConfig.model_fields})
    assert config.zero_stage == 2
    with pytest.raises(ValueError, match="zeroStage 2"):
        Plan(**{**plan.model_dump(), "zero_stage": 2, "cpu_offload": True})


# ---- context parallelism ---------------------------------------------------------------------
LONG = Workload(seq_len=131072, global_batch_size=32)


def test_context_parallelism_is_searched_on_gpus_for_sequences_it_splits() -> None:
    """At 128k tokens the search weighs splitting each sequence (cp 2..16): every such layout
    cuts the sequence into 2 x cp equal chunks, has no pipeline, and shards FSDP over fsdp x cp;
    on CPU ranks (no ring-attention kernels) it is never offered, nor where the sequence does
    not split evenly, nor for short sequences (search.CP_MIN_SEQ_LEN) unless pinned."""
    from finetune_trainer.planner.search import CP_MIN_SEQ_LEN

    model = known_model("meta-llama/Meta-Llama-3-8B")
    gpus = Cluster.of("H100-80GB", nodes=2)
    every = sweep(model, gpus, LONG)
    split = [c for c in every if c.layout.cp > 1]
    assert {c.layout.cp for c in split} == {2, 4, 8, 16}
    for c in split:
        assert c.layout.pp == 1
        assert LONG.seq_len % (2 * c.layout.cp) == 0
        assert c.layout.world == gpus.world
    ranked = search(model, gpus, LONG, keep=20).ranked
    assert any(c.layout.cp > 1 for c in ranked), [c.layout.summary() for c in ranked]
    cpu = Cluster.of("CPU", nodes=1, gpus_per_node=4)
    long_on_cpu = Workload(seq_len=32768, global_batch_size=8)
    assert all(c.layout.cp == 1 for c in sweep(model, cpu, long_on_cpu))
    odd = Workload(seq_len=32772, global_batch_size=32)  # 4 x 8193: only cp 2 splits it
    assert {c.layout.cp for c in sweep(model, gpus, odd)} == {1, 2}
    short = Workload(seq_len=CP_MIN_SEQ_LEN // 2, global_batch_size=32)
    assert {c.layout.cp for c in sweep(model, gpus, short)} == {1}
    pinned = sweep(model, gpus, short, Constraints(context_parallel=2))
    assert pinned
    assert {c.layout.cp for c in pinned} == {2}


def test_context_parallelism_splits_activations_and_pays_for_keys_and_values() -> None:
    """Against the same ranks as FSDP alone, cp 2 holds half of each sequence's activations and
    loss-head tokens, shards the model states over the same number of ranks, and adds the
    all-gather of keys and values (and their gradients' reduce-scatter) to every layer."""
    from finetune_trainer.planner.cost import estimate_time
    from finetune_trainer.planner.memory import estimate_memory

    model = known_model("meta-llama/Meta-Llama-3-8B")
    gpus = Cluster.of("H100-80GB", nodes=2)
    wl = Workload(seq_len=32768, global_batch_size=32)
    plain = Layout(1, 16, 1, 1, "none", 1, 1, 2, "full", False)
    split = replace(plain, fsdp=8, cp=2, ga=4)  # 8 data-parallel ranks: 4 micro-batches each
    m_plain, m_split = (estimate_memory(model, gpus.gpu, wl, lay) for lay in (plain, split))
    assert m_split.activations == pytest.approx(m_plain.activations / 2, rel=0.05)
    assert m_split.model_states == pytest.approx(m_plain.model_states, rel=1e-9)
    t_plain, t_split = (estimate_time(model, gpus, wl, lay) for lay in (plain, split))
    # the same tokens per rank per step (half-length GEMMs run a little less efficiently),
    # plus the ring traffic
    assert t_split.compute == pytest.approx(t_plain.compute, rel=0.01)
    assert t_split.comm_exposed > t_plain.comm_exposed


def test_a_context_parallel_plan_is_validated_and_reaches_status_and_the_trainer() -> None:
    from finetune_trainer.config import PlanConfig

    model = known_model("meta-llama/Meta-Llama-3-8B")
    gpus = Cluster.of("H100-80GB", nodes=2)
    res = plan_parallelism(model, gpus, LONG, Constraints(context_parallel=4, pipeline_parallel=1))
    assert res.plan.context_parallel == 4
    assert "cp4" in res.plan.summary
    assert "context parallel 4" in res.reason
    status = res.to_status()
    assert status["contextParallel"] == 4
    assert status["dataParallel"] * status["fsdp"] * 4 * status["tensorParallel"] == 16
    config = PlanConfig(**{name: getattr(res.plan, name) for name in PlanConfig.model_fields})
    assert config.context_parallel == 4
    assert config.world_size == 16
    manual = plan_parallelism(
        model, gpus, LONG, Constraints(context_parallel=2, activation_checkpointing="full"),
        mode="manual",
    )  # fmt: skip
    assert (manual.plan.fsdp, manual.plan.context_parallel) == (8, 2)
    plan = res.plan
    for bad, words in (
        ({"workload": LONG.model_copy(update={"seq_len": 131074})}, "equal chunks"),
        ({"cluster": Cluster.of("CPU", nodes=2)}, "GPUs only"),
    ):
        with pytest.raises(ValueError, match=words):
            Plan(**{**plan.model_dump(), **bad})
    # pins the trainer cannot run are refused with what they need, never planned or crashed on
    both = Constraints(context_parallel=2, pipeline_parallel=2)
    with pytest.raises(PlanInfeasible, match="context parallelism needs GPUs, no pipeline"):
        plan_parallelism(model, gpus, LONG, both)
    with pytest.raises(PlanInfeasible, match="context parallelism needs GPUs"):
        plan_parallelism(model, Cluster.of("CPU", nodes=2), LONG, Constraints(context_parallel=2))
    with pytest.raises(PlanInfeasible, match="contextParallel"):
        plan_parallelism(
            model, Cluster.of("CPU", nodes=2), LONG, Constraints(context_parallel=2), mode="manual"
        )
