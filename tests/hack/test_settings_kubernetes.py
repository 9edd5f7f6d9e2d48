"""The Kubernetes version setting of the test bed (FINETUNE_K8S_VERSION, ``--kubernetes``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "hack"))

from finetune_testbed import build, settings
from finetune_testbed.log import TestbedError


def test_the_default_is_1_35_and_either_minor_can_be_asked_for() -> None:
    assert settings.from_env({}).kubernetes == "1.35"
    assert settings.from_env({}).k8s_asked is None
    for raw in ("1.31", "v1.31", "1.31.4"):
        assert settings.from_env({"FINETUNE_K8S_VERSION": raw}).kubernetes == "1.31"
    with pytest.raises(TestbedError, match="FINETUNE_K8S_VERSION"):
        settings.from_env({"FINETUNE_K8S_VERSION": "1.29"})


def test_each_version_has_its_module_and_cache_dir() -> None:
    new = settings.from_env({})
    old = settings.from_env({"FINETUNE_K8S_VERSION": "1.31"})
    assert build.k8s_version(new) == "v1.35.4"
    assert build.k8s_version(old) == "v1.31.4"
    assert build.kubectl_in_cache(new).parent.name == "kubernetes-v1.35.4"
    assert build.kubectl_in_cache(old).parent.name == "kubernetes-v1.31.4"
    assert build.required_version(build.ETCD_MODULE, "go.etcd.io/etcd/server/v3") == "v3.6.16"
    assert build.ETCD_BUILT == {"1.31": None, "1.35": build.ETCD_MODULE}
