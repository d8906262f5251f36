"""Resume keeps one timeline: the future a resume abandons is moved aside, a restarted schedule fits the steps left,
another run's checkpoint never touches that run, a changed base model is noticed, and a resume that fails before it
trains leaves the run's record as it was. Every outcome is made certain by the test hooks, never by how fast or how
well the tiny model learns."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import train_finance_ssc_model as tf
from conftest import base_config, last_json, run_cli, set_key, write_config

pytestmark = pytest.mark.slow

STEPS = 60  # 96 records / batch 8 = 12 steps per epoch, 5 epochs
EVERY = 6  # evaluation and checkpoint every 6 steps


def timeline_config(tiny_dir: Path, out: Path) -> dict:
    cfg = base_config(tiny_dir, out)
    for key, value in (("training.hyperparameters.num_epochs", 5), ("training.checkpointing.save_strategy", "steps"),
                       ("training.checkpointing.save_total_limit", 20), ("logging.eval_steps", EVERY),
                       ("logging.save_steps", EVERY), ("logging.logging_steps", 1),
                       ("evaluation", {"num_samples": 0, "max_new_tokens": 4})):
        cfg = set_key(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def healthy(tiny_dir, tmp_path_factory):
    """Run `a`: 60 steps, a checkpoint every 6. Tests that resume it work on copies (clone)."""
    out = tmp_path_factory.mktemp("timeline")
    cfg = timeline_config(tiny_dir, out)
    path = write_config(out / "c.yaml", cfg)
    proc = run_cli("--config", path, "--run-id", "a", "--skip-dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, cfg


def clone(healthy, dest: Path) -> Path:
    """A copy of run `a` (run dir and curves) under `dest`, and a config that writes there."""
    out, cfg = healthy
    shutil.copytree(out / "runs" / "a", dest / "runs" / "a")
    shutil.copytree(out / "logs" / "a", dest / "logs" / "a")
    for key, sub in (("logging.output_dir", "runs"), ("logging.logging_dir", "logs"),
                     ("logging.tensorboard.log_dir", "tb")):
        cfg = set_key(cfg, key, str(dest / sub))
    return write_config(dest / "c.yaml", cfg)


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / tf.MANIFEST_NAME).read_text())


def step_of(ckpt: str) -> int:
    return json.loads((Path(ckpt) / tf.CHECKPOINT_META).read_text())["step"]


def assert_one_timeline(m: dict, run_dir: Path, last_step: int) -> None:
    """history, curves and checkpoints of one timeline: steps strictly increasing, none after `last_step`."""
    for kind in ("train", "evals"):
        steps = [x[0] for x in m["history"][kind]]
        assert steps == sorted(set(steps)) and steps[-1] <= last_step, (kind, steps)
    rows = (Path(tf.resolve_manifest_path(m["metrics"]["val_loss_curve"], run_dir))).read_text().splitlines()[1:]
    steps = [int(r.split(",")[0]) for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] <= last_step
    assert max(c["step"] for c in tf.list_checkpoints(str(run_dir), details=True)) <= last_step


def test_resume_from_an_earlier_checkpoint_then_diverge_keeps_one_timeline(healthy, tmp_path):
    """Resumed from checkpoint-12 with lr 5.0, the run stops by step 20 at the latest (the NaN hook); the checkpoints
    18..60 of the abandoned timeline are moved aside before the first new step, so the divergence report can only
    offer a checkpoint at or before the stop, and its resume command trains to the end with the new learning
    rate: the final record describes that last timeline alone."""
    path = clone(healthy, tmp_path)
    run_dir = tmp_path / "runs" / "a"
    proc = run_cli("--config", path, "--resume-from", run_dir / "checkpoint-12", "--set",
                   "training.hyperparameters.learning_rate=5.0", env={"FINANCE_TRAINER_INJECT_NAN_AT_STEP": "20"})
    assert proc.returncode == 3, proc.stderr[-3000:]
    d = last_json(proc.stderr)["details"]
    stop = d["step"]
    assert 12 < stop <= 20
    m = manifest(run_dir)
    sup = m["resumes"][-1]["superseded"]
    moved = [f"checkpoint-{s}" for s in range(18, STEPS + 1, EVERY)]
    assert [c["name"] for c in sup["checkpoints"]] == moved and sup["after_step"] == 12
    assert all((run_dir / sup["folder"] / name / tf.CHECKPOINT_META).is_file() for name in moved)
    best_before = manifest(healthy[0] / "runs" / "a")["training_results"]["best_step"]
    assert sup["best_archive"] == (best_before > 12) == (run_dir / sup["folder"] / "best").is_dir()
    assert m["status"] == "diverged" and m["resumes"][-1]["previous_status"] == "completed"
    assert d["last_valid_checkpoint"] and step_of(d["last_valid_checkpoint"]) <= stop
    assert Path(d["last_valid_checkpoint"]).parent == run_dir
    assert_one_timeline(m, run_dir, stop)
    assert m["training_results"]["best_step"] is None or m["training_results"]["best_step"] <= stop

    # the advice, pasted as it is into a shell elsewhere: cd, absolute script, config and checkpoint, new lr
    command = d["resume_command"]
    assert command.startswith("cd ") and "learning_rate=5.0e-01" in command  # the suggestion: a tenth of 5.0
    command = command.replace("learning_rate=5.0e-01", "learning_rate=1.0e-03")
    resumed_from = step_of(d["last_valid_checkpoint"])
    done = subprocess.run(["bash", "-c", command], cwd="/", capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    m = manifest(run_dir)
    tr = m["training_results"]
    assert m["status"] == "completed" and tr["total_steps"] == STEPS and m["resume_from"]["step"] == resumed_from
    assert_one_timeline(m, run_dir, STEPS)
    assert [x[0] for x in m["history"]["train"] if x[0] > resumed_from] == list(range(resumed_from + 1, STEPS + 1))
    last_eval = m["history"]["evals"][-1]
    assert last_eval[0] == STEPS and tr["final_val_loss"] == last_eval[2]["val_loss"]
    assert math.isfinite(tr["final_val_loss"]) and not [a for a in m["anomalies"] if a["action"] == "stopped"]
    # healthy: below the untrained model's loss, which the lr-5.0 segment's (finite, e.g. 617.8) losses are far above;
    # resumed from trained weights at lr <= 1e-3, the tiny model cannot climb back over it (6.2 -> ~4.6 measured)
    assert tr["final_val_loss"] < tr["initial_val_loss"]
    best = run_dir / m["checkpoints"]["best_checkpoint"]
    assert best.parent == run_dir and step_of(str(best)) == tr["best_step"]
    best_eval = next(v for s, _, v in m["history"]["evals"] if s == tr["best_step"])
    assert tr["best_metric"]["value"] == best_eval["val_perplexity"]
    # what the diverged segment saved after the checkpoint resumed from is the second resume's abandoned future
    again = m["resumes"][-1]["superseded"]
    assert again is None or (again["after_step"] == resumed_from and
                             all(c["step"] > resumed_from for c in again["checkpoints"]))
    state = json.loads((run_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    lrs = [e["learning_rate"] for e in state["log_history"] if "learning_rate" in e and e["step"] > resumed_from]
    assert len(lrs) == STEPS - resumed_from and max(lrs) <= 1.0e-3 * (1 + 1e-9)


@pytest.mark.parametrize("src,warmup", [(48, 1),  # late: 12 steps left, warmup_steps 20 capped at 10% -> 1
                                        (6, 5)])  # early: 54 left -> 5
def test_a_restarted_schedule_warms_up_briefly_and_decays_to_the_last_step(healthy, tmp_path, src, warmup):
    path = clone(healthy, tmp_path)
    run_dir = tmp_path / "runs" / "a"
    peak, left = 5.0e-3, STEPS - src
    proc = run_cli("--config", path, "--resume-from", run_dir / f"checkpoint-{src}",
                   "--set", f"training.hyperparameters.learning_rate={peak}",
                   "--set", "training.hyperparameters.warmup_steps=20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"learning-rate schedule restarted at step {src} of {STEPS}: warmup over {warmup} steps (warmup_steps "
            f"20 capped at 10% of the {left} steps left)") in proc.stdout
    assert f"cosine decay over {left - warmup} steps, reaching its end at step {STEPS}" in proc.stdout
    state = json.loads((run_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    # the learning rate each optimizer step used, as Trainer logged it (step src+k used the schedule at k-1)
    lrs = {e["step"]: e["learning_rate"] for e in state["log_history"] if "learning_rate" in e and e["step"] > src}
    assert sorted(lrs) == list(range(src + 1, STEPS + 1))
    for k in range(warmup):
        assert lrs[src + 1 + k] == pytest.approx(peak * k / warmup)
    assert lrs[src + 1 + warmup] == pytest.approx(peak)
    decay = [lrs[s] for s in range(src + 1 + warmup, STEPS + 1)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    # the last update uses the cosine's last value before its end (0 after the last step), as from step 0
    assert lrs[STEPS] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * (left - 1 - warmup) / (left - warmup))))
    assert lrs[STEPS] < 0.05 * peak  # a warmup of min(20, steps left) would end at 11/12 of it
    meta = json.loads((run_dir / f"checkpoint-{STEPS}" / tf.CHECKPOINT_META).read_text())
    assert meta["schedule"] == {"type": "cosine", "peak_lr": peak, "warmup_steps": warmup,
                                "num_training_steps": left, "start_step": src}


def test_another_runs_checkpoint_never_touches_that_run(healthy):
    """`--resume-from <a's checkpoint> --run-id b` is refused; with --force, b is a new run that starts from those
    weights (its first evaluation is that checkpoint's), and run a's files are exactly as they were."""
    out, _ = healthy
    path, run_a = out / "c.yaml", out / "runs" / "a"

    def snapshot() -> dict:
        return {str(p.relative_to(run_a)): (p.stat().st_size, p.stat().st_mtime_ns)
                for p in run_a.rglob("*") if p.is_file()}

    before, record = snapshot(), (run_a / tf.MANIFEST_NAME).read_bytes()
    src = run_a / "checkpoint-12"
    proc = run_cli("--config", path, "--resume-from", src, "--run-id", "b")
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = last_json(proc.stderr)["details"]
    assert err["field"] == "--run-id" and err["checkpoint_run_id"] == "a" and "--force" in err["suggestion"]
    assert not (out / "runs" / "b" / tf.MANIFEST_NAME).exists()
    proc = run_cli("--config", path, "--resume-from", src, "--run-id", "b", "--force", "--skip-dry-run",
                   "--set", "training.hyperparameters.num_epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = manifest(out / "runs" / "b")
    assert m["status"] == "completed" and m["resume_from"] is None and not m["resumes"]
    assert m["initialized_from"]["run_id"] == "a" and m["initialized_from"]["step"] == 12
    assert m["training_results"]["total_steps"] == 12 and m["history"]["train"][0][0] == 1
    a_at_12 = next(v for s, _, v in manifest(run_a)["history"]["evals"] if s == 12)
    assert m["training_results"]["initial_val_loss"] == pytest.approx(a_at_12["val_loss"], rel=1e-5)
    assert snapshot() == before and (run_a / tf.MANIFEST_NAME).read_bytes() == record


def test_resume_of_a_run_that_does_not_exist_says_so(healthy):
    out, _ = healthy
    proc = run_cli("--config", out / "c.yaml", "--resume-from", "latest", "--run-id", "doesnotexist")
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = last_json(proc.stderr)
    d = err["details"]
    assert err["error"] == "CheckpointNotFound" and d["field"] == "--run-id"
    assert d["looked_in"] == [str(out / "runs" / "doesnotexist")] and "a" in d["runs_there"]
    assert "there is no run 'doesnotexist'" in d["suggestion"] and "--force" not in d["suggestion"]


def test_an_optimizer_that_cannot_load_the_saved_state_is_refused(healthy):
    """AdamW's optimizer.pt does not load into SGD: refused at preflight even with --force, naming the way forward
    (a new run from the weights, whose optimizer starts fresh); run a is untouched."""
    out, _ = healthy
    record = (out / "runs" / "a" / tf.MANIFEST_NAME).read_bytes()
    for force in ((), ("--force",)):
        proc = run_cli("--config", out / "c.yaml", "--resume-from", out / "runs" / "a" / "checkpoint-12",
                       "--set", "training.optimization.optimizer=sgd", *force)
        assert proc.returncode == 2, proc.stderr[-3000:]
        d = last_json(proc.stderr)["details"]
        assert d["field"] == "training.optimization.optimizer" and "--run-id NEW_ID --force" in d["suggestion"]
    assert (out / "runs" / "a" / tf.MANIFEST_NAME).read_bytes() == record


def test_a_change_in_how_records_tokenize_is_refused_on_resume(healthy):
    """The same records rendered or cut another way are other tokens: a resume that changes the template variables,
    the truncation side or train_on_prompt is exit 2 naming each key (refused at preflight, nothing written), and
    --force is named as the way to accept it."""
    out, _ = healthy
    record = (out / "runs" / "a" / tf.MANIFEST_NAME).read_bytes()
    changes = {"data.chat_template_kwargs.enable_thinking": "true", "data.truncation_side": "left",
               "data.train_on_prompt": "true"}
    proc = run_cli("--config", out / "c.yaml", "--resume-from", out / "runs" / "a" / "checkpoint-12",
                   *[arg for k, v in changes.items() for arg in ("--set", f"{k}={v}")])
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = last_json(proc.stderr)["errors"]
    assert set(changes) <= {e["details"].get("field") for e in errors}
    assert all("--force" in e["details"]["suggestion"] for e in errors)
    assert (out / "runs" / "a" / tf.MANIFEST_NAME).read_bytes() == record


@pytest.mark.parametrize("key, saved_with", [("compute.fsdp", "full_shard auto_wrap"),
                                              ("compute.deepspeed", "ds_zero2.json")])
def test_turning_sharding_off_across_a_resume_is_refused(healthy, tmp_path, key, saved_with):
    """A checkpoint saved under FSDP or DeepSpeed (its record says so; neither runs on CPU) resumed without it: exit 2
    naming the key, --force named as the way to accept it, the run's record untouched."""
    path = clone(healthy, tmp_path)
    run_dir, ckpt = tmp_path / "runs" / "a", tmp_path / "runs" / "a" / "checkpoint-12"
    meta = json.loads((ckpt / tf.CHECKPOINT_META).read_text())
    section, name = key.split(".")
    meta["config"][section][name] = saved_with
    (ckpt / tf.CHECKPOINT_META).write_text(json.dumps(meta))
    record = (run_dir / tf.MANIFEST_NAME).read_bytes()
    proc = run_cli("--config", path, "--resume-from", ckpt)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = last_json(proc.stderr)["errors"]
    assert [e["details"]["field"] for e in errors] == [key]
    assert errors[0]["details"]["expected"] == saved_with and "--force" in errors[0]["details"]["suggestion"]
    assert (run_dir / tf.MANIFEST_NAME).read_bytes() == record


def test_a_changed_base_is_refused_and_a_failed_resume_keeps_the_record(tiny_dir, tmp_path):
    """The base's config.json, chat template and weights are the run's identity: each change is exit 2 naming it.
    With --force on a base whose weights no longer load, the resume fails before its first step: the completed
    run's record (status, results, curves, checkpoints) stays, and the attempt is appended to `resumes`."""
    base = tmp_path / "base"
    shutil.copytree(tiny_dir / "model", base)
    cfg = set_key(timeline_config(tiny_dir, tmp_path), "model.base_checkpoint", str(base))
    cfg = set_key(cfg, "training.hyperparameters.num_epochs", 1)
    path = write_config(tmp_path / "c.yaml", cfg)
    proc = run_cli("--config", path, "--run-id", "r", "--skip-dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "r"
    record = (run_dir / tf.MANIFEST_NAME).read_bytes()
    m = json.loads(record)
    assert m["base_identity"]["weights_fingerprint"] and m["base_identity"]["chat_template_sha256"]
    assert json.loads((run_dir / "checkpoint-6" / tf.CHECKPOINT_META).read_text())["base_identity"] == m["base_identity"]

    def scaled(text: bytes) -> bytes:
        from safetensors.torch import load, save
        tensors = load(text)
        name = sorted(tensors)[-1]
        tensors[name] = tensors[name] * 1.01
        return save(tensors, metadata={"format": "pt"})

    changes = {"config.json": ("config.json", lambda b: b.replace(b'"rms_norm_eps": 1e-06', b'"rms_norm_eps": 1e-05')),
               "chat template": ("chat_template.jinja", lambda b: b + b"\n"),
               "weights": ("model.safetensors", scaled)}
    for label, (name, change) in changes.items():
        original = (base / name).read_bytes()
        (base / name).write_bytes(change(original))
        assert (base / name).read_bytes() != original, name
        proc = run_cli("--config", path, "--run-id", "r", "--resume-from", "latest")
        (base / name).write_bytes(original)
        assert proc.returncode == 2, proc.stderr[-3000:]
        d = last_json(proc.stderr)["details"]
        assert d["field"] == "model.base_checkpoint" and list(d["changed"]) == [label], d
        assert "--force" in d["suggestion"]
        assert (run_dir / tf.MANIFEST_NAME).read_bytes() == record

    curves = {p.name: p.read_bytes() for p in (tmp_path / "logs" / "r").glob("*.csv")}
    listed = tf.list_checkpoints(str(run_dir))
    weights = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(weights[:len(weights) // 2])  # loads no more
    proc = run_cli("--config", path, "--resume-from", run_dir / "checkpoint-6", "--force")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert last_json(proc.stderr)["error"] == "TrainingFailed"
    after = manifest(run_dir)
    assert {k: v for k, v in after.items() if k != "resumes"} == {k: v for k, v in m.items() if k != "resumes"}
    attempt = after["resumes"][-1]
    assert len(after["resumes"]) == len(m["resumes"]) + 1 and attempt["step"] == 6
    assert attempt["error"]["error"] == "TrainingFailed" and "record was kept" in attempt["outcome"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "logs" / "r").glob("*.csv")} == curves
    assert tf.list_checkpoints(str(run_dir)) == listed and not (run_dir / "error.json").exists()


def test_resume_command_works_from_any_directory(tiny_dir, tmp_path):
    """A run started with a relative --output-dir, preempted: its resume_command, run from `/`, finishes it."""
    cfg = set_key(timeline_config(tiny_dir, tmp_path), "training.hyperparameters.num_epochs", 1)
    path = write_config(tmp_path / "c.yaml", cfg)
    work = tmp_path / "work"
    work.mkdir()
    proc = run_cli("--config", path, "--run-id", "p", "--output-dir", "runs", "--skip-dry-run", cwd=work,
                   env={"FINANCE_TRAINER_INJECT_SIGNAL": "7:SIGTERM"})
    assert proc.returncode == 143, proc.stderr[-3000:]
    command = last_json(proc.stderr)["details"]["resume_command"]
    assert command.startswith(f"cd {work} && ") and str(Path(tf.__file__).resolve()) in command
    done = subprocess.run(["bash", "-c", command], cwd="/", capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    m = manifest(work / "runs" / "p")
    assert m["status"] == "completed" and m["resume_from"]["step"] == 7 and m["training_results"]["total_steps"] == 12
