"""Planner benchmark: fit on published configurations, validate leaving one source out, speed.

    PYTHONPATH=trainer-image python bench/planner/run.py            # report with shipped factors
    PYTHONPATH=trainer-image python bench/planner/run.py --fit      # also re-fit the factors and
                                                                    # validate source by source

Reads bench/planner/published.toml (``[[row]]`` tables: each a published training configuration
with its source, layout and measured throughput), writes bench/results/planner.json and prints
tables. Standard library + finetune_trainer.planner.

What it reports, each in-sample (factors fitted on every row) and left-out-source (factors fitted
without the row's source, the issue's validation), side by side:
- tokens/s/GPU predicted at the published layout vs measured (16-bit rows);
- degrees agreement: the planner's own DP*FSDP, TP, PP and CP for the same model, GPUs,
  sequence and global batch vs the published ones;
- ranking: where one source measured two layouts of the same workload, is the faster one
  predicted faster;
- fits: how many published layouts (which ran) the memory model calls infeasible (memory is not
  fitted, so this is the same both ways).
Rows with an option the planner cannot express (LoRA with PP, a GPU or model it cannot read;
uneven pipeline stages split the source's own way are planned but not predicted) are counted
and listed with the reason; their degrees are a miss, and they are predicted only where the
time model has the option.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic

ROOT = Path(__file__).resolve().parents[2]
try:
    import finetune_trainer.planner  # noqa: F401
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, str(ROOT / "trainer-image"))

from finetune_trainer.planner import (  # noqa: E402
    Cluster,
    ModelFacts,
    PlanInfeasible,
    Workload,
    format_table,
    known_model,
    plan_parallelism,
    search,
    sweep,
)
from finetune_trainer.planner import calibration as cal  # noqa: E402
from finetune_trainer.planner.cost import estimate_time  # noqa: E402
from finetune_trainer.planner.hardware import GiB  # noqa: E402
from finetune_trainer.planner.layout import GradSync, Layout  # noqa: E402
from finetune_trainer.planner.memory import estimate_memory, fits  # noqa: E402
from finetune_trainer.planner.search import rank  # noqa: E402

PUBLISHED = ROOT / "bench" / "planner" / "published.toml"
SIXTEEN_BIT = {"bf16", "fp16", "bfloat16", "float16"}

# ---- targets of issue 10 (left-out-source) ---------------------------------------------------
TARGET_DEGREES = 0.70
TARGET_MAE = 0.15
TARGET_WORST = 0.35


# ---- rows ---------------------------------------------------------------------------------------
@dataclass
class Row:
    """One published configuration, parsed once; ``problems`` says what the planner cannot
    express (the row is then still counted)."""

    raw: dict[str, Any]
    id: str
    source: str
    model: ModelFacts | None
    cluster: Cluster | None
    workload: Workload | None
    layout: Layout | None
    precision: str
    measured_tok: float | None  # tokens/s/GPU, measured or converted from TFLOP/s
    measured_how: str
    peak_gib: float | None
    problems: list[str] = field(default_factory=list)  # layout the planner cannot express
    time_problems: list[str] = field(default_factory=list)  # the time model cannot predict it
    memory_problems: list[str] = field(default_factory=list)  # the memory model cannot judge it

    @property
    def sixteen_bit(self) -> bool:
        return self.precision.lower() in SIXTEEN_BIT

    @property
    def predictable(self) -> bool:
        """The time model can predict it at the published layout (and it has a measurement)."""
        return self.layout is not None and not self.time_problems and self.measured_tok is not None

    @property
    def fittable(self) -> bool:
        return self.predictable and self.sixteen_bit

    @property
    def workload_key(self) -> tuple[Any, ...]:
        r = self.raw
        model = r.get("model") or json.dumps(r.get("config"), sort_keys=True)
        return (self.source, model, r.get("gpu"), self.world, r.get("seq"), r.get("gbs"),
                r.get("method", "full"), r.get("precision"))  # fmt: skip

    @property
    def world(self) -> int:
        return int(self.raw.get("nodes", 1)) * int(self.raw.get("gpus_per_node", 8))

    def published_degrees(self) -> tuple[int, int, int, int]:
        """(data parallel x FSDP, TP, PP, CP)."""
        r = self.raw
        tp, pp, cp = int(r.get("tp", 1)), int(r.get("pp", 1)), int(r.get("cp", 1))
        return self.world // (tp * pp * cp), tp, pp, cp


def _megatron_flops_per_token(model: ModelFacts, seq: int, ac: str) -> float:
    """Narayanan et al. 2021, eq. 3: 96*B*s*L*h^2*(1 + s/(6h) + V/(16*L*h)) per iteration with
    full recompute (72 without), i.e. per token 72 or 96 * L*h^2*(...)."""
    h, layers, v = model.hidden_size, model.num_layers, model.vocab_size
    k = 96.0 if ac == "full" else 72.0
    return k * layers * h * h * (1 + seq / (6 * h) + v / (16 * layers * h))


def _six_n_flops_per_token(model: ModelFacts, seq: int, attention: float) -> float:
    return 6.0 * model.flop_params + attention * model.num_layers * model.q_dim * seq


FLOP_FORMULAS: dict[str, Callable[[ModelFacts, int, str], float]] = {
    "megatron": _megatron_flops_per_token,
    "6N+12Lhs": lambda m, s, ac: _six_n_flops_per_token(m, s, 12.0),
    "6N+6Lhs": lambda m, s, ac: _six_n_flops_per_token(m, s, 6.0),
    "6N": lambda m, s, ac: _six_n_flops_per_token(m, s, 0.0),
}


def _measured(
    r: dict[str, Any], model: ModelFacts | None, ac: str
) -> tuple[float | None, str, float | None]:
    m = r.get("measured", r)
    if not isinstance(m, dict):
        m = r
    peak = m.get("peak_gib")
    tok = m.get("tokens_per_s_per_gpu")
    if tok is not None:
        return float(tok), "tokens/s/GPU as published", peak
    if model is None:
        return None, "no model", peak
    formula = str(r.get("flops_formula") or m.get("flops_formula") or "")
    if not formula:
        formula = "megatron" if "megatron" in str(r.get("source", "")).lower() else "6N+12Lhs"
    f = FLOP_FORMULAS.get(formula)
    if f is None:
        return None, f"unknown flops_formula {formula!r}", peak
    per_token = f(model, int(r["seq"]), ac)
    if m.get("tflops_per_gpu") is not None:
        return float(m["tflops_per_gpu"]) * 1e12 / per_token, f"TFLOP/s / {formula}", peak
    if m.get("mfu") is not None and r.get("gpu"):
        try:
            peak_flops = Cluster.of(str(r["gpu"])).gpu.bf16_flops
        except KeyError:
            return None, "unknown GPU", peak
        return float(m["mfu"]) * peak_flops / per_token, f"MFU x peak / {formula}", peak
    return None, "no throughput", peak


def _grad_sync(r: dict[str, Any], fsdp: int) -> GradSync:
    """How the row's framework reduces gradients under accumulation: Megatron (DDP / distributed
    optimizer) and pipelines once per step; ZeRO-3/FSDP frameworks every micro-batch unless the
    row says otherwise (``grad_sync``)."""
    given = r.get("grad_sync")
    if given in ("every", "last"):
        return given  # type: ignore[no-any-return]
    return "last" if fsdp == 1 or int(r.get("pp", 1)) > 1 else "every"


def _tp_overlap(r: dict[str, Any]) -> bool:
    """Whether the run overlapped TP communication with compute (Megatron-Core
    ``--tp-comm-overlap``): the row's ``tp_comm_overlap`` field, else its notes."""
    if "tp_comm_overlap" in r:
        return bool(r["tp_comm_overlap"])
    return "--tp-comm-overlap" in str(r.get("notes", ""))


