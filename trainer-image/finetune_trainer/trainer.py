"""One training run, in torchtitan's shape: :meth:`Trainer.build` from a config, then
:meth:`Trainer.train`, then :meth:`Trainer.close`.

Order matters in :meth:`Trainer.build`: every check that can fail on bad input runs before
anything is written (checkpoints, the model export, the metrics port), and bad input raises a
:class:`ConfigError` whose message says what to do.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers.utils import logging as hf_logging

from finetune_trainer import data
from finetune_trainer.checkpoint import Checkpointer, check_writable, latest
from finetune_trainer.config import DataConfig, TrainerConfig
from finetune_trainer.context import packing_allowed
from finetune_trainer.distenv import DistEnv
from finetune_trainer.distributed import any_rank, from_rank0, init_distributed, rank0_first
from finetune_trainer.errors import ConfigError
from finetune_trainer.export import export
from finetune_trainer.failure import LossDivergedError
from finetune_trainer.lm import CausalLMLoss
from finetune_trainer.loop import Loop, lr_lambda, make_optimizer
from finetune_trainer.model_loading import (
    autocast_dtype,
    check_model_source,
    load_tokenizer,
    load_trainable,
)
from finetune_trainer.parallelize import (
    AppliedPlan,
    apply_activation_checkpointing,
    apply_plan,
    check_plan,
    data_parallel_rank,
    trained_module,
)
from finetune_trainer.precision import choose_cpu_autocast
from finetune_trainer.progress import log
from finetune_trainer.telemetry import Reporter, flops_per_token

#: Exit code after a SIGTERM (preemption) once the checkpoint is written: 128 + 15.
EXIT_PREEMPTED = 143
#: Tokens per micro-batch when no plan says otherwise.
MICRO_BATCH_TOKENS = {"cpu": 4096, "cuda": 16384}


def choose_micro_batch(cfg: TrainerConfig, dp_size: int, device: torch.device) -> int:
    """The plan's micro-batch, else the user's, else the largest that divides the rank's share
    of the global batch within the device's token budget."""
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
    check_plan(cfg.plan, env.world_size)
    check_model_source(cfg.model)
    if cfg.checkpoint.dir:
        check_writable(cfg.checkpoint.dir, "checkpoint")
    check_writable(cfg.output_dir, "output")


def data_config(cfg: TrainerConfig) -> DataConfig:
    """The data section as this plan can train it: under context parallelism documents are not
    packed (ring attention cannot mask their boundaries: finetune_trainer.context)."""
    cp = cfg.plan.context_parallel if cfg.plan is not None else 1
    if cfg.data.packing and not packing_allowed(cp):
        return cfg.data.model_copy(update={"packing": False})
    return cfg.data


def _load_data(cfg: TrainerConfig, env: DistEnv, tok: Any) -> tuple[Dataset, Dataset]:
    token = os.environ.get(cfg.model.token_env) if cfg.model.token_env else None
    wanted = data_config(cfg)
    if wanted.packing != cfg.data.packing:
        log(env.rank, "context parallelism: documents are not packed (one document per row)")
    return data.prepare_splits(
        wanted, tok, seed=cfg.schedule.seed, token=token, say=partial(log, env.rank)
    )


def _sampler(
    cfg: TrainerConfig, env: DistEnv, device: torch.device, train_rows: int
) -> tuple[data.StepSampler, int]:
    """Which rows this rank reads at each step, and the number of steps."""
    dp_size, dp_rank = data_parallel_rank(cfg.plan, env.rank, env.world_size)
    sampler = data.StepSampler(
        num_rows=train_rows,
        global_batch_size=cfg.schedule.global_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        micro_batch_size=choose_micro_batch(cfg, dp_size, device),
        seed=cfg.schedule.seed,
    )
    total = cfg.schedule.max_steps or (cfg.schedule.epochs or 1) * sampler.steps_per_epoch
    return sampler, total


