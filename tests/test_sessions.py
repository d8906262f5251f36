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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_session2_says_what_it_resumed(sessions):
    stdout = sessions.resumed.stdout
    assert "resuming from checkpoint-epoch-1 (step 12, epoch 1): config unchanged" in stdout
    assert [line.split(":")[0] for line in epoch_lines(stdout)] == ["epoch 2/2"]  # epoch 1 was not re-run
    output = last_stdout_json(stdout)
    assert output["run_id"] == RUN_ID and output["status"] == "completed"
    assert Path(output["best_checkpoint"]).resolve() == \
        sessions.run_dir / sessions.resumed_manifest["checkpoints"]["best_checkpoint"]
    assert sessions.resumed_manifest["resume_from"]["step"] == 12


@pytest.mark.slow
def test_session2_as_typed_after_an_interruption_in_epoch_3(tiny_dir, tmp_path):
    """Session 2's command as the spec types it, after Session 1 was killed in epoch 3. The run evaluates (and
    saves) every 3 steps, as the spec's config does every 100: those checkpoints do not push checkpoint-epoch-2 out
    under save_total_limit: 3, and the finished run lists checkpoint-epoch-1 to -3, as the spec's Output does."""
    cfg = base_config(tiny_dir, tmp_path)
    for key, value in (("logging.output_dir", str(tmp_path / "checkpoints")), ("logging.eval_steps", 3),
                       ("training.hyperparameters.num_epochs", 3), ("evaluation.num_samples", 0)):
        cfg = set_key(cfg, key, value)
    assert cfg["training"]["checkpointing"]["save_total_limit"] == 3
    path = write_config(tmp_path / "training_config_v1.yaml", cfg)
    killed = run_cli("--config", path, "--run-id", RUN_ID, "--skip-dry-run",
                     env={"FINANCE_TRAINER_INJECT_SIGNAL": "34:SIGKILL"}, cwd=tmp_path)  # after the save at 33
    assert killed.returncode < 0, killed.stderr[-3000:]
    names = [Path(p).name for p in t.list_checkpoints(RUN_ID, str(tmp_path / "checkpoints"))]
    assert {"checkpoint-epoch-1", "checkpoint-epoch-2", "checkpoint-33"} <= set(names)
    assert "checkpoint-27" not in names  # an evaluation's checkpoint: neither latest, backup nor best
    gone = run_cli("--config", "training_config_v1.yaml", "--resume-from", f"checkpoints/{RUN_ID}/checkpoint-27",
                   cwd=tmp_path)
    assert gone.returncode == 2 and "Traceback" not in gone.stderr
    d = last_json(gone.stderr)["details"]  # what the run has instead, and the command that picks for you
    assert d["checkpoints_in_run"] == names and f"--resume-from latest --run-id {RUN_ID}" in d["suggestion"]
    resumed = run_cli("--config", "training_config_v1.yaml", "--resume-from",
                      f"checkpoints/{RUN_ID}/checkpoint-epoch-2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint-epoch-2 (step 24, epoch 2): config unchanged" in resumed.stdout
    m = json.loads((tmp_path / "checkpoints" / RUN_ID / t.MANIFEST_NAME).read_text())
    assert m["status"] == "completed" and m["resume_from"]["step"] == 24
    listed = [Path(p).name for p in m["checkpoints"]["all_checkpoints"]]
    assert {"checkpoint-epoch-1", "checkpoint-epoch-2", "checkpoint-epoch-3"} <= set(listed)
    assert m["checkpoints"]["best_checkpoint"] in m["checkpoints"]["all_checkpoints"]


@pytest.mark.slow
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


@pytest.mark.slow
def test_tools_find_a_bare_run_id_through_the_run_index(sessions, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the output dir, no training_config.yaml here
    monkeypatch.setenv("XDG_CACHE_HOME", str(sessions.cache))
    assert json.loads(t.run_index_path().read_text())[RUN_ID] == str(sessions.run_dir.resolve())
    paths = t.list_checkpoints(RUN_ID)  # the spec's signature: List[str], the checkpoint paths in step order
    assert all(isinstance(p, str) for p in paths)
    names = [Path(p).name for p in paths]
    assert names.index("checkpoint-epoch-1") < names.index("checkpoint-epoch-2") == len(names) - 1
    details = t.list_checkpoints(RUN_ID, details=True)
    assert paths == [c["path"] for c in details] and [c["step"] for c in details] == sorted(c["step"] for c in details)
    status = t.monitor_training(RUN_ID)
    assert status["run_id"] == RUN_ID and status["status"] == "completed"
    assert Path(status["run_dir"]) == sessions.run_dir.resolve()


@pytest.mark.slow
def test_tools_find_a_bare_run_id_through_the_working_directorys_config(sessions, tmp_path, monkeypatch):
    project = tmp_path / "project"
    write_config(project / "training_config.yaml", {"logging": {"output_dir": str(sessions.out / "runs")}})
    monkeypatch.chdir(project)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))  # the index knows nothing
    assert t.monitor_training(RUN_ID)["run_dir"] == str(sessions.run_dir.resolve())
    assert t.list_checkpoints(RUN_ID) == t.list_checkpoints(str(sessions.run_dir))


