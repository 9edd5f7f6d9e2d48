"""Data: load, format, tokenize (prompt and pad masked with -100), pack, and order per rank.

Flow (:func:`prepare_splits`): :func:`load_raw` (Hub, local files, builtin) -> :func:`tokenize`
(``datasets.map`` with ``num_proc``, cached by ``datasets``) -> :func:`pack` (documents
concatenated into ``max_seq_length`` rows with per-document position ids); then, per step,
:class:`StepSampler` (which rows each rank reads at each step: a pure function of seed, step and
rank, so resume is exact) -> :func:`collate` (tensors).
"""

from __future__ import annotations

import hashlib
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, disable_progress_bars, load_dataset, load_from_disk

from finetune_trainer import stdlib_data
from finetune_trainer.config import DEFAULT_COLUMNS, DataConfig
from finetune_trainer.errors import ConfigError

IGNORE = -100
BUILTIN_DATASETS = (stdlib_data.NAME,)

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
SUMMARY_HEAD = "Summarize the following article.\n\n### Article:\n"
SUMMARY_TAIL = "\n\n### Summary:\n"
#: Part of every cache key: datasets hashes module functions by name, not code, so a change to
#: this file must change the key itself.
CODE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
#: Rows that exceed the length are dropped; more than this share dropped is an error.
MAX_DROPPED_SHARE = 0.5


# ---- loading -------------------------------------------------------------------------------


def _local_files(path: Path) -> tuple[str, list[str]]:
    suffix_kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    kinds = {suffix_kind[p.suffix] for p in files if p.suffix in suffix_kind}
    if len(kinds) != 1:
        raise ConfigError(
            f"no readable data at {path}: give a .jsonl, .json or .parquet file, or a folder of "
            "one kind of them (or one saved with Dataset.save_to_disk)"
        )
    kind = kinds.pop()
    return kind, [str(p) for p in files if suffix_kind.get(p.suffix) == kind]


def staged_dataset(cfg: DataConfig) -> Path | None:
    """The snapshot folder the staging Job left a Hub dataset in, when there is one: the cache
    (``HF_HUB_CACHE``) holds ``datasets--org--name/snapshots/<revision>/``. The operator pins the
    revision to the staged commit and sets ``HF_HUB_OFFLINE=1``; ``datasets`` cannot find a Hub
    dataset offline by its name, so it is loaded from the folder (its data files and card)."""
    if cfg.kind != "hf" or not cfg.revision:
        return None
    from huggingface_hub import constants  # noqa: PLC0415 - reads HF_HUB_CACHE/HF_HOME

    from finetune_trainer.staging import snapshot_dir  # noqa: PLC0415

    folder = snapshot_dir(Path(constants.HF_HUB_CACHE), cfg.name_or_path, "dataset", cfg.revision)
    return folder if folder.is_dir() else None


def _load_split(cfg: DataConfig, split: str, token: str | None) -> Dataset:
    try:
        if cfg.kind == "builtin":
            if cfg.name_or_path not in BUILTIN_DATASETS:
                raise ConfigError(
                    f"unknown builtin dataset {cfg.name_or_path!r}: use "
                    f"builtin://{stdlib_data.NAME}, an hf://org/name dataset or a file:// path"
                )
            path = stdlib_data.build_jsonl()
            ds = load_dataset("json", data_files=str(path), split="train")
        elif cfg.kind == "local":
            path = Path(cfg.name_or_path)
            if not path.exists():
                raise ConfigError(f"no dataset at {path}: check the dataset source path")
            if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
                loaded = load_from_disk(str(path))
                ds = loaded[split] if isinstance(loaded, DatasetDict) else loaded
            else:
                kind, files = _local_files(path)
                if all(Path(f).stat().st_size == 0 for f in files):
                    raise ConfigError(_empty(cfg, split))
                ds = load_dataset(kind, data_files=files, split="train")
        elif (staged := staged_dataset(cfg)) is not None:  # the staging Job left it here
            ds = load_dataset(str(staged), cfg.config_name, split=split)
        else:
            ds = load_dataset(
                cfg.name_or_path,
                cfg.config_name,
                split=split,
                revision=cfg.revision,
                token=token,
            )
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(
            f"cannot load split {split!r} of dataset {cfg.name_or_path}: {err}. Check the "
            "source, config and split names (Hub datasets need network access)"
        ) from err
    assert isinstance(ds, Dataset)
    return ds


