"""Faults and hostile input (issue 13, items 4-6): a full disk is reported as a full disk and the record stays true;
secrets never leave the process; alias bombs, damaged run records, BOMs, bad run ids and inf are refused clearly."""
from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import train_finance_ssc_model as tf
from conftest import base_config, last_json, run_cli, set_key, write_config

URL_SECRET = "SECRETpw4711"  # the password in a URL's userinfo
ENV_SECRET = "tok_SECRET_abcdef123"  # the value of a secret-looking environment variable
ENV = {"FAKE_API_TOKEN": ENV_SECRET}


def tmp_entries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.rglob(f"{tf.TMP_PREFIX}*"))


# --------------------------------------------------------------------------------------------------
# A run killed before its first checkpoint, its refused resume, and its start-over with --force; the secrets
# the config, the command line and the environment hold are looked for in everything these runs wrote or printed.
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def restarted(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    cfg = set_key(base_config(tiny_dir, out), "training.hyperparameters.num_epochs", 1)
    cfg = set_key(cfg, "logging.mlflow.tracking_uri", f"http://user:{URL_SECRET}@127.0.0.1:9/")  # recorded only
    cfg = set_key(cfg, "cost.api_name", f"GPT-4 Turbo via key {ENV_SECRET}")
    path = write_config(out / "c.yaml", cfg)
    secret_arg = ("--set", f"cost.gpu_price_source=http://pricing:{URL_SECRET}@127.0.0.1:9/list")
    killed = run_cli("--config", path, "--run-id", "again", "--skip-dry-run", *secret_arg,
                     env={**ENV, "FINANCE_TRAINER_INJECT_SIGNAL": "2:SIGKILL"})
    resumed = run_cli("--config", path, "--run-id", "again", "--resume-from", "latest", *secret_arg, env=ENV)
    forced = run_cli("--config", path, "--run-id", "again", "--force", "--skip-dry-run", *secret_arg,
                     "--set", "logging.wandb.enabled=true", env=ENV)
    return out, path, {"killed": killed, "resumed": resumed, "forced": forced}


@pytest.mark.slow
def test_resume_before_any_checkpoint_says_how_to_start_over(restarted):
    _, _, procs = restarted
    assert procs["killed"].returncode == -9, procs["killed"].stderr[-2000:]
    proc = procs["resumed"]
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = last_json(proc.stderr)
    assert err["error"] == "CheckpointNotFound"
    assert "--force" in err["details"]["suggestion"] and "again.abandoned-" in err["details"]["suggestion"]


@pytest.mark.slow
def test_force_starts_the_run_id_over_and_keeps_the_old_run(restarted):
    out, _, procs = restarted
    assert procs["forced"].returncode == 0, procs["forced"].stderr[-2000:]
    assert json.loads((out / "runs" / "again" / "run_manifest.json").read_text())["status"] == "completed"
    old = list((out / "runs").glob("again.abandoned-*"))
    assert len(old) == 1  # the killed run, moved aside whole: nothing deleted
    assert json.loads((old[0] / "run_manifest.json").read_text())["status"] == "running"
    old_logs = list((out / "logs").glob("again.abandoned-*"))
    assert len(old_logs) == 1 and (old_logs[0] / "train.log").is_file()


@pytest.mark.slow
def test_secrets_never_leave_the_process(restarted):
    out, _, procs = restarted
    files = [p for p in out.rglob("*") if p.is_file() and p != out / "c.yaml"]  # all but the input itself
    for p in files:
        data = p.read_bytes()
        for secret in (URL_SECRET, ENV_SECRET):
            assert secret.encode() not in data, f"{secret} written to {p}"
    for name, proc in procs.items():
        for secret in (URL_SECRET, ENV_SECRET):
            assert secret not in proc.stdout and secret not in proc.stderr, f"{secret} printed by the {name} run"
    assert procs["forced"].returncode == 0, procs["forced"].stderr[-2000:]
    assert len(files) > 20 and list((out / "runs" / "again" / "wandb").glob("offline-run-*")), "W&B checked too"
    manifest = json.loads((out / "runs" / "again" / "run_manifest.json").read_text())
    assert manifest["config"]["logging"]["mlflow"]["tracking_uri"] == "http://user:***@127.0.0.1:9/"
    assert manifest["config"]["cost"]["api_name"] == "GPT-4 Turbo via key ***"


def test_redact_masks_userinfo_and_secret_env_values(monkeypatch):
    monkeypatch.setenv("SOME_SERVICE_PASSWORD", "hunter2hunter2")
    monkeypatch.setenv("SHORT_KEY", "abc")  # too short to be a secret: left alone
    value = {"uri": "https://alice:p@ss@host:5000/x", "token_url": "https://ghp_abc123@github.com/o/r",
             "list": ["pw hunter2hunter2", ("abc",)], "n": 3}
    assert tf.redact(value) == {"uri": "https://alice:***@host:5000/x", "token_url": "https://***@github.com/o/r",
                                "list": ["pw ***", ("abc",)], "n": 3}


# --------------------------------------------------------------------------------------------------
# Full disk (FINANCE_TRAINER_INJECT_ENOSPC)
# --------------------------------------------------------------------------------------------------

def full_disk_run(tiny_dir, out: Path, hook: str):
    path = write_config(out / "c.yaml", base_config(tiny_dir, out))
    return run_cli("--config", path, "--run-id", "full", "--skip-dry-run",
                   env={"FINANCE_TRAINER_INJECT_ENOSPC": hook})


@pytest.mark.slow
def test_full_disk_at_a_checkpoint_is_reported_and_recorded(tiny_dir, tmp_path):
    proc = full_disk_run(tiny_dir, tmp_path, "checkpoint-6")
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = last_json(proc.stderr)
    run_dir = tmp_path / "runs" / "full"
    assert err["error"] == "DiskFull"
    d = err["details"]
    assert d["errno"] == errno.ENOSPC and d["errno_name"] == "ENOSPC"
    assert d["path"] == str(run_dir / ".tmp-checkpoint-6" / "model.safetensors")
    assert isinstance(d["free_bytes"], int) and "--resume-from latest --run-id full" in d["suggestion"]
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"]["error"] == "DiskFull"
    assert json.loads((run_dir / "error.json").read_text())["details"]["path"] == d["path"]
    assert tmp_entries(run_dir) == []  # the partial checkpoint is gone
    assert json.loads(proc.stdout.strip().splitlines()[-1])["status"] == "failed"


@pytest.mark.slow
def test_a_disk_that_stays_full_still_reports_the_first_error(tiny_dir, tmp_path):
    proc = full_disk_run(tiny_dir, tmp_path, "checkpoint-6:sticky")  # every later write fails too
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = last_json(proc.stderr)
    run_dir = tmp_path / "runs" / "full"
    assert err["error"] == "DiskFull"
    assert err["details"]["path"] == str(run_dir / ".tmp-checkpoint-6" / "model.safetensors")  # not the manifest's
    assert [x["path"] for x in err["details"]["not_recorded"]][:2] == [str(run_dir / "run_manifest.json"),
                                                                       str(run_dir / "error.json")]
    assert json.loads((run_dir / "run_manifest.json").read_text())["status"] == "running"  # the last true record
    assert not (run_dir / "error.json").exists()
    assert tmp_entries(run_dir) == []  # no partial checkpoint, no .tmp-run_manifest.json.<pid>


def test_write_json_atomic_removes_its_temp_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "record.json"
    target.write_text('{"old": true}\n')
    monkeypatch.setenv("FINANCE_TRAINER_INJECT_ENOSPC", "record.json")
    with pytest.raises(OSError) as info:
        tf.write_json_atomic(target, {"new": list(range(1000))})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]
    assert json.loads(target.read_text()) == {"old": True}


