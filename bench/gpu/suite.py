"""The GPU bench's runs: our trainer under the planner's plan and its two runners-up,
``transformers.Trainer`` (its defaults plus bf16) and the seed-style loop (every sample padded to
the maximum length, no packing), each for a fixed number of steps after warm-up, measured beside
the planner's predictions. ``run.py`` is the entry point (it checks the dependencies first).

Our runs build the training module the way ``finetune_trainer.trainer._parallel_model`` does on
one rank (``wrap_lora``/``weights_dtype`` -> ``CausalLMLoss`` -> ``apply_plan`` ->
``trained_module``, then ``make_optimizer``, ``lr_lambda``, ``StepSampler`` and ``Loop``); the one
difference is that weights are random-initialised from the catalog config directly on the device
(``load_model`` only initialises the builtin tiny models at random, and a 7B model has no reason
to pass through host memory).
"""

from __future__ import annotations

import gc
import importlib.metadata
import math
import os
import re
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from finetune_trainer.config import (
    DataConfig,
    HardwareConfig,
    LoraConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    PlanConfig,
    ScheduleConfig,
    TrainerConfig,
)
from finetune_trainer.data import IGNORE, StepSampler, prepare, rows_at, tokenize
from finetune_trainer.lm import CausalLMLoss
from finetune_trainer.loop import Loop, lr_lambda, make_optimizer
from finetune_trainer.model_loading import autocast_dtype, load_tokenizer, weights_dtype, wrap_lora
from finetune_trainer.parallelize import apply_plan, decoder_layers, trained_module
from finetune_trainer.planner import (
    Cluster,
    GPUSpec,
    ModelFacts,
    PlanInfeasible,
    RankedPlan,
    Workload,
    get_gpu,
    plan_parallelism,
)
from finetune_trainer.planner.cost import model_flops_per_token
from finetune_trainer.planner.hardware import GiB, gpu_of_node_product
from finetune_trainer.planner.model import KNOWN_CONFIGS, TINY_CONFIGS
from finetune_trainer.planner.workload import DEFAULT_LORA_TARGETS
from finetune_trainer.precision import choose_cpu_autocast
from finetune_trainer.stdlib_data import build_jsonl

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # bench/common.py: helpers the benches share
from common import machine, pad_to_max  # noqa: E402

SEED = 0
LR = 2e-5
LORA_R, LORA_ALPHA = 16, 32
#: The GPU type the planner is asked about when the device's name is not in its table.
DEFAULT_GPU = "H100-80GB"
COLUMNS = {"instruction": "instruction", "input": "input", "output": "output"}


@dataclass(frozen=True)
class Case:
    """One model and method: the planner is asked for a single-device plan for it."""

    key: str
    source: str  #: where the shape comes from (a catalog name)
    hf_config: dict[str, Any]
    method: str  #: "full" or "lora"
    seq_len: int
    global_batch_size: int  #: rows of ``seq_len`` per optimizer step (our runs)
    seed_batch: int  #: samples per step of the seed-style loop
    warmup: int
    steps: int


@dataclass(frozen=True)
class Settings:
    device: torch.device
    gpu: GPUSpec
    gpu_guessed: bool
    cases: tuple[Case, ...]
    smoke: bool
    #: TrainingArguments.per_device_train_batch_size (None: the Trainer's default).
    hf_batch: int | None
    #: Docs of the shipped dataset to use (None: all).
    max_docs: int | None
    #: Seconds after which the remaining runs are skipped (recorded as such).
    budget_s: float


def gpu_cases() -> tuple[Case, ...]:
    """A ~1B full fine-tune (Llama-3.2-1B's shape) and a ~7B LoRA one (Mistral-7B-v0.3's, whose
    vocabulary is the shipped tokenizer's), at sequence length 2048."""
    return (
        Case(
            key="llama-3.2-1b-full",
            source="meta-llama/Llama-3.2-1B (planner catalog)",
            hf_config=KNOWN_CONFIGS["meta-llama/Llama-3.2-1B"],
            method="full",
            seq_len=2048,
            global_batch_size=16,
            seed_batch=8,
            warmup=3,
            steps=10,
        ),
        Case(
            key="mistral-7b-v0.3-lora",
            source="mistralai/Mistral-7B-v0.3 (planner catalog)",
            hf_config=KNOWN_CONFIGS["mistralai/Mistral-7B-v0.3"],
            method="lora",
            seq_len=2048,
            global_batch_size=8,
            seed_batch=4,
            warmup=2,
            steps=6,
        ),
    )


