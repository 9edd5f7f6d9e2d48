"""Stage a run's model and data before training: resolve, download once, read the model's shape.

Given a run's :class:`~finetune_trainer.config.TrainerConfig` and a cache folder, :func:`stage`

- resolves a Hub model (``hf``: ``org/name`` at a revision) to its commit and downloads only what
  the trainer reads (safetensors weights and their index, config.json, generation_config.json,
  the tokenizer) into the Hugging Face cache layout under the cache folder
  (``models--org--name/snapshots/<commit>/``), which is keyed by repository and commit: staging
  the same commit again fetches no file bytes. Pickle weights (``.bin``, ``.pt``, ``.pth``,
  ``.ckpt``) and models whose config asks for remote code (``auto_map``) are refused unless the
  caller allows them (:class:`Options`);
- does the same for a Hub dataset (its data files, and the card ``datasets`` reads configs from);
- opens ``local`` folders and ``builtin`` names where they are, downloading nothing;
- reads the model's config.json and its tokenizer's vocabulary size, and checks the planner can
  read the shape (a model the trainer cannot run fails here, with the reason);
- returns a :class:`StagingReport` small enough for a container's termination message.

``python -m finetune_trainer.staging --config PATH --cache DIR`` is the staging Job's container:
it prints a line per step and per file, and writes the report as one JSON line to the
termination log (or, when it fails, a ``{"reason", "message"}`` line as the trainer does:
``BadInput`` for what the user must change, exit code 3, ``StagingFailed`` for what may pass on a
retry, exit code 1). The report's shape is :mod:`finetune_trainer.staging_report`'s, which the
operator reads without importing this module.

The Hub's endpoint is huggingface_hub's (``HF_ENDPOINT``) unless the caller names one. The token
comes from the variable ``ModelConfig.token_env`` names; it is never printed or written.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from finetune_trainer.config import DataConfig, ModelConfig, TrainerConfig
from finetune_trainer.planner.model import TINY_CONFIGS, ModelConfigError, ModelFacts
from finetune_trainer.staging_report import (
    BAD_INPUT,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    REPORT_VERSION,
    STAGING_FAILED,
    SourceReport,
    StagingReport,
)

__all__ = [
    "BAD_INPUT",
    "REPORT_VERSION",
    "STAGING_FAILED",
    "Options",
    "SourceReport",
    "StagingError",
    "StagingReport",
    "snapshot_dir",
    "stage",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE = "pytorch_model.bin"
MODEL_CONFIGS = ("config.json", "generation_config.json")
#: The files transformers' tokenizers read (the first ones say the vocabulary size).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
DATA_SUFFIXES = (".parquet", ".json", ".jsonl", ".csv", ".arrow", ".txt")
DATA_COMPRESSION = ("", ".gz", ".zst", ".bz2", ".xz")
#: What ``datasets`` reads beside the data: the card's YAML names configs and splits.
DATA_CARDS = ("README.md", "dataset_infos.json", "dataset_info.json")
#: The config.json keys the planner reads (ModelFacts.from_hf_config), for every family.
SHAPE_KEYS = (
    "model_type",
    "architectures",
    "is_encoder_decoder",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
    "hidden_act",
    "attention_bias",
    "max_position_embeddings",
    # MPT
    "d_model",
    "n_layers",
    "n_heads",
    "attn_config",
    "ffn_config",
    "expansion_ratio",
    "no_bias",
    # GPT-2
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "n_positions",
    # mixture of experts (refused by the planner, kept so the reader sees why)
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "moe_num_experts",
)
#: The mistral-common tokenizer builtin models use (finetune_trainer.model_loading's).
BUILTIN_TOKENIZER = ("mistral_common", "data/mistral_instruct_tokenizer_240323.model.v3")
BUILTIN_DATASETS = ("python-stdlib-alpaca",)


class StagingError(Exception):
    """Staging cannot go on; ``str()`` is one line that says what to do."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Options:
    """What the spec explicitly allows (both refused by default)."""

    #: Pickle weights (``pytorch_model.bin``...) when a revision has no safetensors.
    allow_pickle_weights: bool = False
    #: Models whose config names custom code (``auto_map``): the trainer would run that code.
    allow_remote_code: bool = False


