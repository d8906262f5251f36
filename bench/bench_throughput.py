#!/usr/bin/env python
"""Whole-run benchmark: this script against a plain Hugging Face Trainer (padded to max_seq_length and to the
longest record), TRL's SFTTrainer and this script with data.packing, on the same tiny model, data, epochs,
optimizer, schedule, weight decay, seed and labels (loss on the answer tokens only, for every contender).

    python scripts/make_demo_assets.py          # once: models/tiny-smollm3 and data/
    pip install -r bench/requirements.txt       # optional: the TRL contender (skipped with a note without it)
    HF_HUB_OFFLINE=1 python bench/bench_throughput.py                 # 3 rounds, ~20-40 min on 2 CPU cores
    HF_HUB_OFFLINE=1 python bench/bench_throughput.py --quick         # smoke check: 1 round, tiny settings

One timer for everyone: each contender is one whole process (start to exit: imports, tokenization, training,
evaluations, saves, and this script's dry run, test evaluation, samples and manifest), timed by this parent
with time.perf_counter. Rounds are interleaved: every round runs each contender once, in an order shuffled
with a fixed seed, so a load spike from other jobs on a shared machine hits contenders alike. Reported per
contender: median wall seconds and min-max over the rounds, and the ratio to plain/longest (median of the
per-round ratios, with their min-max: each ratio compares runs made minutes apart, the least noisy figure).

The test loss (NLL per answer token on the test split, of the checkpoint each contender ends with) is printed
beside the times: a contender is only faster if it is not worse. Plain and TRL report Trainer's (each batch's
mean, averaged over records), this script the mean over every answer token: close, not identical.

Contenders (the defaults mirror issue 16: 1,600 chat records, 2 epochs, max_seq_length 512, batch 16,
lr 1e-3, an evaluation every 25 steps):
  plain/max_len   the spec's "Key Training Loop": Trainer, records padded to max_seq_length
  plain/longest   the same, batches padded to their longest record (DataCollatorForSeq2Seq)
  trl/sft         TRL SFTTrainer, no packing, assistant_only_loss (pads to the longest record)
  ours/default    train_finance_ssc_model.py with the demo config's defaults (early stopping off, so every
                  contender trains the same epochs)
  ours/packing    the same with data.packing: true (fewer, fuller rows: fewer optimizer steps)
The plain and TRL runs share this script's training settings: fused AdamW where torch has it (else adamw_torch),
weight decay 0.01, cosine schedule, warmup 10% of the steps, grad clipping 1.0, an evaluation on the valid split
every --eval-steps steps with a checkpoint saved at each (as load_best_model_at_end requires; at most 3 kept),
the best loaded at the end and a test evaluation. This script does more on top (an evaluation before training,
the dry run, verified atomic checkpoints, samples, the manifest): it is timed with all of it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "tiny-smollm3"
DATA = {s: ROOT / "data" / s / f"finance_ssc_bir_v1_{s}.jsonl" for s in ("train", "valid", "test")}
CONTENDERS = ("plain/max_len", "plain/longest", "trl/sft", "ours/default", "ours/packing")
BASELINE = "plain/longest"


def fused_adamw() -> str:
    """The optim this script picks for `adamw` (optimizer_implementation): fused where torch has it."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return "adamw_torch_fused" if "cpu" in _get_fused_kernels_supported_devices() else "adamw_torch"
    except (ImportError, AttributeError):
        return "adamw_torch"


def hf_args(a, out: str, steps_per_epoch: int) -> dict:
    """TrainingArguments shared by the plain and TRL contenders: the same settings this script trains with."""
    return dict(output_dir=out, num_train_epochs=a.epochs, per_device_train_batch_size=a.batch_size,
                per_device_eval_batch_size=a.batch_size, learning_rate=a.lr, weight_decay=0.01,
                lr_scheduler_type="cosine", warmup_steps=max(1, round(0.1 * steps_per_epoch * a.epochs)),
                max_grad_norm=1.0, optim=fused_adamw(), logging_steps=10, eval_strategy="steps",
                eval_steps=a.eval_steps, save_strategy="steps", save_steps=a.eval_steps, save_total_limit=3,
                load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
                seed=a.seed, data_seed=a.seed, use_cpu=True, report_to="none", disable_tqdm=True,
                dataloader_num_workers=0)