def parse_row(r: dict[str, Any]) -> Row:
    problems: list[str] = []
    time_problems: list[str] = []
    rid = str(r.get("id", "?"))
    model: ModelFacts | None = None
    try:
        if r.get("config"):
            model = ModelFacts.from_hf_config(dict(r["config"]), name=str(r.get("model") or rid))
        else:
            model = known_model(str(r["model"]))
    except (KeyError, ValueError) as err:
        problems.append(f"model not readable: {err}")
        time_problems.append("model not readable")
    cluster: Cluster | None = None
    try:
        cluster = Cluster.of(
            str(r["gpu"]),
            nodes=int(r.get("nodes", 1)),
            gpus_per_node=int(r.get("gpus_per_node", 8)),
        )
    except (KeyError, ValueError) as err:
        problems.append(f"GPU not in catalog: {err}")
        time_problems.append("GPU not in catalog")
    method = str(r.get("method", "full"))
    ac = str(r.get("ac", "none"))
    if ac not in ("none", "selective", "full"):
        problems.append(f"activation checkpointing {ac!r}")
        time_problems.append(f"ac {ac!r}")
        ac = "full"
    tok, how, peak = _measured(r, model, ac)
    workload: Workload | None = None
    try:
        kw: dict[str, Any] = {
            "seq_len": int(r["seq"]),
            "global_batch_size": int(r["gbs"]),
            "method": method,
            # published runs used their own loss: a fused kernel, or all logits in fp32
            "loss": "fused" if r.get("fused_loss") else "unchunked",
            # and their own kernels, states precision and gradient reduction dtype
            "fused_kernels": tuple(r.get("fused_kernels", ())),
            "precision": "pure-bf16" if r.get("precision") == "bf16-pure" else "mixed",
            "reduce_dtype": str(r.get("reduce_dtype", "fp32")),
        }
        if method == "lora":
            kw["lora_rank"] = int(r.get("lora_rank", 16))
            if r.get("lora_targets"):
                kw["lora_targets"] = tuple(r["lora_targets"])
        workload = Workload(**kw)
    except (KeyError, ValueError) as err:
        problems.append(f"workload: {err}")
        time_problems.append("workload")
    tp, pp, cp = int(r.get("tp", 1)), int(r.get("pp", 1)), int(r.get("cp", 1))
    vp = int(r.get("vp", 1) or 1)
    zero = int(r.get("zero", 3 if int(r.get("fsdp", 1)) > 1 else 0))
    fsdp = int(r.get("fsdp", 1))
    dp = int(r.get("dp", 1))
    mbs = int(r.get("mbs", 1))
    world = int(r.get("nodes", 1)) * int(r.get("gpus_per_node", 8))
    memory_problems: list[str] = []
    if r.get("memory_not_judged"):  # the source does not state what the memory model needs
        memory_problems.append(str(r["memory_not_judged"]))
    sync = _grad_sync(r, 1 if zero in (1, 2) else fsdp)
    if zero in (1, 2):
        # replicated parameters, sharded optimizer (and gradients) over the data-parallel group:
        # the planner's ZeRO-2 over that group (Layout.zero), gradients reduced once per step as
        # Megatron (distributed optimizer) and ZeRO-1 do unless the row says otherwise
        dp, fsdp = 1, dp * fsdp
    if model is not None and model.num_layers % (pp * vp):
        # the planner plans uneven stages as the trainer splits them (memory.stage_layers); a
        # source split its own way (Llama 3: one layer fewer on the first and last stages;
        # BLOOM: the embedding counted as a pipeline layer), so its row is not predicted
        time_problems.append(
            f"{model.num_layers} layers on pp{pp}x{vp}: uneven stages split the source's way"
        )
    if dp * fsdp * tp * pp * cp != world:
        problems.append(f"dp{dp}*fsdp{fsdp}*tp{tp}*pp{pp}*cp{cp} != {world} GPUs")
        time_problems.append("degrees do not cover the GPUs")
    layout: Layout | None = None
    if not time_problems and workload is not None:
        per_rank = workload.global_batch_size // (dp * fsdp)
        ga = max(per_rank // mbs, 1)
        if per_rank % mbs or workload.global_batch_size % (dp * fsdp):
            problems.append("global batch does not split into whole micro-batches")
        sched = "none" if pp == 1 else ("interleaved-1f1b" if vp > 1 else "1f1b")
        layout = Layout(
            dp, fsdp, tp, pp, sched, vp, mbs, ga, ac, False,  # type: ignore[arg-type]
            sync, tp_overlap=tp > 1 and _tp_overlap(r),
            zero=2 if zero in (1, 2) else 3, cp=cp,
        )  # fmt: skip
    if tok is None:
        time_problems.append(f"no tokens/s ({how})")
    return Row(
        raw=r,
        id=rid,
        source=str(r.get("source", "?")),
        model=model,
        cluster=cluster,
        workload=workload,
        layout=layout,
        precision=str(r.get("precision", "bf16")),
        measured_tok=tok,
        measured_how=how,
        peak_gib=peak,
        problems=problems,
        time_problems=time_problems,
        memory_problems=memory_problems + time_problems,
    )


def load_rows(path: Path = PUBLISHED) -> list[Row]:
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    rows = []
    for raw in data.get("row", []):
        try:
            rows.append(parse_row(raw))
        except (KeyError, TypeError, ValueError) as err:  # counted, never dropped
            rows.append(_unreadable(raw, err))
    return rows


def _unreadable(raw: dict[str, Any], err: Exception) -> Row:
    why = f"row not readable: {err!r}"
    return Row(
        raw=raw,
        id=str(raw.get("id", "?")),
        source=str(raw.get("source", "?")),
        model=None,
        cluster=None,
        workload=None,
        layout=None,
        precision=str(raw.get("precision", "bf16")),
        measured_tok=None,
        measured_how=why,
        peak_gib=None,
        problems=[why],
        time_problems=[why],
        memory_problems=[why],
    )


# ---- predictions at the published layout ---------------------------------------------------------
def _parts(row: Row) -> tuple[ModelFacts, Cluster, Workload, Layout]:
    if row.model is None or row.cluster is None or row.workload is None or row.layout is None:
        raise ValueError(f"row {row.id} cannot be evaluated: {row.problems}")
    return row.model, row.cluster, row.workload, row.layout


def predict_tok(row: Row) -> float:
    model, cluster, wl, lay = _parts(row)
    return wl.tokens_per_step / estimate_time(model, cluster, wl, lay).step / cluster.world


def predict_peak(row: Row) -> tuple[float, bool]:
    model, cluster, wl, lay = _parts(row)
    mem = estimate_memory(model, cluster.gpu, wl, lay)
    return mem.peak / GiB, fits(mem, cluster.gpu, cluster.gpus_per_node)


# ---- fitted factors ---------------------------------------------------------------------------
FITTED_ARCHS = ("hopper", "ampere", "blackwell")


# name in the fit -> (calibration.py attribute, search bounds low, high, log scale). A fitted value
# at a bound is reported as such.
SCALARS: dict[str, tuple[str, float, float, bool]] = {
    "half": ("GEMM_HALF_FLOPS", 1e8, 1e14, True),  # FLOPs per layer pass
    "attn": ("ATTENTION_EFFICIENCY_RATIO", 0.1, 2.0, True),
    "elem": ("ELEMENTWISE_BYTES_PER_HIDDEN", 1.0, 2000.0, True),
    "intra": ("COMM_EFFICIENCY_INTRA", 0.05, 1.0, True),
    "pipe": ("PIPELINE_ACTION_OVERHEAD_S", 1e-5, 0.1, True),  # per stage action
}
ETA_BOUNDS = (0.2, 1.0, False)  # fraction of the sustained peak
SWEEPS = 3
GOLDEN_STEPS = 16


@dataclass(frozen=True)
class Factors:
    eta: dict[str, float]  # GEMM_EFFICIENCY_MAX per fitted architecture
    values: dict[str, float]  # the SCALARS

    @classmethod
    def shipped(cls) -> Factors:
        eta = {a: cal.GEMM_EFFICIENCY_MAX[a] for a in FITTED_ARCHS}
        return cls(eta, {k: float(getattr(cal, v[0])) for k, v in SCALARS.items()})

    def as_dict(self) -> dict[str, Any]:
        return {
            "gemm_efficiency_max": dict(self.eta),
            **{SCALARS[k][0].lower(): v for k, v in self.values.items()},
        }

    def with_(self, name: str, value: float) -> Factors:
        if name.startswith("eta:"):
            return Factors({**self.eta, name[4:]: value}, self.values)
        return Factors(self.eta, {**self.values, name: value})

    def get(self, name: str) -> float:
        return self.eta[name[4:]] if name.startswith("eta:") else self.values[name]


def bounds(name: str) -> tuple[float, float, bool]:
    return ETA_BOUNDS if name.startswith("eta:") else SCALARS[name][1:]


@contextlib.contextmanager
def factors(f: Factors) -> Iterator[None]:
    saved_eta = dict(cal.GEMM_EFFICIENCY_MAX)
    saved = {v[0]: getattr(cal, v[0]) for v in SCALARS.values()}
    cal.GEMM_EFFICIENCY_MAX.update(f.eta)
    for k, v in f.values.items():
        setattr(cal, SCALARS[k][0], v)
    try:
        yield
    finally:
        cal.GEMM_EFFICIENCY_MAX.clear()
        cal.GEMM_EFFICIENCY_MAX.update(saved_eta)
        for k, v in saved.items():
            setattr(cal, k, v)


def _arch(row: Row) -> str:
    assert row.cluster is not None
    return row.cluster.gpu.architecture


def sse(rows: list[Row], f: Factors) -> float:
    with factors(f):
        return sum(math.log(predict_tok(r) / r.measured_tok) ** 2 for r in rows if r.measured_tok)


def _golden(fn: Callable[[float], float], lo: float, hi: float, log: bool) -> float:
    a, b = (math.log(lo), math.log(hi)) if log else (lo, hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)

    def val(x: float) -> float:
        return fn(math.exp(x) if log else x)

    fc, fd = val(c), val(d)
    for _ in range(GOLDEN_STEPS):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = val(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = val(d)
    # the ends too: a minimum at a bound must be found (and reported) as such
    lo_x, hi_x = (math.log(lo), math.log(hi)) if log else (lo, hi)
    best = min((fc, c), (fd, d), (val(lo_x), lo_x), (val(hi_x), hi_x))
    return math.exp(best[1]) if log else best[1]


FIXED: dict[str, float] = {}  # factors held at their shipped value instead of fitted


ASSUMED_PROBED = ("COMM_EFFICIENCY_INTER", "LATENCY_INTER_NODE_S")


@contextlib.contextmanager
def _set(attr: str, value: float) -> Iterator[None]:
    saved = getattr(cal, attr)
    setattr(cal, attr, value)
    try:
        yield
    finally:
        setattr(cal, attr, saved)


def fit(rows: list[Row], start: Factors | None = None) -> dict[str, Any]:
    """Least squares on log(predicted / measured tokens/s/GPU) over the fittable rows:
    coordinate descent, a golden-section line search per factor, a few sweeps. An architecture
    without rows keeps Hopper's value (what calibration.py assumes)."""
    rows = [r for r in rows if r.fittable]
    f = start or Factors.shipped()
    archs = sorted({_arch(r) for r in rows} & set(FITTED_ARCHS))
    names = [f"eta:{a}" for a in archs] + [k for k in SCALARS if k not in FIXED]
    for k, v in FIXED.items():
        f = f.with_(k, v)
    for _ in range(SWEEPS):
        for name in names:
            lo, hi, log = bounds(name)
            best = _golden(lambda x, n=name, g=f: sse(rows, g.with_(n, x)), lo, hi, log)
            f = f.with_(name, best)
    for a in FITTED_ARCHS:
        if a not in archs and "hopper" in archs:
            f = f.with_(f"eta:{a}", f.eta["hopper"])
    at_bound = []
    for name in names:
        lo, hi, _log = bounds(name)
        v = f.get(name)
        if v <= lo * 1.001:
            at_bound.append(f"{name} at its lower bound {lo:g}")
        elif v >= hi * 0.999:
            at_bound.append(f"{name} at its upper bound {hi:g}")
    total = sse(rows, f)
    # how well the rows pin each factor: the error with it halved / doubled (others kept)
    profile = {
        n: {"x0.5": math.sqrt(sse(rows, f.with_(n, f.get(n) * 0.5)) / max(len(rows), 1)),
            "x2": math.sqrt(sse(rows, f.with_(n, min(f.get(n) * 2, 1.0) if n.startswith("eta:")
                                               else f.get(n) * 2)) / max(len(rows), 1))}
        for n in names
    }  # fmt: skip
    # the assumed inter-node factors: would the rows pin them? (error with each halved/doubled)
    assumed_profile = {}
    for attr in ASSUMED_PROBED:
        base = float(getattr(cal, attr))
        errs = {}
        for k, scale in (("x0.5", 0.5), ("x1", 1.0), ("x2", 2.0)):
            with factors(f), _set(attr, base * scale):
                errs[k] = math.sqrt(
                    sum(
                        math.log(predict_tok(r) / r.measured_tok) ** 2
                        for r in rows
                        if r.measured_tok
                    )
                    / max(len(rows), 1)
                )
        assumed_profile[attr] = errs
    return {
        "factors": f,
        "fitted": names,
        "assumed_profile": assumed_profile,
        "not_fitted_archs": [a for a in FITTED_ARCHS if a not in archs],
        "at_bound": at_bound,
        "rows": len(rows),
        "rms_log_error": math.sqrt(total / max(len(rows), 1)),
        "rms_log_error_profile": profile,
    }


# ---- the planner's own choice -------------------------------------------------------------
def planned_degrees(row: Row) -> tuple[tuple[int, int, int, int] | None, str]:
    if row.model is None or row.cluster is None or row.workload is None:
        return None, "not planned: " + "; ".join(row.problems)
    try:
        res = plan_parallelism(row.model, row.cluster, row.workload)
    except PlanInfeasible as err:
        return None, f"no plan: {err.message[:160]}"
    p = res.plan
    degrees = (p.data_parallel * p.fsdp, p.tensor_parallel, p.pipeline_parallel)
    return (*degrees, p.context_parallel), res.summary


def evaluate_rows(rows: list[Row], fold: Callable[[Row], Factors]) -> list[dict[str, Any]]:
    """Predictions and the planner's choice for each row, under the factors fold(row) gives."""
    out = []
    for r in rows:
        with factors(fold(r)):
            pred = predict_tok(r) if r.predictable else None
            chosen, summary = planned_degrees(r)
        pub = r.published_degrees()
        out.append(
            {
                "id": r.id,
                "pred_tok_s_gpu": pred,
                "ratio": pred / r.measured_tok if pred and r.measured_tok else None,
                "planned": summary,
                "planned_degrees": chosen,
                "degrees_match": chosen == pub and not r.problems,
            }
        )
    return out


def rankings(rows: list[Row], fold: Callable[[Row], Factors]) -> list[dict[str, Any]]:
    """Pairs of one source's layouts of the same workload: is the faster predicted faster?"""
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for r in rows:
        if r.predictable and r.sixteen_bit:
            groups.setdefault(r.workload_key, []).append(r)
    out = []
    for group in groups.values():
        for a, b in itertools.combinations(group, 2):
            if a.layout == b.layout or a.measured_tok == b.measured_tok:
                continue
            fast, slow = (a, b) if (a.measured_tok or 0) > (b.measured_tok or 0) else (b, a)
            with factors(fold(fast)):
                pf = predict_tok(fast)
            with factors(fold(slow)):
                ps = predict_tok(slow)
            out.append(
                {
                    "source": fast.source,
                    "faster": fast.id,
                    "slower": slow.id,
                    "measured": [fast.measured_tok, slow.measured_tok],
                    "predicted": [pf, ps],
                    "faster_ranked_first": pf > ps,
                }
            )
    return out


def summarize(
    rows: list[Row], ev: list[dict[str, Any]], ranks: list[dict[str, Any]]
) -> dict[str, Any]:
    by_id = {e["id"]: e for e in ev}
    errs = [
        (abs(by_id[r.id]["ratio"] - 1.0), r.id)
        for r in rows
        if r.sixteen_bit and by_id[r.id]["ratio"] is not None
    ]
    sixteen = [r for r in rows if r.sixteen_bit]
    n_deg = sum(e["degrees_match"] for e in ev)
    worst = max(errs) if errs else (float("nan"), "")
    return {
        "tok_s_rows_predicted": len(errs),
        "tok_s_rows_16bit": len(sixteen),
        "tok_s_rows_not_predicted": sorted(r.id for r in sixteen if by_id[r.id]["ratio"] is None),
        "tok_s_mean_abs_error": statistics.fmean(e for e, _ in errs) if errs else None,
        "tok_s_worst_row": {"id": worst[1], "abs_error": worst[0]},
        "tok_s_rows_worse_than_35pct": sorted(i for e, i in errs if e > TARGET_WORST),
        "degrees_agree": n_deg,
        "degrees_rows": len(ev),
        "degrees_agree_fraction": n_deg / max(len(ev), 1),
        "ranking_pairs": len(ranks),
        "ranking_faster_first": sum(x["faster_ranked_first"] for x in ranks),
    }


def targets(s: dict[str, Any], fit_rows: dict[str, Any]) -> dict[str, Any]:
    mae = s["tok_s_mean_abs_error"]
    return {
        "degrees_agree_ge_70pct": s["degrees_agree_fraction"] >= TARGET_DEGREES,
        "every_published_layout_fits": fit_rows["infeasible"] == 0
        and fit_rows["not_evaluated"] == 0,
        "tok_s_mae_le_15pct": mae is not None
        and mae <= TARGET_MAE
        and not s["tok_s_rows_not_predicted"],
        "no_row_worse_than_35pct": not s["tok_s_rows_worse_than_35pct"]
        and not s["tok_s_rows_not_predicted"],
        "faster_of_two_ranked_first": s["ranking_faster_first"] == s["ranking_pairs"],
    }


# ---- planning time and optimality -------------------------------------------------------------
def timing() -> list[dict[str, Any]]:
    out = []
    cases = [
        ("meta-llama/Meta-Llama-3-8B", "H100-80GB"),
        ("meta-llama/Meta-Llama-3-70B", "H100-80GB"),
    ]
    # 8k tokens, and 128k where context parallelism joins the search
    grid = itertools.product(cases, (8192, 131072), (1, 8, 32, 128, 256, 512))
    for (mid, gpu), seq, nodes in grid:
        model = known_model(mid)
        cluster = Cluster.of(gpu, nodes=nodes)
        wl = Workload(seq_len=seq, global_batch_size=2 * cluster.world)
        times, cpu = [], []
        summary = ""
        for _ in range(3):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                summary = plan_parallelism(model, cluster, wl).summary
            except PlanInfeasible:
                summary = "infeasible"
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        res = search(model, cluster, wl)
        out.append(
            {
                "model": mid,
                "gpus": cluster.world,
                "seq": seq,
                "plan": summary,
                "seconds_median": statistics.median(times),
                "seconds_max": max(times),
                "cpu_seconds_median": statistics.median(cpu),
                "cpu_seconds_max": max(cpu),
                "candidates_evaluated": res.evaluated,
            }
        )
    return out


def optimality() -> list[dict[str, Any]]:
    cases: list[tuple[str, str, int, int, int, int, str]] = [
        ("meta-llama/Llama-3.1-8B", "H100-96GB", 1, 8, 8192, 16, "full"),
        ("meta-llama/Meta-Llama-3-70B", "A100-80GB", 8, 8, 8192, 64, "full"),
        ("mosaicml/mpt-13b", "H100-80GB", 1, 8, 4096, 240, "full"),
        ("mistralai/Mistral-7B-v0.3", "H100-80GB", 1, 8, 2048, 64, "full"),
        ("mistralai/Mistral-7B-v0.3", "H100-80GB", 2, 8, 2048, 64, "full"),
        ("meta-llama/Meta-Llama-3-8B", "H100-80GB", 1, 8, 2048, 64, "full"),
        ("meta-llama/Meta-Llama-3-70B", "H100-80GB", 4, 8, 2048, 64, "full"),
        ("meta-llama/Meta-Llama-3-70B", "A100-40GB", 8, 8, 4096, 128, "full"),
        ("meta-llama/Meta-Llama-3-70B", "H100-80GB", 1, 8, 4096, 32, "lora"),
        ("Qwen/Qwen2-7B", "L40S", 2, 4, 4096, 32, "full"),
        ("tiny-llama", "CPU", 1, 4, 256, 8, "full"),
        # long context: context parallelism in the search
        ("meta-llama/Meta-Llama-3-8B", "H100-80GB", 2, 8, 131072, 32, "full"),
        ("meta-llama/Meta-Llama-3-70B", "H100-80GB", 8, 8, 65536, 64, "full"),
    ]
    out = []
    for mid, gpu, nodes, gpn, seq, gbs, method in cases:
        model = known_model(mid)
        cluster = Cluster.of(gpu, nodes=nodes, gpus_per_node=gpn)
        wl = Workload(seq_len=seq, global_batch_size=gbs, method=method)
        pruned = search(model, cluster, wl)
        best = pruned.best
        everything = sweep(model, cluster, wl)
        ranked = rank(everything)
        exhaustive = ranked[0] if ranked else None
        same = (best is None and exhaustive is None) or (
            best is not None and exhaustive is not None and best.layout == exhaustive.layout
        )
        out.append(
            {
                "case": f"{mid} {method} {cluster.describe()} s={seq} gbs={gbs}",
                "search": best.layout.summary() if best else None,
                "exhaustive": exhaustive.layout.summary() if exhaustive else None,
                "same": same,
                "exhaustive_candidates": len(everything),
                "search_evaluated": pruned.evaluated,
            }
        )
    return out


def product_plans() -> list[dict[str, Any]]:
    out = []
    cases = [
        ("mistralai/Mistral-7B-v0.3", 1),
        ("mistralai/Mistral-7B-v0.3", 2),
        ("meta-llama/Meta-Llama-3-8B", 1),
        ("meta-llama/Meta-Llama-3-8B", 2),
        ("meta-llama/Meta-Llama-3-70B", 4),
    ]
    for mid, nodes in cases:
        model = known_model(mid)
        cluster = Cluster.of("H100-80GB", nodes=nodes)
        wl = Workload(seq_len=2048, global_batch_size=64)
        res = plan_parallelism(model, cluster, wl)
        out.append(
            {
                "model": mid,
                "cluster": cluster.describe(),
                "seq": 2048,
                "gbs": 64,
                "summary": res.summary,
                "reason": res.reason,
                "status": res.to_status(),
                "alternatives": [a.summary for a in res.alternatives],
                "table": format_table(res),
            }
        )
    return out


# the CPU features bench/common.py records (not imported: it needs torch, this bench does not)
CPU_FLAGS = {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "fma"}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "pydantic": pydantic.VERSION,
        "cpu_count": os.cpu_count(),
        "gpu": "none used: the planner is pure Python on one CPU core",
    }
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name" and "cpu" not in info:
                info["cpu"] = val.strip()
            if key.strip() == "flags" and "cpu_flags" not in info:
                info["cpu_flags"] = sorted(CPU_FLAGS & set(val.split()))
    return info


def _table(head: list[str], rows: list[list[str]]) -> str:
    w = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) for r in [head, *rows])


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def validate(rows: list[Row], refit: bool) -> dict[str, Any]:
    """In-sample and left-out-source numbers side by side (module docstring)."""
    report: dict[str, Any] = {}
    t0 = time.perf_counter()
    if refit:
        all_fit = fit(rows)
        shipped = all_fit["factors"]
    else:
        all_fit = None
        shipped = Factors.shipped()
    sources = sorted({r.source for r in rows})
    folds: dict[str, dict[str, Any]] = {}
    if refit:
        for src in sources:
            rest = [r for r in rows if r.source != src]
            folds[src] = fit(rest, start=shipped)
    report["fit_seconds"] = time.perf_counter() - t0

    def in_sample(_r: Row) -> Factors:
        return shipped

    def left_out(r: Row) -> Factors:
        f = folds.get(r.source)
        return f["factors"] if f else shipped

    ev_in = evaluate_rows(rows, in_sample)
    rk_in = rankings(rows, in_sample)
    ev_out = evaluate_rows(rows, left_out) if refit else ev_in
    rk_out = rankings(rows, left_out) if refit else rk_in

    fit_rows = {
        "infeasible": 0,
        "not_evaluated": 0,
        "evaluated": 0,
        "infeasible_ids": [],
        "not_evaluated_ids": [],
    }
    per_row = []
    for r, a, b in zip(rows, ev_in, ev_out, strict=True):
        peak = fits_ = None
        if r.layout is not None and not r.memory_problems:
            peak, fits_ = predict_peak(r)
            fit_rows["evaluated"] += 1
            if not fits_:
                fit_rows["infeasible"] += 1
                fit_rows["infeasible_ids"].append(r.id)
        else:
            fit_rows["not_evaluated"] += 1
            fit_rows["not_evaluated_ids"].append(r.id)
        per_row.append(
            {
                "id": r.id,
                "source": r.source,
                "cite": r.raw.get("cite"),
                "model": r.model.name if r.model else r.raw.get("model"),
                "gpus": f"{r.world}x{r.raw.get('gpu')}",
                "seq": r.raw.get("seq"),
                "gbs": r.raw.get("gbs"),
                "method": r.raw.get("method", "full"),
                "precision": r.precision,
                "published_layout": r.layout.summary(r.raw.get("method") == "lora")
                if r.layout
                else None,
                "published_degrees": r.published_degrees(),
                "measured_tok_s_gpu": r.measured_tok,
                "measured_how": r.measured_how,
                "in_sample": a,
                "left_out_source": b,
                "published_peak_gib": r.peak_gib,
                "predicted_peak_gib_at_published": peak,
                "published_layout_fits_in_model": fits_,
                "not_modelled": r.problems,
                "time_not_predicted": r.time_problems,
                "memory_not_judged": r.memory_problems,
            }
        )
    with factors(Factors.shipped()):  # what the planner ships (calibration.py), in-sample
        shipped_err = [abs(predict_tok(r) / r.measured_tok - 1) for r in rows if r.fittable]
    s_in = summarize(rows, ev_in, rk_in)
    s_out = summarize(rows, ev_out, rk_out)
    report["summary"] = {
        "rows": len(rows),
        "sources": sources,
        "rows_16bit": sum(r.sixteen_bit for r in rows),
        "rows_fitted_on": sum(r.fittable for r in rows),
        "rows_with_options_not_modelled": sorted(r.id for r in rows if r.problems),
        "published_layouts_fit": fit_rows,
        "shipped_factors_in_sample": {
            "tok_s_mean_abs_error": statistics.fmean(shipped_err) if shipped_err else None,
            "tok_s_max_abs_error": max(shipped_err, default=None),
            "rows": len(shipped_err),
        },
        "in_sample": s_in,
        "left_out_source": s_out,
        "targets_left_out_source": targets(s_out, fit_rows),
    }
    if all_fit is not None:
        report["fit_all_rows"] = {**all_fit, "factors": all_fit["factors"].as_dict()}
        report["fit_per_left_out_source"] = {
            k: {**v, "factors": v["factors"].as_dict()} for k, v in folds.items()
        }
    report["rows"] = per_row
    report["rankings"] = {"in_sample": rk_in, "left_out_source": rk_out}
    return report