@pytest.mark.slow
def test_samples_jsonl_goes_through_the_atomic_writer(tiny_dir, tmp_path):
    """A full disk at the samples file (written after training, before the final manifest) is DiskFull naming it,
    and leaves neither a partial samples.jsonl nor its temporary file."""
    proc = full_disk_run(tiny_dir, tmp_path, "samples.jsonl")
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = last_json(proc.stderr)
    run_dir = tmp_path / "runs" / "full"
    assert err["error"] == "DiskFull" and err["details"]["errno_name"] == "ENOSPC"
    assert err["details"]["path"] == str(run_dir / "samples.jsonl")
    assert not (run_dir / "samples.jsonl").exists() and tmp_entries(run_dir) == []
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"]["details"]["path"] == err["details"]["path"]


def test_csv_curves_and_the_loss_plot_go_through_the_atomic_writer(tiny_dir, tmp_path, monkeypatch):
    cfg = set_key(base_config(tiny_dir, tmp_path), "logging.tensorboard.enabled", False)
    config = tf.load_training_config(str(write_config(tmp_path / "c.yaml", cfg)))
    log_dir = tmp_path / "logs" / "r"
    log_dir.mkdir(parents=True)
    curve = "step,epoch,value\r\n1,0.1,2.0\r\n2,0.2,1.5\r\n3,0.3,1.2\r\n"
    for name in ("train_loss.csv", "val_loss.csv"):
        (log_dir / name).write_bytes(curve.encode())
    (log_dir / "loss_curves.png").write_bytes(b"old plot")
    monkeypatch.setenv("FINANCE_TRAINER_INJECT_ENOSPC", "train_loss.csv,loss_curves.png")
    with pytest.raises(OSError) as info:  # a resume trims the curves to the resumed step: a rewrite
        tf.init_tracking(config, "r", resume=True, resume_step=2)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(log_dir / "train_loss.csv")
    with pytest.raises(OSError) as info:
        tf.plot_loss_curves(log_dir / "train_loss.csv", log_dir / "val_loss.csv", 2, log_dir / "loss_curves.png")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(log_dir / "loss_curves.png")
    assert (log_dir / "train_loss.csv").read_bytes() == curve.encode()  # the old files, whole
    assert (log_dir / "loss_curves.png").read_bytes() == b"old plot"
    assert sorted(p.name for p in log_dir.iterdir()) == ["loss_curves.png", "train_loss.csv", "val_loss.csv"]
    monkeypatch.delenv("FINANCE_TRAINER_INJECT_ENOSPC")
    tf.init_tracking(config, "r", resume=True, resume_step=2)
    assert (log_dir / "train_loss.csv").read_bytes() == b"step,epoch,value\r\n1,0.1,2.0\r\n2,0.2,1.5\r\n"
    tf.plot_loss_curves(log_dir / "train_loss.csv", log_dir / "val_loss.csv", 2, log_dir / "loss_curves.png")
    assert (log_dir / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_build_dir_atomic_replaces_the_whole_dir_or_nothing(tmp_path):
    final = tmp_path / "best"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with tf.build_dir_atomic(final) as tmp:
            tf.write_atomic(tmp / "new.bin", b"\x00new")
            raise RuntimeError("the build failed half way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"] and (final / "old.txt").read_text() == "old"
    with tf.build_dir_atomic(final) as tmp:
        tf.write_atomic(tmp / "new.bin", b"\x00new")
        assert not (final / "new.bin").exists()  # nothing shows before the block ends
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert sorted(p.name for p in final.iterdir()) == ["new.bin"] and (final / "new.bin").read_bytes() == b"\x00new"


def test_preflight_refuses_a_disk_that_cannot_hold_two_checkpoints(tiny_dir, tmp_path, monkeypatch):
    config = tf.load_training_config(str(write_config(tmp_path / "c.yaml", base_config(tiny_dir, tmp_path))))
    roomy = tf.validate_config(config, check_device=False)
    assert roomy.ok, roomy.errors
    one, need = roomy.disk["checkpoint_bytes"], roomy.disk["needed_bytes"]
    assert need >= 5 * one  # save_total_limit 3 + best + the save under way

    def free(n):
        monkeypatch.setattr(tf.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 * need, 0, n))

    free(2 * one - 1)
    res = tf.validate_config(config, check_device=False)
    err = tf.TrainerError.collected(res.errors)
    assert err.kind == "InsufficientDisk" and err.exit_code == 2
    assert err.details["field"] == "logging.output_dir" and err.details["free_bytes"] == 2 * one - 1
    assert tf.validate_config(config, check_device=False, resuming=True).ok  # a resume needs room for one more
    free(need - 1)
    res = tf.validate_config(config, check_device=False)
    assert res.ok and any("DiskFull" in w for w in res.warnings)


