"""Anomaly guards stop bad runs within one step; checkpoints are atomic, verified and retained safely."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train_finance_ssc_model as tf
from conftest import SCRIPT, base_config, last_json, run_cli, set_key, write_config


def finite_weights(path: str) -> bool:
    import torch
    from safetensors.torch import load_file
    tensors = {}
    for f in Path(path).glob("*.safetensors"):
        tensors.update(load_file(f))
    return bool(tensors) and all(bool(torch.isfinite(t).all()) for t in tensors.values())


def assert_diverged(proc, out: Path, run_id: str) -> dict:
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    err = last_json(proc.stderr)
    assert err["error"] == "TrainingDiverged"
    d = err["details"]
    for key in ("epoch", "step", "train_loss", "reason", "last_valid_checkpoint", "suggestion"):
        assert key in d
    ckpt = d["last_valid_checkpoint"]
    assert d["last_valid_checkpoint_reason"]
    if ckpt is not None:
        assert Path(ckpt).is_dir() and finite_weights(ckpt)
        tf.load_checkpoint(ckpt)  # loadable by plain from_pretrained
    else:
        assert "base model" in d["suggestion"]
    m = json.loads((out / "runs" / run_id / "run_manifest.json").read_text())
    assert m["status"] == "diverged" and m["error"]["error"] == "TrainingDiverged"
    # the stop is recorded (a loss-spike warning of the same step may follow it)
    assert "stopped" in [a["action"] for a in m["anomalies"]]
    assert json.loads((out / "runs" / run_id / "error.json").read_text())["error"] == "TrainingDiverged"
    return d


@pytest.mark.slow
def test_injected_nan_is_caught_within_one_step(tiny_dir, tmp_path):
    path = write_config(tmp_path / "c.yaml", base_config(tiny_dir, tmp_path))
    proc = run_cli("--config", path, "--run-id", "nan", env={"FINANCE_TRAINER_INJECT_NAN_AT_STEP": "5"})
    d = assert_diverged(proc, tmp_path, "nan")
    assert d["step"] == 5 and d["train_loss"] == "NaN"
    assert "1.0e-03" in d["suggestion"]  # lr 1e-2 / 10
    # the checkpoint saved at the stop holds the step-4 weights: the poisoned update was skipped
    m = json.loads((tmp_path / "runs" / "nan" / "run_manifest.json").read_text())
    assert m["anomalies"][0]["update_skipped"] is True


@pytest.mark.slow
def test_injected_gradient_explosion_stops(tiny_dir, tmp_path):
    path = write_config(tmp_path / "c.yaml", base_config(tiny_dir, tmp_path))
    proc = run_cli("--config", path, "--run-id", "boom", env={"FINANCE_TRAINER_INJECT_GRAD_SCALE": "3:1000"})
    d = assert_diverged(proc, tmp_path, "boom")
    assert d["step"] == 3 and "exceeds grad_norm_limit 100" in d["reason"]


@pytest.mark.slow
def test_absurd_learning_rate_diverges_by_itself(tiny_dir, tmp_path):
    cfg = set_key(base_config(tiny_dir, tmp_path), "training.hyperparameters.learning_rate", 50.0)
    cfg = set_key(cfg, "training.hyperparameters.max_grad_norm", 1.0e6)  # let the update blow up
    cfg = set_key(cfg, "training.hyperparameters.warmup_steps", 0)
    cfg = set_key(cfg, "logging.eval_steps", 2)
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--run-id", "wild")
    assert_diverged(proc, tmp_path, "wild")


class FakeState:
    def __init__(self, step, epoch=1.0):
        self.global_step, self.epoch, self.max_steps, self.num_train_epochs = step, epoch, 100, 1  # as TrainerState


def guards(tmp_path, tiny_dir, **overrides):
    cfg = base_config(tiny_dir, tmp_path)
    for k, v in overrides.items():
        cfg = set_key(cfg, k, v)
    config = tf.load_training_config(str(write_config(tmp_path / "g.yaml", cfg)))
    tracker = tf.Tracker(run_id="t", log_dir=tmp_path, is_main=False)
    history, probe = tf.RunHistory(), tf.StepProbe()
    cbs = tf.callbacks_for_run(config, tracker, history, probe, dry_run=False)
    return {type(c).__name__: c for c in cbs}, history, probe


def test_divergence_needs_three_consecutive_evals_above_best(tmp_path, tiny_dir):
    from transformers import TrainerControl
    cbs, history, _ = guards(tmp_path, tiny_dir)
    guard, control = cbs["DivergenceGuard"], TrainerControl()
    # best 1.40 after step 4; 1.60 and 1.70 are >10% above it, 1.52 is not and resets the count
    for step, loss in enumerate([2.0, 1.5, 1.70, 1.40, 1.60, 1.70, 1.52, 1.60, 1.65], 1):
        guard.on_evaluate(None, FakeState(step), control, metrics={"eval_loss": loss})
    assert not control.should_training_stop and history.stop is None
    guard.on_evaluate(None, FakeState(10), control, metrics={"eval_loss": 1.70})
    assert control.should_training_stop and history.stop["kind"] == "divergence" and history.stop["step"] == 10


def test_loss_spike_warns_without_stopping(tmp_path, tiny_dir):
    from transformers import TrainerControl
    cbs, history, _ = guards(tmp_path, tiny_dir)
    control = TrainerControl()
    for step, loss in enumerate([2.0, 1.9, 1.8, 1.7, 9.0, 1.6], 1):
        cbs["LossSpikeWarning"].on_log(None, FakeState(step), control, logs={"loss": loss})
    assert not control.should_training_stop
    assert [a["step"] for a in history.anomalies] == [5] and history.anomalies[0]["action"] == "warned"


@pytest.mark.slow
def test_early_stopping_completes_normally(tiny_dir, tmp_path):
    """The real CLI end to end, with the validation losses fixed by a test hook so the outcome does not depend on
    how fast the tiny model learns on this CPU: evaluations at steps 0, 12, 24, 36 report 6.0, 3.0, 2.0, 2.5.
    Patience 1 must stop at step 36 (first evaluation without improvement), name step 24 as the best, and take
    the test metrics from that checkpoint."""
    cfg = base_config(tiny_dir, tmp_path)
    cfg = set_key(cfg, "training.optimization.early_stopping_patience", 1)
    cfg = set_key(cfg, "training.hyperparameters.num_epochs", 30)
    cfg = set_key(cfg, "logging.eval_steps", 12)  # 96 records / batch 8 = 12 steps: one evaluation per epoch
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--run-id", "es",
                   env={"FINANCE_TRAINER_INJECT_VAL_LOSSES": "6.0,3.0,2.0,2.5"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((tmp_path / "runs" / "es" / "run_manifest.json").read_text())
    tr = m["training_results"]
    assert m["status"] == "completed" and tr["early_stopped"] is True
    es = tr["early_stopping"]
    assert es["step"] == tr["total_steps"] == 36 and es["best"] == 2.0 and es["evals_without_improvement"] == 1
    assert not [a for a in m["anomalies"] if a["action"] == "stopped"]
    assert Path(m["checkpoints"]["best_checkpoint"]).name == "checkpoint-epoch-2"
    assert m["test_results"]["evaluated"] == "checkpoint-epoch-2"
    assert "early stopping" in proc.stdout
    names = {c["name"] for c in tf.list_checkpoints("es", str(tmp_path / "runs"), details=True)}
    assert "checkpoint-epoch-4" not in names  # nothing trained past the stop
    best = tmp_path / "runs" / "es" / "checkpoint-epoch-2"  # reloaded after training: the test metrics are its own
    assert m["test_results"]["test_loss"] == pytest.approx(
        tf.evaluate_checkpoint(str(best), str(tiny_dir / "messages" / "test.jsonl"))["test_loss"], rel=1e-6)


@pytest.mark.slow
def test_a_best_checkpoint_at_the_last_step_is_what_the_test_evaluates(tiny_dir, tmp_path):
    """When the best checkpoint is the one saved at the last step, its weights are those in memory and are not read
    back: the test metrics still equal that checkpoint's, evaluated from disk. The validation losses are fixed by a
    test hook (evaluations at steps 0, 6, 12 report 6.0, 5.0, 4.0), so the last one is the best on any machine."""
    cfg = set_key(base_config(tiny_dir, tmp_path), "training.hyperparameters.num_epochs", 1)
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--run-id", "last",
                   env={"FINANCE_TRAINER_INJECT_VAL_LOSSES": "6.0,5.0,4.0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((tmp_path / "runs" / "last" / "run_manifest.json").read_text())
    assert m["training_results"]["total_steps"] == 12 and m["test_results"]["evaluated"] == "checkpoint-epoch-1"
    best = tmp_path / "runs" / "last" / "checkpoint-epoch-1"
    assert Path(m["checkpoints"]["best_checkpoint"]).name == best.name
    assert m["test_results"]["test_loss"] == pytest.approx(
        tf.evaluate_checkpoint(str(best), str(tiny_dir / "messages" / "test.jsonl"))["test_loss"], rel=1e-6)


@pytest.mark.slow
def test_retention_keeps_best_latest_and_backup(tiny_dir, tmp_path):
    cfg = base_config(tiny_dir, tmp_path)
    cfg = set_key(cfg, "training.checkpointing.save_total_limit", 1)
    cfg = set_key(cfg, "training.checkpointing.save_strategy", "steps")
    cfg = set_key(cfg, "logging.eval_steps", 4)
    cfg = set_key(cfg, "logging.save_steps", 4)
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--run-id", "keep")
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((tmp_path / "runs" / "keep" / "run_manifest.json").read_text())
    ckpts = tf.list_checkpoints("keep", str(tmp_path / "runs"), details=True)
    names = [c["name"] for c in ckpts]
    assert len(names) <= 3 and "checkpoint-24" in names and "checkpoint-20" in names
    assert Path(m["checkpoints"]["best_checkpoint"]).name in names
    assert [c["name"] for c in ckpts if c["is_latest"]] == ["checkpoint-24"]
    assert [c["path"] for c in ckpts if c["is_best"]] == [str(tmp_path / "runs" / "keep" / m["checkpoints"]["best_checkpoint"])]
    assert all(c["health"] == "ok" and c["run_id"] == "keep" for c in ckpts)
    log = Path(m["metrics"]["train_log"]).read_text()
    assert "retention (save_total_limit=1): deleted checkpoint-4" in log


def test_retention_unit(tmp_path):
    for step in (10, 20, 30, 40, 50):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / tf.CHECKPOINT_META).write_text(json.dumps({"name": d.name, "step": step, "epoch": step / 10,
                                                        "health": "ok" if step != 50 else "nonfinite"}))
    deleted = tf.apply_retention(tmp_path, 1, best=str(tmp_path / "checkpoint-10"))
    # newest (50, unhealthy), latest healthy (40), backup (30), best (10)
    assert sorted(deleted) == ["checkpoint-20"]


def test_retention_under_save_strategy_epoch_keeps_the_epochs(tmp_path):
    """Evaluations every 3 steps, epochs of 12: the evaluations' checkpoints are kept only as latest, backup or
    best; save_total_limit counts the epoch checkpoints."""
    names = ["checkpoint-3", "checkpoint-6", "checkpoint-epoch-1", "checkpoint-15", "checkpoint-18",
             "checkpoint-epoch-2", "checkpoint-27", "checkpoint-30", "checkpoint-33"]
    for name in names:
        d = tmp_path / name
        d.mkdir()
        step = 12 * int(name.rsplit("-", 1)[1]) if "epoch" in name else int(name.rsplit("-", 1)[1])
        (d / tf.CHECKPOINT_META).write_text(json.dumps({"name": name, "step": step, "epoch": step / 12,
                                                        "health": "ok"}))
    deleted = tf.apply_retention(tmp_path, 2, best=str(tmp_path / "checkpoint-18"), save_strategy="epoch",
                                 save_steps=500)
    assert sorted(deleted) == ["checkpoint-15", "checkpoint-27", "checkpoint-3", "checkpoint-6"]
    # save_strategy: steps counts the multiples of save_steps: 6 is not one, 12 and 18 are
    for name in ("checkpoint-6", "checkpoint-12"):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / tf.CHECKPOINT_META).write_text(json.dumps({"name": name, "step": int(name[11:]),
                                                                       "health": "ok"}))
    assert "checkpoint-6" in tf.apply_retention(tmp_path, 2, best=None, save_strategy="steps", save_steps=12)


@pytest.mark.slow
def test_kill_during_checkpoint_save_leaves_no_half_checkpoint(tiny_dir, tmp_path):
    cfg = set_key(base_config(tiny_dir, tmp_path), "training.checkpointing.save_strategy", "steps")
    path = write_config(tmp_path / "c.yaml", cfg)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLOW_SAVE_SECONDS": "30",
           "PYTHONPATH": str(Path(__file__).parent / "slowfs")}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--config", str(path), "--run-id", "slow"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "runs" / "slow"
    deadline = time.time() + 300  # generous: a loaded machine reaches the first save late
    while time.time() < deadline and not list(run_dir.glob(".tmp-checkpoint-*/model.safetensors")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(run_dir.glob(".tmp-checkpoint-*")), "the save should have been in progress"
    assert tf.list_checkpoints(str(run_dir), details=True) == []
    assert not [p for p in run_dir.iterdir() if p.name.startswith("checkpoint-")]
    res = run_cli("--config", path, "--run-id", "slow", "--resume-from", "latest")
    assert res.returncode == 2 and last_json(res.stderr)["error"] == "CheckpointNotFound"


def test_fp16_overflow_is_the_loss_scalers_business_until_it_persists(tmp_path, tiny_dir):
    from transformers import TrainerControl
    cbs, history, probe = guards(tmp_path, tiny_dir, **{"compute.mixed_precision": "fp16",
                                                "training.hyperparameters.fp16": True})
    guard = cbs["NonFiniteAndExplodingGradGuard"]
    import torch
    model = torch.nn.Linear(2, 2)
    control = TrainerControl()
    # what FinanceTrainer's probe would report: a finite loss with an inf norm, step after step
    for step in range(tf.FP16_MAX_OVERFLOWS - 1):
        probe.loss_sum, probe.grad_norm = torch.tensor(2.0), float("inf")
        guard.on_pre_optimizer_step(None, FakeState(step), control, model=model)
    assert not control.should_training_stop
    assert [a["kind"] for a in history.anomalies] == ["fp16_overflow"]  # warned once
    probe.loss_sum, probe.grad_norm = torch.tensor(2.0), float("inf")
    guard.on_pre_optimizer_step(None, FakeState(99), control, model=model)
    assert control.should_training_stop and "consecutive fp16" in history.stop["reason"]
    assert history.stop["kind"] == "fp16_overflow"  # the loss scaler's range, not an exploding gradient


def test_resume_replays_patience_and_divergence_counters(tmp_path, tiny_dir):
    cfg = set_key(base_config(tiny_dir, tmp_path), "training.optimization.early_stopping_patience", 3)
    config = tf.load_training_config(str(write_config(tmp_path / "g.yaml", cfg)))
    history = tf.RunHistory(evals=[(0, 0.0, {"val_loss": 5.0}), (6, 0.5, {"val_loss": 2.0}),
                                   (12, 1.0, {"val_loss": 2.5}), (18, 1.5, {"val_loss": 2.4})],
                            train=[(s, 0.1, 3.0) for s in range(1, 19)])
    tracker = tf.Tracker(run_id="t", log_dir=tmp_path, is_main=False)
    cbs = {type(c).__name__: c for c in tf.callbacks_for_run(config, tracker, history, tf.StepProbe(), dry_run=False)}
    es, div = cbs["EarlyStoppingCallback"], cbs["DivergenceGuard"]
    assert (es.best, es.bad_evals) == (2.0, 2)  # two evaluations without improvement before the kill
    assert (div.best, div.bad) == (2.0, 2)  # 2.5 and 2.4 are both > 10% above 2.0
    assert cbs["LossSpikeWarning"].recent == [3.0] * 10
    assert not history.anomalies and history.stop is None  # replay decides nothing new
