"""Build the model to train: load it and its tokenizer (from the Hub, a local folder, or a builtin
small architecture), choose its dtypes, and wrap it with LoRA adapters when the method says so.

Builtin models are real architectures (Llama, Mistral, Qwen2) at small sizes with random
initialisation, from the planner's catalog; their tokenizer is the real Mistral-7B-v0.3 tokenizer
that ships inside the ``mistral-common`` package, so everything works offline.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaTokenizerFast,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from finetune_trainer.config import ModelConfig, TrainerConfig
from finetune_trainer.errors import ConfigError
from finetune_trainer.planner.model import TINY_CONFIGS

#: The offline tokenizer: Mistral-7B-v0.3's SentencePiece model, inside mistral-common.
MISTRAL_V3_TOKENIZER = "mistral_instruct_tokenizer_240323.model.v3"

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def builtin_names() -> list[str]:
    return sorted(TINY_CONFIGS)


def check_model_source(cfg: ModelConfig) -> None:
    """Fail early, with what to do, when the model source cannot be opened."""
    if cfg.kind == "builtin" and cfg.name_or_path not in TINY_CONFIGS:
        raise ConfigError(
            f"unknown builtin model {cfg.name_or_path!r}: use one of "
            f"{', '.join('builtin://' + n for n in builtin_names())}, an hf://org/name model "
            "or a file:// or pvc:// folder saved with save_pretrained"
        )
    if cfg.kind == "local":
        path = Path(cfg.name_or_path)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"no model at {path}: the folder must hold config.json and weights saved with "
                "save_pretrained; check the model source path (and that its volume is mounted)"
            )
    if cfg.kind == "hf" and cfg.token_env and not os.environ.get(cfg.token_env):
        raise ConfigError(
            f"the Hub token variable {cfg.token_env} is empty: put the token in the Secret that "
            "spec.model.tokenSecretRef names, or drop tokenSecretRef for a public model"
        )


def _hub_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.token_env and os.environ.get(cfg.token_env):
        kwargs["token"] = os.environ[cfg.token_env]
    return kwargs


def offline_tokenizer_dir() -> Path:
    """A folder holding the mistral-common tokenizer as ``tokenizer.model`` (made once)."""
    import mistral_common  # noqa: PLC0415 - only builtin models need it

    src = Path(mistral_common.__file__).parent / "data" / MISTRAL_V3_TOKENIZER
    if not src.is_file():
        raise ConfigError(
            f"mistral-common has no {MISTRAL_V3_TOKENIZER}: install mistral-common>=1.5 "
            "(pip install 'finetune-operator[trainer]')"
        )
    cache = Path(os.environ.get("FINETUNE_CACHE", Path(tempfile.gettempdir()) / "finetune-cache"))
    folder = cache / "tokenizers" / "mistral-7b-v0.3"
    if not (folder / "tokenizer.model").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"tokenizer.model.{os.getpid()}.tmp"
        shutil.copyfile(src, tmp)
        tmp.replace(folder / "tokenizer.model")
    return folder


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    if cfg.kind == "builtin":
        tok: PreTrainedTokenizerBase = LlamaTokenizerFast.from_pretrained(
            str(offline_tokenizer_dir()), legacy=False, add_bos_token=True, add_eos_token=False
        )
    else:
        try:
            tok = AutoTokenizer.from_pretrained(cfg.name_or_path, **_hub_kwargs(cfg))
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"cannot load the tokenizer of {cfg.name_or_path}: {err}. The model folder or "
                "Hub repository must hold a tokenizer (save it with tokenizer.save_pretrained)"
            ) from err
    if tok.pad_token_id is None:
        # Padding is masked out of the loss and of attention, so any id works; prefer unk/eos.
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def load_model(cfg: ModelConfig, *, seed: int, dtype: torch.dtype) -> PreTrainedModel:
    """The model in ``dtype`` on CPU (the caller moves and shards it)."""
    if cfg.kind == "builtin":
        check_model_source(cfg)
        hf_cfg = dict(TINY_CONFIGS[cfg.name_or_path])
        hf_cfg.pop("torch_dtype", None)
        model_type = hf_cfg.pop("model_type")
        config = AutoConfig.for_model(model_type, **hf_cfg)
        torch.manual_seed(seed)
        model: PreTrainedModel = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, dtype=dtype
        )
        return model
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path, dtype=dtype, **_hub_kwargs(cfg)
        )
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot load the model {cfg.name_or_path}: {err}. Check the source (hf://org/name "
            "needs network access to the Hub, and a token for gated models)"
        ) from err
    return model


# -- dtypes ----------------------------------------------------------------------------------------
def autocast_dtype(dtype: str, device: torch.device, *, sharded: bool) -> torch.dtype | None:
    """The autocast dtype for ``model.dtype``: none for float32, none where FSDP already
    computes in bf16 (sharded on GPU). On a CPU this is what the run asks for; whether the CPU
    is faster with it is measured (:func:`finetune_trainer.precision.choose_cpu_autocast`)."""
    if dtype == "float32" or (device.type == "cuda" and sharded):
        return None
    return DTYPES[dtype]


def weights_dtype(cfg: TrainerConfig, device: torch.device) -> torch.dtype:
    """fp32 master weights, except a LoRA run's frozen base weights on a GPU computing in bf16:
    they get no gradient and no optimizer state, so an fp32 copy would only double their
    memory (the planner counts 2 bytes each). peft keeps the adapters in fp32."""
    if cfg.method.type == "lora" and device.type == "cuda" and cfg.model.dtype == "bfloat16":
        return torch.bfloat16
    return torch.float32


# -- LoRA ------------------------------------------------------------------------------------------
def wrap_lora(cfg: TrainerConfig, model: Any) -> Any:
    """The peft model with LoRA adapters for a ``lora`` run; ``model`` itself otherwise."""
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


def load_trainable(cfg: TrainerConfig, device: torch.device) -> PreTrainedModel:
    """The Hugging Face model this run trains, on CPU: fp32 master weights (see
    :func:`weights_dtype`), with LoRA adapters injected for a ``lora`` run (the returned model
    is then the peft wrapper's base model, holding the adapters)."""
    model = wrap_lora(
        cfg, load_model(cfg.model, seed=cfg.schedule.seed, dtype=weights_dtype(cfg, device))
    )
    if cfg.method.type == "lora":
        base: PreTrainedModel = model.get_base_model()
        return base
    trained: PreTrainedModel = model
    return trained
