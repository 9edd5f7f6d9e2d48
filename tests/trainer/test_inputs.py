"""Bad input fails before training starts, with a message that says what to do, and leaves
nothing written; plus the pieces that need no torchrun (packing, schedules, the data builder)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import trainer_config, write_config
from finetune_trainer.config import DataConfig, ModelConfig

pytestmark = pytest.mark.trainer

#: Alpaca rows of up to 512 tokens (the column names are the format's own).
ALPACA_512 = DataConfig(
    kind="builtin",
    name_or_path="x",
    format="alpaca",
    max_seq_length=512,
    columns={"instruction": "instruction", "input": "input", "output": "output"},
)


def _run(cfg: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    from finetune_trainer.train import EXIT_BAD_INPUT, main

    code = main(["--config", str(write_config(cfg, tmp_path / "config.json"))])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert not (tmp_path / "run" / "ckpt").exists()
    assert not (tmp_path / "run" / "model").exists()
    return err


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def cfg(small_model_dir: Path, tmp_path: Path) -> dict[str, Any]:
    return trainer_config(small_model_dir, tmp_path / "run")


def test_missing_column(cfg: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    data = _jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}] * 20)
    cfg["data"].update(kind="local", name_or_path=str(data))
    err = _run(cfg, tmp_path, capsys)
    assert "no column 'instruction'" in err
    assert "spec.dataset.columns.instruction" in err


def test_empty_dataset(cfg: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    data = tmp_path / "empty.jsonl"
    data.write_text("", encoding="utf-8")
    cfg["data"].update(kind="local", name_or_path=str(data))
    err = _run(cfg, tmp_path, capsys)
    assert "is empty" in err


def test_sequence_shorter_than_prompt(cfg: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    cfg["data"]["max_seq_length"] = 32
    err = _run(cfg, tmp_path, capsys)
    assert "maxSeqLength 32 is shorter than the prompt" in err
    assert "raise spec.dataset.maxSeqLength to at least" in err


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"kind": "builtin", "name_or_path": "tiny-gpt9"}, "unknown builtin model 'tiny-gpt9'"),
        ({"kind": "local", "name_or_path": "/nonexistent/model"}, "no model at /nonexistent"),
    ],
)
def test_unknown_model_source(
    cfg: dict[str, Any], tmp_path: Path, capsys: Any, model: dict[str, str], message: str
) -> None:
    cfg["model"] = {**model, "dtype": "float32"}
    err = _run(cfg, tmp_path, capsys)
    assert message in err
    assert "builtin://tiny-mistral" in err or "save_pretrained" in err


def test_unwritable_checkpoint_path(cfg: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg["checkpoint"]["dir"] = str(blocker / "ckpt")
    err = _run(cfg, tmp_path, capsys)
    assert "checkpoint path" in err
    assert "not writable" in err


def test_global_batch_not_divisible(
    cfg: dict[str, Any], tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    err = _run(cfg, tmp_path, capsys)
    assert "globalBatchSize 8 cannot be divided over 3 data-parallel ranks" in err
    assert "multiple of 3" in err


def test_plan_for_another_world_size(cfg: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    cfg["plan"] = {
        "data_parallel": 1,
        "fsdp": 2,
        "tensor_parallel": 2,
        "pipeline_parallel": 1,
        "micro_batch_size": 1,
        "gradient_accumulation": 4,
    }
    err = _run(cfg, tmp_path, capsys)
    assert "the plan covers 4 ranks but 1 are running" in err
    assert "numNodes x gpusPerNode" in err


def test_data_preparation_says_each_stage_in_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Our own stage lines instead of datasets' progress bars (a fresh file: nothing cached)."""
    from finetune_trainer.data import prepare_splits
    from finetune_trainer.model_loading import load_tokenizer

    rows = [
        {"instruction": f"Say {i}.", "input": "", "output": f"{i} " * (i % 7 + 1)}
        for i in range(40)
    ]
    data = _jsonl(tmp_path / "d.jsonl", rows)
    cfg = ALPACA_512.model_copy(
        update={"kind": "local", "name_or_path": str(data), "eval_fraction": 0.1}
    )
    tok = load_tokenizer(ModelConfig(kind="builtin", name_or_path="tiny-mistral"))
    said: list[str] = []
    train, evaluation = prepare_splits(cfg, tok, seed=1, token=None, say=said.append)
    assert len(train) > 0
    assert len(evaluation) > 0
    assert said == [
        f"data: loading {data}",
        "data: tokenizing and packing 36 training and 4 eval examples",
    ]
    captured = capfd.readouterr()
    printed = captured.out + captured.err
    assert "%|" not in printed, printed[-2000:]  # a tqdm bar
    assert "examples/s" not in printed, printed[-2000:]


