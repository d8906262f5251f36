#!/usr/bin/env python
"""What does answer evaluation cost next to what a run already spent after training?

Issue 26's target: answering and scoring the whole test split (evaluation.answer_eval) costs at most three times
the test-loss evaluation plus the evaluation.num_samples greedy samples. On one trained checkpoint, in one
process, with the functions the run itself calls, it times

  1. the test loss: every test record through the run's Trainer class and compute_metrics, at the config's
     batch_size (post_training_analysis evaluates the test split that way);
  2. the samples: generate_samples on the first num_samples test prompts (SAMPLE_BATCH rows per call);
  3. answer evaluation: answer_evaluation on every test record (ANSWER_BATCH rows per generate call, left
     padding, KV cache, each row stopped at its end-of-turn token), scored by score_answers;

each --repeat times (the median is reported), prints the figures and the ratio 3 / (1 + 2), and exits 1 when the
ratio is above --target. The checkpoint is --checkpoint, or else the demo is trained first (demo_config.yaml;
its model and data are built with scripts/make_demo_assets.py when missing), and that run's own single
measurements (manifest `performance`) are printed beside.

Usage, from the repository root:
    HF_HUB_OFFLINE=1 python bench/bench_answer_eval.py                 # trains the demo (~1 min on 2 cores)
    HF_HUB_OFFLINE=1 python bench/bench_answer_eval.py --checkpoint runs/<run_id>/best --repeat 5
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
sys.path.insert(0, str(ROOT))


def train_demo(config: Path, out_dir: Path) -> tuple[Path, dict]:
    """Train the demo config into out_dir; (its best checkpoint, its manifest)."""
    if not (ROOT / "models" / "tiny-smollm3" / "config.json").is_file() \
            or not (ROOT / "data" / "test" / "finance_ssc_bir_v1_test.jsonl").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_assets.py")], check=True, cwd=ROOT)
    cmd = [sys.executable, str(ROOT / "train_finance_ssc_model.py"), "--config", str(config), "--skip-dry-run",
           "--output-dir", str(out_dir), "--run-id", "bench_answer_eval",
           "--set", f"logging.logging_dir={out_dir / 'logs'}",
           "--set", f"logging.tensorboard.log_dir={out_dir / 'tb'}"]
    print("training the demo:", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        sys.exit(f"demo training failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    run_dir = out_dir / "bench_answer_eval"
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    return run_dir / manifest["checkpoints"]["best_checkpoint"], manifest


def timed(fn, repeat: int) -> tuple[float, object]:
    """(median seconds over `repeat` calls, the last result)."""
    seconds, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "demo_config.yaml"),
                    help="the config whose test split, batch_size, num_samples and max_new_tokens are used")
    ap.add_argument("--checkpoint", help="a trained checkpoint dir (default: train the config first)")
    ap.add_argument("--repeat", type=int, default=3, help="timings per phase; the median is reported")
    ap.add_argument("--target", type=float, default=3.0, help="the highest acceptable ratio")
    ap.add_argument("--rows", type=int, help="rows per generate call in answer evaluation (default ANSWER_BATCH)")
    args = ap.parse_args(argv)

    import train_finance_ssc_model as tf
    from transformers import AutoTokenizer
    config = tf.load_training_config(args.config)
    if args.rows:
        tf.ANSWER_BATCH = args.rows  # answer_evaluation reads the module constant at each call
    manifest = None
    with tempfile.TemporaryDirectory(prefix="bench-answer-eval-") as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else None
        if ckpt is None:
            ckpt, manifest = train_demo(Path(args.config).resolve(), Path(tmp))
        model = tf.load_checkpoint(str(ckpt))
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
        test_path = tf.data_path(config, "test_path")
        info, problems = tf.scan_jsonl(test_path, "test", config.data.format, "config")
        if problems:
            sys.exit(json.dumps(problems)[:2000])
        records = tf._read_jsonl(test_path)
        ev, shape = config.evaluation, info["shape"]
        loss_s, (metrics, n_loss) = timed(lambda: tf.evaluate_loss_metrics(
            model, tokenizer, records, shape, config.data.max_seq_length,
            config.training.hyperparameters.batch_size), args.repeat)
        samples_s, _ = timed(lambda: tf.generate_samples(model, tokenizer, records[:ev.num_samples], shape,
                                                         ev.max_new_tokens, config), args.repeat)
        answer_s, (summary, _) = timed(lambda: tf.answer_evaluation(model, tokenizer, records, shape,
                                                                    ev.max_new_tokens, config), args.repeat)
    ratio = answer_s / (loss_s + samples_s)
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"checkpoint {ckpt} ({'trained here' if manifest else 'given'}); test split {test_path.name}: "
          f"{len(records)} records ({shape}); max_new_tokens {ev.max_new_tokens}; OMP_NUM_THREADS {threads}; "
          f"median of {args.repeat}")
    print(f"  test loss ({n_loss} records, batch {config.training.hyperparameters.batch_size}):  {loss_s:8.3f} s"
          f"  (test_perplexity {metrics['test_perplexity']:.3f})")
    print(f"  samples ({ev.num_samples} prompts, {tf.SAMPLE_BATCH} rows per call):       {samples_s:8.3f} s")
    print(f"  answer evaluation ({summary['records']} records, up to {tf.ANSWER_BATCH} rows per call): "
          f"{answer_s:8.3f} s  (numeric_match {tf.format_value('numeric_match', summary['numeric_match'])}, "
          f"numeric_f1 {tf.format_value('numeric_f1', summary['numeric_f1'])})")
    print(f"  answer evaluation / (test loss + samples) = {ratio:.2f} (target <= {args.target:g})")
    if manifest:
        perf = manifest["performance"]
        print(f"  inside the run (single measurements): test loss {perf.get('test_eval_seconds')} s, samples "
              f"{perf.get('samples_seconds')} s, answer evaluation {perf.get('answer_eval_seconds')} s, ratio "
              f"{perf.get('answer_eval_over_test_eval_and_samples')}")
    return 0 if ratio <= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
