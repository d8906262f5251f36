"""Post-training analysis and monitoring: test metrics checked by hand, greedy samples, baseline comparison,
live status (running, finished, killed), cost arithmetic, MLflow, the `best` archive, and the CLI tools."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import train_finance_ssc_model as tf
from conftest import SCRIPT, base_config, run_cli, set_key, write_config

FMT = "prompt_completion"
N_SAMPLES, MAX_NEW_TOKENS = 3, 16


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def read_curve(path) -> list[tuple[int, float]]:
    with open(path, newline="") as fh:
        return [(int(r["step"]), float(r["value"])) for r in csv.DictReader(fh)]


def manifest_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "run_manifest.json").read_text())


# --------------------------------------------------------------------------------------------------
# Shared runs: A (1 epoch, a learning rate too low to learn) is the baseline; B (2 epochs, 10x the learning rate, MLflow on)
# is compared against it with --baseline.
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    cfg = base_config(tiny_dir, out, FMT)
    cfg["evaluation"] = {"num_samples": N_SAMPLES, "max_new_tokens": MAX_NEW_TOKENS, "baseline": "none"}
    # A barely trains (lr 1e-5, 12 steps: its val loss stays near ln(vocab) = 5.95) and B trains for real (lr 1e-2,
    # 24 steps: 5.95 -> about 4.1), so "B is better" holds by a margin no CPU or thread count can flip.
    cfg_a = set_key(set_key(cfg, "training.hyperparameters.learning_rate", 1.0e-5),
                    "training.hyperparameters.num_epochs", 1)
    proc_a = run_cli("--config", write_config(out / "a.yaml", cfg_a), "--run-id", "A")
    assert proc_a.returncode == 0, proc_a.stderr[-3000:]
    cfg_b = set_key(cfg, "logging.mlflow", {"enabled": True, "tracking_uri": None, "experiment": "analysis-test"})
    proc_b = run_cli("--config", write_config(out / "b.yaml", cfg_b), "--run-id", "B",
                     "--baseline", out / "runs" / "A")
    assert proc_b.returncode == 0, proc_b.stderr[-3000:]
    runs_dir = out / "runs"
    return SimpleNamespace(out=out, runs_dir=runs_dir, a_dir=runs_dir / "A", b_dir=runs_dir / "B",
                           proc_a=proc_a, proc_b=proc_b, cfg_a=cfg_a, cfg_b=cfg_b,
                           test_path=Path(cfg["data"]["test_path"]))


# --------------------------------------------------------------------------------------------------
# 1. Test metrics against a hand computation
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def yes_checkpoint(tiny_dir, tmp_path_factory):
    """A checkpoint that answers " Yes." to anything (trained here with plain torch), and a test file mixing
    records it gets exactly right with real records it gets wrong, of very different lengths."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path_factory.mktemp("yes")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir / "model"))
    tok = AutoTokenizer.from_pretrained(str(tiny_dir / "model"))
    test = read_jsonl(tiny_dir / FMT / "test.jsonl")
    seqs = []
    for r in test[:3]:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(" Yes.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append((p + c, [-100] * len(p) + c))
    width = max(len(s) for s, _ in seqs)
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s, _ in seqs])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in seqs])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    model.train()
    answer = labels[:, 1:] != -100
    for _ in range(400):  # until every answer token (eos included) is the argmax: those records are exact
        outputs = model(input_ids=ids, attention_mask=mask, labels=labels)
        if bool((outputs.logits[:, :-1].argmax(-1) == labels[:, 1:])[answer].all()):
            break
        loss = outputs.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = out / "ckpt"
    model.save_pretrained(ckpt, safe_serialization=True)
    tok.save_pretrained(ckpt)
    records = [{"prompt": r["prompt"], "completion": " Yes."} for r in test[:3]] + \
              [{"prompt": test[i]["prompt"], "completion": test[i]["completion"]} for i in (3, 10)]
    data = out / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return ckpt, data, records


