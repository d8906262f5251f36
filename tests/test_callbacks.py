"""Each callback's decision, driven directly with Trainer's own TrainerState/TrainerControl (no training run):
the guards stop or warn at the step they should, and the real CallbackHandler calls our callbacks."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, PrinterCallback

import train_finance_ssc_model as tf
from conftest import base_config, set_key, write_config


def state(step: int, epoch: float = 0.0, **kw) -> TrainerState:
    return TrainerState(global_step=step, epoch=epoch, max_steps=100, num_train_epochs=1, **kw)


def model_with_grads() -> torch.nn.Module:
    model = torch.nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    return model


def grad_guard(history, probe, fp16=False, dry_run=False):
    return tf.NonFiniteAndExplodingGradGuard(history, probe, grad_norm_limit=100.0, fp16=fp16, dry_run=dry_run)


def test_the_base_answers_every_trainer_event_and_nothing_else():
    cb = tf.Callback()
    events = [name for name in dir(TrainerCallback) if name.startswith("on_")]
    assert "on_pre_optimizer_step" in events
    for event in events:
        assert getattr(cb, event)(None, state(1), TrainerControl()) is None
    with pytest.raises(AttributeError):
        cb.recent  # a missing attribute is still an error, not a silent no-op


def test_trainers_callback_handler_calls_ours_in_order_and_finds_them_by_class(tmp_path):
    from transformers import TrainingArguments
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, eval_strategy="steps",
                             eval_steps=3, save_strategy="no", logging_strategy="no")
    history, flag = tf.RunHistory(), {}
    ours = [tf.EvalSaveFlowCallback("steps", dry_run=False), tf.PreemptionCallback(history, False, flag)]
    handler = CallbackHandler([DefaultFlowCallback, PrinterCallback, *ours], torch.nn.Linear(2, 2), None, None, None)
    st, control = state(3, eval_steps=3), TrainerControl()
    for event in ("on_init_end", "on_train_begin", "on_epoch_begin", "on_step_begin", "on_pre_optimizer_step",
                  "on_optimizer_step", "on_substep_end", "on_prediction_step"):  # events none of ours defines
        control = getattr(handler, event)(args, st, control)
    control = handler.on_step_end(args, st, control)
    # DefaultFlowCallback asked for the step-3 evaluation; EvalSaveFlowCallback, called after it, adds the save
    assert control.should_evaluate and control.should_save and not control.should_training_stop
    flag["signal"] = "SIGTERM"
    control = handler.on_step_end(args, state(4), handler.on_step_begin(args, state(4), control))
    assert control.should_save and control.should_training_stop and history.preempted["step"] == 4
    handler.remove_callback(PrinterCallback)
    assert handler.pop_callback(tf.PreemptionCallback) is ours[1]
    assert [type(c) for c in handler.callbacks] == [DefaultFlowCallback, tf.EvalSaveFlowCallback]


def test_nan_loss_stops_and_skips_the_update():
    history, probe = tf.RunHistory(), tf.StepProbe()
    guard, model, control = grad_guard(history, probe), model_with_grads(), TrainerControl()
    probe.loss_sum, probe.grad_norm = torch.tensor(float("nan")), 1.0
    guard.on_pre_optimizer_step(None, state(4), control, model=model)
    assert control.should_training_stop
    assert all(p.grad is None for p in model.parameters())  # the optimizer has nothing to apply
    stop = history.stop
    assert (stop["kind"], stop["step"], stop["action"], stop["update_skipped"]) == ("nonfinite", 5, "stopped", True)
    assert stop["train_loss"] == "NaN" and (probe.loss_sum, probe.grad_norm) == (None, None)
    control.should_save = False
    guard.on_step_end(None, state(5), control)  # the stopped step ends: save the weights the update left alone
    assert control.should_save


def test_a_healthy_step_passes_untouched():
    history, probe = tf.RunHistory(), tf.StepProbe()
    guard, model, control = grad_guard(history, probe), model_with_grads(), TrainerControl()
    probe.loss_sum, probe.grad_norm = torch.tensor(2.0), 100.0  # at the limit is not over it
    guard.on_pre_optimizer_step(None, state(4), control, model=model)
    guard.on_step_end(None, state(5), control)
    assert not control.should_training_stop and not control.should_save and not history.anomalies
    assert all(p.grad is not None for p in model.parameters())


def test_grad_norm_over_the_limit_stops():
    history, probe = tf.RunHistory(), tf.StepProbe()
    guard, model, control = grad_guard(history, probe), model_with_grads(), TrainerControl()
    probe.loss_sum, probe.grad_norm = torch.tensor(2.0), 150.0
    guard.on_pre_optimizer_step(None, state(7), control, model=model)
    assert control.should_training_stop and all(p.grad is None for p in model.parameters())
    assert history.stop["kind"] == "grad_explosion" and history.stop["step"] == 8
    assert history.stop["reason"] == "gradient norm 150 exceeds grad_norm_limit 100"


def test_an_infinite_grad_norm_stops_at_once_without_fp16():
    history, probe = tf.RunHistory(), tf.StepProbe()
    guard, control = grad_guard(history, probe), TrainerControl()
    probe.loss_sum, probe.grad_norm = torch.tensor(2.0), math.inf
    guard.on_pre_optimizer_step(None, state(0), control, model=model_with_grads())
    assert control.should_training_stop and history.stop["kind"] == "nonfinite"


def test_fp16_overflows_warn_once_then_stop_after_the_maximum_in_a_row():
    history, probe = tf.RunHistory(), tf.StepProbe()
    guard, model, control = grad_guard(history, probe, fp16=True), model_with_grads(), TrainerControl()

    def step(n, norm):
        probe.loss_sum, probe.grad_norm = torch.tensor(2.0), norm
        guard.on_pre_optimizer_step(None, state(n), control, model=model)

    for n in range(tf.FP16_MAX_OVERFLOWS - 1):
        step(n, math.inf)
    step(50, 3.0)  # a finite norm: the scaler found its scale, the count starts again
    for n in range(tf.FP16_MAX_OVERFLOWS - 1):
        step(100 + n, math.inf)
    assert not control.should_training_stop
    # warned at the first overflow of each run of them, not at every one
    assert [(a["kind"], a["step"], a["action"]) for a in history.anomalies] == [
        ("fp16_overflow", 1, "warned"), ("fp16_overflow", 101, "warned")]
    step(200, math.inf)
    assert control.should_training_stop and history.stop["step"] == 201
    assert history.stop["reason"].startswith(f"{tf.FP16_MAX_OVERFLOWS} consecutive fp16 gradient overflows")


def test_divergence_stops_after_divergence_evals_evaluations_above_the_best():
    history, control = tf.RunHistory(), TrainerControl()
    guard = tf.DivergenceGuard(history, divergence_increase=0.10, divergence_evals=2)
    # best 1.0; 1.2 is over 10% above it, 1.05 is not and resets the count
    for n, loss in enumerate([1.0, 1.2, 1.05, 1.2], 1):
        guard.on_evaluate(None, state(n), control, metrics={"eval_loss": loss})
    assert not control.should_training_stop and not history.anomalies
    guard.on_evaluate(None, state(5), control, metrics={"eval_loss": 1.3})
    assert control.should_training_stop
    assert (history.stop["kind"], history.stop["step"], history.stop["best_val_loss"]) == ("divergence", 5, 1.0)


def test_a_nonfinite_validation_loss_stops_at_once():
    history, control = tf.RunHistory(), TrainerControl()
    guard = tf.DivergenceGuard(history, divergence_increase=0.10, divergence_evals=3)
    guard.on_evaluate(None, state(1), control, metrics={"eval_loss": 2.0})
    guard.on_evaluate(None, state(2), control, metrics={"eval_loss": float("nan")})
    assert control.should_training_stop and history.stop["kind"] == "nonfinite_val_loss"


def test_early_stopping_after_patience_evaluations_without_improvement():
    history, control = tf.RunHistory(), TrainerControl()
    es = tf.EarlyStoppingCallback(history, "val_loss", patience=2)
    es.on_evaluate(None, state(0), control, metrics={"eval_loss": 0.1})  # the eval_on_start baseline: not counted
    for n, loss in ((6, 3.0), (12, 2.0), (18, 2.5)):
        es.on_evaluate(None, state(n, epoch=n / 12), control, metrics={"eval_loss": loss})
    assert not control.should_training_stop and history.early_stopped is None
    es.on_evaluate(None, state(24, epoch=2.0), control, metrics={"eval_loss": 2.1})
    assert control.should_training_stop and history.stop is None  # a normal end, not an anomaly
    assert history.early_stopped == {"epoch": 2.0, "step": 24, "metric": "val_loss", "best": 2.0,
                                     "evals_without_improvement": 2}


def test_early_stopping_on_a_metric_where_greater_is_better():
    history, control = tf.RunHistory(), TrainerControl()
    es = tf.EarlyStoppingCallback(history, "val_token_accuracy", patience=1)
    for n, acc in ((1, 0.5), (2, 0.6)):
        es.on_evaluate(None, state(n), control, metrics={"eval_token_accuracy": acc})
    assert not control.should_training_stop
    es.on_evaluate(None, state(3), control, metrics={"eval_token_accuracy": 0.55})
    assert control.should_training_stop and history.early_stopped["best"] == 0.6


def test_a_loss_spike_warns_and_training_goes_on():
    history, control = tf.RunHistory(evals=[(0, 0.0, {"val_loss": 2.0})]), TrainerControl()
    spike = tf.LossSpikeWarning(history, spike_factor=3.0, spike_window=3)
    spike.on_log(None, state(1), control, logs={"loss": 7.0})  # no window yet: over 3x the initial val loss
    for n, loss in ((2, 1.0), (3, 1.0), (4, 1.0), (5, float("nan")), (6, 3.5), (7, 1.0)):
        spike.on_log(None, state(n), control, logs={"loss": loss})
    assert not control.should_training_stop and history.stop is None
    assert [(a["kind"], a["step"], a["action"]) for a in history.anomalies] == [
        ("loss_spike", 1, "warned"), ("loss_spike", 6, "warned")]
    assert "initial validation loss" in history.anomalies[0]["reason"]
    assert "recent mean" in history.anomalies[1]["reason"] and history.anomalies[1]["recent_mean"] == 1.0
    assert spike.recent == [1.0, 3.5, 1.0]  # the window, NaN left out


def test_the_preemption_flag_saves_and_stops_at_the_step_end():
    history, flag = tf.RunHistory(), {}
    cb, control = tf.PreemptionCallback(history, dry_run=False, signal_flag=flag), TrainerControl()
    model = torch.nn.Linear(2, 2)
    cb.on_step_end(None, state(3), control, model=model)
    assert not (control.should_save or control.should_training_stop) and history.preempted is None
    flag["signal"] = "SIGTERM"
    cb.on_step_end(None, state(4, epoch=0.5), control, model=model)
    assert control.should_save and control.should_training_stop
    assert history.preempted == {"signal": "SIGTERM", "step": 4, "epoch": 0.5}
    dry, control = tf.PreemptionCallback(tf.RunHistory(), dry_run=True, signal_flag=flag), TrainerControl()
    dry.on_step_end(None, state(4), control, model=model)
    assert not (control.should_save or control.should_training_stop)


def test_eval_save_flow_saves_at_every_evaluation_and_each_epoch_end_once():
    flow, control = tf.EvalSaveFlowCallback("epoch", dry_run=False), TrainerControl()
    control.should_evaluate = True
    flow.on_step_end(None, state(6), control)
    assert control.should_save
    flow.on_save(None, state(12), TrainerControl())
    control = TrainerControl()
    flow.on_epoch_end(None, state(12, epoch=1.0), control)  # saved at this step already
    assert not (control.should_evaluate or control.should_save)
    flow.on_epoch_end(None, state(24, epoch=2.0), control)
    assert control.should_evaluate and control.should_save
    control = TrainerControl()
    tf.EvalSaveFlowCallback("steps", dry_run=False).on_epoch_end(None, state(24, epoch=2.0), control)
    assert not (control.should_evaluate or control.should_save)


def test_metrics_callback_renames_keys_and_keeps_the_summary_off_the_curve(tmp_path):
    history = tf.RunHistory()
    cb = tf.MetricsCallback(tf.Tracker(run_id="t", log_dir=tmp_path, is_main=False, echo=False), history)
    cb.on_log(None, state(2, epoch=0.25), TrainerControl(),
              logs={"loss": 2.5, "learning_rate": 1e-3, "epoch": 0.25, "train_runtime": 9.0})
    cb.on_log(None, state(6, epoch=0.5), TrainerControl(), logs={"eval_loss": 2.0, "eval_perplexity": 7.4,
                                                                 "eval_samples_per_second": 3.0})
    cb.on_log(None, state(12, epoch=1.0), TrainerControl(), logs={"train_loss": 2.2, "train_runtime": 30.0})
    assert history.train == [(2, 0.25, 2.5)]
    assert history.evals == [(6, 0.5, {"val_loss": 2.0, "val_perplexity": 7.4})]
    assert history.summary == {"train_loss": 2.2, "train_runtime": 30.0}


def run_config(tmp_path, **overrides):
    cfg = base_config(tmp_path, tmp_path)  # the paths are never opened: only the settings are read
    for key, value in overrides.items():
        cfg = set_key(cfg, key, value)
    return tf.load_training_config(str(write_config(tmp_path / "c.yaml", cfg)))


def test_callbacks_for_run_in_trainer_order_with_the_configs_settings(tmp_path):
    config = run_config(tmp_path, **{"training.optimization.early_stopping_patience": 2,
                                     "training.guards.divergence_evals": 5, "training.guards.spike_window": 4})
    tracker = tf.Tracker(run_id="t", log_dir=tmp_path, is_main=False)
    cbs = tf.callbacks_for_run(config, tracker, tf.RunHistory(), tf.StepProbe(), dry_run=False)
    # EvalSaveFlowCallback before EpochSummaryCallback: the epoch line reads the evaluation it requested
    assert [type(c).__name__ for c in cbs] == [
        "TrainingTimeCallback", "MetricsCallback", "EvalProgressCallback", "EvalSaveFlowCallback",
        "EpochSummaryCallback", "NonFiniteAndExplodingGradGuard", "DivergenceGuard", "LossSpikeWarning",
        "PreemptionCallback", "EarlyStoppingCallback"]
    by_name = {type(c).__name__: c for c in cbs}
    assert by_name["DivergenceGuard"].evals == 5 and by_name["LossSpikeWarning"].window == 4
    assert by_name["EarlyStoppingCallback"].patience == 2
    assert by_name["PreemptionCallback"].signal_flag is tf._preempt  # the flag the signal handler sets
    dry = tf.callbacks_for_run(config, tracker, tf.RunHistory(), tf.StepProbe(), dry_run=True)
    assert not any(isinstance(c, tf.EarlyStoppingCallback) for c in dry)