@pytest.mark.slow
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


@pytest.mark.slow
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
    # the manifest's copy of the error names the checkpoint relative to the run dir (the spec: "checkpoint-epoch-1");
    # the stderr payload keeps the absolute path, to paste into a --resume-from
    stderr_ckpt = last_json(proc.stderr)["details"]["last_valid_checkpoint"]
    recorded = manifest["error"]["details"]["last_valid_checkpoint"]
    assert stderr_ckpt and Path(stderr_ckpt).is_absolute() and recorded == Path(stderr_ckpt).name
    assert manifest["error"]["errors"][0]["details"]["last_valid_checkpoint"] == recorded


@pytest.mark.slow
def test_session1_manifest_names_the_script_in_its_command_line(sessions):
    command = sessions.manifest["reproducibility"]["command_line"]
    assert Path(command[1]).name == "train_finance_ssc_model.py" and command[2:4] == ["--config", command[3]]
    assert "--run-id" in command and RUN_ID in command


# --------------------------------------------------------------------------------------------------
# Session 3 as the spec types it: a second config, no baseline flag; Phase 3's --output-dir, literally
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def session3(sessions, tiny_dir):
    """training_config_v2.yaml: learning rate halved, batch size doubled (8 -> 16), one more epoch, and no
    evaluation.baseline (the spec's v2 changes three hyperparameters and nothing else)."""
    cfg = base_config(tiny_dir, sessions.out)
    cfg["evaluation"].pop("baseline")
    for key, value in (("learning_rate", 5.0e-3), ("batch_size", 16), ("num_epochs", 3)):
        cfg = set_key(cfg, f"training.hyperparameters.{key}", value)
    path = write_config(sessions.out / "training_config_v2.yaml", cfg)
    proc = run_cli("--config", path, env={"XDG_CACHE_HOME": str(sessions.cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = last_stdout_json(proc.stdout)
    manifest = json.loads((sessions.out / "runs" / output["run_id"] / t.MANIFEST_NAME).read_text())
    return SimpleNamespace(path=path, proc=proc, output=output, manifest=manifest)


@pytest.mark.slow
def test_session3_without_flags_compares_with_the_latest_completed_run(sessions, session3):
    stdout = session3.proc.stdout
    completed = sessions.resumed_manifest["completed_at"][:10]
    assert f"INFO comparing with {RUN_ID} (completed {completed}): the most recent completed run of " \
           f"finance_ssc_bir_v1 in {sessions.out / 'runs'}" in stdout
    # spec Session 3: "Warning: batch_size doubled -> check GPU memory", before anything trains
    warning = f"WARNING vs baseline {RUN_ID}: batch_size 8 -> 16: doubled, check memory"
    assert warning in stdout and stdout.index(warning) < stdout.index("dry run passed")
    assert "(+" in next(line for line in stdout.splitlines() if "dry run passed" in line)  # memory vs baseline's
    cmp = session3.manifest["baseline_comparison"]
    assert cmp["baseline_run_id"] == RUN_ID and cmp["chosen"].startswith("automatic: the most recent completed run")
    assert (sessions.out / "runs" / session3.output["run_id"] / cmp["baseline_manifest"]).resolve() == \
        (sessions.run_dir / t.MANIFEST_NAME).resolve()
    keys = {d["key"]: d for d in cmp["config_differences"]}
    assert keys["training.hyperparameters.batch_size"]["note"].startswith("doubled")
    assert {r["metric"] for r in cmp["metrics"]} >= {"final_val_loss", "test_loss"}
    assert f"baseline comparison against {RUN_ID}:" in stdout


@pytest.mark.slow
def test_session3_baseline_none_or_no_baseline_turns_it_off_and_the_index_is_the_fallback(sessions, session3,
                                                                                          tmp_path):
    env = {"XDG_CACHE_HOME": str(sessions.cache)}
    for extra in (["--no-baseline"], ["--set", "evaluation.baseline=none"]):
        proc = run_cli("--config", session3.path, "--validate-only", *extra, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "comparing with" not in proc.stdout and "vs baseline" not in proc.stdout
    # an output dir with no run of this dataset: the run index (runs this machine started) is looked in next
    proc = run_cli("--config", session3.path, "--validate-only", "--output-dir", tmp_path / "elsewhere", "--run-id",
                   "x", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"INFO comparing with {session3.output['run_id']} (" in proc.stdout
    assert "finance_ssc_bir_v1 in the run index" in proc.stdout


@pytest.mark.slow
def test_phase3_output_dir_without_run_id_is_the_runs_own_directory(tiny_dir, tmp_path):
    """`--output-dir /mnt/finance-smollm3/checkpoints/run_$(date +%Y%m%d_%H%M%S)` makes that directory the run's, and
    `tail -f logs/train.log` follows the run most recently started."""
    cfg = set_key(set_key(base_config(tiny_dir, tmp_path), "training.hyperparameters.num_epochs", 1),
                  "evaluation.num_samples", 0)
    path = write_config(tmp_path / "training_config.yaml", cfg)
    run_dir = tmp_path / "checkpoints" / "run_20251117_103000"
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = run_cli("--config", path, "--output-dir", run_dir, "--skip-dry-run", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"--output-dir {run_dir} is this run's directory (run id run_20251117_103000)" in first.stdout
    manifest = json.loads((run_dir / t.MANIFEST_NAME).read_text())
    assert manifest["run_id"] == "run_20251117_103000" == last_stdout_json(first.stdout)["run_id"]
    assert [p.parent.name for p in run_dir.glob("*/" + t.MANIFEST_NAME)] == ["best"]  # no run dir nested inside
    latest = tmp_path / "logs" / "train.log"
    assert latest.resolve() == (tmp_path / "logs" / "run_20251117_103000" / "train.log").resolve()
    assert "INFO training run_20251117_103000: " in latest.read_text()
    # with --run-id, --output-dir stays the parent; logs/train.log now follows this newer run
    second = run_cli("--config", path, "--output-dir", tmp_path / "checkpoints", "--run-id", "b", "--skip-dry-run",
                     env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "b" / t.MANIFEST_NAME).is_file()
    assert latest.is_symlink() and latest.resolve() == (tmp_path / "logs" / "b" / "train.log").resolve()
    assert "INFO training b: " in latest.read_text()


@pytest.mark.slow
def test_git_records_whether_the_config_used_is_committed(sessions, tmp_path):
    git = sessions.manifest["reproducibility"]["git"]
    if git["commit"] is None:
        pytest.skip("not a git checkout")
    assert git["config_file"] == "outside the repository"  # the suite's configs live in tmp dirs
    root = SCRIPT.parent
    assert t._git_info(str(root / "demo_config.yaml"))["config_file"] in ("committed", "modified")
    untracked = root / f"untracked-config-{os.getpid()}.yaml"
    untracked.write_text((root / "demo_config.yaml").read_text())
    try:
        info = t._git_info(str(untracked))
    finally:
        untracked.unlink()
    assert info["config_file"] == "untracked" and info["dirty"] is True  # what ran is not in the commit


@pytest.mark.slow
def test_a_forced_restart_names_the_copy_it_compares_with(tiny_dir, tmp_path):
    """--force moves the completed run aside (<run_id>.abandoned-<time>), which keeps its run id: when the new
    attempt resumes, the automatic baseline line names that folder, not a run id that reads like the run comparing
    with itself."""
    cfg = set_key(base_config(tiny_dir, tmp_path), "training.hyperparameters.num_epochs", 1)
    cfg["evaluation"].pop("baseline")
    path = write_config(tmp_path / "c.yaml", set_key(cfg, "evaluation.num_samples", 0))
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    assert run_cli("--config", path, "--run-id", "r", "--skip-dry-run", env=env).returncode == 0
    killed = run_cli("--config", path, "--run-id", "r", "--skip-dry-run", "--force",
                     env={**env, "FINANCE_TRAINER_INJECT_SIGNAL": "8:SIGKILL"})
    assert killed.returncode < 0, killed.stderr[-3000:]
    again = run_cli("--config", path, "--run-id", "r", "--resume-from", "latest", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    line = next(line for line in again.stdout.splitlines() if "INFO comparing with " in line)
    assert re.search(r"comparing with r\.abandoned-\S+ \(run r\) \(completed ", line), line
