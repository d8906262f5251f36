"""Packing without cross-contamination, and a real 2-process gloo run through the script's own launch path."""
from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

import train_finance_ssc_model as tf
from conftest import base_config, last_json, run_cli, set_key, write_config


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_gives_each_record_its_own_logits(tiny_dir, attn):
    # fp32, as training loads it (load_base_model): the tiny checkpoint stores bf16
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", attn_implementation=attn,
                                                 dtype=torch.float32).eval()
    recs = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16], [20, 21]]
    packed = tf.pack_dataset(Dataset.from_dict({"input_ids": recs, "labels": recs}), 9)
    assert sorted(len(r) for r in packed["input_ids"]) == [5, 9]  # best fit: 5+4 fill a row, then 3+2
    batch = tf.PadToLongestCollator(pad_token_id=1)(list(packed))
    assert "attention_mask" not in batch  # the block mask comes from position_ids
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for row, ids in enumerate(batch["input_ids"].tolist()):
            pos = batch["position_ids"][row].tolist()
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            for a, b in zip(starts, starts[1:]):
                seg = ids[a:b]
                if seg in recs:
                    alone = model(input_ids=torch.tensor([seg]), use_cache=False).logits[0]
                    assert torch.allclose(alone, logits[row, a:b], atol=1e-5)
                    assert batch["labels"][row, a] == tf.IGNORE_INDEX  # nothing predicted across a boundary
    # and the loss: the packed rows, and the same rows flattened into one (flash-attention 2's form), give the
    # loss of the records batched unpacked (padded, with an attention mask)
    unpacked = tf.PadToLongestCollator(pad_token_id=1)(
        [{"input_ids": r, "labels": r, "attention_mask": [1] * len(r)} for r in recs])
    flat = tf.PadToLongestCollator(pad_token_id=1, flatten=True)(list(packed))
    assert flat["input_ids"].shape == (1, sum(map(len, recs)))
    with torch.no_grad():
        want = model(**unpacked, use_cache=False).loss
        for packed_form in (batch, flat):
            assert torch.allclose(model(**packed_form, use_cache=False).loss, want, atol=1e-6)


@pytest.mark.slow
def test_packing_run_fills_rows(tiny_dir, tmp_path):
    cfg = set_key(base_config(tiny_dir, tmp_path, "prompt_completion"), "data.packing", True)
    cfg = set_key(cfg, "data.max_seq_length", 512)
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--run-id", "packed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((tmp_path / "runs" / "packed" / "run_manifest.json").read_text())
    packing, tokens = m["dataset"]["packing"], m["dataset"]["tokens"]["train"]
    assert f"packed 96 train records into {packing['rows']} rows" in proc.stdout
    assert packing["fill"] == pytest.approx(tokens / (packing["rows"] * 512), abs=1e-4)
    assert packing["rows"] <= 96 * 0.6 and packing["fill"] > 0.8
    # packed training learns (5.95 -> about 4.6 measured): a margin no CPU or thread count can close
    assert m["training_results"]["final_val_loss"] < m["training_results"]["initial_val_loss"] - 0.5


@pytest.fixture(scope="module")
def ddp_pair(tiny_dir, tmp_path_factory):
    """The same global batch (8) as one process x 8 and as two gloo processes x 4."""
    out = tmp_path_factory.mktemp("ddp")
    single = write_config(out / "one.yaml", base_config(tiny_dir, out))
    cfg = set_key(base_config(tiny_dir, out), "compute.num_gpus", 2)
    double = write_config(out / "two.yaml", set_key(cfg, "training.hyperparameters.batch_size", 4))
    p1 = run_cli("--config", single, "--run-id", "one")
    p2 = run_cli("--config", double, "--run-id", "two")
    return out, p1, p2


@pytest.mark.slow
def test_two_process_gloo_run_through_own_launcher(ddp_pair):
    out, p1, p2 = ddp_pair
    assert p1.returncode == 0, p1.stderr[-2000:]
    assert p2.returncode == 0, p2.stderr[-12000:]
    assert "starting 2 processes with torch.distributed.run" in p2.stdout
    m = json.loads((out / "runs" / "two" / "run_manifest.json").read_text())
    d = m["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "gloo" and d["ranks_agree"] is True
    assert len(set(d["rank_weight_sha256"])) == 1
    assert m["hyperparameters"]["effective_batch_size"] == 8
    assert [p.name for p in (out / "runs").iterdir() if p.name.startswith("two")] == ["two"]  # one run dir
    assert (out / "logs" / "two" / "train.log").read_text().count("INFO validation perplexity") == 1  # rank 0 only
    single = json.loads((out / "runs" / "one" / "run_manifest.json").read_text())
    a, b = single["training_results"]["final_val_loss"], m["training_results"]["final_val_loss"]
    # same global batch, same data order: the two runs differ only by float summation order (about 1e-6
    # relative); 5% leaves room for any BLAS or thread count and still catches a wrong gradient average (2x lr)
    assert abs(a - b) / a < 0.05, (a, b)


@pytest.mark.slow
def test_one_rank_nan_stops_every_rank(tiny_dir, tmp_path):
    cfg = set_key(base_config(tiny_dir, tmp_path), "compute.num_gpus", 2)
    cfg = set_key(cfg, "training.hyperparameters.batch_size", 4)
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--run-id", "nan2",
                   env={"FINANCE_TRAINER_INJECT_NAN_AT_STEP": "4:1"}, timeout=600)  # rank 1 only
    assert proc.returncode == 3, proc.stderr[-2000:]
    err = last_json(proc.stderr)
    assert err["error"] == "TrainingDiverged" and err["details"]["step"] == 4
    assert "Traceback" not in proc.stderr
    m = json.loads((tmp_path / "runs" / "nan2" / "run_manifest.json").read_text())
    assert m["status"] == "diverged"