def hand_metrics(ckpt: Path, records: list[dict]) -> dict:
    """Plain torch, one record at a time, no Trainer: prompt and completion tokenized separately, eos appended
    to the completion, each answer token predicted from the position before it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    nll_sum, n_tokens, n_right, n_exact = 0.0, 0, 0, 0
    for r in records:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0]
        pred = logits[len(p) - 1: len(p) + len(c) - 1]  # position j predicts token j + 1
        target = torch.tensor(c)
        logp = torch.log_softmax(pred.double(), dim=-1)
        nll_sum += float(-logp[torch.arange(len(c)), target].sum())
        right = int((pred.argmax(-1) == target).sum())
        n_tokens, n_right, n_exact = n_tokens + len(c), n_right + right, n_exact + (right == len(c))
    return {"loss": nll_sum / n_tokens, "n_tokens": n_tokens, "n_right": n_right, "n_exact": n_exact,
            "n_records": len(records)}


def test_evaluate_checkpoint_matches_hand_computation(yes_checkpoint):
    ckpt, data, records = yes_checkpoint
    hand = hand_metrics(ckpt, records)
    # the data must be able to tell a right exact-match / accuracy implementation from a wrong one
    assert 0 < hand["n_exact"] < hand["n_records"], hand
    assert 0 < hand["n_right"] < hand["n_tokens"], hand
    res = tf.evaluate_checkpoint(str(ckpt), str(data), batch_size=2)  # 3 batches of different widths
    assert res["samples"] == len(records)
    assert res["test_loss"] == pytest.approx(hand["loss"], rel=1e-4)
    assert round(res["test_token_accuracy"] * hand["n_tokens"]) == hand["n_right"]
    assert res["test_token_accuracy"] == pytest.approx(hand["n_right"] / hand["n_tokens"], rel=1e-9)
    assert round(res["test_exact_match"] * hand["n_records"]) == hand["n_exact"]
    assert res["test_exact_match"] == pytest.approx(hand["n_exact"] / hand["n_records"], rel=1e-9)
    assert res["test_perplexity"] == pytest.approx(math.exp(res["test_loss"]), rel=1e-9)


def test_evaluate_checkpoint_returns_the_documented_keys(yes_checkpoint):
    """The same metric keys as the manifest's test_results: no Trainer timing keys."""
    ckpt, data, records = yes_checkpoint
    res = tf.evaluate_checkpoint(str(ckpt), str(data))
    assert {k for k in res if k.startswith("test_")} == {"test_loss", "test_perplexity", "test_token_accuracy",
                                                          "test_exact_match"}
    assert res["samples"] == len(records) and Path(res["checkpoint"]) == ckpt.resolve()
    assert Path(res["data_path"]) == data.resolve()


def test_batch_size_does_not_change_test_metrics(yes_checkpoint):
    ckpt, data, _ = yes_checkpoint
    one = tf.evaluate_checkpoint(str(ckpt), str(data), batch_size=1)
    all_ = tf.evaluate_checkpoint(str(ckpt), str(data), batch_size=8)
    for key in ("test_loss", "test_token_accuracy", "test_exact_match"):
        assert one[key] == pytest.approx(all_[key], rel=1e-5), key


def test_full_logits_fallback_gives_the_same_test_metrics(yes_checkpoint, monkeypatch):
    """A model whose forward takes no logits_to_keep is evaluated from its full logits
    (preprocess_logits_for_metrics): the same metrics as the answer-only path."""
    ckpt, data, _ = yes_checkpoint
    fast = tf.evaluate_checkpoint(str(ckpt), str(data), batch_size=4)
    monkeypatch.setattr(tf, "_accepts_logits_to_keep", lambda model: False)
    slow = tf.evaluate_checkpoint(str(ckpt), str(data), batch_size=4)
    for key in ("test_loss", "test_token_accuracy", "test_exact_match"):
        assert fast[key] == pytest.approx(slow[key], rel=1e-5), key


