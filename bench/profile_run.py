#!/usr/bin/env python
"""Where one run of train_finance_ssc_model.py spends its time: the run under cProfile, summed by phase.

    HF_HUB_OFFLINE=1 python bench/profile_run.py --config demo_config.yaml [--out /tmp/prof] [-- --set k=v ...]

The run writes under --out (logging.output_dir is redirected there), the raw profile to --out/profile.pstats. Prints one line per phase: the cumulative
seconds of the function that does it (phases nest: "training steps" holds forward and backward, "optimizer step"
is inside the training loop too) and its share of the whole process. cProfile slows Python-heavy code more than
torch kernels, and a loaded machine stretches everything: read the shares, not the seconds.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]

# phase -> (file part, function name) whose cumulative time is the phase's
PHASES = [
    ("preflight (validate_config: data scan, chat template, packing plan, memory/disk)", ("train_finance_ssc_model", "validate_config")),
    ("load tokenizer, tokenize, load model (_prepare)", ("train_finance_ssc_model", "_prepare")),
    ("dry run before training", ("train_finance_ssc_model", "dry_run_before_training")),
    ("Trainer.train (all of training, evaluations and saves inside it)", ("transformers/trainer.py", "train")),
    ("  training steps (forward + backward)", ("transformers/trainer.py", "training_step")),
    ("  optimizer step", ("accelerate/optimizer.py", "step")),
    ("  evaluations (before, during, after training; test)", ("train_finance_ssc_model", "evaluate")),
    ("  checkpoint saves + verification", ("train_finance_ssc_model", "save_checkpoint")),
    ("post-training analysis (samples, plot, baseline, archive)", ("train_finance_ssc_model", "analyse_run")),
    ("  samples (greedy generation)", ("train_finance_ssc_model", "generate_samples")),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "demo_config.yaml"))
    p.add_argument("--out", type=Path, default=Path("/tmp/finance-profile"))
    p.add_argument("--run-id", default="profile")
    p.add_argument("extra", nargs="*", help="more CLI arguments after --")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    t_import = time.perf_counter()
    import train_finance_ssc_model as tf
    argv = ["--config", a.config, "--run-id", a.run_id, "--force",
            "--set", f"logging.output_dir={a.out}/runs", "--set", f"logging.logging_dir={a.out}/runs/logs",
            "--set", f"logging.tensorboard.log_dir={a.out}/runs/tb", *a.extra]
    prof = cProfile.Profile()
    prof.enable()
    rc = tf.main(argv)
    prof.disable()
    wall = time.perf_counter() - T0
    prof.dump_stats(str(a.out / "profile.pstats"))  # for pstats / snakeviz
    stats = pstats.Stats(prof).stats
    print(f"\nexit {rc}; whole process {wall:.1f} s (interpreter start to here; script import "
          f"{t_import - T0:.2f} s)")
    print(f"{'phase':<84}{'seconds':>9}{'share':>8}")
    for label, (where, name) in PHASES:
        cum = max((v[3] for (f, _, n), v in stats.items() if n == name and where in f), default=0.0)
        print(f"{label:<84}{cum:>9.1f}{cum / wall:>8.1%}")


if __name__ == "__main__":
    main()
