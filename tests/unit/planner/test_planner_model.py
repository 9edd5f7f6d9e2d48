"""Model facts from HF configs, the offline catalog and parameter counts."""

import pytest

from finetune_trainer.planner import (
    TINY_CONFIGS,
    ModelFacts,
    hf_config,
    is_known_model,
    known_model,
)


@pytest.mark.parametrize(
    ("model_id", "params"),
    [
        ("meta-llama/Meta-Llama-3-8B", 8_030_261_248),  # published exact count
        ("meta-llama/Llama-3.1-8B", 8_030_261_248),
        ("mistralai/Mistral-7B-v0.3", 7_248_023_552),
        ("meta-llama/Meta-Llama-3-70B", 70_553_706_496),
        ("meta-llama/Llama-2-7b-hf", 6_738_415_616),
        ("Qwen/Qwen2-7B", 7_615_616_512),
        ("Qwen/Qwen2-0.5B", 494_032_768),
        ("meta-llama/Llama-3.2-1B", 1_235_814_400),
    ],
)
def test_param_counts_match_published(model_id: str, params: int) -> None:
    assert known_model(model_id).num_params == params


def test_mpt_shapes() -> None:
    m = known_model("mosaicml/mpt-7b")
    assert (m.num_layers, m.hidden_size, m.intermediate_size) == (32, 4096, 16384)
    assert not m.gated_mlp
    assert m.tie_word_embeddings
    assert m.num_params == pytest.approx(6.65e9, rel=0.01)
    assert known_model("mosaicml/mpt-13b").num_params == pytest.approx(12.8e9, rel=0.02)


@pytest.mark.parametrize(
    "source",
    [
        "hf://mistralai/Mistral-7B-v0.3",
        "MISTRALAI/mistral-7b-v0.3",
        "mistralai/Mistral-7B-v0.3@main",
    ],
)
def test_lookup_normalises(source: str) -> None:
    assert is_known_model(source)
    assert known_model(source).vocab_size == 32768


def test_unknown_model() -> None:
    assert not is_known_model("org/unknown")
    with pytest.raises(KeyError):
        known_model("org/unknown")


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_models(name: str) -> None:
    cfg = hf_config(name)
    assert cfg["model_type"] in {"llama", "mistral", "qwen2"}
    m = ModelFacts.from_hf_config(cfg, name=name)
    assert (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads) == (256, 4, 8, 4)
    assert m.vocab_size == 32768
    assert m.head_dim == 32
    assert m.intermediate_size == 688
    cfg["hidden_size"] = 1  # a copy: the catalog is not changed
    assert hf_config(name)["hidden_size"] == 256


def test_parse_hf_config_defaults() -> None:
    m = ModelFacts.from_hf_config(
        {
            "model_type": "llama",
            "hidden_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 8,
            "intermediate_size": 1024,
            "vocab_size": 1000,
        }
    )
    assert m.num_kv_heads == 8
    assert m.head_dim == 64
    assert not m.tie_word_embeddings
    # per layer: q,k,v,o 4*512^2 + gate/up/down 3*512*1024 + 2 norms
    layer = 4 * 512 * 512 + 3 * 512 * 1024 + 2 * 512
    assert m.params_per_layer == layer
    assert m.num_params == 1000 * 512 * 2 + 2 * layer + 512


def test_lora_params_by_hand() -> None:
    m = known_model("meta-llama/Meta-Llama-3-8B")
    # r * (d_in + d_out): q (4096+4096), v (4096+1024)
    assert m.lora_params_per_layer(16, ("q_proj", "v_proj")) == 16 * (8192 + 5120)
    everything = m.lora_params_per_layer(8, ("all-linear",))
    assert everything == 8 * (8192 + 5120 * 2 + 8192 + 3 * (4096 + 14336))


def test_gqa_must_divide() -> None:
    with pytest.raises(ValueError, match="kv"):
        ModelFacts(
            num_layers=2,
            hidden_size=64,
            num_heads=6,
            num_kv_heads=4,
            head_dim=16,
            intermediate_size=128,
            vocab_size=100,
        )
