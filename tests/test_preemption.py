"""SIGTERM / SIGUSR1 (container stop, spot reclaim, SLURM --signal): finish the step, save a verified checkpoint,
record `interrupted`, exit 143; resuming gives the weights an uninterrupted run gives."""
from __future__ import annotations

import json
import os
import signal
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import train_finance_ssc_model as tf
from conftest import base_config, last_json, run_cli, set_key, write_config

pytestmark = pytest.mark.slow  # every test here launches the CLI (conftest.run_cli)


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("preempt")
    path = write_config(out / "c.yaml", base_config(tiny_dir, out))
    proc = run_cli("--config", path, "--run-id", "ref")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, path


def same_weights(a, b) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1", "SIGHUP"])
def test_signal_saves_the_step_and_resume_is_exact(reference, sig):
    out, path = reference
    run_id = f"p_{sig}"
    # the signal arrives inside optimizer step 8 (between the evaluation saves at 6 and 12)
    proc = run_cli("--config", path, "--run-id", run_id, env={"FINANCE_TRAINER_INJECT_SIGNAL": f"8:{sig}"})
    assert proc.returncode == tf.EXIT_PREEMPTED == 143, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    err = last_json(proc.stderr)
    assert err["error"] == "Preempted" and err["details"]["signal"] == sig and err["details"]["step"] == 8
    assert f"--resume-from latest --run-id {run_id}" in err["details"]["resume_command"]
    run_dir = out / "runs" / run_id
    assert err["details"]["checkpoint"] == str(run_dir / "checkpoint-8")
    ck = {c["name"]: c for c in tf.list_checkpoints(str(run_dir), details=True)}
    assert ck["checkpoint-8"]["health"] == "ok" and ck["checkpoint-8"]["is_latest"]
    m = json.loads((run_dir / "run_manifest.json").read_text())
    assert m["status"] == "interrupted" and m["error"]["error"] == "Preempted"
    assert m["training_results"]["total_steps"] == 8
    assert json.loads((run_dir / "error.json").read_text())["error"] == "Preempted"
    # what a kill -9 in the middle of a write leaves (open_atomic's temporary files, a half-built best/): the
    # resume removes them, in the run dir and in its log dir
    left = [run_dir / ".tmp-run_manifest.json.4242", out / "logs" / run_id / ".tmp-train_loss.csv.4242"]
    for p in left:
        p.write_bytes(b"")
    (run_dir / ".tmp-best").mkdir()
    res = run_cli("--config", path, "--run-id", run_id, "--resume-from", "latest")
    assert res.returncode == 0, res.stderr[-2000:]
    assert same_weights(out / "runs" / "ref" / "checkpoint-epoch-2", run_dir / "checkpoint-epoch-2")
    assert json.loads((run_dir / "run_manifest.json").read_text())["status"] == "completed"
    assert not any(p.exists() for p in left) and not (run_dir / ".tmp-best").exists()
    assert not (run_dir / "error.json").exists()  # the preemption's, stale once the run completed


def tmp_entries(*dirs) -> list[str]:
    return sorted(p.name for d in dirs for p in d.rglob(f"{tf.TMP_PREFIX}*"))


@pytest.fixture(scope="module")
def one_epoch(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("after")
    cfg = set_key(base_config(tiny_dir, out), "training.hyperparameters.num_epochs", 1)
    return out, write_config(out / "c.yaml", cfg)


@pytest.mark.slow
def test_a_signal_after_training_skips_the_analysis_and_completes_the_record(one_epoch):
    """SIGTERM as the post-training analysis starts: the analysis is skipped (the platform's grace period is for
    the record), the final manifest says `completed` with what was skipped, `best/` is whole, exit 0."""
    out, path = one_epoch
    proc = run_cli("--config", path, "--run-id", "after", "--skip-dry-run",
                   env={"FINANCE_TRAINER_INJECT_SIGNAL": "analysis:SIGTERM"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = out / "runs" / "after"
    m = json.loads((run_dir / "run_manifest.json").read_text())
    assert m["status"] == "completed" and "error" not in m
    assert m["analysis_skipped"]["signal"] == "SIGTERM" and "test evaluation" in m["analysis_skipped"]["skipped"]
    assert m["test_results"] is None and m["samples"] is None and m["checkpoints"]["best_archive"] == "best"
    assert tf.check_checkpoint_integrity(run_dir / "best", resume=False) is None
    assert tmp_entries(run_dir, out / "logs" / "after") == []


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_while_the_final_record_is_written_waits_for_it(one_epoch, sig):
    """The signal arrives between the final manifest's build and the `best/` archive: both are finished first (no
    `.tmp-best`, no manifest left `running`), then the run ends as it would have: completed, exit 0."""
    out, path = one_epoch
    run_id = f"record_{sig}"
    proc = run_cli("--config", path, "--run-id", run_id, "--skip-dry-run",
                   env={"FINANCE_TRAINER_INJECT_SIGNAL": f"record:{sig}"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{sig} arrived while the run's final record was being written" in proc.stdout
    run_dir = out / "runs" / run_id
    m = json.loads((run_dir / "run_manifest.json").read_text())
    assert m["status"] == "completed" and m["test_results"]["test_loss"] > 0
    assert tf.check_checkpoint_integrity(run_dir / "best", resume=False) is None
    assert tmp_entries(run_dir, out / "logs" / run_id) == []


def test_a_second_signal_stops_at_once_and_is_still_recorded(monkeypatch):
    """The first SIGTERM asks for a checkpoint at the step boundary; a second one stops where the run is (StopNow,
    raised in the handler), and run_ending records it as Preempted without a checkpoint."""
    previous = tf.install_preemption_handlers()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert tf._preempt["signal"] == "SIGTERM"
        with pytest.raises(tf.StopNow) as info:
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        tf.restore_signal_handlers(previous)
    config = SimpleNamespace(overrides=[], config_path="c.yaml")
    ctx = SimpleNamespace(config=config, run_id="r", global_step=7, epoch=0.5)
    status, error, instead = tf.run_ending(info.value, ctx)
    assert status == "interrupted" and instead is error and error.exit_code == 143
    assert error.details["signal"] == "SIGTERM" and error.details["step"] == 7 and error.details["checkpoint"] is None


def test_an_ignored_sighup_stays_ignored():
    """Under nohup SIGHUP is ignored: the run must not start stopping when the terminal closes."""
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        previous = tf.install_preemption_handlers()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and signal.SIGHUP not in previous
        assert signal.getsignal(signal.SIGTERM) is tf._on_preempt_signal
        tf.restore_signal_handlers(previous)
    finally:
        signal.signal(signal.SIGHUP, before)
