"""The embedder's settings: EMBEDDER_* environment variables, nested with `__`, and a start refused in
one line naming a missing required setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from embedder_svc.settings import EmbedderSettings, TritonSettings


def test_missing_model_dir_setting_refuses_to_start_in_one_line() -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("EMBEDDER_")}
    result = subprocess.run(
        [sys.executable, "-m", "embedder_svc"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "EMBEDDER_MODEL_DIR" in lines[0], result.stderr


def test_triton_settings_come_from_nested_environment_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in {
        "EMBEDDER_MODEL_DIR": str(tmp_path), "EMBEDDER_BACKEND": "triton", "EMBEDDER_TRITON__URL": "triton:8001",
        "EMBEDDER_TRITON__MODEL_NAME": "embedder", "EMBEDDER_TRITON__MODEL_VERSION": "3",
        "EMBEDDER_TRITON__REQUEST_TIMEOUT_S": "5", "EMBEDDER_TRITON__CHECK_TIMEOUT_S": "0.5",
        "EMBEDDER_TRITON__HEALTH_INTERVAL_S": "2",
    }.items():
        monkeypatch.setenv(name, value)
    settings = EmbedderSettings()
    assert settings.backend == "triton"
    assert settings.triton == TritonSettings(url="triton:8001", model_name="embedder", model_version="3",
                                             request_timeout_s=5, check_timeout_s=0.5, health_interval_s=2)
    monkeypatch.setenv("EMBEDDER_TRITON__MODEL_VERSION", "latest")
    with pytest.raises(ValueError, match="model_version"):
        EmbedderSettings()
