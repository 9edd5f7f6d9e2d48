"""finetune-operator: fine-tune LLMs on Kubernetes from one FineTuneJob."""

__version__ = "0.1.0"