def _parallel_model(
    cfg: TrainerConfig, env: DistEnv, device: torch.device
) -> tuple[nn.Module, nn.Module, AppliedPlan, float]:
    """The Hugging Face model, the module this rank trains (parallelized as planned), the plan
    as applied, and the training FLOPs per token. fp32 master weights; bf16 compute (FSDP on
    GPU, autocast) where it is asked for."""
    hf_model = load_trainable(cfg, device)
    if cfg.plan is None:  # with a plan, apply_plan checkpoints as the plan says
        apply_activation_checkpointing(hf_model, cfg.parallelism.activation_checkpointing or "none")
    module: nn.Module = CausalLMLoss(hf_model)
    flops = flops_per_token(hf_model, cfg.data.max_seq_length)  # before sharding
    pipelined = cfg.plan is not None and cfg.plan.pipeline_parallel > 1
    if device.type == "cuda" and not pipelined:
        module.to(device)
    applied = apply_plan(
        module,
        world_size=env.world_size,
        rank=env.rank,
        device=device,
        plan=cfg.plan,
        hf_model=hf_model,
        compile_layers=cfg.parallelism.compile,
    )
    return hf_model, trained_module(module, applied), applied, flops


def _resume(
    cfg: TrainerConfig, env: DistEnv, module: nn.Module, optim: Any, sched: Any
) -> tuple[Checkpointer | None, tuple[Path, int] | None]:
    """The run's checkpointer, and the checkpoint it resumed from (restored in place) with its
    step, if any."""
    if not cfg.checkpoint.dir:
        return None, None
    ckpt = Checkpointer(Path(cfg.checkpoint.dir), cfg.checkpoint.keep_last, env.rank)
    found = latest(ckpt.root) if cfg.checkpoint.resume == "auto" else None
    if found is None:
        return ckpt, None
    step = int(ckpt.load(found, module, optim, sched)["step"])
    log(env.rank, f"resumed from {found.absolute()} at step {step}")
    return ckpt, (found, step)


