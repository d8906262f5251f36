#!/usr/bin/env python
"""Tokenizing a large train split: one process against a pool of processes (datasets.map's num_proc).

Writes N synthetic chat records (scripts/make_demo_assets.py, default 200,000, ~115 MB) and tokenizes them with the
demo tokenizer (models/tiny-smollm3: run `python scripts/make_demo_assets.py` first) through the script's own
`_tokenize_split`, once per process count, each in a fresh subprocess with an empty datasets cache (so every
measurement tokenizes for real), rounds interleaved. Also times the statistics load_splits reads from the result
(truncated records, lengths, answer tokens). Prints one row per measurement, the load average beside it (the
machine may be shared), and the median per process count.

Usage, from the repository root:
    HF_HUB_OFFLINE=1 python bench/tokenize_speed.py [--records 200000] [--procs 1,2] [--rounds 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import train_finance_ssc_model as t
procs = int(sys.argv[3])
t.tokenize_processes = lambda n: procs if procs > 1 else None  # the count under test, whatever the split's size
config = t.load_training_config(sys.argv[2])
tokenizer = t.load_tokenizer(config)
raw = t._raw_splits(config)
start = time.perf_counter()
tok = t._tokenize_split(raw["train"], config, tokenizer, "messages", "train")
tokenize_s = time.perf_counter() - start
import pyarrow.compute as pc
start = time.perf_counter()
lengths = pc.list_value_length(t.column(tok, "input_ids")).to_pylist()
answer = pc.sum(t.column(tok, "answer_tokens")).as_py()
stats_s = time.perf_counter() - start
print(json.dumps({"records": len(tok), "tokens": sum(lengths), "answer_tokens": answer,
                  "tokenize_s": round(tokenize_s, 2), "stats_s": round(stats_s, 2)}))
"""


def write_data(out: Path, records: int) -> Path:
    import make_demo_assets as assets
    import yaml
    for split, n, seed in (("train", records, 11), ("valid", 300, 12), ("test", 300, 13)):
        assets.write_jsonl(out / f"{split}.jsonl", assets.generate_records(seed=seed, n=n))
    cfg = yaml.safe_load((ROOT / "demo_config.yaml").read_text())
    cfg["model"]["base_checkpoint"] = str(ROOT / "models" / "tiny-smollm3")
    cfg["data"].update({f"{s}_path": str(out / f"{s}.jsonl") for s in ("train", "valid", "test")})
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def measure(config: Path, procs: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="tokbench-cache-") as cache:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": cache,
               "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
        load = os.getloadavg()[0]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(config), str(procs)], env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"num_proc {procs} failed:\n{proc.stderr[-3000:]}")
    return {"procs": procs, "load_1min": round(load, 2), "wall_s": round(wall, 2),
            **json.loads(proc.stdout.strip().splitlines()[-1])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--procs", default="1,2", help="process counts to compare (1 = datasets.map in this process)")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args(argv)
    if not (ROOT / "models" / "tiny-smollm3" / "tokenizer.json").is_file():
        raise SystemExit("run `python scripts/make_demo_assets.py` first (the demo tokenizer)")
    counts = [int(x) for x in args.procs.split(",")]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{args.records:,} chat records, demo tokenizer, {cores} cores visible, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tokbench-data-") as tmp:
        config = write_data(Path(tmp), args.records)
        print(f"data: {(Path(tmp) / 'train.jsonl').stat().st_size / 2**20:.1f} MiB")
        print("round  num_proc  load(1m)  tokenize s  records/s  stats s  subprocess wall s")
        for r in range(args.rounds):
            for procs in (counts if r % 2 == 0 else counts[::-1]):
                row = measure(config, procs)
                rows.append(row)
                print(f"{r + 1:>5}  {procs:>8}  {row['load_1min']:>8}  {row['tokenize_s']:>10}  "
                      f"{row['records'] / row['tokenize_s']:>9.0f}  {row['stats_s']:>7}  {row['wall_s']:>17}",
                      flush=True)
    print("median tokenize seconds: " + ", ".join(
        f"num_proc {n}: {statistics.median(r['tokenize_s'] for r in rows if r['procs'] == n):.1f}" for n in counts))
    tokens = {r["tokens"] for r in rows}
    print("same tokens from every process count: " + ("yes" if len(tokens) == 1 else f"NO {sorted(tokens)}"))
    return 0 if len(tokens) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
