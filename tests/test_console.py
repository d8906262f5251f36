"""The console reads like a tool: one block for the settings that differ from defaults, one format per metric,
progress and ETA on every step line, and --status showing a finished run's throughput."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest

import train_finance_ssc_model as tf
from conftest import SCRIPT, base_config, run_cli, set_key, write_config


@pytest.mark.parametrize("key,value,text", [
    ("tokens_per_second", 19982.4, "20.0k"), ("tokens_per_second", 9762.6, "9.8k"), ("tokens_per_second", 812.3, "812"),
    ("tokens_per_second", 2.5e6, "2.50M"), ("train_loss", 1.07781234, "1.078"), ("val_loss", 31162.54, "3.116e+04"),
    ("learning_rate", 0.0005, "0.0005"), ("val_token_accuracy", 0.0768, "0.0768"), ("epoch", 1.0833, "1.08"),
    ("elapsed_seconds", 82.1, "1m22s"), ("train_loss", float("nan"), "nan"), ("step", 7, "7")])
def test_one_format_per_metric(key, value, text):
    assert tf.format_value(key, value) == text


def test_step_line_shows_progress_and_eta():
    line = tf.format_metrics(150, {"epoch": 1.0, "train_loss": 1.0778}, 450, eta_seconds=100)
    assert line == "step 150/450 (33%) | epoch 1.00 | train_loss 1.078 | eta 1m40s"
    assert tf.format_duration(3725) == "1h02m" and tf.format_duration(9.4) == "9s"


@pytest.mark.parametrize("n,signed,text", [
    (1023, False, "1023 B"), (1536, False, "1.5 KiB"), (3.2e9, False, "3.0 GiB"), (5 * 2**40, False, "5.0 TiB"),
    (2**50, False, "1024.0 TiB"), (0, False, "0 B"), (None, False, "n/a"), (-1536, False, "-1.5 KiB"),
    (8 * 2**30, True, "+8.0 GiB"), (-3 * 2**20, True, "-3.0 MiB"), (0, True, "+0 B")])
def test_one_byte_format_in_binary_units(n, signed, text):
    assert tf.format_bytes(n, signed=signed) == text


@pytest.fixture(scope="module")
def short_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("console")
    cfg = set_key(base_config(tiny_dir, out), "training.hyperparameters.num_epochs", 1)
    proc = run_cli("--config", write_config(out / "c.yaml", cfg), "--run-id", "calm")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc


@pytest.mark.slow
def test_console_before_training_fits_on_a_screen(short_run):
    out, proc = short_run
    lines = proc.stdout.splitlines()
    first_step = next(i for i, line in enumerate(lines) if re.search(r"INFO step \d+/\d+ \(\d+%\)", line))
    assert first_step <= 40, "\n".join(lines[:first_step])
    assert "differs from default" not in proc.stdout  # no WARNING per key
    n = len(tf.config_differences_from_defaults(tf.load_training_config(str(out / "c.yaml"))))
    assert f"{n} settings differ from defaults" in proc.stdout
    assert "resolved config:" not in proc.stdout  # the full config is in train.log and the manifest
    assert "resolved config:" in (out / "logs" / "calm" / "train.log").read_text()
    steps = [line for line in lines if " | train_loss " in line]
    # the ETA comes from the pace of the steps after the first few: the step lines from then on carry it
    measured = [line for line in steps if int(re.search(r" step (\d+)/", line).group(1)) > tf.PROGRESS_WARMUP_UPDATES]
    assert measured and all(re.search(r"\| eta \d+(h\d\dm|m\d\ds|s)$", line) for line in measured)


@pytest.mark.slow
def test_status_of_a_finished_run_shows_its_throughput(short_run):
    out, _ = short_run
    proc = run_cli("--status", "calm", "--output-dir", out / "runs", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    st = json.loads(proc.stdout)
    m = json.loads((out / "runs" / "calm" / "run_manifest.json").read_text())
    assert st["status"] == "completed" and st["tokens_per_second"] == m["performance"]["tokens_per_second"] > 0


# --------------------------------------------------------------------------------------------------
# Progress by output kind (issue 28): a bar on a terminal, a line every ~10 s in a pipe, never Trainer's raw dicts
# --------------------------------------------------------------------------------------------------

RAW_DICT = re.compile(r"\{'[A-Za-z_/]+': ")  # any Python dict printed as it is (Trainer's log dicts among them)


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def console_lines(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    handler = Lines()
    tf.log.addHandler(handler)
    old_level = tf.log.level
    tf.log.setLevel(logging.INFO)
    yield handler.lines
    tf.log.removeHandler(handler)
    tf.log.setLevel(old_level)


def test_progress_in_a_pipe_is_a_line_every_interval_with_an_eta_from_the_measured_pace(console_lines, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(tf.time, "monotonic", lambda: clock[0])
    with tf.progress(200, "tokenizing train") as bar:
        assert bar.mode == "lines" and bar.eta_seconds() is None
        for _ in range(tf.PROGRESS_WARMUP_UPDATES):  # the first updates pay for start-up: no ETA from them
            clock[0] += 50.0
            bar.update(10)
        assert bar.eta_seconds() is None
        n_lines = len(console_lines)
        for _ in range(17):
            clock[0] += 1.0  # 10 records a second from here on
            bar.update(10)
    assert bar.eta_seconds() == pytest.approx(0.0)  # 200 of 200 done
    # a line every PROGRESS_LINE_SECONDS (10 s): the 3 slow updates, then one after 10 of the fast ones
    assert len(console_lines) == n_lines + 1 == 4
    assert console_lines[-1] == "tokenizing train: 130/200 records (65%), 10 records/s, eta 7s"


def test_progress_stays_silent_for_short_work_in_a_pipe(console_lines):
    with tf.progress(1000, "scanning train", byte_counts=True) as bar:
        for _ in range(1000):
            bar.update(1)
    assert console_lines == []


def test_bar_postfix_uses_the_step_lines_formats():
    metrics = {"epoch": 1.0, "train_loss": 1.07781, "learning_rate": 0.0003, "grad_norm": 0.5,
               "tokens_per_second": 3065.2}
    assert tf.bar_postfix(metrics) == "epoch 1.00, loss 1.078, lr 0.0003, 3.1k tok/s"


def test_status_table_formats_like_the_step_lines():
    rows = dict(tf.status_rows({"run_id": "r", "status": "running", "step": 150, "max_steps": 450, "epoch": 0.3333,
                                "train_loss": 1.07781, "val_loss": None, "tokens_per_second": 3065.2,
                                "elapsed_seconds": 82.1, "eta_seconds": 132.1, "last_checkpoint": None}))
    assert rows["step"] == "150/450 (33%)" and rows["epoch"] == "0.33" and rows["train_loss"] == "1.078"
    assert rows["tokens_per_second"] == "3.1k tok/s" and rows["eta"] == "2m12s" and rows["elapsed"] == "1m22s"
    assert rows["val_loss"] == "-"


def test_datasets_map_reports_its_progress(console_lines, monkeypatch):
    from datasets import Dataset
    monkeypatch.setattr(tf, "PROGRESS_LINE_SECONDS", 0.0)  # every update is a line
    ds = Dataset.from_dict({"x": list(range(3000))})
    with tf.datasets_progress("tokenizing train"):
        out = ds.map(lambda b: {"y": [v * 2 for v in b["x"]]}, batched=True, batch_size=100,
                     load_from_cache_file=False)
    assert out["y"][:3] == [0, 2, 4]
    assert console_lines and all(line.startswith("tokenizing train: ") and line.split()[2].endswith("/3000")
                                 for line in console_lines), console_lines


def test_tokenize_processes_only_for_large_splits_on_enough_cores(monkeypatch):
    cores = [8]
    monkeypatch.setattr(tf.os, "sched_getaffinity", lambda pid: set(range(cores[0])), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert tf.tokenize_processes(tf.TOKENIZE_PARALLEL_MIN_RECORDS - 1) is None
    assert tf.tokenize_processes(200_000) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on the node share the cores
    assert tf.tokenize_processes(200_000) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 2 cores a rank: measured no faster than one process
    assert tf.tokenize_processes(200_000) is None
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    cores[0] = 64
    assert tf.tokenize_processes(200_000) == tf.TOKENIZE_MAX_PROCESSES
    cores[0] = 2
    assert tf.tokenize_processes(200_000) is None


@pytest.mark.parametrize("batch,accumulation,limit,text", [
    (1024, 8, 756, "batch_size to 512 and gradient_accumulation_steps to 16: the effective batch stays 8192"),
    (8, 1, 4, "batch_size to 4 and gradient_accumulation_steps to 2: the effective batch stays 8"),
    (7, 1, 3, "batch_size to 1 and gradient_accumulation_steps to 7: the effective batch stays 7"),
    (13, 8, 100, "batch_size to 52 and gradient_accumulation_steps to 2: the effective batch stays 104"),
    (97, 2, 96, "batch_size to 2 and gradient_accumulation_steps to 97: the effective batch stays 194 (batch_size 96 "
                "with gradient_accumulation_steps 3 is faster but makes it 288, not 194)")])
def test_out_of_memory_suggestion_keeps_the_effective_batch_exactly(batch, accumulation, limit, text):
    fix = tf.smaller_batch_fix(batch, accumulation, limit)
    assert fix == text
    b, a = map(int, re.match(r"batch_size to (\d+) and gradient_accumulation_steps to (\d+)", fix).groups())
    assert b <= limit and b * a == batch * accumulation


def screen(raw: str) -> list[str]:
    """What a terminal shows of `raw`: escape sequences dropped, each carriage return writing over its line."""
    raw = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw).replace("\r\n", "\n")
    shown = []
    for line in raw.split("\n"):
        cells: list[str] = []
        for seg in line.split("\r"):
            cells[:len(seg)] = seg
        shown.append("".join(cells).rstrip())
    return [line for line in shown if line]


def run_in_a_terminal(argv: list, env: dict, timeout: int = 600) -> tuple[int, str]:
    """The CLI with a pseudo-terminal as its stdin, stdout and stderr (120 columns): the bytes a person's terminal
    receives."""
    import errno
    import fcntl
    import struct
    import termios
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, argv)], stdin=slave, stdout=slave, stderr=slave,
                            env=env, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError as exc:  # EIO: the child closed the terminal
            if exc.errno != errno.EIO:
                raise
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=timeout), b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_a_terminal_shows_a_progress_bar_and_event_lines_never_raw_dicts(tiny_dir, tmp_path):
    cfg = set_key(base_config(tiny_dir, tmp_path), "training.hyperparameters.num_epochs", 1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "COLUMNS": "120"}
    rc, raw = run_in_a_terminal(["--config", write_config(tmp_path / "c.yaml", cfg), "--run-id", "tty"], env)
    shown = screen(raw)
    assert rc == 0, "\n".join(shown[-30:])
    assert not RAW_DICT.search(raw), [line for line in shown if RAW_DICT.search(line)]
    bars = [line for line in shown if re.match(r"training: +\d+%\|", line)]
    assert bars and re.match(r"training: 100%\|.*\| 12/12 steps \[.*loss \d", bars[-1]), bars
    # the dry run: its one line; its bar was cleared
    assert [line for line in shown if "dry run" in line] == [next(line for line in shown if " INFO dry run passed: 2 "
                                                                  "steps" in line)]
    # events as lines (evaluations, epoch summary, checkpoints); the step lines are the bar's, and train.log's
    assert any(" | val_loss " in line for line in shown) and any(" INFO epoch 1/1: " in line for line in shown)
    assert any(" INFO saved checkpoint-epoch-1 " in line for line in shown)
    assert not any(" | train_loss " in line for line in shown)
    log_text = (tmp_path / "logs" / "tty" / "train.log").read_text()
    assert " | train_loss " in log_text and not RAW_DICT.search(log_text)
    assert json.loads(shown[-1])["status"] == "completed"  # the Output object is still the last line


@pytest.mark.slow
def test_a_pipe_gets_no_raw_dicts_either(short_run):
    _, proc = short_run
    assert not RAW_DICT.search(proc.stdout) and not RAW_DICT.search(proc.stderr)


def test_a_cpu_run_uses_the_cores_free_when_it_starts(tiny_dir, tmp_path, monkeypatch):
    import torch
    config = tf.load_training_config(str(write_config(tmp_path / "c.yaml", base_config(tiny_dir, tmp_path))))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(tf.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # torch's default on 2 cores
    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)  # the test process keeps its own count
    # idle or a core partly busy: torch's default; busy: the whole cores left, at least 1
    for load, threads in ((0.2, 2), (0.8, 2), (1.4, 1), (5.8, 1)):
        monkeypatch.setattr(tf.os, "getloadavg", lambda load=load: (load, load, load))
        assert tf.choose_cpu_threads(config) == threads == chosen[-1]
    # a resume keeps the count its run started with, whatever the load now
    assert tf.choose_cpu_threads(config, {"reproducibility": {"hardware": {"cpu_threads": 2}}}) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's (or torchrun's) choice wins
    assert tf.choose_cpu_threads(config) is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    cuda = set_key(set_key(base_config(tiny_dir, tmp_path), "compute.device", "cuda"),
                   "compute.distributed_backend", "nccl")
    config = tf.load_training_config(str(write_config(tmp_path / "g.yaml", cuda)))
    assert tf.choose_cpu_threads(config) is None
