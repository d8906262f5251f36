"""The console reads like a tool: one block for the settings that differ from defaults, one format per metric,
progress and ETA on every step line, and --status showing a finished run's throughput."""
from __future__ import annotations

import json
import re

import pytest

import train_finance_ssc_model as tf
from conftest import base_config, run_cli, set_key, write_config


@pytest.mark.parametrize("key,value,text", [
    ("tokens_per_second", 19982.4, "20.0k"), ("tokens_per_second", 9762.6, "9.8k"), ("tokens_per_second", 812.3, "812"),
    ("tokens_per_second", 2.5e6, "2.50M"), ("train_loss", 1.07781234, "1.078"), ("val_loss", 31162.54, "3.116e+04"),
    ("learning_rate", 0.0005, "0.0005"), ("val_token_accuracy", 0.0768, "0.0768"), ("epoch", 1.0833, "1.08"),
    ("elapsed_seconds", 82.1, "1m22s"), ("train_loss", float("nan"), "nan"), ("step", 7, "7")])
def test_one_format_per_metric(key, value, text):
    assert tf.format_value(key, value) == text


def test_step_line_shows_progress_and_eta():
    line = tf.format_metrics(150, {"epoch": 1.0, "train_loss": 1.0778}, 450, eta_seconds=100)
    assert line == "step 150/450 (33%) | epoch 1.00 | train_loss 1.078 | eta 1m40s"
    assert tf.format_duration(3725) == "1h02m" and tf.format_duration(9.4) == "9s"


@pytest.mark.parametrize("n,signed,text", [
    (1023, False, "1023 B"), (1536, False, "1.5 KiB"), (3.2e9, False, "3.0 GiB"), (5 * 2**40, False, "5.0 TiB"),
    (2**50, False, "1024.0 TiB"), (0, False, "0 B"), (None, False, "n/a"), (-1536, False, "-1.5 KiB"),
    (8 * 2**30, True, "+8.0 GiB"), (-3 * 2**20, True, "-3.0 MiB"), (0, True, "+0 B")])
def test_one_byte_format_in_binary_units(n, signed, text):
    assert tf.format_bytes(n, signed=signed) == text


@pytest.fixture(scope="module")
def short_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("console")
    cfg = set_key(base_config(tiny_dir, out), "training.hyperparameters.num_epochs", 1)
    proc = run_cli("--config", write_config(out / "c.yaml", cfg), "--run-id", "calm")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc


@pytest.mark.slow
def test_console_before_training_fits_on_a_screen(short_run):
    out, proc = short_run
    lines = proc.stdout.splitlines()
    first_step = next(i for i, line in enumerate(lines) if re.search(r"INFO step \d+/\d+ \(\d+%\)", line))
    assert first_step <= 40, "\n".join(lines[:first_step])
    assert "differs from default" not in proc.stdout  # no WARNING per key
    n = len(tf.config_differences_from_defaults(tf.load_training_config(str(out / "c.yaml"))))
    assert f"{n} settings differ from defaults" in proc.stdout
    assert "resolved config:" not in proc.stdout  # the full config is in train.log and the manifest
    assert "resolved config:" in (out / "logs" / "calm" / "train.log").read_text()
    steps = [line for line in lines if " | train_loss " in line]
    assert steps and all(re.search(r"\| eta \d+(h\d\dm|m\d\ds|s)$", line) for line in steps)


@pytest.mark.slow
def test_status_of_a_finished_run_shows_its_throughput(short_run):
    out, _ = short_run
    proc = run_cli("--status", "calm", "--output-dir", out / "runs", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    st = json.loads(proc.stdout)
    m = json.loads((out / "runs" / "calm" / "run_manifest.json").read_text())
    assert st["status"] == "completed" and st["tokens_per_second"] == m["performance"]["tokens_per_second"] > 0
