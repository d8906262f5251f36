"""Nothing lost under faults: a checkpoint damaged after its save is never used silently, and one run dir has
one writer (a second process is refused while the first lives; a killed one never blocks)."""
from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train_finance_ssc_model as tf
from conftest import SCRIPT, base_config, last_json, run_cli, set_key, write_config

pytestmark = pytest.mark.slow  # every test here launches the CLI (conftest.run_cli)


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """One short run with checkpoint-4, -8 and -12; each test damages its own copy."""
    out = tmp_path_factory.mktemp("integrity")
    cfg = set_key(base_config(tiny_dir, out), "training.hyperparameters.num_epochs", 1)
    cfg = set_key(cfg, "training.checkpointing.save_strategy", "steps")
    cfg = set_key(set_key(cfg, "logging.eval_steps", 4), "logging.save_steps", 4)
    proc = run_cli("--config", write_config(out / "c.yaml", cfg), "--run-id", "ok")
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = [c["name"] for c in tf.list_checkpoints("ok", str(out / "runs"), details=True)]
    assert names[-2:] == ["checkpoint-8", "checkpoint-12"]
    return out, cfg


def copy_run(trained, dest: Path) -> tuple[Path, Path]:
    """The run (same run id) under another output dir, and a config pointing there."""
    out, cfg = trained
    shutil.copytree(out / "runs" / "ok", dest / "runs" / "ok")
    shutil.copytree(out / "logs" / "ok", dest / "logs" / "ok")
    cfg = set_key(set_key(cfg, "logging.output_dir", str(dest / "runs")), "logging.logging_dir", str(dest / "logs"))
    cfg = set_key(cfg, "logging.tensorboard.log_dir", str(dest / "tb"))
    return write_config(dest / "c.yaml", cfg), dest / "runs" / "ok"


