"""Model facts: the shape numbers the planner needs, read from a Hugging Face config.json.

Parameter counting follows the module structure of the Hugging Face implementations
(LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, MPTForCausalLM, GPT2LMHeadModel):
per decoder layer q/k/v/o projections (GQA: k and v are kv_heads*head_dim wide), a gated
(SwiGLU, 3 matrices) or plain (2 matrices) MLP, and two norms; plus the token embedding, a final
norm and an LM head unless tied. Checked against published totals: Llama-3-8B 8.03B,
Mistral-7B-v0.3 7.25B, Llama-3-70B 70.6B, Qwen2-7B 7.62B (see
tests/unit/planner/test_planner_model.py).
"""

from __future__ import annotations

import copy
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# model_type -> whether the MLP is gated (SwiGLU/GeGLU: gate, up, down)
_GATED = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo"}
# HF PretrainedConfig defaults tie_word_embeddings=True; these architectures override it to False.
_UNTIED_BY_DEFAULT = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gpt_neox", "phi3", "olmo"}

# config.json keys that count experts: a model with more than one is a mixture of experts
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


# config.json keys the planner cannot do without, per family (the others have defaults)
_REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "mpt": ("d_model", "n_layers", "n_heads", "vocab_size"),
    "gpt2": ("n_embd", "n_layer", "n_head", "vocab_size"),
    "llama": ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"),
}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class ModelConfigError(ValueError):
    """A config.json the planner cannot read: what is missing or unsupported, in words."""