def smoke_cases() -> tuple[Case, ...]:
    """The same two kinds of run on the planner's builtin tiny models, short sequences."""
    common = {"seq_len": 128, "global_batch_size": 4, "seed_batch": 4, "warmup": 1, "steps": 2}
    return (
        Case(
            key="tiny-llama-full",
            source="builtin tiny-llama (planner catalog)",
            hf_config=TINY_CONFIGS["tiny-llama"],
            method="full",
            **common,  # type: ignore[arg-type]
        ),
        Case(
            key="tiny-mistral-lora",
            source="builtin tiny-mistral (planner catalog)",
            hf_config=TINY_CONFIGS["tiny-mistral"],
            method="lora",
            **common,  # type: ignore[arg-type]
        ),
    )


def detect_gpu(device: torch.device) -> tuple[GPUSpec, bool]:
    """The planner's entry for this device (CPU for a CPU), and whether it was guessed."""
    if device.type != "cuda":
        return get_gpu("CPU"), False
    name = torch.cuda.get_device_name(device)
    try:
        return get_gpu(name), False
    except KeyError:
        pass
    spec = gpu_of_node_product(re.sub(r"\s+", "-", name.strip()))
    if spec is None and not name.upper().startswith("NVIDIA"):
        spec = gpu_of_node_product("NVIDIA-" + re.sub(r"\s+", "-", name.strip()))
    if spec is not None:
        return spec, False
    return get_gpu(DEFAULT_GPU), True


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# -- data ------------------------------------------------------------------------------------------
@dataclass
class Data:
    tok: Any
    unpacked: Dataset  #: one document per row (the seed loop and transformers.Trainer)
    packed: Dataset  #: rows packed to seq_len (ours)
    mean_doc_tokens: float
    mean_packed_row_tokens: float


def load_data(seq_len: int, max_docs: int | None, num_proc: int | None) -> Data:
    """The project's shipped data: the offline Mistral tokenizer and the stdlib alpaca set."""
    tok = load_tokenizer(ModelConfig(kind="builtin", name_or_path="tiny-mistral"))
    raw = load_dataset("json", data_files=str(build_jsonl()), split="train")
    if max_docs is not None:
        raw = raw.shuffle(seed=SEED).select(range(min(max_docs, len(raw))))

    def cfg(packing: bool) -> DataConfig:
        return DataConfig(
            kind="builtin",
            name_or_path="python-stdlib-alpaca",
            format="alpaca",
            columns=COLUMNS,
            max_seq_length=seq_len,
            packing=packing,
        )

    unpacked = tokenize(raw, cfg(False), tok, num_proc=num_proc)
    packed = prepare(raw, cfg(True), tok, num_proc=num_proc, seed=SEED)
    return Data(
        tok=tok,
        unpacked=unpacked,
        packed=packed,
        mean_doc_tokens=statistics.fmean(len(x) for x in unpacked["input_ids"]),
        mean_packed_row_tokens=statistics.fmean(len(x) for x in packed["input_ids"]),
    )


# -- models ----------------------------------------------------------------------------------------
def facts(case: Case) -> ModelFacts:
    return ModelFacts.from_hf_config(case.hf_config, name=case.key)


def workload(case: Case) -> Workload:
    return Workload(
        seq_len=case.seq_len,
        global_batch_size=case.global_batch_size,
        method=case.method,  # type: ignore[arg-type]
        lora_rank=LORA_R,
        lora_targets=DEFAULT_LORA_TARGETS,
        lora_dropout=0.0,
    )


def plan_config(ranked: RankedPlan) -> PlanConfig:
    """The planner's plan as the trainer reads it (as the operator hands it over)."""
    return PlanConfig(**{name: getattr(ranked.plan, name) for name in PlanConfig.model_fields})