def plain_child(a, work: Path, pad_to_max: bool) -> dict:
    """A plain Trainer run as the spec's loop writes it, with answer-only labels from the chat template's
    {% generation %} mask (the same tokens this script trains on)."""
    import math
    from datasets import load_dataset
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments, set_seed)
    set_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(MODEL)
    ds = load_dataset("json", data_files={s: str(work / f"{s}.jsonl") for s in ("train", "valid", "test")})

    def encode(rec):
        enc = tok.apply_chat_template(rec["messages"], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True, truncation=True,
                                      max_length=a.max_seq_length)
        ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
        labels = [t if m else -100 for t, m in zip(ids, mask)]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    ds = ds.map(encode, remove_columns=ds["train"].column_names)
    answer_tokens = sum(sum(1 for x in lab[1:] if x != -100) for lab in ds["train"]["labels"])
    collate = DataCollatorForSeq2Seq(tok, padding="max_length" if pad_to_max else "longest",
                                     max_length=a.max_seq_length if pad_to_max else None, label_pad_token_id=-100)
    model = AutoModelForCausalLM.from_pretrained(MODEL, attn_implementation="sdpa")
    args = TrainingArguments(**hf_args(a, str(work / "out"), math.ceil(len(ds["train"]) / a.batch_size)))
    trainer = Trainer(model=model, args=args, train_dataset=ds["train"], eval_dataset=ds["valid"],
                      data_collator=collate)
    trainer.train()
    test = trainer.evaluate(ds["test"], metric_key_prefix="test")
    trainer.save_model(str(work / "out" / "final"))
    return {"steps": trainer.state.global_step, "answer_tokens_per_epoch": answer_tokens,
            "test_loss": round(test["test_loss"], 4)}


def trl_child(a, work: Path) -> dict:
    import math
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer
    set_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(MODEL)
    ds = load_dataset("json", data_files={s: str(work / f"{s}.jsonl") for s in ("train", "valid", "test")})
    model = AutoModelForCausalLM.from_pretrained(MODEL, attn_implementation="sdpa")
    cfg = SFTConfig(**hf_args(a, str(work / "out"), math.ceil(len(ds["train"]) / a.batch_size)),
                    max_length=a.max_seq_length, packing=False, assistant_only_loss=True)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds["train"], eval_dataset=ds["valid"],
                         processing_class=tok)
    trainer.train()
    test = trainer.evaluate(trainer._prepare_dataset(ds["test"], tok, cfg, False, None, "test"),
                            metric_key_prefix="test")
    trainer.save_model(str(work / "out" / "final"))
    return {"steps": trainer.state.global_step, "test_loss": round(test["test_loss"], 4)}


