"""A real Prometheus scrapes a real CPU training run and a real operator; the dashboard's every
panel returns data through the HTTP API; promtool checks both /metrics outputs.

The training run is ``examples/tiny-local.yaml`` made into a trainer config exactly as
``finetune run`` does (plan, translate), on a free metrics port, launched with torchrun on CPU.
The operator runs against the test bed with a FineTuneJob of the same name, so reconciles and
phases are real too. Prometheus reaches the trainer through the chart's PodMonitor relabelings
(the Kubernetes service-discovery labels a pod would have are given as static target labels).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartkit import CHART, REPO, documents

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

VALUES = Path(__file__).parent / "values" / "monitoring.yaml"
DASHBOARD = CHART / "dashboards" / "finetune-operator.json"
JOB = "tiny-local"
RUN_STEPS = 20
#: Panels whose metric the trainer does not export yet, with that metric. While a metric is
#: absent from the trainer's /metrics, its panel must be listed here (and has no data); once the
#: trainer exports it, the panel is checked like every other one and must be removed from here.
AWAITING_TRAINER: dict[str, str] = {}


def free_port() -> int:
    from operator_fixtures import free_port as _free

    return _free()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def fetch(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())
    except OSError:
        return None


def trainer_config(tmp: Path, metrics_port: int) -> Path:
    """examples/tiny-local.yaml as `finetune run` turns it into the trainer's config."""
    from finetune_operator import api
    from finetune_operator.plan import plan_config, plan_job
    from finetune_operator.translate import to_trainer_config

    doc = yaml.safe_load((REPO / "examples" / "tiny-local.yaml").read_text())
    spec = doc["spec"]
    # Shorter than the example (60 steps of 8 x 512 tokens take minutes on 2 shared cores):
    # enough steps for rates over a few scrapes, with evaluations and checkpoints on the way.
    spec["hyperparameters"].update(
        maxSteps=RUN_STEPS, globalBatchSize=2, warmupSteps=2, evalEverySteps=5
    )
    spec["dataset"]["maxSeqLength"] = 256
    spec["checkpoint"] = {"storage": f"file://{tmp}/checkpoints", "everySteps": 5}
    spec["output"]["storage"] = f"file://{tmp}/model"
    job = api.parse(doc)
    planned = plan_job(job.spec)
    config = to_trainer_config(
        job.spec,
        name=job.name,
        default_output_dir=str(tmp / "model"),
        plan=plan_config(planned) if planned else None,
        metrics_port=metrics_port,
    )
    path = tmp / "trainer-config.json"
    path.write_text(config.to_json())
    return path


def prometheus_config(
    helm, tmp: Path, namespace: str, trainer_port: int, operator_port: int
) -> Path:
    """Scrape configs equivalent to what prometheus-operator makes of the chart's monitors."""
    docs = documents(helm.template(VALUES, namespace=namespace).stdout)
    (podmonitor,) = [d for d in docs if d["kind"] == "PodMonitor"]
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    (endpoint,) = podmonitor["spec"]["podMetricsEndpoints"]
    chart_relabelings = [
        {"source_labels": r["sourceLabels"], "target_label": r["targetLabel"]}
        for r in endpoint["relabelings"]
    ]
    (tmp / "rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp / "rules.yaml")],
        "scrape_configs": [
            {
                "job_name": "finetune-trainers",
                "metrics_path": endpoint["path"],
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{trainer_port}"],
                        "labels": {
                            # What Kubernetes pod discovery says about the master pod.
                            "__meta_kubernetes_namespace": namespace,
                            "__meta_kubernetes_pod_name": f"{JOB}-master-0",
                            "__meta_kubernetes_pod_label_finetune_dev_job": JOB,
                            "__meta_kubernetes_pod_label_training_kubeflow_org_replica_type": (
                                "master"
                            ),
                        },
                    }
                ],
                # prometheus-operator's own relabelings for every PodMonitor, then the chart's.
                "relabel_configs": [
                    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                    *chart_relabelings,
                ],
            },
            {
                "job_name": "finetune-operator",
                "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"]}],
            },
        ],
    }
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def substitute(expr: str, namespace: str) -> str:
    """Grafana's variables as the dashboard fills them in for this run."""
    return (
        expr.replace("$__rate_interval", "10s")
        .replace("$namespace", namespace)
        .replace("$job", JOB)
    )


def has_data(result: list[dict[str, Any]]) -> bool:
    return any(
        math.isfinite(float(value)) for series in result for _, value in series.get("values", [])
    )


def promtool_check_metrics(promtool: str, text: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )


def test_every_dashboard_panel_has_data_from_a_real_run(
    operator, namespace: str, helm, prom, tmp_path: Path
) -> None:
    tb = operator.testbed
    trainer_port, prom_port = free_port(), free_port()
    config = prometheus_config(helm, tmp_path, namespace, trainer_port, operator.metrics_port)
    check = subprocess.run(
        [prom["promtool"], "check", "config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    prom_log = (tmp_path / "prometheus.log").open("wb")
    prometheus = subprocess.Popen(
        [prom["prometheus"], f"--config.file={config}", f"--storage.tsdb.path={tmp_path}/tsdb",
         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
        stdout=prom_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    api = f"http://127.0.0.1:{prom_port}/api/v1"
    trainer_log = tmp_path / "trainer.log"
    trainer = None
    try:
        tb.wait_for(lambda: fetch(f"http://127.0.0.1:{prom_port}/-/ready"), timeout=60,
                    interval=0.5, desc="Prometheus ready")  # fmt: skip
        # A first scrape of the operator before the job exists, so its counters' increases count.
        up = urllib.parse.urlencode({"query": 'up{job="finetune-operator"} == 1'})
        tb.wait_for(lambda: get_json(f"{api}/query?{up}")["data"]["result"], timeout=60,
                    interval=0.5, desc="Prometheus scraped the operator")  # fmt: skip
        start = time.time()
        # The operator's side: a FineTuneJob it reconciles while Prometheus watches.
        job = yaml.safe_load((REPO / "examples" / "tiny-local.yaml").read_text())
        job["metadata"]["namespace"] = namespace
        applied = tb.apply(job)
        assert applied.returncode == 0, applied.stderr

        from finetune_trainer.launch import torchrun_command

        env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
        with trainer_log.open("wb") as out:
            trainer = subprocess.Popen(
                torchrun_command(trainer_config(tmp_path, trainer_port), 1),
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
            )  # fmt: skip
        # The trainer's /metrics while it trains (it stops serving when it exits).
        trainer_text = ""
        while trainer.poll() is None and time.time() - start < 600:
            text = fetch(f"http://127.0.0.1:{trainer_port}/metrics")
            if text and re.search(r"^finetune_train_steps_total [1-9]", text, re.MULTILINE):
                trainer_text = text
            time.sleep(1)
        assert trainer.wait(timeout=60) == 0, trainer_log.read_text()[-6000:]
        time.sleep(3)  # a last operator scrape
        end = time.time()
        assert trainer_text, "never saw the trainer's metrics with a step taken"
        operator_text = operator.metrics()

        # promtool's linter on both endpoints, as Prometheus received them.
        for name, text in (("trainer", trainer_text), ("operator", operator_text)):
            p = promtool_check_metrics(prom["promtool"], text)
            assert p.returncode == 0, f"{name}: {p.stdout}{p.stderr}"

        # The dashboard's variables resolve to this run.
        q = urllib.parse.urlencode({"match[]": "finetune_train_steps_total"})
        assert namespace in get_json(f"{api}/label/namespace/values?{q}")["data"]
        assert JOB in get_json(f"{api}/label/finetunejob/values?{q}")["data"]

        board = json.loads(DASHBOARD.read_text())
        exported = trainer_text + operator_text
        empty, awaiting_but_present = [], []
        checked = 0
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            for target in panel["targets"]:
                expr = substitute(target["expr"], namespace)
                params = {"query": expr, "start": start, "end": end, "step": 1}
                reply = get_json(f"{api}/query_range?{urllib.parse.urlencode(params)}")
                assert reply["status"] == "success", (panel["title"], reply)
                data = has_data(reply["data"]["result"])
                awaited = AWAITING_TRAINER.get(panel["title"])
                if awaited and awaited not in exported:
                    assert not data, (panel["title"], expr)
                    continue
                if awaited:
                    awaiting_but_present.append(panel["title"])
                checked += 1
                if not data:
                    empty.append(f"{panel['title']}: {expr}")
        assert not empty, "panels without data:\n" + "\n".join(empty)
        assert not awaiting_but_present, (
            f"exported now, drop from AWAITING_TRAINER: {awaiting_but_present}"
        )
        assert checked >= 12

        # The alert rules evaluate against the real series without errors (and stay quiet).
        groups = get_json(f"{api}/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == 3
        assert all(r["health"] == "ok" for r in rules), rules
        assert not [r for r in rules if r.get("state") == "firing"]
    finally:
        if trainer is not None and trainer.poll() is None:
            trainer.kill()
        prometheus.terminate()
        try:
            prometheus.wait(timeout=30)
        except subprocess.TimeoutExpired:
            prometheus.kill()
        prom_log.close()
