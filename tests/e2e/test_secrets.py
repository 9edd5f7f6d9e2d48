"""The Hub token stays secret: it reaches the trainer's pods only as a reference to the user's
Secret, never as a value in anything the operator writes or logs."""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from helpers import ROOT, load_yaml
from operator_fixtures import Operator

pytestmark = pytest.mark.e2e


def _job(name: str, **spec: Any) -> dict[str, Any]:
    """The Mistral example (which reads its token from Secret hf-token) without storage."""
    job = load_yaml(ROOT / "examples" / "mistral-7b-python-code.yaml")
    job["metadata"] = {"name": name}
    del job["spec"]["checkpoint"]["storage"]
    del job["spec"]["output"]
    job["spec"].update(spec)
    return job


def test_the_hub_token_appears_in_nothing_the_operator_writes_or_logs(
    crd: Any, namespace: str, tmp_path: Path
) -> None:
    token = "hf_" + secrets.token_urlsafe(27)
    testbed = crd
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "hf-token"},
        "stringData": {"token": token},
    }
    assert testbed.apply(secret, "-n", namespace).returncode == 0
    op = Operator(crd, namespace, tmp_path / "operator.log", args=("--log-format", "json"))
    op.start()
    try:
        assert testbed.apply(_job("ok"), "-n", namespace).returncode == 0
        oom = {"annotations": {"testbed.finetune.dev/oom": "true"}}
        failing = _job("fails", podMetadata=oom, runPolicy={"backoffLimit": 0})
        assert testbed.apply(failing, "-n", namespace).returncode == 0
        for name, phase in (("ok", "Succeeded"), ("fails", "Failed")):
            testbed.wait_for(
                lambda name=name, phase=phase: (
                    testbed.kubectl_json("get", "ftj", name, "-n", namespace)
                    .get("status", {})
                    .get("phase")
                    == phase
                ),
                timeout=180,
                desc=f"{name} {phase}",
            )
    finally:
        op.stop()

    # Only the staging pod gets the token, and by reference only; the trainer pods read the
    # staged cache offline and get none.
    staging = testbed.kubectl_json("get", "job", "ok-staging", "-n", namespace)
    env = staging["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = [e for e in env if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]]
    assert {(r["valueFrom"]["secretKeyRef"]["name"], r["valueFrom"]["secretKeyRef"]["key"])
            for r in refs} == {("hf-token", "token")}  # fmt: skip
    pytorchjob = testbed.kubectl_json("get", "pytorchjob", "ok", "-n", namespace)
    for replica in pytorchjob["spec"]["pytorchReplicaSpecs"].values():
        for container in replica["template"]["spec"]["containers"]:
            assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in container["env"])
            assert "HF_TOKEN" not in {e["name"] for e in container["env"]}

    # Everything in the namespace but the Secret itself, with the operator's log and events.
    kinds = "finetunejobs,pytorchjobs,configmaps,pods,events,serviceaccounts,services,jobs"
    objects = testbed.kubectl_json("get", kinds, "-n", namespace)["items"]
    assert {o["kind"] for o in objects} >= {"FineTuneJob", "PyTorchJob", "ConfigMap", "Pod", "Job"}
    assert any(o["kind"] == "Event" for o in objects)
    # The token as text or as a Secret holds it (base64): the Secret itself is found this way.
    forms = (token, base64.b64encode(token.encode()).decode())
    stored = json.dumps(testbed.kubectl_json("get", "secret", "hf-token", "-n", namespace))
    assert any(form in stored for form in forms)
    written = json.dumps(objects)
    log = op.log.read_text()
    assert '"job": "ok"' in log or '"job":"ok"' in log  # the log covers these jobs
    described = testbed.kubectl("describe", "ftj", "-n", namespace).stdout
    for form in forms:
        assert form not in written
        assert form not in log
        assert form not in described