# ---- pure choices ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Weights:
    """The weight files to fetch: named ones, and an index whose ``weight_map`` names shards."""

    files: tuple[str, ...]
    index: str | None
    pickle: bool


def pick_weights(files: Collection[str], *, what: str, options: Options) -> Weights:
    """The weights transformers loads from a repository or folder holding ``files``.

    Safetensors are preferred (and other formats beside them ignored: Mistral's
    ``consolidated.safetensors`` or a ``pytorch_model.bin`` are never fetched); pickle weights
    alone are refused unless allowed.
    """
    top = {f for f in files if "/" not in f}
    if SAFETENSORS_INDEX in top:
        return Weights((), SAFETENSORS_INDEX, pickle=False)
    if SAFETENSORS in top:
        return Weights((SAFETENSORS,), None, pickle=False)
    pickles = sorted(f for f in top if f.endswith(PICKLE_SUFFIXES))
    if pickles and not options.allow_pickle_weights:
        raise StagingError(
            BAD_INPUT,
            f"{what} has only pickle weights ({', '.join(pickles[:3])}), which can run code when "
            "loaded: use a revision with safetensors weights (model.safetensors), or allow "
            "pickle weights explicitly (finetune stage --allow-pickle-weights)",
        )
    if PICKLE_INDEX in top:
        return Weights((), PICKLE_INDEX, pickle=True)
    if PICKLE in top:
        return Weights((PICKLE,), None, pickle=True)
    raise StagingError(
        BAD_INPUT,
        f"{what} has no weights the trainer can load: it needs model.safetensors (or "
        "model.safetensors.index.json and its shards) saved with save_pretrained",
    )