def test_packed_loss_equals_unpacked(small_model_dir: Path) -> None:
    """The same documents, packed into one row (position ids restart per document) or padded
    one per row: the same summed loss and target count, so attention never crosses documents."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from finetune_trainer.data import collate, pack, rows_at, tokenize
    from finetune_trainer.lm import CausalLMLoss
    from finetune_trainer.model_loading import load_tokenizer

    tok = load_tokenizer(ModelConfig(kind="local", name_or_path=str(small_model_dir)))
    docs = Dataset.from_list(
        [
            {"instruction": "Add two numbers and return the sum.", "input": "", "output": "a + b"},
            {
                "instruction": "Reverse a list in place.",
                "input": "def rev(xs):",
                "output": "def rev(xs):\n    xs.reverse()",
            },
            {
                "instruction": "Return the larger value of x and y.",
                "input": "",
                "output": "return x if x > y else y",
            },
        ]
    )
    cfg = ALPACA_512
    tokens = tokenize(docs, cfg, tok, num_proc=None)
    packed = pack(tokens, 512)
    assert len(packed) == 1
    model = AutoModelForCausalLM.from_pretrained(small_model_dir, dtype=torch.float32)
    lm = CausalLMLoss(model).eval()
    with torch.no_grad():
        b = collate(rows_at(packed, [0]), tok.pad_token_id)
        packed_loss, packed_n = lm(b["input_ids"], b["position_ids"], b["labels"])
        b = collate(rows_at(tokens, [0, 1, 2]), tok.pad_token_id)
        assert (b["input_ids"] == tok.pad_token_id).any()  # really padded
        loss, n = lm(b["input_ids"], b["position_ids"], b["labels"])
    assert int(packed_n) == int(n) > 0
    assert float(packed_loss) == pytest.approx(float(loss), rel=1e-5)
    # Attention across documents would change the answer: a single position sequence differs.
    with torch.no_grad():
        b = collate(rows_at(packed, [0]), tok.pad_token_id)
        flat = torch.arange(b["input_ids"].shape[1]).unsqueeze(0)
        crossed, _ = lm(b["input_ids"], flat, b["labels"])
    assert abs(float(crossed) - float(loss)) > 1e-3


def test_prompt_tokens_are_masked(small_model_dir: Path) -> None:
    from datasets import Dataset

    from finetune_trainer.data import IGNORE, tokenize
    from finetune_trainer.model_loading import load_tokenizer

    tok = load_tokenizer(ModelConfig(kind="local", name_or_path=str(small_model_dir)))
    docs = Dataset.from_list([{"instruction": "Say hi.", "input": "", "output": "hi"}])
    cfg = ALPACA_512
    row = tokenize(docs, cfg, tok, num_proc=None)[0]
    targets = [t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != IGNORE]
    assert tok.decode(targets).strip() == "hi</s>"
    assert row["labels"][: len(row["labels"]) - len(targets)] == [IGNORE] * (
        len(row["labels"]) - len(targets)
    )


def test_schedules() -> None:
    from finetune_trainer.loop import lr_lambda

    cosine = lr_lambda("cosine", 10, 110)
    assert cosine(0) == 0.0
    assert cosine(5) == pytest.approx(0.5)
    assert cosine(10) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.5)
    assert cosine(110) == pytest.approx(0.0)
    linear = lr_lambda("linear", 0, 100)
    assert linear(50) == pytest.approx(0.5)
    assert lr_lambda("constant", 0, 100)(99) == 1.0


def test_sampler_is_deterministic_and_disjoint() -> None:
    from finetune_trainer.data import StepSampler

    one = StepSampler(
        num_rows=50, global_batch_size=8, dp_rank=0, dp_size=1, micro_batch_size=4, seed=1
    )
    ranks = [
        StepSampler(
            num_rows=50, global_batch_size=8, dp_rank=r, dp_size=2, micro_batch_size=2, seed=1
        )
        for r in range(2)
    ]
    for step in (0, 5, 6, 13):  # 6 steps per epoch: 6 and 13 are in later epochs
        whole = [i for mb in one.micro_batches(step) for i in mb]
        split = [i for s in ranks for mb in s.micro_batches(step) for i in mb]
        assert whole == split
        assert len(set(whole)) == 8
    assert one.micro_batches(0) != one.micro_batches(6)


def test_stdlib_builder_is_real_code() -> None:
    import ast

    from finetune_trainer.stdlib_data import build_records

    records = build_records()
    assert len(records) > 500
    for rec in records[:50]:
        assert set(rec) == {"instruction", "input", "output"}
        ast.parse(
            rec["output"].strip()
            if not rec["output"].startswith(" ")
            else "if 1:\n" + rec["output"]
        )
        assert rec["input"].startswith("def ")