class ModelFacts(BaseModel):
    """Architecture numbers of a decoder-only transformer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "model"
    model_type: str = "llama"
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    tie_word_embeddings: bool = False
    gated_mlp: bool = True
    qkv_bias: bool = False

    @model_validator(mode="after")
    def _check(self) -> ModelFacts:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        return self

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: str | None = None) -> ModelFacts:
        """Parse a Hugging Face config.json dict (Llama/Mistral/Qwen2/MPT/GPT-2/GPT-NeoX keys).

        Raises :class:`ModelConfigError` (a ValueError) saying what is missing or unsupported.
        """
        mt = str(cfg.get("model_type", "llama")).lower()
        if cfg.get("is_encoder_decoder"):
            raise ModelConfigError(
                f"model_type {mt!r} is an encoder-decoder model; the planner and trainer "
                "fine-tune decoder-only causal language models"
            )
        experts = next((k for k in _MOE_KEYS if _count(cfg.get(k)) > 1), None)
        if experts:
            raise ModelConfigError(
                f"model_type {mt!r} is a mixture of experts ({experts}={cfg[experts]}); the "
                "planner and trainer fine-tune dense decoder models only"
            )
        required = _REQUIRED_KEYS.get(mt, _REQUIRED_KEYS["llama"])
        missing = [key for key in required if cfg.get(key) is None]
        if missing:
            raise ModelConfigError(
                f"the config.json of a {mt!r} model has no {', '.join(map(repr, missing))}: the "
                f"planner reads the model's shape from {', '.join(required)}"
            )
        try:
            return cls._parse(cfg, mt, name)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, KeyError):
                what = f"it has no {exc.args[0]!r}"
            elif isinstance(exc, ValidationError):
                what = "; ".join(
                    f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
                )
            else:
                what = str(exc)
            raise ModelConfigError(
                f"cannot read the shape of a {mt!r} model from its config.json: {what}"
            ) from None

    @classmethod
    def _parse(cls, cfg: dict[str, Any], mt: str, name: str | None) -> ModelFacts:
        label = name or str(cfg.get("_name_or_path") or mt)
        if mt == "mpt":
            h = int(cfg["d_model"])
            heads = int(cfg["n_heads"])
            attn = cfg.get("attn_config") or {}
            kv = (
                int(attn.get("kv_n_heads", heads))
                if attn.get("attn_type") == "grouped_query_attention"
                else heads
            )
            ffn = cfg.get("ffn_config") or {}
            f = int(ffn.get("ffn_hidden_size") or int(cfg.get("expansion_ratio", 4) * h))
            return cls(
                name=label,
                model_type=mt,
                num_layers=int(cfg["n_layers"]),
                hidden_size=h,
                num_heads=heads,
                num_kv_heads=kv,
                head_dim=h // heads,
                intermediate_size=f,
                vocab_size=int(cfg["vocab_size"]),
                tie_word_embeddings=True,  # MPT reuses wte for the output projection
                gated_mlp=False,
                qkv_bias=not bool(cfg.get("no_bias", True)),
            )
        if mt == "gpt2":
            h = int(cfg["n_embd"])
            heads = int(cfg["n_head"])
            return cls(
                name=label,
                model_type=mt,
                num_layers=int(cfg["n_layer"]),
                hidden_size=h,
                num_heads=heads,
                num_kv_heads=heads,
                head_dim=h // heads,
                intermediate_size=int(cfg.get("n_inner") or 4 * h),
                vocab_size=int(cfg["vocab_size"]),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                gated_mlp=False,
                qkv_bias=True,
            )
        h = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or h // heads)
        act = str(cfg.get("hidden_act", "silu"))
        gated = mt in _GATED or (
            mt not in {"gpt_neox", "gpt2", "mpt"} and act in {"silu", "swiglu"}
        )
        return cls(
            name=label,
            model_type=mt,
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=h,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            intermediate_size=int(cfg.get("intermediate_size") or 4 * h),
            vocab_size=int(cfg["vocab_size"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", mt not in _UNTIED_BY_DEFAULT)),
            gated_mlp=gated,
            qkv_bias=bool(cfg.get("attention_bias", mt == "qwen2")),
        )

    # ---- derived shapes -----------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @cached_property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every linear layer in one decoder layer, by HF Llama module name."""
        h, f = self.hidden_size, self.intermediate_size
        shapes = {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "up_proj": (h, f),
            "down_proj": (f, h),
        }
        if self.gated_mlp:
            shapes["gate_proj"] = (h, f)
        return shapes

    @cached_property
    def params_per_layer(self) -> int:
        weights = sum(i * o for i, o in self.linear_shapes.values())
        bias = (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        norms = 2 * self.hidden_size
        return weights + bias + norms

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """LM head weights stored separately (0 when tied to the embedding)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @cached_property
    def num_params(self) -> int:
        return (
            self.embedding_params
            + self.num_layers * self.params_per_layer
            + self.hidden_size
            + self.head_params
        )

    @cached_property
    def flop_params(self) -> int:
        """N of 6N: every weight used in a matmul (decoder layers + LM head), not the lookup.

        Kaplan et al. 2020 count non-embedding parameters; torchtitan's MFU also counts the
        output projection, which is a real GEMM of V*h per token, so it is included here.
        """
        return self.num_layers * self.params_per_layer + self.vocab_size * self.hidden_size

    def lora_params_per_layer(self, rank: int, targets: tuple[str, ...]) -> int:
        """Trainable LoRA parameters of one layer: r*(d_in + d_out) per adapted matrix
        (Hu et al. 2021, "LoRA", Sec. 4)."""
        total = 0
        for name in resolve_lora_targets(self, targets):
            i, o = self.linear_shapes[name]
            total += rank * (i + o)
        return total

    def describe(self) -> str:
        return f"{self.name} ({self.num_params / 1e9:.2f}B params)"


_TARGET_ALIASES: dict[str, tuple[str, ...]] = {
    "wqkv": ("q_proj", "k_proj", "v_proj"),
    "c_attn": ("q_proj", "k_proj", "v_proj"),
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "query_key_value": ("q_proj", "k_proj", "v_proj"),
    "out_proj": ("o_proj",),
    "dense": ("o_proj",),
    "wq": ("q_proj",),
    "wk": ("k_proj",),
    "wv": ("v_proj",),
    "wo": ("o_proj",),
    "w1": ("gate_proj",),
    "w3": ("up_proj",),
    "w2": ("down_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "fc1": ("up_proj",),
    "fc2": ("down_proj",),
    "c_fc": ("up_proj",),
    "dense_h_to_4h": ("up_proj",),
    "dense_4h_to_h": ("down_proj",),
}


def resolve_lora_targets(model: ModelFacts, targets: tuple[str, ...]) -> list[str]:
    """Map peft target_modules names to this model's linear layers ('all-linear' = all)."""
    names = model.linear_shapes
    if not targets or any(t.lower() in {"all-linear", "all_linear", "all"} for t in targets):
        return list(names)
    out: list[str] = []
    for t in targets:
        key = t.lower()
        for alias in _TARGET_ALIASES.get(key, (key,)):
            cand = "up_proj" if alias == "gate_proj" and "gate_proj" not in names else alias
            if cand in names and cand not in out:
                out.append(cand)
    return out


# ---- catalog of well-known models (values copied from their config.json on the hub) ------


def _llama_like(
    model_type: str, arch: str, shape: tuple[int, int, int, int, int, int], tied: bool, **extra: Any
) -> dict[str, Any]:
    """shape = (hidden, layers, heads, kv heads, FFN width, vocab)."""
    hidden, layers, heads, kv, ffn, vocab = shape
    cfg: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [arch],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": ffn,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }
    cfg.update(extra)
    return cfg


_LLAMA3_8B = _llama_like(
    "llama",
    "LlamaForCausalLM",
    (4096, 32, 32, 8, 14336, 128256),
    False,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    bos_token_id=128000,
    eos_token_id=128001,
)
_LLAMA31_8B = {
    **_LLAMA3_8B,
    "max_position_embeddings": 131072,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}
_LLAMA3_70B = {
    **_LLAMA3_8B,
    "hidden_size": 8192,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "intermediate_size": 28672,
}
_MISTRAL_V03 = _llama_like(
    "mistral",
    "MistralForCausalLM",
    (4096, 32, 32, 8, 14336, 32768),
    False,
    rope_theta=1000000.0,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    sliding_window=None,
    head_dim=128,
    bos_token_id=1,
    eos_token_id=2,
)
_MISTRAL_V01 = {
    **_MISTRAL_V03,
    "vocab_size": 32000,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
}
_QWEN2 = {
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}

_TINY_COMMON: dict[str, Any] = {
    # Small enough to train on CPU in the trainer tests, realistic in structure: GQA (8 heads,
    # 4 kv heads, head_dim 32), SwiGLU width ~ 8/3*h rounded to a multiple of 16 (688), and the
    # Mistral v3 tokenizer's vocabulary (32,768) so the real tokenizer can drive them.
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "intermediate_size": 688,
    "vocab_size": 32768,
    "max_position_embeddings": 4096,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-llama": {
        **_TINY_COMMON,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "tie_word_embeddings": False,
    },
    "tiny-mistral": {
        **_TINY_COMMON,
        "model_type": "mistral",
        "architectures": ["MistralForCausalLM"],
        "tie_word_embeddings": False,
        "sliding_window": None,
        "head_dim": 32,
    },
    "tiny-qwen2": {
        **_TINY_COMMON,
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "tie_word_embeddings": True,
        "use_sliding_window": False,
    },
}

KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "mistralai/Mistral-7B-v0.3": _MISTRAL_V03,
    "mistralai/Mistral-7B-Instruct-v0.3": _MISTRAL_V03,
    "mistralai/Mistral-7B-v0.1": _MISTRAL_V01,
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": {**_LLAMA3_8B, "eos_token_id": 128009},
    "meta-llama/Llama-3.1-8B": _LLAMA31_8B,
    "meta-llama/Meta-Llama-3.1-8B": _LLAMA31_8B,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA31_8B,
    "meta-llama/Meta-Llama-3-70B": _LLAMA3_70B,
    "meta-llama/Meta-Llama-3-70B-Instruct": _LLAMA3_70B,
    "meta-llama/Llama-3.1-70B": {**_LLAMA3_70B, "rope_scaling": _LLAMA31_8B["rope_scaling"]},
    "meta-llama/Llama-3.3-70B-Instruct": {
        **_LLAMA3_70B,
        "rope_scaling": _LLAMA31_8B["rope_scaling"],
    },
    "meta-llama/Llama-3.2-1B": _llama_like(
        "llama",
        "LlamaForCausalLM",
        (2048, 16, 32, 8, 8192, 128256),
        True,
        head_dim=64,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
    ),
    "meta-llama/Llama-2-7b-hf": _llama_like(
        "llama",
        "LlamaForCausalLM",
        (4096, 32, 32, 32, 11008, 32000),
        False,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "Qwen/Qwen2-0.5B": _llama_like(
        "qwen2",
        "Qwen2ForCausalLM",
        (896, 24, 14, 2, 4864, 151936),
        True,
        max_position_embeddings=131072,
        **_QWEN2,
    ),
    "Qwen/Qwen2-1.5B": _llama_like(
        "qwen2",
        "Qwen2ForCausalLM",
        (1536, 28, 12, 2, 8960, 151936),
        True,
        max_position_embeddings=131072,
        **_QWEN2,
    ),
    "Qwen/Qwen2-7B": _llama_like(
        "qwen2",
        "Qwen2ForCausalLM",
        (3584, 28, 28, 4, 18944, 152064),
        False,
        max_position_embeddings=131072,
        **_QWEN2,
    ),
    "Qwen/Qwen2-72B": _llama_like(
        "qwen2",
        "Qwen2ForCausalLM",
        (8192, 80, 64, 8, 29568, 152064),
        False,
        max_position_embeddings=131072,
        **_QWEN2,
    ),
    # MPT: mosaicml/mpt-7b config.json; mpt-13b is llm-foundry's benchmark yaml shape
    # (scripts/train/yamls/pretrain/mpt-13b.yaml: d_model 5120, 40 layers, 40 heads); not on
    # the hub.
    "mosaicml/mpt-7b": {
        "model_type": "mpt",
        "architectures": ["MPTForCausalLM"],
        "d_model": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "expansion_ratio": 4,
        "vocab_size": 50432,
        "max_seq_len": 2048,
        "no_bias": True,
    },
    "mosaicml/mpt-13b": {
        "model_type": "mpt",
        "architectures": ["MPTForCausalLM"],
        "d_model": 5120,
        "n_layers": 40,
        "n_heads": 40,
        "expansion_ratio": 4,
        "vocab_size": 50368,
        "max_seq_len": 2048,
        "no_bias": True,
    },
    **TINY_CONFIGS,
}


def _normalize(model_id: str) -> str:
    s = model_id.strip()
    for prefix in ("hf://", "huggingface://", "https://huggingface.co/"):
        if s.lower().startswith(prefix):
            s = s[len(prefix) :]
    s = s.split("@", 1)[0].rstrip("/")
    return s.lower()


_INDEX = {_normalize(k): k for k in KNOWN_CONFIGS}


def hf_config(model_id: str) -> dict[str, Any]:
    """A copy of the catalog's HF config dict (usable as AutoConfig.for_model(**cfg))."""
    key = _INDEX.get(_normalize(model_id))
    if key is None:
        raise KeyError(f"model {model_id!r} is not in the offline catalog")
    return copy.deepcopy(KNOWN_CONFIGS[key])


def is_known_model(model_id: str) -> bool:
    return _normalize(model_id) in _INDEX


def known_model(model_id: str) -> ModelFacts:
    """ModelFacts for a catalog model id (accepts 'hf://org/name', case-insensitive)."""
    key = _INDEX.get(_normalize(model_id))
    if key is None:
        raise KeyError(f"model {model_id!r} is not in the offline catalog; read its config.json")
    return ModelFacts.from_hf_config(KNOWN_CONFIGS[key], name=key)