def test_answer_only_logits_equal_full_logits(tiny_dir):
    """Evaluation computes logits at the answer positions only (answer_token_predictions): on a real padded batch
    of chat records its per-token argmax and NLL equal those of the full logits, position by position, and its
    loss equals the model's own loss over the same labels."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model").eval()
    assert tf._accepts_logits_to_keep(model)
    rows = [tf.tokenize_record(r, tokenizer, "messages", 512, False) for r in read_jsonl(tiny_dir / "messages" / "valid.jsonl")[:5]]
    batch = tf.PadToLongestCollator(tokenizer.pad_token_id)(
        [{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows])
    assert len({len(r["input_ids"]) for r in rows}) > 1  # the batch is padded
    with torch.no_grad():
        full = model(**batch)
        loss, preds = tf.answer_token_predictions(model, batch)
    want = tf.preprocess_logits_for_metrics(full.logits, batch["labels"])
    answer = batch["labels"][:, 1:] != tf.IGNORE_INDEX
    assert answer.sum() > 0 and (~answer).sum() > 0
    assert preds.shape == want.shape
    assert torch.equal(preds[..., 0][answer], want[..., 0][answer])  # argmax
    assert torch.allclose(preds[..., 1][answer], want[..., 1][answer], rtol=1e-5, atol=1e-6)  # NLL
    assert float(loss) == pytest.approx(float(full.loss), rel=1e-5)


def test_compute_metrics_on_synthetic_logits():
    """preprocess_logits_for_metrics + compute_metrics against a loop over tokens, including a row with no
    answer tokens (it must not count in exact match) and a row where every answer token is right."""
    import numpy as np
    import torch
    from transformers import EvalPrediction
    g = torch.Generator().manual_seed(3)
    B, T, V = 4, 7, 11
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = -100  # prompt
    labels[2, :] = -100  # no answer tokens at all
    labels[1, 3:] = logits[1, 2:-1].argmax(-1)  # row 1: every answer token is the argmax
    packed = tf.preprocess_logits_for_metrics(logits, labels)
    got = tf.compute_metrics(EvalPrediction(predictions=packed.numpy(), label_ids=labels.numpy()))
    nll, right, n, exact, rows = 0.0, 0, 0, 0, 0
    for b in range(B):
        row_ok, row_has = True, False
        for t in range(1, T):
            if labels[b, t] == -100:
                continue
            row_has = True
            lp = torch.log_softmax(logits[b, t - 1].double(), -1)
            nll -= float(lp[labels[b, t]])
            ok = int(logits[b, t - 1].argmax()) == int(labels[b, t])
            right, n, row_ok = right + ok, n + 1, row_ok and ok
        if row_has:
            rows, exact = rows + 1, exact + row_ok
    assert got["token_loss"] == pytest.approx(nll / n, rel=1e-5)
    assert got["token_accuracy"] == pytest.approx(right / n)
    assert got["exact_match"] == pytest.approx(exact / rows) and exact >= 1 and rows == 3
    assert np.isfinite(got["token_loss"])


# --------------------------------------------------------------------------------------------------
# 2. Greedy samples
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_samples_file_and_manifest(runs):
    m = manifest_of(runs.b_dir)
    path = runs.b_dir / "samples.jsonl"
    samples = read_jsonl(path)
    assert len(samples) == N_SAMPLES
    test = read_jsonl(runs.test_path)[:N_SAMPLES]
    for s, r in zip(samples, test):
        assert {"prompt", "reference", "generated"} <= set(s)
        assert (s["prompt"], s["reference"]) == (r["prompt"], r["completion"])
        assert isinstance(s["generated"], str)
    info = m["samples"]
    assert info["path"] == "samples.jsonl" and info["count"] == N_SAMPLES  # relative to the manifest's dir
    assert info["max_new_tokens"] == MAX_NEW_TOKENS and info["greedy"] is True
    assert info["first"] == samples[0]
    assert info["exact_match_rate"] == pytest.approx(
        sum(s["generated"].strip() == s["reference"].strip() for s in samples) / N_SAMPLES)


@pytest.mark.slow
def test_sample_generation_is_deterministic(runs):
    """Two generations in this process agree with each other and with what the CLI wrote for the same weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = manifest_of(runs.b_dir)
    best = str(runs.b_dir / m["checkpoints"]["best_checkpoint"])  # manifest paths are relative to the manifest
    model = AutoModelForCausalLM.from_pretrained(best)
    tok = AutoTokenizer.from_pretrained(best)
    records = read_jsonl(runs.test_path)[:N_SAMPLES]
    first = tf.generate_samples(model, tok, records, FMT, MAX_NEW_TOKENS)
    second = tf.generate_samples(model, tok, records, FMT, MAX_NEW_TOKENS)
    assert first == second
    written = read_jsonl(runs.b_dir / "samples.jsonl")
    assert [s["generated"] for s in first] == [s["generated"] for s in written]
    for s in first:  # greedy generation is bounded by max_new_tokens
        assert len(tok(s["generated"], add_special_tokens=False)["input_ids"]) <= MAX_NEW_TOKENS + 2


