#!/usr/bin/env python
"""Throughput benchmark: this trainer against a plain Hugging Face Trainer loop, on the same tiny model,
data, number of optimizer steps and seed. Prints real (non-padding) tokens/s and the ratios; times nothing
in the test suite (these machines are shared and noisy: compare ratios from one run, not absolute times).

    python scripts/make_demo_assets.py          # once: models/tiny-smollm3 and data/
    HF_HUB_OFFLINE=1 python bench/bench_throughput.py [--steps 60] [--batch-size 16] [--max-seq-length 1024]

Runs, each in its own process:
  plain/max_len   the spec's "Key Training Loop": Trainer on chat-rendered records padded to max_seq_length
  plain/longest   the same loop, batches padded to their longest record
  ours/default    train_finance_ssc_model.py, defaults (pads to the longest record, guards, verified saves)
  ours/packing    the same with data.packing: true
Targets (issue 6): ours/default within 5% of plain/longest wall time; ours/packing >= 2x the real tokens/s
of plain/max_len.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "tiny-smollm3"
DATA = {s: ROOT / "data" / s / f"finance_ssc_bir_v1_{s}.jsonl" for s in ("train", "valid", "test")}


def plain_loop(steps: int, batch_size: int, max_len: int, pad_to_max: bool, seed: int) -> dict:
    """The spec's simplified loop: load_dataset, AutoModel/AutoTokenizer, TrainingArguments, Trainer.train()."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed
    set_seed(seed)
    tok = AutoTokenizer.from_pretrained(MODEL)
    ds = load_dataset("json", data_files={"train": str(DATA["train"])})["train"]

    def encode(rec):
        text = tok.apply_chat_template(rec["messages"], tokenize=False)
        enc = tok(text, add_special_tokens=False, truncation=True, max_length=max_len,
                  padding="max_length" if pad_to_max else False)
        enc["labels"] = [t if m else -100 for t, m in zip(enc["input_ids"], enc["attention_mask"])]
        return enc

    ds = ds.map(encode, remove_columns=ds.column_names)
    real = sum(sum(m) for m in ds["attention_mask"]) / len(ds)

    def collate(feats):
        width = max(len(f["input_ids"]) for f in feats)
        out = {k: [] for k in ("input_ids", "attention_mask", "labels")}
        for f in feats:
            pad = width - len(f["input_ids"])
            out["input_ids"].append(f["input_ids"] + [tok.pad_token_id] * pad)
            out["attention_mask"].append(f["attention_mask"] + [0] * pad)
            out["labels"].append(f["labels"] + [-100] * pad)
        return {k: torch.tensor(v) for k, v in out.items()}

    model = AutoModelForCausalLM.from_pretrained(MODEL, attn_implementation="sdpa")
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=batch_size, max_steps=steps,
                                 learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=steps // 10,
                                 logging_steps=10, save_strategy="no", report_to="none", use_cpu=True,
                                 seed=seed, disable_tqdm=True, include_num_input_tokens_seen="non_padding")
        trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    return {"wall_seconds": wall, "real_tokens": trainer.state.num_input_tokens_seen,
            "mean_real_tokens_per_record": real}


def ours(steps: int, batch_size: int, max_len: int, packing: bool, seed: int, work: Path) -> dict:
    import yaml
    n_train = sum(1 for _ in DATA["train"].open())
    valid = work / "valid.jsonl"  # a tiny valid split: the start/end evaluations are not what we measure
    valid.write_text("".join(DATA["valid"].open().readlines()[:16]))
    per_epoch = None if packing else n_train / batch_size
    cfg = yaml.safe_load((ROOT / "demo_config.yaml").read_text())
    cfg["model"]["base_checkpoint"] = str(MODEL)
    cfg["data"].update(train_path=str(DATA["train"]), valid_path=str(valid), test_path=str(valid),
                       max_seq_length=max_len, packing=packing)
    cfg["training"]["hyperparameters"].update(batch_size=batch_size, warmup_steps=steps // 10,
                                              num_epochs=steps / per_epoch if per_epoch else 1.0)
    cfg["training"]["seed"] = seed
    cfg["training"]["optimization"]["early_stopping_patience"] = None
    cfg["logging"].update(output_dir=str(work / "runs"), logging_dir=str(work / "logs"), eval_steps=10**6,
                          tensorboard={"enabled": False}, mlflow={"enabled": False})
    cfg["evaluation"] = {"num_samples": 0}
    if packing:  # packed rows are far fewer than records: one epoch of them (tokens/s is what is compared)
        cfg["training"]["hyperparameters"]["num_epochs"] = 1.0
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_id = "packing" if packing else "default"
    proc = subprocess.run([sys.executable, str(ROOT / "train_finance_ssc_model.py"), "--config", str(path),
                           "--run-id", run_id], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    m = json.loads((work / "runs" / run_id / "run_manifest.json").read_text())
    perf = m["performance"]
    return {"wall_seconds": perf["train_runtime_seconds"], "real_tokens": perf["tokens_trained_this_process"],
            "steps": m["training_results"]["total_steps"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-seq-length", type=int, default=1024)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:  # child process: one plain run
        print(json.dumps(plain_loop(a.steps, a.batch_size, a.max_seq_length, a.one == "max_len", a.seed)))
        return
    if not MODEL.is_dir():
        raise SystemExit("run `python scripts/make_demo_assets.py` first")
    results = {}
    for mode in ("max_len", "longest"):
        out = subprocess.run([sys.executable, __file__, "--one", mode, "--steps", str(a.steps), "--batch-size",
                              str(a.batch_size), "--max-seq-length", str(a.max_seq_length), "--seed", str(a.seed)],
                             capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if out.returncode != 0:
            raise SystemExit(out.stderr[-2000:])
        results[f"plain/{mode}"] = json.loads(out.stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as tmp:
        for packing in (False, True):
            work = Path(tmp) / ("packing" if packing else "default")
            work.mkdir()
            results["ours/packing" if packing else "ours/default"] = ours(
                a.steps, a.batch_size, a.max_seq_length, packing, a.seed, work)
    print(f"tiny SmolLM3, batch {a.batch_size}, max_seq_length {a.max_seq_length}, {a.steps} steps "
          f"(packing: one epoch of packed rows), {os.cpu_count()} CPU cores")
    print(f"{'run':<16}{'steps':>7}{'wall s':>10}{'real tokens':>14}{'real tok/s':>12}")
    for name, r in results.items():
        r["tokens_per_second"] = r["real_tokens"] / r["wall_seconds"]
        print(f"{name:<16}{r.get('steps', a.steps):>7}{r['wall_seconds']:>10.2f}{r['real_tokens']:>14,}"
              f"{r['tokens_per_second']:>12,.0f}")
    overhead = results["ours/default"]["wall_seconds"] / results["plain/longest"]["wall_seconds"] - 1
    speedup = results["ours/packing"]["tokens_per_second"] / results["plain/max_len"]["tokens_per_second"]
    print(f"overhead of ours/default over plain/longest (wall, same steps): {overhead:+.1%} (target <= +5%)")
    print(f"real tokens/s, ours/packing over plain/max_len: {speedup:.2f}x (target >= 2x)")
    print(f"real tokens/s, ours/default over plain/max_len: "
          f"{results['ours/default']['tokens_per_second'] / results['plain/max_len']['tokens_per_second']:.2f}x")


if __name__ == "__main__":
    main()
