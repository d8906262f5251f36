"""Every hyperparameter, optimization, checkpointing and compute key reaches TrainingArguments or the model."""
from __future__ import annotations

import logging

import train_finance_ssc_model as tf
from conftest import base_config, set_key, write_config


def load(tmp_path, tiny_dir, **overrides):
    cfg = base_config(tiny_dir, tmp_path)
    for k, v in overrides.items():
        cfg = set_key(cfg, k.replace("__", "."), v)
    return tf.load_training_config(str(write_config(tmp_path / "c.yaml", cfg)))


def test_keys_map_onto_training_arguments(tmp_path, tiny_dir):
    config = load(tmp_path, tiny_dir, **{
        "training__hyperparameters__bf16": True, "compute__mixed_precision": "bf16",
        "training__hyperparameters__gradient_accumulation_steps": 3, "training__hyperparameters__warmup_steps": 7,
        "training__hyperparameters__weight_decay": 0.05, "training__hyperparameters__max_grad_norm": 0.5,
        "training__optimization__lr_scheduler": "linear", "training__checkpointing__metric_for_best_model": "val_loss",
        "model__gradient_checkpointing": True, "training__seed": 7, "logging__logging_steps": 3,
        "logging__eval_steps": 9, "logging__save_steps": 18, "training__checkpointing__save_strategy": "steps"})
    args = tf.build_training_args(config, tmp_path / "run", dry_run=False, max_steps=None, resuming=False)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.num_train_epochs) == (8, 3, 2.0)
    assert (args.learning_rate, args.warmup_steps, args.weight_decay, args.max_grad_norm) == (0.01, 7, 0.05, 0.5)
    # adamw runs torch's fused AdamW where torch has fused kernels for the device (CPU since torch 2.4)
    assert args.optim.value == "adamw_torch_fused" and args.lr_scheduler_type.value == "linear"
    assert args.bf16 and not args.fp16 and args.activation_checkpointing
    assert (args.seed, args.data_seed, args.logging_steps, args.eval_steps, args.save_steps) == (7, 7, 3, 9, 18)
    assert args.metric_for_best_model == "loss" and args.greater_is_better is False
    assert args.logging_nan_inf_filter is False and args.eval_on_start is True
    assert args.use_cpu and list(args.report_to) in ([], ["none"])


def test_epoch_strategy_saves_at_evals_and_epoch_ends(tmp_path, tiny_dir):
    config = load(tmp_path, tiny_dir, logging__eval_steps=5, logging__save_steps=100)
    args = tf.build_training_args(config, tmp_path / "run", dry_run=False, max_steps=None, resuming=True)
    assert args.save_steps == 5 and args.eval_on_start is False  # no second baseline eval on resume
    assert tf.checkpoint_name(config, 12, 1.0) == "checkpoint-epoch-1"
    assert tf.checkpoint_name(config, 5, 0.4167) == "checkpoint-5"


def test_flash_attention_falls_back_to_sdpa_with_a_warning(tmp_path, tiny_dir, caplog):
    config = load(tmp_path, tiny_dir, model__use_flash_attention_2=True)
    with caplog.at_level(logging.WARNING, logger="finance_trainer"):
        assert tf.attention_implementation(config) == "sdpa"
    assert "flash" in caplog.text and "sdpa" in caplog.text


def test_gradient_checkpointing_turns_off_the_kv_cache(tmp_path, tiny_dir):
    config = load(tmp_path, tiny_dir, model__gradient_checkpointing=True)
    model = tf.load_base_model(config, "sdpa")
    assert model.config.use_cache is False
