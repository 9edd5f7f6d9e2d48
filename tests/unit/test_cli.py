"""The ``finetune`` command as a user runs it: the installed console scripts, in a subprocess."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from finetune_operator import api, crd, oplog, render
from finetune_operator.settings import Settings, SettingsError
from helpers import EXAMPLES, ROOT

SCRIPT_DIR = Path(sys.executable).parent


def run(
    *args: str, stdin: str | None = None, script: str = "finetune"
) -> subprocess.CompletedProcess[str]:
    exe = SCRIPT_DIR / script
    assert exe.exists(), f"{script} is not installed next to {sys.executable}"
    return subprocess.run(
        [str(exe), *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def test_validate_accepts_every_example() -> None:
    result = run("validate", *map(str, EXAMPLES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("valid FineTuneJob") == len(EXAMPLES)


def test_validate_prints_one_line_per_problem_with_its_path(tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "tiny-local.yaml").read_text())
    doc["spec"]["hyperparameters"]["learningRate"] = 0.001
    doc["spec"]["dataset"]["format"] = "sharegpt"
    doc["spec"]["resources"]["tolerations"] = [{"operator": "Exists", "value": "x"}]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    result = run("validate", str(bad))
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, lines  # the CEL rule runs once the types are right
    assert any("spec.hyperparameters.learningRate: must be a string" in line for line in lines)
    assert any("spec.dataset.format: 'sharegpt' is not allowed" in line for line in lines)
    assert all(line.startswith(f"✗ {bad}: spec.") for line in lines)


def test_validate_reports_each_document_of_a_multi_document_file(tmp_path: Path) -> None:
    good = (ROOT / "examples" / "tiny-local.yaml").read_text()
    secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: hf-token}\n"
    path = tmp_path / "all.yaml"
    path.write_text(good + "---\n" + secret + "---\n" + good.replace("maxSteps: 60", "epochs: 0"))
    result = run("validate", str(path))
    assert result.returncode == 1
    assert f"{path}#1: valid FineTuneJob tiny-local" in result.stdout
    assert f"{path}#2: skipped (Secret)" in result.stdout
    assert f"{path}#3: spec.hyperparameters.epochs" in result.stdout


def _mistral(tmp_path: Path, **resources: object) -> Path:
    """The Mistral example on other resources, full fine-tune, with planner settings pinned."""
    doc = yaml.safe_load((ROOT / "examples" / "mistral-7b-python-code.yaml").read_text())
    doc["spec"]["resources"].update(resources)
    doc["spec"]["method"] = {"type": "full"}
    doc["spec"]["parallelism"] = {"cpuOffload": False}
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(doc))  # JSON keeps learningRate a string for kubectl's reader
    return path


def test_validate_refuses_a_job_no_plan_fits_saying_what_would(tmp_path: Path) -> None:
    path = _mistral(tmp_path, numNodes=1, gpusPerNode=1, gpuType="A100-40GB")
    result = run("validate", str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = result.stdout.strip().splitlines()
    assert line.startswith(f"✗ {path}: spec: no plan fits"), line
    assert "PlanInfeasible" in line
    assert "Would fit:" in line, line
    assert "2 GPUs" in line, line


def test_validate_accepts_the_same_job_once_it_fits(tmp_path: Path) -> None:
    path = _mistral(tmp_path, numNodes=1, gpusPerNode=8, gpuType="A100-40GB")
    result = run("validate", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid FineTuneJob" in result.stdout


def test_validate_refuses_more_gpus_per_node_than_a_node_holds(tmp_path: Path) -> None:
    path = _mistral(tmp_path, numNodes=1, gpusPerNode=16, gpuType="H100-80GB")
    result = run("validate", str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = result.stdout.strip().splitlines()
    assert line.startswith(f"✗ {path}: spec.resources.gpusPerNode: one H100-80GB"), line
    assert "at most 8 GPUs: write gpusPerNode: 8" in line, line


def test_validate_reads_stdin() -> None:
    text = (ROOT / "examples" / "tiny-local.yaml").read_text()
    result = run("validate", "-", stdin=text)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("content", "says"),
    [(None, "cannot read"), ("spec: [unclosed\n", "not valid YAML")],
)
def test_unreadable_input_exits_2_with_a_reason(
    tmp_path: Path, content: str | None, says: str
) -> None:
    path = tmp_path / "job.yaml"
    if content is not None:
        path.write_text(content)
    result = run("validate", str(path))
    assert result.returncode == 2
    assert says in result.stderr


def test_crd_prints_the_generated_crd() -> None:
    result = run("crd")
    assert result.returncode == 0
    assert result.stdout == crd.crd_yaml()


def test_installed_as_a_kubectl_plugin() -> None:
    result = run("version", script="kubectl-finetune")
    assert result.returncode == 0
    assert result.stdout.startswith("finetune ")


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("validate", "crd"):
        assert command in result.stdout


# --------------------------------------------------------------------------- get and watch


def _job(name: str, status: dict[str, object] | None = None) -> api.FineTuneJob:
    document = yaml.safe_load((ROOT / "examples" / "mistral-7b-python-code.yaml").read_text())
    document["metadata"] = {"name": name, "namespace": "default"}
    if status is not None:
        document["status"] = status
    return api.parse(document)


PLANNED = {
    "phase": "Running",
    "plan": {
        "world": 16, "dataParallel": 1, "fsdp": 16, "tensorParallel": 1, "pipelineParallel": 1,
        "microBatchSize": 2, "gradientAccumulation": 4, "activationCheckpointing": "selective",
        "estPeakMemoryBytesPerGPU": 1, "estTokensPerSecond": 1, "estMFU": "0.4",
        "summary": "fsdp16 mbs2 ga4 ac=selective",
    },
}  # fmt: skip


def _printed(table: object, width: int) -> list[str]:
    console = Console(width=width, file=io.StringIO(), highlight=False, soft_wrap=True)
    console.print(table)
    return console.file.getvalue().splitlines()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("name", "plan"),
    [
        ("llama3-8b-lora", "fsdp16 mbs2 ga4 ac=selective"),  # all of it
        ("llama3-8b-cnn-dailymail-lora-r16", "fsdp16 mbs2 ga4 ac=s…"),  # shortened, one line
        ("mistral-7b-python-code-lora-sweep-lr2e-5-run-03", None),  # no room for a plan
    ],
)
def test_get_fits_80_columns_and_never_cuts_a_name(name: str, plan: str | None) -> None:
    done = {**PLANNED, "progress": {"step": 450, "summary": "450/1000 (45%)", "loss": "1.2346"}}
    jobs = [_job(name, done), _job("short", {"phase": "Pending"})]
    lines = _printed(render.jobs_table(jobs, width=80), 80)
    assert len(lines) == 3, lines  # the header and one line per job: nothing wraps
    assert all(len(line) <= 80 for line in lines), lines
    assert lines[1].startswith(name + " ")  # the whole name
    assert "Running" in lines[1]
    assert "450/1000 (45%)" in lines[1]
    assert (plan in lines[1]) if plan else ("PLAN" not in lines[0])
    wide = _printed(render.jobs_table(jobs, width=200), 200)
    assert "hf://mistralai/Mistral-7B-v0.3" in wide[1]  # a wide terminal shows everything
    assert wide[0].split() == ["NAME", "PHASE", "MODEL", "GPUS", "PLAN", "PROGRESS", "LOSS", "AGE"]


def test_get_says_when_a_running_job_has_no_metrics_and_why_a_job_is_stuck() -> None:
    stuck = {
        "phase": "Pending",
        "failure": {"reason": "PersistentVolumeClaimMissing", "message": "create it"},
    }
    lines = _printed(render.jobs_table([_job("a", PLANNED), _job("b", stuck)], width=200), 200)
    assert "REASON" in lines[0].split()
    assert "no metrics yet" in lines[1]
    assert "PersistentVolumeClaimMissing" in lines[2]


def test_watch_says_why_there_is_no_bar_yet() -> None:
    note = render.progress_note(_job("a", PLANNED))
    assert note.startswith("no metrics from the trainer yet (")
    assert "finetune logs a" in note
    stuck = {"phase": "Pending", "failure": {"reason": "Unschedulable", "message": "0/3 nodes"}}
    assert render.progress_note(_job("b", stuck)) == "waiting for the pods to start: 0/3 nodes"
    running = {**PLANNED, "progress": {"step": 3, "loss": "2.5"}}
    assert render.progress_note(_job("c", running)) == "step 3, loss 2.5"
    summary = {**PLANNED, "progress": {"step": 3, "summary": "3/10 (30%)"}}
    assert render.progress_note(_job("d", summary)) == "step 3/10 (30%)"


def test_operator_log_format_is_plain_or_json() -> None:
    assert Settings.from_env({}).log_format == "plain"
    assert Settings.from_env({"FINETUNE_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(SettingsError, match="FINETUNE_LOG_FORMAT='xml': expected one of plain"):
        Settings.from_env({"FINETUNE_LOG_FORMAT": "xml"})
    refused = run("operator", "--log-format", "xml")
    assert refused.returncode == 2
    assert "--log-format xml: expected plain or json" in refused.stderr


def test_json_log_lines_carry_their_fields() -> None:
    stream = io.StringIO()
    handler = oplog.configure("json", stream)
    try:
        logging.getLogger("finetune_operator.jobs").info(
            "FineTuneJob %s: %s", "ns/a", "Running", extra={"job": "a", "phase": "Running"}
        )
        logging.getLogger("kopf.objects").info("Handler 'reconcile' succeeded.")
    finally:
        logging.getLogger().removeHandler(handler)
    (line,) = stream.getvalue().splitlines()  # kopf's line per handler run is left out
    entry = json.loads(line)
    assert entry["message"] == "FineTuneJob ns/a: Running"
    assert (entry["level"], entry["job"], entry["phase"]) == ("INFO", "a", "Running")


# MPT-30B's config.json as published on the Hub (the fields the planner reads): not in the
# planner's offline catalog.
MPT_30B = {
    "architectures": ["MPTForCausalLM"],
    "model_type": "mpt",
    "d_model": 7168,
    "n_heads": 64,
    "n_layers": 48,
    "expansion_ratio": 4,
    "max_seq_len": 8192,
    "vocab_size": 50432,
    "no_bias": True,
}


def _outside_catalog(tmp_path: Path) -> Path:
    doc = json.loads(_mistral(tmp_path, numNodes=2, gpusPerNode=8).read_text())
    doc["spec"]["model"]["source"] = "hf://mosaicml/mpt-30b"
    path = tmp_path / "mpt.yaml"
    path.write_text(json.dumps(doc))
    return path


def test_plan_of_a_model_outside_the_catalog_comes_from_its_config_json(tmp_path: Path) -> None:
    job = _outside_catalog(tmp_path)
    without = run("plan", str(job))
    assert without.returncode == 0, without.stderr
    assert "--model-config" in without.stdout  # says how to plan it now
    assert "peak GiB" not in without.stdout
    config = tmp_path / "config.json"
    config.write_text(json.dumps(MPT_30B))
    result = run("plan", str(job), "--model-config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "peak GiB" in result.stdout
    chosen = next(line for line in result.stdout.splitlines() if line.startswith("*"))
    assert "fsdp" in chosen or "tp" in chosen  # 30B in 16-bit AdamW states cannot sit on one GPU
    # the shape is MPT-30B's own: a smaller config gives a faster plan
    small = dict(MPT_30B, n_layers=8)
    config.write_text(json.dumps(small))
    faster = run("plan", str(job), "--model-config", str(config))
    tok = [
        int(line.split()[-2].replace(",", ""))
        for line in (result.stdout, faster.stdout)
        for line in [next(x for x in line.splitlines() if x.startswith("*"))]
    ]
    assert tok[1] > 3 * tok[0], tok


@pytest.mark.parametrize(
    ("content", "says", "code"),
    [
        ('{"model_type": "mixtral", "num_local_experts": 8}', "mixture of experts", 1),
        (
            '{"model_type": "llama", "hidden_size": 4096}',
            "no 'num_hidden_layers', 'num_attention_heads', 'vocab_size'",
            1,
        ),
        ('{"model_type": "t5", "is_encoder_decoder": true}', "encoder-decoder", 1),
        ("[1, 2]", "a config.json is a JSON object", 1),
        ("{not json", "not JSON", 1),
        (None, "cannot read", 2),
    ],
)
def test_plan_refuses_a_config_json_it_cannot_use_saying_why(
    tmp_path: Path, content: str | None, says: str, code: int
) -> None:
    config = tmp_path / "config.json"
    if content is not None:
        config.write_text(content)
    result = run("plan", str(_outside_catalog(tmp_path)), "--model-config", str(config))
    assert result.returncode == code, result.stdout + result.stderr
    assert says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def _tiny_with_model(tmp_path: Path, source: str) -> Path:
    doc = yaml.safe_load((ROOT / "examples" / "tiny-local.yaml").read_text())
    doc["spec"]["model"]["source"] = source
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(doc))  # JSON keeps learningRate a string for kubectl's reader
    return path


def test_stage_a_builtin_job_downloads_nothing_and_reads_the_shape(tmp_path: Path) -> None:
    result = run("stage", str(ROOT / "examples" / "tiny-local.yaml"), "--cache", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tiny-local: staged in" in result.stdout
    assert "mistral, vocabulary 32,768" in result.stdout
    assert "model   builtin tiny-mistral: nothing to download" in result.stdout
    assert "dataset builtin python-stdlib-alpaca: nothing to download" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_stage_a_local_folder_model_reads_its_config_and_tokenizer(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    shape = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 8,
    }
    (model / "config.json").write_text(json.dumps(shape))
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    (model / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate("abcde")}))
    result = run(
        "stage", str(_tiny_with_model(tmp_path, f"file://{model}")), "--cache", str(tmp_path / "c")
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "llama, vocabulary 5" in result.stdout
    assert f"model   local {model}: nothing to download" in result.stdout


@pytest.mark.parametrize(
    ("files", "says"),
    [
        (
            {"config.json": '{"model_type": "mixtral", "num_local_experts": 8}'},
            "cannot be fine-tuned here: model_type 'mixtral' is a mixture of experts",
        ),
        ({"pytorch_model.bin": "pickle"}, "has only pickle weights (pytorch_model.bin)"),
        ({"model.safetensors": ""}, "has no tokenizer"),
    ],
)
def test_stage_refuses_a_model_the_trainer_cannot_run_saying_why(
    tmp_path: Path, files: dict[str, str], says: str
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    base = {
        "config.json": '{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, '
        '"num_attention_heads": 4, "vocab_size": 8}',
        "model.safetensors": "",
    }
    for name, text in {**base, **files}.items():
        (model / name).write_text(text)
    if "pytorch_model.bin" in files:
        (model / "model.safetensors").unlink()
    result = run(
        "stage", str(_tiny_with_model(tmp_path, f"file://{model}")), "--cache", str(tmp_path / "c")
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "✗ staging failed" in result.stderr
    assert says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
