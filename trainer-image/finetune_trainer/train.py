"""The trainer entrypoint: ``python -m finetune_trainer.train --config PATH`` (under torchrun).

Build the :class:`~finetune_trainer.trainer.Trainer` from the config, train, close. Bad input
(a config error) prints one line that says what to do and exits with :data:`EXIT_BAD_INPUT`; a
preempted run exits with :data:`~finetune_trainer.trainer.EXIT_PREEMPTED` once its checkpoint is
saved.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch.distributed as dist

from finetune_trainer.config import TrainerConfig
from finetune_trainer.distenv import DistEnv
from finetune_trainer.errors import ConfigError
from finetune_trainer.progress import log
from finetune_trainer.trainer import Trainer

EXIT_BAD_INPUT = 2


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
    try:
        code = run(cfg, env)
    except ConfigError as err:
        if env.rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        code = EXIT_BAD_INPUT
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    log(env.rank, f"finished in {time.perf_counter() - start:.1f}s with exit code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