@pytest.mark.slow
def test_samples_generated_in_a_batch_equal_one_prompt_at_a_time(runs):
    """generate_samples decodes up to SAMPLE_BATCH prompts per call, left-padded: every completion equals that of
    its prompt decoded alone (prompts of different lengths; a row that stops early is cut at its stop token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    best = str(runs.b_dir / manifest_of(runs.b_dir)["checkpoints"]["best_checkpoint"])
    model, tok = AutoModelForCausalLM.from_pretrained(best), AutoTokenizer.from_pretrained(best)
    records = read_jsonl(runs.test_path)[:6]
    assert len({len(tok(r["prompt"])["input_ids"]) for r in records}) > 1
    together = tf.generate_samples(model, tok, records, FMT, MAX_NEW_TOKENS)
    alone = [tf.generate_samples(model, tok, [r], FMT, MAX_NEW_TOKENS)[0] for r in records]
    assert together == alone


def test_prompt_and_reference_per_shape(tiny_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_dir / "model"))
    pc = read_jsonl(tiny_dir / "prompt_completion" / "test.jsonl")[0]
    assert tf.prompt_and_reference(pc, "prompt_completion", tok) == (pc["prompt"], pc["completion"])
    ins = read_jsonl(tiny_dir / "instruction" / "test.jsonl")[0]
    assert tf.prompt_and_reference(ins, "instruction", tok) == (tf.render_instruction_prompt(ins), ins["output"])
    msg = read_jsonl(tiny_dir / "messages" / "test.jsonl")[0]
    prompt, ref = tf.prompt_and_reference(msg, "messages", tok)
    last = [m for m in msg["messages"] if m["role"] == "assistant"][-1]
    assert ref == last["content"] and ref not in prompt
    txt = read_jsonl(tiny_dir / "text" / "test.jsonl")[0]
    prompt, ref = tf.prompt_and_reference(txt, "text", tok)
    assert prompt and ref and prompt + ref == tok.decode(tok(txt["text"], add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------------
# 3. Baseline comparison
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_baseline_comparison_better_run(runs):
    ma, mb = manifest_of(runs.a_dir), manifest_of(runs.b_dir)
    a_val = read_curve(ma["metrics"]["val_loss_curve"])[-1][1]
    b_val = read_curve(mb["metrics"]["val_loss_curve"])[-1][1]
    assert b_val < a_val, "B (trained) should end with a lower val loss than A (barely trained)"
    cmp = mb["baseline_comparison"]
    assert cmp["baseline_run_id"] == "A"
    assert not Path(cmp["baseline_manifest"]).is_absolute()  # manifest paths are relative to the run dir
    assert (runs.b_dir / cmp["baseline_manifest"]).resolve() == (runs.a_dir / "run_manifest.json").resolve()
    assert cmp["chosen"] == "evaluation.baseline"
    rows = {r["metric"]: r for r in cmp["metrics"]}
    assert {"final_val_loss", "final_val_perplexity", "test_loss", "test_perplexity"} <= set(rows)
    r = rows["final_val_loss"]
    assert r["baseline"] == pytest.approx(a_val) and r["current"] == pytest.approx(b_val)
    assert r["delta"] == pytest.approx(r["current"] - r["baseline"], abs=1e-12) and r["delta"] < 0
    assert r["improved"] is True
    t = rows["test_loss"]
    assert (t["baseline"], t["current"]) == (ma["test_results"]["test_loss"], mb["test_results"]["test_loss"])
    assert t["improved"] is (t["current"] < t["baseline"])
    for row in cmp["metrics"]:
        assert row["delta"] == pytest.approx(row["current"] - row["baseline"], abs=1e-12)
    # the table is printed on stdout
    assert "baseline comparison against A" in runs.proc_b.stdout
    for line in tf.format_comparison(cmp).splitlines()[1:]:
        assert line in runs.proc_b.stdout


@pytest.mark.slow
def test_baseline_comparison_worse_run(runs):
    ma, mb = manifest_of(runs.a_dir), manifest_of(runs.b_dir)
    cmp = tf.compare_to_baseline(ma, str(runs.b_dir))
    assert cmp["baseline_run_id"] == "B"
    rows = {r["metric"]: r for r in cmp["metrics"]}
    r = rows["final_val_loss"]
    assert r["improved"] is False and r["delta"] > 0
    assert (r["baseline"], r["current"]) == (mb["training_results"]["final_val_loss"],
                                             ma["training_results"]["final_val_loss"])
    assert rows["final_val_perplexity"]["improved"] is False
    # a manifest path works as well as a run dir; a missing baseline is a config error
    assert tf.compare_to_baseline(ma, str(runs.b_dir / "run_manifest.json")) == cmp
    with pytest.raises(tf.TrainerError) as exc:
        tf.compare_to_baseline(ma, str(runs.out / "no_such_run"))
    assert exc.value.kind == "InvalidConfig"
    assert "no" in tf.format_comparison(cmp).splitlines()[2].split()[-1]


@pytest.mark.slow
def test_run_without_baseline_has_no_comparison(runs):
    assert manifest_of(runs.a_dir)["baseline_comparison"] is None


# --------------------------------------------------------------------------------------------------
# 4. --status: finished, running, killed
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_status_of_finished_run(runs):
    proc = run_cli("--status", "B", "--output-dir", runs.runs_dir, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    st = json.loads(proc.stdout)
    m = manifest_of(runs.b_dir)
    assert st["run_id"] == "B" and st["status"] == "completed"
    assert st["step"] == st["max_steps"] == m["training_results"]["total_steps"] == 24
    assert st["eta_seconds"] == 0
    assert st["val_loss"] == m["training_results"]["final_val_loss"]
    assert st["last_checkpoint"] == str(runs.b_dir / m["checkpoints"]["final_checkpoint"])
    assert st == {**tf.monitor_training("B", str(runs.runs_dir)), "updated_at": st["updated_at"]}
    raw = json.loads((runs.b_dir / "status.json").read_text())
    assert raw["status"] == "completed" and raw["step"] == 24
    table = run_cli("--status", runs.b_dir)  # by run dir, table mode
    assert table.returncode == 0, table.stderr[-2000:]
    assert "B" in table.stdout.split() and "completed" in table.stdout.split()
    with pytest.raises(json.JSONDecodeError):
        json.loads(table.stdout)


@pytest.fixture(scope="module")
def live_run(tiny_dir, tmp_path_factory):
    """A long run started in the background; --status asked from another process while it trains, then the
    run is killed with SIGKILL and --status asked again."""
    out = tmp_path_factory.mktemp("live")
    cfg = base_config(tiny_dir, out, FMT)
    cfg = set_key(cfg, "training.hyperparameters.num_epochs", 200)
    cfg = set_key(cfg, "logging.logging_steps", 1)
    cfg = set_key(cfg, "logging.tensorboard.enabled", False)
    cfg["evaluation"] = {"num_samples": 0, "baseline": "none"}
    path = write_config(out / "live.yaml", cfg)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--config", str(path), "--run-id", "live"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    status_file = out / "runs" / "live" / "status.json"
    seen = {}
    try:
        deadline = time.time() + 300  # generous: a loaded machine starts slowly
        while time.time() < deadline and proc.poll() is None:
            try:
                seen = json.loads(status_file.read_text())
            except (OSError, json.JSONDecodeError):
                seen = {}
            # the ETA is measured after the first few steps (Progress): asked before, --status rightly has none
            if seen.get("status") == "running" and (seen.get("step") or 0) > 0 and seen.get("eta_seconds"):
                break
            time.sleep(0.05)
        running = run_cli("--status", "live", "--output-dir", out / "runs", "--json")
        still_alive = proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = run_cli("--status", "live", "--output-dir", out / "runs", "--json")
    return SimpleNamespace(out=out, pid=proc.pid, seen=seen, running=running, still_alive=still_alive,
                           killed=killed)


@pytest.mark.slow
def test_status_of_running_run(live_run):
    assert live_run.seen.get("status") == "running", live_run.seen
    assert live_run.still_alive, "the background run ended before --status was asked"
    assert live_run.running.returncode == 0, live_run.running.stderr[-2000:]
    st = json.loads(live_run.running.stdout)
    assert st["run_id"] == "live" and st["status"] == "running"
    assert st["step"] > 0 and st["max_steps"] == 200 * 12
    assert st["eta_seconds"] is not None and st["eta_seconds"] > 0
    assert st["pid"] == live_run.pid
    assert "note" not in st


@pytest.mark.slow
def test_status_of_killed_run(live_run):
    assert live_run.killed.returncode == 0, live_run.killed.stderr[-2000:]
    st = json.loads(live_run.killed.stdout)
    assert st["run_id"] == "live" and st["status"] == "failed"
    assert "--resume-from latest" in st["note"] and "live" in st["note"]
    assert manifest_of(live_run.out / "runs" / "live")["status"] == "running"  # nobody wrote a final status


@pytest.mark.slow
def test_status_of_unknown_run_is_an_error(tmp_path):
    proc = run_cli("--status", "nope", "--output-dir", tmp_path, "--json")
    assert proc.returncode == 2
    assert json.loads(proc.stderr.strip().splitlines()[-1])["error"] == "CheckpointNotFound"


# --------------------------------------------------------------------------------------------------
# 5. Cost
# --------------------------------------------------------------------------------------------------

def test_compute_cost_arithmetic():
    cost = tf.CostConfig(gpu_hourly_usd=3.0, api_usd_per_million_tokens=10.0)
    c = tf.compute_cost(7200, 8, 4, 2_000_000, cost)
    assert c["gpu_hours"] == pytest.approx(16)  # 2 h x 8 GPUs
    assert c["cost_per_run_usd"] == pytest.approx(48)  # 16 GPU-h x $3
    assert c["cost_per_checkpoint_usd"] == pytest.approx(12)  # $48 / 4
    assert c["api_cost_same_tokens_usd"] == pytest.approx(20)  # 2M tokens x $10/M
    assert c["break_even_tokens"] == 4_800_000  # $48 / ($10 / 1M tokens)
    inp = c["inputs"]
    assert (inp["wall_seconds"], inp["gpu_count"], inp["checkpoints_saved"], inp["tokens"]) == (7200, 8, 4, 2_000_000)
    assert (inp["gpu_hourly_usd"], inp["api_usd_per_million_tokens"]) == (3.0, 10.0)
    assert inp["gpu_price_source"] == cost.gpu_price_source and inp["api_name"] == cost.api_name
    zero = tf.compute_cost(60, 0, 0, 0, cost)
    assert zero["gpu_hours"] == 0 and zero["cost_per_run_usd"] == 0 and zero["cost_per_checkpoint_usd"] is None


@pytest.mark.parametrize("price,api,expected", [(1.1, 0.5, 2_200_000), (4.2, 0.3, 14_000_000),
                                                (3.39, 0.5, 6_780_000)])
def test_break_even_tokens_is_exact_for_round_prices(price, api, expected):
    """One GPU hour at $price against $api per million tokens: price / api million tokens, exactly."""
    c = tf.compute_cost(3600, 1, 1, 0, tf.CostConfig(gpu_hourly_usd=price, api_usd_per_million_tokens=api))
    assert c["break_even_tokens"] == expected


@pytest.mark.slow
def test_manifest_cost_block_records_the_run(runs):
    m = manifest_of(runs.b_dir)
    c = m["cost"]
    assert c["inputs"]["gpu_count"] == 0  # compute.device: cpu
    assert c["gpu_hours"] == 0 and c["cost_per_run_usd"] == 0
    assert c["inputs"]["checkpoints_saved"] == 4  # eval saves at steps 6, 12, 18, 24
    assert c["inputs"]["tokens"] == m["metrics"]["tokens_seen"] > 0
    assert c["inputs"]["wall_seconds"] == pytest.approx(m["reproducibility"]["duration_seconds"], abs=1.0)
    assert m["performance"]["tokens_per_second"] > 0


# --------------------------------------------------------------------------------------------------
# 6. MLflow
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_mlflow_run_reads_back(runs):
    from mlflow.tracking import MlflowClient
    m = manifest_of(runs.b_dir)
    ml = m["metrics"]["mlflow"]
    assert ml["tracking_uri"] == f"sqlite:///{runs.runs_dir.resolve() / 'mlflow.db'}"
    assert ml["experiment"] == "analysis-test" and ml["run_id"]
    assert manifest_of(runs.a_dir)["metrics"]["mlflow"] is None
    client = MlflowClient(tracking_uri=ml["tracking_uri"])
    run = client.get_run(ml["run_id"])
    assert run.data.tags["run_id"] == "B"
    assert client.get_experiment(run.info.experiment_id).name == "analysis-test"
    assert float(run.data.params["training.hyperparameters.learning_rate"]) == 0.01
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(ml["run_id"], "train/loss")
    curve = read_curve(m["metrics"]["train_loss_curve"])
    assert sorted(h.step for h in history) == [s for s, _ in curve]
    by_step = {h.step: h.value for h in history}
    assert all(by_step[s] == pytest.approx(v) for s, v in curve)
    names = [a.path for a in client.list_artifacts(ml["run_id"])]
    assert "run_manifest.json" in names


# --------------------------------------------------------------------------------------------------
# 7. The best archive and the loss plot
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_best_archive(runs):
    from transformers import AutoModelForCausalLM
    m = manifest_of(runs.b_dir)
    best = runs.b_dir / "best"
    assert m["checkpoints"]["best_archive"] == "best"  # relative to the manifest's dir
    names = {p.name for p in best.iterdir()}
    assert {"model.safetensors", "config.json", "run_manifest.json", "SHA256SUMS"} <= names
    assert any(n.startswith("tokenizer") for n in names)
    assert (best / "SOURCE").read_text().strip() == Path(m["checkpoints"]["best_checkpoint"]).name
    sums = {}
    for line in (best / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name.strip()] = digest
    assert "model.safetensors" in sums and "config.json" in sums
    assert any(n.startswith("tokenizer") for n in sums)
    for name, digest in sums.items():
        assert hashlib.sha256((best / name).read_bytes()).hexdigest() == digest, name
    assert json.loads((best / "run_manifest.json").read_text()) == m
    model = AutoModelForCausalLM.from_pretrained(str(best))
    ref = AutoModelForCausalLM.from_pretrained(str(runs.b_dir / m["checkpoints"]["best_checkpoint"]))
    import torch
    # best/ holds the best checkpoint's fp32 weights rounded to the base's stored dtype (the tiny model: bf16)
    assert m["checkpoints"]["best_archive_dtype"] == "bfloat16" and ref.dtype == torch.float32
    archived, original = model.state_dict(), ref.state_dict()
    assert archived.keys() == original.keys() and len(archived) == len(original) > 0
    assert {t.dtype for t in archived.values()} == {torch.bfloat16}
    assert all(torch.equal(archived[k], original[k].to(archived[k].dtype)) for k in original), \
        [k for k in original if not torch.equal(archived[k], original[k].to(archived[k].dtype))]


@pytest.mark.slow
def test_loss_curves_plot(runs):
    m = manifest_of(runs.b_dir)
    png = Path(m["metrics"]["loss_curves_plot"])
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.parent == Path(m["metrics"]["train_loss_curve"]).parent == Path(m["metrics"]["val_loss_curve"]).parent
    assert png.stat().st_size > 1000


def test_plot_loss_curves_skips_nan_rows(tmp_path, monkeypatch):
    """A NaN or infinite row (the curve writer's "NaN" or "inf" for a diverged step) is left out, not drawn as a gap or dropped with its
    curve: the figure's lines hold exactly the finite rows, and the PNG equals the plot of the same curves written
    without the NaN rows."""
    import matplotlib.figure
    import numpy as np
    from matplotlib.image import imread
    figures = []
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):  # every way of saving (fig.savefig, plt.savefig) ends here
        figures.append(fig)
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    header = "step,epoch,value\n"
    train_rows = ["1,0.1,2.0", "2,0.2,NaN", "3,0.3,1.5", "4,0.4,1.2", "5,0.5,inf"]
    val_rows = ["0,0,2.5", "2,0.2,NaN", "4,0.4,1.7", "5,0.5,-inf"]
    (tmp_path / "nan").mkdir()
    (tmp_path / "clean").mkdir()
    for name, rows in (("train.csv", train_rows), ("val.csv", val_rows)):
        (tmp_path / "nan" / name).write_text(header + "".join(r + "\n" for r in rows))
        (tmp_path / "clean" / name).write_text(header + "".join(r + "\n" for r in rows if not r.endswith(("NaN", "inf"))))
    pngs = {d: tf.plot_loss_curves(tmp_path / d / "train.csv", tmp_path / d / "val.csv", None, tmp_path / f"{d}.png")
            for d in ("nan", "clean")}
    assert len(figures) == 2
    drawn = sorted((list(map(int, line.get_xdata())), list(map(float, line.get_ydata())))
                   for ax in figures[0].axes for line in ax.get_lines())
    assert drawn == [([0, 4], [2.5, 1.7]), ([1, 3, 4], [2.0, 1.5, 1.2])]
    nan_png, clean_png = imread(pngs["nan"]), imread(pngs["clean"])
    assert nan_png.shape == clean_png.shape and np.array_equal(nan_png, clean_png), \
        "loss_curves.png differs from the plot of the same curves without their NaN and inf rows"


# --------------------------------------------------------------------------------------------------
# 8. CLI tools: --list-checkpoints and --evaluate with --json
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_list_checkpoints_cli_json(runs):
    proc = run_cli("--list-checkpoints", "B", "--output-dir", runs.runs_dir, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = json.loads(proc.stdout)
    assert listed == tf.list_checkpoints("B", str(runs.runs_dir), details=True)
    m = manifest_of(runs.b_dir)
    assert [c["name"] for c in listed] == m["checkpoints"]["all_checkpoints"]
    assert [c["path"] for c in listed if c["is_best"]] == [str(runs.b_dir / m["checkpoints"]["best_checkpoint"])]
    assert [c["path"] for c in listed if c["is_latest"]] == [str(runs.b_dir / m["checkpoints"]["final_checkpoint"])]
    assert all(c["health"] == "ok" and c["run_id"] == "B" for c in listed)
    table = run_cli("--list-checkpoints", runs.b_dir)
    assert table.returncode == 0 and all(c["name"] in table.stdout for c in listed)


@pytest.mark.slow
def test_evaluate_cli_json(yes_checkpoint):
    ckpt, data, _ = yes_checkpoint
    proc = run_cli("--evaluate", ckpt, "--test-data", data, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    try:
        got = json.loads(proc.stdout)  # --json: stdout is exactly one JSON document, nothing else
    except json.JSONDecodeError:
        pytest.fail("--evaluate --json stdout is not pure JSON; it starts with: " + repr(proc.stdout[:300]))
    want = tf.evaluate_checkpoint(str(ckpt), str(data))
    assert set(got) == set(want)
    for key, value in want.items():
        if key.endswith("_time"):  # timing, not a metric
            continue
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-6), key
        else:
            assert got[key] == value, key


# --------------------------------------------------------------------------------------------------
# 9. Answer evaluation of the test split (issue 26): manifest, predictions file, trackers, baseline, model card
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_numeric_match_beside_test_perplexity(runs):
    """Console (one line with both), the final summary line, TensorBoard and MLflow (test/numeric_match)."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    m = manifest_of(runs.b_dir)
    ae, tr = m["test_results"]["answer_eval"], m["test_results"]
    line = next(x for x in runs.proc_b.stdout.splitlines() if "test_numeric_match" in x)
    assert line.index("test_perplexity") < line.index("test_numeric_match")
    assert f"test_numeric_match {ae['numeric_match']:.4f}" in line
    summary = next(x for x in runs.proc_b.stdout.splitlines() if "validation perplexity:" in x)
    assert f"test perplexity {tr['test_perplexity']:.3f}, numeric_match {ae['numeric_match']:.4f}" in summary
    tb_dir = Path(runs.b_dir / m["metrics"]["tensorboard_logs"]).resolve()
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    assert "test/numeric_match" in acc.Tags()["scalars"] and "test/perplexity" in acc.Tags()["scalars"]
    assert acc.Scalars("test/numeric_match")[-1].value == pytest.approx(ae["numeric_match"])
    ml = m["metrics"]["mlflow"]
    history = MlflowClient(tracking_uri=ml["tracking_uri"]).get_metric_history(ml["run_id"], "test/numeric_match")
    assert [h.value for h in history] == [pytest.approx(ae["numeric_match"])]


@pytest.mark.slow
def test_baseline_comparison_includes_numeric_match_and_regressions(runs, tmp_path):
    import shutil
    ma, mb = manifest_of(runs.a_dir), manifest_of(runs.b_dir)
    rows = {r["metric"]: r for r in mb["baseline_comparison"]["metrics"]}
    assert rows["numeric_match"]["baseline"] == ma["test_results"]["answer_eval"]["numeric_match"]
    assert rows["numeric_match"]["current"] == mb["test_results"]["answer_eval"]["numeric_match"]
    reg = mb["baseline_comparison"]["answer_regressions"]
    a_rows = {r["index"]: r for r in read_jsonl(runs.a_dir / "test_predictions.jsonl")}
    b_rows = read_jsonl(runs.b_dir / "test_predictions.jsonl")
    assert reg["compared"] == len(b_rows)

    def right(r):
        return r["numeric_match"] if r["numeric_match"] is not None else r["exact_match"]

    assert [r["index"] for r in reg["records"]] == [r["index"] for r in b_rows
                                                    if right(a_rows[r["index"]]) and not right(r)]
    # a baseline that answered every record right (its predictions are the references): every record B gets wrong
    # is a regression, listed with both answers
    perfect = tmp_path / "perfect"
    shutil.copytree(runs.a_dir, perfect)
    fixed = [{**r, "prediction": r["reference"], "prediction_numbers": r["reference_numbers"], "exact_match": True,
              "numeric_match": True if r["reference_numbers"] else None}
             for r in read_jsonl(perfect / "test_predictions.jsonl")]
    (perfect / "test_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fixed))
    cmp = tf.compare_to_baseline(mb, str(perfect), runs.b_dir)
    wrong = [r for r in b_rows if not right(r)]
    assert wrong, "the tiny model should get some test answer wrong"
    got = cmp["answer_regressions"]
    assert got["compared"] == len(b_rows) and got["count"] == len(wrong)
    first = got["records"][0]
    assert first["index"] == wrong[0]["index"] and first["baseline_prediction"] == wrong[0]["reference"]
    assert (first["prediction"], first["prediction_numbers"]) == (wrong[0]["prediction"],
                                                                  wrong[0]["prediction_numbers"])
    text = tf.format_comparison(cmp)
    assert f"test answers right in the baseline and wrong now: {len(wrong)} of {len(b_rows)}" in text
    assert f"  #{wrong[0]['index']}: reference" in text
    # without this run's predictions (an old manifest) there is nothing to pair
    assert tf.compare_to_baseline(mb, str(perfect))["answer_regressions"] is None


@pytest.mark.slow
def test_model_card_parses_and_matches_the_manifest(runs):
    from huggingface_hub import ModelCard
    m = manifest_of(runs.b_dir)
    card_path = runs.b_dir / "best" / "README.md"
    card = ModelCard.load(card_path)
    data = card.data
    assert data.base_model == m["base_model"] and data.library_name == "transformers"
    assert data.license == "other"  # the tiny base model states no license
    assert data.tags == list(dict.fromkeys([*m["tags"], "finance"]))
    assert data.datasets == [m["dataset"]["name"]]
    assert card.data.to_dict()["dataset_version"] == m["dataset"]["version"]
    results = {r.metric_name: r for r in data.eval_results}
    tr, ae = m["test_results"], m["test_results"]["answer_eval"]
    want = {"test_perplexity": tr["test_perplexity"], "test_loss": tr["test_loss"],
            "numeric_match": ae["numeric_match"], "numeric_f1": ae["numeric_f1"], "exact_match": ae["exact_match"]}
    assert {k: r.metric_value for k, r in results.items()} == want  # exactly, not approximately
    for r in data.eval_results:
        assert (r.task_type, r.dataset_name, r.dataset_split, r.dataset_revision) == (
            "text-generation", m["dataset"]["name"], "test", m["dataset"]["version"])
    text = card_path.read_text(encoding="utf-8")
    best_manifest = runs.b_dir / "best" / "run_manifest.json"
    sha = hashlib.sha256(best_manifest.read_bytes()).hexdigest()
    assert sha in text and m["run_id"] in text
    for split, info in m["reproducibility"]["data_files"].items():
        assert info["sha256"] in text and f"| {split} |" in text
    for phrase in ("Not tax advice", "Amounts must be checked", "Evaluation coverage", "from_pretrained(\"best\")",
                   "## Framework versions", f"transformers: {m['reproducibility']['versions']['transformers']}"):
        assert phrase in text, phrase
    # written from the manifest alone: the same manifest gives the same card
    assert tf.model_card(json.loads(best_manifest.read_text()), sha) == text
    sums = dict(line.split(maxsplit=1)[::-1]
                for line in (runs.b_dir / "best" / "SHA256SUMS").read_text().splitlines())
    assert sums["README.md"] == hashlib.sha256(text.encode()).hexdigest()


def test_comparison_names_each_difference_once():
    """data.dataset_version is both a config key and a data difference: named once."""
    cmp = {"baseline_run_id": "a", "metrics": [], "answer_regressions": None,
           "config_differences": [{"key": "data.dataset_version"}, {"key": "training.hyperparameters.learning_rate"}],
           "data_differences": [{"key": "data.dataset_version"}]}
    assert "differences from the baseline: data.dataset_version, learning_rate\n" in tf.format_comparison(cmp) + "\n"
