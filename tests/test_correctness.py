"""Results that are right on every path: a resume with new hyperparameters uses them, the checkpoint offered
after a divergence is a healthy one, and a loss spike is seen from the first logged loss."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

import train_finance_ssc_model as tf
from conftest import base_config, last_json, run_cli, set_key, write_config


def logged(stdout: str, key: str) -> dict[int, float]:
    """{step: value} of one metric from the console's step lines."""
    out = {}
    for line in stdout.splitlines():
        m = re.search(r"step (\d+)/\d+ \(\d+%\) \|.*\b" + key + r" ([-+.\deE]+|nan|inf)", line)
        if m:
            out[int(m.group(1))] = float(m.group(2))
    return out


@pytest.fixture(scope="module")
def diverged(tiny_dir, tmp_path_factory):
    """A run at lr 1e-2 whose step 5 sees a NaN (test hook): certain to stop at step 5 on any machine."""
    out = tmp_path_factory.mktemp("div")
    cfg = set_key(base_config(tiny_dir, out), "logging.logging_steps", 1)
    path = write_config(out / "c.yaml", cfg)
    proc = run_cli("--config", path, "--run-id", "d", env={"FINANCE_TRAINER_INJECT_NAN_AT_STEP": "5"})
    assert proc.returncode == 3, proc.stderr[-2000:]
    return out, path, last_json(proc.stderr)["details"]


@pytest.mark.slow
def test_resume_with_the_suggested_learning_rate_uses_it(diverged):
    out, path, d = diverged
    assert "1.0e-03" in d["suggestion"] and d["last_valid_checkpoint"]
    proc = run_cli("--config", path, "--resume-from", d["last_valid_checkpoint"],
                   "--set", "training.hyperparameters.learning_rate=1.0e-03")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "schedule restarted at step 5" in proc.stdout
    lrs = {s: v for s, v in logged(proc.stdout, "learning_rate").items() if s > 5}
    # a fresh warmup to the new peak (warmup_steps 2 capped at 10% of the 19 steps left: 1 step), then cosine decay
    # over the remaining 18; the old schedule would still be near 1e-2 here
    assert lrs and max(lrs.values()) <= 1.0e-3 * (1 + 1e-9) and max(lrs.values()) > 0.9e-3, lrs
    assert lrs[6] == 0.0 and lrs[7] == pytest.approx(1.0e-3, rel=1e-6)  # the warmup starts again from 0
    assert lrs[24] < 0.05e-3  # the restarted schedule decays to the run's end
    m = json.loads((out / "runs" / "d" / "run_manifest.json").read_text())
    assert m["status"] == "completed"
    change = m["resumes"][-1]["hyperparameter_changes"]["training.hyperparameters.learning_rate"]
    assert change == {"old": 0.01, "new": 0.001}
    losses = [v for s, v in logged(proc.stdout, "train_loss").items() if s > 5]
    assert losses and all(math.isfinite(x) for x in losses)
    meta = json.loads((out / "runs" / "d" / "checkpoint-epoch-2" / "checkpoint_meta.json").read_text())
    assert meta["schedule"]["start_step"] == 5 and meta["schedule"]["peak_lr"] == 1.0e-3


@pytest.mark.slow
def test_second_resume_keeps_the_restarted_schedule(diverged):
    """A checkpoint written after a schedule restart resumes onto that same schedule, bit for bit."""
    out, path, _ = diverged
    run_dir = out / "runs" / "d"
    ckpts = {c["name"]: c for c in tf.list_checkpoints(str(run_dir), details=True)}
    src = ckpts["checkpoint-epoch-1"]["path"]
    before = (run_dir / "checkpoint-epoch-2" / "model.safetensors").read_bytes()
    proc = run_cli("--config", path, "--resume-from", src, "--set", "training.hyperparameters.learning_rate=1.0e-03")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "schedule restarted" not in proc.stdout  # nothing changed against this checkpoint
    assert (run_dir / "checkpoint-epoch-2" / "model.safetensors").read_bytes() == before


@pytest.mark.slow
def test_nan_stop_offers_the_checkpoint_saved_at_the_stop(diverged):
    """The NaN update was skipped, so the weights saved at the stop are step 4's: measured, they are healthy."""
    out, _, d = diverged
    assert Path(d["last_valid_checkpoint"]).name == "checkpoint-5"
    assert "checkpoint-5: validation loss" in d["last_valid_checkpoint_reason"]


@pytest.mark.slow
def test_weights_ruined_before_the_stop_are_never_offered(tiny_dir, tmp_path):
    """lr 50 with no clipping: Adam moves every weight by about 50 in its first step, so the weights are ruined
    long before the grad-norm guard (forced at step 3 by the test hook, or earlier by itself) stops the run.
    The checkpoint saved at the stop holds those weights: it must not be offered as valid."""
    cfg = base_config(tiny_dir, tmp_path)
    cfg = set_key(cfg, "training.hyperparameters.learning_rate", 50.0)
    cfg = set_key(cfg, "training.hyperparameters.max_grad_norm", 1.0e6)
    cfg = set_key(cfg, "training.hyperparameters.warmup_steps", 0)
    cfg = set_key(cfg, "logging.logging_steps", 1)
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--run-id", "ruin",
                   env={"FINANCE_TRAINER_INJECT_GRAD_SCALE": "3:1000000"})
    assert proc.returncode == 3, proc.stderr[-2000:]
    d = last_json(proc.stderr)["details"]
    assert d["step"] <= 3
    stop_ckpt = tmp_path / "runs" / "ruin" / f"checkpoint-{d['step']}"
    assert stop_ckpt.is_dir()  # saved (the record of where it stopped), but not offered
    assert d["last_valid_checkpoint"] is None
    assert f"checkpoint-{d['step']}" in d["last_valid_checkpoint_reason"] and "base model" in d["suggestion"]
    m = json.loads((tmp_path / "runs" / "ruin" / "run_manifest.json").read_text())
    # the blow-up is flagged from the first logged losses, before any 3-loss window exists
    spikes = [a for a in m["anomalies"] if a["kind"] == "loss_spike"]
    assert spikes and spikes[0]["step"] <= d["step"] and "initial validation loss" in spikes[0]["reason"]


