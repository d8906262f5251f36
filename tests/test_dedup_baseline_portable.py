"""Issue 13.7 (train duplicates and valid/test leakage, data.dedup), issue 17.4 (Session 3 compared with its baseline
before it trains) and issue 17.5 (a manifest that survives its run dir being moved), on real CLI runs.

One module-scoped set of runs: A trains on data with planted duplicates and leaks with data.dedup: true (the
baseline); B changes batch_size, learning_rate, num_epochs and the train file and trains against A; then A's run dir
is copied elsewhere, the original deleted, and the copy is listed, evaluated and resumed."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import train_finance_ssc_model as t
from conftest import base_config, last_json, run_cli, set_key, write_config


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _with_dups_and_leaks(tiny_dir: Path, dest: Path) -> dict:
    """The messages data plus: train lines 4 and 6 repeated (3 extra copies), a valid record asking train line 11's
    question with another answer, and a test record that is train line 8 itself."""
    src = tiny_dir / "messages"
    train, valid, test = _lines(src / "train.jsonl"), _lines(src / "valid.jsonl"), _lines(src / "test.jsonl")
    leaked = json.loads(train[10])
    leaked["messages"][-1]["content"] = "a different answer to the same question"
    dest.mkdir(parents=True, exist_ok=True)
    files = {"train": train + [train[3], train[5], train[3]], "valid": valid + [json.dumps(leaked)],
             "test": test + [train[7]]}
    for split, rows in files.items():
        (dest / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return {"train": len(train), "valid": len(valid), "test": len(test)}


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dedup_baseline")
    env = {"XDG_CACHE_HOME": str(out / "cache")}
    clean = _with_dups_and_leaks(tiny_dir, out / "dup")
    cfg = base_config(tiny_dir, out)
    for split in ("train", "valid", "test"):
        cfg = set_key(cfg, f"data.{split}_path", str(out / "dup" / f"{split}.jsonl"))
    plain = write_config(out / "plain.yaml", cfg)
    validate_plain = run_cli("--config", plain, "--validate-only", env=env)
    a_cfg = write_config(out / "a.yaml", set_key(cfg, "data.dedup", True))
    a = run_cli("--config", a_cfg, "--run-id", "A", env=env)
    assert a.returncode == 0, a.stderr[-3000:]
    a_dir = out / "runs" / "A"
    ma = json.loads((a_dir / t.MANIFEST_NAME).read_text())

    # Session 3: batch_size 8 -> 16, learning_rate halved, num_epochs 2 -> 1, and the train file without the dups
    b = cfg
    for key, value in (("training.hyperparameters.batch_size", 16), ("training.hyperparameters.learning_rate", 5e-3),
                       ("training.hyperparameters.num_epochs", 1), ("training.hyperparameters.warmup_steps", 1),
                       ("data.train_path", str(tiny_dir / "messages" / "train.jsonl"))):
        b = set_key(b, key, value)
    b_cfg = write_config(out / "b.yaml", b)
    validate_b = run_cli("--config", b_cfg, "--validate-only", "--baseline", a_dir, env=env)
    b_run = run_cli("--config", b_cfg, "--run-id", "B", "--baseline", a_dir, env=env)
    assert b_run.returncode == 0, b_run.stderr[-3000:]
    mb = json.loads((out / "runs" / "B" / t.MANIFEST_NAME).read_text())

    # the move: A's run dir copied elsewhere, the original deleted
    moved = out / "elsewhere" / "runs" / "A"
    shutil.copytree(a_dir, moved)
    shutil.rmtree(a_dir)
    listed = run_cli("--list-checkpoints", moved, "--json", env=env)
    return SimpleNamespace(out=out, env=env, clean=clean, validate_plain=validate_plain, a=a, a_dir=a_dir, ma=ma,
                           validate_b=validate_b, b_run=b_run, mb=mb, cfg=cfg, moved=moved, listed=listed)


# ---- 13.7: data integrity ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_validation_warns_with_counts_and_line_numbers(runs):
    err = runs.validate_plain.stdout + runs.validate_plain.stderr
    assert runs.validate_plain.returncode == 0, err[-2000:]
    n = runs.clean
    assert (f"data: 3 exact duplicate record(s) in train (lines {n['train'] + 1}, {n['train'] + 2}, "
            f"{n['train'] + 3})") in err
    assert f"data: 1 of {n['valid'] + 1} valid records have a prompt that is also in train (line {n['valid'] + 1})" in err
    assert f"data: 1 of {n['test'] + 1} test records have a prompt that is also in train (line {n['test'] + 1})" in err
    assert err.count("set data.dedup: true to drop them") == 3


@pytest.mark.slow
def test_dedup_drops_them_and_the_manifest_records_it(runs):
    m, n = runs.ma, runs.clean
    integrity = m["data_integrity"]
    assert integrity["train_duplicates"] == 3 and integrity["valid_leaks"] == 1 and integrity["test_leaks"] == 1
    assert integrity["examples"] == {"train": [n["train"] + 1, n["train"] + 2, n["train"] + 3],
                                     "valid": [n["valid"] + 1], "test": [n["test"] + 1]}
    assert integrity["dedup"] is True and integrity["dropped"] == {"train": 3, "valid": 1, "test": 1}
    # what trained and was evaluated is the clean data, record for record
    assert (m["dataset"]["train_samples"], m["dataset"]["valid_samples"], m["dataset"]["test_samples"]) == \
        (n["train"], n["valid"], n["test"])
    assert "data.dedup: dropped 3 duplicate train records, 1 valid and 1 test records whose prompt is in train" \
        in runs.a.stdout


@pytest.mark.slow
def test_without_data_dedup_every_record_is_kept(runs):
    """data.dedup is off unless set: B's config never names it, so B trains, validates and tests on every record,
    the leaked valid and test records included, and its manifest reports the leaks with nothing dropped."""
    m, n = runs.mb, runs.clean
    assert "dedup" not in runs.cfg["data"]
    integrity = m["data_integrity"]
    assert integrity["valid_leaks"] == 1 and integrity["test_leaks"] == 1
    assert integrity["dedup"] is False and integrity["dropped"] == {"train": 0, "valid": 0, "test": 0}
    assert (m["dataset"]["train_samples"], m["dataset"]["valid_samples"], m["dataset"]["test_samples"]) == \
        (n["train"], n["valid"] + 1, n["test"] + 1)


@pytest.mark.slow
def test_a_split_dedup_would_empty_is_a_config_error(runs, tmp_path):
    """Every test prompt also in train: with data.dedup nothing would be left to test on (exit 2, spec JSON)."""
    cfg = set_key(set_key(runs.cfg, "data.dedup", True), "data.test_path", str(runs.out / "dup" / "train.jsonl"))
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--validate-only", env=runs.env)
    assert proc.returncode == t.EXIT_INVALID and "Traceback" not in proc.stderr
    payload = last_json(proc.stderr)
    assert payload["error"] == "EmptyDataset" and payload["details"]["field"] == "data.test_path"


# ---- 17.4: Session 3 against its baseline --------------------------------------------------------------------------

@pytest.mark.slow
def test_validate_only_lists_every_change_against_the_baseline(runs):
    out = runs.validate_b.stdout + runs.validate_b.stderr
    assert runs.validate_b.returncode == 0, out[-2000:]
    assert "vs baseline A: batch_size 8 -> 16: doubled, check memory" in out
    assert "vs baseline A: learning_rate 0.01 -> 0.005: halved" in out
    assert "vs baseline A: num_epochs 2 -> 1: halved" in out
    n = runs.clean
    assert f"vs baseline A: train data changed: {n['train']} -> {n['train']} records (another file)" in out
    # batch 16 needs more than batch 8
    assert re.search(r"vs baseline A: memory estimate [\d.]+ [KMGT]iB, \+[\d.]+ [KMGT]iB on the baseline's [\d.]+ [KMGT]iB",
                     out), out[-2000:]


@pytest.mark.slow
def test_the_training_command_shows_them_and_the_dry_run_memory_beside_the_baseline(runs):
    stdout = runs.b_run.stdout
    assert "vs baseline A: batch_size 8 -> 16: doubled, check memory" in stdout
    dry = next(line for line in stdout.splitlines() if "dry run passed" in line)
    assert re.search(r"memory [\d.]+ [KMGT]iB measured \([+-](0 B|[\d.]+ [KMGT]iB) on baseline A's [\d.]+ [KMGT]iB\) "
                     r"vs [\d.]+ [KMGT]iB estimated", dry), dry


@pytest.mark.slow
def test_baseline_comparison_carries_the_differences_next_to_the_metric_deltas(runs):
    cmp, ma, mb = runs.mb["baseline_comparison"], runs.ma, runs.mb
    assert cmp["baseline_run_id"] == "A" and cmp["metrics"]
    diffs = {d["key"]: d for d in cmp["config_differences"]}
    assert diffs["training.hyperparameters.batch_size"] == {
        "key": "training.hyperparameters.batch_size", "baseline": 8, "current": 16, "note": "doubled, check memory"}
    assert set(diffs) == {"training.hyperparameters.batch_size", "training.hyperparameters.learning_rate",
                          "training.hyperparameters.num_epochs", "training.hyperparameters.warmup_steps",
                          "data.dedup"}
    (data,) = cmp["data_differences"]
    assert data["key"] == "data.train_path" and data["baseline_sha256"] != data["current_sha256"]
    assert data["baseline_sha256"] == ma["reproducibility"]["data_files"]["train"]["sha256"]
    assert data["current_sha256"] == mb["reproducibility"]["data_files"]["train"]["sha256"]
    est = cmp["memory"]["estimated"]
    assert est["baseline_bytes"] == ma["memory_estimate"]["total_bytes"]
    assert est["current_bytes"] == mb["memory_estimate"]["total_bytes"]
    assert est["delta_bytes"] == est["current_bytes"] - est["baseline_bytes"] > 0
    measured = cmp["memory"]["measured"]
    assert measured["baseline_bytes"] and measured["current_bytes"]
    assert measured["delta_bytes"] == measured["current_bytes"] - measured["baseline_bytes"]


# ---- 17.5: a manifest that survives being moved ---------------------------------------------------------------------

@pytest.mark.slow
def test_manifest_paths_are_relative_to_the_manifest(runs):
    m = runs.ma
    assert m["checkpoints"]["best_checkpoint"] in m["checkpoints"]["all_checkpoints"]  # a bare name: relative
    assert m["checkpoints"]["final_checkpoint"] == "checkpoint-epoch-2"
    assert m["checkpoints"]["best_archive"] == "best"
    assert m["dry_run"]["report"] == t.DRY_RUN_REPORT and m["samples"]["path"] == "samples.jsonl"
    text = json.dumps(m)
    assert str(runs.a_dir) not in text  # nothing points back into the run dir by its absolute path
    # the curves live under logging_dir, configured as an absolute path: kept as given
    assert m["metrics"]["train_loss_curve"] == str(runs.out / "logs" / "A" / "train_loss.csv")


def test_portable_path_rules(tmp_path):
    run_dir = tmp_path / "checkpoints" / "run"
    assert t.portable_path(str(run_dir / "checkpoint-epoch-3"), run_dir) == "checkpoint-epoch-3"
    assert t.portable_path(str(run_dir), run_dir) == "."
    # outside the run dir: relative to it (moves with the whole project), or kept when configured absolute
    curve = str(tmp_path / "logs" / "run" / "train_loss.csv")
    assert t.portable_path(curve, run_dir) == "../../logs/run/train_loss.csv"
    assert t.portable_path(curve, run_dir, given_absolute=True) == curve
    assert t.portable_path(None, run_dir) is None and t.portable_path("already/relative", run_dir) == "already/relative"
    # readers resolve against the manifest's dir, wherever it now is
    moved = tmp_path / "elsewhere" / "run"
    assert t.resolve_manifest_path("checkpoint-epoch-3", moved) == str(moved / "checkpoint-epoch-3")
    assert t.resolve_manifest_path("../../logs/run/train_loss.csv", moved) == str(tmp_path / "logs" / "run" / "train_loss.csv")
    assert t.resolve_manifest_path(curve, moved) == curve  # an absolute path (older manifests) is used as it is


@pytest.mark.slow
def test_num_epochs_stays_an_int(runs):
    assert runs.ma["hyperparameters"]["num_epochs"] == 2 and type(runs.ma["hyperparameters"]["num_epochs"]) is int
    assert type(runs.ma["config"]["training"]["hyperparameters"]["num_epochs"]) is int


@pytest.mark.slow
def test_a_moved_run_lists_its_best(runs):
    assert runs.listed.returncode == 0, runs.listed.stderr[-2000:]
    listed = json.loads(runs.listed.stdout)
    best = [c for c in listed if c["is_best"]]
    assert len(best) == 1 and Path(best[0]["path"]).parent == runs.moved
    assert best[0]["name"] == Path(runs.ma["checkpoints"]["best_checkpoint"]).name


@pytest.mark.slow
def test_a_moved_run_evaluates_and_resumes(runs, tmp_path):
    best = t.resolve_manifest_path(runs.ma["checkpoints"]["best_checkpoint"], runs.moved)
    assert Path(best).is_dir() and not runs.a_dir.exists()
    ev = run_cli("--evaluate", best, "--test-data", runs.out / "dup" / "test.jsonl", "--json", env=runs.env)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads(ev.stdout)["checkpoint"] == str(Path(best).resolve())
    # resume the copy from its first checkpoint, writing into the copy (its output_dir is the new location)
    cfg = set_key(set_key(runs.cfg, "data.dedup", True), "logging.output_dir", str(runs.moved.parent))
    cfg_path = write_config(tmp_path / "moved.yaml", cfg)
    resumed = run_cli("--config", cfg_path, "--resume-from", runs.moved / "checkpoint-epoch-1", env=runs.env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    m = json.loads((runs.moved / t.MANIFEST_NAME).read_text())
    assert m["status"] == "completed" and m["resume_from"]["path"] == "checkpoint-epoch-1"
    assert str(runs.a_dir) not in json.dumps(m)
    output = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert Path(output["best_checkpoint"]) == runs.moved / m["checkpoints"]["best_checkpoint"]
