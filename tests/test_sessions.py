"""The spec's Example Training Sessions, literally: Session 1's epoch lines and Output object on stdout, Session 2's
resume line, and the tool signatures (monitor_training / list_checkpoints) with a bare run id."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import SCRIPT, base_config, last_json, run_cli, set_key, write_config

import train_finance_ssc_model as t

RUN_ID = "finance_ssc_baseline"
OUTPUT_KEYS = ("run_id", "status", "best_checkpoint", "final_val_perplexity", "training_time_hours")
# Evaluations at steps 0 (eval_on_start), 6, 12 (end of epoch 1), 18 and 24 (end of epoch 2) report these val
# losses: epoch 1 is the best and epoch 2 is not, whatever the tiny model learns.
INJECTED = "6.0,3.0,2.0,2.1,2.1"


def last_stdout_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.strip()][-1])


@pytest.fixture(scope="module")
def sessions(tiny_dir, tmp_path_factory):
    """Session 1 (a 2-epoch run with a bare --run-id), then Session 2 (resume from checkpoint-epoch-1)."""
    out = tmp_path_factory.mktemp("sessions")
    cache = out / "cache"
    cfg_path = write_config(out / "training_config_v1.yaml", base_config(tiny_dir, out))
    env = {"XDG_CACHE_HOME": str(cache)}
    first = run_cli("--config", cfg_path, "--run-id", RUN_ID, env={**env, "FINANCE_TRAINER_INJECT_VAL_LOSSES": INJECTED})
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = out / "runs" / RUN_ID
    manifest = json.loads((run_dir / t.MANIFEST_NAME).read_text())
    train_log = Path(manifest["metrics"]["train_log"]).read_text()  # the resume appends to it
    resumed = run_cli("--config", cfg_path, "--resume-from", run_dir / "checkpoint-epoch-1", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return SimpleNamespace(out=out, cache=cache, run_dir=run_dir, first=first, manifest=manifest, train_log=train_log,
                           resumed=resumed,
                           resumed_manifest=json.loads((run_dir / t.MANIFEST_NAME).read_text()))


def epoch_lines(text: str) -> list[str]:
    return [m.group(0) for m in re.finditer(r"epoch \d+/\d+: val_loss \S+, val_perplexity \S+( \(best\))?", text)]


def test_session1_prints_one_line_per_epoch_with_best_from_the_manifest(sessions):
    lines = epoch_lines(sessions.first.stdout)
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    best_name = Path(sessions.manifest["checkpoints"]["best_checkpoint"]).name
    assert best_name == "checkpoint-epoch-1"  # by construction (INJECTED)
    assert sessions.manifest["training_results"]["best_epoch"] == 1
    assert lines[0] == f"epoch 1/2: val_loss 2.00, val_perplexity {math.exp(2.0):.2f} (best)"
    assert lines[1] == f"epoch 2/2: val_loss 2.10, val_perplexity {math.exp(2.1):.2f}"  # worse than epoch 1
    # the same lines go to train.log
    assert epoch_lines(sessions.train_log) == lines


def test_session1_ends_with_the_output_object_on_stdout(sessions):
    output = last_stdout_json(sessions.first.stdout)
    m = sessions.manifest
    assert set(OUTPUT_KEYS) <= set(output)
    assert output["run_id"] == RUN_ID and output["status"] == "completed" == m["status"]
    # the manifest's path is relative to the manifest; the Output line's is usable from the caller's directory
    assert Path(output["best_checkpoint"]).resolve() == sessions.run_dir / m["checkpoints"]["best_checkpoint"]
    assert output["final_val_perplexity"] == m["training_results"]["final_val_perplexity"]
    assert output["training_time_hours"] == m["training_results"]["training_time_hours"]
    assert output["manifest"] == str(sessions.run_dir / t.MANIFEST_NAME)


def test_session2_says_what_it_resumed(sessions):
    stdout = sessions.resumed.stdout
    assert "resuming from checkpoint-epoch-1 (step 12, epoch 1): config unchanged" in stdout
    assert [line.split(":")[0] for line in epoch_lines(stdout)] == ["epoch 2/2"]  # epoch 1 was not re-run
    output = last_stdout_json(stdout)
    assert output["run_id"] == RUN_ID and output["status"] == "completed"
    assert Path(output["best_checkpoint"]).resolve() == \
        sessions.run_dir / sessions.resumed_manifest["checkpoints"]["best_checkpoint"]
    assert sessions.resumed_manifest["resume_from"]["step"] == 12


def test_session1_dry_runs_before_training_and_session2_does_not_repeat_it(sessions):
    """Session 1: validate, dry run, train (one console line for the dry run, before the first epoch line).
    Session 2: a resume continues a run that already passed its dry run; the manifest keeps that record."""
    first = sessions.first.stdout.splitlines()
    dry = [line for line in first if " dry run " in line]
    assert len(dry) == 1 and " INFO dry run passed: 2 steps, initial loss " in dry[0]
    assert first.index(dry[0]) < next(i for i, line in enumerate(first) if epoch_lines(line))
    assert sessions.manifest["dry_run"]["status"] == "passed"
    resumed = [line for line in sessions.resumed.stdout.splitlines() if " dry run " in line]
    assert len(resumed) == 1 and resumed[0].endswith(" INFO dry run skipped: resuming a run that has trained already")
    assert sessions.resumed_manifest["dry_run"] == sessions.manifest["dry_run"]


def test_resume_verdict_counts_the_differences():
    resume = {"path": "/runs/r/checkpoint-epoch-2", "step": 4980, "epoch": 2.0, "config_diff": []}
    assert t.format_resume_line(resume) == "resuming from checkpoint-epoch-2 (step 4980, epoch 2): config unchanged"
    resume["config_diff"] = ["config differs from the checkpoint's: a: 1 -> 2"]
    assert t.format_resume_line(resume).endswith(": 1 config difference (listed above)")
    resume["config_diff"] *= 2
    assert t.format_resume_line(resume).endswith(": 2 config differences (listed above)")


def test_epoch_line_total_is_num_epochs_as_configured():
    assert t.format_epoch_line(2, 3, 0.8, 2.2255, False) == "epoch 2/3: val_loss 0.80, val_perplexity 2.23"
    assert t.format_epoch_line(3, 3, 0.6, 1.82, True).endswith(" (best)")
    assert t.format_epoch_line(1, 2.5, None, None, False) == "epoch 1/2.5: val_loss -, val_perplexity -"


def test_tools_find_a_bare_run_id_through_the_run_index(sessions, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the output dir, no training_config.yaml here
    monkeypatch.setenv("XDG_CACHE_HOME", str(sessions.cache))
    assert json.loads(t.run_index_path().read_text())[RUN_ID] == str(sessions.run_dir.resolve())
    paths = t.list_checkpoints(RUN_ID)  # the spec's signature: List[str], the checkpoint paths in step order
    assert all(isinstance(p, str) for p in paths)
    assert [Path(p).name for p in paths][-2:] == ["checkpoint-epoch-1", "checkpoint-epoch-2"]
    details = t.list_checkpoints(RUN_ID, details=True)
    assert paths == [c["path"] for c in details] and [c["step"] for c in details] == sorted(c["step"] for c in details)
    status = t.monitor_training(RUN_ID)
    assert status["run_id"] == RUN_ID and status["status"] == "completed"
    assert Path(status["run_dir"]) == sessions.run_dir.resolve()


def test_tools_find_a_bare_run_id_through_the_working_directorys_config(sessions, tmp_path, monkeypatch):
    project = tmp_path / "project"
    write_config(project / "training_config.yaml", {"logging": {"output_dir": str(sessions.out / "runs")}})
    monkeypatch.chdir(project)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))  # the index knows nothing
    assert t.monitor_training(RUN_ID)["run_dir"] == str(sessions.run_dir.resolve())
    assert t.list_checkpoints(RUN_ID) == t.list_checkpoints(str(sessions.run_dir))


def test_cli_status_with_a_bare_run_id_from_another_directory(sessions, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--list-checkpoints", RUN_ID, "--json"], cwd=tmp_path,
                          capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(sessions.cache)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(c["is_best"] for c in json.loads(proc.stdout))


def test_unknown_run_id_says_where_it_looked(tmp_path, monkeypatch):
    project = tmp_path / "project"
    write_config(project / "training_config.yaml", {"logging": {"output_dir": "./checkpoints"}})
    monkeypatch.chdir(project)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(t.TrainerError) as err:
        t.list_checkpoints("no_such_run")
    assert err.value.kind == "CheckpointNotFound"
    looked = err.value.details["looked_in"]
    assert str(project.resolve() / "no_such_run") in looked
    assert str(project.resolve() / "checkpoints" / "no_such_run") in looked
    assert any(entry.startswith(str(tmp_path / "cache" / "finance_smollm3" / "runs.json")) for entry in looked)


def test_a_diverged_run_still_ends_with_the_output_object(tiny_dir, tmp_path):
    cfg = set_key(base_config(tiny_dir, tmp_path), "training.hyperparameters.num_epochs", 1)
    path = write_config(tmp_path / "c.yaml", cfg)
    proc = run_cli("--config", path, "--run-id", "nan", env={"FINANCE_TRAINER_INJECT_NAN_AT_STEP": "5",
                                                              "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert proc.returncode == t.EXIT_DIVERGED and last_json(proc.stderr)["error"] == "TrainingDiverged"
    output = last_stdout_json(proc.stdout)
    manifest = json.loads((tmp_path / "runs" / "nan" / t.MANIFEST_NAME).read_text())
    assert output["status"] == "diverged" == manifest["status"]
    assert (output["best_checkpoint"] is None) is (manifest["checkpoints"]["best_checkpoint"] is None)
    if output["best_checkpoint"]:
        assert Path(output["best_checkpoint"]).resolve() == \
            tmp_path / "runs" / "nan" / manifest["checkpoints"]["best_checkpoint"]
