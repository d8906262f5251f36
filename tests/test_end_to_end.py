"""The real CLI, end to end on the tiny model: manifest, checkpoints, curves, TensorBoard, W&B offline."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, base_config, last_json, run_cli, write_config


def expected_git_info() -> dict:
    """What the manifest's reproducibility.git must say, asked of git itself about the script's folder: inside a
    checkout (CI's clone, a worktree) the 40-hex HEAD and whether tracked files differ from it; null outside one."""
    if shutil.which("git") is None:
        return {"commit": None, "dirty": None}
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if (ROOT / ".git").exists():  # a clone or a worktree: git must answer, so null cannot pass for a commit
        assert head.returncode == 0, head.stderr
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    commit = head.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", commit), commit
    status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, check=True)
    # the suite's configs live in temporary folders, outside the repository
    return {"commit": commit, "dirty": bool(status.stdout.strip()), "config_file": "outside the repository"}


@pytest.fixture(scope="module")
def finished_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    cfg = base_config(tiny_dir, out)
    cfg["logging"]["wandb"]["enabled"] = True
    path = write_config(out / "config.yaml", cfg)
    proc = run_cli("--config", path, "--run-id", "e2e_run", "--set", "training.hyperparameters.weight_decay=0.01")
    return out, cfg, proc


@pytest.mark.slow
def test_run_succeeds_and_writes_spec_manifest(finished_run):
    out, cfg, proc = finished_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = out / "runs" / "e2e_run"
    m = json.loads((run_dir / "run_manifest.json").read_text())
    assert m["run_id"] == "e2e_run" and m["status"] == "completed"
    assert m["base_model"] == cfg["model"]["base_checkpoint"]
    assert m["dataset"]["name"] == "finance_ssc_bir_v1" and m["dataset"]["version"] == "test"
    assert (m["dataset"]["train_samples"], m["dataset"]["valid_samples"], m["dataset"]["test_samples"]) == (96, 24, 16)
    hp = m["hyperparameters"]
    assert (hp["learning_rate"], hp["batch_size"], hp["gradient_accumulation_steps"], hp["num_epochs"],
            hp["max_seq_length"]) == (0.01, 8, 1, 2, 384)
    tr = m["training_results"]
    assert tr["total_steps"] == 24  # 96 samples / batch 8 = 12 steps per epoch, 2 epochs
    assert tr["training_time_hours"] > 0
    assert tr["final_val_perplexity"] == pytest.approx(2.718281828 ** tr["final_val_loss"], rel=1e-6)
    # it learned something: 5.95 -> about 4.1 on the tiny model, a margin no CPU or thread count can close
    assert tr["final_val_loss"] < tr["initial_val_loss"] - 0.5
    assert tr["best_epoch"] in (1, 2)
    ck = m["checkpoints"]
    # relative to the manifest's dir, so a copied run dir still names its checkpoints
    assert not Path(ck["best_checkpoint"]).is_absolute() and not Path(ck["final_checkpoint"]).is_absolute()
    assert (run_dir / ck["best_checkpoint"]).is_dir() and (run_dir / ck["final_checkpoint"]).is_dir()
    assert Path(ck["final_checkpoint"]).name == "checkpoint-epoch-2"
    assert "checkpoint-epoch-1" in ck["all_checkpoints"] and "checkpoint-epoch-2" in ck["all_checkpoints"]
    assert m["tags"] == ["test"] and m["created_at"] and m["completed_at"]
    assert m["config_overrides"] == ["training.hyperparameters.weight_decay=0.01"]
    assert m["config"]["training"]["hyperparameters"]["weight_decay"] == 0.01
    rep = m["reproducibility"]
    assert rep["seed"] == 42 and rep["versions"]["torch"] and rep["versions"]["transformers"]
    assert rep["resolved_paths"]["data.train_path"]["path"] == cfg["data"]["train_path"]
    assert "--run-id" in rep["command_line"]
    import hashlib
    cfg_path = out / "config.yaml"
    assert rep["config_sha256"] == hashlib.sha256(cfg_path.read_bytes()).hexdigest()
    assert rep["config_text"] == cfg_path.read_text()
    for split, key in (("train", "train_path"), ("valid", "valid_path"), ("test", "test_path")):
        f = rep["data_files"][split]
        assert f["sha256"] == hashlib.sha256(Path(cfg["data"][key]).read_bytes()).hexdigest()
        assert f["samples"] == m["dataset"][f"{split}_samples"]
    assert rep["git"] == expected_git_info()
    hw = rep["hardware"]
    assert hw["cpu_cores"] >= 1 and hw["ram_gb"] > 0 and hw["gpu_count"] == 0
    assert all(rep["versions"][k] for k in ("python", "torch", "transformers", "datasets", "accelerate"))
    assert rep["duration_seconds"] > 0 and rep["started_at"] and rep["ended_at"]
    assert m["test_results"]["test_loss"] > 0 and 0 <= m["test_results"]["test_token_accuracy"] <= 1