def shards(index: dict[str, Any], *, what: str) -> tuple[str, ...]:
    """The shard files a weights index (``model.safetensors.index.json``) names."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise StagingError(BAD_INPUT, f"{what}: its weights index has no weight_map")
    return tuple(sorted({str(v) for v in weight_map.values()}))


def remote_code(config: dict[str, Any], tokenizer_config: dict[str, Any] | None) -> list[str]:
    """Where a model asks for custom code (``auto_map`` classes), as ``file: classes``."""
    found = []
    for name, doc in (("config.json", config), ("tokenizer_config.json", tokenizer_config)):
        auto_map = (doc or {}).get("auto_map")
        if auto_map:
            found.append(
                f"{name} auto_map {sorted(auto_map) if isinstance(auto_map, dict) else auto_map}"
            )
    return found


def shape_of(config: dict[str, Any]) -> dict[str, Any]:
    """The config.json keys the planner reads (a few hundred bytes, whatever the model)."""
    return {k: config[k] for k in SHAPE_KEYS if k in config}


def model_facts(config: dict[str, Any], *, what: str) -> ModelFacts:
    try:
        return ModelFacts.from_hf_config(config, name=what)
    except ModelConfigError as exc:
        raise StagingError(BAD_INPUT, f"{what} cannot be fine-tuned here: {exc}") from None


def data_files(files: Collection[str], config_name: str | None) -> list[str]:
    """The data files of a Hub dataset (the folder named after the config when there is one),
    and the cards ``datasets`` reads its configs and splits from."""
    suffixes = tuple(s + c for s in DATA_SUFFIXES for c in DATA_COMPRESSION)
    data = [f for f in files if f.endswith(suffixes) and f not in DATA_CARDS]
    if config_name:
        in_folder = [f for f in data if f.split("/")[0] == config_name]
        data = in_folder or data
    return sorted(data) + sorted(f for f in files if f in DATA_CARDS)


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# ---- reading a folder ------------------------------------------------------------------------


def _read_json(path: Path, *, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise StagingError(BAD_INPUT, f"{what}: cannot read {path.name}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise StagingError(BAD_INPUT, f"{what}: {path.name} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise StagingError(BAD_INPUT, f"{what}: {path.name} is not a JSON object")
    return doc


def vocab_size(folder: Path) -> int | None:
    """The tokenizer's vocabulary with its added tokens (``len(tokenizer)``), from the files,
    without loading transformers; None when the folder holds no tokenizer."""
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer  # noqa: PLC0415 - only Hub/local models need it

        return int(Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(True))
    for name in ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model"):
        if (folder / name).is_file():
            return _sentencepiece_size(folder / name) + _added(folder)
    if (folder / "vocab.json").is_file():
        return len(_read_json(folder / "vocab.json", what=str(folder))) + _added(folder)
    if (folder / "vocab.txt").is_file():
        lines = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
        return len(lines) + _added(folder)
    return None


def _sentencepiece_size(path: Path) -> int:
    import sentencepiece  # noqa: PLC0415 - only SentencePiece tokenizers need it

    return int(sentencepiece.SentencePieceProcessor(model_file=str(path)).get_piece_size())


def _added(folder: Path) -> int:
    path = folder / "added_tokens.json"
    return len(_read_json(path, what=str(folder))) if path.is_file() else 0


def check_remote_code(
    config: dict[str, Any], tokenizer_config: dict[str, Any] | None, *, what: str, options: Options
) -> list[str]:
    """Refuse a model that needs custom code unless allowed; the warning when allowed."""
    custom = remote_code(config, tokenizer_config)
    if custom and not options.allow_remote_code:
        raise StagingError(
            BAD_INPUT,
            f"{what} needs remote code ({'; '.join(custom)}), which would run on the trainer: "
            "use a model transformers supports natively, or allow remote code explicitly "
            "(finetune stage --allow-remote-code)",
        )
    return [f"{what}: remote code allowed ({'; '.join(custom)})"] if custom else []


def check_model(config: dict[str, Any], vocab: int | None, *, what: str) -> int:
    """Refuse a model the trainer cannot run (the planner cannot read it, no tokenizer, a
    tokenizer bigger than the embedding); its vocabulary size otherwise."""
    facts = model_facts(config, what=what)
    if vocab is None:
        raise StagingError(
            BAD_INPUT,
            f"{what} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json): save it "
            "beside the model with tokenizer.save_pretrained",
        )
    if vocab > facts.vocab_size:
        raise StagingError(
            BAD_INPUT,
            f"{what}: its tokenizer has {vocab} tokens but the model's embedding only "
            f"{facts.vocab_size} (config.json vocab_size): the tokenizer does not belong to "
            "this model",
        )
    return vocab


def _hub_report(
    source: str,
    revision: str | None,
    commit: str,
    cache: Path,
    folder: Path,
    names: list[str],
    fetched: int,
    start: float,
) -> SourceReport:
    """What staging one Hub repository did: its snapshot ``folder`` under ``cache``."""
    return SourceReport(
        kind="hf",
        source=source,
        revision=revision,
        commit=commit,
        snapshot=str(folder.relative_to(cache)),
        files=len(names),
        bytes=_folder_bytes(folder, names),
        fetched_bytes=fetched,
        seconds=round(time.monotonic() - start, 3),
    )


def _folder_bytes(folder: Path, names: Collection[str]) -> int:
    return sum((folder / n).stat().st_size for n in names if (folder / n).is_file())


# ---- the Hub ---------------------------------------------------------------------------------


def _token(cfg: ModelConfig) -> str | None:
    if not cfg.token_env:
        return None
    token = os.environ.get(cfg.token_env)
    if not token:
        raise StagingError(
            BAD_INPUT,
            f"the Hub token variable {cfg.token_env} is empty: put the token in the Secret that "
            "spec.model.tokenSecretRef names, or drop tokenSecretRef for a public model",
        )
    return token


def repo_dir(cache: Path, repo_id: str, repo_type: Literal["model", "dataset"]) -> Path:
    """A repository's folder in the Hugging Face cache layout (``models--org--name``)."""
    return cache / f"{repo_type}s--{repo_id.replace('/', '--')}"


def snapshot_dir(
    cache: Path, repo_id: str, repo_type: Literal["model", "dataset"], commit: str
) -> Path:
    """Where staging left ``repo_id`` at ``commit``: a folder of the files, by their names (the
    trainer loads a staged dataset from here: ``load_dataset(str(folder), config, split=...)``)."""
    return repo_dir(cache, repo_id, repo_type) / "snapshots" / commit


