"""Optional trackers: a run never imports one it does not use, and turning one on without its package is a
clean exit 2 at preflight naming the key and the install command."""
from __future__ import annotations

import json
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


# --------------------------------------------------------------------------------------------------
# W&B online with no way to its server (an air-gapped GPU node): preflight finds out in seconds and the run falls
# back to W&B offline, said in a warning and in the manifest, instead of hanging 95 s in wandb.init and failing
# --------------------------------------------------------------------------------------------------

UNREACHABLE_WANDB = {"WANDB_MODE": "online", "WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567",
                     "WANDB_BASE_URL": "http://127.0.0.1:9"}  # the discard port, closed: refused at once


@pytest.mark.slow
def test_wandb_online_without_its_server_trains_offline_and_says_so(tiny_dir, tmp_path):
    cfg = set_key(base_config(tiny_dir, tmp_path), "logging.wandb.enabled", True)
    cfg = set_key(cfg, "training.hyperparameters.num_epochs", 1)
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--run-id", "airgap", "--skip-dry-run",
                   env=UNREACHABLE_WANDB, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the W&B server http://127.0.0.1:9 cannot be reached" in proc.stdout and "WANDB_MODE=offline" in proc.stdout
    run_dir = tmp_path / "runs" / "airgap"
    m = json.loads((run_dir / "run_manifest.json").read_text())
    assert m["status"] == "completed"
    fallback = m["wandb_fallback"]
    assert (fallback["requested_mode"], fallback["mode"], fallback["server"]) == ("online", "offline",
                                                                                 "http://127.0.0.1:9")
    assert "Connection refused" in fallback["reason"]
    assert any("cannot be reached" in w for w in m["warnings"])
    assert list((run_dir / "wandb").glob("offline-run-*"))  # the metrics are kept, to sync later


@pytest.mark.slow
def test_wandb_check_in_validate_only_names_the_fallback(tiny_dir, tmp_path):
    cfg = set_key(base_config(tiny_dir, tmp_path), "logging.wandb.enabled", True)
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--validate-only", env=UNREACHABLE_WANDB)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "logging.wandb: the W&B server http://127.0.0.1:9 cannot be reached" in proc.stdout


def test_the_server_check_is_bounded_even_when_the_connection_hangs(monkeypatch):
    """Name lookup or a connect that never answers (a black-holed route): the check gives up after its timeout
    (its thread is abandoned) instead of waiting for the operating system's own minutes-long timeout."""
    import socket
    import threading

    import train_finance_ssc_model as tf
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(120)
        raise OSError("released")

    monkeypatch.setattr(socket, "create_connection", hang)
    try:
        assert tf.server_unreachable("https://api.wandb.ai", 0.2) == "api.wandb.ai:443: no answer within 0.2 s"
    finally:
        release.set()


def test_the_server_check_goes_through_the_proxy_the_environment_names(monkeypatch):
    import socket

    import train_finance_ssc_model as tf
    tried = []
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setattr(socket, "create_connection", lambda addr, timeout: tried.append(addr) or socket.socket())
    assert tf.server_unreachable("https://api.wandb.ai", 1) is None
    assert tried == [("proxy.internal", 3128)]