@dataclass
class Trainer:
    cfg: TrainerConfig
    env: DistEnv
    device: torch.device
    tok: Any
    eval_ds: Dataset
    micro_batch: int
    total: int
    hf_model: nn.Module
    module: nn.Module
    optim: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    loop: Loop
    ckpt: Checkpointer | None
    report: Reporter
    #: Optimizer steps taken (restored from the checkpoint on resume).
    step: int = 0
    #: Set by SIGTERM (preemption): the run saves a checkpoint and stops.
    stopping: bool = False
    #: Step of the newest complete checkpoint of this run (resumed from or saved), if any.
    saved_step: int | None = None

    @classmethod
    def build(cls, cfg: TrainerConfig, env: DistEnv) -> Trainer:
        """Data, model (parallelized as planned), optimizer, resumed state and metrics."""
        preflight(cfg, env)
        # One display: our progress bar and one line per stage, no library bars.
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        device = init_distributed(env, cfg.resilience.collective_timeout_seconds)
        torch.manual_seed(cfg.schedule.seed)
        tok = rank0_first(env, lambda: load_tokenizer(cfg.model))
        train_ds, eval_ds = rank0_first(env, lambda: _load_data(cfg, env, tok))
        sampler, total = _sampler(cfg, env, device, len(train_ds))
        log(
            env.rank,
            f"data: {len(train_ds)} training rows of <= {cfg.data.max_seq_length} tokens "
            f"(packing {'on' if data_config(cfg).packing else 'off'}), {len(eval_ds)} eval rows; "
            f"{total} steps of {cfg.schedule.global_batch_size} rows = {sampler.dp_size} "
            f"{'rank' if sampler.dp_size == 1 else 'ranks'} "
            f"x {sampler.micro_batch_size} micro-batch x {sampler.accumulation} accumulation",
        )
        hf_model, module, applied, flops = _parallel_model(cfg, env, device)
        optim = make_optimizer(module, cfg.optim.learning_rate, cfg.optim.weight_decay, device)
        sched = torch.optim.lr_scheduler.LambdaLR(
            optim, lr_lambda(cfg.optim.lr_scheduler, cfg.optim.warmup_steps, total)
        )
        autocast = autocast_dtype(cfg.model.dtype, device, sharded=env.world_size > 1)
        if autocast is not None and device.type == "cpu":
            wanted, hidden = autocast, int(getattr(hf_model.config, "hidden_size", 0) or 512)
            choice = from_rank0(lambda: choose_cpu_autocast(wanted, hidden))
            log(env.rank, choice.describe())
            autocast = choice.dtype
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
            parallel=applied,
            seq_len=cfg.data.max_seq_length,
        )
        ckpt, resumed = _resume(cfg, env, module, optim, sched)
        report = Reporter.start(
            cfg, env, device, total=total, flops_per_token=flops, resumed=resumed
        )
        return cls(
            cfg=cfg,
            env=env,
            device=device,
            tok=tok,
            eval_ds=eval_ds,
            micro_batch=sampler.micro_batch_size,
            total=total,
            hf_model=hf_model,
            module=module,
            optim=optim,
            sched=sched,
            loop=loop,
            ckpt=ckpt,
            report=report,
            step=resumed[1] if resumed else 0,
            saved_step=resumed[1] if resumed else None,
        )

    def train(self) -> int:
        """Train to the last step (evaluating and saving checkpoints on the way), evaluate,
        save, export; 0, or :data:`EXIT_PREEMPTED` after a SIGTERM once the checkpoint is saved."""
        signal.signal(signal.SIGTERM, self._on_sigterm)
        last_saved = self.step
        self.report.begin(self.step)
        every_eval = self.cfg.schedule.eval_every_steps
        every_save = self.cfg.checkpoint.every_steps
        bad_since: int | None = None  # first of the current run of non-finite steps
        while self.step < self.total:
            result = self.loop.step(self.step)
            self.step = result.step
            self.report.step(result)
            if not result.updated:
                bad_since = bad_since or self.step
                self.report.message(
                    f"step {self.step}: loss {result.loss}, grad norm {result.grad_norm}: not "
                    "finite, update skipped"
                )
                streak = self.step - bad_since + 1
                if streak >= self.cfg.resilience.nonfinite_steps or self.step == self.total:
                    raise LossDivergedError(
                        self.step, bad_since, result.loss, result.grad_norm, self.saved_step
                    )
                continue  # no evaluation, no checkpoint of a step that went wrong
            bad_since = None
            if every_eval and self.step % every_eval == 0 and self.step < self.total:
                self._evaluate()
            if any_rank(self.stopping, self.device):
                self.report.message(
                    f"SIGTERM at step {self.step}: saving a checkpoint and stopping"
                )
                if last_saved != self.step:
                    self._save()
                return EXIT_PREEMPTED
            if self.step % every_save == 0 and self.step < self.total:
                last_saved = self._save()
        self._evaluate()
        if last_saved != self.step:
            self._save()
        out = export(self.cfg, self.env, self.module, self.hf_model, self.tok)
        self.report.message(f"model saved to {out}")
        return 0

    def close(self) -> None:
        self.report.close()
        self.loop.close()

    def _on_sigterm(self, _sig: int, _frame: Any) -> None:
        self.stopping = True

    def _evaluate(self) -> None:
        self.report.evaluated(self.step, self.loop.evaluate(self.eval_ds, self.micro_batch))

    def _save(self) -> int:
        """A checkpoint of this step, if the run keeps checkpoints; returns the step."""
        if self.ckpt is not None:
            _path, seconds = self.ckpt.save(self.step, self.module, self.optim, self.sched, {})
            self.report.saved(self.step, seconds)
            self.saved_step = self.step
        return self.step
