"""The trainer entrypoint: ``python -m finetune_trainer.train --config PATH`` (under torchrun).

Order matters: every check that can fail on bad input runs before anything is written
(checkpoints, the model export, the metrics port), and errors print one line that says what to do.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from datasets import Dataset
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import PreTrainedModel

from finetune_trainer import data as data_mod
from finetune_trainer import metrics as metrics_mod
from finetune_trainer.checkpoint import Checkpointer, check_writable, latest
from finetune_trainer.config import TrainerConfig
from finetune_trainer.distenv import DistEnv
from finetune_trainer.errors import ConfigError
from finetune_trainer.lm import CausalLMLoss
from finetune_trainer.loop import Loop, StepResult, lr_lambda, make_optimizer
from finetune_trainer.models import DTYPES, check_model_source, load_model, load_tokenizer
from finetune_trainer.parallelize import (
    apply_activation_checkpointing,
    apply_plan,
    check_plan,
    data_parallel_rank,
    trained_module,
)
from finetune_trainer.planner.hardware import get_gpu
from finetune_trainer.progress import Progress

T = TypeVar("T")
#: Exit code after a SIGTERM (preemption) once the checkpoint is written: 128 + 15.
EXIT_PREEMPTED = 143
EXIT_BAD_INPUT = 2
#: Tokens per micro-batch when no plan says otherwise.
MICRO_BATCH_TOKENS = {"cpu": 4096, "cuda": 16384}


def log(env: DistEnv, text: str) -> None:
    if env.rank == 0:
        print(f"[finetune] {text}", file=sys.stderr, flush=True)


def choose_micro_batch(cfg: TrainerConfig, dp_size: int, device: torch.device) -> int:
    if cfg.plan is not None:
        return cfg.plan.micro_batch_size
    if cfg.parallelism.micro_batch_size:
        return cfg.parallelism.micro_batch_size
    per_rank = cfg.schedule.global_batch_size // dp_size
    budget = MICRO_BATCH_TOKENS.get(device.type, 4096)
    fitting = [
        m
        for m in range(1, per_rank + 1)
        if per_rank % m == 0 and m * cfg.data.max_seq_length <= budget
    ]
    return max(fitting, default=1)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); emulated bf16 is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(dtype: str, device: torch.device, *, sharded: bool) -> torch.dtype | None:
    """The autocast dtype for ``model.dtype``: none for float32, none where FSDP already
    computes in bf16 (sharded on GPU), none on a CPU that would only emulate it."""
    if dtype == "float32" or (device.type == "cuda" and sharded):
        return None
    if device.type == "cpu" and not cpu_has_bf16():
        return None
    return DTYPES[dtype]


def weights_dtype(cfg: TrainerConfig, device: torch.device) -> torch.dtype:
    """fp32 master weights, except a LoRA run's frozen base weights on a GPU computing in bf16:
    they get no gradient and no optimizer state, so an fp32 copy would only double their
    memory (the planner counts 2 bytes each). peft keeps the adapters in fp32."""
    if cfg.method.type == "lora" and device.type == "cuda" and cfg.model.dtype == "bfloat16":
        return torch.bfloat16
    return torch.float32


def preflight(cfg: TrainerConfig, env: DistEnv) -> None:
    """Checks that need no data and no model: they fail before anything starts."""
    gbs = cfg.schedule.global_batch_size
    world, _ = data_parallel_rank(cfg.plan, env.rank, env.world_size)
    if gbs % world:
        lower, higher = gbs // world * world, (gbs // world + 1) * world
        raise ConfigError(
            f"globalBatchSize {gbs} cannot be divided over {world} data-parallel ranks: use a "
            f"multiple of {world} (e.g. {lower or higher} or {higher}), or run on a number of "
            "GPUs that divides it"
        )
    check_plan(cfg.plan, env.world_size, lora=cfg.method.type == "lora")
    check_model_source(cfg.model)
    if cfg.checkpoint.dir:
        check_writable(cfg.checkpoint.dir, "checkpoint")
    check_writable(cfg.output_dir, "output")


def _device(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def rank0_first(env: DistEnv, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 first (so caches fill once), then on the others; a ConfigError on
    rank 0 is raised on every rank instead of leaving them waiting."""
    if not dist.is_initialized() or env.world_size == 1:
        return fn()
    result: T | None = None
    error: list[str | None] = [None]
    if env.rank == 0:
        try:
            result = fn()
        except ConfigError as err:
            error = [str(err)]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise ConfigError(error[0])
    if env.rank != 0:
        result = fn()
    assert result is not None
    return result