# --------------------------------------------------------------------------------------------------
# Hostile and damaged input
# --------------------------------------------------------------------------------------------------

def alias_bomb(levels: int, key: str = "model") -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines + [f"{key}: *a{levels - 1}"]) + "\n"


def test_yaml_alias_bomb_is_refused_before_it_expands():
    for text in (alias_bomb(9), "a: &a [1, *a]\n"):  # 9^9 nodes; an anchor used inside itself
        with pytest.raises(tf.TrainerError) as info:
            tf._parse_yaml(text, "bomb.yaml")
        assert info.value.kind == "InvalidConfig" and info.value.exit_code == 2
        assert "alias" in info.value.details["problem"]
    assert tf._parse_yaml("base: &b {x: 1}\nother: *b\n", "ok.yaml") == {"base": {"x": 1}, "other": {"x": 1}}


@pytest.mark.slow
def test_yaml_alias_bomb_cli_answers_with_a_short_error(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(6))
    proc = run_cli("--config", path, "--validate-only", timeout=120)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert len(line) < 5000 and json.loads(line)["error"] == "InvalidConfig"


def test_long_values_are_cut_in_error_payloads():
    big = list(range(100000))
    value = tf.config_problem("data.dataset_name", big, "a string", "fix it")["details"]["value"]
    assert isinstance(value, str) and len(value) < tf.MAX_ECHO_CHARS + 60
    assert value.endswith(f"... [truncated: {len(json.dumps(big))} characters]")
    assert tf.config_problem("x", 5, "e", "s")["details"]["value"] == 5  # short values stay as they are


