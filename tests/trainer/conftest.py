"""Shared pieces of the trainer tests: a small local model, configs, and torchrun runs on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

#: Small enough for 2 shared cores; the real Mistral-7B-v0.3 tokenizer sets the vocabulary.
SMALL_MISTRAL = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "vocab_size": 32768,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "sliding_window": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init Mistral-architecture model and the offline tokenizer, saved as HF does."""
    from transformers import AutoModelForCausalLM, MistralConfig

    from finetune_trainer.config import ModelConfig
    from finetune_trainer.model_loading import load_tokenizer

    out = tmp_path_factory.mktemp("small-mistral")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MistralConfig(**SMALL_MISTRAL))
    model.save_pretrained(out)
    load_tokenizer(ModelConfig(kind="builtin", name_or_path="tiny-mistral")).save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def trainer_config(model_dir: Path, run_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A TrainerConfig document for the small model on the stdlib alpaca data."""
    cfg: dict[str, Any] = {
        "run_name": "test",
        "model": {"kind": "local", "name_or_path": str(model_dir), "dtype": "float32"},
        "data": {
            "kind": "builtin",
            "name_or_path": "python-stdlib-alpaca",
            "format": "alpaca",
            "columns": {"instruction": "instruction", "input": "input", "output": "output"},
            "max_seq_length": 128,
            "packing": True,
            "eval_fraction": 0.02,
            "num_proc": 1,
        },
        "optim": {"learning_rate": 3e-3, "lr_scheduler": "constant", "warmup_steps": 2},
        "schedule": {"max_steps": 10, "global_batch_size": 8, "seed": 7},
        "hardware": {"gpu_type": "CPU", "num_nodes": 1, "procs_per_node": 1},
        "checkpoint": {"dir": str(run_dir / "ckpt"), "every_steps": 100, "keep_last": 2},
        "output_dir": str(run_dir / "model"),
        "metrics": {"port": 0, "log_every_steps": 1},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            cfg[section][field] = value
        else:
            cfg[section] = value
    return cfg


def write_config(cfg: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def trainer_env(journal: Path, nproc: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FINETUNE_LOG_JSONL=str(journal),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)),
        PYTHONPATH=os.pathsep.join([str(REPO / "trainer-image"), env.get("PYTHONPATH", "")]),
    )
    return env


def torchrun(config: Path, nproc: int, journal: Path) -> subprocess.Popen[str]:
    """The same torchrun command `finetune run` launches, with the test's environment."""
    from finetune_trainer.launch import torchrun_command

    cmd = torchrun_command(config, nproc)
    return subprocess.Popen(
        cmd,
        env=trainer_env(journal, nproc),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_journal(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_journal(path) if "loss" in r}


def wait(proc: subprocess.Popen[str], timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def run_trainer(config: Path, nproc: int, journal: Path, timeout: float = 600) -> str:
    proc = torchrun(config, nproc, journal)
    out = wait(proc, timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def poll(fn: Callable[[], Any], timeout: float, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    return None


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


def rank_pid(parent: int, rank: int) -> int | None:
    """The process of ``rank`` among torchrun's children (read from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None
