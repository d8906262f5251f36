"""Config parsing: dataclasses, unknown keys with did-you-mean, types, --set overrides, path resolution."""
from __future__ import annotations

from pathlib import Path

import pytest

import train_finance_ssc_model as tf
from conftest import base_config, set_key, write_config

ROOT = Path(__file__).resolve().parents[1]


def test_production_config_parses_every_spec_key():
    cfg = tf.load_training_config(str(ROOT / "training_config.yaml"))
    assert cfg.model.base_checkpoint == "smollm3-base-8b"
    assert (cfg.model.vocab_size, cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_heads) == (49152, 4096, 32, 32)
    assert cfg.data.max_seq_length == 2048 and cfg.data.dataset_version == "2025-11-17"
    hp = cfg.training.hyperparameters
    assert (hp.learning_rate, hp.batch_size, hp.gradient_accumulation_steps, hp.num_epochs) == (2e-5, 4, 8, 3)
    assert (hp.warmup_steps, hp.weight_decay, hp.max_grad_norm, hp.fp16) == (500, 0.01, 1.0, True)
    assert cfg.training.optimization.early_stopping_metric == "val_loss"
    assert cfg.training.checkpointing.metric_for_best_model == "val_perplexity"
    assert cfg.logging.wandb.entity == "tbwa-smp-finance" and cfg.logging.wandb.tags == ["bir", "odoo", "ph-tax", "v1"]
    assert cfg.logging.tensorboard.log_dir == "/mnt/finance-smollm3/tensorboard"
    assert (cfg.compute.num_gpus, cfg.compute.distributed_backend, cfg.compute.mixed_precision) == (8, "nccl", "fp16")


def test_unknown_key_names_dotted_path_and_nearest_key(tmp_path, tiny_dir):
    cfg = base_config(tiny_dir, tmp_path)
    cfg["training"]["hyperparameters"]["learning_rat"] = 1e-5
    with pytest.raises(tf.TrainerError) as exc:
        tf.load_training_config(str(write_config(tmp_path / "c.yaml", cfg)))
    d = exc.value.details
    assert d["field"] == "training.hyperparameters.learning_rat"
    assert "learning_rate" in d["suggestion"]


def test_every_problem_reported_at_once(tmp_path, tiny_dir):
    cfg = base_config(tiny_dir, tmp_path)
    cfg["training"]["hyperparameters"]["batch_size"] = "eight"
    cfg["logging"]["tensorbord"] = {}
    del cfg["data"]["train_path"]
    with pytest.raises(tf.TrainerError) as exc:
        tf.load_training_config(str(write_config(tmp_path / "c.yaml", cfg)))
    fields = {e["details"]["field"] for e in exc.value.errors}
    assert {"training.hyperparameters.batch_size", "logging.tensorbord", "data.train_path"} <= fields


def test_scientific_notation_without_dot_is_a_float(tmp_path, tiny_dir):
    path = write_config(tmp_path / "c.yaml", base_config(tiny_dir, tmp_path))
    path.write_text(path.read_text().replace("learning_rate: 0.01", "learning_rate: 2e-5"))
    assert tf.load_training_config(str(path)).training.hyperparameters.learning_rate == 2e-5


def test_set_overrides_apply_before_validation_and_are_recorded(tmp_path, tiny_dir):
    path = write_config(tmp_path / "c.yaml", base_config(tiny_dir, tmp_path))
    cfg = tf.load_training_config(str(path), ["training.hyperparameters.learning_rate=3e-5",
                                              "training.optimization.early_stopping_patience=5"])
    assert cfg.training.hyperparameters.learning_rate == 3e-5
    assert cfg.training.optimization.early_stopping_patience == 5
    assert cfg.overrides == ["training.hyperparameters.learning_rate=3e-5",
                             "training.optimization.early_stopping_patience=5"]
    with pytest.raises(tf.TrainerError) as exc:
        tf.load_training_config(str(path), ["training.hyperparameters.lr=1"])
    assert exc.value.details["field"] == "training.hyperparameters.lr"


def test_relative_data_paths_resolve_against_config_folder_then_cwd(tmp_path, tiny_dir, monkeypatch):
    cfg_dir = tmp_path / "cfgs"
    (cfg_dir / "d").mkdir(parents=True)
    (cfg_dir / "d" / "train.jsonl").write_text((tiny_dir / "text" / "train.jsonl").read_text())
    cwd = tmp_path / "work"
    (cwd / "e").mkdir(parents=True)
    (cwd / "e" / "valid.jsonl").write_text((tiny_dir / "text" / "valid.jsonl").read_text())
    monkeypatch.chdir(cwd)
    cfg = base_config(tiny_dir, tmp_path, "text")
    cfg["data"].update(train_path="d/train.jsonl", valid_path="e/valid.jsonl")
    loaded = tf.load_training_config(str(write_config(cfg_dir / "c.yaml", cfg)))
    assert loaded.resolved_paths["data.train_path"]["path"] == str((cfg_dir / "d" / "train.jsonl").resolve())
    assert "config" in loaded.resolved_paths["data.train_path"]["resolved"]
    assert loaded.resolved_paths["data.valid_path"]["path"] == str((cwd / "e" / "valid.jsonl").resolve())
    assert "working directory" in loaded.resolved_paths["data.valid_path"]["resolved"]


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  base_checkpoint: x\ndata:\n  train_path: [unclosed\n")
    with pytest.raises(tf.TrainerError) as exc:
        tf.load_training_config(str(path))
    assert exc.value.kind == "InvalidConfig" and exc.value.details["line"] >= 4


def test_differences_from_defaults_are_listed(tmp_path, tiny_dir):
    cfg = tf.load_training_config(str(write_config(tmp_path / "c.yaml", base_config(tiny_dir, tmp_path))))
    diffs = tf.config_differences_from_defaults(cfg)
    assert any(d.startswith("training.hyperparameters.learning_rate: 0.01 (default 2e-05)") for d in diffs)


def test_literal_paths_and_unquoted_versions(tmp_path, tiny_dir):
    cfg = base_config(tiny_dir, tmp_path)
    path = write_config(tmp_path / "c.yaml", cfg)
    path.write_text(path.read_text().replace("dataset_version: test", "dataset_version: 2025-11-17"))
    loaded = tf.load_training_config(str(path), literal={"logging.output_dir": "runs #2",
                                                         "evaluation.baseline": "2025"})
    assert loaded.data.dataset_version == "2025-11-17"
    assert loaded.logging.output_dir == "runs #2" and loaded.evaluation.baseline == "2025"
    assert "logging.output_dir=runs #2" in loaded.overrides