def trainer_config(case: Case, s: Settings, plan: PlanConfig | None) -> TrainerConfig:
    """The trainer's config for this case (what decides dtypes, LoRA and the plan)."""
    lora = (
        LoraConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, target_modules=DEFAULT_LORA_TARGETS)
        if case.method == "lora"
        else None
    )
    return TrainerConfig(
        run_name=f"bench-gpu-{case.key}",
        model=ModelConfig(kind="hf", name_or_path=case.key, dtype="bfloat16"),
        data=DataConfig(
            kind="builtin",
            name_or_path="python-stdlib-alpaca",
            format="alpaca",
            columns=COLUMNS,
            max_seq_length=case.seq_len,
        ),
        method=MethodConfig(type=case.method, lora=lora),  # type: ignore[arg-type]
        optim=OptimConfig(learning_rate=LR, lr_scheduler="cosine", warmup_steps=case.warmup),
        schedule=ScheduleConfig(
            global_batch_size=case.global_batch_size,
            max_steps=case.warmup + case.steps,
            seed=SEED,
        ),
        hardware=HardwareConfig(gpu_type=s.gpu.name, num_nodes=1, procs_per_node=1),
        plan=plan,
        output_dir=tempfile.gettempdir(),
    )


def new_model(case: Case, cfg: TrainerConfig, device: torch.device) -> tuple[Any, Any]:
    """(the model to hand a plain loop: the peft wrapper for LoRA, the model itself otherwise;
    the Hugging Face model our trainer trains), as ``load_trainable`` builds them, but
    random-initialised on ``device``."""
    hf_cfg = dict(case.hf_config)
    hf_cfg.pop("torch_dtype", None)
    config = AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    torch.manual_seed(SEED)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=weights_dtype(cfg, device))
    wrapped = wrap_lora(cfg, model)
    base = wrapped.get_base_model() if cfg.method.type == "lora" else wrapped
    return wrapped, base


# -- measuring -------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def memory(device: torch.device) -> dict[str, int | None]:
    """Peak CUDA memory of this run (null on CPU: there is no per-run peak to read there; the
    process's peak RSS so far is beside it, labelled as such)."""
    cuda = device.type == "cuda"
    return {
        "max_memory_allocated_bytes": int(torch.cuda.max_memory_allocated(device))
        if cuda
        else None,
        "max_memory_reserved_bytes": int(torch.cuda.max_memory_reserved(device)) if cuda else None,
        "process_peak_rss_bytes_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def fixed_steps(
    step: Callable[[int], tuple[int, float]], warmup: int, steps: int, device: torch.device
) -> dict[str, Any]:
    """``warmup`` untimed steps, then ``steps`` timed ones; ``step(i)`` returns (real tokens,
    loss)."""
    for i in range(warmup):
        step(i)
    sync(device)
    start = time.perf_counter()
    tokens, loss = 0, math.nan
    for i in range(warmup, warmup + steps):
        n, loss = step(i)
        tokens += n
    sync(device)
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "last_loss": loss}


def run_ours(case: Case, s: Settings, data: Data, ranked: RankedPlan) -> dict[str, Any]:
    """Our trainer's step under ``ranked``'s plan, built as ``trainer._parallel_model`` and
    ``Trainer.build`` build it on one rank."""
    plan = plan_config(ranked)
    cfg = trainer_config(case, s, plan)
    _, hf_model = new_model(case, cfg, s.device)
    module: torch.nn.Module = CausalLMLoss(hf_model)
    if s.device.type == "cuda":
        module.to(s.device)
    applied = apply_plan(
        module, world_size=1, rank=0, device=s.device, plan=plan, hf_model=hf_model
    )
    module = trained_module(module, applied)
    optim = make_optimizer(module, cfg.optim.learning_rate, cfg.optim.weight_decay, s.device)
    total = case.warmup + case.steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lr_lambda(cfg.optim.lr_scheduler, cfg.optim.warmup_steps, total)
    )
    sampler = StepSampler(
        num_rows=len(data.packed),
        global_batch_size=case.global_batch_size,
        dp_rank=0,
        dp_size=1,
        micro_batch_size=plan.micro_batch_size,
        seed=SEED,
    )
    autocast = ours_autocast(cfg, s.device, hf_model)
    loop = Loop(
        module,
        optim,
        sched,
        sampler,
        data.packed,
        s.device,
        pad_id=data.tok.pad_token_id,
        autocast=autocast,
        max_grad_norm=cfg.optim.max_grad_norm,
        parallel=applied,
        seq_len=case.seq_len,
    )

    def step(i: int) -> tuple[int, float]:
        r = loop.step(i)
        return r.tokens, r.loss

    try:
        out = fixed_steps(step, case.warmup, case.steps, s.device)
    finally:
        loop.close()
    out["autocast"] = str(autocast) if autocast is not None else "none (fp32)"
    out["plan"] = plan.model_dump()
    micro = sampler.micro_batches(0)
    out["applied"] = {  # what the run did with the plan, read back from what it built
        "micro_batches_per_step": len(micro),
        "rows_per_micro_batch": len(micro[0]),
        "checkpointed_layers": sum(
            isinstance(layer.forward, partial) for layer in decoder_layers(hf_model)
        ),
        "layers": len(decoder_layers(hf_model)),
    }
    if plan.cpu_offload:
        out["note"] = "the plan asks for CPU offload, which FSDP applies only over several ranks"
    return out


