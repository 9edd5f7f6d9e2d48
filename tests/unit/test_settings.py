"""The operator's settings: read once from the environment, with clear errors."""

from __future__ import annotations

import pytest

from finetune_operator import __version__
from finetune_operator.settings import DEFAULT_IMAGE, Settings, SettingsError


def test_defaults_name_this_release_s_trainer() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.trainer_image == DEFAULT_IMAGE == f"finetune-trainer:{__version__}"
    assert (settings.trainer_metrics_port, settings.progress_interval) == (9090, 15.0)
    assert Settings.from_env({"FINETUNE_TRAINER_IMAGE": ""}).trainer_image == DEFAULT_IMAGE


def test_the_environment_sets_each_value() -> None:
    env = {
        "FINETUNE_TRAINER_IMAGE": "registry.example/trainer:2",
        "FINETUNE_TRAINER_METRICS_PORT": "9400",
        "FINETUNE_PROGRESS_INTERVAL": "2.5",
    }
    assert Settings.from_env(env) == Settings("registry.example/trainer:2", 9400, 2.5)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FINETUNE_TRAINER_METRICS_PORT", "metrics"),
        ("FINETUNE_TRAINER_METRICS_PORT", "0"),
        ("FINETUNE_TRAINER_METRICS_PORT", "70000"),
        ("FINETUNE_PROGRESS_INTERVAL", "soon"),
        ("FINETUNE_PROGRESS_INTERVAL", "0"),
        ("FINETUNE_PROGRESS_INTERVAL", "nan"),
        ("FINETUNE_PROGRESS_INTERVAL", "inf"),
    ],
)
def test_an_unusable_value_is_refused_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"^{name}='{value}': expected"):
        Settings.from_env({name: value})
