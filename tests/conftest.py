"""Shared fixtures: a tiny SmolLM3 + tokenizer and seeded finance data, built once per test session."""
from __future__ import annotations

import atexit
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_finance_ssc_model.py"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest.ini runs one worker per core: each worker's training runs get one thread, so two workers share
    # 2 cores instead of fighting over them (the tiny runs are Python-bound). An explicit setting wins; the suite
    # also passes serially with the default thread count (`-n 0`).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Training runs register themselves in $XDG_CACHE_HOME/finance_smollm3/runs.json: keep the suite out of the real
# home (HF_HOME stays where XDG_CACHE_HOME put it, so the Hugging Face cache does not move).
os.environ.setdefault("HF_HOME", str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"))
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="finance-trainer-test-cache-")

import make_demo_assets as assets  # noqa: E402

# Written into os.environ by libraries a test imports in-process (sklearn sets KMP_DUPLICATE_LIB_OK, torch's inductor
# TORCHINDUCTOR_CACHE_DIR). A user's shell has neither, and as keys read at import time (forkserver.py) they would
# send every later CLI run of the worker to a fresh interpreter, ~8 s of imports each: run_cli leaves them out
# unless the suite started with them.
LIBRARY_WRITTEN_ENV = {k for k in ("KMP_DUPLICATE_LIB_OK", "TORCHINDUCTOR_CACHE_DIR") if k not in os.environ}

N_TRAIN, N_VALID, N_TEST = 96, 24, 16


TINY_VOCAB = 512  # the SmolLM3 template's metadata block needs the merges: records stay under max_seq_length 384
TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                  max_position_embeddings=512, seed=0)


def _tiny_texts() -> list[str]:
    records = assets.generate_records(seed=7, n=N_TRAIN + N_VALID + N_TEST, fmt="messages")
    return [t for r in records for t in assets.record_texts(r)]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Tiny SmolLM3-faithful model (tens of thousands of parameters: bf16 storage, SmolLM3's chat template with its
    date and reasoning modes, <|im_end|> as EOS, tied embeddings, a NoPE layer), its tokenizer, and data in all four
    record shapes."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = assets.build_tokenizer(_tiny_texts(), vocab_size=TINY_VOCAB)
    assets.build_tiny_model(tokenizer, root / "model", **TINY_MODEL)
    for fmt in ("messages", "prompt_completion", "instruction", "text"):
        recs = assets.generate_records(seed=7, n=N_TRAIN + N_VALID + N_TEST, fmt=fmt)
        assets.write_jsonl(root / fmt / "train.jsonl", recs[:N_TRAIN])
        assets.write_jsonl(root / fmt / "valid.jsonl", recs[N_TRAIN:N_TRAIN + N_VALID])
        assets.write_jsonl(root / fmt / "test.jsonl", recs[N_TRAIN + N_VALID:])
    return root


@pytest.fixture(scope="session")
def chatml_model(tmp_path_factory) -> Path:
    """The same tiny model in fp32 with a plain ChatML template (no date, no reasoning mode) and <|endoftext|> as
    EOS: for tests about a plain template or an fp32-stored checkpoint."""
    out = tmp_path_factory.mktemp("chatml") / "model"
    tokenizer = assets.build_tokenizer(_tiny_texts(), vocab_size=TINY_VOCAB, template="chatml")
    assets.build_tiny_model(tokenizer, out, dtype="float32", **TINY_MODEL)
    return out