_CPU_AUTOCAST: dict[int, torch.dtype | None] = {}


def ours_autocast(cfg: TrainerConfig, device: torch.device, hf_model: Any) -> torch.dtype | None:
    """What ``Trainer.build`` computes in: bf16 autocast on one GPU; on a CPU, what measures
    faster at start-up (measured once per width)."""
    wanted = autocast_dtype(cfg.model.dtype, device, sharded=False)
    if wanted is None or device.type != "cpu":
        return wanted
    hidden = int(getattr(hf_model.config, "hidden_size", 0) or 512)
    if hidden not in _CPU_AUTOCAST:
        choice = choose_cpu_autocast(wanted, hidden)
        print(f"  {choice.describe()}", flush=True)
        _CPU_AUTOCAST[hidden] = choice.dtype
    return _CPU_AUTOCAST[hidden]


def run_hf_trainer(case: Case, s: Settings, data: Data) -> dict[str, Any]:
    """``transformers.Trainer`` with its defaults (dynamic padding, no packing) plus bf16 on a
    GPU; tokens are the real (non-pad) tokens of the timed steps."""
    cfg = trainer_config(case, s, None)
    model, _ = new_model(case, cfg, s.device)
    collator = DataCollatorForSeq2Seq(data.tok, padding=True, label_pad_token_id=IGNORE)
    clock: dict[str, Any] = {"tokens": 0, "loss": math.nan}
    warmup, last, device = case.warmup, case.warmup + case.steps, s.device

    class Timed(Trainer):  # type: ignore[misc]
        def training_step(self, model: Any, inputs: Any, *args: Any, **kw: Any) -> Any:
            loss = super().training_step(model, inputs, *args, **kw)
            if self.state.global_step >= warmup:  # the step being taken is a timed one
                clock["tokens"] += int(inputs["attention_mask"].sum())
                clock["loss"] = loss
            return loss

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step in (warmup, last):
                sync(device)
                clock["start" if state.global_step == warmup else "end"] = time.perf_counter()

    extra = {"per_device_train_batch_size": s.hf_batch} if s.hf_batch else {}
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            bf16=device.type == "cuda",
            max_steps=last,
            save_strategy="no",
            report_to=[],
            logging_steps=10**6,
            seed=SEED,
            use_cpu=device.type == "cpu",
            disable_tqdm=True,
            **extra,
        )
        trainer = Timed(
            model=model,
            args=args,
            train_dataset=data.unpacked,
            data_collator=collator,
            callbacks=[Clock()],
        )
        trainer.train()
    loss = clock["loss"]
    return {
        "tokens": clock["tokens"],
        "seconds": clock["end"] - clock["start"],
        "last_loss": float(loss) if loss is not None else math.nan,
        "batch_samples": args.per_device_train_batch_size,
        "autocast": "bf16 (TrainingArguments.bf16)" if device.type == "cuda" else "none (fp32)",
    }


def run_seed_loop(case: Case, s: Settings, data: Data) -> dict[str, Any]:
    """The reference workloads' loop: every sample padded to ``seq_len``, labels = ids with pads
    -100, AdamW, DataLoader(shuffle, drop_last), ``model(..., labels=...)``, backward, step,
    zero_grad; bf16 autocast on a GPU (the tutorials' scripts run bf16 there)."""
    cfg = trainer_config(case, s, None)
    model, _ = new_model(case, cfg, s.device)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    pad = data.tok.pad_token_id
    loader = torch.utils.data.DataLoader(
        range(len(data.unpacked)),
        batch_size=case.seed_batch,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(SEED),
        collate_fn=lambda idx: pad_to_max(rows_at(data.unpacked, list(idx)), pad, case.seq_len),
    )
    batches = _forever(loader)
    cuda = s.device.type == "cuda"

    def step(_i: int) -> tuple[int, float]:
        b = next(batches)
        ids, mask = b["input_ids"].to(s.device), b["attention_mask"].to(s.device)
        labels = ids.masked_fill(mask == 0, IGNORE)
        with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        out.loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        return int(mask.sum()), float(out.loss.detach())

    result = fixed_steps(step, case.warmup, case.steps, s.device)
    result["batch_samples"] = case.seed_batch
    result["autocast"] = "bf16" if cuda else "none (fp32)"
    return result


