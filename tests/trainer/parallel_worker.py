"""Runs a few optimizer steps of a small model under each given plan and writes what the tests
compare (losses, global gradient norms, final parameters) as JSON. Under torchrun for the
parallel plans; as a plain process (world 1, no plan) for the reference.

    python parallel_worker.py OUT.json CASES.json
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from datasets import Dataset
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM, MistralConfig

from finetune_trainer.config import PlanConfig
from finetune_trainer.data import IGNORE, StepSampler
from finetune_trainer.lm import CausalLMLoss
from finetune_trainer.loop import Loop, make_optimizer
from finetune_trainer.loss import chunked_cross_entropy
from finetune_trainer.parallelize import apply_plan, data_parallel_rank, trained_module
from finetune_trainer.planner import memory

#: 4 layers so that 2 pipeline ranks x 2 virtual stages get one layer each (a case may ask
#: for another count: 3 layers split unevenly over 2 pipeline stages).
MODEL = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "sliding_window": None,
}
SEQ = 32
GBS = 8
#: Logits per chunk of the loss: 8 tokens of the whole vocabulary, 16 of a TP 2 shard, so that
#: every run (reference included) computes its loss in several chunks (the product's 2**26
#: would take every micro-batch of this model in one).
memory.LOSS_CHUNK_LOGITS = 8 * MODEL["vocab_size"]
STEPS = 3
LR = 1e-2


def dataset() -> Dataset:
    """Rows of varied length; some are two packed documents (positions restart), prompts masked."""
    g = torch.Generator().manual_seed(11)
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for i in range(64):
        n = int(torch.randint(12, SEQ + 1, (1,), generator=g))
        ids = torch.randint(3, MODEL["vocab_size"], (n,), generator=g).tolist()
        labels = list(ids)
        labels[: n // 3] = [IGNORE] * (n // 3)
        pos = list(range(n)) if i % 2 else list(range(n // 2)) + list(range(n - n // 2))
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["position_ids"].append(pos)
    return Dataset.from_dict(rows)


def build(
    lora: bool, tied: bool = False, layers: int | None = None
) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model: Any = AutoModelForCausalLM.from_config(
        MistralConfig(**{**MODEL, "tie_word_embeddings": tied, "num_hidden_layers": layers or 4})
    )
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=4,
                lora_alpha=8,
                lora_dropout=0.0,
                # column-parallel (q, v) and row-parallel (o, down) linears under TP
                target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
            ),
        )
        for name, p in model.named_parameters():
            if "lora_B" in name:  # nonzero B so adapters matter from the first step
                torch.nn.init.normal_(p, std=0.02)
        model = model.get_base_model()
    return CausalLMLoss(model), model


def vocab_parallel_loss(world: int) -> dict[str, Any]:
    """The chunked loss of a head whose vocabulary (1,001 rows: uneven shards) is split over
    every rank, as tensor parallelism leaves it (a ``Shard(0)`` DTensor), or whole (world 1):
    loss and gradients, for the test to compare."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(150, 32, generator=g, requires_grad=True)
    weight = torch.randn(1001, 32, generator=g) * 0.3
    bias = torch.randn(1001, generator=g)
    targets = torch.randint(0, 1001, (150,), generator=g)
    targets[::4] = IGNORE
    head = torch.nn.Linear(32, 1001)
    if world > 1:
        mesh = init_device_mesh("cpu", (world,))
        head.weight = torch.nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]))
        head.bias = torch.nn.Parameter(distribute_tensor(bias, mesh, [Shard(0)]))
    else:
        head.weight, head.bias = torch.nn.Parameter(weight), torch.nn.Parameter(bias)
    loss = chunked_cross_entropy(hidden, head, targets, ignore_index=IGNORE, chunk_tokens=16)
    loss.backward()

    def whole(t: torch.Tensor | None) -> list[float]:
        assert t is not None
        full = t.full_tensor() if isinstance(t, DTensor) else t
        return [float(x) for x in full.flatten()]

    return {
        "loss": float(loss),
        "hidden": whole(hidden.grad),
        "weight": whole(head.weight.grad),
        "bias": whole(head.bias.grad),
    }


def run_case(case: dict[str, Any], ds: Dataset, rank: int, world: int) -> dict[str, Any]:
    if case.get("vocab_parallel_loss"):
        return vocab_parallel_loss(world)
    plan = PlanConfig(**case["plan"]) if case.get("plan") else None
    module, hf = build(bool(case.get("lora")), bool(case.get("tied")), case.get("layers"))
    device = torch.device("cpu")
    applied = apply_plan(module, world_size=world, rank=rank, device=device, plan=plan, hf_model=hf)
    trained = trained_module(module, applied)
    optim = make_optimizer(trained, LR, 0.0, device)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda _s: 1.0)
    dp_size, dp_rank = data_parallel_rank(plan, rank, world)
    mbs = plan.micro_batch_size if plan else GBS
    sampler = StepSampler(
        num_rows=len(ds),
        global_batch_size=GBS,
        dp_rank=dp_rank,
        dp_size=dp_size,
        micro_batch_size=mbs,
        seed=5,
    )
    loop = Loop(
        trained,
        optim,
        sched,
        sampler,
        ds,
        device,
        pad_id=0,
        autocast=None,
        max_grad_norm=float(case.get("max_grad_norm", 1.0)),
        parallel=applied,
        seq_len=SEQ,
    )
    losses, norms = [], []
    try:
        for step in range(STEPS):
            r = loop.step(step)
            losses.append(r.loss)
            norms.append(r.grad_norm)
        eval_loss = loop.evaluate(ds.select(range(12)), mbs)
    finally:
        loop.close()
    state = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True))
    params = {k: v.detach().float().cpu().flatten()[:64].tolist() for k, v in state.items()}
    if world > 1 and applied.pp_size > 1:
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, params)
        params = {k: v for part in parts for k, v in part.items()}
    return {"loss": losses, "grad_norm": norms, "eval_loss": eval_loss, "params": params}


def main() -> None:
    out, cases_path = sys.argv[1], sys.argv[2]
    with open(cases_path) as f:
        cases = json.load(f)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo", timeout=timedelta(minutes=5))
    ds = dataset()
    results = {}
    for case in cases:
        results[case["name"]] = run_case(case, ds, rank, world)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
