"""The trainer entrypoint: ``python -m finetune_trainer.train --config PATH`` (under torchrun).

Build the :class:`~finetune_trainer.trainer.Trainer` from the config, train, close. Bad input
(a config error) prints one line that says what to do and exits with :data:`EXIT_BAD_INPUT`; a
preempted run exits with :data:`~finetune_trainer.trainer.EXIT_PREEMPTED` once its checkpoint is
saved; any other failure (diverged loss, GPU out of memory, a collective timeout) exits with
:data:`EXIT_FAILED`. Every failure's cause is written in one line to the container's termination
message (:mod:`finetune_trainer.failure`), where the operator reads it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import traceback

import torch.distributed as dist

from finetune_trainer.config import TrainerConfig
from finetune_trainer.distenv import DistEnv
from finetune_trainer.errors import ConfigError
from finetune_trainer.failure import LossDivergedError, classify, write_termination_message
from finetune_trainer.progress import log
from finetune_trainer.trainer import Trainer

EXIT_BAD_INPUT = 2
#: Exit code when training failed (its cause is in the termination message).
EXIT_FAILED = 1


def run(cfg: TrainerConfig, env: DistEnv) -> int:
    trainer = Trainer.build(cfg, env)
    try:
        return trainer.train()
    finally:
        trainer.close()


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
    code = EXIT_FAILED
    try:
        code = run(cfg, env)
    except Exception as exc:  # every cause ends in one line for the operator
        failure = classify(
            exc,
            plan=cfg.plan.summary if cfg.plan else None,
            collective_timeout_s=cfg.resilience.collective_timeout_seconds,
        )
        write_termination_message(failure)
        if not isinstance(exc, ConfigError | LossDivergedError):
            traceback.print_exc()
        if env.rank == 0 or failure.reason != "BadInput":
            print(f"error: {failure.reason}: {failure.message}", file=sys.stderr, flush=True)
        code = EXIT_BAD_INPUT if isinstance(exc, ConfigError) else EXIT_FAILED
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):  # a timed-out group may not tear down
                if code == 0:
                    # every rank done with every collective before any tears down: a rank
                    # that leaves first closes its connections under a peer's pending work,
                    # and gloo aborts that peer's process (exit -6 after a finished run)
                    dist.barrier()
                dist.destroy_process_group()
    log(env.rank, f"finished in {time.perf_counter() - start:.1f}s with exit code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
