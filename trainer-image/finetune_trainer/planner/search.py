"""Enumerate candidate layouts, estimate them, and pick the fastest one that fits.

The search is exact with respect to the cost model: it prunes only candidates that are provably
no better than one it keeps (see `search`); `sweep` evaluates everything and the tests and the
benchmark check that both choose the same plan.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache

from .cost import TimeBreakdown, estimate_time, model_flops_per_token
from .hardware import Cluster
from .layout import GradSync, Layout, ZeroStage
from .memory import MemoryBreakdown, estimate_memory, fits, overcommit, usable_memory
from .model import ModelFacts
from .plan import Estimate
from .workload import Constraints, Recompute, Schedule, Workload

AC_OPTIONS: tuple[Recompute, ...] = ("none", "selective", "full")
# Gradient sync under accumulation the search offers (layout.GradSync): "last" reduces once
# per step (cost.py) and keeps unsharded gradients between micro-batches (memory.py); the
# trainer's loop applies it with FSDP2's set_requires_gradient_sync.
GRAD_SYNC_OPTIONS: tuple[GradSync, ...] = ("every", "last")
#: Step times within this fraction of the fastest are a tie: the time model's own error on the
#: calibration rows is larger (bench/results/planner.json), so among them the layout with the
#: fewest moving parts (Layout.complexity: no offload, no ZeRO-2, no pipeline, no TP, ...) wins,
#: as an expert would choose between two layouts the model cannot tell apart.
NEAR_TIE = 0.10


@cache
def divisors(n: int) -> tuple[int, ...]:
    return tuple(d for d in range(1, n + 1) if n % d == 0)


@dataclass(frozen=True, slots=True)
class Candidate:
    layout: Layout
    memory: MemoryBreakdown
    time: TimeBreakdown | None  # None when it does not fit (time is not estimated)
    fits: bool

    def score(self) -> float:
        """Ranking objective: the estimated step time (ties: fewer moving parts, see key)."""
        if self.time is None:
            return float("inf")
        return self.time.step

    def key(self) -> tuple[float, tuple[int, ...], float, tuple[object, ...]]:
        """Total order: score, then fewer moving parts, then memory, then the layout."""
        lay = self.layout
        return (
            self.score(),
            lay.complexity(),
            self.memory.peak,
            (lay.dp, lay.fsdp, lay.cp, lay.tp, lay.pp, lay.schedule, lay.v, lay.mbs, lay.ga),
        )


@dataclass
class SearchResult:
    ranked: list[Candidate] = field(default_factory=list)  # fitting, best first
    evaluated: int = 0
    structures: int = 0  # layouts with valid degrees/batch split (before memory)
    closest: Candidate | None = None  # least over-committed (for infeasible messages)

    @property
    def best(self) -> Candidate | None:
        return self.ranked[0] if self.ranked else None


#: Context parallelism is searched from this sequence length up. Below it one sequence's
#: activations are small beside the model states, and what the cost model does not charge (the
#: ring's chunked attention kernels, the load balancer's reordering, two more collectives per
#: layer) would decide between layouts it predicts within a few percent of each other; no
#: published run splits shorter sequences. A user can still pin spec.parallelism.contextParallel.
CP_MIN_SEQ_LEN = 16384


def _cp_options(
    cluster: Cluster, workload: Workload, con: Constraints, rest: int, pp: int
) -> tuple[int, ...]:
    """Context-parallel degrees: those dividing ``rest`` ranks whose sequence splits into 2 x cp
    equal chunks (the load-balanced causal split), on GPUs only (torch's ring attention has
    CUDA kernels only), without a pipeline (the trainer does not combine them) and for
    sequences of CP_MIN_SEQ_LEN tokens or more (unless pinned)."""
    if con.context_parallel is not None:
        cp = con.context_parallel
        if cp > 1 and (pp > 1 or cluster.gpu.architecture == "cpu"):
            return ()
        return (cp,) if rest % cp == 0 and workload.seq_len % (2 * cp) == 0 else ()
    if pp > 1 or cluster.gpu.architecture == "cpu" or workload.seq_len < CP_MIN_SEQ_LEN:
        return (1,)
    return tuple(c for c in divisors(rest) if workload.seq_len % (2 * c) == 0)


def _structures(
    model: ModelFacts, cluster: Cluster, workload: Workload, con: Constraints
) -> Iterator[tuple[int, int, int, int, int, Schedule, int, tuple[int, ...]]]:
    """(dp, fsdp, cp, tp, pp, schedule, v, micro-batch sizes ascending) with valid degrees."""
    world = cluster.world
    gbs = workload.global_batch_size
    for tp in divisors(cluster.gpus_per_node):
        if world % tp or model.num_heads % tp or model.num_kv_heads % tp:
            continue
        if model.intermediate_size % tp:
            continue
        if con.tensor_parallel is not None and tp != con.tensor_parallel:
            continue
        for pp, cp in (
            (p, c)
            for p in divisors(world // tp)
            for c in _cp_options(cluster, workload, con, world // (tp * p), p)
        ):
            if pp > model.num_layers:  # uneven stages are fine (memory.stage_layers), empty not
                continue
            if con.pipeline_parallel is not None and pp != con.pipeline_parallel:
                continue
            d = world // (tp * pp * cp)
            if gbs % d:
                continue
            per_rank = gbs // d
            for fsdp in divisors(d):
                dp = d // fsdp
                if con.fsdp is not None and fsdp != con.fsdp:
                    continue
                if con.data_parallel is not None and dp != con.data_parallel:
                    continue
                mbs_all = divisors(per_rank)
                if con.micro_batch_size is not None:
                    mbs_all = tuple(m for m in mbs_all if m == con.micro_batch_size)
                schedules: list[tuple[Schedule, int]] = [("none", 1)]
                if pp > 1:
                    schedules = [("gpipe", 1), ("1f1b", 1)]
                    # any interleave depth that splits each rank's layers evenly (the
                    # trainer's pipeline builds pp x v equal stages)
                    schedules += [
                        ("interleaved-1f1b", v)
                        for v in divisors(model.num_layers // pp)
                        if v > 1 and model.num_layers % pp == 0
                    ]
                for sched, v in schedules:
                    if con.pipeline_schedule is not None and sched != con.pipeline_schedule:
                        continue
                    if con.virtual_stages is not None and v != con.virtual_stages:
                        continue
                    ok = tuple(
                        m
                        for m in mbs_all
                        if pp == 1
                        or (
                            per_rank // m >= pp
                            and (sched != "interleaved-1f1b" or (per_rank // m) % pp == 0)
                        )
                    )
                    if ok:
                        yield dp, fsdp, cp, tp, pp, sched, v, ok


def _ac_options(con: Constraints) -> tuple[Recompute, ...]:
    if con.activation_checkpointing is not None:
        return (con.activation_checkpointing,)
    return AC_OPTIONS


def _offload_options(con: Constraints, pp: int) -> tuple[bool, ...]:
    if pp > 1:
        return () if con.cpu_offload else (False,)
    if con.cpu_offload is None:
        return (False, True)
    return (con.cpu_offload,)


def _zero_options(shard: int, pp: int, offload: bool) -> tuple[ZeroStage, ...]:
    """ZeRO-2 (parameters kept gathered from forward to backward) where there is an FSDP group
    (fsdp x cp ranks) to keep them from, without a pipeline (its stages keep them gathered
    anyway) or offload."""
    if shard == 1 or pp > 1 or offload:
        return (3,)
    return (3, 2)


def _sync_options(pp: int, ga: int, data_parallel: int) -> tuple[GradSync, ...]:
    """Pipelines always reduce on the last micro-batch (cost.py charges them so whatever the
    field says); one micro-batch, or no data parallelism, has nothing to defer."""
    if pp > 1 or ga == 1 or data_parallel == 1:
        return ("every",)
    return GRAD_SYNC_OPTIONS


def evaluate(model: ModelFacts, cluster: Cluster, workload: Workload, lay: Layout) -> Candidate:
    mem = estimate_memory(model, cluster.gpu, workload, lay)
    ok = fits(mem, cluster.gpu, cluster.gpus_per_node)
    t = estimate_time(model, cluster, workload, lay) if ok else None
    return Candidate(lay, mem, t, ok)


def _closer(a: Candidate | None, b: Candidate, cluster: Cluster) -> Candidate:
    if a is None:
        return b
    gpu, gpn = cluster.gpu, cluster.gpus_per_node
    return b if overcommit(b.memory, gpu, gpn) < overcommit(a.memory, gpu, gpn) else a


def search(
    model: ModelFacts,
    cluster: Cluster,
    workload: Workload,
    con: Constraints | None = None,
    keep: int = 8,
) -> SearchResult:
    """Best-first list of fitting candidates, pruned without losing the optimum:

    - activation checkpointing only adds compute and offload only adds transfers, so for a given
      layout and micro-batch the first fitting option in the order none < selective < full <
      (offload) is at least as fast as the later ones (ties go to the simpler one anyway);
    - peak memory does not decrease with the micro-batch, so once nothing fits at micro-batch b,
      no larger micro-batch of that layout is tried.
    """
    con = con or Constraints()
    res = SearchResult()
    acs = _ac_options(con)
    found: list[Candidate] = []
    for dp, fsdp, cp, tp, pp, sched, v, mbs_list in _structures(model, cluster, workload, con):
        res.structures += 1
        per_rank = workload.global_batch_size // (dp * fsdp)
        offs = _offload_options(con, pp)
        for mbs in mbs_list:
            any_fits = False
            for sync in _sync_options(pp, per_rank // mbs, dp * fsdp * cp):
                for zero in _zero_options(fsdp * cp, pp, False):
                    chosen: Candidate | None = None
                    for off in offs if zero == 3 else (False,):
                        for ac in acs:
                            lay = Layout(
                                dp, fsdp, tp, pp, sched, v, mbs, per_rank // mbs, ac, off, sync,
                                zero=zero, cp=cp,
                            )  # fmt: skip
                            cand = evaluate(model, cluster, workload, lay)
                            res.evaluated += 1
                            res.closest = _closer(res.closest, cand, cluster)
                            if cand.fits:
                                chosen = cand
                                break
                        if chosen is not None:
                            break
                    if chosen is not None:
                        any_fits = True
                        found.append(chosen)
            if not any_fits:
                break
    res.ranked = rank(found)[:keep]
    return res


def rank(candidates: list[Candidate]) -> list[Candidate]:
    """Fitting candidates best first: by Candidate.key, except that the simplest layout within
    NEAR_TIE of the fastest step time goes first."""
    ordered = sorted((c for c in candidates if c.fits), key=Candidate.key)
    if not ordered:
        return ordered
    bound = ordered[0].score() * (1.0 + NEAR_TIE)
    near = [c for c in ordered if c.score() <= bound]
    pick = min(near, key=lambda c: (c.layout.complexity(), c.key()))
    return [pick, *(c for c in ordered if c is not pick)]


def sweep(
    model: ModelFacts, cluster: Cluster, workload: Workload, con: Constraints | None = None
) -> list[Candidate]:
    """Every candidate, no pruning (for tests and the benchmark's optimality check)."""
    con = con or Constraints()
    out: list[Candidate] = []
    for dp, fsdp, cp, tp, pp, sched, v, mbs_list in _structures(model, cluster, workload, con):
        per_rank = workload.global_batch_size // (dp * fsdp)
        for mbs in mbs_list:
            for sync in _sync_options(pp, per_rank // mbs, dp * fsdp * cp):
                for off in _offload_options(con, pp):
                    for zero in _zero_options(fsdp * cp, pp, off):
                        for ac in _ac_options(con):
                            lay = Layout(
                                dp, fsdp, tp, pp, sched, v, mbs, per_rank // mbs, ac, off, sync,
                                zero=zero, cp=cp,
                            )  # fmt: skip
                            out.append(evaluate(model, cluster, workload, lay))
    return out


def sweep_best(
    model: ModelFacts, cluster: Cluster, workload: Workload, con: Constraints | None = None
) -> Candidate | None:
    ranked = rank(sweep(model, cluster, workload, con))
    return ranked[0] if ranked else None


def to_estimate(model: ModelFacts, cluster: Cluster, workload: Workload, c: Candidate) -> Estimate:
    gpu = cluster.gpu
    t = c.time if c.time is not None else estimate_time(model, cluster, workload, c.layout)
    tokens_per_s = workload.tokens_per_step / t.step
    per_gpu = tokens_per_s / cluster.world
    flops = model_flops_per_token(model, workload.seq_len, workload.method)
    m = c.memory
    return Estimate(
        peak_memory_bytes=int(m.peak),
        usable_memory_bytes=int(usable_memory(gpu)),
        memory_capacity_bytes=gpu.memory_bytes,
        memory_breakdown={
            "model_states": int(m.model_states),
            "fsdp_buffers": int(m.fsdp_buffers),
            "activations": int(m.activations),
            "loss_head": int(m.loss_head),
            "overhead": int(m.overhead),
        },
        fits=c.fits,
        step_time_s=t.step,
        time_breakdown={
            "compute": t.compute,
            "comm_exposed": t.comm_exposed,
            "bubble": t.bubble,
            "optimizer": t.optimizer,
        },
        tokens_per_s=tokens_per_s,
        tokens_per_s_per_gpu=per_gpu,
        mfu=per_gpu * flops / gpu.bf16_flops,
    )
