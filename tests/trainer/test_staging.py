"""Staging a run's model and data (finetune_trainer.staging) against a fake Hub over real HTTP.

huggingface_hub itself resolves and downloads, from tests/hubserver.py (a stdlib HTTP server that
speaks the Hub's file API and counts the bytes it serves), into a cache folder in the Hugging
Face layout. Models and data are tiny (a 1-layer Mistral with the real Mistral-7B-v0.3
tokenizer, a few alpaca rows), so the whole file takes seconds, bar the two subprocess tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, trainer_config
from finetune_trainer.config import ModelConfig, TrainerConfig
from finetune_trainer.failure import MAX_MESSAGE_BYTES
from finetune_trainer.staging import (
    BAD_INPUT,
    Options,
    StagingError,
    StagingReport,
    shape_of,
    stage,
    stage_model,
)
from hubserver import HubServer

pytestmark = pytest.mark.trainer

MODEL = "tiny-org/tiny-mistral"
DATA = "tiny-org/alpaca-rows"
TOKEN = "hf_StagingTestSecret0123456789"
#: What the trainer reads from the model repository (the rest must never be fetched).
NEEDED = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer Mistral (random init, 4 MB) and the offline tokenizer, saved as HF does."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    from finetune_trainer.model_loading import load_tokenizer

    out = tmp_path_factory.mktemp("tiny-mistral")
    torch.manual_seed(0)
    config = MistralConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=32,
        vocab_size=32768,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    load_tokenizer(ModelConfig(kind="builtin", name_or_path="tiny-mistral")).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model_files(model_dir: Path) -> dict[str, bytes]:
    """The model's files, plus what a Hub repository often holds beside them and the trainer
    does not read (Mistral's consolidated weights, pickle weights, a README)."""
    files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    files.pop("special_tokens_map.json", None)
    files.pop("tokenizer.model", None)
    assert set(files) >= NEEDED, sorted(files)
    return {
        **files,
        "consolidated.safetensors": b"\0" * 5000,
        "pytorch_model.bin": b"\x80\x04pickle" * 300,
        "README.md": b"# tiny\n",
        "original/params.json": b"{}",
    }


def data_files() -> dict[str, bytes]:
    rows = [
        {"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)}
        for i in range(8)
    ]
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return {"README.md": b"# rows\n", "data/train.jsonl": body, "loader.py": b"# not fetched\n"}


@pytest.fixture
def hub(model_files: dict[str, bytes]) -> Any:
    with HubServer() as server:
        server.add_repo(MODEL, model_files)
        server.add_repo(DATA, data_files(), repo_type="dataset")
        yield server


def config(
    tmp_path: Path, model: dict[str, Any], data: dict[str, Any] | None = None
) -> TrainerConfig:
    doc = trainer_config(Path("unused"), tmp_path, model={"dtype": "float32", **model})
    if data is not None:
        doc["data"] = {**doc["data"], **data}
    return TrainerConfig.model_validate(doc)


def hf_config(tmp_path: Path, **model: Any) -> TrainerConfig:
    return config(
        tmp_path,
        {"kind": "hf", "name_or_path": MODEL, **model},
        {"kind": "hf", "name_or_path": DATA},
    )


def test_a_branch_resolves_to_its_commit_and_a_second_staging_fetches_nothing(
    hub: HubServer, tmp_path: Path, model_files: dict[str, bytes]
) -> None:
    cache = tmp_path / "cache"
    report = stage(
        hf_config(tmp_path, revision="main"), cache, endpoint=hub.url, log=lambda _: None
    )

    commit = hub.repos[("model", MODEL)].commit
    assert report.model.commit == commit
    assert report.model.snapshot == f"models--tiny-org--tiny-mistral/snapshots/{commit}"
    assert (cache / "models--tiny-org--tiny-mistral" / "refs" / "main").read_text() == commit
    assert report.dataset.commit == hub.repos[("dataset", DATA)].commit
    # Only what the trainer reads came over the wire, and the report counts it.
    fetched = {k.split("/", 2)[2] for k, n in hub.bytes_served.items() if n and k.startswith(MODEL)}
    assert fetched == NEEDED
    needed_bytes = sum(len(model_files[f]) for f in NEEDED)
    assert hub.served(MODEL) == needed_bytes == report.model.fetched_bytes == report.model.bytes
    assert hub.served(DATA) == report.dataset.fetched_bytes > 0
    assert hub.served(DATA, "loader.py") == 0
    assert report.vocab_size == 32768
    assert report.config["hidden_size"] == 16
    assert report.config["num_hidden_layers"] == 1

    again = stage(hf_config(tmp_path, revision="main"), cache, endpoint=hub.url, log=lambda _: None)
    assert hub.served(MODEL) == needed_bytes  # not one more file byte
    assert again.model.commit == commit
    assert again.model.fetched_bytes == again.dataset.fetched_bytes == 0
    assert again.model.bytes == report.model.bytes


def test_a_new_upload_on_the_branch_is_a_new_commit_and_the_staged_one_stays(
    hub: HubServer, tmp_path: Path, model_files: dict[str, bytes]
) -> None:
    cache = tmp_path / "cache"
    first = stage(hf_config(tmp_path), cache, endpoint=hub.url, log=lambda _: None)
    hub.add_repo(MODEL, {**model_files, "generation_config.json": b'{"do_sample": true}'})
    pinned = stage(
        hf_config(tmp_path, revision=first.model.commit), cache, endpoint=hub.url, log=print
    )
    latest = stage(hf_config(tmp_path), cache, endpoint=hub.url, log=print)
    assert pinned.model.commit == first.model.commit
    assert pinned.model.fetched_bytes == 0
    assert latest.model.commit == hub.repos[("model", MODEL)].commit != first.model.commit
    assert latest.model.fetched_bytes == len(b'{"do_sample": true}')  # the changed file only


def test_a_cut_download_resumes_where_it_stopped(
    hub: HubServer, tmp_path: Path, model_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub resumes from the last whole chunk it received (10 MiB by default, more
    than this model's weights): smaller chunks here, and a cut at a chunk boundary."""
    from huggingface_hub import constants

    chunk = 64 * 1024
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", chunk)
    size = len(model_files["model.safetensors"])
    cut = (size // 3) // chunk * chunk
    hub.cut_once(MODEL, "model.safetensors", after=cut)
    report = stage(hf_config(tmp_path), tmp_path / "cache", endpoint=hub.url, log=lambda _: None)
    assert hub.served(MODEL, "model.safetensors") == size  # the first third was not sent twice
    url = f"/{MODEL}/resolve/{report.model.commit}/model.safetensors"
    assert [r for r in hub.requests if r.startswith(f"GET {url}")] == [
        f"GET {url}",
        f"GET {url} bytes={cut}-",
    ]
    staged = tmp_path / "cache" / str(report.model.snapshot) / "model.safetensors"
    assert staged.read_bytes() == model_files["model.safetensors"]
    assert report.model.fetched_bytes == report.model.bytes


def test_pickle_weights_are_refused_unless_allowed(
    hub: HubServer, tmp_path: Path, model_files: dict[str, bytes]
) -> None:
    pickled = {k: v for k, v in model_files.items() if "safetensors" not in k}
    hub.add_repo("tiny-org/pickled", pickled)
    cfg = ModelConfig(kind="hf", name_or_path="tiny-org/pickled")
    with pytest.raises(StagingError) as refused:
        stage_model(cfg, tmp_path / "cache", options=Options(), endpoint=hub.url, log=print)
    assert refused.value.reason == BAD_INPUT
    message = str(refused.value)
    assert "\n" not in message
    assert "pickle weights (pytorch_model.bin)" in message
    assert "--allow-pickle-weights" in message
    assert hub.served("tiny-org/pickled") == 0  # refused before fetching anything

    allowed = stage_model(
        cfg,
        tmp_path / "cache",
        options=Options(allow_pickle_weights=True),
        endpoint=hub.url,
        log=print,
    )
    assert hub.served("tiny-org/pickled", "pytorch_model.bin") == len(pickled["pytorch_model.bin"])
    assert any("pickle weights allowed" in w for w in allowed.warnings)


def test_remote_code_is_refused_before_the_weights_are_fetched(
    hub: HubServer, tmp_path: Path, model_files: dict[str, bytes]
) -> None:
    config_json = json.loads(model_files["config.json"])
    config_json["auto_map"] = {"AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    hub.add_repo(
        "tiny-org/custom",
        {
            **model_files,
            "config.json": json.dumps(config_json).encode(),
            "modeling_tiny.py": b"# code\n",
        },
    )
    cfg = ModelConfig(kind="hf", name_or_path="tiny-org/custom")
    with pytest.raises(StagingError) as refused:
        stage_model(cfg, tmp_path / "cache", options=Options(), endpoint=hub.url, log=print)
    assert refused.value.reason == BAD_INPUT
    assert "needs remote code (config.json auto_map ['AutoModelForCausalLM'])" in str(refused.value)
    assert "--allow-remote-code" in str(refused.value)
    assert hub.served("tiny-org/custom", "model.safetensors") == 0

    allowed = stage_model(
        cfg,
        tmp_path / "cache",
        options=Options(allow_remote_code=True),
        endpoint=hub.url,
        log=print,
    )
    assert hub.served("tiny-org/custom", "modeling_tiny.py") == len(b"# code\n")
    assert any("remote code allowed" in w for w in allowed.warnings)


@pytest.mark.parametrize(
    ("model", "token", "expected"),
    [
        pytest.param(
            {"name_or_path": "nobody/nothing"},
            None,
            "model nobody/nothing was not found on the Hub (with no token",
            id="missing-repo",
        ),
        pytest.param(
            {"name_or_path": "tiny-org/gated"},
            None,
            "model tiny-org/gated is gated and the Hub refused no token",
            id="gated-without-token",
        ),
        pytest.param(
            {"name_or_path": "tiny-org/gated", "token_env": "STAGE_TOKEN"},
            "hf_wrong",
            "the Hub refused the token in STAGE_TOKEN for model tiny-org/gated (HTTP 401)",
            id="bad-token",
        ),
        pytest.param(
            {"name_or_path": MODEL, "revision": "v9"},
            None,
            f"model {MODEL} has no revision 'v9'",
            id="missing-revision",
        ),
        pytest.param(
            {"name_or_path": "tiny-org/gated", "token_env": "STAGE_TOKEN"},
            "",
            "the Hub token variable STAGE_TOKEN is empty",
            id="empty-token",
        ),
        pytest.param(
            {"name_or_path": "tiny-org/two//slashes"},
            None,
            "model tiny-org/two//slashes is not a Hub repository (org/name)",
            id="not-a-repo-id",
        ),
    ],
)
def test_hub_errors_are_one_clear_line(
    hub: HubServer,
    tmp_path: Path,
    model_files: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
    model: dict[str, Any],
    token: str | None,
    expected: str,
) -> None:
    hub.add_repo("tiny-org/gated", model_files, token=TOKEN)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    if token is not None:
        monkeypatch.setenv("STAGE_TOKEN", token)
    with pytest.raises(StagingError) as failed:
        stage_model(
            ModelConfig(kind="hf", **model), tmp_path / "cache", options=Options(), endpoint=hub.url
        )
    assert failed.value.reason == BAD_INPUT
    assert str(failed.value).startswith(expected), str(failed.value)
    assert "\n" not in str(failed.value)
    assert hub.served("tiny-org/gated") == 0


def test_an_unreachable_hub_is_one_line_saying_a_retry_may_pass(tmp_path: Path) -> None:
    from finetune_trainer.staging import STAGING_FAILED

    with pytest.raises(StagingError) as failed:
        stage_model(
            ModelConfig(kind="hf", name_or_path=MODEL),
            tmp_path / "cache",
            options=Options(),
            endpoint="http://127.0.0.1:9",  # the discard port: nothing listens
        )
    assert failed.value.reason == STAGING_FAILED
    assert str(failed.value).startswith(f"cannot reach the Hub for model {MODEL}: ")
    assert "\n" not in str(failed.value)


def test_a_local_folder_model_is_read_where_it_is(
    hub: HubServer, tmp_path: Path, model_dir: Path
) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_bytes(data_files()["data/train.jsonl"])
    cfg = config(
        tmp_path,
        {"kind": "local", "name_or_path": str(model_dir)},
        {"kind": "local", "name_or_path": str(data)},
    )
    report = stage(cfg, tmp_path / "cache", endpoint=hub.url, log=lambda _: None)
    assert hub.requests == []
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    assert report.model.kind == "local"
    assert report.model.fetched_bytes == 0
    assert report.model.bytes == sum(p.stat().st_size for p in model_dir.iterdir())
    assert report.dataset.bytes == data.stat().st_size
    assert report.vocab_size == 32768
    assert report.config["model_type"] == "mistral"


def test_a_model_the_trainer_cannot_run_fails_staging_with_the_reason(
    tmp_path: Path, model_dir: Path
) -> None:
    moe = tmp_path / "moe"
    moe.mkdir()
    for p in model_dir.iterdir():
        (moe / p.name).write_bytes(p.read_bytes())
    doc = json.loads((moe / "config.json").read_text())
    (moe / "config.json").write_text(json.dumps({**doc, "num_local_experts": 8}))
    with pytest.raises(StagingError) as failed:
        stage_model(ModelConfig(kind="local", name_or_path=str(moe)), tmp_path, options=Options())
    assert "is a mixture of experts (num_local_experts=8)" in str(failed.value)


def test_the_report_holds_only_the_shape_keys_of_a_large_config() -> None:
    big = {f"key_{i}": "x" * 100 for i in range(200)}
    big.update(model_type="llama", hidden_size=4096, num_hidden_layers=32, vocab_size=128256)
    big.update(num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336)
    shape = shape_of(big)
    assert set(shape) == {
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "vocab_size",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
    }


def _staging(
    tmp_path: Path, cfg: TrainerConfig, hub: HubServer, token: str
) -> tuple[subprocess.CompletedProcess[str], str]:
    """``python -m finetune_trainer.staging`` as the staging Job's container runs it."""
    path = tmp_path / "trainer.json"
    path.write_text(cfg.to_json())
    log = tmp_path / "termination-log"
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": token,
        "FINETUNE_TERMINATION_LOG": str(log),
        "PYTHONPATH": str(REPO / "trainer-image"),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune_trainer.staging",
            "--config",
            str(path),
            "--cache",
            str(tmp_path / "cache"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc, log.read_text() if log.is_file() else ""


def test_the_container_writes_the_report_to_the_termination_log_and_never_the_token(
    hub: HubServer, tmp_path: Path, model_files: dict[str, bytes]
) -> None:
    hub.add_repo("tiny-org/gated", model_files, token=TOKEN)
    cfg = config(
        tmp_path,
        {"kind": "hf", "name_or_path": "tiny-org/gated", "token_env": "HF_TOKEN"},
        {"kind": "hf", "name_or_path": DATA},
    )
    proc, message = _staging(tmp_path, cfg, hub, TOKEN)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(message.encode()) < MAX_MESSAGE_BYTES
    assert message.count("\n") == 1
    report = StagingReport.model_validate_json(message)
    assert report.model.commit == hub.repos[("model", "tiny-org/gated")].commit
    assert report.model.fetched_bytes == hub.served("tiny-org/gated") > 0
    assert "fetched model.safetensors" in proc.stdout
    for text in (proc.stdout, proc.stderr, message):
        assert TOKEN not in text


def test_the_container_fails_with_one_line_and_never_the_token(
    hub: HubServer, tmp_path: Path, model_files: dict[str, bytes]
) -> None:
    hub.add_repo("tiny-org/gated", model_files, token=TOKEN)
    wrong = TOKEN[::-1]
    cfg = config(
        tmp_path,
        {"kind": "hf", "name_or_path": "tiny-org/gated", "token_env": "HF_TOKEN"},
        {"kind": "hf", "name_or_path": DATA},
    )
    proc, message = _staging(tmp_path, cfg, hub, wrong)
    assert proc.returncode == 3  # BadInput: the Job fails at once (podFailurePolicy)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: the Hub refused the token in HF_TOKEN for model tiny-org/gated (HTTP 401): put "
        "a valid token with read access in the Secret that spec.model.tokenSecretRef names"
    ]
    assert json.loads(message) == {"reason": "BadInput", "message": proc.stderr.strip()[7:]}
    for text in (proc.stdout, proc.stderr, message):
        assert wrong not in text
        assert TOKEN not in text


@pytest.mark.slow
def test_the_trainer_loads_the_staged_model_and_data_offline(
    hub: HubServer, tmp_path: Path
) -> None:
    """The trainer pods as the operator makes them (HF_HUB_OFFLINE=1, HF_HUB_CACHE at the cache,
    model and dataset pinned to the staged commits, no token) load both with the trainer's own
    loaders: the model from its snapshot, the dataset from its staged snapshot folder."""
    cache = tmp_path / "cache"
    report = stage(hf_config(tmp_path), cache, endpoint=hub.url, log=lambda _: None)
    script = f"""
from finetune_trainer.config import DEFAULT_COLUMNS, DataConfig, ModelConfig
from finetune_trainer.data import load_raw, staged_dataset
from finetune_trainer.model_loading import load_model, load_tokenizer
import torch
cfg = ModelConfig(kind="hf", name_or_path={MODEL!r}, revision={report.model.commit!r})
model = load_model(cfg, seed=0, dtype=torch.float32)
tok = load_tokenizer(cfg)
data = DataConfig(kind="hf", name_or_path={DATA!r}, revision={report.dataset.commit!r},
                  columns=DEFAULT_COLUMNS["alpaca"])
assert staged_dataset(data) is not None
rows, _ = load_raw(data, seed=0)
print(model.config.hidden_size, len(tok), len(rows), rows[0]["output"])
"""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing there: offline means offline
        "PYTHONPATH": str(REPO / "trainer-image"),
    }
    served = hub.served(MODEL)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["16", "32768", "8", "1"]
    assert hub.served(MODEL) == served
