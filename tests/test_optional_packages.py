"""Optional trackers: a run never imports one it does not use, and turning one on without its package is a
clean exit 2 at preflight naming the key and the install command."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import base_config, last_json, run_cli, set_key, write_config

pytestmark = pytest.mark.slow  # every test here launches the CLI (conftest.run_cli)

HIDE = {"PYTHONPATH": str(Path(__file__).parent / "hidepkg")}


def test_training_runs_without_mlflow_installed(tiny_dir, tmp_path):
    cfg = set_key(base_config(tiny_dir, tmp_path), "training.hyperparameters.num_epochs", 1)
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--run-id", "lean",
                   env={**HIDE, "HIDE_PACKAGES": "mlflow"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "runs" / "lean" / "run_manifest.json").exists()


@pytest.mark.parametrize("key,module", [("logging.mlflow.enabled", "mlflow"), ("logging.wandb.enabled", "wandb"),
                                        ("model.lora.enabled", "peft")])
def test_enabled_tracker_without_its_package_is_exit_2(tiny_dir, tmp_path, key, module):
    cfg = set_key(base_config(tiny_dir, tmp_path), key, True)
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--validate-only",
                   env={**HIDE, "HIDE_PACKAGES": module})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    d = last_json(proc.stderr)["details"]
    assert d["field"] == key and "pip install" in d["suggestion"]