def base_config(tiny_dir: Path, out: Path, fmt: str = "messages") -> dict:
    """A config that trains the tiny model for a few steps on CPU."""
    return {
        "model": {"base_checkpoint": str(tiny_dir / "model"), "architecture": "decoder-only-transformer"},
        "data": {"train_path": str(tiny_dir / fmt / "train.jsonl"), "valid_path": str(tiny_dir / fmt / "valid.jsonl"),
                 "test_path": str(tiny_dir / fmt / "test.jsonl"), "max_seq_length": 384,
                 "dataset_name": "finance_ssc_bir_v1", "dataset_version": "test",
                 # the answers hold no reasoning: SmolLM3's /no_think mode, as demo_config.yaml
                 "chat_template_kwargs": {"enable_thinking": False}},
        "training": {
            "hyperparameters": {"learning_rate": 1.0e-2, "batch_size": 8, "gradient_accumulation_steps": 1,
                                "num_epochs": 2, "warmup_steps": 2, "weight_decay": 0.0, "max_grad_norm": 1.0,
                                "fp16": False, "bf16": False},
            "optimization": {"optimizer": "adamw", "lr_scheduler": "cosine", "early_stopping_patience": None,
                             "early_stopping_metric": "val_loss"},
            "checkpointing": {"save_strategy": "epoch", "save_total_limit": 3, "load_best_at_end": True,
                              "metric_for_best_model": "val_perplexity"},
            "seed": 42,
        },
        "logging": {"output_dir": str(out / "runs"), "logging_dir": str(out / "logs"), "logging_steps": 2,
                    "eval_steps": 6, "save_steps": 6,
                    "wandb": {"enabled": False, "project": "finance-smollm3", "tags": ["test"]},
                    "tensorboard": {"enabled": True, "log_dir": str(out / "tb")}},
        "compute": {"device": "cpu", "num_gpus": 1, "distributed_backend": "gloo", "mixed_precision": "no"},
        # generation is the slowest part of a tiny run (one forward per token): two short samples suffice
        "evaluation": {"num_samples": 2, "max_new_tokens": 16,
                       # no automatic baseline (the latest completed run of the dataset): runs of the suite share
                       # dataset names and a run index; a test that compares asks for its baseline by name
                       "baseline": "none"},
    }


def write_config(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def set_key(cfg: dict, dotted: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    node = cfg
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return cfg


_server: "ForkServer | None" = None
_current_test: "pytest.Item | None" = None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Remember the test being set up, before its fixtures run (a module-scoped fixture that launches the CLI runs
    inside the first test that asks for it), so run_cli can refuse to run for a test not marked slow."""
    global _current_test
    _current_test = item


def _fork_server(env: dict):
    """The suite's fork server (tests/forkserver.py), started on first use; None when turned off."""
    global _server
    if os.environ.get("FINANCE_TRAINER_TEST_FORKSERVER", "1") == "0":
        return None
    if _server is None:
        from forkserver import ForkServer
        _server = ForkServer(env)
        atexit.register(_server.close)
    return _server


def run_cli(*args, env: dict | None = None, timeout: int = 600, cwd: str | Path | None = None
            ) -> subprocess.CompletedProcess:
    """`python train_finance_ssc_model.py ARGS` as its own process: forked from a server that has the heavy
    libraries imported already, or a fresh interpreter where a fork could differ (see tests/forkserver.py).
    `cwd`: the process's working directory (default: the test's)."""
    if _current_test is not None and _current_test.get_closest_marker("slow") is None:
        # the fast tier (-m "not slow") is the suite without CLI launches: a launch from an unmarked test would
        # slip into it unnoticed, so it fails here, in the full suite too
        raise AssertionError(f"{_current_test.nodeid} launches the CLI through run_cli: mark it @pytest.mark.slow")
    base = {**{k: v for k, v in os.environ.items() if k not in LIBRARY_WRITTEN_ENV},
            "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    full_env = {**base, **(env or {})}
    argv = [str(SCRIPT), *map(str, args)]
    server = _fork_server(base)
    if server is not None and not server.needs_fresh_interpreter(argv, full_env):
        return server.run(argv, full_env, timeout, cwd=str(cwd) if cwd else None)
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=cwd)


def last_json(stderr: str) -> dict:
    """The error contract: the last line on stderr is one JSON object."""
    return json.loads(stderr.strip().splitlines()[-1])
