"""Resume after kill -9 is bit-exact; config changes are listed, dangerous ones refused."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

import train_finance_ssc_model as tf
from conftest import base_config, last_json, run_cli, set_key, write_config

pytestmark = pytest.mark.slow  # every test here launches the CLI (conftest.run_cli)


def weights(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(path / "model.safetensors")


def kill_at_step(path: Path, run_id: str, step: int) -> None:
    """Run until optimizer step `step` is under way, then SIGKILL: the process sends it to itself through the
    FINANCE_TRAINER_INJECT_SIGNAL test hook, so the moment is the same on a fast, slow or loaded machine."""
    proc = run_cli("--config", path, "--run-id", run_id, env={"FINANCE_TRAINER_INJECT_SIGNAL": f"{step}:SIGKILL"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
    """One uninterrupted run to compare against. With data.group_by_length: true, so the kill/resume tests cover the
    seeded length-grouped sampler (test_preemption.py and test_lora.py resume under the default uniform shuffle)."""
    out = tmp_path_factory.mktemp("resume")
    cfg = set_key(set_key(base_config(tiny_dir, out), "logging.eval_steps", 5), "data.group_by_length", True)
    path = write_config(out / "c.yaml", cfg)
    proc = run_cli("--config", path, "--run-id", "ref")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, path, cfg


@pytest.mark.parametrize("kill_step,latest", [(11, "checkpoint-10"),  # mid epoch 1, step-based
                                              (13, "checkpoint-epoch-1")])  # across the epoch boundary
def test_kill9_then_resume_latest_is_bit_identical(reference, kill_step, latest):
    out, path, _ = reference
    run_id = f"k{kill_step}"
    kill_at_step(path, run_id, kill_step)
    listed = tf.list_checkpoints(run_id, str(out / "runs"), details=True)
    assert [c["name"] for c in listed if c["is_latest"]] == [latest]
    proc = run_cli("--config", path, "--run-id", run_id, "--resume-from", "latest")
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = weights(out / "runs" / "ref" / "checkpoint-epoch-2")
    b = weights(out / "runs" / run_id / "checkpoint-epoch-2")
    import torch
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for curve in ("train_loss.csv", "val_loss.csv"):
        assert (out / "logs" / run_id / curve).read_text() == (out / "logs" / "ref" / curve).read_text()
    m = json.loads((out / "runs" / run_id / "run_manifest.json").read_text())
    ref = json.loads((out / "runs" / "ref" / "run_manifest.json").read_text())
    assert m["status"] == "completed" and m["resume_from"]["step"] == kill_step - 1 and len(m["resumes"]) == 1
    assert m["training_results"]["final_val_loss"] == ref["training_results"]["final_val_loss"]
    assert m["training_results"]["initial_val_loss"] == ref["training_results"]["initial_val_loss"]
    assert m["created_at"] == json.loads((out / "runs" / run_id / "run_manifest.json").read_text())["created_at"]


def test_config_change_is_warned_and_recorded(reference):
    out, path, cfg = reference
    src = Path(tf.list_checkpoints("ref", str(out / "runs"))[-2])  # the backup, one before the latest
    proc = run_cli("--config", path, "--resume-from", src, "--set", "training.hyperparameters.weight_decay=0.05")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "training.hyperparameters.weight_decay: 0.0 -> 0.05" in proc.stdout
    m = json.loads((out / "runs" / "ref" / "run_manifest.json").read_text())
    assert m["resume_from"]["path"] == src.name  # inside the run dir: relative to the manifest's dir
    assert any("weight_decay" in d for d in m["resumes"][-1]["config_differences"])


def test_dangerous_change_is_refused_unless_forced(reference):
    out, path, _ = reference
    src = tf.list_checkpoints("ref", str(out / "runs"), details=True)[0]["path"]
    before = (out / "runs" / "ref" / "run_manifest.json").read_bytes()
    # 400: every record still fits (the data check passes), and the resume check refuses the change
    proc = run_cli("--config", path, "--resume-from", src, "--set", "data.max_seq_length=400")
    assert proc.returncode == 2
    err = last_json(proc.stderr)
    assert err["error"] == "InvalidConfig" and err["details"]["field"] == "data.max_seq_length"
    assert "--force" in err["details"]["suggestion"]
    assert (out / "runs" / "ref" / "run_manifest.json").read_bytes() == before


def test_changed_training_data_or_global_batch_is_refused(reference, tmp_path):
    out, path, cfg = reference
    src = tf.list_checkpoints("ref", str(out / "runs"), details=True)[0]["path"]
    changed = tmp_path / "train.jsonl"
    changed.write_text(Path(cfg["data"]["train_path"]).read_text().replace("PHP", "USD", 1))
    proc = run_cli("--config", path, "--resume-from", src, "--set", f"data.train_path={changed}")
    assert proc.returncode == 2
    err = last_json(proc.stderr)
    assert err["details"]["field"] == "data.train_path" and "changed" in err["details"]["suggestion"]
    proc = run_cli("--config", path, "--resume-from", src, "--set", "training.hyperparameters.batch_size=4")
    assert proc.returncode == 2 and last_json(proc.stderr)["details"]["field"] == "training.hyperparameters.batch_size"
    # the same global batch split differently is only a warning
    proc = run_cli("--config", path, "--resume-from", src, "--set", "training.hyperparameters.batch_size=4",
                   "--set", "training.hyperparameters.gradient_accumulation_steps=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "training.hyperparameters.batch_size: 8 -> 4" in proc.stdout


def test_resume_without_complete_checkpoint_is_a_clear_error(reference, tmp_path):
    out, path, _ = reference
    (out / "runs" / "empty").mkdir()
    (out / "runs" / "empty" / ".tmp-checkpoint-3").mkdir()
    proc = run_cli("--config", path, "--run-id", "empty", "--resume-from", "latest")
    assert proc.returncode == 2
    err = last_json(proc.stderr)
    assert err["error"] == "CheckpointNotFound" and "no complete, healthy checkpoint" in err["details"]["suggestion"]
    proc = run_cli("--config", path, "--resume-from", out / "runs" / "empty" / ".tmp-checkpoint-3")
    assert proc.returncode == 2 and last_json(proc.stderr)["error"] == "CheckpointNotFound"