@pytest.mark.slow
def test_nccl_without_cuda_is_refused(tiny_dir, tmp_path):
    cfg = set_key(base_config(tiny_dir, tmp_path), "compute.distributed_backend", "nccl")
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--validate-only")
    assert proc.returncode == 2 and last_json(proc.stderr)["details"]["field"] == "compute.distributed_backend"


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(ddp_pair):
    """Rank 1 alone gets SIGTERM inside step 5: the flag is all-reduced, both ranks save checkpoint-5 and stop,
    and resuming gives the uninterrupted two-process run's weights."""
    from safetensors.torch import load_file
    out, _, p2 = ddp_pair
    assert p2.returncode == 0, p2.stderr[-12000:]
    path = out / "two.yaml"
    proc = run_cli("--config", path, "--run-id", "two_term", env={"FINANCE_TRAINER_INJECT_SIGNAL": "5:SIGTERM:1"})
    assert proc.returncode == tf.EXIT_PREEMPTED, proc.stderr[-2000:]
    err = last_json(proc.stderr)
    assert err["error"] == "Preempted" and err["details"]["step"] == 5
    run_dir = out / "runs" / "two_term"
    assert [c["name"] for c in tf.list_checkpoints(str(run_dir), details=True) if c["is_latest"]] == ["checkpoint-5"]
    assert json.loads((run_dir / "run_manifest.json").read_text())["status"] == "interrupted"
    res = run_cli("--config", path, "--run-id", "two_term", "--resume-from", "latest")
    assert res.returncode == 0, res.stderr[-12000:]
    a = load_file(out / "runs" / "two" / "checkpoint-epoch-2" / "model.safetensors")
    b = load_file(run_dir / "checkpoint-epoch-2" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_to_the_launching_cli_reaches_the_ranks_and_resume_is_exact(ddp_pair):
    """SIGTERM at the CLI's pid (what Kubernetes, Docker and SLURM signal) while two gloo ranks train: the CLI
    forwards it to torchrun, which relays it to both ranks; they save checkpoint-5 and stop, and the CLI ends with
    their Preempted payload (exit 143) and one manifest that says `interrupted`. The resume is bit-exact.
    Rank 0 sends the signal to the CLI inside step 5 and waits for the relay (the `:launcher` hook), so the stop
    step is certain."""
    from safetensors.torch import load_file
    out, _, p2 = ddp_pair
    assert p2.returncode == 0, p2.stderr[-12000:]
    path = out / "two.yaml"
    proc = run_cli("--config", path, "--run-id", "two_cli", env={"FINANCE_TRAINER_INJECT_SIGNAL": "5:SIGTERM:launcher"})
    assert proc.returncode == tf.EXIT_PREEMPTED, proc.stderr[-3000:]
    assert "SIGTERM received: forwarded to the 2 ranks" in proc.stdout
    assert "Traceback" not in proc.stderr
    err = last_json(proc.stderr)
    run_dir = out / "runs" / "two_cli"
    assert err["error"] == "Preempted" and err["details"]["signal"] == "SIGTERM" and err["details"]["step"] == 5
    assert err["details"]["checkpoint"] == str(run_dir / "checkpoint-5")
    assert [p.name for p in (out / "runs").iterdir() if p.name.startswith("two_cli")] == ["two_cli"]
    m = json.loads((run_dir / "run_manifest.json").read_text())
    assert m["status"] == "interrupted" and m["error"]["error"] == "Preempted"
    assert json.loads(proc.stdout.strip().splitlines()[-1])["status"] == "interrupted"  # rank 0's Output line
    res = run_cli("--config", path, "--run-id", "two_cli", "--resume-from", "latest")
    assert res.returncode == 0, res.stderr[-12000:]
    a = load_file(out / "runs" / "two" / "checkpoint-epoch-2" / "model.safetensors")
    b = load_file(run_dir / "checkpoint-epoch-2" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