def _empty(cfg: DataConfig, split: str) -> str:
    return (
        f"the dataset {cfg.name_or_path} (split {split!r}) is empty: point "
        "spec.dataset.source at data with rows, or choose another split"
    )


def check_columns(ds: Dataset, cfg: DataConfig, what: str) -> None:
    roles = DEFAULT_COLUMNS[cfg.format]
    for role in roles:
        column = cfg.columns[role]
        if column not in ds.column_names:
            raise ConfigError(
                f"the {what} data has no column {column!r} for the {cfg.format} role {role!r}; "
                f"its columns are {ds.column_names}. Set spec.dataset.columns.{role} to the "
                "column that holds it, or choose the format that matches the data"
            )


def load_raw(cfg: DataConfig, *, seed: int, token: str | None = None) -> tuple[Dataset, Dataset]:
    """Train and eval rows (eval may be empty), checked for columns and emptiness."""
    train = _load_split(cfg, cfg.split, token)
    if len(train) == 0:
        raise ConfigError(_empty(cfg, cfg.split))
    check_columns(train, cfg, "training")
    if cfg.eval_split:
        evaluation = _load_split(cfg, cfg.eval_split, token)
        check_columns(evaluation, cfg, "eval")
    elif cfg.eval_fraction > 0 and len(train) >= 2:
        parts = train.train_test_split(test_size=cfg.eval_fraction, seed=seed, shuffle=True)
        train, evaluation = parts["train"], parts["test"]
    else:
        evaluation = train.select([])
    return train, evaluation


# ---- tokenization --------------------------------------------------------------------------


def _alpaca(tok: Any, cols: dict[str, str], row: dict[str, Any]) -> tuple[list[int], list[int]]:
    instruction = str(row[cols["instruction"]] or "")
    extra = str(row[cols["input"]] or "").strip()
    template = ALPACA_WITH_INPUT if extra else ALPACA_NO_INPUT
    prompt = template.format(instruction=instruction, input=extra)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    answer = tok(str(row[cols["output"]] or ""), add_special_tokens=False)["input_ids"]
    return [*_bos(tok), *prompt_ids], [*answer, tok.eos_token_id]


def _bos(tok: Any) -> list[int]:
    return [tok.bos_token_id] if tok.bos_token_id is not None else []


def _summary(
    tok: Any, cols: dict[str, str], row: dict[str, Any], max_len: int
) -> tuple[list[int], list[int]]:
    head = [*_bos(tok), *tok(SUMMARY_HEAD, add_special_tokens=False)["input_ids"]]
    tail = tok(SUMMARY_TAIL, add_special_tokens=False)["input_ids"]
    article = tok(str(row[cols["article"]] or ""), add_special_tokens=False)["input_ids"]
    summary = [*tok(str(row[cols["summary"]] or ""), add_special_tokens=False)["input_ids"]]
    summary.append(tok.eos_token_id)
    # Long articles are cut (as the reference workload's truncation does), never the template.
    room = max_len - len(head) - len(tail) - len(summary)
    article = article[: max(room, 0)]
    return [*head, *article, *tail], summary


def _chat(tok: Any, cols: dict[str, str], row: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Loss on assistant turns only: each turn's tokens are what the template adds for it."""
    messages = list(row[cols["messages"]])
    ids: list[int] = []
    labels: list[int] = []
    for k, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        prefix = tok.apply_chat_template(messages[:k], add_generation_prompt=True, tokenize=True)
        full = tok.apply_chat_template(messages[: k + 1], tokenize=True)
        prefix, full = _ids(prefix), _ids(full)
        labels += [IGNORE] * (len(prefix) - len(ids)) + full[len(prefix) :]
        ids = full
    return ids, labels


def _ids(x: Any) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        return list(x["input_ids"])
    return list(x)


def _tokenize_batch(
    batch: dict[str, list[Any]],
    *,
    tok: Any,
    fmt: str,
    cols: dict[str, str],
    max_len: int,
    code: str = CODE_VERSION,
) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "prompt_len": [], "fits": []}
    n = len(next(iter(batch.values())))
    for i in range(n):
        row = {k: v[i] for k, v in batch.items()}
        if fmt == "text":
            ids = [
                *_bos(tok),
                *tok(str(row[cols["text"]] or ""), add_special_tokens=False)["input_ids"],
                tok.eos_token_id,
            ]
            # Long texts become several rows of max_len (each starting a new document).
            for start in range(0, max(len(ids) - 1, 1), max_len):
                chunk = ids[start : start + max_len]
                out["input_ids"].append(chunk)
                out["labels"].append([IGNORE, *chunk[1:]])
                out["prompt_len"].append(1)
                out["fits"].append(True)
            continue
        if fmt == "chat":
            ids, labels = _chat(tok, cols, row)
            prompt_len = next((j for j, x in enumerate(labels) if x != IGNORE), len(labels))
        else:
            if fmt == "alpaca":
                prompt, answer = _alpaca(tok, cols, row)
            else:
                prompt, answer = _summary(tok, cols, row, max_len)
            ids = prompt + answer
            labels = [IGNORE] * len(prompt) + answer
            prompt_len = len(prompt)
        fits = prompt_len < max_len
        out["input_ids"].append(ids[:max_len])
        out["labels"].append(labels[:max_len])
        out["prompt_len"].append(prompt_len)
        out["fits"].append(fits)
    return out