def ours_config(a, work: Path, packing: bool) -> Path:
    import yaml
    cfg = yaml.safe_load((ROOT / "demo_config.yaml").read_text())
    steps = -(-a.records // a.batch_size) * a.epochs  # an upper bound under packing; the warmup rule only warns
    cfg["model"]["base_checkpoint"] = str(MODEL)
    cfg["data"].update(train_path=str(work / "train.jsonl"), valid_path=str(work / "valid.jsonl"),
                       test_path=str(work / "test.jsonl"), max_seq_length=a.max_seq_length, packing=packing)
    cfg["training"]["hyperparameters"].update(batch_size=a.batch_size, learning_rate=a.lr, num_epochs=a.epochs,
                                              warmup_steps=max(1, round(0.1 * steps)), weight_decay=0.01)
    cfg["training"]["seed"] = a.seed
    cfg["training"]["optimization"]["early_stopping_patience"] = None  # equal epochs for every contender
    cfg["logging"].update(output_dir=str(work / "runs"), logging_dir=str(work / "runs" / "logs"),
                          eval_steps=a.eval_steps)
    cfg["logging"]["tensorboard"]["log_dir"] = str(work / "runs" / "tensorboard")
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def ours_summary(work: Path, run_id: str) -> dict:
    m = json.loads((work / "runs" / run_id / "run_manifest.json").read_text())
    return {"steps": m["training_results"]["total_steps"],
            "test_loss": m["test_results"].get("test_loss") if isinstance(m.get("test_results"), dict) else None}


def run_one(name: str, a, work: Path) -> dict:
    """One contender in its own process, timed start to exit by this process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if name.startswith("ours/"):
        run_id = name.split("/")[1]
        cmd = [sys.executable, str(ROOT / "train_finance_ssc_model.py"), "--config",
               str(ours_config(a, work, run_id == "packing")), "--run-id", run_id]
    else:
        cmd = [sys.executable, __file__, "--child", name, *child_flags(a), "--work", str(work)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    info = ours_summary(work, name.split("/")[1]) if name.startswith("ours/") else \
        json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_seconds": wall, **info}


def child_flags(a) -> list[str]:
    return ["--records", str(a.records), "--epochs", str(a.epochs), "--max-seq-length", str(a.max_seq_length),
            "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--eval-steps", str(a.eval_steps),
            "--seed", str(a.seed)]


def write_data(a, work: Path) -> None:
    """The first --records train records, and --eval-records of valid and of test."""
    for split, n in (("train", a.records), ("valid", a.eval_records), ("test", a.eval_records)):
        lines = DATA[split].read_text().splitlines(keepends=True)
        if len(lines) < n:
            raise SystemExit(f"{DATA[split]} has {len(lines)} records, fewer than {n}")
        (work / f"{split}.jsonl").write_text("".join(lines[:n]))


def spread(xs: list[float], fmt: str) -> str:
    return f"{format(statistics.median(xs), fmt)} [{format(min(xs), fmt)}-{format(max(xs), fmt)}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--records", type=int, default=1600, help="train records (the demo's first N)")
    p.add_argument("--eval-records", type=int, default=300, help="valid and test records each")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset")
    p.add_argument("--quick", action="store_true", help="smoke check: 1 round, 160 records, 1 epoch")
    p.add_argument("--json", type=Path, help="also write every run's figures here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        out = trl_child(a, a.work) if a.child == "trl/sft" else plain_child(a, a.work, a.child == "plain/max_len")
        print(json.dumps(out))
        return
    if a.quick:
        a.rounds, a.records, a.eval_records, a.epochs, a.eval_steps = 1, 160, 32, 1, 5
    if not MODEL.is_dir():
        raise SystemExit("run `python scripts/make_demo_assets.py` first")
    names = [n for n in a.contenders.split(",") if n]
    unknown = set(names) - set(CONTENDERS)
    if unknown:
        raise SystemExit(f"unknown contenders {sorted(unknown)}; known: {', '.join(CONTENDERS)}")
    notes = []
    if "trl/sft" in names:
        import importlib.util
        if importlib.util.find_spec("trl") is None:
            names.remove("trl/sft")
            notes.append("trl/sft skipped: TRL is not installed (pip install -r bench/requirements.txt)")
    rng = random.Random(a.seed)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            order = names[:]
            rng.shuffle(order)
            for name in order:
                work = Path(tmp) / f"r{r}-{name.replace('/', '-')}"
                work.mkdir()
                write_data(a, work)
                res = run_one(name, a, work)
                res["round"] = r
                runs[name].append(res)
                print(f"round {r + 1}/{a.rounds} {name:<14} {res['wall_seconds']:7.1f} s  steps {res['steps']}",
                      flush=True)
    import torch
    import transformers
    print(f"\ntiny SmolLM3 ({MODEL.name}), {a.records} train records, {a.eval_records} valid and test, "
          f"{a.epochs:g} epochs, max_seq_length {a.max_seq_length}, batch {a.batch_size}, lr {a.lr:g}, "
          f"eval every {a.eval_steps} steps; {a.rounds} interleaved rounds; {os.cpu_count()} CPU cores; "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{'contender':<16}{'steps':>7}{'test loss':>11}  {'wall s, median [min-max]':<28}"
          f"{'vs ' + BASELINE + ', median [min-max]':<36}")
    for name in names:
        walls = [x["wall_seconds"] for x in runs[name]]
        losses = [x["test_loss"] for x in runs[name] if isinstance(x.get("test_loss"), (int, float))]
        loss = f"{statistics.median(losses):.4f}" if losses else "-"
        line = f"{name:<16}{runs[name][0]['steps']:>7}{loss:>11}  {spread(walls, '.1f'):<28}"
        if BASELINE in runs:
            ratios = [x["wall_seconds"] / b["wall_seconds"] for x, b in zip(runs[name], runs[BASELINE])]
            line += f"{spread(ratios, '.2f') + 'x':<36}"
        print(line)
    if BASELINE in runs and "ours/default" in runs:
        ratios = [x["wall_seconds"] / b["wall_seconds"] for x, b in zip(runs["ours/default"], runs[BASELINE])]
        print(f"ours/default vs {BASELINE}, whole run: {statistics.median(ratios) - 1:+.0%} "
              f"(rounds: {', '.join(f'{x - 1:+.0%}' for x in ratios)}; target <= -10%)")
    if "ours/packing" in runs and "ours/default" in runs:
        ratios = [x["wall_seconds"] / b["wall_seconds"] for x, b in zip(runs["ours/packing"], runs["ours/default"])]
        print(f"ours/packing vs ours/default, whole run: {statistics.median(ratios) - 1:+.0%} "
              f"(rounds: {', '.join(f'{x - 1:+.0%}' for x in ratios)})")
    for n in notes:
        print(n)
    if a.json:
        a.json.write_text(json.dumps({"settings": vars(a) | {"json": str(a.json), "work": None}, "runs": runs},
                                     indent=1, default=str))


if __name__ == "__main__":
    main()
