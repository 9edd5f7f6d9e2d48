"""The finetune trainer: a Hugging Face training loop with automatic parallelism.

Importing this package imports no torch (the operator uses ``finetune_trainer.planner`` and
``finetune_trainer.config``); :func:`enable_advanced_parallelization` loads the torch side when
it is called.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["enable_advanced_parallelization"]


def enable_advanced_parallelization(**options: Any) -> None:
    """Make an ordinary single-device training script run planned data/tensor parallelism under
    torchrun: see :mod:`finetune_trainer.advanced` (pipeline parallelism needs the built-in
    trainer loop)."""
    from finetune_trainer.advanced import (  # noqa: PLC0415 - torch only when asked for
        enable_advanced_parallelization as enable,
    )

    enable(**options)
