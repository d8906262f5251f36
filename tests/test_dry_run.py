"""Dry run: the real pipeline on a slice, a report with masking, losses and memory; it never blocks a run."""
from __future__ import annotations

import json
import math

import pytest

import train_finance_ssc_model as tf
from conftest import base_config, run_cli, write_config


@pytest.fixture(scope="module")
def dry(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dry")
    path = write_config(out / "c.yaml", base_config(tiny_dir, out))
    proc = run_cli("--config", path, "--run-id", "d1", "--dry-run", "--max-steps", "3")
    return out, path, proc


@pytest.mark.slow
def test_dry_run_report(dry):
    out, _, proc = dry
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = out / "runs" / "d1"
    r = json.loads((run_dir / "dry_run_report.json").read_text())
    assert r["status"] == "passed" and r["steps"] == 3
    b, t = r["batch_shapes"]["input_ids"]
    assert b == 8 and r["batch_shapes"]["labels"] == [b, t] and t <= 384
    s = r["sample"]
    assert "<|im_start|>user" in s["prompt_text_masked"] and "<|im_start|>user" not in s["answer_text_trained"]
    assert 0 < s["answer_tokens"] < s["tokens"]
    # a random model starts near ln(vocab); three steps at lr 1e-2 move the loss
    assert abs(r["initial_loss"] - r["ln_vocab"]) < 0.5
    assert math.isfinite(r["loss_after_steps"]) and r["loss_after_steps"] != r["initial_loss"]
    assert r["tokens_per_second"] > 0
    assert r["data"]["train"]["records"] == 8 * 3  # the slice: batch x steps
    mem = r["memory"]
    assert mem["estimated"]["total_bytes"] > 0 and mem["measured"]["total_bytes"] > 0
    assert 0.75 <= mem["measured_over_estimated"] <= 1.25, mem
    assert not list(run_dir.glob("checkpoint-*")) and not (run_dir / "run_manifest.json").exists()


@pytest.mark.slow
def test_dry_run_does_not_block_the_real_run(dry, tiny_dir):
    out, path, _ = dry
    proc = run_cli("--config", path, "--run-id", "d1", "--set", "training.hyperparameters.num_epochs=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((out / "runs" / "d1" / "run_manifest.json").read_text())
    assert m["status"] == "completed" and m["training_results"]["initial_val_loss"] is not None
    assert (out / "runs" / "d1" / "dry_run_report.json").exists()  # kept as the record that it passed


def test_real_out_of_memory_is_reported_with_the_spec_payload(tiny_dir, tmp_path, monkeypatch):
    import torch
    import transformers
    config = tf.load_training_config(str(write_config(tmp_path / "c.yaml", base_config(tiny_dir, tmp_path))))

    def boom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(transformers.Trainer, "train", boom)
    with pytest.raises(tf.TrainerError) as exc:
        tf.train_model(config, run_id="oom")
    assert exc.value.kind == "OutOfMemory" and exc.value.exit_code == 4
    d = exc.value.details
    assert d["batch_size"] == 8 and d["seq_length"] == 384 and "batch_size to 4" in d["suggestion"]
    m = json.loads((tmp_path / "runs" / "oom" / "run_manifest.json").read_text())
    assert m["status"] == "failed" and m["error"]["error"] == "OutOfMemory"
    assert json.loads((tmp_path / "runs" / "oom" / "error.json").read_text())["error"] == "OutOfMemory"


def test_startup_runs_without_the_cycle_collector_and_training_with_it(tiny_dir, tmp_path, monkeypatch):
    """train_model: no full collections while imports, tokenization and loading build long-lived objects; from the
    first training step on, the collector runs again over new objects only (those are frozen); an in-process caller
    gets the collector back as it was, nothing left frozen, even when the run fails."""
    import gc

    import transformers
    config = tf.load_training_config(str(write_config(tmp_path / "c.yaml", base_config(tiny_dir, tmp_path))))
    seen = {}
    load = tf.load_base_model

    def loading(*a, **k):
        seen["loading"] = gc.isenabled()
        return load(*a, **k)

    def train(self, *a, **k):
        seen["training"] = (gc.isenabled(), gc.get_freeze_count())
        raise RuntimeError("stop here")

    monkeypatch.setattr(tf, "load_base_model", loading)
    monkeypatch.setattr(transformers.Trainer, "train", train)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    with pytest.raises(Exception, match="stop here"):
        tf.train_model(config, run_id="gc")
    assert seen["loading"] is False
    assert seen["training"][0] is True and seen["training"][1] > 10000  # modules, model, data: frozen
    assert gc.isenabled() and gc.get_freeze_count() == 0

