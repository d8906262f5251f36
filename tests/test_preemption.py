"""SIGTERM / SIGUSR1 (container stop, spot reclaim, SLURM --signal): finish the step, save a verified checkpoint,
record `interrupted`, exit 143; resuming gives the weights an uninterrupted run gives."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import train_finance_ssc_model as tf
from conftest import base_config, last_json, run_cli, write_config


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


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
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
    res = run_cli("--config", path, "--run-id", run_id, "--resume-from", "latest")
    assert res.returncode == 0, res.stderr[-2000:]
    assert same_weights(out / "runs" / "ref" / "checkpoint-epoch-2", run_dir / "checkpoint-epoch-2")
    assert json.loads((run_dir / "run_manifest.json").read_text())["status"] == "completed"
