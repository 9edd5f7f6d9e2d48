"""The finetune trainer: a Hugging Face training loop with automatic parallelism."""

__version__ = "0.1.0"
