"""Trainer benchmark: the same small model on the same data, trained three ways in one run.

(a) ``reference``: the loop the reference workloads write (every sample padded to the maximum
    length, no packing, fp32, AdamW, loss on every non-pad token).
(b) ``hf_trainer``: ``transformers.Trainer`` with its defaults (dynamic padding, no packing), with
    our learning rate and schedule so that losses compare.
(c) ``ours``: the finetune trainer's data pipeline and loop (packing with per-document position
    ids, prompt masking, the LM head only where there are labels, bf16 autocast where it measured
    faster than fp32 at start-up, the FSDP2/AdamW step); ``ours_other_precision`` is the same
    in the precision it did not choose, to show the choice.

Each gets the same wall-clock budget, runs ``--repeats`` times (interleaved, so machine noise
spreads over all three), and is scored by real (non-pad) tokens per second of training and by
the loss per response token on the same held-out documents at the end. Writes
bench/results/trainer.json.

    python bench/trainer/run.py [--budget 60] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, load_dataset
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForSeq2Seq,
    MistralConfig,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from finetune_trainer.config import DataConfig, ModelConfig
from finetune_trainer.data import IGNORE, StepSampler, collate, prepare, rows_at, tokenize
from finetune_trainer.lm import CausalLMLoss
from finetune_trainer.loop import Loop, lr_lambda, make_optimizer
from finetune_trainer.model_loading import autocast_dtype, load_tokenizer
from finetune_trainer.precision import choose_cpu_autocast
from finetune_trainer.stdlib_data import build_jsonl

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # bench/common.py: helpers the benches share
from common import cpu_flags, pad_to_max, stats  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "trainer.json"
#: A small Mistral-architecture model (the real v0.3 tokenizer sets the vocabulary).
MODEL = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 352,
    "vocab_size": 32768,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "sliding_window": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SEQ = 512  # as examples/tiny-local.yaml
BATCH = 8  # samples per step for (a) and (b)
LR = 2e-3
WARMUP = 10
SEED = 0
HELD_OUT = 64
COLUMNS = {"instruction": "instruction", "input": "input", "output": "output"}


def data_config(packing: bool) -> DataConfig:
    return DataConfig(
        kind="builtin",
        name_or_path="python-stdlib-alpaca",
        format="alpaca",
        columns=COLUMNS,
        max_seq_length=SEQ,
        packing=packing,
    )


def new_model(device: torch.device) -> PreTrainedModel:
    torch.manual_seed(SEED)
    model: PreTrainedModel = AutoModelForCausalLM.from_config(MistralConfig(**MODEL))
    return model.to(device)


def held_out_loss(model: PreTrainedModel, held: Dataset, pad: int, device: torch.device) -> float:
    """Mean loss per response token over the held-out documents, fp32, one by one in batches."""
    lm = CausalLMLoss(model).eval()
    total = n = 0.0
    with torch.no_grad():
        for i in range(0, len(held), 16):
            b = collate(rows_at(held, list(range(i, min(i + 16, len(held))))), pad)
            loss, count = lm(*(b[k].to(device) for k in ("input_ids", "position_ids", "labels")))
            total += float(loss)
            n += float(count)
    return total / n


def run_reference(train: Dataset, tok: Any, budget: float, device: torch.device) -> dict[str, Any]:
    """(a) pad to max length, labels = ids with pads -100, fp32, AdamW, DataLoader shuffle."""
    model = new_model(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("constant", WARMUP, 1))
    g = torch.Generator().manual_seed(SEED)
    loader = torch.utils.data.DataLoader(
        range(len(train)),
        batch_size=BATCH,
        shuffle=True,
        drop_last=True,
        generator=g,
        collate_fn=lambda idx: pad_to_max(rows_at(train, list(idx)), tok.pad_token_id, SEQ),
    )
    tokens = steps = 0
    start = time.perf_counter()
    while time.perf_counter() - start < budget:
        for batch in loader:
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            labels = ids.masked_fill(mask == 0, IGNORE)
            out = model(ids, attention_mask=mask, labels=labels, use_cache=False)
            out.loss.backward()
            opt.step()
            sched.step()
            model.zero_grad(set_to_none=True)
            tokens += int(mask.sum())
            steps += 1
            if time.perf_counter() - start >= budget:
                break
    seconds = time.perf_counter() - start
    return {"model": model, "tokens": tokens, "steps": steps, "seconds": seconds}


def run_hf_trainer(train: Dataset, tok: Any, budget: float, device: torch.device) -> dict[str, Any]:
    """(b) transformers.Trainer defaults (dynamic padding), our learning rate and schedule."""
    model = new_model(device)
    counted = {"tokens": 0}
    base = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE)

    def collator(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = base(features)
        counted["tokens"] += int(batch["attention_mask"].sum())
        return batch

    clock: dict[str, float] = {}

    class Budget(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock["start"] = time.perf_counter()
            counted["tokens"] = 0

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if time.perf_counter() - clock["start"] >= budget:
                control.should_training_stop = True

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=BATCH,
            learning_rate=LR,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=WARMUP,
            max_steps=10**6,
            save_strategy="no",
            report_to=[],
            logging_steps=10**6,
            seed=SEED,
            use_cpu=device.type == "cpu",
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train,
            data_collator=collator,
            callbacks=[Budget()],
        )
        result = trainer.train()
    seconds = time.perf_counter() - clock["start"]
    return {
        "model": model,
        "tokens": counted["tokens"],
        "steps": result.global_step,
        "seconds": seconds,
    }


def run_ours(
    packed: Dataset,
    tok: Any,
    budget: float,
    device: torch.device,
    rows_per_step: int,
    autocast: torch.dtype | None,
) -> dict[str, Any]:
    """(c) the finetune trainer's loop on packed rows, computing under ``autocast``."""
    model = new_model(device)
    module = CausalLMLoss(model)
    sampler = StepSampler(
        num_rows=len(packed),
        global_batch_size=rows_per_step,
        dp_rank=0,
        dp_size=1,
        micro_batch_size=rows_per_step,
        seed=SEED,
    )
    opt = make_optimizer(module, LR, 0.0, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("constant", WARMUP, 1))
    loop = Loop(
        module,
        opt,
        sched,
        sampler,
        packed,
        device,
        pad_id=tok.pad_token_id,
        autocast=autocast,
        max_grad_norm=1.0,
    )
    tokens = steps = 0
    start = time.perf_counter()
    while time.perf_counter() - start < budget:
        r = loop.step(steps)
        tokens += r.tokens
        steps += 1
    seconds = time.perf_counter() - start
    loop.close()
    return {
        "model": model,
        "tokens": tokens,
        "steps": steps,
        "seconds": seconds,
        "autocast": str(autocast) if autocast else "none",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of training per run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for all three (1: on shared cores, OpenMP's barriers stall under load)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    tok = load_tokenizer(ModelConfig(kind="builtin", name_or_path="tiny-mistral"))
    raw = load_dataset("json", data_files=str(build_jsonl()), split="train")
    parts = raw.train_test_split(test_size=HELD_OUT, seed=SEED)
    train_raw, held_raw = parts["train"], parts["test"]
    procs = max(1, (os.cpu_count() or 1) // 2)
    unpacked = tokenize(train_raw, data_config(False), tok, num_proc=procs)
    held = tokenize(held_raw, data_config(False), tok, num_proc=None)
    packed = prepare(train_raw, data_config(True), tok, num_proc=procs, seed=SEED)
    mean_doc = statistics.fmean(len(x) for x in unpacked["input_ids"])
    mean_row = statistics.fmean(len(x) for x in packed["input_ids"])
    # Ours trains on about as many real tokens per step as (a) and (b): packed rows are fuller.
    rows_per_step = max(1, round(BATCH * mean_doc / mean_row))

    # The precision ours computes in: what the trainer chooses at start-up (measured on this
    # machine on CPU); "ours_other_precision" runs the other one, to show the choice was right.
    wanted = autocast_dtype("bfloat16", device, sharded=False)
    chosen, choice = wanted, None
    if wanted is not None and device.type == "cpu":
        choice = choose_cpu_autocast(wanted, int(MODEL["hidden_size"]))
        chosen = choice.dtype
        print(choice.describe(), flush=True)
    other = None if chosen is not None else torch.bfloat16
    runners = {
        "reference": lambda: run_reference(unpacked, tok, args.budget, device),
        "hf_trainer": lambda: run_hf_trainer(unpacked, tok, args.budget, device),
        "ours": lambda: run_ours(packed, tok, args.budget, device, rows_per_step, chosen),
        "ours_other_precision": lambda: run_ours(
            packed, tok, args.budget, device, rows_per_step, other
        ),
    }
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in runners}
    for repeat in range(args.repeats):
        for name, fn in runners.items():
            r = fn()
            r["tokens_per_second"] = r["tokens"] / r["seconds"]
            r["held_out_loss"] = held_out_loss(r.pop("model"), held, tok.pad_token_id, device)
            r["repeat"] = repeat
            runs[name].append(r)
            print(
                f"{name:10s} repeat {repeat}: {r['tokens_per_second']:8.0f} real tok/s, "
                f"{r['steps']} steps, held-out loss {r['held_out_loss']:.4f}",
                flush=True,
            )

    summary = {
        name: {
            "tokens_per_second": stats([r["tokens_per_second"] for r in rs]),
            "held_out_loss": stats([r["held_out_loss"] for r in rs]),
        }
        for name, rs in runs.items()
    }
    tps = {k: v["tokens_per_second"]["mean"] for k, v in summary.items()}
    loss = {k: v["held_out_loss"]["mean"] for k, v in summary.items()}
    ratios = {
        "ours_vs_reference_tokens_per_second": tps["ours"] / tps["reference"],
        "ours_vs_hf_trainer_tokens_per_second": tps["ours"] / tps["hf_trainer"],
        "ours_minus_hf_trainer_held_out_loss": loss["ours"] - loss["hf_trainer"],
        "ours_vs_other_precision_tokens_per_second": tps["ours"] / tps["ours_other_precision"],
    }
    targets = {
        "ours_vs_reference_at_least_3x": ratios["ours_vs_reference_tokens_per_second"] >= 3.0,
        "ours_vs_hf_trainer_at_least_1_5x": ratios["ours_vs_hf_trainer_tokens_per_second"] >= 1.5,
        "held_out_loss_no_worse_than_hf_trainer": ratios["ours_minus_hf_trainer_held_out_loss"]
        <= 0.0,
        "chosen_precision_is_the_faster": ratios["ours_vs_other_precision_tokens_per_second"]
        >= 1.0,
    }
    result = {
        "benchmark": "trainer",
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "precision": {
            "chosen_autocast": str(chosen) if chosen else "none (fp32)",
            "measured_fp32_s": choice.fp32_s if choice else None,
            "measured_autocast_s": choice.autocast_s if choice else None,
        },
        "torch": torch.__version__,
        "model": {
            **MODEL,
            "params": sum(p.numel() for p in new_model(torch.device("cpu")).parameters()),
        },
        "data": {
            "dataset": "python-stdlib-alpaca",
            "train_docs": len(unpacked),
            "held_out_docs": len(held),
            "max_seq_length": SEQ,
            "mean_doc_tokens": mean_doc,
            "mean_packed_row_tokens": mean_row,
            "packed_rows": len(packed),
        },
        "settings": {
            "budget_seconds": args.budget,
            "repeats": args.repeats,
            "batch_samples_a_b": BATCH,
            "rows_per_step_ours": rows_per_step,
            "learning_rate": LR,
            "schedule": "constant with warmup",
            "warmup_steps": WARMUP,
        },
        "summary": summary,
        "ratios": ratios,
        "targets": targets,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"ratios": ratios, "targets": targets}, indent=2))


if __name__ == "__main__":
    main()