def _forever(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


# -- one case --------------------------------------------------------------------------------------
def measured(
    name: str,
    fn: Callable[[], dict[str, Any]],
    s: Settings,
    flops_per_token: float,
    started: float,
) -> dict[str, Any]:
    """Run ``fn`` with fresh peak-memory counters; an OOM or error is recorded, not raised."""
    if time.perf_counter() - started > s.budget_s:
        return {"run": name, "status": "skipped", "error": f"time budget {s.budget_s:.0f}s spent"}
    fresh_memory(s.device)
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"run": name}
    try:
        rec.update(fn())
        rec["status"] = "ok"
    except torch.OutOfMemoryError as err:
        rec.update(status="oom", error=str(err).splitlines()[0][:400])
    except Exception as err:
        rec.update(status="error", error=f"{type(err).__name__}: {err}"[:400])
        rec["traceback"] = traceback.format_exc()[-2000:]
    rec["memory"] = memory(s.device)
    rec["wall_seconds"] = time.perf_counter() - t0
    if rec["status"] == "ok":
        tps = rec["tokens"] / rec["seconds"] if rec["seconds"] > 0 else 0.0
        rec["tokens_per_second"] = tps
        rec["mfu"] = tps * flops_per_token / s.gpu.peak_flops
    fresh_memory(s.device)
    return rec


def _predicted(ranked: RankedPlan) -> dict[str, Any]:
    e = ranked.estimate
    return {
        "summary": ranked.plan.summary,
        "peak_memory_bytes": e.peak_memory_bytes,
        "memory_breakdown": e.memory_breakdown,
        "tokens_per_second": e.tokens_per_s,
        "mfu": e.mfu,
        "step_time_s": e.step_time_s,
        "fits": e.fits,
    }


def run_case(case: Case, s: Settings, data: Data, started: float) -> dict[str, Any]:
    """Ask the planner, then run the plan and its two runners-up, HF Trainer and the seed loop."""
    mf = facts(case)
    wl = workload(case)
    flops = model_flops_per_token(mf, case.seq_len, case.method)
    out: dict[str, Any] = {
        "case": case.key,
        "source": case.source,
        "method": case.method,
        "seq_len": case.seq_len,
        "global_batch_size": case.global_batch_size,
        "warmup_steps": case.warmup,
        "timed_steps": case.steps,
        "params": mf.num_params,
        "model_flops_per_token": flops,
        "runs": [],
    }
    cluster = Cluster.of(s.gpu, nodes=1, gpus_per_node=1)
    try:
        result = plan_parallelism(mf, cluster, wl)
    except PlanInfeasible as err:
        out["planner"] = {"infeasible": err.message}
        plans: list[RankedPlan] = []
    else:
        chosen = RankedPlan(plan=result.plan, estimate=result.estimate)
        plans = [chosen, *result.alternatives[:2]]
        out["planner"] = {"chosen": result.summary, "reason": result.reason}
    for rank, ranked in enumerate(plans):
        name = "ours:chosen" if rank == 0 else f"ours:runner-up-{rank}"
        print(f"  {name} ({ranked.plan.summary}) ...", flush=True)
        rec = measured(name, lambda r=ranked: run_ours(case, s, data, r), s, flops, started)
        rec["plan_summary"] = ranked.plan.summary
        rec["predicted"] = _predicted(ranked)
        out["runs"].append(rec)
    for name, fn in (
        ("hf_trainer", lambda: run_hf_trainer(case, s, data)),
        ("seed_loop", lambda: run_seed_loop(case, s, data)),
    ):
        print(f"  {name} ...", flush=True)
        out["runs"].append(measured(name, fn, s, flops, started))
    out["targets"] = targets(out["runs"], full=case.method == "full")
    return out