def _prepare_data(cfg: TrainerConfig, tok: Any) -> tuple[Dataset, Dataset]:
    token = os.environ.get(cfg.model.token_env) if cfg.model.token_env else None
    seed = cfg.schedule.seed
    train_raw, eval_raw = data_mod.load_raw(cfg.data, seed=seed, token=token)
    procs = data_mod.default_num_proc(cfg.data)
    train = data_mod.prepare(train_raw, cfg.data, tok, num_proc=procs, seed=seed)
    if len(train) == 0:
        raise ConfigError(
            f"no training example of {cfg.data.name_or_path} has a response to learn from "
            "after tokenization: check the column map and the format"
        )
    evaluation = data_mod.prepare(eval_raw, cfg.data, tok, num_proc=procs, seed=seed)
    return train, evaluation


def wrap_lora(cfg: TrainerConfig, model: Any) -> Any:
    if cfg.method.type != "lora":
        return model
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415 - only LoRA runs need peft

    lc = cfg.method.lora
    assert lc is not None
    return get_peft_model(
        model,
        LoraConfig(
            r=lc.r,
            lora_alpha=lc.alpha,
            lora_dropout=lc.dropout,
            target_modules=list(lc.target_modules),
            task_type="CAUSAL_LM",
        ),
    )


def _flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    cfg = getattr(model, "config", None)
    n = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings() if isinstance(model, PreTrainedModel) else None
    if emb is not None and not getattr(cfg, "tie_word_embeddings", False):
        n -= sum(p.numel() for p in emb.parameters())
    layers = getattr(cfg, "num_hidden_layers", 0)
    hidden = getattr(cfg, "hidden_size", 0)
    return 6.0 * n + 6.0 * layers * hidden * seq_len  # causal attention: half of 12*L*h*s


def _peak_flops(cfg: TrainerConfig, device: torch.device, world: int) -> float | None:
    try:
        gpu = "CPU" if device.type == "cpu" else cfg.hardware.gpu_type
        return get_gpu(gpu).peak_flops * world
    except KeyError:
        return None


def _memory_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def export(
    cfg: TrainerConfig, env: DistEnv, module: torch.nn.Module, hf_model: Any, tok: Any
) -> Path:
    """Save the final model with ``save_pretrained`` (atomically: tmp folder, then rename)."""
    pipelined = cfg.plan is not None and cfg.plan.pipeline_parallel > 1
    opts = StateDictOptions(full_state_dict=True, cpu_offload=not pipelined)
    state: dict[str, Any] = dict(get_model_state_dict(module, options=opts))
    if pipelined:
        # Each pipeline rank holds its stages only: gather them all (rank 0 writes the model).
        state = {k: v.cpu() for k, v in state.items()}
        parts: list[dict[str, Any] | None] = [None] * env.world_size
        dist.all_gather_object(parts, state)
        state = {k: v for part in parts if part for k, v in part.items()}
    out = Path(cfg.output_dir)
    if env.rank == 0:
        dtype = DTYPES[cfg.model.dtype]
        state = {k.removeprefix("model."): v for k, v in state.items()}
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        if cfg.method.type == "lora":
            _export_merged_lora(cfg, hf_model, state, tmp, dtype)
        else:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
            hf_model.config.dtype = dtype
            hf_model.save_pretrained(tmp, state_dict=state)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    if dist.is_initialized():
        dist.barrier()
    return out


def _export_merged_lora(
    cfg: TrainerConfig, hf_model: Any, state: dict[str, Any], tmp: Path, dtype: torch.dtype
) -> None:
    """LoRA: merge the adapters into a fresh copy of the base model and save that."""
    fresh = wrap_lora(cfg, load_model(cfg.model, seed=cfg.schedule.seed, dtype=torch.float32))
    fresh.get_base_model().load_state_dict(state)
    merged = fresh.merge_and_unload().to(dtype)
    merged.config.dtype = dtype
    merged.save_pretrained(tmp)


