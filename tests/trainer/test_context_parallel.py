"""Context parallelism as far as a CPU can run it (finetune_trainer.context).

torch's ring attention (``context_parallel``) dispatches CUDA attention kernels only, so the
split itself runs on GPUs alone (the trainer refuses it on CPU, tested below). What the trainer
adds around it runs anywhere and is tested here for real: the targets shifted before the split,
the padding to 2 x cp equal chunks, torch's split of those buffers into each rank's balanced
chunks, the mask-free causal attention the model switches to, the loss on pre-shifted targets,
the mesh (FSDP over fsdp x cp; cp ranks read the same rows) and packing turned off.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402
from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: E402
from transformers import AutoModelForCausalLM, MistralConfig  # noqa: E402

from conftest import SMALL_MISTRAL, trainer_config  # noqa: E402
from finetune_trainer.config import PlanConfig, TrainerConfig  # noqa: E402
from finetune_trainer.context import (  # noqa: E402
    sequence_split,
    split_ready,
    use_ring_attention,
)
from finetune_trainer.data import IGNORE  # noqa: E402
from finetune_trainer.errors import ConfigError  # noqa: E402
from finetune_trainer.lm import CausalLMLoss  # noqa: E402
from finetune_trainer.parallelize import (  # noqa: E402
    build_mesh,
    check_plan,
    data_parallel_rank,
    shard_mesh,
)
from finetune_trainer.trainer import data_config  # noqa: E402


def _plan(**degrees: int) -> PlanConfig:
    base = {
        "data_parallel": 1,
        "fsdp": 1,
        "tensor_parallel": 1,
        "context_parallel": 1,
        "pipeline_parallel": 1,
        "micro_batch_size": 1,
        "gradient_accumulation": 1,
    }
    return PlanConfig(**{**base, **degrees})


def _batch(lengths: list[int], width: int, vocab: int = 500) -> dict[str, Any]:
    """Right-padded rows (pad 0, no target), prompt positions without a target."""
    g = torch.Generator().manual_seed(3)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full((len(lengths), width), IGNORE)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(3, vocab, (n,), generator=g)
        labels[row, 2:n] = ids[row, 2:n]  # the first two tokens are the prompt
    pos = torch.arange(width).expand(len(lengths), width).clone()
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


def test_targets_are_shifted_before_the_sequence_is_padded_to_equal_chunks() -> None:
    b = _batch([7, 5], width=7)
    part = split_ready(b, context_parallel=2, pad_id=0)
    assert part["input_ids"].shape == (2, 8)  # 7 -> a multiple of 2 x cp = 4
    # position i's target is the token at i + 1; the last real position and the pad have none
    assert torch.equal(part["targets"][:, :6], b["labels"][:, 1:])
    assert (part["targets"][:, 6:] == IGNORE).all()
    assert torch.equal(part["input_ids"][:, :7], b["input_ids"])
    assert (part["input_ids"][:, 7] == 0).all()
    assert torch.equal(part["position_ids"][0], torch.arange(8))  # positions count on
    # already a multiple: nothing padded
    assert split_ready(_batch([8], width=8), 2, 0)["input_ids"].shape == (1, 8)


def test_each_rank_trains_its_balanced_chunks_with_their_own_targets() -> None:
    """torch's split as the loop applies it (fake process group of 2; the split of the buffers
    needs no collective): rank r holds chunks r and 2cp-1-r of the padded sequence, each
    position with its own position id and its next token as target; together the ranks cover
    every position once."""
    ids = torch.arange(10, 17).view(1, 7)  # 7 tokens: padded to 8 = 2 x 2 x cp
    batch = {"input_ids": ids, "position_ids": torch.arange(7).view(1, 7), "labels": ids.clone()}
    seen: dict[int, tuple[int, int]] = {}
    for rank in (0, 1):
        dist.init_process_group("fake", rank=rank, world_size=2, store=FakeStore())
        try:
            mesh = build_mesh(torch.device("cpu"), _plan(context_parallel=2), 2)
            part = split_ready(batch, context_parallel=2, pad_id=0)
            with sequence_split(mesh["cp"], part):
                local = [t[0].tolist() for t in (part["position_ids"], part["input_ids"])]
                targets = part["targets"][0].tolist()
        finally:
            dist.destroy_process_group()
        assert local[0] == ([0, 1, 6, 7] if rank == 0 else [2, 3, 4, 5])
        for pos, tok, target in zip(*local, targets, strict=True):
            seen[pos] = (tok, target)
    assert sorted(seen) == list(range(8))
    for pos in range(6):
        assert seen[pos] == (10 + pos, 11 + pos)  # the next token, wherever it lives
    assert seen[6][1] == IGNORE  # the last token has no next one
    assert seen[7] == (0, IGNORE)  # the pad


def _model(**overrides: Any) -> Any:
    torch.manual_seed(0)
    cfg = MistralConfig(**{**SMALL_MISTRAL, "vocab_size": 500, **overrides})
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def _loss_and_grads(module: CausalLMLoss, **kwargs: Any) -> tuple[float, list[Any]]:
    module.zero_grad()
    loss, _n = module(**kwargs)
    loss.backward()
    return float(loss), [p.grad.clone() for p in module.parameters() if p.grad is not None]


def test_ring_attention_and_shifted_targets_train_as_the_model_does() -> None:
    """The mask-free causal attention the model switches to (with grouped key/value heads) and
    the loss on targets shifted before the split give the loss and gradients of the model's own
    SDPA attention and shift, on right-padded rows (what the split sees without the split)."""
    b = _batch([12, 9, 5], width=12)
    plain = CausalLMLoss(_model())
    want_loss, want = _loss_and_grads(
        plain, input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"]
    )
    ring = CausalLMLoss(_model())
    use_ring_attention(ring.model)
    assert ring.model.config._attn_implementation == "finetune_ring"
    part = split_ready(b, context_parallel=2, pad_id=0)
    got_loss, got = _loss_and_grads(
        ring,
        input_ids=part["input_ids"],
        position_ids=part["position_ids"],
        labels=part["targets"],
        shifted=True,
    )
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_packed_documents_are_refused_not_attended_across() -> None:
    """Packed documents would need a block mask that ring attention cannot apply: under context
    parallelism the trainer does not pack, and a packed row is refused rather than trained with
    attention across its documents."""
    b = _batch([6, 6], width=6)
    b["position_ids"][:, 3:] = torch.arange(3)  # two packed documents per row
    with pytest.raises(ConfigError, match="packing off"):
        split_ready(b, context_parallel=2, pad_id=0)


def test_a_context_parallel_plan_is_refused_on_cpu_with_what_to_do() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: context parallelism runs there")
    with pytest.raises(ConfigError, match=r"contextParallel to 1") as err:
        check_plan(_plan(fsdp=2, context_parallel=2), world_size=4)
    assert "needs GPUs" in str(err.value)
    check_plan(_plan(fsdp=4), world_size=4)  # the same ranks without it are fine


def test_the_mesh_shards_over_fsdp_and_cp_and_cp_ranks_read_the_same_rows() -> None:
    """Rank order pp, dp, fsdp, cp, tp: with fsdp 2 x cp 2 x tp 2 on 8 ranks, ranks 0-3 read
    data-parallel rank 0's rows and 4-7 rank 1's; FSDP shards over the four fsdp x cp ranks of
    each TP slice; the cp peers of rank 0 are 0 and 2."""
    plan = _plan(fsdp=2, context_parallel=2, tensor_parallel=2)
    assert plan.world_size == 8
    assert "cp2" in plan.summary
    assert [data_parallel_rank(plan, r, 8) for r in range(8)] == [(2, 0)] * 4 + [(2, 1)] * 4
    dist.init_process_group("fake", rank=0, world_size=8, store=FakeStore())
    try:
        mesh = build_mesh(torch.device("cpu"), plan, 8)
        assert mesh["cp"].mesh.tolist() == [0, 2]
        assert mesh["tp"].mesh.tolist() == [0, 1]
        fsdp = shard_mesh(mesh)
        assert fsdp.size() == 4
        assert sorted(fsdp.mesh.flatten().tolist()) == [0, 2, 4, 6]
        hsdp = build_mesh(torch.device("cpu"), _plan(data_parallel=2, context_parallel=4), 8)
        assert shard_mesh(hsdp).mesh.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    finally:
        dist.destroy_process_group()


def test_documents_are_not_packed_under_context_parallelism(tmp_path: Any) -> None:
    doc = trainer_config(tmp_path, tmp_path)
    assert doc["data"]["packing"] is True
    cp_plan = _plan(fsdp=2, context_parallel=2).model_dump()
    with_cp = TrainerConfig.model_validate({**doc, "plan": cp_plan})
    assert data_config(with_cp).packing is False
    without = TrainerConfig.model_validate({**doc, "plan": _plan(fsdp=4).model_dump()})
    assert data_config(without).packing is True