# -- targets and the table -------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(runs: list[dict[str, Any]], *, full: bool) -> dict[str, Any]:
    """The issue's targets for the chosen plan, as booleans (null where not measurable: a run
    that failed, or memory on a CPU)."""
    by = {r["run"]: r for r in runs}
    ours = by.get("ours:chosen", {})
    tps = ours.get("tokens_per_second")
    pred = ours.get("predicted") or {}
    alloc = (ours.get("memory") or {}).get("max_memory_allocated_bytes")
    mem_err = _ratio(pred.get("peak_memory_bytes"), alloc)
    tps_err = _ratio(pred.get("tokens_per_second"), tps)
    vs_hf = _ratio(tps, by.get("hf_trainer", {}).get("tokens_per_second"))
    vs_seed = _ratio(tps, by.get("seed_loop", {}).get("tokens_per_second"))
    mfu = ours.get("mfu")

    def within(ratio: float | None, tol: float) -> bool | None:
        return None if ratio is None else abs(ratio - 1.0) <= tol

    return {
        "predicted_over_measured_peak_memory": mem_err,
        "predicted_over_measured_tokens_per_second": tps_err,
        "ours_vs_hf_trainer_tokens_per_second": vs_hf,
        "ours_vs_seed_loop_tokens_per_second": vs_seed,
        "mfu": mfu,
        "memory_model_within_10pct": within(mem_err, 0.10),
        "tokens_per_second_within_15pct": within(tps_err, 0.15),
        # The MFU target is the ~1B full fine-tune's.
        "mfu_at_least_45pct": (None if mfu is None else mfu >= 0.45) if full else None,
        "ours_vs_hf_trainer_at_least_1_5x": None if vs_hf is None else vs_hf >= 1.5,
        "ours_vs_seed_loop_at_least_3x": None if vs_seed is None else vs_seed >= 3.0,
    }


def _gib(x: int | None) -> str:
    return "-" if x is None else f"{x / GiB:.2f}"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def table(cases: list[dict[str, Any]]) -> str:
    head = [
        "case",
        "run",
        "plan",
        "status",
        "tok/s",
        "pred tok/s",
        "MFU",
        "alloc GiB",
        "resv GiB",
        "pred GiB",
        "loss",
    ]
    rows = []
    for c in cases:
        for r in c["runs"]:
            pred = r.get("predicted") or {}
            mem = r.get("memory") or {}
            mfu = r.get("mfu")
            rows.append(
                [
                    c["case"],
                    r["run"],
                    r.get("plan_summary", "-"),
                    r["status"],
                    _num(r.get("tokens_per_second"), ",.0f"),
                    _num(pred.get("tokens_per_second"), ",.0f"),
                    "-" if mfu is None else f"{100 * mfu:.1f}%",
                    _gib(mem.get("max_memory_allocated_bytes")),
                    _gib(mem.get("max_memory_reserved_bytes")),
                    _gib(pred.get("peak_memory_bytes")),
                    _num(r.get("last_loss"), ".3f"),
                ]
            )
    w = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(str(x).ljust(w[i]) for i, x in enumerate(r)) for r in [head, *rows])


def libraries() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("transformers", "peft", "datasets", "accelerate", "pydantic"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_all(s: Settings) -> dict[str, Any]:
    started = time.perf_counter()
    num_proc = None if s.smoke else max(1, (os.cpu_count() or 1) // 2)
    by_seq: dict[int, Data] = {}
    cases = []
    for case in s.cases:
        if case.seq_len not in by_seq:
            by_seq[case.seq_len] = load_data(case.seq_len, s.max_docs, num_proc)
        data = by_seq[case.seq_len]
        print(f"{case.key}: {case.method}, seq {case.seq_len}, {s.gpu.name}", flush=True)
        cases.append(run_case(case, s, data, started))
    any_data = next(iter(by_seq.values()))
    return {
        "benchmark": "gpu",
        "mode": "smoke" if s.smoke else "gpu",
        "device": torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else "cpu",
        "planner_gpu_type": s.gpu.name,
        "planner_gpu_type_guessed": s.gpu_guessed,
        "peak_flops": s.gpu.peak_flops,
        "machine": {**machine(s.device), "libraries": libraries()},
        "data": {
            "dataset": "python-stdlib-alpaca",
            "docs": len(any_data.unpacked),
            "mean_doc_tokens": any_data.mean_doc_tokens,
            "mean_packed_row_tokens": any_data.mean_packed_row_tokens,
        },
        "settings": {
            "learning_rate": LR,
            "hf_trainer_batch": s.hf_batch or "TrainingArguments default",
            "budget_seconds": s.budget_s,
        },
        "cases": cases,
        "targets": {c["case"]: c["targets"] for c in cases},
        "elapsed_seconds": time.perf_counter() - started,
    }