def run(cfg: TrainerConfig, env: DistEnv) -> int:
    preflight(cfg, env)
    device = _device(env)
    if env.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    torch.manual_seed(cfg.schedule.seed)

    tok = rank0_first(env, lambda: load_tokenizer(cfg.model))
    train_ds, eval_ds = rank0_first(env, lambda: _prepare_data(cfg, tok))
    dp_size, dp_rank = data_parallel_rank(cfg.plan, env.rank, env.world_size)
    mbs = choose_micro_batch(cfg, dp_size, device)
    sampler = data_mod.StepSampler(
        num_rows=len(train_ds),
        global_batch_size=cfg.schedule.global_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        micro_batch_size=mbs,
        seed=cfg.schedule.seed,
    )
    total = cfg.schedule.max_steps or (cfg.schedule.epochs or 1) * sampler.steps_per_epoch
    log(
        env,
        f"data: {len(train_ds)} training rows of <= {cfg.data.max_seq_length} tokens "
        f"(packing {'on' if cfg.data.packing else 'off'}), {len(eval_ds)} eval rows; "
        f"{total} steps of {cfg.schedule.global_batch_size} rows = {dp_size} ranks x "
        f"{mbs} micro-batch x {sampler.accumulation} accumulation",
    )

    # Model: fp32 master weights; bf16 compute (FSDP on GPU, autocast) where it is asked for.
    model = load_model(cfg.model, seed=cfg.schedule.seed, dtype=weights_dtype(cfg, device))
    model = wrap_lora(cfg, model)
    hf_model = model.get_base_model() if cfg.method.type == "lora" else model
    if cfg.plan is None:  # with a plan, apply_plan checkpoints as the plan says
        apply_activation_checkpointing(hf_model, cfg.parallelism.activation_checkpointing or "none")
    module: torch.nn.Module = CausalLMLoss(hf_model)
    flops_per_token = _flops_per_token(hf_model, cfg.data.max_seq_length)
    if device.type == "cuda" and not (cfg.plan and cfg.plan.pipeline_parallel > 1):
        module.to(device)
    layout = apply_plan(
        module,
        world_size=env.world_size,
        rank=env.rank,
        device=device,
        plan=cfg.plan,
        hf_model=hf_model,
    )
    module = trained_module(module, layout)
    autocast = autocast_dtype(cfg.model.dtype, device, sharded=env.world_size > 1)

    optim = make_optimizer(module, cfg.optim.learning_rate, cfg.optim.weight_decay, device)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lr_lambda(cfg.optim.lr_scheduler, cfg.optim.warmup_steps, total)
    )
    loop = Loop(
        module,
        optim,
        sched,
        sampler,
        train_ds,
        device,
        pad_id=tok.pad_token_id,
        autocast=autocast,
        max_grad_norm=cfg.optim.max_grad_norm,
        layout=layout,
        seq_len=cfg.data.max_seq_length,
    )

    ckpt = (
        Checkpointer(Path(cfg.checkpoint.dir), cfg.checkpoint.keep_last, env.rank)
        if cfg.checkpoint.dir
        else None
    )
    step = 0
    found = None
    if ckpt is not None and cfg.checkpoint.resume == "auto":
        found = latest(ckpt.root)
        if found is not None:
            state = ckpt.load(found, module, optim, sched)
            step = int(state["step"])
            log(env, f"resumed from {found} at step {step}")

    # Metrics on each node's local rank 0; everything is computed on every rank.
    metrics = metrics_mod.create(torch.__version__, version("transformers"))
    if found is not None:  # the latest checkpoint is the one this run resumed from
        metrics.checkpoint_last_step.set(step)
        metrics.checkpoint_last_save.set(found.stat().st_mtime)
    if env.local_rank == 0:
        try:
            metrics_mod.serve(metrics, cfg.metrics.port)
        except OSError as err:
            raise ConfigError(
                f"cannot serve metrics on port {cfg.metrics.port}: {err}. Free the port or "
                "choose another one for the trainer's metrics"
            ) from err
        log(env, f"metrics on :{metrics.port}/metrics")
    peak = _peak_flops(cfg, device, env.world_size)
    progress = Progress(total, cfg.metrics.log_every_steps, enabled=env.rank == 0)
    journal = Journal(env)

    stop = {"flag": False}

    def on_term(_sig: int, _frame: Any) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_term)
    metrics.progress.set(step / total)
    progress.start(step)
    code = 0
    last_saved = step
    try:
        while step < total:
            result = loop.step(step)
            step = result.step
            _record(metrics, result, env, device, flops_per_token, peak, step / total)
            progress.step(step, result.loss, result.lr, result.tokens / result.seconds)
            journal.write(
                step=step,
                loss=result.loss,
                lr=result.lr,
                grad_norm=result.grad_norm,
                tokens=result.tokens,
                seconds=result.seconds,
            )
            every = cfg.schedule.eval_every_steps
            if every and step % every == 0 and step < total:
                _eval(loop, eval_ds, mbs, progress, step, journal, metrics)
            if _agree(stop["flag"], device):
                progress.message(f"SIGTERM at step {step}: saving a checkpoint and stopping")
                code = EXIT_PREEMPTED
                break
            if ckpt is not None and step % cfg.checkpoint.every_steps == 0 and step < total:
                _save(ckpt, step, module, optim, sched, metrics)
                last_saved = step
        if code == EXIT_PREEMPTED:
            if ckpt is not None and last_saved != step:
                _save(ckpt, step, module, optim, sched, metrics)
            return code
        _eval(loop, eval_ds, mbs, progress, step, journal, metrics)
        if ckpt is not None and last_saved != step:
            _save(ckpt, step, module, optim, sched, metrics)
        out = export(cfg, env, module, hf_model, tok)
        progress.message(f"model saved to {out}")
        return 0
    finally:
        progress.close()
        loop.close()
        metrics.close()