DAMAGED = {"empty": "", "truncated": '{"run_id": "r", "status": "comp', "not an object": "[1, 2, 3]"}


@pytest.mark.parametrize("record", [tf.MANIFEST_NAME, "status.json"])
@pytest.mark.parametrize("content", list(DAMAGED))
def test_status_and_list_refuse_a_damaged_record(tmp_path, record, content):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / record).write_text(DAMAGED[content])
    tools = [tf.monitor_training] + ([tf.list_checkpoints] if record == tf.MANIFEST_NAME else [])
    for tool in tools:
        with pytest.raises(tf.TrainerError) as info:
            tool(str(run_dir))
        assert info.value.kind == "RunRecordDamaged" and info.value.exit_code == 2
        assert info.value.details["path"] == str((run_dir / record).resolve())


@pytest.mark.slow
def test_status_cli_on_a_truncated_manifest_is_a_clear_exit_2(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / tf.MANIFEST_NAME).write_text(DAMAGED["truncated"])
    proc = run_cli("--status", run_dir, "--json")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = last_json(proc.stderr)
    assert err["error"] == "RunRecordDamaged" and "not valid JSON" in err["details"]["problem"]


@pytest.mark.slow
def test_resume_refuses_a_truncated_manifest_and_force_keeps_it(restarted, tmp_path):
    out, path, procs = restarted
    assert procs["forced"].returncode == 0, procs["forced"].stderr[-2000:]
    shutil.copytree(out / "runs" / "again", tmp_path / "runs" / "again")
    manifest = tmp_path / "runs" / "again" / tf.MANIFEST_NAME
    damaged = manifest.read_bytes()[:500]
    manifest.write_bytes(damaged)
    args = ("--config", path, "--output-dir", tmp_path / "runs", "--resume-from", "latest", "--run-id", "again",
            "--set", f"logging.logging_dir={tmp_path / 'logs'}", "--set", f"logging.tensorboard.log_dir={tmp_path / 'tb'}")
    proc = run_cli(*args, env=ENV)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = last_json(proc.stderr)
    assert err["error"] == "RunRecordDamaged" and err["details"]["path"] == str(manifest.resolve())
    assert "--force" in err["details"]["suggestion"]
    assert manifest.read_bytes() == damaged  # nothing written
    proc = run_cli(*args, "--force", env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept = list(manifest.parent.glob(f"{tf.MANIFEST_NAME}.damaged-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == damaged
    assert json.loads(manifest.read_text())["status"] == "completed"


def test_utf8_bom_in_messages_data_is_read_past(tiny_dir, tmp_path):
    cfg = base_config(tiny_dir, tmp_path)
    train = tmp_path / "train.jsonl"
    train.write_bytes(b"\xef\xbb\xbf" + (tiny_dir / "messages" / "train.jsonl").read_bytes())
    config = tf.load_training_config(str(write_config(tmp_path / "c.yaml", set_key(cfg, "data.train_path", str(train)))))
    assert tf._read_jsonl(train, 1)[0]["messages"]
    res = tf.validate_config(config)  # renders the first record with the chat template
    assert res.ok, res.errors
    lines = (tiny_dir / "messages" / "train.jsonl").read_bytes().splitlines(keepends=True)
    train.write_bytes(lines[0] + b"\xef\xbb\xbf" + b"".join(lines[1:]))  # concatenated files: a BOM on line 2
    _, problems = tf.scan_jsonl(train, "train", "auto", "absolute")
    assert [(p["error"], p["details"]["line"]) for p in problems] == [("InvalidDataset", 2)]
    assert "byte order mark" in problems[0]["details"]["problem"]


@pytest.mark.slow
def test_run_id_length_is_validated(tiny_dir, tmp_path):
    path = write_config(tmp_path / "c.yaml", base_config(tiny_dir, tmp_path))
    proc = run_cli("--config", path, "--run-id", "r" * 300, "--validate-only")
    assert proc.returncode == 2
    err = last_json(proc.stderr)
    assert err["error"] == "InvalidConfig" and err["details"]["field"] == "--run-id"
    assert "128" in err["details"]["expected"]


@pytest.mark.slow
def test_run_id_is_validated_before_anything_is_read_or_written(tiny_dir, tmp_path):
    path = write_config(tmp_path / "c.yaml", base_config(tiny_dir, tmp_path / "a"))
    proc = run_cli("--config", path, "--resume-from", "latest", "--run-id", "../../etc")
    assert proc.returncode == 2
    err = last_json(proc.stderr)
    assert err["error"] == "InvalidConfig" and err["details"]["field"] == "--run-id"
    assert not (tmp_path / "etc").exists() and not (tmp_path / "a").exists()


@pytest.mark.parametrize("key", ["training.guards.grad_norm_limit", "training.guards.spike_factor",
                                 "training.guards.divergence_increase", "model.lora.alpha"])
def test_inf_is_refused_naming_the_field(tiny_dir, tmp_path, key):
    cfg = set_key(base_config(tiny_dir, tmp_path), key, float("inf"))  # written as .inf; lora stays disabled
    res = tf.validate_config(tf.load_training_config(str(write_config(tmp_path / "c.yaml", cfg))), check_device=False)
    assert [e["details"]["field"] for e in res.errors] == [key]
    assert res.errors[0]["error"] == "InvalidConfig" and res.errors[0]["details"]["value"] == "inf"


def test_json_records_are_strict_json(tmp_path):
    target = tmp_path / "m.json"
    tf.write_json_atomic(target, {"loss": float("nan"), "curve": [(1, 0.5, float("inf"))], "m": {"x": -float("inf")}})

    def refuse(constant):
        raise AssertionError(f"bare {constant} in JSON")
    assert json.loads(target.read_text(), parse_constant=refuse) == {"loss": "NaN", "curve": [[1, 0.5, "inf"]],
                                                                      "m": {"x": "-inf"}}


# --------------------------------------------------------------------------------------------------
# The test hooks themselves (FINANCE_TRAINER_INJECT_*): read when a run first needs them, never on --help, and a
# malformed one is InvalidConfig naming the variable
# --------------------------------------------------------------------------------------------------

NAN, SIGNAL, ENOSPC = ("FINANCE_TRAINER_INJECT_NAN_AT_STEP", "FINANCE_TRAINER_INJECT_SIGNAL",
                       "FINANCE_TRAINER_INJECT_ENOSPC")


@pytest.mark.parametrize("env, rank, expected", [
    ({NAN: "5"}, 0, {"nan_at_step": 5, "nan_in_dry_run": False}),
    ({NAN: "dry:1"}, 0, {"nan_at_step": 1, "nan_in_dry_run": True}),
    ({NAN: "4:1"}, 1, {"nan_at_step": 4}),
    ({NAN: "4:1"}, 0, {"nan_at_step": None}),  # another rank's
    ({SIGNAL: "8:SIGTERM"}, 0, {"signal_at_step": (8, signal.SIGTERM)}),
    ({SIGNAL: "5:SIGKILL:1"}, 1, {"signal_at_step": (5, signal.SIGKILL)}),
    ({SIGNAL: "5:SIGKILL:1"}, 0, {"signal_at_step": None}),
    ({"FINANCE_TRAINER_INJECT_GRAD_SCALE": "3:1000"}, 0, {"grad_scale": (3, 1000.0)}),
    ({"FINANCE_TRAINER_INJECT_VAL_LOSSES": "6.0,3.0,2.0"}, 0, {"val_losses": [6.0, 3.0, 2.0]}),
    ({ENOSPC: "checkpoint-6,record.json:sticky"}, 0,  # asked at each write (injected_enospc), not the Trainer
     {"enospc_paths": ["checkpoint-6", "record.json"], "enospc_sticky": True, "on_trainer": False}),
    ({}, 0, {"on_trainer": False}),
])
def test_valid_hooks_parse_as_the_readme_says(env, rank, expected):
    faults = tf.InjectedFaults.from_env(env, rank)
    assert {k: getattr(faults, k) for k in expected} == expected


@pytest.mark.parametrize("var, value", [
    (NAN, "x"), (NAN, "0"), (NAN, "dry:"), (NAN, "5:1:2"), (SIGNAL, "5"), (SIGNAL, "5:SIGNOPE"),
    (SIGNAL, "x:SIGKILL"), ("FINANCE_TRAINER_INJECT_GRAD_SCALE", "3"), ("FINANCE_TRAINER_INJECT_GRAD_SCALE", "3:big"),
    ("FINANCE_TRAINER_INJECT_VAL_LOSSES", "6.0,low"), (ENOSPC, ":sticky"), (ENOSPC, "checkpoint-6:stickyy"),
])
def test_a_malformed_hook_is_invalid_config_naming_the_variable(var, value):
    with pytest.raises(tf.TrainerError) as info:
        tf.InjectedFaults.from_env({var: value}, 0)
    d = info.value.details
    assert info.value.kind == "InvalidConfig" and info.value.exit_code == 2
    assert (d["field"], d["value"]) == (var, value) and d["expected"] and var in d["suggestion"]


def test_malformed_enospc_hook_injects_nothing_at_a_write(tmp_path, monkeypatch):
    monkeypatch.setenv(ENOSPC, "record.json:stickyy")  # refused when the run assembles its Trainer
    tf.write_json_atomic(tmp_path / "record.json", {"ok": True})
    assert json.loads((tmp_path / "record.json").read_text()) == {"ok": True}


@pytest.mark.slow
def test_malformed_hooks_stop_a_run_with_exit_2_and_leave_help_alone(tiny_dir, tmp_path):
    bad = {NAN: "five", ENOSPC: "run_manifest.json:always"}  # a lenient ENOSPC would fail the first manifest write
    helped = run_cli("--help", env=bad)
    assert helped.returncode == 0 and "usage:" in helped.stdout and "Traceback" not in helped.stderr
    path = write_config(tmp_path / "c.yaml", base_config(tiny_dir, tmp_path))
    proc = run_cli("--config", path, "--run-id", "bad_hooks", env=bad)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    err = last_json(proc.stderr)
    assert err["error"] == "InvalidConfig" and err["details"]["field"] == NAN and err["details"]["value"] == "five"
    assert [e["details"]["field"] for e in err["errors"]] == [NAN, ENOSPC]  # every malformed hook at once


# --------------------------------------------------------------------------------------------------
# Out of memory (FINANCE_TRAINER_INJECT_OOM raises the allocators' own exception types and messages)
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("hook, message", [
    # a real MemoryError: the address space capped (RLIMIT_AS, as `ulimit -v`) at what the process uses and filled
    # to the last small object; without the room RunRecorder makes, the manifest would be left `running`
    ("3:exhaust", "MemoryError"),
    ("3:cpu", "DefaultCPUAllocator: can't allocate memory"),
    ("3:cuda", "CUDA out of memory"),
    ("data:mmap", "Memory mapping file failed: Cannot allocate memory"),  # datasets memory-mapping its cache
])
def test_an_allocation_failure_is_out_of_memory_and_recorded(tiny_dir, tmp_path, hook, message):
    cfg = set_key(base_config(tiny_dir, tmp_path), "training.hyperparameters.num_epochs", 1)
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--run-id", "oom", "--skip-dry-run",
                   env={"FINANCE_TRAINER_INJECT_OOM": hook})
    assert proc.returncode == tf.EXIT_OOM == 4, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    err = last_json(proc.stderr)
    d = err["details"]
    assert err["error"] == "OutOfMemory" and message in d["message"]
    assert d["measured_peak_memory_gb"] > 0 and d["measured_on"].startswith("host RAM")
    assert d["estimated_memory_gb"] > 0 and d["available_memory_gb"] > 0  # preflight's estimate, beside it
    assert "batch_size" in d["suggestion"] and ("ulimit" in d["suggestion"]) == hook.endswith("mmap")
    run_dir = tmp_path / "runs" / "oom"
    m = json.loads((run_dir / "run_manifest.json").read_text())
    assert m["status"] == "failed" and m["error"] == err
    assert json.loads((run_dir / "error.json").read_text()) == err
    assert m["training_results"]["total_steps"] == (0 if hook.startswith("data") else 2)


@pytest.mark.slow
@pytest.mark.parametrize("kind, message", [("mmap", "Memory mapping file failed"),
                                           ("cpu", "DefaultCPUAllocator: can't allocate memory")])
def test_an_allocation_failure_in_a_dry_run_is_out_of_memory(tiny_dir, tmp_path, kind, message):
    """--dry-run's own allocation failures (here while the splits load) are OutOfMemory, as in a training run, not
    TrainingFailed: only the CUDA allocator's type was recognised there."""
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", base_config(tiny_dir, tmp_path)), "--dry-run",
                   env={"FINANCE_TRAINER_INJECT_OOM": f"data:{kind}"})
    assert proc.returncode == tf.EXIT_OOM == 4, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    err = last_json(proc.stderr)
    assert err["error"] == "OutOfMemory" and message in err["details"]["message"]
    assert "batch_size" in err["details"]["suggestion"]


@pytest.mark.slow
def test_a_plot_that_cannot_be_drawn_costs_the_plot_only(tiny_dir, tmp_path):
    cfg = set_key(base_config(tiny_dir, tmp_path), "training.hyperparameters.num_epochs", 1)
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--run-id", "noplot", "--skip-dry-run",
                   env={"FINANCE_TRAINER_INJECT_OOM": "plot:memory"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "runs" / "noplot"
    m = json.loads((run_dir / "run_manifest.json").read_text())
    assert m["status"] == "completed" and m["metrics"]["loss_curves_plot"] is None
    assert any(w.startswith("loss_curves.png skipped (MemoryError") for w in m["warnings"])
    assert m["test_results"]["test_loss"] > 0 and m["samples"]["count"] == 2  # the results are kept
    assert tf.check_checkpoint_integrity(run_dir / "best", resume=False) is None
    assert not (tmp_path / "logs" / "noplot" / "loss_curves.png").exists()


@pytest.mark.parametrize("exc, oom", [
    (MemoryError(), True),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"), True),
    (OSError("Memory mapping file failed: Cannot allocate memory"), True),
    (OSError(errno.ENOMEM, "Cannot allocate memory"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (ValueError("the estimate says it runs out of memory"), False),  # only the allocators' types are trusted
    (OSError(errno.ENOSPC, "No space left on device"), False),
])
def test_out_of_memory_is_recognised_however_the_allocator_says_it(exc, oom):
    assert tf.is_out_of_memory(exc) is oom
    wrapped = RuntimeError("tokenizing failed")
    wrapped.__cause__ = exc
    assert tf.is_out_of_memory(wrapped) is oom


def _register(run_id: str, run_dir: str, start) -> None:
    start.wait()
    tf.register_run(run_id, Path(run_dir))


def test_twelve_runs_registering_at_once_all_keep_their_entry(tmp_path, monkeypatch):
    """The run index is read, updated and written under a lock: a plain read-modify-write kept 2 of 12."""
    import multiprocessing
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(12)
    procs = [ctx.Process(target=_register, args=(f"run{i}", str(tmp_path / f"run{i}"), start)) for i in range(12)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 12
    index = json.loads((tmp_path / "cache" / "finance_smollm3" / "runs.json").read_text())
    assert index == {f"run{i}": str(tmp_path / f"run{i}") for i in range(12)}
    assert sorted(p.name for p in (tmp_path / "cache" / "finance_smollm3").iterdir()) == ["runs.json", "runs.json.lock"]


# --------------------------------------------------------------------------------------------------
# What libraries print themselves goes through the same redaction: a real local `mlflow server`, a password in
# the tracking URI, and MLflow's own `View run ... at: <tracking URI>` lines on stdout
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    import socket
    import time
    import urllib.request
    root = tmp_path_factory.mktemp("mlflow_server")
    with socket.socket() as s:  # a free local port (the server binds it a moment later)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_file = (root / "server.log").open("w")
    (root / "store").mkdir()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{root / 'store' / 'mlflow.db'}",
                               "--default-artifact-root", str(root / "store" / "artifacts"), "--workers", "1"],
                              stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300  # a cold start runs the store's migrations: tens of seconds on 2 cores
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                os.killpg(server.pid, signal.SIGKILL)
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield port, root / "store"
    os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker (its own session)
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
    log_file.close()


@pytest.mark.slow
def test_mlflow_run_links_never_show_the_tracking_password(tiny_dir, tmp_path, mlflow_server):
    port, store = mlflow_server
    password = "PWmlflow_8812x"
    cfg = set_key(base_config(tiny_dir, tmp_path), "training.hyperparameters.num_epochs", 1)
    cfg = set_key(cfg, "logging.mlflow", {"enabled": True, "tracking_uri": f"http://user:{password}@127.0.0.1:{port}/",
                                          "experiment": "redaction"})
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--run-id", "linked", "--skip-dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # MLflow printed its links (so the test saw what it guards against), with the password masked
    assert f"View run linked at: http://user:***@127.0.0.1:{port}/#/experiments/" in proc.stdout
    assert f"View experiment at: http://user:***@127.0.0.1:{port}/#/experiments/" in proc.stdout
    assert password not in proc.stdout and password not in proc.stderr
    files = [p for root in (tmp_path, store) for p in root.rglob("*") if p.is_file() and p != tmp_path / "c.yaml"]
    assert any(p.name == "run_manifest.json" for p in files)
    for p in files:
        assert password.encode() not in p.read_bytes(), f"the password was written to {p}"



# --------------------------------------------------------------------------------------------------
# Readers during a run's life: a listing while retention deletes, --status while the run starts
# --------------------------------------------------------------------------------------------------

def fake_checkpoint(run_dir: Path, step: int) -> Path:
    d = run_dir / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / tf.CHECKPOINT_META).write_text(json.dumps({"name": d.name, "step": step, "health": "ok"}))
    return d


def test_a_checkpoint_deleted_while_it_is_listed_is_gone_not_corrupt(tmp_path, monkeypatch):
    """Retention renames a checkpoint away (then deletes it) while another shell lists the run: the listing
    read its meta, then found its files missing. It is no longer there; it was never damaged."""
    doomed, kept = fake_checkpoint(tmp_path, 5), fake_checkpoint(tmp_path, 6)
    real = tf.check_checkpoint_integrity

    def retention_meanwhile(d, meta=None, resume=True):
        if Path(d) == doomed:
            os.rename(doomed, doomed.with_name(f"{tf.TMP_PREFIX}delete-{doomed.name}"))
            raise FileNotFoundError(2, "No such file or directory", str(doomed / "model.safetensors"))
        return real(d, meta, resume)

    monkeypatch.setattr(tf, "check_checkpoint_integrity", retention_meanwhile)
    listed = tf.read_checkpoints(tmp_path, verify=True)
    assert [(c["name"], c["health"]) for c in listed] == [(kept.name, "ok")]


def test_status_during_start_up_says_starting(tmp_path):
    """Before the first logged step there is no status.json: the lock's holder says who runs it."""
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / tf.RUN_LOCK).write_text(json.dumps({"pid": os.getpid(), "hostname": platform.node()}))
    st = tf.monitor_training(str(run_dir))
    assert st["status"] == "starting" and st["pid"] == os.getpid() and "no training step" in st["note"]
    (run_dir / tf.MANIFEST_NAME).write_text(json.dumps({"run_id": "r", "status": "running"}))
    assert tf.monitor_training(str(run_dir))["status"] == "starting"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / tf.RUN_LOCK).write_text(json.dumps({"pid": int(dead.stdout), "hostname": platform.node()}))
    st = tf.monitor_training(str(run_dir))
    assert st["status"] == "failed" and "is gone" in st["note"]
