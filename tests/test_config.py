"""Config parsing: dataclasses, unknown keys with did-you-mean, types, --set overrides, path resolution."""
from __future__ import annotations

from pathlib import Path

import pytest

import train_finance_ssc_model as tf
from conftest import base_config, last_json, run_cli, set_key, write_config

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
    assert any(d.startswith("training.hyperparameters.learning_rate: 0.01 (default 2.0e-05)") for d in diffs)


def test_literal_paths_and_unquoted_versions(tmp_path, tiny_dir):
    cfg = base_config(tiny_dir, tmp_path)
    path = write_config(tmp_path / "c.yaml", cfg)
    path.write_text(path.read_text().replace("dataset_version: test", "dataset_version: 2025-11-17"))
    loaded = tf.load_training_config(str(path), literal={"logging.output_dir": "runs #2",
                                                         "evaluation.baseline": "2025"})
    assert loaded.data.dataset_version == "2025-11-17"
    assert loaded.logging.output_dir == "runs #2" and loaded.evaluation.baseline == "2025"
    assert "logging.output_dir=runs #2" in loaded.overrides


# --------------------------------------------------------------------------------------------------
# Duplicate keys (PyYAML keeps the last copy silently) and environment variables in path values
# --------------------------------------------------------------------------------------------------

def test_duplicate_keys_at_any_depth_name_the_key_and_both_lines(tmp_path):
    text = ("training:\n"             # 1
            "  seed: 1\n"             # 2
            "  hyperparameters:\n"    # 3
            "    batch_size: 4\n"     # 4
            "    batch_size: 8\n"     # 5
            "  seed: 2\n"             # 6
            "base: &b {x: 1}\n"       # 7
            "other:\n"                # 8
            "  <<: *b\n"              # 9: a merge, then an override of a merged key: not a duplicate
            "  x: 2\n")               # 10
    with pytest.raises(tf.TrainerError) as info:
        tf._parse_yaml(text, "c.yaml")
    found = {e["details"]["field"]: e["details"]["lines"] for e in info.value.errors}
    assert found == {"training.hyperparameters.batch_size": [4, 5], "training.seed": [2, 6]}
    assert info.value.kind == "InvalidConfig" and info.value.exit_code == 2
    assert "lines 4, 5 of c.yaml" in info.value.details["suggestion"]


@pytest.mark.slow
def test_a_duplicated_section_is_exit_2_naming_both_lines(tmp_path, tiny_dir):
    """A second `training:` pasted at the end would silently replace the first (default lr, batch size, epochs)."""
    path = write_config(tmp_path / "c.yaml", base_config(tiny_dir, tmp_path))
    lines = path.read_text().splitlines()
    first = next(i for i, line in enumerate(lines, 1) if line == "training:")
    path.write_text("\n".join(lines + ["training:", "  seed: 7"]) + "\n")
    proc = run_cli("--config", path, "--validate-only")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    err = last_json(proc.stderr)
    d = err["details"]
    assert err["error"] == "InvalidConfig"
    assert d["field"] == "training" and d["lines"] == [first, len(lines) + 1] and d["line"] == len(lines) + 1
    assert f"lines {first}, {len(lines) + 1}" in d["suggestion"]


def test_environment_variables_in_path_values_are_expanded(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("FT_TEST_SCRATCH", str(tmp_path / "scratch"))
    cfg = set_key(base_config(tiny_dir, tmp_path), "logging.output_dir", "${FT_TEST_SCRATCH}/runs")
    cfg = set_key(cfg, "logging.logging_dir", "$FT_TEST_SCRATCH/logs")
    cfg = set_key(cfg, "data.dataset_name", "name_$FT_TEST_SCRATCH")  # not a path: left as written
    cfg = set_key(cfg, "logging.tensorboard.log_dir", "$FT_TEST_SCRATCH/tb$$1")  # $$: a literal $
    loaded = tf.load_training_config(str(write_config(tmp_path / "c.yaml", cfg)),
                                     literal={"evaluation.baseline": "$FT_TEST_SCRATCH"})  # --baseline: as given
    assert loaded.logging.output_dir == f"{tmp_path}/scratch/runs"
    assert loaded.logging.logging_dir == f"{tmp_path}/scratch/logs"
    assert loaded.logging.tensorboard.log_dir == f"{tmp_path}/scratch/tb$1"
    assert loaded.data.dataset_name == "name_$FT_TEST_SCRATCH" and loaded.evaluation.baseline == "$FT_TEST_SCRATCH"


def test_an_unset_variable_in_a_path_is_exit_2_naming_it(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.delenv("FT_TEST_UNSET", raising=False)
    monkeypatch.setenv("FT_TEST_EMPTY", "")
    cfg = set_key(base_config(tiny_dir, tmp_path), "logging.output_dir", "${FT_TEST_UNSET}/runs")
    cfg = set_key(cfg, "data.train_path", "$FT_TEST_EMPTY/train.jsonl")
    cfg = set_key(cfg, "logging.logging_dir", "${FT_TEST:-logs}")
    with pytest.raises(tf.TrainerError) as info:
        tf.load_training_config(str(write_config(tmp_path / "c.yaml", cfg)))
    by_field = {e["details"]["field"]: e["details"] for e in info.value.errors}
    assert set(by_field) == {"logging.output_dir", "data.train_path", "logging.logging_dir"}
    assert by_field["logging.output_dir"]["value"] == "${FT_TEST_UNSET}/runs"
    assert "export FT_TEST_UNSET=" in by_field["logging.output_dir"]["suggestion"]
    assert "FT_TEST_EMPTY is not set (it is empty)" in by_field["data.train_path"]["suggestion"]
    assert "names no variable" in by_field["logging.logging_dir"]["suggestion"]


@pytest.mark.slow
def test_cli_never_creates_a_literal_variable_directory(tmp_path, tiny_dir):
    cfg = set_key(base_config(tiny_dir, tmp_path), "logging.output_dir", str(tmp_path / "${FT_TEST_UNSET}" / "runs"))
    path = write_config(tmp_path / "c.yaml", cfg)
    proc = run_cli("--config", path, "--run-id", "r", "--skip-dry-run", env={"FT_TEST_UNSET": ""})
    assert proc.returncode == 2, proc.stderr[-2000:]
    d = last_json(proc.stderr)["details"]
    assert d["field"] == "logging.output_dir" and "FT_TEST_UNSET" in d["suggestion"]
    assert not (tmp_path / "${FT_TEST_UNSET}").exists()
