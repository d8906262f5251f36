"""The training command runs the spec's Phase 2 dry run first (Example Session 1: validate, dry run, train) and it
changes nothing about the run: final weights, curves and trackers are those of a run without it. Then `best/` as the
inference team gets it: loadable by a plain from_pretrained, batched generation equal to one prompt at a time,
readable by another user, every file in SHA256SUMS."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

import train_finance_ssc_model as tf
from conftest import base_config, last_json, run_cli, write_config

pytestmark = pytest.mark.slow  # every test here launches the CLI (conftest.run_cli)


@pytest.fixture(scope="module")
def pair(tiny_dir, tmp_path_factory):
    """The same config and seed trained twice: with the dry run first (the default) and with --skip-dry-run."""
    out = tmp_path_factory.mktemp("dry_before")
    path = write_config(out / "c.yaml", base_config(tiny_dir, out))
    with_dry = run_cli("--config", path, "--run-id", "with")
    assert with_dry.returncode == 0, with_dry.stderr[-3000:]
    without = run_cli("--config", path, "--run-id", "without", "--skip-dry-run")
    assert without.returncode == 0, without.stderr[-3000:]
    return SimpleNamespace(out=out, with_dry=with_dry, without=without,
                           run_dir=out / "runs" / "with", plain_dir=out / "runs" / "without")


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / tf.MANIFEST_NAME).read_text())


def curve(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_training_runs_the_dry_run_first_and_says_so_in_one_line(pair, tiny_dir):
    stdout, report_path = pair.with_dry.stdout, pair.run_dir / "dry_run_report.json"
    lines = [line for line in stdout.splitlines() if "dry run" in line]
    assert len(lines) == 1, lines
    vocab = json.loads((tiny_dir / "model" / "config.json").read_text())["vocab_size"]
    ln_vocab = re.escape(f"{math.log(vocab):.2f}")  # 6.24 for the tiny model's 512 tokens
    # 96 samples / batch 8 x 2 epochs = 24 planned steps: the default is a tenth of them, at least 2
    assert re.search(r" INFO dry run passed: 2 steps, initial loss \d+\.\d\d \(ln vocab " + ln_vocab + r"\), memory "
                     r"[\d.]+ [KMGT]iB measured vs [\d.]+ [KMGT]iB estimated -> " + re.escape(str(report_path)) + "$",
                     lines[0]), lines[0]
    first_step = next(i for i, line in enumerate(stdout.splitlines()) if " INFO step " in line)
    assert stdout.splitlines().index(lines[0]) < first_step  # before the run's first evaluation and step
    assert not re.search(r" step \d+/2 ", stdout)  # the dry run's own step lines stay off the console
    r = json.loads(report_path.read_text())
    assert r["status"] == "passed" and r["before_training"] is True and r["steps"] == r["steps_run"] == 2
    assert r["data"]["train_slice_samples"] == 2 * 8 and r["data"]["splits"]["train"]["samples"] == 96
    assert all(r["checks"].values()) and r["memory"]["measured"]["total_bytes"] > 0
    assert "<|im_start|>user" in r["sample"]["prompt_text_masked"]
    m = manifest(pair.run_dir)
    assert m["dry_run"]["status"] == "passed" and pair.run_dir / m["dry_run"]["report"] == report_path
    assert m["dry_run"]["steps"] == 2 and m["dry_run"]["initial_loss"] == r["initial_loss"]
    # its curves went to the `-dryrun` tracker id, CSV and TensorBoard, never into the run's
    dry_curve = curve(pair.out / "logs" / "with-dryrun" / "train_loss.csv")
    assert [row[0] for row in dry_curve] == ["step", "1", "2"]
    assert list((pair.out / "tb" / "with-dryrun").glob("events.out.tfevents.*"))
    assert Path(m["metrics"]["train_log"]).read_text().count("dry run passed") == 1


def test_the_dry_run_does_not_change_the_run(pair):
    import torch
    from safetensors.torch import load_file
    a = load_file(str(pair.run_dir / "checkpoint-epoch-2" / "model.safetensors"))
    b = load_file(str(pair.plain_dir / "checkpoint-epoch-2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("train_loss.csv", "val_loss.csv"):  # bit-identical training: the same curves, row for row
        assert curve(pair.out / "logs" / "with" / name) == curve(pair.out / "logs" / "without" / name)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    steps = []
    for run in ("with", "without"):
        acc = EventAccumulator(str(pair.out / "tb" / run))
        acc.Reload()
        steps.append([(e.step, e.value) for e in acc.Scalars("train/loss")])
    assert steps[0] == steps[1] and steps[0][0][0] == 1
    m, plain = manifest(pair.run_dir), manifest(pair.plain_dir)
    assert m["history"] == plain["history"]
    assert plain["dry_run"] == {"status": "skipped", "reason": "--skip-dry-run"}
    assert not (pair.plain_dir / "dry_run_report.json").exists()
    assert [line for line in pair.without.stdout.splitlines() if "dry run" in line][0].endswith(
        "INFO dry run skipped: --skip-dry-run")


def test_a_failed_dry_run_stops_before_training(tiny_dir, tmp_path):
    path = write_config(tmp_path / "c.yaml", base_config(tiny_dir, tmp_path))
    # the NaN hook's `dry:` form poisons step 1 of the dry run (the plain form targets the training run's steps)
    proc = run_cli("--config", path, "--run-id", "nan", env={"FINANCE_TRAINER_INJECT_NAN_AT_STEP": "dry:1"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = last_json(proc.stderr)
    run_dir = tmp_path / "runs" / "nan"
    assert err["error"] == "TrainingFailed" and err["details"]["checks"]["initial_loss_finite"] is False
    assert err["details"]["report"] == str(run_dir / "dry_run_report.json") and err["details"]["initial_loss"] == "NaN"
    assert re.search(r" ERROR dry run failed: 1 step \(a guard stopped it: loss is NaN/inf\), initial loss nan .*"
                     r"failed: initial_loss_finite, final_loss_finite -> ", proc.stdout), proc.stdout[-3000:]
    m = manifest(run_dir)
    assert m["status"] == "failed" and m["error"]["error"] == "TrainingFailed"
    assert m["dry_run"]["status"] == "failed"
    assert m["history"]["train"] == [] and m["history"]["evals"] == []  # no training step, not even the first eval
    assert not list(run_dir.glob("checkpoint-*"))
    assert json.loads((run_dir / "error.json").read_text())["error"] == "TrainingFailed"
    assert json.loads((run_dir / "dry_run_report.json").read_text())["status"] == "failed"


# --------------------------------------------------------------------------------------------------
# best/: ready for serving
# --------------------------------------------------------------------------------------------------

def test_best_is_ready_for_serving(pair):
    best, m = pair.run_dir / "best", manifest(pair.run_dir)
    source = pair.run_dir / m["checkpoints"]["best_checkpoint"]  # relative to the manifest's dir
    assert json.loads((best / "config.json").read_text())["use_cache"] is True
    assert json.loads((best / "tokenizer_config.json").read_text())["padding_side"] == "left"
    gen = json.loads((best / "generation_config.json").read_text())
    assert gen["pad_token_id"] is not None and gen["eos_token_id"] is not None and gen.get("use_cache", True)
    # a service user reads it: files 0644, dirs 0755
    assert stat.S_IMODE(best.stat().st_mode) == 0o755
    files = sorted(p for p in best.rglob("*") if p.is_file())
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: "0o644" for p in files}
    # SHA256SUMS covers every file, the manifest's copy included, and nothing else
    sums = {name: digest for digest, name in
            (line.split("  ", 1) for line in (best / "SHA256SUMS").read_text().splitlines())}
    assert sorted(sums) == sorted(p.name for p in files if p.name != "SHA256SUMS")
    assert tf.MANIFEST_NAME in sums and tf.CHECKPOINT_META in sums
    for name, digest in sums.items():
        assert hashlib.sha256((best / name).read_bytes()).hexdigest() == digest, name
    # the checkpoint's own files were not rewritten: its recorded sha256 still hold; best/'s meta records best/'s
    assert tf.check_checkpoint_integrity(source) is None
    assert tf.check_checkpoint_integrity(best, resume=False) is None
    # unchanged files are the checkpoint's (hard links: one copy); the weights are a new file in the base's stored
    # dtype (bf16: half the fp32 checkpoint's), the checkpoint keeping its exact fp32 weights
    assert (best / "tokenizer.json").stat().st_ino == (source / "tokenizer.json").stat().st_ino
    assert (best / "model.safetensors").stat().st_ino != (source / "model.safetensors").stat().st_ino
    assert json.loads((best / "config.json").read_text())["dtype"] == "bfloat16"
    assert (best / "model.safetensors").stat().st_size < 0.6 * (source / "model.safetensors").stat().st_size
    tf.load_checkpoint(str(best))


def test_best_generates_the_same_in_a_batch_as_one_prompt_at_a_time(pair, tiny_dir):
    """Greedy decoding of two prompts of different lengths in one batch equals decoding each alone: left padding
    (with the attention mask, positions follow it) leaves each prompt's computation as it was. Compared on token
    ids and on every step's logits, so a degenerate tiny model cannot make it pass by repeating one token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    best = str(pair.run_dir / "best")
    tok, model = AutoTokenizer.from_pretrained(best), AutoModelForCausalLM.from_pretrained(best)
    records = [json.loads(line) for line in (tiny_dir / "messages" / "test.jsonl").read_text().splitlines()]
    prompts = [tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
               for r in records]
    prompts = sorted(prompts, key=lambda p: len(tok(p)["input_ids"]))
    prompts = [prompts[0], prompts[-1]]
    assert len(tok(prompts[0])["input_ids"]) < len(tok(prompts[1])["input_ids"])

    def generate(texts: list[str]):
        batch = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
        return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.logits, dim=1)

    ids, logits = generate(prompts)
    for row, prompt in enumerate(prompts):
        alone_ids, alone_logits = generate([prompt])
        assert torch.equal(ids[row], alone_ids[0])
        assert torch.allclose(logits[row], alone_logits[0], atol=1e-4)
        assert tok.decode(ids[row]) == tok.decode(alone_ids[0])