@contextmanager
def hub_errors(what: str, revision: str | None, token_env: str | None) -> Iterator[None]:
    """huggingface_hub's typed errors, as one line each that says what to do."""
    import httpx2  # noqa: PLC0415 - huggingface_hub's HTTP client
    from huggingface_hub.errors import (  # noqa: PLC0415 - Hub sources only
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    tokened = f"the token in {token_env}" if token_env else "no token (spec.model.tokenSecretRef)"
    try:
        yield
    except GatedRepoError:
        raise StagingError(
            BAD_INPUT,
            f"{what} is gated and the Hub refused {tokened}: accept its terms on the Hub with "
            "the account whose token spec.model.tokenSecretRef names",
        ) from None
    except RevisionNotFoundError:
        raise StagingError(
            BAD_INPUT,
            f"{what} has no revision {revision!r}: give a branch, tag or commit that exists "
            "(hf://org/name@revision)",
        ) from None
    except RepositoryNotFoundError:
        raise StagingError(
            BAD_INPUT,
            f"{what} was not found on the Hub (with {tokened}): check the name; a private "
            "repository needs a token with read access (spec.model.tokenSecretRef)",
        ) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise StagingError(
                BAD_INPUT,
                f"the Hub refused {tokened} for {what} (HTTP {status}): put a valid token with "
                "read access in the Secret that spec.model.tokenSecretRef names",
            ) from None
        raise StagingError(
            STAGING_FAILED, f"the Hub failed for {what} (HTTP {status}): {_first_line(exc)}"
        ) from None
    except HFValidationError as exc:
        raise StagingError(
            BAD_INPUT, f"{what} is not a Hub repository (org/name): {_first_line(exc)}"
        ) from None
    except httpx2.HTTPError as exc:  # connection refused, timeouts, a cut that did not resume
        raise StagingError(
            STAGING_FAILED, f"cannot reach the Hub for {what}: {_first_line(exc)}"
        ) from None
    except LocalEntryNotFoundError as exc:
        raise StagingError(
            STAGING_FAILED, f"cannot reach the Hub for {what}: {_first_line(exc)}"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class Hub:
    """One repository on the Hub, downloaded into the cache (the I/O at the edge)."""

    repo_id: str
    repo_type: Literal["model", "dataset"]
    cache: Path
    token: str | None
    endpoint: str | None
    log: Callable[[str], None]
    #: The files the snapshot held before this staging (set by :meth:`info`).
    cached: set[str] = field(default_factory=set)
    #: The blobs (file contents, shared by commits) the cache held before (set by :meth:`info`).
    blobs: set[str] = field(default_factory=set)

    def info(self, revision: str | None) -> tuple[str, dict[str, int]]:
        """The commit ``revision`` names, and its files with their sizes."""
        from huggingface_hub import HfApi  # noqa: PLC0415 - Hub sources only

        api = HfApi(endpoint=self.endpoint, token=self.token)
        if self.repo_type == "model":
            info: Any = api.model_info(self.repo_id, revision=revision, files_metadata=True)
        else:
            info = api.dataset_info(self.repo_id, revision=revision, files_metadata=True)
        if not info.sha:
            raise StagingError(STAGING_FAILED, f"the Hub gave no commit for {self.repo_id}")
        files = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
        folder = self.snapshot(str(info.sha))
        self.cached = {n for n in files if (folder / n).is_file()}
        blobs = self.storage() / "blobs"
        self.blobs = set(os.listdir(blobs)) if blobs.is_dir() else set()
        return str(info.sha), files

    def storage(self) -> Path:
        return repo_dir(self.cache, self.repo_id, self.repo_type)

    def snapshot(self, commit: str) -> Path:
        return snapshot_dir(self.cache, self.repo_id, self.repo_type, commit)

    def file(self, commit: str, name: str) -> Path:
        from huggingface_hub import hf_hub_download  # noqa: PLC0415

        return Path(
            hf_hub_download(
                self.repo_id,
                name,
                repo_type=self.repo_type,
                revision=commit,
                cache_dir=self.cache,
                token=self.token,
                endpoint=self.endpoint,
            )
        )

    def download(self, commit: str, names: list[str], sizes: dict[str, int]) -> int:
        """Fetch ``names`` at ``commit`` (those not cached yet); the bytes this staging fetched
        (new blobs: a file another commit already brought is not fetched again)."""
        from huggingface_hub import snapshot_download  # noqa: PLC0415
        from huggingface_hub.utils.tqdm import disable_progress_bars  # noqa: PLC0415

        folder = self.snapshot(commit)
        missing = [n for n in names if n not in self.cached]
        todo = sum(sizes.get(n, 0) for n in missing)
        self.log(
            f"  {len(names)} files, {human(sum(sizes.get(n, 0) for n in names))}: "
            f"{len(names) - len(missing)} cached, {len(missing)} to fetch ({human(todo)})"
        )
        if any(not (folder / n).is_file() for n in missing):
            if not sys.stderr.isatty():
                disable_progress_bars()  # one line per file below instead of bars in a log
            snapshot_download(
                self.repo_id,
                repo_type=self.repo_type,
                revision=commit,
                cache_dir=self.cache,
                allow_patterns=[glob.escape(n) for n in names],
                token=self.token,
                endpoint=self.endpoint,
            )
        fetched = 0
        for name in names:
            size = (folder / name).stat().st_size
            new = (folder / name).resolve().name not in self.blobs
            fetched += size if new else 0
            self.log(f"  {'fetched' if new else 'cached '} {name} ({human(size)})")
        return fetched

    def pin(self, revision: str | None, commit: str) -> None:
        """Record ``revision -> commit`` in the cache's refs/, as huggingface_hub does, so an
        offline reader that asks for the branch finds the staged commit."""
        if not revision or revision == commit:
            return
        ref = self.storage() / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
        tmp.write_text(commit, encoding="utf-8")
        tmp.replace(ref)


# ---- staging ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StagedModel:
    report: SourceReport
    config: dict[str, Any]
    vocab_size: int
    warnings: tuple[str, ...]


def stage_model(
    cfg: ModelConfig,
    cache: Path,
    *,
    options: Options,
    endpoint: str | None = None,
    log: Callable[[str], None] = print,
) -> StagedModel:
    start = time.monotonic()
    if cfg.kind == "builtin":
        return _builtin_model(cfg, start, log)
    if cfg.kind == "local":
        return _local_model(cfg, options, start, log)
    what = f"model {cfg.name_or_path}"
    token = _token(cfg)
    hub = Hub(cfg.name_or_path, "model", cache, token, endpoint, log)
    with hub_errors(what, cfg.revision, cfg.token_env):
        commit, sizes = hub.info(cfg.revision)
        log(f"model {cfg.name_or_path}@{cfg.revision or 'main'}: commit {commit}")
        weights = pick_weights(sizes, what=what, options=options)
        hub.pin(cfg.revision, commit)
        # The small files first: refuse a model before fetching gigabytes of it.
        config = _read_json(hub.file(commit, "config.json"), what=what)
        tok_cfg = None
        if "tokenizer_config.json" in sizes:
            tok_cfg = _read_json(hub.file(commit, "tokenizer_config.json"), what=what)
        warnings = check_remote_code(config, tok_cfg, what=what, options=options)
        model_facts(config, what=what)
        shard_files = weights.files
        if weights.index:
            shard_files = shards(_read_json(hub.file(commit, weights.index), what=what), what=what)
        names = [n for n in (*MODEL_CONFIGS, *TOKENIZER_FILES) if n in sizes]
        names += [*([weights.index] if weights.index else []), *shard_files]
        if warnings:  # remote code allowed: the code files beside the config
            names += sorted(n for n in sizes if n.endswith(".py") and "/" not in n)
        missing = [n for n in shard_files if n not in sizes]
        if missing:
            raise StagingError(
                BAD_INPUT, f"{what}: its weights index names missing files {missing[:3]}"
            )
        fetched = hub.download(commit, names, sizes)
    folder = hub.snapshot(commit)
    vocab = check_model(config, vocab_size(folder), what=what)
    if weights.pickle:
        warnings.append(f"{what}: pickle weights allowed ({', '.join(shard_files)})")
    return StagedModel(
        _hub_report(cfg.name_or_path, cfg.revision, commit, cache, folder, names, fetched, start),
        config,
        vocab,
        tuple(warnings),
    )


def _local_model(
    cfg: ModelConfig, options: Options, start: float, log: Callable[[str], None]
) -> StagedModel:
    folder = Path(cfg.name_or_path)
    what = f"model {folder}"
    if not (folder / "config.json").is_file():
        raise StagingError(
            BAD_INPUT,
            f"no model at {folder}: the folder must hold config.json and weights saved with "
            "save_pretrained; check the model source path (and that its volume is mounted)",
        )
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    weights = pick_weights(names, what=what, options=options)
    config = _read_json(folder / "config.json", what=what)
    tok_cfg_path = folder / "tokenizer_config.json"
    tok_cfg = _read_json(tok_cfg_path, what=what) if tok_cfg_path.is_file() else None
    warnings = check_remote_code(config, tok_cfg, what=what, options=options)
    vocab = check_model(config, vocab_size(folder), what=what)
    if weights.pickle:
        warnings.append(f"{what}: pickle weights allowed")
    log(f"model {folder}: local folder, {len(names)} files, nothing to download")
    return StagedModel(
        SourceReport(
            kind="local",
            source=str(folder),
            files=len(names),
            bytes=_folder_bytes(folder, names),
            seconds=round(time.monotonic() - start, 3),
        ),
        config,
        vocab,
        tuple(warnings),
    )


def _builtin_model(cfg: ModelConfig, start: float, log: Callable[[str], None]) -> StagedModel:
    name = cfg.name_or_path
    if name not in TINY_CONFIGS:
        raise StagingError(
            BAD_INPUT,
            f"unknown builtin model {name!r}: use one of "
            f"{', '.join('builtin://' + n for n in sorted(TINY_CONFIGS))}",
        )
    config = dict(TINY_CONFIGS[name])
    model_facts(config, what=f"model builtin://{name}")
    spec = importlib.util.find_spec(BUILTIN_TOKENIZER[0])
    if spec is None or not spec.submodule_search_locations:
        raise StagingError(
            BAD_INPUT,
            "builtin models need mistral-common: pip install 'finetune-operator[trainer]'",
        )
    tokenizer = Path(next(iter(spec.submodule_search_locations))) / BUILTIN_TOKENIZER[1]
    log(f"model builtin://{name}: built in, nothing to download")
    return StagedModel(
        SourceReport(kind="builtin", source=name, seconds=round(time.monotonic() - start, 3)),
        config,
        _sentencepiece_size(tokenizer),
        (),
    )


def stage_data(
    cfg: DataConfig,
    cache: Path,
    *,
    token: str | None,
    token_env: str | None,
    endpoint: str | None = None,
    log: Callable[[str], None] = print,
) -> SourceReport:
    start = time.monotonic()
    if cfg.kind == "builtin":
        if cfg.name_or_path not in BUILTIN_DATASETS:
            raise StagingError(
                BAD_INPUT,
                f"unknown builtin dataset {cfg.name_or_path!r}: use "
                f"{', '.join('builtin://' + n for n in BUILTIN_DATASETS)}, an hf://org/name "
                "dataset or a file:// path",
            )
        log(f"dataset builtin://{cfg.name_or_path}: built in, nothing to download")
        return SourceReport(
            kind="builtin", source=cfg.name_or_path, seconds=round(time.monotonic() - start, 3)
        )
    if cfg.kind == "local":
        path = Path(cfg.name_or_path)
        if not path.exists():
            raise StagingError(BAD_INPUT, f"no dataset at {path}: check the dataset source path")
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        log(f"dataset {path}: local, {len(files)} files, nothing to download")
        return SourceReport(
            kind="local",
            source=str(path),
            files=len(files),
            bytes=sum(p.stat().st_size for p in files),
            seconds=round(time.monotonic() - start, 3),
        )
    what = f"dataset {cfg.name_or_path}"
    hub = Hub(cfg.name_or_path, "dataset", cache, token, endpoint, log)
    with hub_errors(what, cfg.revision, token_env):
        commit, sizes = hub.info(cfg.revision)
        log(f"dataset {cfg.name_or_path}@{cfg.revision or 'main'}: commit {commit}")
        names = data_files(sizes, cfg.config_name)
        if not any(n not in DATA_CARDS for n in names):
            scripts = [n for n in sizes if n.endswith(".py")]
            why = " (it has a loading script, which datasets no longer runs)" if scripts else ""
            raise StagingError(
                BAD_INPUT,
                f"{what} has no data files (parquet, json, jsonl, csv, arrow or txt){why}: use "
                "a dataset with data files, e.g. its refs/convert/parquet revision",
            )
        hub.pin(cfg.revision, commit)
        fetched = hub.download(commit, names, sizes)
    folder = hub.snapshot(commit)
    return _hub_report(cfg.name_or_path, cfg.revision, commit, cache, folder, names, fetched, start)


def stage(
    config: TrainerConfig,
    cache: Path,
    *,
    options: Options = Options(),
    endpoint: str | None = None,
    log: Callable[[str], None] = print,
) -> StagingReport:
    """Stage the run's model and dataset into ``cache``; raises :class:`StagingError`."""
    cache = cache.absolute()
    model = stage_model(config.model, cache, options=options, endpoint=endpoint, log=log)
    token = _token(config.model) if config.model.kind == "hf" or config.data.kind == "hf" else None
    dataset = stage_data(
        config.data,
        cache,
        token=token,
        token_env=config.model.token_env,
        endpoint=endpoint,
        log=log,
    )
    shape = shape_of(model.config)
    what = f"model {config.model.name_or_path}"
    if model_facts(shape, what=what) != model_facts(model.config, what=what):
        shape = model.config  # a key the planner reads that SHAPE_KEYS lacks: send it all
    return StagingReport(
        model=model.report,
        dataset=dataset,
        config=shape,
        vocab_size=model.vocab_size,
        warnings=model.warnings,
    )


# ---- the staging Job's container ---------------------------------------------------------------


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def main(argv: list[str] | None = None) -> int:
    from finetune_trainer.failure import (  # noqa: PLC0415 - it imports torch; staging does not
        MAX_MESSAGE_BYTES,
        Failure,
        termination_log,
        write_termination_message,
    )

    parser = argparse.ArgumentParser(
        prog="python -m finetune_trainer.staging",
        description="Stage a run's model and dataset into a cache folder before training.",
    )
    parser.add_argument("--config", required=True, type=Path, help="the TrainerConfig JSON file")
    parser.add_argument("--cache", required=True, type=Path, help="the cache folder (HF layout)")
    parser.add_argument("--allow-pickle-weights", action="store_true")
    parser.add_argument("--allow-remote-code", action="store_true")
    args = parser.parse_args(argv)
    secret: str | None = None
    try:
        try:
            config = TrainerConfig.load(args.config)
        except (OSError, ValueError) as exc:
            raise StagingError(
                BAD_INPUT, f"cannot read the trainer config {args.config}: {_first_line(exc)}"
            ) from None
        secret = os.environ.get(config.model.token_env) if config.model.token_env else None
        options = Options(args.allow_pickle_weights, args.allow_remote_code)
        report = stage(
            config, args.cache, options=options, log=lambda s: print(_scrub(s, secret), flush=True)
        )
        line = report.line()
        if len(line.encode()) >= MAX_MESSAGE_BYTES:
            raise StagingError(
                STAGING_FAILED,
                f"the staging report is {len(line.encode())} bytes, over the "
                f"{MAX_MESSAGE_BYTES} a termination message keeps",
            )
    except StagingError as exc:
        failure = Failure(exc.reason, _scrub(str(exc), secret))
    except Exception as exc:  # every failure is one line, never a traceback
        failure = Failure(
            STAGING_FAILED, _scrub(f"{type(exc).__name__}: {_first_line(exc)}", secret)
        )
    else:
        path = termination_log()
        if path is not None:
            path.write_text(line, encoding="utf-8")
        print(
            f"staged: model {report.model.commit or report.model.source}, dataset "
            f"{report.dataset.commit or report.dataset.source}, "
            f"{human(report.model.fetched_bytes + report.dataset.fetched_bytes)} fetched",
            flush=True,
        )
        return 0
    print(f"error: {failure.message}", file=sys.stderr, flush=True)
    write_termination_message(failure)
    return EXIT_BAD_INPUT if failure.reason == BAD_INPUT else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
