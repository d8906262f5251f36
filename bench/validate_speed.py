#!/usr/bin/env python
"""How fast does a config error come back, and does it come back before the heavy imports?

Runs, cold, in fresh subprocesses (no data, model or GPU needed):

    python train_finance_ssc_model.py --config training_config.yaml --validate-only \
        --set training.hyperparameters.learning_rat=1

N times (default 5) and prints the min and median wall time. Then checks two ways that torch,
transformers and datasets were NOT imported before the error was reported:

  1. `python -X importtime` on the same CLI command: no import line names one of them;
  2. a subprocess that imports the script as a module, calls `load_training_config` on the same typo
     (expecting TrainerError) and reports which of them are in sys.modules.

Usage, from the repository root:  python bench/validate_speed.py [--n 5] [--config training_config.yaml]
Exit status 0 when every run gave the expected error and no heavy module was imported, else 1.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_finance_ssc_model.py"
TYPO = "training.hyperparameters.learning_rat=1"
TYPO_FIELD = "training.hyperparameters.learning_rat"
HEAVY = ("torch", "transformers", "datasets")


def cli_command(config: Path, *python_flags: str) -> list[str]:
    return [sys.executable, *python_flags, str(SCRIPT), "--config", str(config), "--validate-only", "--set", TYPO]


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def last_json(stderr: str) -> dict:
    return json.loads(stderr.strip().splitlines()[-1])


def check_typo_error(proc: subprocess.CompletedProcess) -> str | None:
    """None when the run ended as the contract says (exit 2, InvalidConfig naming the typo), else why not."""
    try:
        payload = last_json(proc.stderr)
    except (ValueError, IndexError):
        return f"last stderr line is not JSON: {proc.stderr[-300:]!r}"
    if proc.returncode != 2 or payload.get("error") != "InvalidConfig" \
            or payload.get("details", {}).get("field") != TYPO_FIELD:
        return f"exit {proc.returncode}, payload {json.dumps(payload)[:300]}"
    return None


def time_cli(config: Path, n: int) -> tuple[list[float], list[str]]:
    times, problems = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        proc = subprocess.run(cli_command(config), capture_output=True, text=True, env=env(), cwd=ROOT)
        times.append(time.perf_counter() - t0)
        why = check_typo_error(proc)
        if why:
            problems.append(why)
    return times, problems


def heavy_in_importtime(config: Path) -> tuple[dict, str | None]:
    """Modules of HEAVY (or their submodules) that appear in `-X importtime` output of the CLI run."""
    proc = subprocess.run(cli_command(config, "-X", "importtime"), capture_output=True, text=True, env=env(),
                          cwd=ROOT)
    imported = set()
    n_modules = 0
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        n_modules += 1
        name = line.rsplit("|", 1)[-1].strip()
        imported.add(name.split(".")[0])
    found = {m: m in imported for m in HEAVY}
    found["_modules_imported"] = n_modules
    return found, check_typo_error(proc)


PROBE = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("train_finance_ssc_model", sys.argv[1])
tf = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = tf
spec.loader.exec_module(tf)
try:
    tf.load_training_config(sys.argv[2], [sys.argv[3]])
    outcome = "no error"
except tf.TrainerError as exc:
    outcome = f"{exc.kind} {exc.details.get('field')}"
print(json.dumps({"outcome": outcome, **{m: m in sys.modules for m in sys.argv[4:]}}))
"""


def heavy_in_sys_modules(config: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, str(SCRIPT), str(config), TYPO, *HEAVY],
                          capture_output=True, text=True, env=env(), cwd=ROOT)
    if proc.returncode != 0:
        return {"outcome": f"probe failed: {proc.stderr[-300:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5, help="cold CLI runs to time (default 5)")
    ap.add_argument("--config", type=Path, default=ROOT / "training_config.yaml")
    args = ap.parse_args(argv)
    ok = True

    times, problems = time_cli(args.config, args.n)
    print(f"cold `--validate-only` with a typo ({TYPO}), {args.n} runs:")
    print(f"  min {min(times):.3f} s   median {statistics.median(times):.3f} s   max {max(times):.3f} s")
    if problems:
        ok = False
        print(f"  UNEXPECTED result in {len(problems)} run(s): {problems[0]}")
    else:
        print(f"  every run: exit 2, InvalidConfig field={TYPO_FIELD}")

    found, why = heavy_in_importtime(args.config)
    n_modules = found.pop("_modules_imported")
    heavy = [m for m, hit in found.items() if hit]
    print(f"-X importtime of the CLI run ({n_modules} modules imported): "
          + ("none of " + ", ".join(HEAVY) + " imported" if not heavy else f"IMPORTED {', '.join(heavy)}"))
    ok &= not heavy and why is None and n_modules > 0
    if why:
        print(f"  UNEXPECTED result: {why}")

    probe = heavy_in_sys_modules(args.config)
    outcome = probe.pop("outcome")
    heavy = [m for m, hit in probe.items() if hit]
    print(f"in-process load_training_config -> {outcome}; sys.modules: "
          + ", ".join(f"{m}={'yes' if hit else 'no'}" for m, hit in probe.items()))
    ok &= not heavy and outcome == f"InvalidConfig {TYPO_FIELD}"

    print("RESULT:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