def _agree(flag: bool, device: torch.device) -> bool:
    """Every rank stops at the same step, whichever of them saw the signal."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _save(ckpt: Checkpointer, step: int, module: Any, optim: Any, sched: Any, m: Any) -> None:
    _path, seconds = ckpt.save(step, module, optim, sched, {})
    m.checkpoint_save.observe(seconds)
    m.checkpoint_last_save.set_to_current_time()
    m.checkpoint_last_step.set(step)


def _eval(
    loop: Loop, ds: Dataset, mbs: int, progress: Progress, step: int, journal: Journal, m: Any
) -> None:
    loss = loop.evaluate(ds, mbs)
    if loss is not None:
        m.eval_loss.set(loss)
        progress.message(f"step {step} eval_loss {loss:.4f}")
        journal.write(step=step, eval_loss=loss)


class Journal:
    """Machine-readable step log: JSON lines appended to $FINETUNE_LOG_JSONL (rank 0), if set."""

    def __init__(self, env: DistEnv) -> None:
        path = os.environ.get("FINETUNE_LOG_JSONL")
        self.path = Path(path) if path and env.rank == 0 else None

    def write(self, **fields: float | int) -> None:
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(fields) + "\n")


def _record(
    m: Any,
    r: StepResult,
    env: DistEnv,
    device: torch.device,
    flops_per_token: float,
    peak: float | None,
    progress: float,
) -> None:
    m.loss.set(r.loss)
    m.learning_rate.set(r.lr)
    m.grad_norm.set(r.grad_norm)
    m.tokens.inc(r.tokens)
    m.steps.inc()
    m.step_duration.observe(r.seconds)
    m.dataloader_wait.observe(r.wait_seconds)
    if peak:
        m.mfu.set(min(1.0, flops_per_token * r.tokens / r.seconds / peak))
    m.progress.set(progress)
    mem = torch.tensor([_memory_bytes(device)], device=device)
    if dist.is_initialized() and env.world_size > 1:
        gathered = [torch.zeros_like(mem) for _ in range(env.world_size)]
        dist.all_gather(gathered, mem)
        first = env.node_rank * env.local_world_size
        for rank in range(first, min(first + env.local_world_size, env.world_size)):
            m.memory.labels(str(rank)).set(float(gathered[rank].item()))
    else:
        m.memory.labels(str(env.rank)).set(float(mem.item()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune_trainer.train", description=__doc__)
    parser.add_argument("--config", required=True, help="TrainerConfig JSON file")
    args = parser.parse_args(argv)
    env = DistEnv.from_env()
    try:
        cfg = TrainerConfig.load(args.config)
    except (OSError, ValueError) as err:
        print(f"error: cannot read the trainer config {args.config}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    start = time.perf_counter()
    try:
        code = run(cfg, env)
    except ConfigError as err:
        if env.rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        code = EXIT_BAD_INPUT
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    log(env, f"finished in {time.perf_counter() - start:.1f}s with exit code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