def flip_middle(path: Path, n: int = 64) -> None:
    """Overwrite n bytes in the middle of the file with different bytes, as a torn write or bad sector would."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0x55 for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def assert_names(proc, ckpt: Path, filename: str, what: str) -> dict:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    err = last_json(proc.stderr)
    assert err["error"] == "CheckpointNotFound"
    d = err["details"]
    assert d["path"] == str(ckpt.resolve()) and d["file"] == str(ckpt.resolve() / filename)
    assert d["reason"].startswith(filename) and what in d["reason"]
    return d


def test_resume_latest_skips_a_damaged_checkpoint(trained, tmp_path):
    path, run_dir = copy_run(trained, tmp_path)
    flip_middle(run_dir / "checkpoint-12" / "model.safetensors")
    proc = run_cli("--config", path, "--run-id", "ok", "--resume-from", "latest")
    assert proc.returncode == 0, proc.stderr[-2000:]
    warning = next(line for line in proc.stdout.splitlines() if "WARNING" in line and "damaged" in line)
    assert "checkpoint-12" in warning and "model.safetensors: sha256 mismatch" in warning
    m = json.loads((run_dir / "run_manifest.json").read_text())
    assert m["status"] == "completed" and Path(m["resume_from"]["path"]).name == "checkpoint-8"


def test_explicit_resume_from_a_damaged_checkpoint_is_refused(trained, tmp_path):
    path, run_dir = copy_run(trained, tmp_path)
    ckpt = run_dir / "checkpoint-12"
    flip_middle(ckpt / "model.safetensors")
    before = (run_dir / "run_manifest.json").read_bytes()
    proc = run_cli("--config", path, "--resume-from", ckpt)
    assert_names(proc, ckpt, "model.safetensors", "sha256 mismatch")
    assert (run_dir / "run_manifest.json").read_bytes() == before


def test_a_damaged_checkpoint_record_is_a_damaged_checkpoint(trained, tmp_path):
    """checkpoint_meta.json holds the checksums: torn, it must not read as "nothing recorded, nothing to check"."""
    path, run_dir = copy_run(trained, tmp_path)
    ckpt = run_dir / "checkpoint-12"
    meta = ckpt / tf.CHECKPOINT_META
    meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])
    assert tf.check_checkpoint_integrity(ckpt).startswith(f"{tf.CHECKPOINT_META}: ")
    before = (run_dir / "run_manifest.json").read_bytes()
    proc = run_cli("--config", path, "--resume-from", ckpt)
    assert_names(proc, ckpt, tf.CHECKPOINT_META, "not a JSON object")
    assert (run_dir / "run_manifest.json").read_bytes() == before
    proc = run_cli("--config", path, "--run-id", "ok", "--resume-from", "latest")
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((run_dir / "run_manifest.json").read_text())
    assert m["status"] == "completed" and Path(m["resume_from"]["path"]).name == "checkpoint-8"


def test_truncated_weights_are_named_not_a_traceback(trained, tmp_path):
    path, run_dir = copy_run(trained, tmp_path)
    ckpt = run_dir / "checkpoint-12"
    weights = ckpt / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    proc = run_cli("--config", path, "--resume-from", ckpt)
    assert_names(proc, ckpt, "model.safetensors", "sha256 mismatch")


def test_missing_optimizer_state_is_refused(trained, tmp_path):
    path, run_dir = copy_run(trained, tmp_path)
    ckpt = run_dir / "checkpoint-12"
    (ckpt / "optimizer.pt").unlink()
    proc = run_cli("--config", path, "--resume-from", ckpt)
    assert_names(proc, ckpt, "optimizer.pt", "missing")


def test_list_checkpoints_shows_measured_health(trained, tmp_path):
    _, run_dir = copy_run(trained, tmp_path)
    flip_middle(run_dir / "checkpoint-12" / "model.safetensors")
    proc = run_cli("--list-checkpoints", run_dir, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = {c["name"]: c for c in json.loads(proc.stdout)}
    bad = listed["checkpoint-12"]
    assert bad["health"] == "corrupt" and bad["integrity"].startswith("model.safetensors: sha256 mismatch")
    assert not bad["is_latest"] and not bad["is_best"] and listed["checkpoint-8"]["is_latest"]
    assert listed["checkpoint-8"]["health"] == "ok" and listed["checkpoint-8"]["integrity"] is None


def test_evaluate_a_damaged_checkpoint_is_refused(trained, tmp_path):
    out, cfg = trained
    _, run_dir = copy_run(trained, tmp_path)
    ckpt = run_dir / "checkpoint-12"
    flip_middle(ckpt / "model.safetensors")
    proc = run_cli("--evaluate", ckpt, "--test-data", cfg["data"]["test_path"], "--json")
    assert_names(proc, ckpt, "model.safetensors", "sha256 mismatch")


# --------------------------------------------------------------------------------------------------
# One run dir, one writer
# --------------------------------------------------------------------------------------------------

def wait_for(predicate, what: str, proc: subprocess.Popen, deadline_s: float = 300) -> None:
    deadline = time.time() + deadline_s  # generous: a loaded machine starts late
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"the first run ended (rc {proc.returncode}) before {what}"
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def assert_locked(proc, holder: subprocess.Popen) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = last_json(proc.stderr)
    assert err["error"] == "RunLocked", err
    d = err["details"]
    assert d["pid"] == holder.pid and d["hostname"] == platform.node()
    assert "--status" in d["suggestion"]


def test_one_writer_per_run_dir_and_a_killed_writer_never_blocks(tiny_dir, tmp_path):
    cfg = set_key(base_config(tiny_dir, tmp_path), "training.hyperparameters.num_epochs", 1000)
    cfg = set_key(cfg, "training.checkpointing.save_strategy", "steps")
    cfg = set_key(set_key(cfg, "logging.eval_steps", 10), "logging.save_steps", 10)
    path = write_config(tmp_path / "c.yaml", cfg)
    run_dir = tmp_path / "runs" / "same"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    first = subprocess.Popen([sys.executable, str(SCRIPT), "--config", str(path), "--run-id", "same"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: tf.read_json_lenient(run_dir / "status.json").get("status") == "running"
                 and list(run_dir.glob("checkpoint-*/checkpoint_meta.json")), "status running and a checkpoint", first)
        report = (run_dir / "dry_run_report.json").read_bytes()  # the first process's, from before it trained
        assert_locked(run_cli("--config", path, "--run-id", "same"), first)
        assert_locked(run_cli("--config", path, "--run-id", "same", "--resume-from", "latest"), first)
        assert_locked(run_cli("--config", path, "--run-id", "same", "--dry-run", "--max-steps", "1"), first)
        assert first.poll() is None, "the first run must still be running for the checks above to mean anything"
        assert not (run_dir / "error.json").exists()  # the refused processes wrote nothing into the run
        assert (run_dir / "dry_run_report.json").read_bytes() == report
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert json.loads((run_dir / ".lock").read_text())["pid"] == first.pid  # the dead holder's file stays
    latest = next(c for c in tf.list_checkpoints(str(run_dir), details=True) if c["is_latest"])
    # accepted: it trains past the resume point (then stops itself, so the test does not run 1000 epochs)
    resumed = run_cli("--config", path, "--run-id", "same", "--resume-from", "latest",
                      env={"FINANCE_TRAINER_INJECT_SIGNAL": f"{latest['step'] + 2}:SIGKILL"})
    assert resumed.returncode == -signal.SIGKILL, resumed.stderr[-2000:]
    assert json.loads((run_dir / ".lock").read_text())["pid"] != first.pid