def tokenize(ds: Dataset, cfg: DataConfig, tok: Any, *, num_proc: int | None) -> Dataset:
    """Token ids and labels (-100 on prompt tokens); rows whose prompt leaves no room dropped."""
    if cfg.format == "chat" and not getattr(tok, "chat_template", None):
        raise ConfigError(
            "format chat needs a tokenizer with a chat template, and this model's has none: "
            "use a chat model, or the alpaca or text format"
        )
    if len(ds) == 0:
        return ds
    fn = partial(
        _tokenize_batch,
        tok=tok,
        fmt=cfg.format,
        cols=cfg.columns,
        max_len=cfg.max_seq_length,
        code=CODE_VERSION,
    )
    procs = num_proc if num_proc and len(ds) >= 64 * num_proc else None
    out = ds.map(
        fn, batched=True, num_proc=procs, remove_columns=ds.column_names, desc="tokenizing"
    )
    fits = out["fits"]
    dropped = len(fits) - sum(fits)
    if dropped > MAX_DROPPED_SHARE * len(fits):
        lengths = out["prompt_len"]
        need = sorted(lengths)[int(0.9 * (len(lengths) - 1))] + 64
        raise ConfigError(
            f"maxSeqLength {cfg.max_seq_length} is shorter than the prompt of {dropped} of "
            f"{len(fits)} examples (prompts are {min(lengths)}-{max(lengths)} tokens, median "
            f"{int(statistics.median(lengths))}): raise spec.dataset.maxSeqLength to at least "
            f"{need}"
        )
    if dropped:
        out = out.filter(lambda f: f, input_columns=["fits"])
    out = out.filter(lambda labels: any(x != IGNORE for x in labels), input_columns=["labels"])
    return out.remove_columns(["prompt_len", "fits"])


# ---- packing -------------------------------------------------------------------------------


def _pack_batch(
    batch: dict[str, list[Any]], *, max_len: int, code: str = CODE_VERSION
) -> dict[str, list[Any]]:
    """First-fit decreasing: longest documents first, each into the first row with room."""
    docs = sorted(zip(batch["input_ids"], batch["labels"], strict=True), key=lambda d: -len(d[0]))
    rows: list[list[tuple[list[int], list[int]]]] = []
    room: list[int] = []
    for doc_ids, doc_labels in docs:
        n = len(doc_ids)
        slot = next((i for i, r in enumerate(room) if r >= n), None)
        if slot is None:
            rows.append([])
            room.append(max_len)
            slot = len(rows) - 1
        rows[slot].append((doc_ids, doc_labels))
        room[slot] -= n
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "position_ids": []}
    for row in rows:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for doc_ids, doc_labels in row:
            ids += doc_ids
            # A document's first token is never a target: nothing before it in its document.
            labels += [IGNORE, *doc_labels[1:]]
            pos += range(len(doc_ids))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(pos)
    return out