def test_spike_is_flagged_from_the_first_logged_loss(tmp_path, tiny_dir):
    """6.94 -> 75.7 at the second logged loss: no 3-loss window yet, so the initial validation loss is the
    reference (spike_factor 3 by default)."""
    from transformers import TrainerControl
    from test_guards_checkpoints import FakeState, guards
    cbs, history, _ = guards(tmp_path, tiny_dir)
    history.evals.append((0, 0.0, {"val_loss": 6.93}))
    for step, loss in ((1, 6.94), (2, 75.7)):
        cbs["LossSpikeWarning"].on_log(None, FakeState(step), TrainerControl(), logs={"loss": loss})
    assert [(a["kind"], a["step"], a["action"]) for a in history.anomalies] == [("loss_spike", 2, "warned")]


def _tokenized(cfg_path: Path):
    """The config, tokenizer and tokenized splits, as a run prepares them."""
    config = tf.load_training_config(str(cfg_path))
    validation = tf.validate_config(config)
    tokenizer = tf.load_tokenizer(config)
    data, _ = tf.load_splits(config, tokenizer, {s: i["shape"] for s, i in validation.data.items()})
    return config, tokenizer, data


def _train_four_steps(config, tokenizer, data, out: Path, evaluate: bool = False):
    """4 optimizer steps of FinanceTrainer from the seeded base model: the losses logged, the weights after, the
    validation metrics (evaluate=True), and the names of the arguments each model forward got (not None)."""
    tf.seed_everything(config.training.seed)
    model = tf.load_base_model(config, tf.attention_implementation(config))
    args = tf.build_training_args(config, out, dry_run=True, max_steps=4, resuming=False, model=model)
    extra = {"eval_dataset": data["valid"], "compute_metrics": tf.compute_metrics} if evaluate else {}
    trainer = tf._trainer_class()(model=model, args=args, train_dataset=data["train"],
                                  data_collator=tf.collator_for("sdpa", tokenizer.pad_token_id), **extra)
    trainer.run_config, trainer.probe = config, tf.StepProbe()
    forwards = []
    model.register_forward_pre_hook(lambda mod, a, k: forwards.append({n for n, v in k.items() if v is not None}),
                                    with_kwargs=True)
    trainer.train()
    metrics = trainer.evaluate() if evaluate else None
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, metrics, forwards


def _assert_same_weights(weights: dict, reference: dict) -> None:
    import torch
    for name, p in weights.items():
        assert torch.allclose(p, reference[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("packing", [False, True])
def test_answer_only_logits_train_the_same_weights(tiny_dir, tmp_path, monkeypatch, packing):
    """Training computes logits and loss at the answer positions only (answer_only_inputs): the same losses and
    the same weights after a few optimizer steps as from the full logits, with padded batches and with packed
    rows (position_ids, records side by side)."""
    cfg_path = write_config(tmp_path / "c.yaml", set_key(base_config(tiny_dir, tmp_path), "data.packing", packing))
    config, tokenizer, data = _tokenized(cfg_path)
    assert ("position_ids" in data["train"].column_names) == packing

    def train(answer_only: bool):
        monkeypatch.setattr(tf, "_accepts_logits_to_keep", (lambda m: True) if answer_only else (lambda m: False))
        losses, weights, _, forwards = _train_four_steps(config, tokenizer, data, tmp_path / f"out-{answer_only}")
        calls = ["logits_to_keep" in k for k in forwards]
        assert calls and all(calls) == answer_only and any(calls) == answer_only  # the path under test ran
        return losses, weights

    full_losses, full = train(False)
    losses, weights = train(True)
    assert losses == pytest.approx(full_losses, rel=1e-5)
    _assert_same_weights(weights, full)


def test_padded_batches_train_and_evaluate_the_same_without_their_mask(tiny_dir, tmp_path, monkeypatch):
    """Under sdpa a right-padded batch goes to the model without its attention_mask (without_padding_mask: causal
    attention never lets a record see the padding after it): the same losses and weights after a few optimizer
    steps, and the same validation metrics, as with the mask."""
    config, tokenizer, data = _tokenized(write_config(tmp_path / "c.yaml", base_config(tiny_dir, tmp_path)))
    lengths = [len(x) for x in data["train"]["input_ids"]]
    assert min(lengths) < max(lengths)  # batches carry padding
    drop = tf.without_padding_mask

    def train(drop_mask: bool):
        monkeypatch.setattr(tf, "without_padding_mask", drop if drop_mask else (lambda x: x))
        losses, weights, metrics, forwards = _train_four_steps(config, tokenizer, data, tmp_path / f"out-{drop_mask}",
                                                               evaluate=True)
        masks = ["attention_mask" in k for k in forwards]
        assert masks and any(masks) != drop_mask and all(masks) != drop_mask  # the path under test ran
        return losses, metrics, weights

    masked_losses, masked_metrics, masked = train(False)
    losses, metrics, weights = train(True)
    assert losses == pytest.approx(masked_losses, rel=1e-5)
    for key in ("eval_loss", "eval_token_accuracy", "eval_exact_match"):
        assert metrics[key] == pytest.approx(masked_metrics[key], rel=1e-5), key
    _assert_same_weights(weights, masked)