def print_report(report: dict[str, Any]) -> None:
    rows = report["rows"]
    print(
        _table(
            ["id", "source", "published", "pub tok/s", "in", "out", "planner (out)", "deg", "fits"],
            [
                [
                    x["id"],
                    x["source"],
                    (x["published_layout"] or "-")[:44],
                    f"{x['measured_tok_s_gpu']:,.0f}" if x["measured_tok_s_gpu"] else "-",
                    f"{x['in_sample']['ratio']:.2f}" if x["in_sample"]["ratio"] else "-",
                    f"{x['left_out_source']['ratio']:.2f}"
                    if x["left_out_source"]["ratio"]
                    else "-",
                    x["left_out_source"]["planned"][:44],
                    "yes" if x["left_out_source"]["degrees_match"] else "no",
                    {True: "yes", False: "NO", None: "-"}[x["published_layout_fits_in_model"]],
                ]
                for x in rows
            ],
        )
    )
    s = report["summary"]
    ins, out = s["in_sample"], s["left_out_source"]

    def mae(x: dict[str, Any]) -> str:
        return f"{_pct(x['tok_s_mean_abs_error'])} of {x['tok_s_rows_predicted']}"

    def worst(x: dict[str, Any]) -> str:
        return f"{x['tok_s_worst_row']['id']} {_pct(x['tok_s_worst_row']['abs_error'])}"

    def frac(x: dict[str, Any], a: str, b: str) -> str:
        return f"{x[a]}/{x[b]}"

    print()
    print(
        _table(
            ["", "in-sample", "left-out-source"],
            [
                ["tok/s MAE (16-bit rows predicted)", mae(ins), mae(out)],
                ["tok/s worst row", worst(ins), worst(out)],
                [
                    "rows worse than 35%",
                    str(len(ins["tok_s_rows_worse_than_35pct"])),
                    str(len(out["tok_s_rows_worse_than_35pct"])),
                ],
                [
                    "degrees agree",
                    frac(ins, "degrees_agree", "degrees_rows"),
                    frac(out, "degrees_agree", "degrees_rows"),
                ],
                [
                    "faster of two ranked first",
                    frac(ins, "ranking_faster_first", "ranking_pairs"),
                    frac(out, "ranking_faster_first", "ranking_pairs"),
                ],
            ],
        )
    )
    f = s["published_layouts_fit"]
    print(
        f"published layouts the memory model calls infeasible: {f['infeasible']} of "
        f"{f['evaluated']} evaluated {f['infeasible_ids']}; not evaluable: {f['not_evaluated']} "
        f"{f['not_evaluated_ids']}"
    )
    print(
        "16-bit rows without a tok/s prediction:", s["left_out_source"]["tok_s_rows_not_predicted"]
    )
    print("rows with options not modelled:", s["rows_with_options_not_modelled"])
    print("targets (left-out-source):", json.dumps(s["targets_left_out_source"]))
    if "fit_all_rows" in report:
        print("fit on all rows:", json.dumps(report["fit_all_rows"]))
        for src, v in report["fit_per_left_out_source"].items():
            print(f"  without {src}: {json.dumps(v['factors'])} at bound: {v['at_bound']}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fit", action="store_true", help="re-fit the factors and validate by source")
    ap.add_argument("--rows", default=str(PUBLISHED), help="published configurations (TOML)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "planner.json"))
    ap.add_argument("--quick", action="store_true", help="skip timing/optimality/product plans")
    args = ap.parse_args()
    t_start, c_start = time.perf_counter(), time.process_time()
    rows = load_rows(Path(args.rows))
    report: dict[str, Any] = {
        "benchmark": "planner",
        "machine": machine(),
        "rows_file": os.path.relpath(args.rows, ROOT),
        "shipped_factors": {
            **Factors.shipped().as_dict(),
            "gemm_efficiency_max_all": dict(cal.GEMM_EFFICIENCY_MAX),
            "comm_efficiency_intra": cal.COMM_EFFICIENCY_INTRA,
            "fitted": ["gemm_efficiency_max[hopper|ampere|blackwell where rows exist]",
                       "gemm_half_flops", "attention_efficiency_ratio", "comm_efficiency_inter"],
            "assumed": [
                "gemm_efficiency_max of an architecture without rows (= hopper)",
                "comm_efficiency_intra 0.8",
                "latencies",
                "H100-96GB clock factor 0.875",
                "memory overhead 3 GiB",
                "usable memory 0.9",
            ],
        },
    }  # fmt: skip
    report.update(validate(rows, args.fit))
    print_report(report)
    ok = True
    if not args.quick:
        report["planning_time"] = timing()
        report["optimality"] = optimality()
        report["product_plans"] = product_plans()
        print()
        print(
            _table(
                ["model", "GPUs", "seq", "plan", "wall s (med/max)", "CPU s (med/max)",
                 "candidates"],
                [
                    [x["model"], x["gpus"], x["seq"], x["plan"],
                     f"{x['seconds_median']:.3f}/{x['seconds_max']:.3f}",
                     f"{x['cpu_seconds_median']:.3f}/{x['cpu_seconds_max']:.3f}",
                     x["candidates_evaluated"]]
                    for x in report["planning_time"]
                ],
            )
        )  # fmt: skip
        opt = report["optimality"]
        print(f"search == exhaustive sweep optimum: {sum(o['same'] for o in opt)}/{len(opt)}")
        for o in opt:
            if not o["same"]:
                print(f"  DIFF {o['case']}: {o['search']} vs {o['exhaustive']}")
        ok = all(o["same"] for o in opt)
    report["bench_seconds"] = time.perf_counter() - t_start
    report["bench_cpu_seconds"] = time.process_time() - c_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(
        f"wrote {args.out} in {report['bench_seconds']:.1f} s "
        f"({report['bench_cpu_seconds']:.1f} CPU s; the cores are shared)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