@pytest.mark.slow
def test_checkpoints_load_with_plain_from_pretrained(finished_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out, _, proc = finished_run
    m = json.loads((out / "runs" / "e2e_run" / "run_manifest.json").read_text())
    for name in ("best_checkpoint", "final_checkpoint"):
        path = str(out / "runs" / "e2e_run" / m["checkpoints"][name])  # relative to the manifest's dir
        assert list(Path(path).glob("*.safetensors"))
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok("VAT on 1,000 pesos", return_tensors="pt")["input_ids"]
        assert model(ids).logits.shape[-1] == model.config.vocab_size
        meta = json.loads((Path(path) / "checkpoint_meta.json").read_text())
        assert meta["health"] == "ok" and meta["run_id"] == "e2e_run"
        assert meta["dataset"] == {"name": "finance_ssc_bir_v1", "version": "test"}
        assert meta["config"]["data"]["max_seq_length"] == 384


@pytest.mark.slow
def test_csv_curves(finished_run):
    out, _, _ = finished_run
    m = json.loads((out / "runs" / "e2e_run" / "run_manifest.json").read_text())
    with open(m["metrics"]["train_loss_curve"]) as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1] + list(range(2, 25, 2))
    assert all(float(r["value"]) > 0 for r in rows)
    with open(m["metrics"]["val_loss_curve"]) as fh:
        val = list(csv.DictReader(fh))
    steps = [int(r["step"]) for r in val]
    assert steps[0] == 0 and 12 in steps and 24 in steps  # before training, and at both epoch ends
    assert float(val[-1]["value"]) == pytest.approx(m["training_results"]["final_val_loss"])
    assert Path(m["metrics"]["train_log"]).read_text().count("train_loss") >= 12


@pytest.mark.slow
def test_tensorboard_events_read_back(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _, _ = finished_run
    m = json.loads((out / "runs" / "e2e_run" / "run_manifest.json").read_text())
    assert Path(m["metrics"]["tensorboard_logs"]) == out / "tb" / "e2e_run"
    acc = EventAccumulator(m["metrics"]["tensorboard_logs"])
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "val/loss", "val/perplexity"} <= set(tags)
    assert [e.step for e in acc.Scalars("train/loss")][-1] == 24


@pytest.mark.slow
def test_wandb_offline_run_in_run_dir(finished_run):
    out, _, _ = finished_run
    wandb_dir = out / "runs" / "e2e_run" / "wandb"
    runs = list(wandb_dir.glob("offline-run-*-e2e_run"))
    assert runs, list(wandb_dir.iterdir()) if wandb_dir.exists() else "no wandb dir"
    assert list(runs[0].glob("*.wandb"))
    assert not (Path.cwd() / "wandb").exists() or not list((Path.cwd() / "wandb").glob("*e2e_run*"))


@pytest.mark.slow
def test_existing_run_is_never_overwritten(finished_run):
    out, _, _ = finished_run
    manifest = out / "runs" / "e2e_run" / "run_manifest.json"
    before = manifest.read_bytes()
    proc = run_cli("--config", out / "config.yaml", "--run-id", "e2e_run")
    assert proc.returncode == 2
    err = last_json(proc.stderr)
    assert err["error"] == "RunExists" and "--resume-from" in err["details"]["suggestion"]
    assert manifest.read_bytes() == before
    assert "Traceback" not in proc.stderr


def test_git_info_is_null_outside_a_checkout(tmp_path):
    import shutil
    import subprocess
    import sys
    from conftest import SCRIPT
    shutil.copy(SCRIPT, tmp_path / "train_finance_ssc_model.py")
    out = subprocess.run([sys.executable, "-c", "import json, train_finance_ssc_model as t; print(json.dumps(t._git_info()))"],
                         cwd=tmp_path, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                                                             "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"commit": None, "dirty": None}