def pack(ds: Dataset, max_len: int, *, num_proc: int | None = None) -> Dataset:
    """Concatenate documents into rows of at most ``max_len`` tokens (first-fit decreasing in
    chunks of 2000 documents, so rows are nearly full).

    ``position_ids`` restart at 0 for every document: the model builds a block-diagonal causal
    mask from them, so attention never crosses documents.
    """
    if len(ds) == 0:
        return ds.add_column("position_ids", [])
    procs = num_proc if num_proc and len(ds) >= 2000 * num_proc else None
    return ds.map(
        partial(_pack_batch, max_len=max_len, code=CODE_VERSION),
        batched=True,
        batch_size=2000,
        num_proc=procs,
        remove_columns=ds.column_names,
        desc="packing",
    )


def prepare(ds: Dataset, cfg: DataConfig, tok: Any, *, num_proc: int | None, seed: int) -> Dataset:
    """Tokenize, then pack (after a seeded shuffle, so rows mix documents) if asked."""
    tokens = tokenize(ds, cfg, tok, num_proc=num_proc)
    if cfg.packing and len(tokens) > 0:
        tokens = tokens.shuffle(seed=seed).flatten_indices()
        return pack(tokens, cfg.max_seq_length, num_proc=num_proc)
    return tokens


def default_num_proc(cfg: DataConfig) -> int:
    return cfg.num_proc or max(1, min(16, (os.cpu_count() or 1) // 2))


def prepare_splits(
    cfg: DataConfig, tok: Any, *, seed: int, token: str | None, say: Callable[[str], None]
) -> tuple[Dataset, Dataset]:
    """The training and eval rows, loaded and prepared; one line on ``say`` per stage instead of
    ``datasets``' own progress bars (turned off for the process)."""
    disable_progress_bars()
    say(f"data: loading {cfg.name_or_path}")
    train_raw, eval_raw = load_raw(cfg, seed=seed, token=token)
    procs = default_num_proc(cfg)
    stages = "tokenizing and packing" if cfg.packing else "tokenizing"
    say(f"data: {stages} {len(train_raw)} training and {len(eval_raw)} eval examples")
    train = prepare(train_raw, cfg, tok, num_proc=procs, seed=seed)
    if len(train) == 0:
        raise ConfigError(
            f"no training example of {cfg.name_or_path} has a response to learn from "
            "after tokenization: check the column map and the format"
        )
    evaluation = prepare(eval_raw, cfg, tok, num_proc=procs, seed=seed)
    return train, evaluation


# ---- ordering and batching -----------------------------------------------------------------


@dataclass(frozen=True)
class StepSampler:
    """Which rows each rank reads at each step: a pure function of (seed, step, rank).

    Every global batch is ``global_batch_size`` rows drawn without replacement from a per-epoch
    permutation; rank r reads its contiguous share, split in micro-batches. The last partial
    global batch of an epoch is dropped.
    """

    num_rows: int
    global_batch_size: int
    dp_rank: int
    dp_size: int
    micro_batch_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.global_batch_size % (self.dp_size * self.micro_batch_size):
            raise ConfigError(
                f"globalBatchSize {self.global_batch_size} cannot be split over "
                f"{self.dp_size} data-parallel ranks x micro-batch {self.micro_batch_size}: use "
                f"a multiple of {self.dp_size * self.micro_batch_size}"
            )
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the dataset has {self.num_rows} training rows (after packing), fewer than "
                f"globalBatchSize {self.global_batch_size}: lower the global batch size or use "
                "more data"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.global_batch_size

    @property
    def accumulation(self) -> int:
        return self.global_batch_size // (self.dp_size * self.micro_batch_size)

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(self.num_rows, generator=g)

    def micro_batches(self, step: int) -> list[list[int]]:
        """Row indices of this rank's micro-batches for global step ``step`` (0-based)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        rows = self._perm(epoch)[offset * self.global_batch_size :][: self.global_batch_size]
        per_rank = self.global_batch_size // self.dp_size
        mine = rows[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank].tolist()
        m = self.micro_batch_size
        return [mine[i : i + m] for i in range(0, per_rank, m)]


def collate(rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. Pads get label -100 and positions that continue the row."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.arange(width, dtype=torch.long).repeat(len(rows), 1)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        if "position_ids" in r:
            p = torch.tensor(r["position_ids"])
            pos[i, :n] = p
            pos[i, n:] = torch.arange(width - n) + int(p[-1]) + 1
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def rows_at(ds: Dataset, indices: list[int]) -> list[dict[str, Any]]:
    cols = ds[indices]
    return [{k: cols[k][i] for k in cols} for i in range(len(indices))]
