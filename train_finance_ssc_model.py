#!/usr/bin/env python
"""Fine-tune SmolLM3 on finance data (Philippine BIR tax, Odoo accounting) with Hugging Face Trainer.

Usage:
    python train_finance_ssc_model.py --config training_config.yaml                  # dry run, then train
    python train_finance_ssc_model.py --config training_config.yaml --dry-run        # 10 real steps, no checkpoints
    python train_finance_ssc_model.py --config training_config.yaml --validate-only  # check config + data (tokenized)
    python train_finance_ssc_model.py --config training_config.yaml --plan [--json]  # before renting: fit, hours, $
    python train_finance_ssc_model.py --config training_config.yaml --output-dir ckpts/run_$(date +%Y%m%d_%H%M%S)
    tail -F <logging_dir>/train.log                                                  # the latest run's log
    python train_finance_ssc_model.py --config training_config.yaml --resume-from latest --run-id RUN
    python train_finance_ssc_model.py --config c.yaml --set training.hyperparameters.learning_rate=1e-5
    python train_finance_ssc_model.py --status RUN_DIR            # or --list-checkpoints RUN_DIR, --json
    python train_finance_ssc_model.py --evaluate CHECKPOINT --test-data test.jsonl

Every run writes `<logging.output_dir>/<run_id>/run_manifest.json` (status `running` at start, the final
status at the end) with everything needed to reproduce it; its last stdout line is the spec's Output object
(run_id, status, best_checkpoint, final_val_perplexity, training_time_hours). Failures end with one JSON object on stderr,
`{"error": Kind, "details": {...}, "errors": [...]}`, and a documented exit code (see EXIT_* below).

Sections, in the order a run flows through them (spec phases in brackets):
    1. constants and utilities    2. config dataclasses          3. errors (+ failure builders)
    4. config loading             5. validation [Phase 1]        6. data (+ packing)
    7. model (+ LoRA, memory)     8. tracking                    9. callbacks
   10. Trainer                   11. test hooks                 12. checkpoints and the run directory
   13. resume                    14. dry run [Phase 2]          15. train [Phase 3]
   16. analysis [Phase 4]        17. manifest                   18. tools (--status, --evaluate, --plan, ...)
   19. CLI
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime as dt
import decimal
import difflib
import gc
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import shlex
import signal
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

# torch / transformers / datasets are imported inside the functions that need them, so `--help`
# and config errors answer in well under a second.


# --------------------------------------------------------------------------------------------------
# 1. Constants and utilities: exit codes, names, redaction, JSON, atomic writes, hashing, formatting
# --------------------------------------------------------------------------------------------------

EXIT_OK = 0
EXIT_FAILED = 1  # anything unexpected
EXIT_INVALID = 2  # invalid config, data, checkpoint or paths: nothing was trained
EXIT_DIVERGED = 3  # stopped by an anomaly guard
EXIT_OOM = 4  # out of memory, predicted or real
EXIT_PREEMPTED = 143  # SIGTERM / SIGUSR1 / SIGHUP: saved a checkpoint at the step boundary and stopped (128 + SIGTERM)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it
ERROR_EXIT_CODES = {
    "InvalidConfig": EXIT_INVALID,
    "EmptyDataset": EXIT_INVALID,
    "InvalidDataset": EXIT_INVALID,
    "DataPathNotFound": EXIT_INVALID,
    "CheckpointNotFound": EXIT_INVALID,
    "RunExists": EXIT_INVALID,
    "RunLocked": EXIT_INVALID,  # another live process is writing the same run dir
    "RunRecordDamaged": EXIT_INVALID,  # a run's manifest or status.json is empty, truncated or not a JSON object
    "InsufficientDisk": EXIT_INVALID,  # preflight: the output filesystem cannot hold two checkpoints
    "TrainingDiverged": EXIT_DIVERGED,
    "OutOfMemory": EXIT_OOM,
    "DiskFull": EXIT_FAILED,  # a write failed with ENOSPC/EDQUOT during the run (what was saved stays usable)
    "TrainingFailed": EXIT_FAILED,
    "Preempted": EXIT_PREEMPTED,
    "Interrupted": EXIT_INTERRUPTED,
}
MANIFEST_NAME = "run_manifest.json"
DAMAGED_MANIFEST_HINT = (  # RunRecordDamaged's suggestion for a damaged manifest, outside a resume
    "the manifest is written atomically, so something else damaged it (a copy, a full disk, an editor). Restore "
    "it from a backup; the checkpoints are unaffected (each has its own checkpoint_meta.json), and "
    "--resume-from latest --run-id RUN --force continues the run without the earlier history")
CHECKPOINT_META = "checkpoint_meta.json"  # written last inside a checkpoint; its presence = complete
TMP_PREFIX = ".tmp-"
RUN_LOCK = ".lock"  # flock'd by the one process writing a run dir; holds its pid, host and start time
RUN_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
MAX_RUN_ID_LENGTH = 128  # a run id names directories (plus suffixes such as `.abandoned-<time>`): stay far below 255
YAML_MAX_NODES = 10_000  # a config's YAML nodes once aliases are expanded (a real config has ~100): alias bombs
YAML_MAX_CHARS = 1_000_000  # ... and characters of scalar text once aliases are expanded
MAX_ECHO_CHARS = 300  # a value echoed in an error payload is cut to this many characters, with a marker

# Metrics this script reports at every evaluation; `val_x` in the config is Trainer's `eval_x`.
EVAL_METRICS = {"val_loss": False, "val_perplexity": False, "val_token_accuracy": True,  # name -> greater is better
                "val_numeric_match": True, "val_answer_exact_match": True}
# ...the two scored on generated answers exist only under evaluation.answer_eval.on_validation (_field_rules)
ANSWER_EVAL_METRICS = ("val_numeric_match", "val_answer_exact_match")
RECORD_SHAPES = {  # shape -> keys that identify it
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "instruction": ("instruction", "output"),
    "text": ("text",),
}
IGNORE_INDEX = -100  # label value that the loss skips
FP16_MAX_OVERFLOWS = 25  # consecutive fp16 loss-scaler overflows before the guard calls the run broken
log = logging.getLogger("finance_trainer")


def _jsonable(value: Any) -> Any:
    """`value` as an error payload can echo it: itself when it is strict JSON of at most MAX_ECHO_CHARS
    characters, else its JSON (or repr) cut to that length with a marker saying how long it was."""
    try:
        text = json.dumps(value, allow_nan=False)
        echo = value
    except (TypeError, ValueError, RecursionError):
        text = echo = repr(value)
    if len(text) > MAX_ECHO_CHARS:
        return f"{text[:MAX_ECHO_CHARS]}... [truncated: {len(text)} characters]"
    return echo


# Secrets never leave the process: redact() masks URL userinfo passwords (`http://user:***@host/`) and the value of
# every secret-looking environment variable in what is written (JSON files, stdout, logs, trackers, errors).
# The real values stay in the config object, so connections still use them.
SECRET_ENV_RE = re.compile(r"(?:^|_)(?:TOKEN|KEY|PASSWORD|PASSWD|SECRET)$", re.I)  # HF_TOKEN, WANDB_API_KEY, ...
SECRET_MIN_LENGTH = 8  # shorter env values ("1", "true") are not secrets, and masking them would mangle the text
URL_USERINFO_RE = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s\"'<>]*)@")
REDACTED = "***"


def _secret_env_values() -> list[str]:
    values = {v for k, v in os.environ.items() if SECRET_ENV_RE.search(k) and len(v) >= SECRET_MIN_LENGTH}
    return sorted(values, key=len, reverse=True)


def _mask_userinfo(m: re.Match) -> str:
    user, colon, _ = m["userinfo"].partition(":")
    return f"{m['scheme']}{user}:{REDACTED}@" if colon else f"{m['scheme']}{REDACTED}@"  # a bare userinfo is a token


def redact(value: Any, _secrets: Optional[list] = None) -> Any:
    """`value` (a string, or dicts/lists/tuples of them, keys included) with URL userinfo passwords masked
    (`http://user:***@host/`; a userinfo without a password, often a token, becomes `***@`) and the value of every
    environment variable named like *_TOKEN, *_KEY, *_PASSWORD, *_SECRET (at least SECRET_MIN_LENGTH characters)
    replaced by `***`. Other values are returned as they are."""
    secrets = _secret_env_values() if _secrets is None else _secrets
    if isinstance(value, str):
        if "@" in value:
            value = URL_USERINFO_RE.sub(_mask_userinfo, value)
        for s in secrets:
            if s in value:
                value = value.replace(s, REDACTED)
        return value
    if isinstance(value, dict):
        return {redact(k, secrets): redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets) for v in value] if isinstance(value, list) else tuple(redact(v, secrets)
                                                                                          for v in value)
    return value


def _finite_json(value: Any) -> Any:
    """NaN/inf anywhere in `value` as the strings "NaN"/"inf"/"-inf" (_json_float), so it dumps as strict JSON."""
    if isinstance(value, float):
        return _json_float(value)
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def json_text(data: Any, indent: Optional[int] = None) -> str:
    """The one way this script turns data into JSON it writes or prints: secrets redacted, strict JSON (no bare
    NaN/Infinity), anything else JSON cannot hold written as its (redacted) str."""
    return json.dumps(_finite_json(redact(data)), indent=indent, allow_nan=False, default=lambda o: redact(str(o)))


class RedactingFormatter(logging.Formatter):
    """The formatter of this script's log handlers (console, train.log): every line, traceback included, redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class RedactingStream:
    """sys.stdout / sys.stderr as libraries see them once redact_library_output ran: what they print themselves
    (MLflow's `View run ... at: http://user:PASSWORD@host/...` links, W&B's banners, warnings, tracebacks) passes
    through redact() like everything this script writes. Anything but writing goes to the real stream."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text) if isinstance(text, str) else text)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def redact_library_output() -> None:
    """Route the process's sys.stdout and sys.stderr through RedactingStream (once; before any library keeps a
    reference to them). Output written to the file descriptors directly, below Python, is not covered."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))


def _free_bytes(path: Any) -> Optional[int]:
    """Free bytes on the filesystem holding `path` (its nearest existing ancestor)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _jsonl_rows(path: Path):
    """(line number, record) of a JSONL file that scan_jsonl passed, numbered as scan_jsonl numbers lines."""
    with Path(path).open("rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if raw.strip():
                yield line_no, json.loads(raw)


def _dotted_get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def format_bytes(n: Optional[float], signed: bool = False) -> str:
    """The one way this script shows a byte count, in binary units labelled as such (KiB = 2**10 ... TiB = 2**40):
    1536 -> `1.5 KiB`, 3.2e9 -> `3.0 GiB`, None (not known) -> `n/a`; `signed` for a difference: `+8.0 GiB`, `+0 B`."""
    if n is None:
        return "n/a"
    sign = ("+" if n >= 0 else "-") if signed else ("-" if n < 0 else "")
    value = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return sign + (f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}")


def format_duration(seconds: float) -> str:
    """1h02m, 1m40s, 9s."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def chat_template_sha256(template: Optional[str]) -> Optional[str]:
    """sha256 of a chat template's text (UTF-8), None for no template: which template rendered the data."""
    return None if template is None else hashlib.sha256(template.encode("utf-8")).hexdigest()


_HASHED: dict[tuple, str] = {}  # (device, inode, size, mtime) -> sha256


def _sha256_cached(path: Path) -> str:
    """_sha256, remembered per file version: retention and the manifest check the checkpoints at every save,
    and files this process saved (or already checked) must not be read again each time."""
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = _sha256(path)
    return _HASHED[key]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # not supported on every filesystem; the rename is still atomic
        pass


@contextlib.contextmanager
def open_atomic(path: Path, mode: str = "w", newline: Optional[str] = None):
    """The one way this script writes a file: a handle on a temporary name in the same folder
    (`.tmp-<name>.<pid>`), flushed, fsynced and renamed over `path` when the block ends, so a reader, or a crash,
    finds the old file or the new one, never part of one. `mode` "w" (UTF-8 text; `newline=""` for csv) or "wb".
    A block that fails (a full disk) removes the temporary file and re-raises, an OSError with the target's path
    as its filename; `path` is left as it was. The disk-full test hook (injected_enospc) fails it here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with tmp.open(mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": newline})) as fh:
            yield fh
            fh.flush()
            injected = injected_enospc(path)
            if injected is not None:
                fh.truncate(tmp.stat().st_size // 2)  # what a full disk leaves: a partial temporary file
                raise injected
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError) and not exc.filename:
            exc.filename = str(path)
        raise


def write_atomic(path: Path, data: str | bytes) -> None:
    """`data` (text as UTF-8) into `path` through open_atomic."""
    with open_atomic(path, "wb" if isinstance(data, bytes) else "w") as fh:
        fh.write(data)


def write_json_atomic(path: Path, data: Any) -> None:
    """`data` as json_text writes it (secrets redacted, strict JSON, indented) into `path` through open_atomic."""
    write_atomic(path, json_text(data, indent=2) + "\n")


@contextlib.contextmanager
def build_dir_atomic(final: Path):
    """A fresh directory beside `final` (`.tmp-<name>`; a leftover of an earlier try is removed) to build in. When
    the block ends it takes `final`'s place: the old one is renamed aside (`.tmp-delete-<name>`), the new one
    renamed in, then the old one deleted, so `final` is never a half-built directory or a mix of two. A block that
    fails removes the temporary directory and re-raises; `final` is left as it was."""
    final = Path(final)
    tmp, old = final.with_name(f"{TMP_PREFIX}{final.name}"), final.with_name(f"{TMP_PREFIX}delete-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    moved_aside = False
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            moved_aside = True
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved_aside and not final.exists():
            os.rename(old, final)
        raise
    if moved_aside:
        shutil.rmtree(old, ignore_errors=True)


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read_jsonl(path: Path, limit: Optional[int] = None) -> list[dict]:
    """The first `limit` records (all with None), read as scan_jsonl and _jsonl_rows read lines (json.loads reads
    past a UTF-8 BOM at the start of the file)."""
    import itertools
    return [record for _, record in itertools.islice(_jsonl_rows(path), limit)]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _json_float(value: Any) -> Any:
    """Floats as JSON allows: NaN/inf become the strings "NaN"/"inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _float_from_json(value: Any) -> Any:
    """_json_float undone: the strings "NaN", "inf", "-inf" read back from a manifest are floats again."""
    return float(value) if value in ("NaN", "inf", "-inf") else value


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# Two JSON readers with opposite policies for a damaged file: the strict one for records a decision rests on (a run's
# manifest and status.json), the lenient one for files whose loss costs nothing but detail (an index, a lock's
# holder, settings with a fallback). A caller picks one by name.
def read_json_strict(path: Path, suggestion: str) -> Optional[dict]:
    """A run's JSON record (run_manifest.json, status.json): None when the file does not exist. One that exists but
    is empty, truncated or not a JSON object is RunRecordDamaged (exit 2) naming the file and what is wrong with
    it: never read as an empty record (a resume would drop the run's history, --status would guess)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        what = f"unreadable ({type(exc).__name__}: {exc})"
        text = None
    if text is not None:
        if not text.strip():
            what = "empty file"
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                what = (f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno} of {len(text)} "
                        "characters): truncated or overwritten")
            else:
                if isinstance(value, dict):
                    return value
                what = f"a JSON {type(value).__name__}, not an object"
    raise TrainerError("RunRecordDamaged", {"path": str(path.resolve()), "problem": what, "suggestion": suggestion})


def read_json_lenient(path: Path) -> dict:
    """The JSON object in `path`, or {} when the file is missing, unreadable, damaged or holds no object: only for
    callers that have a fallback for every key (read_json_strict for the run's own records)."""
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, ValueError):  # ValueError: not UTF-8, not JSON
        return {}
    return value if isinstance(value, dict) else {}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


# --------------------------------------------------------------------------------------------------
# 2. Config dataclasses: one per YAML section, defaults live here and nowhere else
# --------------------------------------------------------------------------------------------------

REQUIRED: Any = dataclasses.MISSING  # marks a key the YAML must set

# A field's metadata documents it ("doc") and may declare its limits, which `_field_limit_problems` (Validation)
# checks for every field: a new field gets its check by declaring it. A null (Optional field) has no limits.
#   "choices": the allowed values: a tuple, a dict (its keys), or a function returning one (a table defined later)
#   "minimum" / "exclusive_minimum" / "maximum" / "exclusive_maximum": bounds (>=, >, <=, <)
#   "finite": inf and nan break this field's limit. Without it nan still fails any bound, and an inf that passes
#       (inf > 0) gets the catch-all "a finite number" error: no number of the config may be inf or nan
#   "non_empty": a string with text in it, a list with items
#   "check": a function of the value, true when valid, for a limit that is none of the above
#   "when": a boolean field of the same section: the limits apply only while it is true (lora.enabled)
#   "expected": the error's `expected` text; by default said from the limits ("integer >= 1", "number in (0, 1]",
#       "one of [...]"); "{choices}" in it is the list of choices
#   "suggestion": the error's fix; by default "set <name>: <default>"; "{closest}" in it is the choice nearest the
#       value, or else the fallback of "closest": (fallback, difflib cutoff)
#   "recommended": (low, high), inclusive, None = open: a value within the limits but outside it warns "advice",
#       with "{field}" and "{value}" formatted in
# The choices that the metadata names are defined here, before the dataclasses (GPU_TYPES, a table in section 7,
# is named through a function).
OPTIMIZERS = {"adamw": "adamw_torch", "adamw_fused": "adamw_torch_fused", "adafactor": "adafactor", "sgd": "sgd"}
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
SAVE_STRATEGIES = ("epoch", "steps")
DATA_FORMATS = ("auto",) + tuple(RECORD_SHAPES)
# apply_chat_template's own arguments: a template variable of one of these names would replace or break them
TEMPLATE_RESERVED_NAMES = ("messages", "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
                           "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                           "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs")


def template_kwargs_problem(value: Any) -> Optional[str]:
    """Why `value` cannot be chat-template keyword arguments (data.chat_template_kwargs, a record's
    chat_template_kwargs), or None: a mapping whose keys are template variable names."""
    if not isinstance(value, dict):
        return f"a mapping of template variables, got {type(value).__name__}"
    bad = [k for k in value if not (isinstance(k, str) and k.isidentifier()) or k in TEMPLATE_RESERVED_NAMES]
    return f"template variable names (not {', '.join(map(repr, bad))})" if bad else None


@dataclass(kw_only=True)
class LoraConfig:
    """Parameter-efficient fine-tuning with peft. Checkpoints then hold the adapter only."""
    enabled: bool = False
    r: int = field(default=16, metadata={"doc": "adapter rank", "when": "enabled", "minimum": 1})
    alpha: float = field(default=32, metadata={"doc": "scaling numerator (scale = alpha / r)", "when": "enabled",
                                               "exclusive_minimum": 0})
    dropout: float = field(default=0.05, metadata={"doc": "dropout on the adapter input", "when": "enabled",
                                                   "minimum": 0, "exclusive_maximum": 1})
    target_modules: Optional[list] = field(default=None, metadata={
        "doc": "module names; null = the attention and MLP projections found in the model", "when": "enabled",
        "non_empty": True, "expected": "a non-empty list, or null",
        "suggestion": "remove target_modules to adapt the attention and MLP projections"})
    bias: str = field(default="none", metadata={"doc": "none|all|lora_only", "when": "enabled",
                                                "choices": ("none", "all", "lora_only"),
                                                "expected": "none, all or lora_only"})
    quantization: str = field(default="none", metadata={"doc": "none|4bit|8bit (QLoRA, bitsandbytes, CUDA only)",
                                                        "when": "enabled", "choices": ("none", "4bit", "8bit"),
                                                        "expected": "none, 4bit or 8bit"})
    merge_at_end: bool = field(default=True, metadata={"doc": "save the best adapter merged into the base weights"})


@dataclass(kw_only=True)
class ModelConfig:
    base_checkpoint: str = field(default=REQUIRED, metadata={"doc": "local directory or Hub id"})
    architecture: str = field(default="decoder-only-transformer", metadata={
        "doc": "informational, must be a decoder", "choices": ("decoder-only-transformer",),
        "expected": "decoder-only-transformer",
        "suggestion": "this trainer fine-tunes causal (decoder-only) language models such as SmolLM3"})
    vocab_size: Optional[int] = field(default=None, metadata={
        "doc": "checked against the checkpoint's config.json", "minimum": 1, "expected": "integer >= 1 (or omit it)",
        "suggestion": "copy vocab_size from config.json"})
    hidden_size: Optional[int] = field(default=None, metadata={
        "doc": "checked against config.json", "minimum": 1, "expected": "integer >= 1 (or omit it)",
        "suggestion": "copy hidden_size from config.json"})
    num_layers: Optional[int] = field(default=None, metadata={
        "doc": "checked against config.json num_hidden_layers", "minimum": 1, "expected": "integer >= 1 (or omit it)",
        "suggestion": "copy num_layers from config.json"})
    num_heads: Optional[int] = field(default=None, metadata={
        "doc": "checked against config.json num_attention_heads", "minimum": 1,
        "expected": "integer >= 1 (or omit it)", "suggestion": "copy num_heads from config.json"})
    gradient_checkpointing: bool = field(default=False, metadata={"doc": "trade compute for activation memory"})
    use_flash_attention_2: bool = field(default=False, metadata={"doc": "needs flash-attn; falls back to sdpa"})
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass(kw_only=True)
class DataConfig:
    train_path: str = field(default=REQUIRED, metadata={"doc": "JSONL, relative to the config's folder or cwd"})
    valid_path: str = field(default=REQUIRED, metadata={"doc": "JSONL validation split"})
    test_path: str = field(default=REQUIRED, metadata={"doc": "JSONL test split"})
    max_seq_length: int = field(default=2048, metadata={"doc": "longer records are truncated and counted",
                                                        "minimum": 8})
    dataset_name: str = field(default=REQUIRED, metadata={
        "doc": "recorded in manifest and checkpoints", "non_empty": True,
        "suggestion": "set dataset_name, e.g. finance_ssc_bir_v1"})
    dataset_version: str = field(default=REQUIRED, metadata={
        "doc": "recorded in manifest and checkpoints", "non_empty": True,
        "suggestion": "set dataset_version, e.g. 2025-11-17"})
    format: str = field(default="auto", metadata={"doc": "auto|text|prompt_completion|messages|instruction",
                                                  "choices": DATA_FORMATS, "suggestion": "use format: auto"})
    train_on_prompt: bool = field(default=False, metadata={"doc": "also compute loss on prompt tokens"})
    packing: bool = field(default=False, metadata={"doc": "pack records into full max_seq_length rows"})
    group_by_length: bool = field(default=False, metadata={
        "doc": "batches of similar lengths (less padding, but a narrower sample per batch: see README Speed; "
               "seeded, resume-exact); false = uniform shuffling"})
    dedup: bool = field(default=False, metadata={
        "doc": "drop exact duplicate train records (the first is kept) and valid/test records whose prompt is in train"})
    chat_template_kwargs: Optional[dict] = field(default=None, metadata={
        "doc": "variables of every chat-template render (training and evaluation records, samples, best/'s "
               "chat_template_kwargs.json), e.g. {enable_thinking: false}: SmolLM3's /no_think mode; a messages "
               "record's own chat_template_kwargs overrides it key by key",
        "check": lambda v: template_kwargs_problem(v) is None,
        "expected": "a mapping of template variable names to values (not apply_chat_template's own arguments)",
        "suggestion": "write it as a mapping of the template's variables, e.g. chat_template_kwargs: "
                      "{enable_thinking: false} (apply_chat_template's own arguments, such as tools or "
                      "add_generation_prompt, are set by this script)"})
    truncation_side: str = field(default="right", metadata={
        "doc": "right: a record longer than max_seq_length loses its end; left: it keeps its end (the answer) and "
               "loses the start of its prompt (TRL's keep_end)", "choices": ("right", "left"),
        "expected": "right or left"})
    max_truncated_fraction: float = field(default=0.05, metadata={
        "doc": "the largest fraction of any split whose answers max_seq_length may cut (some answer tokens lost) "
               "or drop (all lost); above it the data is refused before training (InvalidDataset)",
        "minimum": 0, "maximum": 1, "finite": True, "suggestion": "set max_truncated_fraction: 0.05"})


@dataclass(kw_only=True)
class HyperparametersConfig:
    learning_rate: float = field(default=2.0e-5, metadata={
        "exclusive_minimum": 0, "finite": True, "expected": "float in range [1e-6, 1e-4]",
        "suggestion": "Try 2e-5 (default for fine-tuning)", "recommended": (1e-6, 1e-4),
        "advice": "{field}={value:g} is outside the recommended [1e-6, 1e-4]; 2e-5 is the usual fine-tuning value"})
    batch_size: int = field(default=4, metadata={"minimum": 1, "suggestion": "set batch_size to 1 or more"})
    gradient_accumulation_steps: int = field(default=8, metadata={
        "minimum": 1, "suggestion": "set gradient_accumulation_steps to 1 or more"})
    num_epochs: float = field(default=3, metadata={"doc": "may be fractional; an integer stays an integer (manifest)",
                                                   "int_stays_int": True, "exclusive_minimum": 0, "finite": True})
    warmup_steps: int = field(default=500, metadata={"minimum": 0, "suggestion": "set warmup_steps to 1 or more"})
    weight_decay: float = field(default=0.01, metadata={"minimum": 0, "finite": True})
    max_grad_norm: float = field(default=1.0, metadata={
        "exclusive_minimum": 0, "finite": True,
        "suggestion": "set max_grad_norm: 1.0 (gradient clipping keeps fine-tuning stable)"})
    fp16: bool = False
    bf16: bool = False


# the limits of a field that names an evaluation metric (early_stopping_metric, metric_for_best_model)
METRIC_LIMITS = {"choices": EVAL_METRICS, "expected": "one of the metrics this script reports: {choices}",
                 "suggestion": "use {closest}", "closest": ("val_loss", 0.6)}


@dataclass(kw_only=True)
class OptimizationConfig:
    optimizer: str = field(default="adamw", metadata={"doc": "adamw (torch AdamW)", "choices": OPTIMIZERS,
                                                      "suggestion": "use optimizer: adamw"})
    lr_scheduler: str = field(default="cosine", metadata={"doc": "cosine|linear|constant|constant_with_warmup",
                                                          "choices": SCHEDULERS,
                                                          "suggestion": "use lr_scheduler: cosine"})
    early_stopping_patience: Optional[int] = field(default=3, metadata={
        "doc": "evals without improvement; null=off", "minimum": 1,
        "expected": "integer >= 1, or null to turn early stopping off"})
    early_stopping_metric: str = field(default="val_loss", metadata={
        "doc": "val_loss|val_perplexity|val_token_accuracy (|val_numeric_match|val_answer_exact_match under "
               "evaluation.answer_eval.on_validation)", **METRIC_LIMITS})


@dataclass(kw_only=True)
class CheckpointingConfig:
    save_strategy: str = field(default="epoch", metadata={
        "doc": "epoch|steps; a checkpoint is also saved at every eval", "choices": SAVE_STRATEGIES,
        "suggestion": "use save_strategy: epoch (or steps, with logging.save_steps)"})
    save_total_limit: int = field(default=3, metadata={
        "doc": "scheduled saves kept (epoch ends, or save_steps multiples); best, latest and one backup always are",
        "minimum": 1, "recommended": (3, None),
        "advice": "{field}={value}: the best, the latest and one backup checkpoint are always kept, so up to 3 "
                  "checkpoints stay on disk"})
    load_best_at_end: bool = field(default=True, metadata={"doc": "final evaluation uses the best checkpoint"})
    metric_for_best_model: str = field(default="val_perplexity", metadata={
        "doc": "one of the val_* metrics (val_numeric_match, val_answer_exact_match: under "
               "evaluation.answer_eval.on_validation)", **METRIC_LIMITS})


@dataclass(kw_only=True)
class WandbConfig:
    enabled: bool = False
    project: str = "finance-smollm3"
    entity: Optional[str] = None
    tags: list = field(default_factory=list)


@dataclass(kw_only=True)
class TensorboardConfig:
    enabled: bool = True
    log_dir: str = "tensorboard"


@dataclass(kw_only=True)
class MlflowConfig:
    enabled: bool = False
    tracking_uri: Optional[str] = field(default=None, metadata={"doc": "default sqlite:///<output_dir>/mlflow.db"})
    experiment: str = "finance-smollm3"


@dataclass(kw_only=True)
class LoggingConfig:
    output_dir: str = field(default=REQUIRED, metadata={"doc": "runs go to <output_dir>/<run_id>"})
    logging_dir: str = field(default="logs", metadata={"doc": "train.log and CSV curves go to <logging_dir>/<run_id>"})
    logging_steps: int = field(default=10, metadata={"minimum": 1, "suggestion": "set logging_steps to 1 or more"})
    eval_steps: int = field(default=100, metadata={"minimum": 1, "suggestion": "set eval_steps to 1 or more"})
    save_steps: int = field(default=500, metadata={"minimum": 1, "suggestion": "set save_steps to 1 or more"})
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorboardConfig = field(default_factory=TensorboardConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass(kw_only=True)
class ComputeConfig:
    device: str = field(default="cuda", metadata={"doc": "cuda|cpu", "choices": ("cuda", "cpu"),
                                                  "expected": "cuda or cpu",
                                                  "suggestion": "use device: cuda (cpu for testing)"})
    num_gpus: int = field(default=1, metadata={"doc": "processes per node (GPUs; CPU processes with gloo)",
                                               "minimum": 1})
    distributed_backend: str = field(default="nccl", metadata={"doc": "nccl (GPU) | gloo (CPU)",
                                                               "choices": ("nccl", "gloo"), "expected": "nccl or gloo",
                                                               "suggestion": "use nccl on GPUs, gloo on CPU"})
    mixed_precision: str = field(default="no", metadata={
        "doc": "no|fp16|bf16; must agree with fp16/bf16 flags", "choices": ("no", "fp16", "bf16"),
        "expected": "no, fp16 or bf16",
        "suggestion": "use mixed_precision: bf16 on Ampere+ GPUs, fp16 on older ones, no on CPU"})
    fsdp: Optional[str] = field(default=None, metadata={"doc": "passed to TrainingArguments.fsdp"})
    fsdp_config: Optional[dict] = field(default=None, metadata={"doc": "passed to TrainingArguments.fsdp_config"})
    deepspeed: Optional[str] = field(default=None, metadata={"doc": "DeepSpeed JSON path for TrainingArguments"})
    gpu_type: Optional[str] = field(default=None, metadata={
        "doc": "--plan's target GPU, a GPU_TYPES name (H100-80GB, A100-40GB, L40S-48GB, ...); null = the visible GPU",
        "choices": lambda: GPU_TYPES, "expected": "one of {choices}, or null (the visible GPU)",
        "suggestion": "use gpu_type: {closest}", "closest": ("H100-80GB", 0.5)})
    assumed_mfu: float = field(default=0.4, metadata={
        "doc": "--plan's model FLOPs utilization for the wall-time estimate, in (0, 1]; a run measures its own "
               "(manifest performance.mfu.value)", "exclusive_minimum": 0, "maximum": 1, "finite": True,
        "suggestion": "set assumed_mfu: 0.4 (dense fine-tuning typically reaches 0.3-0.5)"})


@dataclass(kw_only=True)
class GuardsConfig:
    """Anomaly guards (spec: Training Stability). A stop ends the run with exit code 3."""
    grad_norm_limit: float = field(default=100.0, metadata={"doc": "stop when the pre-clip grad norm exceeds it",
                                                            "exclusive_minimum": 0,
                                                            "suggestion": "set grad_norm_limit: 100 (spec default)"})
    divergence_increase: float = field(default=0.10, metadata={"doc": "val loss above best by this fraction...",
                                                               "exclusive_minimum": 0,
                                                               "suggestion": "set divergence_increase: 0.10"})
    divergence_evals: int = field(default=3, metadata={"doc": "...for this many consecutive evals: stop",
                                                       "minimum": 1})
    spike_factor: float = field(default=3.0, metadata={"doc": "warn when train loss > factor x recent mean",
                                                       "exclusive_minimum": 1})
    spike_window: int = field(default=10, metadata={"doc": "logged train losses in the recent mean", "minimum": 2})


@dataclass(kw_only=True)
class TrainingSection:
    hyperparameters: HyperparametersConfig = field(default_factory=HyperparametersConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    guards: GuardsConfig = field(default_factory=GuardsConfig)
    seed: int = field(default=42, metadata={"doc": "seeds python, numpy, torch, CUDA and data shuffling"})


@dataclass(kw_only=True)
class AnswerEvalConfig:
    """Answers generated and scored by the rules of `score_answers` (amounts, form numbers, exact match)."""
    max_records: int = field(default=500, metadata={
        "doc": "the first N test records are answered and scored after training (all, if fewer); 0 = off",
        "minimum": 0, "suggestion": "set max_records: 500 (0 turns answer evaluation off)"})
    on_validation: bool = field(default=False, metadata={
        "doc": "also score the first max_records validation records at every evaluation (val_numeric_match, "
               "val_answer_exact_match; costs generation time per evaluation)"})


@dataclass(kw_only=True)
class EvaluationConfig:
    """Post-training analysis on the test split (spec Phase 4)."""
    num_samples: int = field(default=5, metadata={"doc": "test prompts to generate completions for (0 = none)",
                                                  "minimum": 0, "suggestion": "set num_samples: 5 (0 = none)"})
    max_new_tokens: int = field(default=128, metadata={"doc": "greedy generation length limit", "minimum": 1})
    baseline: Optional[str] = field(default=None, metadata={
        "doc": "manifest or run dir to compare against; null = the most recent completed run of the same "
               "data.dataset_name (choose_baseline); none = no comparison",
        "check": lambda ref: ref.lower() == "none" or _baseline_manifest_path(ref) is not None,
        "expected": "a run_manifest.json or a run dir holding one, none, or null (automatic)",
        "suggestion": "point it at a finished run's directory, set it to none, or remove it"})
    answer_eval: AnswerEvalConfig = field(default_factory=AnswerEvalConfig)


@dataclass(kw_only=True)
class CostConfig:
    """Inputs of the cost and ROI lines in the manifest (spec: Cost Tracking)."""
    gpu_hourly_usd: float = field(default=3.39, metadata={"doc": "price of one GPU for one hour", "minimum": 0,
                                                          "finite": True,
                                                          "suggestion": "set gpu_hourly_usd to a price in USD"})
    gpu_price_source: str = "DigitalOcean GPU Droplet, NVIDIA H100 1x on-demand list price (May 2026)"
    node_hourly_usd: Optional[float] = field(default=None, metadata={
        "doc": "list price of one node of compute.num_gpus GPUs for one hour (an 8-GPU node is usually below "
               "8 x gpu_hourly_usd); null = gpu_hourly_usd x GPUs", "minimum": 0, "finite": True,
        "expected": "number >= 0, or null",
        "suggestion": "set node_hourly_usd to the provider's hourly price of the whole node, or remove it"})
    api_usd_per_million_tokens: float = field(default=10.0, metadata={
        "doc": "API price the run is compared with", "minimum": 0, "finite": True,
        "suggestion": "set api_usd_per_million_tokens to a price in USD"})
    api_name: str = "GPT-4 Turbo (input tokens)"


@dataclass(kw_only=True)
class TrainingConfig:
    model: ModelConfig
    data: DataConfig
    training: TrainingSection
    logging: LoggingConfig
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    # Not YAML keys: filled in by load_training_config.
    config_path: Optional[str] = None
    config_text: Optional[str] = None
    overrides: list = field(default_factory=list)
    resolved_paths: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    auto_baseline: Optional[dict] = None  # choose_baseline's pick when evaluation.baseline is null: {path, run_id, ...}
    # The day a date-reading chat template renders (YYYY-MM-DD): the run's first start, kept by every resume
    # (pin_template_date); None until a run or --validate-only sets it.
    template_date: Optional[str] = None

    def to_dict(self) -> dict:
        """The YAML-shaped config (runtime fields left out)."""
        d = dataclasses.asdict(self)
        for k in ("config_path", "config_text", "overrides", "resolved_paths", "warnings", "auto_baseline",
                  "template_date"):
            d.pop(k)
        return d


SECTIONS = {"model": ModelConfig, "data": DataConfig, "training": TrainingSection,
            "logging": LoggingConfig, "compute": ComputeConfig, "evaluation": EvaluationConfig, "cost": CostConfig}
REQUIRED_SECTIONS = ("model", "data", "logging")


# --------------------------------------------------------------------------------------------------
# 3. Errors: one type carrying the JSON payload and its exit code, and the failure builders
# --------------------------------------------------------------------------------------------------

class TrainerError(Exception):
    """A failure the user can fix. `payload` is what goes to stderr, error.json and the manifest."""

    def __init__(self, kind: str, details: dict, errors: list | None = None):
        self.kind, self.details = kind, details
        self.errors = errors or [{"error": kind, "details": details}]
        super().__init__(f"{kind}: {details}")

    @property
    def exit_code(self) -> int:
        return ERROR_EXIT_CODES.get(self.kind, EXIT_FAILED)

    @property
    def payload(self) -> dict:
        return {"error": self.kind, "details": self.details, "errors": self.errors}

    @classmethod
    def collected(cls, problems: list[dict]) -> "TrainerError":
        """One error for many problems: the first describes the top object, all go in `errors`."""
        return cls(problems[0]["error"], problems[0]["details"], problems)


def unexpected_error(exc: BaseException) -> TrainerError:
    if is_disk_full(exc):
        return disk_full_error(exc)
    return TrainerError("TrainingFailed", {"exception": f"{type(exc).__name__}: {str(exc)[:2000]}",
                                           "suggestion": "rerun with --debug for the traceback"})


def problem(kind: str, **details) -> dict:
    return {"error": kind, "details": details}


def config_problem(field_: str, value: Any, expected: str, suggestion: str) -> dict:
    return problem("InvalidConfig", field=field_, value=_jsonable(value), expected=expected, suggestion=suggestion)


# A full disk is reported as a full disk: the first failed write, its errno, the path and the free space.
DISK_FULL_ERRNOS = {28: "ENOSPC", 122: "EDQUOT"}
DISK_FULL_MARKERS = ("No space left on device", "Disk quota exceeded", "StorageFull", "os error 28")
SAVE_FULL_BELOW_BYTES = 2**20  # a checkpoint write that fails with less than this free is reported as DiskFull


def is_disk_full(exc: BaseException) -> bool:
    """A failed write because the filesystem is full: an OSError with ENOSPC/EDQUOT anywhere in the exception's
    chain, or a library's wrapped message saying so (safetensors: `IoError(Os { code: 28, kind: StorageFull })`)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if any(marker in str(exc) for marker in DISK_FULL_MARKERS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(exc: BaseException, path: Any = None, free_at_failure: Optional[int] = None,
                    run_id: Optional[str] = None, config: Optional[TrainingConfig] = None) -> TrainerError:
    """DiskFull (exit 1) for the first write that failed: errno, the file (the OSError's own filename, else `path`),
    the free space at the failure and now, and how to continue."""
    err = next((e for e in (exc, exc.__cause__, exc.__context__) if isinstance(e, OSError) and e.errno), None)
    where = (err.filename if err is not None and err.filename else None) or (str(path) if path else None)
    free_now = _free_bytes(where) if where else None
    number = err.errno if err is not None and err.errno in DISK_FULL_ERRNOS else 28
    resume = (resume_command(run_id, config.config_path, config.overrides) if run_id and config
              else f"--resume-from latest --run-id {run_id or 'RUN'}")
    return TrainerError("DiskFull", {
        "errno": number, "errno_name": DISK_FULL_ERRNOS.get(number, "ENOSPC"), "path": where,
        "message": f"{type(exc).__name__}: {str(exc)[:500]}",
        "free_bytes_at_failure": free_at_failure, "free_bytes": free_now,
        "free_gb": round(free_now / 2**30, 3) if free_now is not None else None,
        "suggestion": "the filesystem is full: free space there (or move logging.output_dir to a larger disk, e.g. "
                      f"with --output-dir), then continue with {resume}. Complete checkpoints are unaffected; a "
                      "partial save is removed"})


def damaged_checkpoint_error(field_: str, value: Any, ckpt_dir: Path, reason: str, suggestion: str) -> TrainerError:
    """Exit 2 naming the damaged file and what is wrong with it (reason from check_checkpoint_integrity)."""
    d = Path(ckpt_dir).resolve()
    return TrainerError("CheckpointNotFound", {"field": field_, "value": str(value), "path": str(d),
                                               "file": str(d / reason.split(":", 1)[0]), "reason": reason,
                                               "suggestion": suggestion})


def resume_command(run_id: str, config_path: Optional[str], overrides: list, *, cwd: Optional[str] = None,
                   resume_from: Any = "latest", sets: tuple = ()) -> str:
    """The command that continues run `run_id`, whatever directory it is pasted into: `cd` to the directory the
    run was started from (where a relative output_dir, logging_dir, data path or --output-dir resolve), then this
    interpreter and script by absolute path, the absolute config, the run's --set overrides (one of `sets`, e.g.
    a new learning rate, replaces the run's own value of that key), --resume-from and --run-id. Every resume hint
    is built here: Preempted, TrainingDiverged, Interrupted, RunExists, DiskFull, --status's note."""
    keys = {s.split("=", 1)[0] for s in sets}
    kept = [o for o in overrides or [] if o.split("=", 1)[0] not in keys]
    words = [sys.executable or "python", str(Path(__file__).resolve()), "--config", config_path or "CONFIG"]
    for o in [*kept, *sets]:
        words += ["--set", o]
    words += ["--resume-from", str(resume_from), "--run-id", run_id]
    return f"cd {shlex.quote(cwd or os.getcwd())} && " + " ".join(shlex.quote(w) for w in words)


def run_resume_command(ctx: RunContext, resume_from: Any = "latest", sets: tuple = ()) -> str:
    """resume_command for the run this process writes."""
    return resume_command(ctx.run_id, ctx.config.config_path, ctx.config.overrides, resume_from=resume_from, sets=sets)


def preempted_error(ctx: RunContext) -> TrainerError:
    """SIGTERM/SIGUSR1/SIGHUP stopped the run after a checkpoint of the step under way: exit EXIT_PREEMPTED, manifest
    `interrupted`, and the command that continues it."""
    p = ctx.history.preempted
    saved = next((c for c in reversed(read_checkpoints(ctx.run_dir)) if c["step"] == p["step"]
                  and c.get("health") == "ok"), None)
    return TrainerError("Preempted", {
        "signal": p["signal"], "step": p["step"], "epoch": p["epoch"],
        "checkpoint": saved["path"] if saved else None, "resume_command": run_resume_command(ctx),
        "suggestion": "continue exactly where it stopped with the resume_command"})


def diverged_error(ctx: RunContext, stop_val_loss: Optional[float] = None) -> TrainerError:
    """The spec's TrainingDiverged payload, naming a checkpoint whose weights are healthy (last_valid_checkpoint)."""
    stop = ctx.history.stop
    last_valid, why = last_valid_checkpoint(ctx, stop_val_loss)
    lr = ctx.config.training.hyperparameters.learning_rate
    new_lr = max(lr / 10, 1e-6)
    train_loss = stop.get("train_loss")
    if train_loss is None and ctx.history.train:
        train_loss = _json_float(ctx.history.train[-1][2])
    command = (run_resume_command(ctx, last_valid, (f"training.hyperparameters.learning_rate={new_lr:.1e}",))
               if last_valid else None)
    how = (f": {command}" if last_valid else f" as a new run from the base model (--set training.hyperparameters."
                                             f"learning_rate={new_lr:.1e} --run-id NEW_ID): {why}")
    return TrainerError("TrainingDiverged", {
        "epoch": _best_epoch(stop["epoch"]) if stop["epoch"] else 1, "epoch_float": stop["epoch"],
        "step": stop["step"], "train_loss": train_loss, "reason": stop["reason"], "kind": stop["kind"],
        "last_valid_checkpoint": last_valid, "last_valid_checkpoint_reason": why, "resume_command": command,
        "suggestion": f"Reduce learning rate to {new_lr:.1e} and try again{how}"})


# Out of memory, however the allocator says it: Python's MemoryError, torch's CPU allocator (`DefaultCPUAllocator:
# can't allocate memory`), the CUDA caching allocator (torch.OutOfMemoryError), an OSError with ENOMEM or pyarrow's
# `Memory mapping file failed: Cannot allocate memory` (datasets memory-maps its cache).
OOM_MARKERS = ("can't allocate memory", "cannot allocate memory", "out of memory", "failed to allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure anywhere in the exception's chain (see OOM_MARKERS). A message is trusted only on
    the types allocators raise (RuntimeError, OSError), so a ValueError that merely mentions memory is not one."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
            return True
        if isinstance(exc, OSError) and exc.errno == 12:  # ENOMEM
            return True
        if isinstance(exc, (RuntimeError, OSError)) and any(m in str(exc).lower() for m in OOM_MARKERS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def out_of_memory_error(config: TrainingConfig, message: str, estimated_gb: Optional[float] = None,
                        available_gb: Optional[float] = None, fix: Optional[str] = None) -> TrainerError:
    hp = config.training.hyperparameters
    if fix is None:
        fix = "Reduce " + smaller_batch_fix(hp.batch_size, hp.gradient_accumulation_steps, max(1, hp.batch_size // 2))
        if not config.model.gradient_checkpointing:
            fix += ", or enable model.gradient_checkpointing"
    return TrainerError("OutOfMemory", {"batch_size": hp.batch_size, "seq_length": config.data.max_seq_length,
                                        "estimated_memory_gb": estimated_gb, "available_memory_gb": available_gb,
                                        "message": message[:300], "suggestion": fix})


def smaller_batch_fix(batch_size: int, accumulation: int, limit: int) -> str:
    """`batch_size to B and gradient_accumulation_steps to A: the effective batch stays E`, with B the largest
    divisor of E = batch_size x accumulation not above `limit`, so the effective batch stays exactly E. When that
    divisor is far below the limit, the near miss is offered too, saying what it changes."""
    effective = batch_size * accumulation
    b = next(d for d in range(min(limit, effective), 0, -1) if effective % d == 0)
    fix = (f"batch_size to {b} and gradient_accumulation_steps to {effective // b}: the effective batch stays "
           f"{effective}")
    if b < limit // 2:
        a = math.ceil(effective / limit)
        fix += (f" (batch_size {limit} with gradient_accumulation_steps {a} is faster but makes it {limit * a}, "
                f"not {effective})")
    return fix


def dry_run_failed(report: dict, path: Path) -> TrainerError:
    """The dry run's failure, before any training step: exit 1 with its checks and where the report is."""
    return TrainerError("TrainingFailed", {
        "checks": report["checks"], "report": str(path), "initial_loss": report["initial_loss"],
        "suggestion": "a non-finite loss on the first steps: check the data and lower the learning rate"})


# --------------------------------------------------------------------------------------------------
# 4. Config loading: YAML -> dataclasses, unknown keys, types, --set overrides, path resolution
# --------------------------------------------------------------------------------------------------

def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader (no object construction) that also reads `2e-5` as a float, as YAML 1.2 does.
        PyYAML's YAML 1.1 resolver reads it as the string "2e-5", the classic learning-rate typo trap.
        Aliases are bounded: a document whose aliases expand past YAML_MAX_NODES nodes or YAML_MAX_CHARS
        characters (a "billion laughs" bomb: 300 bytes that expand to gigabytes), or that uses an anchor inside
        itself, is refused before anything walks the expansion."""

        def compose_document(self):
            node = super().compose_document()
            _check_yaml_expansion(node)
            _check_yaml_duplicates(node)
            return node

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."))
    return Loader


class YamlExpansionError(ValueError):
    """A YAML document whose aliases expand past the limits, or refer to themselves (_check_yaml_expansion)."""


def _check_yaml_expansion(root: Any) -> None:
    """Nodes and scalar characters of the composed document as if every alias were expanded, counted on the shared
    node graph (each node once, memoised), so a bomb is measured in microseconds without being expanded."""
    import yaml
    sizes: dict[int, tuple[int, int]] = {}
    open_: set[int] = set()

    def size(node) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise YamlExpansionError("an anchor is used inside itself (a recursive alias)")
        open_.add(key)
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        nodes, chars = 1, len(node.value) if isinstance(node, yaml.ScalarNode) else 0
        for child in children:
            n, c = size(child)
            nodes, chars = nodes + n, chars + c
            if nodes > YAML_MAX_NODES or chars > YAML_MAX_CHARS:
                raise YamlExpansionError(f"its aliases expand to more than {YAML_MAX_NODES} nodes or {YAML_MAX_CHARS} "
                                         "characters (an alias bomb?)")
        open_.discard(key)
        sizes[key] = (nodes, chars)
        return nodes, chars

    if root is not None:
        size(root)


class YamlDuplicateKeys(ValueError):
    """Keys repeated within one YAML mapping: `duplicates` is [(dotted key, [line, line, ...]), ...]."""

    def __init__(self, duplicates: list):
        self.duplicates = duplicates
        super().__init__(duplicates)


def _check_yaml_duplicates(root: Any) -> None:
    """Every key written twice in one mapping, at any depth, with the lines of each copy. PyYAML keeps the last
    copy and drops the first without a word: a second `training:` pasted at the end of a config silently replaces
    the whole first section (learning rate, batch size, epochs back to the defaults). A `<<: *anchor` merge is not
    a duplicate: overriding merged keys is what it is for. Run after _check_yaml_expansion (bounded), and each
    node is walked once, so an alias is checked where it is defined."""
    import yaml
    seen: set[int] = set()
    found: list = []

    def walk(node, path: str) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, child in enumerate(node.value):
                walk(child, f"{path}[{i}]")
        if not isinstance(node, yaml.MappingNode):
            return
        lines: dict[str, list[int]] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None:
                lines.setdefault(key, []).append(key_node.start_mark.line + 1)
                walk(value_node, f"{path}.{key}" if path else key)
        found.extend((f"{path}.{k}" if path else k, at) for k, at in lines.items() if len(at) > 1)

    if root is not None:
        walk(root, "")
    if found:
        raise YamlDuplicateKeys(sorted(found, key=lambda d: d[1][1]))


def _parse_yaml(text: str, source: str) -> Any:
    import yaml
    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except YamlDuplicateKeys as exc:
        raise TrainerError.collected([problem(
            "InvalidConfig", field=key, value=key.rsplit(".", 1)[-1], line=lines[1], lines=lines, path=source,
            expected="each key once in its mapping",
            suggestion=f"`{key.rsplit('.', 1)[-1]}` is written {len(lines)} times (lines "
                       f"{', '.join(map(str, lines))} of {source}): YAML would keep only the last and silently "
                       "drop the others; merge them into one") for key, lines in exc.duplicates]) from None
    except YamlExpansionError as exc:
        raise TrainerError("InvalidConfig", {
            "field": None, "value": None, "path": source, "problem": str(exc),
            "expected": f"at most {YAML_MAX_NODES} YAML nodes and {YAML_MAX_CHARS} characters with every alias "
                        "(*name) expanded, and no anchor used inside itself",
            "suggestion": f"write the values out in {source} instead of nesting aliases; a training config needs "
                          "only a few hundred nodes"}) from None
    except RecursionError:
        raise TrainerError("InvalidConfig", {
            "field": None, "value": None, "path": source, "expected": "YAML nested a few levels deep",
            "problem": "nested too deeply to read", "suggestion": f"flatten the nesting in {source}"}) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise TrainerError("InvalidConfig", {
            "field": None, "value": None, "line": line, "path": source,
            "expected": "valid YAML", "problem": str(getattr(exc, "problem", exc)),
            "suggestion": f"fix the YAML syntax at line {line} of {source} (check indentation and colons)"})


def apply_overrides(raw: dict, overrides: list[str]) -> None:
    """Apply `dotted.key=value` overrides to the raw YAML mapping; values are parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise TrainerError("InvalidConfig", {
                "field": item, "value": item, "expected": "dotted.key=value",
                "suggestion": "write e.g. --set training.hyperparameters.learning_rate=1e-5"})
        key, _, value = item.partition("=")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = _parse_yaml(value, f"--set {item}") if value.strip() else None


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string", list: "a list",
               dict: "a mapping"}


def _check_type(value: Any, tp: Any) -> bool:
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _build_section(cls: type, raw: Any, path: str, problems: list) -> Any:
    """Build dataclass `cls` from mapping `raw`, collecting every unknown key, missing key and type error."""
    if not isinstance(raw, dict):
        problems.append(config_problem(path, raw, f"a mapping of {cls.__name__} keys",
                                       f"write `{path}:` followed by indented `key: value` lines"))
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)
            hint = f"did you mean `{close[0]}`?" if close else f"valid keys: {', '.join(fields)}"
            problems.append(config_problem(f"{path}.{key}", raw[key], f"one of the keys of `{path}`",
                                           f"remove or rename it; {hint}"))
    values = {}
    for name, f in fields.items():
        dotted = f"{path}.{name}"
        tp = hints[name]
        if typing.get_origin(tp) is typing.Union:  # Optional[X]
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
            optional = True
        else:
            optional = False
        if name not in raw:
            if f.default is REQUIRED and f.default_factory is dataclasses.MISSING:
                problems.append(config_problem(dotted, None, _TYPE_NAMES.get(tp, tp.__name__),
                                               f"add `{name}:` under `{path}` ({f.metadata.get('doc', 'required')})"))
            continue
        value = raw[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build_section(tp, value, dotted, problems)
        elif value is None and optional:
            values[name] = None
        elif tp is str and isinstance(value, (int, float, dt.date)) and not isinstance(value, bool):
            values[name] = value.isoformat() if isinstance(value, dt.date) else str(value)  # unquoted 2025-11-17
        elif not _check_type(value, tp):
            problems.append(config_problem(dotted, value, _TYPE_NAMES.get(tp, tp.__name__),
                                           _type_fix(name, value, tp, f)))
        elif tp is list and not all(isinstance(v, str) for v in value):
            problems.append(config_problem(dotted, value, "a list of strings", f"quote each item of `{name}`"))
        else:
            keep_int = isinstance(value, int) and f.metadata.get("int_stays_int")  # num_epochs: 3 is recorded as 3
            values[name] = float(value) if tp is float and not keep_int else value
    if any(v is None and not _is_optional(hints[k]) for k, v in values.items()):
        return None
    try:
        return cls(**values)
    except TypeError:  # a required key was missing: already reported
        return None


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)


def _type_fix(name: str, value: Any, tp: Any, f: dataclasses.Field) -> str:
    default = None if f.default is REQUIRED else f.default
    if isinstance(value, str) and tp in (int, float):
        return f"write `{name}` as a bare number without quotes, e.g. {name}: {default if default is not None else 1}"
    if tp is bool:
        return f"write `{name}: true` or `{name}: false`"
    if isinstance(value, (dict, list)):
        return f"`{name}` takes {_TYPE_NAMES.get(tp, 'one value')}, not a {type(value).__name__}"
    return f"set `{name}` to {_TYPE_NAMES.get(tp, tp.__name__)}" + (f", e.g. {default!r}" if default is not None else "")


# Config values that name a file, a directory or a URI: `$NAME` and `${NAME}` in them are environment variables,
# expanded when the config is loaded (`output_dir: ${SCRATCH}/runs`); `$$` is a literal `$`. A variable that is not
# set (or set empty) is InvalidConfig naming it: taken literally it would create a directory called `${SCRATCH}`.
# Paths given on the command line (--output-dir, --baseline) are the shell's to expand and are taken as given.
PATH_KEYS = ("model.base_checkpoint", "data.train_path", "data.valid_path", "data.test_path", "logging.output_dir",
             "logging.logging_dir", "logging.tensorboard.log_dir", "logging.mlflow.tracking_uri",
             "compute.deepspeed", "evaluation.baseline")
ENV_REFERENCE_RE = re.compile(r"\$(?:\{(?P<braced>[^}]*)\}|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<dollar>\$))")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def expand_path_variables(config: TrainingConfig, literal: typing.Collection[str] = ()) -> list[dict]:
    """Expand the environment variables in the PATH_KEYS values of `config` in place; the problems (a variable
    not set, `${...}` holding no variable name) are returned, one per key."""
    problems = []
    for dotted in PATH_KEYS:
        section, _, name = dotted.rpartition(".")
        owner = _dotted_get(config, section)
        value = getattr(owner, name)
        if dotted in literal or not isinstance(value, str) or "$" not in value:
            continue
        missing: list[str] = []

        def expand(m: re.Match) -> str:
            if m["dollar"]:
                return "$"
            var = m["name"] or m["braced"]
            if not ENV_NAME_RE.match(var) or not os.environ.get(var):
                missing.append(var)
                return m[0]
            return os.environ[var]

        expanded = ENV_REFERENCE_RE.sub(expand, value)
        if not missing:
            setattr(owner, name, expanded)
            continue
        var = missing[0]
        named = ENV_NAME_RE.match(var)
        problems.append(config_problem(
            dotted, value, "a path whose environment variables ($NAME, ${NAME}) are set" if named
            else "${NAME} with NAME a variable name (letters, digits, _)",
            (f"the environment variable {var} is not set{' (it is empty)' if var in os.environ else ''}: export "
             f"{var}=... before running, or write the path out in full" if named
             else f"`${{{var}}}` names no variable (${{X:-default}} and the like are not supported): write the "
                  "path out, or use $NAME") + "; write $$ for a literal $"))
    return problems


def _resolve_input_path(value: str, config_dir: Path) -> tuple[Path, str]:
    """Resolve a data path: the config's folder first, then the working directory."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p, "absolute"
    by_config = (config_dir / p).resolve()
    if by_config.exists():
        return by_config, "relative to the config file's folder"
    by_cwd = (Path.cwd() / p).resolve()
    if by_cwd.exists():
        return by_cwd, "relative to the working directory"
    return by_config, "relative to the config file's folder (not found there nor in the working directory)"


def load_training_config(path: str, overrides: list[str] | None = None,
                         literal: dict | None = None) -> TrainingConfig:
    """Read, override and type-check the YAML config. Raises TrainerError listing every problem found.
    `overrides` are `dotted.key=value` strings whose values are YAML scalars (--set); `literal` maps dotted
    keys to values used as they are (paths from --output-dir and --baseline: `runs #2` stays `runs #2`)."""
    config_path = Path(path).expanduser()
    if not config_path.is_file():
        raise TrainerError("InvalidConfig", {
            "field": "--config", "value": str(path), "expected": "an existing YAML file",
            "resolved_path": str(config_path.resolve()),
            "suggestion": "pass --config with the path to training_config.yaml"})
    try:
        text = config_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TrainerError("InvalidConfig", {
            "field": None, "value": None, "path": str(config_path), "byte_offset": exc.start,
            "expected": "a UTF-8 text file", "suggestion": f"save {config_path.name} as UTF-8 (bad byte at offset "
                                                            f"{exc.start})"})
    raw = _parse_yaml(text, str(config_path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TrainerError("InvalidConfig", {
            "field": None, "value": _jsonable(raw), "expected": "a YAML mapping with sections "
            + ", ".join(SECTIONS), "suggestion": "start the file with `model:`, `data:`, `training:`, `logging:`"})
    apply_overrides(raw, overrides or [])
    for dotted, value in (literal or {}).items():
        node = raw
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[last] = value
    overrides = list(overrides or []) + [f"{k}={v}" for k, v in (literal or {}).items()]

    problems: list[dict] = []
    for key in raw:
        if key not in SECTIONS:
            close = difflib.get_close_matches(str(key), SECTIONS, n=1, cutoff=0.6)
            hint = f"did you mean `{close[0]}`?" if close else f"valid sections: {', '.join(SECTIONS)}"
            problems.append(config_problem(str(key), raw[key], "a top-level section", f"remove or rename it; {hint}"))
    built = {}
    for name, cls in SECTIONS.items():
        if name not in raw:
            if name in REQUIRED_SECTIONS:
                problems.append(config_problem(name, None, f"a `{name}:` section",
                                               f"add the `{name}:` section (see training_config.yaml)"))
                continue
            raw[name] = {}
        built[name] = _build_section(cls, raw[name], name, problems)
    if problems:
        raise TrainerError.collected(problems)

    config = TrainingConfig(**built, config_path=str(config_path.resolve()), config_text=text,
                            overrides=list(overrides or []))
    problems = expand_path_variables(config, literal=set(literal or {}))
    if problems:
        raise TrainerError.collected(problems)
    config_dir = config_path.resolve().parent
    for key in ("train_path", "valid_path", "test_path"):
        resolved, how = _resolve_input_path(getattr(config.data, key), config_dir)
        config.resolved_paths[f"data.{key}"] = {"path": str(resolved), "resolved": how}
    ckpt = config.model.base_checkpoint
    if _looks_like_local_path(ckpt) or (config_dir / ckpt).exists():
        resolved, how = _resolve_input_path(ckpt, config_dir)
        config.resolved_paths["model.base_checkpoint"] = {"path": str(resolved), "resolved": how}
    return config


def _looks_like_local_path(ref: str) -> bool:
    """A Hub id is `name` or `org/name`; anything with ./, ~, a leading /, or that exists is a path."""
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or os.path.exists(ref) or "\\" in ref


def data_path(config: TrainingConfig, key: str) -> Path:
    return Path(config.resolved_paths[f"data.{key}"]["path"])


def checkpoint_ref(config: TrainingConfig) -> str:
    """The base checkpoint as from_pretrained should see it: resolved local dir, or the Hub id."""
    entry = config.resolved_paths.get("model.base_checkpoint")
    return entry["path"] if entry else config.model.base_checkpoint


# --------------------------------------------------------------------------------------------------
# 5. Validation (spec Phase 1): per-field rules, cross-section rules, data files, base checkpoint, device
# --------------------------------------------------------------------------------------------------

MAX_BAD_LINES = 5  # bad data lines reported per file


@dataclass
class ValidationResult:
    """What preflight found. `errors` empty means the run may start."""
    errors: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    data: dict = field(default_factory=dict)  # split -> {"path", "samples", "shape"}
    checkpoint: dict = field(default_factory=dict)  # config.json of the base checkpoint, where readable
    memory: dict = field(default_factory=dict)  # estimate_memory + what is available
    disk: dict = field(default_factory=dict)  # check_disk: free space on the output filesystem vs the checkpoints
    integrity: dict = field(default_factory=dict)  # data_integrity: train duplicates, valid/test prompts seen in train
    baseline: dict = field(default_factory=dict)  # baseline_differences: config, data and memory vs the baseline run
    wandb: dict = field(default_factory=dict)  # W&B online but unreachable: the offline fallback and why (_wandb_rules)

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_if_failed(self) -> None:
        if self.errors:
            raise TrainerError.collected(self.errors)


# A field's bounds in its metadata: (key, symbol in `expected`, bracket in a range, test)
LIMIT_BOUNDS = (("minimum", ">=", "[", lambda v, b: v >= b), ("exclusive_minimum", ">", "(", lambda v, b: v > b),
                ("maximum", "<=", "]", lambda v, b: v <= b), ("exclusive_maximum", "<", ")", lambda v, b: v < b))


def _declared_choices(md: typing.Mapping) -> Optional[Any]:
    choices = md.get("choices")
    return choices() if callable(choices) else choices


def _within_limits(md: typing.Mapping, value: Any) -> bool:
    """`value` passes every limit declared in the field metadata `md` (a comparison with nan fails)."""
    choices = _declared_choices(md)
    if md.get("finite") and isinstance(value, float) and not math.isfinite(value):
        return False
    if choices is not None and value not in choices:
        return False
    if md.get("non_empty") and not (value.strip() if isinstance(value, str) else value):
        return False
    if not all(test(value, md[key]) for key, _, _, test in LIMIT_BOUNDS if key in md):
        return False
    return "check" not in md or md["check"](value)


def _limits_expected(md: typing.Mapping, tp: Any) -> str:
    """The `expected` text of a field's limits: declared, or said from them ("integer >= 1", "number in (0, 1])."""
    choices = _declared_choices(md)
    if "expected" in md:
        return md["expected"].format(choices=list(choices)) if choices is not None else md["expected"]
    if choices is not None:
        return f"one of {list(choices)}"
    if md.get("non_empty"):
        return "a non-empty string" if tp is str else "a non-empty list"
    noun = "integer" if tp is int else "number"
    bounds = [(sym, bracket, md[key]) for key, sym, bracket, _ in LIMIT_BOUNDS if key in md]
    if len(bounds) == 2:  # a low and a high bound: a range, "number in (0, 1]"
        (_, low_bracket, low), (_, high_bracket, high) = bounds
        return f"{noun} in {low_bracket}{low}, {high}{high_bracket}"
    return " and ".join(f"{noun} {sym} {bound}" for sym, _, bound in bounds) or "a valid value"


def _limits_suggestion(f: dataclasses.Field, value: Any) -> str:
    md = f.metadata
    if "suggestion" not in md:
        return f"set {f.name}" if f.default is REQUIRED or f.default is None else f"set {f.name}: {f.default}"
    if "closest" not in md:
        return md["suggestion"]
    fallback, cutoff = md["closest"]
    close = difflib.get_close_matches(str(value), list(_declared_choices(md)), n=1, cutoff=cutoff)
    return md["suggestion"].format(closest=close[0] if close else fallback)


def _section_limit_problems(section: Any, path: str, problems: list, warnings: list) -> None:
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, dotted, md = getattr(section, f.name), f"{path}.{f.name}", f.metadata
        if dataclasses.is_dataclass(value):
            _section_limit_problems(value, dotted, problems, warnings)
            continue
        applies = value is not None and ("when" not in md or getattr(section, md["when"]))
        if applies and not _within_limits(md, value):
            tp = hints[f.name]
            tp = next(a for a in typing.get_args(tp) if a is not type(None)) if _is_optional(tp) else tp
            problems.append(config_problem(dotted, value, _limits_expected(md, tp), _limits_suggestion(f, value)))
            continue
        if applies and "recommended" in md:
            low, high = md["recommended"]
            if (low is not None and value < low) or (high is not None and value > high):
                warnings.append(md["advice"].format(field=dotted, value=value))
        # inf/nan is never a setting (`grad_norm_limit: .inf` would switch a guard off unseen, and JSON cannot hold
        # it): every number of the config must be finite, whether or not its section is enabled
        numbers = _flatten(value, dotted + ".") if isinstance(value, dict) else {dotted: value}
        for key, number in numbers.items():
            if isinstance(number, float) and not math.isfinite(number):
                problems.append(config_problem(key, number, "a finite number", f"set {key.rsplit('.', 1)[-1]} to a "
                                               "finite number (inf and nan are not settings)"))


def _field_limit_problems(config: TrainingConfig, warnings: Optional[list] = None) -> list[dict]:
    """Every field outside the limits its metadata declares (the keys are listed above the config dataclasses),
    in the order of the YAML sections and their keys, one problem per field at most; and any other inf/nan.
    A value within its limits but outside its "recommended" range adds its advice to `warnings`."""
    problems: list = []
    for name in SECTIONS:
        _section_limit_problems(getattr(config, name), name, problems, [] if warnings is None else warnings)
    return problems


def _field_rules(config: TrainingConfig, res: ValidationResult) -> None:
    """Each field against its declared limits (`_field_limit_problems`), then the rules that relate two or more
    fields. A field already outside its own limits is not compared with others (one mistake, one error)."""
    limit_problems = _field_limit_problems(config, res.warnings)
    res.errors.extend(limit_problems)
    outside = {p["details"]["field"] for p in limit_problems}
    err, warn = res.errors.append, res.warnings.append
    hp, c, lo = config.training.hyperparameters, config.compute, config.model.lora
    if hp.fp16 and hp.bf16:
        err(config_problem("training.hyperparameters.bf16", True, "at most one of fp16 and bf16",
                           "set fp16: false to use bf16 (preferred on Ampere and newer GPUs) or bf16: false"))
    flags = "fp16" if hp.fp16 else "bf16" if hp.bf16 else "no"
    if "compute.mixed_precision" not in outside and flags != c.mixed_precision and not (hp.fp16 and hp.bf16):
        err(config_problem("compute.mixed_precision", c.mixed_precision,
                           f"{flags} (training.hyperparameters has fp16={hp.fp16}, bf16={hp.bf16})",
                           f"set compute.mixed_precision: {flags}, or change the fp16/bf16 flags to match"))
    if lo.enabled and lo.quantization in ("4bit", "8bit") and c.device != "cuda":
        err(config_problem("model.lora.quantization", lo.quantization, "none when compute.device is cpu",
                           "QLoRA (bitsandbytes 4/8-bit) needs a CUDA GPU: set quantization: none for a "
                           "CPU run, or compute.device: cuda on a GPU machine"))
    elif not lo.enabled and lo.quantization != "none":
        err(config_problem("model.lora.quantization", lo.quantization, "none unless model.lora.enabled is true",
                           "set model.lora.enabled: true (QLoRA trains adapters on the quantized model)"))
    if c.distributed_backend == "nccl" and c.device == "cpu":
        err(config_problem("compute.distributed_backend", "nccl", "gloo when compute.device is cpu",
                           "nccl needs CUDA GPUs: set distributed_backend: gloo for CPU runs"))
    ae = config.evaluation.answer_eval
    for dotted in ("training.checkpointing.metric_for_best_model", "training.optimization.early_stopping_metric"):
        metric = _dotted_get(config, dotted)
        if metric in ANSWER_EVAL_METRICS and dotted not in outside and not (ae.on_validation and ae.max_records):
            err(config_problem(dotted, metric, "evaluation.answer_eval.on_validation: true with max_records >= 1 "
                               f"(without it no evaluation reports {metric})",
                               "set evaluation.answer_eval.on_validation: true (each evaluation then generates "
                               "answers for up to max_records validation records), or choose val_perplexity"))
    lg = config.logging
    if config.training.checkpointing.save_strategy == "epoch" and lg.save_steps != LoggingConfig.save_steps:
        warn(f"logging.save_steps={lg.save_steps} applies to save_strategy: steps only; with save_strategy: epoch "
             "checkpoints are saved at every epoch end and at every evaluation (every "
             f"{lg.eval_steps} steps)")


def _writable_dir_problem(dotted: str, value: str) -> Optional[dict]:
    """The directory exists and is writable, or can be created."""
    p = Path(value).expanduser().resolve()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return config_problem(dotted, value, "a directory path", f"{probe} is a file; choose another directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        return config_problem(dotted, value, "a writable directory",
                              f"{probe} is not writable by this user; choose a directory you can write to")
    return None


def _output_rules(config: TrainingConfig, res: ValidationResult) -> None:
    lg = config.logging
    dirs = [("logging.output_dir", lg.output_dir), ("logging.logging_dir", lg.logging_dir)]
    if lg.tensorboard.enabled:
        dirs.append(("logging.tensorboard.log_dir", lg.tensorboard.log_dir))
    for dotted, value in dirs:
        p = _writable_dir_problem(dotted, value)
        if p:
            res.errors.append(p)
    wb = lg.wandb
    if wb.enabled:
        mode = os.environ.get("WANDB_MODE", "").lower()
        has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in _read_text(Path.home() / ".netrc")
        if mode not in ("offline", "disabled", "dryrun") and not has_key:
            res.errors.append(config_problem(
                "logging.wandb.enabled", True, "W&B credentials, or WANDB_MODE=offline",
                "run `wandb login` (or set WANDB_API_KEY), export WANDB_MODE=offline to sync later, "
                "or set logging.wandb.enabled: false"))
        if not wb.project:
            res.errors.append(config_problem("logging.wandb.project", wb.project, "a W&B project name",
                                             "set project: finance-smollm3"))


def _write_probe(path: Path) -> Optional[str]:
    """Why nothing can be written at `path` (a directory, or where one would be created), or None. A file is
    created and removed in its nearest existing ancestor: os.access says yes to root on a read-only filesystem,
    a real write does not. Nothing is left behind, no directory is created."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a directory"
    test = probe / f".finance-trainer-write-test-{os.getpid()}"
    try:
        os.close(os.open(test, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(test)
    except OSError as exc:
        return f"{probe} is not writable ({exc.strerror or exc})"
    return None


def environment_locations(config: TrainingConfig, res: ValidationResult) -> list[tuple[str, Path, str]]:
    """(variable to set, the directory it gives now, what is written there) for every place outside the run dir
    that a training run writes: the datasets cache (tokenized splits), the temporary directory, the run index,
    and the Hugging Face Hub cache when the base model is to be downloaded (a read-only, pre-filled Hub cache is a
    normal setup and is left alone)."""
    home = Path.home()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    hf_home = Path(os.environ.get("HF_HOME") or (Path(xdg) if os.path.isabs(xdg) else home / ".cache") / "huggingface")
    import tempfile
    out = [("HF_DATASETS_CACHE", Path(os.environ.get("HF_DATASETS_CACHE") or hf_home / "datasets"),
            "the datasets cache (the tokenized splits)"),
           ("TMPDIR", Path(os.environ.get("TMPDIR") or tempfile.gettempdir()), "temporary files"),
           ("XDG_CACHE_HOME", run_index_path().parent, "the index of runs (--status RUN_ID from any folder)")]
    if any("will be downloaded" in w for w in res.warnings):
        out.append(("HF_HUB_CACHE" if os.environ.get("HF_HUB_CACHE") else "HF_HOME",
                    Path(os.environ.get("HF_HUB_CACHE") or hf_home / "hub"), "the downloaded base model"))
    return out


def _environment_rules(config: TrainingConfig, res: ValidationResult) -> None:
    """Every place a run writes outside its run dir is writable, checked before anything is created in the run
    dir: found only after setup, a read-only home (the datasets cache) left a `failed` run dir behind, and the
    rerun after the fix was refused as RunExists. A failure is exit 2 naming the variable that moves it."""
    for var, path, what in environment_locations(config, res):
        why = _write_probe(path)
        if why:
            res.errors.append(config_problem(
                var, str(path), f"a writable directory for {what}",
                f"{why}: export {var}=<a writable directory>" + ("" if var in os.environ else
                                                                 f" ({path} is its default here)")))


WANDB_CHECK_SECONDS = 5  # preflight's connection to the W&B server (or the proxy in front of it), at most
WANDB_INIT_SECONDS = 30  # wandb.init's own timeout (W&B's default 90 s), for a server that accepts and then stalls
WANDB_DEFAULT_URL = "https://api.wandb.ai"


def server_unreachable(url: str, timeout_seconds: float) -> Optional[str]:
    """Why no TCP connection to `url`'s host (through the proxy the environment sets for it, unless NO_PROXY lets
    it go direct) opens within `timeout_seconds`, or None when one does. Bounded as a whole, name lookup
    included: the attempt runs in a daemon thread that is abandoned when the time is up."""
    import socket
    import threading
    import urllib.parse
    import urllib.request
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = via.hostname or "", via.port or 80
    outcome: dict = {}

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_seconds).close()
            outcome["ok"] = True
        except OSError as exc:
            outcome["error"] = f"{type(exc).__name__}: {exc}"

    attempt = threading.Thread(target=connect, name="server-check", daemon=True)
    attempt.start()
    attempt.join(timeout_seconds + 0.5)
    if outcome.get("ok"):
        return None
    return f"{host}:{port}: " + outcome.get("error", f"no answer within {timeout_seconds:g} s")


def _wandb_rules(config: TrainingConfig, res: ValidationResult) -> None:
    """W&B online (the spec turns it on) on a node that cannot reach its server: wandb.init would wait 90 s and
    fail the run generically. Found here in at most WANDB_CHECK_SECONDS, and the run falls back to W&B offline
    (files under <run_dir>/wandb, `wandb sync` them later) with a warning and the manifest's `wandb_fallback`:
    an air-gapped GPU node still trains, and loses no metrics. Rank 0 only (the one process that logs to W&B)."""
    wb = config.logging.wandb
    mode = os.environ.get("WANDB_MODE", "").lower()
    if not wb.enabled or mode in ("offline", "disabled", "dryrun") or not is_main_process():
        return
    server = os.environ.get("WANDB_BASE_URL") or WANDB_DEFAULT_URL
    why = server_unreachable(server, WANDB_CHECK_SECONDS)
    if why is None:
        return
    res.wandb = {"requested_mode": mode or "online", "mode": "offline", "server": server, "reason": why,
                 "sync": "wandb sync <run_dir>/wandb/offline-run-*"}
    res.warnings.append(f"logging.wandb: the W&B server {server} cannot be reached ({why}): W&B runs offline for "
                        "this run (files under <run_dir>/wandb; `wandb sync` them once the node is online). Set "
                        "WANDB_MODE=offline to skip this check, or logging.wandb.enabled: false")


def baseline_reference(config: TrainingConfig) -> Optional[str]:
    """The run this one is compared with: evaluation.baseline (or --baseline), nothing when it is `none` (or
    --no-baseline), else the automatic pick of choose_baseline, if it found one."""
    ref = config.evaluation.baseline
    if ref is not None:
        return None if ref.lower() == "none" else ref
    return (config.auto_baseline or {}).get("path")


def choose_baseline(config: TrainingConfig, exclude: Optional[Path] = None) -> Optional[dict]:
    """Spec Session 3 gives no baseline flag: with evaluation.baseline null, the most recent completed run of the same
    data.dataset_name is the baseline, looked for in logging.output_dir, else among the runs this machine started (the
    run index). `exclude` is this run's own dir (a resume or a restarted run id). Sets config.auto_baseline and says
    on the console which run was chosen and how to turn it off."""
    if config.evaluation.baseline is not None or config.auto_baseline is not None:
        return config.auto_baseline
    out_dir = Path(config.logging.output_dir).expanduser().resolve()
    own = exclude.resolve() if exclude is not None else None
    local = sorted(out_dir.glob(f"*/{MANIFEST_NAME}")) if out_dir.is_dir() else []
    indexed = [Path(d) / MANIFEST_NAME for d in _run_index().values() if isinstance(d, str)]
    for where, manifests in ((str(out_dir), local), ("the run index", indexed)):
        found = []
        for path in manifests:
            m = read_json_lenient(path) if path.is_file() else {}
            dataset = m.get("dataset") if isinstance(m.get("dataset"), dict) else {}
            if (m.get("status") == "completed" and dataset.get("name") == config.data.dataset_name
                    and isinstance(m.get("completed_at"), str) and path.parent.resolve() != own):
                found.append((m["completed_at"], str(path.parent.resolve()), m.get("run_id")))
        if found:
            completed_at, run_dir, run_id = max(found)
            config.auto_baseline = {"path": run_dir, "run_id": run_id, "completed_at": completed_at,
                                    "found_in": where}
            # a run moved aside by --force (<run_id>.abandoned-<time>) keeps its run id: name it by its folder
            shown = run_id if Path(run_dir).name == run_id else f"{Path(run_dir).name} (run {run_id})"
            log.info("comparing with %s (completed %s): the most recent completed run of %s in %s; "
                     "evaluation.baseline: none or --no-baseline turns this off", shown, completed_at[:10],
                     config.data.dataset_name, where)
            return config.auto_baseline
    return None


def _baseline_manifest_path(ref: str) -> Optional[Path]:
    """The baseline's manifest, if `ref` is a manifest or a run dir holding one and it is a JSON object."""
    p = Path(ref).expanduser()
    p = p / MANIFEST_NAME if p.is_dir() else p
    return p.resolve() if p.is_file() and read_json_lenient(p) else None


def detect_shape(record: Any) -> Optional[str]:
    """The record shape of one JSONL record, or None when it has none we support."""
    if not isinstance(record, dict):
        return None
    for shape, keys in RECORD_SHAPES.items():
        if all(k in record for k in keys):
            return shape
    return None


def _record_problem(record: dict, shape: str) -> Optional[str]:
    """Why a record of a known shape cannot be trained on, or None."""
    if shape == "messages":
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "`messages` must be a non-empty list of {role, content}"
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                return f"messages[{i}] must be an object with string `role` and `content`"
            if m["role"] not in ("system", "user", "assistant"):
                return f"messages[{i}].role is {m['role']!r}; expected system, user or assistant"
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            return "no assistant message with non-empty content (nothing to learn from)"
        own = record.get("chat_template_kwargs")
        why = template_kwargs_problem(own) if own is not None else None
        return f"`chat_template_kwargs` must be {why}" if why else None
    if record.get("chat_template_kwargs") is not None:
        return "`chat_template_kwargs` is read in messages records only (the chat template renders those)"
    for key in RECORD_SHAPES[shape] + (("input",) if shape == "instruction" else ()):
        value = record.get(key, "")
        if not isinstance(value, str):
            return f"`{key}` must be a string, got {type(value).__name__}"
    answer_key = {"text": "text", "prompt_completion": "completion", "instruction": "output"}[shape]
    if not record[answer_key].strip():
        return f"`{answer_key}` is empty"
    return None


def lines_with_progress(fh, total_bytes: int, desc: str):
    """The lines of a binary file, with the bytes read reported to a Progress (a large split takes seconds)."""
    with progress(total_bytes, desc, byte_counts=True) as bar:
        for raw in fh:
            bar.update(len(raw))
            yield raw


def scan_jsonl(path: Path, split: str, forced: str, how: str) -> tuple[dict, list]:
    """Check one JSONL split line by line. Returns ({samples, shape}, problems)."""
    dotted = f"data.{split}_path"
    if not path.exists():
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
        return {}, [problem("DataPathNotFound", field=dotted, path=str(path), resolved=how,
                            nearest_existing_parent=str(parent),
                            suggestion=f"check {dotted}; relative paths are read from the config file's folder "
                                       "first, then the working directory. Run DataPrepAgent first if the split "
                                       "was never generated")]
    if not path.is_file():
        what = ("is a directory; point it at the .jsonl file inside" if path.is_dir() else
                "is not a regular file (a FIFO, socket or device): the splits are read several times (checked, "
                "hashed, tokenized), so write the data to a .jsonl file and point at it")
        return {}, [problem("DataPathNotFound", field=dotted, path=str(path), resolved=how,
                            suggestion=f"{dotted} {what}")]
    problems, shapes, count, line_no = [], {}, 0, 0
    reasoning = {"answers_with_think": 0, "records_setting_enable_thinking": 0}  # for the reasoning-mode warning
    with path.open("rb") as fh:
        for line_no, raw in enumerate(lines_with_progress(fh, path.stat().st_size, f"scanning {split}"), 1):
            if not raw.strip():
                continue
            snippet = raw[:120].decode("utf-8", "replace").rstrip()
            if line_no > 1 and raw.startswith(b"\xef\xbb\xbf"):  # line 1's BOM is read past (utf-8-sig) everywhere
                problems.append((line_no, snippet, "a UTF-8 byte order mark (BOM) starts this line; only the start "
                                 "of a file may have one (files concatenated?)", "remove the 3 bytes EF BB BF at the "
                                 "start of this line"))
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                why = f"not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})"
                problems.append((line_no, snippet, why, "fix or remove this line (one JSON object per line)"))
                continue
            shape = detect_shape(record)
            if shape is None:
                keys = list(record) if isinstance(record, dict) else type(record).__name__
                problems.append((line_no, snippet, f"unknown record shape (keys {keys})",
                                 "use one of {text}, {prompt, completion}, {messages}, {instruction, input, output}"))
                continue
            if forced != "auto" and shape != forced:
                problems.append((line_no, snippet, f"record is {shape}, data.format is {forced}",
                                 f"convert the record or set data.format: {shape}"))
                continue
            why = _record_problem(record, shape)
            if why:
                problems.append((line_no, snippet, why, "fix the record or remove the line"))
                continue
            shapes.setdefault(shape, line_no)
            count += 1
            if shape == "messages":
                reasoning["answers_with_think"] += any(m["role"] == "assistant" and "<think>" in m["content"]
                                                       for m in record["messages"])
                reasoning["records_setting_enable_thinking"] += "enable_thinking" in (
                    record.get("chat_template_kwargs") or {})
    if len(shapes) > 1:
        first = sorted(shapes.items(), key=lambda kv: kv[1])
        problems.append((first[1][1], "", f"mixed record shapes in one file: {dict(first)} (shape: first line)",
                         "use one record shape per file, or convert all records to one shape"))
    if count == 0 and not problems:
        return {}, [problem("EmptyDataset", field=dotted, path=str(path), line_count=0,
                            suggestion="Run DataPrepAgent first to generate training data")]
    out = [problem("InvalidDataset", field=dotted, path=str(path), line=ln, snippet=snip, problem=why,
                   suggestion=fix) for ln, snip, why, fix in problems[:MAX_BAD_LINES]]
    if len(problems) > MAX_BAD_LINES:
        out[-1]["details"]["more_bad_lines"] = len(problems) - MAX_BAD_LINES
    info = {"path": str(path), "samples": count, "shape": next(iter(shapes), None)}
    return {**info, **(reasoning if info["shape"] == "messages" else {})}, out


def _data_rules(config: TrainingConfig, res: ValidationResult) -> None:
    clean = True  # every split read without a problem: then the integrity check (duplicates, leakage) can run
    for split in ("train", "valid", "test"):
        entry = config.resolved_paths[f"data.{split}_path"]
        forced = config.data.format if config.data.format in DATA_FORMATS else "auto"  # bad format: reported once
        info, problems = scan_jsonl(Path(entry["path"]), split, forced, entry["resolved"])
        res.errors.extend(problems)
        if info:
            res.data[split] = info
        clean = clean and bool(info) and not problems
    if clean:
        _integrity_rules(config, res)


MAX_INTEGRITY_EXAMPLES = 5  # line numbers shown (and recorded) per split for duplicates and leaks


def record_prompt(record: dict, shape: str) -> str:
    """A record's prompt without a tokenizer (the leakage key): the conversation before the last assistant turn,
    the prompt, the rendered instruction, or a text record's whole text (it has no prompt/answer split)."""
    if shape == "messages":
        msgs = record["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return json.dumps([[m["role"], m["content"]] for m in msgs[:last]], ensure_ascii=False)
    if shape == "prompt_completion":
        return record["prompt"]
    if shape == "instruction":
        return render_instruction_prompt(record)
    return record["text"]


def _canonical(value: Any) -> Any:
    """A record as datasets hands it back and as the file has it compare equal: keys whose value is null are the
    ones Arrow adds to unify a split's schema."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items() if v is not None}
    return [_canonical(v) for v in value] if isinstance(value, list) else value


def _digest(value: Any) -> bytes:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).digest()


def data_integrity(splits: dict) -> tuple[dict, dict]:
    """Exact duplicates within train, and valid/test records whose prompt is also a train record's prompt (they
    inflate valid/test metrics). `splits`: split -> (shape, [(line number, record), ...]). Returns the counts with
    the first line numbers of each, and per split the 0-based positions data.dedup drops (a duplicate's first copy
    is kept)."""
    drop: dict = {"train": [], "valid": [], "test": []}
    examples: dict = {"train": [], "valid": [], "test": []}
    shape, rows = splits["train"]
    seen, prompts = set(), set()
    for pos, (line, record) in enumerate(rows):
        key = _digest(_canonical(record))
        if key in seen:
            drop["train"].append(pos)
            examples["train"].append(line)
        seen.add(key)
        prompts.add(_digest(record_prompt(record, shape)))
    for split in ("valid", "test"):
        shape, rows = splits[split]
        for pos, (line, record) in enumerate(rows):
            if _digest(record_prompt(record, shape)) in prompts:
                drop[split].append(pos)
                examples[split].append(line)
    found = {"train_duplicates": len(drop["train"]), "valid_leaks": len(drop["valid"]),
             "test_leaks": len(drop["test"]), "examples": {s: v[:MAX_INTEGRITY_EXAMPLES] for s, v in examples.items()}}
    return found, drop


def _integrity_rules(config: TrainingConfig, res: ValidationResult) -> None:
    """Warn about train duplicates and valid/test leakage (counts and line numbers); with data.dedup the planned
    sample counts are the ones left after dropping them, and a split left empty is an error."""
    splits = {s: (res.data[s]["shape"], list(_jsonl_rows(Path(res.data[s]["path"])))) for s in ("train", "valid", "test")}
    found, drop = data_integrity(splits)
    res.integrity = found
    dedup = config.data.dedup

    def lines(split: str) -> str:
        shown = ", ".join(map(str, found["examples"][split]))
        return f"line{'s' if len(drop[split]) > 1 else ''} {shown}{', ...' if len(drop[split]) > MAX_INTEGRITY_EXAMPLES else ''}"

    if drop["train"]:
        res.warnings.append(
            f"data: {len(drop['train'])} exact duplicate record(s) in train ({lines('train')}): "
            + ("data.dedup drops them, keeping the first copy" if dedup
               else "they count double in training; set data.dedup: true to drop them (the first copy is kept)"))
    for split in ("valid", "test"):
        if drop[split]:
            res.warnings.append(
                f"data: {len(drop[split])} of {res.data[split]['samples']} {split} records have a prompt that is "
                f"also in train ({lines(split)}): leakage inflates {split} metrics; "
                + ("data.dedup drops them" if dedup else "set data.dedup: true to drop them"))
    if not dedup:
        return
    for split in ("train", "valid", "test"):
        res.data[split]["samples"] -= len(drop[split])
        if res.data[split]["samples"] <= 0:
            res.errors.append(problem(
                "EmptyDataset", field=f"data.{split}_path", path=res.data[split]["path"], line_count=len(splits[split][1]),
                suggestion=f"data.dedup drops every {split} record (each prompt is also in train): use a {split} "
                           "split with prompts unseen in training, or set data.dedup: false"))


HUB_SMOLLM3 = "HuggingFaceTB/SmolLM3-3B-Base or HuggingFaceTB/SmolLM3-3B"


def _checkpoint_rules(config: TrainingConfig, res: ValidationResult, need_weights: bool = True) -> None:
    """The base checkpoint is reachable and is the model the YAML describes (config.json only, no weights).
    need_weights=False (--plan): a directory holding config.json alone is enough."""
    ref = checkpoint_ref(config)
    entry = config.resolved_paths.get("model.base_checkpoint")
    if entry:
        d = Path(ref)
        missing = []
        if not (d / "config.json").is_file():
            missing.append("config.json")
        if need_weights and not (list(d.glob("*.safetensors")) or list(d.glob("pytorch_model*.bin"))):
            missing.append("weights (*.safetensors)")
        if need_weights and not any((d / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json",
                                                                 "tokenizer.model")):
            missing.append("tokenizer (tokenizer.json)")
        if not d.is_dir() or missing:
            res.errors.append(problem(
                "CheckpointNotFound", field="model.base_checkpoint", value=config.model.base_checkpoint,
                path=str(d), resolved=entry["resolved"], missing=missing if d.is_dir() else ["the directory"],
                suggestion="point model.base_checkpoint at a directory written by save_pretrained (config.json, "
                           f"*.safetensors, tokenizer files), or at a Hub id such as {HUB_SMOLLM3}"))
            return
        config_json = d / "config.json"
    else:
        config_json = _hub_cached_file(ref, "config.json")
        if config_json is None:
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false")
            if "/" not in ref:
                res.errors.append(problem(
                    "CheckpointNotFound", field="model.base_checkpoint", value=ref,
                    suggestion=f"`{ref}` is neither a local directory nor a Hub id (org/name). The public "
                               f"SmolLM3 checkpoints are {HUB_SMOLLM3}; or give the path to a local directory"))
                return
            if offline:
                res.errors.append(problem(
                    "CheckpointNotFound", field="model.base_checkpoint", value=ref,
                    suggestion=f"HF_HUB_OFFLINE is set and `{ref}` is not in the local Hub cache: run "
                               f"`huggingface-cli download {ref}` on a machine with access, or unset HF_HUB_OFFLINE"))
                return
            res.warnings.append(f"model.base_checkpoint {ref} is not cached locally; it will be downloaded")
            return
    try:
        ckpt_cfg = json.loads(Path(config_json).read_text())
        if not isinstance(ckpt_cfg, dict):
            raise ValueError("config.json is not a JSON object")
    except (OSError, ValueError) as exc:
        res.errors.append(problem("CheckpointNotFound", field="model.base_checkpoint", value=ref,
                                  path=str(config_json), suggestion=f"config.json is unreadable ({exc}); re-save it"))
        return
    res.checkpoint = ckpt_cfg
    for key, ckpt_key in (("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
                          ("num_layers", "num_hidden_layers"), ("num_heads", "num_attention_heads")):
        yaml_value, real = getattr(config.model, key), ckpt_cfg.get(ckpt_key)
        if yaml_value is not None and real is not None and yaml_value != real:
            res.errors.append(config_problem(
                f"model.{key}", yaml_value, f"{real} (the checkpoint's config.json {ckpt_key})",
                f"set model.{key}: {real}, or point model.base_checkpoint at the model you meant to train"))
    context = ckpt_cfg.get("max_position_embeddings")
    if context and config.data.max_seq_length > context:
        res.errors.append(config_problem(
            "data.max_seq_length", config.data.max_seq_length, f"<= {context} (the model's context window)",
            f"set max_seq_length: {context} or less"))
    archs = ckpt_cfg.get("architectures") or []
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        res.errors.append(config_problem("model.base_checkpoint", ref, "a causal LM checkpoint (*ForCausalLM)",
                                         f"config.json says architectures={archs}; use a SmolLM3 checkpoint"))


def _hub_cached_file(repo_id: str, filename: str) -> Optional[str]:
    try:
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # malformed id: treated as not cached
        return None
    return found if isinstance(found, str) else None


def world_size(config: TrainingConfig) -> int:
    return int(os.environ.get("WORLD_SIZE", config.compute.num_gpus if config.compute.num_gpus > 1 else 1))


def total_optimizer_steps(config: TrainingConfig, train_samples: int) -> int:
    hp = config.training.hyperparameters
    batches = math.ceil(train_samples / (hp.batch_size * world_size(config)))
    per_epoch = max(1, math.ceil(batches / hp.gradient_accumulation_steps))
    return max(1, math.ceil(per_epoch * hp.num_epochs))


def train_rows(stats: dict) -> int:
    """What one epoch iterates over: the packed rows under data.packing, else the records."""
    return stats["packed_rows"] if "packed_rows" in stats else stats["samples"]


def _schedule_rules(config: TrainingConfig, res: ValidationResult) -> None:
    """Rules that need the sample count: warmup near 10% of total steps. Under data.packing the steps come from
    the packed row count, known only once the train split is tokenized: _packing_rules calls this again then."""
    inputs = {"training.hyperparameters.batch_size", "training.hyperparameters.gradient_accumulation_steps",
              "training.hyperparameters.num_epochs", "data.train_path", "data.format", "data.max_seq_length"}
    if "train" not in res.data or any(e["details"].get("field") in inputs for e in res.errors):
        return  # the step count would be computed from a value already reported as wrong
    if config.data.packing and "packed_rows" not in res.data["train"]:
        return
    total = total_optimizer_steps(config, train_rows(res.data["train"]))
    of = (f"the {total} total optimizer steps"
          + (f" ({res.data['train']['packed_rows']} packed rows of {config.data.max_seq_length} tokens from "
             f"{res.data['train']['samples']} records)" if config.data.packing else ""))
    ten = max(1, round(0.1 * total))
    warmup = config.training.hyperparameters.warmup_steps
    if warmup >= total:
        res.errors.append(config_problem("training.hyperparameters.warmup_steps", warmup, f"fewer than {of}",
                                         f"set warmup_steps: {ten} (10% of {total} steps)"))
    elif not ten / 2 <= warmup <= ten * 2:
        res.warnings.append(f"training.hyperparameters.warmup_steps={warmup} is far from 10% of {of} ({ten}); "
                            f"consider warmup_steps: {ten}")


def _packing_rules(config: TrainingConfig, res: ValidationResult) -> None:
    """data.packing: pack the train split as training will (same tokenization, through the datasets cache that
    load_splits then hits, same pack_rows), so the warmup rule and the planned step count see the packed rows."""
    if not config.data.packing or "train" not in res.data:
        return
    tokenizer = load_tokenizer(config)
    raw = _raw_splits(config)
    if config.data.dedup:  # the rows training will pack
        raw, _ = dedup_splits(raw, {s: i["shape"] for s, i in res.data.items()})
    tok = _tokenize_split(raw["train"], config, tokenizer, res.data["train"]["shape"], "train")
    import pyarrow.compute as pc
    all_lengths = pc.list_value_length(column(tok, "input_ids")).to_pylist()
    lengths = [n for n, answer in zip(all_lengths, column(tok, "answer_tokens").to_pylist()) if answer > 0]
    rows = pack_rows(lengths, config.data.max_seq_length)
    res.data["train"]["packed_rows"] = len(rows)
    _schedule_rules(config, res)
    _packing_cost_rule(config, res, lengths, rows)


def _packing_cost_rule(config: TrainingConfig, res: ValidationResult, lengths: list[int],
                       rows: list[list[int]]) -> None:
    """What packing costs, before training. Only flash-attention 2 (CUDA, flash-attn installed) runs packed rows
    varlen; sdpa and eager compute attention over each whole row under a block mask, so packing trades a little
    padding for far more attention work and fewer, larger optimizer steps: warn with the numbers."""
    import importlib.util
    hp = config.training.hyperparameters
    grouped = config.data.group_by_length
    cost = packing_cost(lengths, rows, hp.batch_size * world_size(config), hp.gradient_accumulation_steps,
                        grouped=grouped, seed=config.training.seed)
    res.data["train"]["packing_cost"] = cost
    unpacked = "in batches of similar length" if grouped else "in shuffled batches"
    varlen = (config.model.use_flash_attention_2 and config.compute.device == "cuda"
              and importlib.util.find_spec("flash_attn") is not None)
    if varlen:
        return
    res.warnings.append(
        f"data.packing: true without a varlen attention kernel (sdpa; flash-attention 2 needs CUDA, flash-attn and "
        f"model.use_flash_attention_2: true): every packed row of up to {config.data.max_seq_length} tokens "
        f"computes attention over the whole row under a block mask, {cost['attention_scores_packed']:,} attention "
        f"scores per epoch against {cost['attention_scores_unpacked']:,} unpacked {unpacked} "
        f"({cost['attention_ratio']:.1f}x), for {cost['positions_packed']:,} token positions against "
        f"{cost['positions_unpacked']:,} ({cost['positions_ratio']:.2f}x); optimizer steps per epoch "
        f"{cost['steps_per_epoch_packed']} packed, {cost['steps_per_epoch_unpacked']} unpacked. Expect a slower "
        f"run: set data.packing: false (batches padded to their longest record), or train on a CUDA GPU "
        f"with flash-attn and model.use_flash_attention_2: true")


def packing_cost(lengths: list[int], rows: list[list[int]], global_batch: int, accumulation: int,
                 grouped: bool = True, seed: int = 0) -> dict:
    """Per epoch, packed rows (`rows` from pack_rows) against unpacked records, each batch padded to its longest:
    attention scores computed without a varlen kernel (batch x width^2, per layer and head), token positions
    (batch x width: the linear layers' work) and optimizer steps. Unpacked batches as the sampler makes them:
    `grouped` (data.group_by_length) estimated as the sorted lengths cut into batches; otherwise the records in a
    shuffled order (seeded: the same figures every time) cut into batches. Packed rows are all ~max_seq_length:
    sorted either way."""
    def padded(widths: list[int], shuffle: bool = False) -> tuple[int, int]:
        if shuffle:
            import random
            widths = list(widths)
            random.Random(seed).shuffle(widths)
        else:
            widths = sorted(widths, reverse=True)
        batches = [widths[i:i + global_batch] for i in range(0, len(widths), global_batch)]
        return sum(len(b) * max(b) ** 2 for b in batches), sum(len(b) * max(b) for b in batches)
    att_p, pos_p = padded([sum(lengths[i] for i in row) for row in rows])
    att_u, pos_u = padded(lengths, shuffle=not grouped)
    steps = lambda n: max(1, math.ceil(math.ceil(n / global_batch) / accumulation))  # noqa: E731
    return {"attention_scores_packed": att_p, "attention_scores_unpacked": att_u,
            "attention_ratio": round(att_p / max(1, att_u), 2), "positions_packed": pos_p,
            "positions_unpacked": pos_u, "positions_ratio": round(pos_p / max(1, pos_u), 2),
            "steps_per_epoch_packed": steps(len(rows)), "steps_per_epoch_unpacked": steps(len(lengths))}


def _chat_template_rules(config: TrainingConfig, res: ValidationResult) -> None:
    """`messages` data against the chat template, one record rendered per split with the run's template variables
    (template_kwargs): growing prefixes render consistently (answer masking depends on it) and the generation prompt
    that evaluation and samples use is a prefix of the full rendering; the answer ends with an end-of-turn token
    (else the model never learns to stop); and a reasoning-mode template left in /think for answers without
    reasoning is warned about."""
    splits = [s for s, i in res.data.items() if i.get("shape") == "messages"]
    if not splits:
        return
    tokenizer = load_tokenizer(config)
    if not getattr(tokenizer, "chat_template", None):
        res.errors.append(config_problem(
            "model.base_checkpoint", config.model.base_checkpoint, "a tokenizer with a chat template",
            "the data is in `messages` form but this tokenizer has no chat_template: use an instruct/chat "
            "checkpoint's tokenizer, add a chat_template to tokenizer_config.json, or convert the data to "
            "prompt_completion"))
        return
    unended = None
    for split in splits:
        record = _read_jsonl(Path(res.data[split]["path"]), 1)[0]
        try:
            segments = _chat_segments(record["messages"], tokenizer, template_kwargs(config, record))
            prompt, _ = prompt_and_reference(record, "messages", tokenizer, template_kwargs(config))
            if not "".join(text for text, _ in segments).startswith(prompt):
                raise ValueError("the generation prompt is not a prefix of the full rendering")
        except Exception as exc:  # a template error, or one that is not prefix-stable
            res.errors.append(problem(
                "InvalidDataset", field=f"data.{split}_path", path=res.data[split]["path"], line=1,
                problem=f"the chat template cannot render this conversation turn by turn ({exc})",
                suggestion="use a chat template whose rendering of a conversation prefix is a prefix of the "
                           "full rendering, or set data.train_on_prompt: true with format text"))
            continue
        unended = unended or _unended_answer(segments, tokenizer, split)
    if unended:
        res.warnings.append(unended)
    _reasoning_mode_rule(config, res, tokenizer.chat_template, splits)


def _unended_answer(segments: list[tuple[str, bool]], tokenizer, split: str) -> Optional[str]:
    """A warning when an answer's last token (trailing whitespace aside) is no end-of-turn token, else None."""
    stops = end_of_turn_ids(tokenizer)
    for text, is_answer in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if is_answer else []
        while ids and not tokenizer.decode(ids[-1:]).strip():
            ids = ids[:-1]
        if ids and ids[-1] not in stops:
            return (f"model.base_checkpoint: the chat template ends an answer ({split} line 1) with "
                    f"{tokenizer.decode(ids[-1:])!r}, not an end-of-turn token "
                    f"({', '.join(repr(tokenizer.convert_ids_to_tokens(t)) for t in stops)}): the model never learns "
                    "to stop and generates until max_new_tokens; use a chat template that closes each assistant "
                    "turn with the tokenizer's eos_token")
    return None


def _reasoning_mode_rule(config: TrainingConfig, res: ValidationResult, template: Any, splits: list[str]) -> None:
    """SmolLM3's template has a reasoning mode, on by default (`Reasoning Mode: /think`). Answers without a <think>
    block, trained in that mode, teach the model to skip its reasoning when asked to think: warn once, unless the
    config or a record chooses the mode, or the answers hold reasoning."""
    if not (isinstance(template, str) and "enable_thinking" in template):
        return
    if "enable_thinking" in (config.data.chat_template_kwargs or {}):
        return
    infos = [res.data[s] for s in splits]
    if any(i.get("answers_with_think") or i.get("records_setting_enable_thinking") for i in infos):
        return
    res.warnings.append(
        "data: the chat template has a reasoning mode (enable_thinking), left at its default (/think), and no answer "
        "holds a <think> block: the model would learn to answer without reasoning when asked to think. Set "
        "data.chat_template_kwargs.enable_thinking: false to train these answers in /no_think mode (the template "
        "then puts an empty <think> block before each answer, outside the loss)")


def _truncation_rules(config: TrainingConfig, res: ValidationResult) -> None:
    """Every split tokenized as training tokenizes it (tokenized_splits, through the datasets cache that training then
    hits): the answers max_seq_length cuts or drops, with line numbers and token-length percentiles
    (truncation_report, kept in res.data[split]["truncation"]). Above data.max_truncated_fraction of any split: an
    InvalidDataset error with the numbers, before any training; any answer lost: a warning with them."""
    if any(s not in res.data for s in ("train", "valid", "test")):
        return
    d = config.data
    shapes = {s: i["shape"] for s, i in res.data.items()}
    tokenized, lines, _ = tokenized_splits(config, load_tokenizer(config), shapes)
    for split in ("train", "valid", "test"):
        r = truncation_report(tokenized[split], lines[split], d.max_seq_length)
        res.data[split]["truncation"] = r
        if not (r["answers_cut"] or r["answers_dropped"]):
            continue
        if r["records"] and r["answers_dropped"] == r["records"]:  # whatever max_truncated_fraction allows
            res.errors.append(problem(
                "EmptyDataset", field=f"data.{split}_path", path=res.data[split]["path"], line_count=r["records"],
                suggestion=f"every {split} record loses its answer to truncation at data.max_seq_length="
                           f"{d.max_seq_length}: raise data.max_seq_length (P99 {r['length_p99']}) or shorten the "
                           "prompts"))
            continue
        fixes = (f"raise data.max_seq_length to {r['length_p99']} (fits 99% of {split})"
                 + ("" if d.truncation_side == "left" else
                    ", set data.truncation_side: left (keeps the answers, cuts the prompts' starts)")
                 + ", shorten these records, or raise data.max_truncated_fraction")
        if r["fraction"] > d.max_truncated_fraction:
            lost = r["answers_cut"] + r["answers_dropped"]
            res.errors.append(problem(
                "InvalidDataset", field=f"data.{split}_path", path=res.data[split]["path"],
                problem=f"{lost} of {r['records']} {split} records ({r['fraction']:.1%}) lose answer tokens to "
                        f"max_seq_length {d.max_seq_length}, more than data.max_truncated_fraction "
                        f"{d.max_truncated_fraction:g}",
                **r, max_seq_length_fitting_99_percent=r["length_p99"],
                max_truncated_fraction=d.max_truncated_fraction, truncation_side=d.truncation_side, suggestion=fixes))
        else:
            res.warnings.append(f"data: {format_truncation(split, r)}: {fixes}")


def _device_rules(config: TrainingConfig, res: ValidationResult) -> None:
    """Rules that need torch: CUDA present, GPU count, precision support."""
    import torch
    c, hp = config.compute, config.training.hyperparameters
    if c.device == "cuda":
        if not torch.cuda.is_available():
            res.errors.append(config_problem(
                "compute.device", "cuda", "a visible CUDA GPU",
                f"found none (torch {torch.__version__}, built with CUDA {torch.version.cuda}); set compute.device: "
                "cpu (with mixed_precision: no) for a CPU run, or install a CUDA build of torch"))
            return
        found = torch.cuda.device_count()
        if c.num_gpus > found:
            res.errors.append(config_problem("compute.num_gpus", c.num_gpus, f"<= {found} (GPUs visible)",
                                             f"set num_gpus: {found}, or check CUDA_VISIBLE_DEVICES"))
        if config.model.lora.enabled and config.model.lora.quantization != "none":
            import importlib.util
            if importlib.util.find_spec("bitsandbytes") is None:
                res.errors.append(config_problem("model.lora.quantization", config.model.lora.quantization,
                                                 "the bitsandbytes package (QLoRA)",
                                                 "pip install bitsandbytes, or set quantization: none"))
        if hp.bf16 and not torch.cuda.is_bf16_supported():
            res.errors.append(config_problem("training.hyperparameters.bf16", True, "a GPU with bf16 support",
                                             f"{torch.cuda.get_device_name(0)} lacks bf16: use fp16: true, bf16: false"))
    elif hp.fp16:
        res.errors.append(config_problem("training.hyperparameters.fp16", True, "fp16: false on CPU",
                                         "fp16 mixed precision needs a CUDA GPU: on CPU set fp16: false "
                                         "and compute.mixed_precision: no (or bf16)"))
    if c.device == "cpu" and c.fsdp:
        # Trainer would not shard on CPU: it runs plain DDP (every rank a full replica) and says nothing
        res.errors.append(config_problem("compute.fsdp", c.fsdp, "null when compute.device is cpu",
                                         "FSDP shards across CUDA GPUs: remove compute.fsdp for a CPU run, or set "
                                         "compute.device: cuda on a GPU host (check the fit first with --plan)"))
    unknown = [w for w in (c.fsdp or "").split() if w not in FSDP_OPTIONS]
    if unknown and str((c.fsdp_config or {}).get("version", (c.fsdp_config or {}).get("fsdp_version", 2))) == "2":
        # hybrid_shard / no_shard exist only in FSDP1; Trainer would raise on the first rank, after the model loaded
        res.errors.append(config_problem("compute.fsdp", c.fsdp, f"words from {list(FSDP_OPTIONS)} (FSDP2)",
                                         f"{unknown} are not FSDP2 options: use `{FSDP_FULL_SHARD}` (ZeRO-3) or "
                                         "`shard_grad_op auto_wrap` (ZeRO-2)"))


# Optional packages: a feature's key -> (module, install command). Only what the config turns on is required,
# and nothing here is imported before it is used.
OPTIONAL_PACKAGES = (
    ("logging.mlflow.enabled", lambda c: c.logging.mlflow.enabled, "mlflow", "pip install -r requirements-mlflow.txt"),
    ("logging.wandb.enabled", lambda c: c.logging.wandb.enabled, "wandb", "pip install wandb"),
    ("logging.tensorboard.enabled", lambda c: c.logging.tensorboard.enabled, "tensorboard", "pip install tensorboard"),
    ("model.lora.enabled", lambda c: c.model.lora.enabled, "peft", "pip install peft"),
)


def package_missing(module: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a broken or hidden install counts as missing
        return True


def _package_rules(config: TrainingConfig, res: ValidationResult) -> None:
    """A tracker or feature turned on whose package is not installed: exit 2 now, naming the key and the
    install command, not an ImportError after the model has loaded."""
    for key, enabled, module, install in OPTIONAL_PACKAGES:
        if enabled(config) and package_missing(module):
            res.errors.append(config_problem(key, True, f"the `{module}` package installed",
                                             f"`{install}`, or set {key}: false"))


def validate_config(config: TrainingConfig, check_device: bool = True, resuming: bool = False) -> ValidationResult:
    """Every preflight check; cheap ones first. Torch is imported only once the rest has passed.
    `resuming`: the disk check asks room for one more checkpoint instead of two."""
    res = ValidationResult(warnings=list(config.warnings))
    _field_rules(config, res)
    _output_rules(config, res)
    _data_rules(config, res)
    _checkpoint_rules(config, res)
    _schedule_rules(config, res)
    _package_rules(config, res)
    _environment_rules(config, res)
    if check_device and not res.errors:
        _wandb_rules(config, res)
    if check_device and not res.errors:
        _chat_template_rules(config, res)
    if check_device and not res.errors:
        _truncation_rules(config, res)
    if check_device and not res.errors:
        _packing_rules(config, res)
    if check_device and not res.errors:
        _device_rules(config, res)
    if check_device and not res.errors and res.checkpoint:
        try:
            res.memory = check_memory(config, res.checkpoint, res)
        except TrainerError as exc:
            res.errors.extend(exc.errors)
    if not res.errors and res.checkpoint:
        try:
            res.disk = check_disk(config, res.checkpoint, res, res.memory.get("parameters"), resuming=resuming)
        except TrainerError as exc:
            res.errors.extend(exc.errors)
    _baseline_rules(config, res)
    return res


def yaml_flow(value: Any) -> str:
    """A value as one line of YAML, as the config would spell it (`false`, `null`, `[q_proj, v_proj]`,
    `{enable_thinking: false}`), not as Python prints it."""
    import yaml
    text = yaml.safe_dump(value, default_flow_style=True, width=2**31 - 1).strip()
    return text[:-3].rstrip() if text.endswith("\n...") else text  # a scalar's document-end marker


def config_differences_from_defaults(config: TrainingConfig) -> list[str]:
    """`section.key: value (default X)` for every key that differs from this script's defaults."""
    out = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            dotted = f"{prefix}.{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, dotted)
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                continue
            if value != default:
                out.append(f"{dotted}: {yaml_flow(value)} (default {yaml_flow(default)})")

    for name in SECTIONS:
        walk(getattr(config, name), name)
    return out


def _baseline_rules(config: TrainingConfig, res: ValidationResult) -> None:
    """With evaluation.baseline (or --baseline): the new config and data against the baseline run's, before any
    training, as warnings (so --validate-only, --dry-run and the training command all show them)."""
    ref = baseline_reference(config)
    path = _baseline_manifest_path(ref) if ref else None
    if path is None:
        return
    base = read_json_lenient(path)
    res.baseline = {"baseline_run_id": base.get("run_id"), "baseline_manifest": str(path),
                    **baseline_differences(_config_facts(config, res), _run_facts(base))}
    res.warnings.extend(baseline_lines(res.baseline, base.get("run_id")))


# --------------------------------------------------------------------------------------------------
# 6. Data: record shapes -> token ids with answer-only labels, through datasets.map (cached), packing
# --------------------------------------------------------------------------------------------------

def dedup_splits(raw, shapes: dict) -> tuple[Any, dict]:
    """data.dedup on the loaded DatasetDict: the records data_integrity finds (the same rule as the validation
    warning) are dropped; returns the smaller DatasetDict and split -> the 0-based positions dropped."""
    splits = {s: (shapes[s], [(i + 1, r) for i, r in enumerate(raw[s])]) for s in ("train", "valid", "test")}
    _, drop = data_integrity(splits)
    for split, positions in drop.items():
        if positions:
            gone = set(positions)
            raw[split] = raw[split].select([i for i in range(len(raw[split])) if i not in gone])
    return raw, drop


def render_instruction_prompt(record: dict) -> str:
    """Alpaca-style prompt for {instruction, input, output} records."""
    prompt = f"### Instruction:\n{record['instruction'].strip()}\n\n"
    if (record.get("input") or "").strip():
        prompt += f"### Input:\n{record['input'].strip()}\n\n"
    return prompt + "### Response:\n"


# A chat template that reads the clock (SmolLM3's system block says `Today Date: {{ strftime_now("%d %B %Y") }}`)
# renders the same record differently every day: different tokens, a datasets cache that serves yesterday's, a resume
# that is not bit-exact. Such a template is rendered with one fixed date per run (the run's first start, kept by every
# resume), through a macro named strftime_now put before it: Jinja resolves a name the template defines before the
# global transformers gives it. (A strftime_now template variable cannot do it: transformers turns every variable
# into plain data, a function into the string "<function>".)
DATE_READING = re.compile(r"\bstrftime_now\b")
STRFTIME_DIRECTIVES = "aAbBcdHIjmMpSUwWxXyYGuVf"  # rendered for the fixed date at 00:00 (%z and %Z render empty)
PINNED_CLOCK_MACRO = (
    "{%- macro strftime_now(format) -%}{%- for piece in format.split('%%') -%}"
    "{%- set ns = namespace(text=piece) -%}{%- for directive, value in __DATE_PARTS__ -%}"
    "{%- set ns.text = ns.text.replace(directive, value) -%}{%- endfor -%}"
    "{{- ('%' if not loop.first else '') ~ ns.text -}}{%- endfor -%}{%- endmacro -%}")
END_OF_TURN = "<|im_end|>"  # ChatML's (SmolLM3's) end of an assistant turn, besides the tokenizer's EOS


def template_reads_date(template: Any) -> bool:
    return isinstance(template, str) and DATE_READING.search(template) is not None


def pinned_chat_template(template: str, date: str) -> str:
    """`template` with strftime_now answering for `date` (YYYY-MM-DD) at 00:00, whatever the clock says."""
    day = dt.datetime.combine(dt.date.fromisoformat(date), dt.time())
    parts = [[f"%{c}", day.strftime(f"%{c}")] for c in STRFTIME_DIRECTIVES]
    return PINNED_CLOCK_MACRO.replace("__DATE_PARTS__", json.dumps(parts)) + template


def today_date() -> str:
    """The local date strftime_now would render now (YYYY-MM-DD), or the FINANCE_TRAINER_TEST_TODAY test hook's."""
    return injected_today() or dt.date.today().isoformat()


def _recorded_template_date(config: TrainingConfig, resume_from: str, run_id: Optional[str]) -> Optional[str]:
    """The date a run being resumed rendered its data with: its manifest's, else its newest checkpoint's."""
    if resume_from == "latest":
        if not run_id:
            return None
        run_dir = run_paths(config, run_id)["run_dir"]
        sources = [run_dir / MANIFEST_NAME] + [Path(c["path"]) / CHECKPOINT_META
                                               for c in reversed(read_checkpoints(run_dir))]
    else:
        ckpt = Path(resume_from).expanduser()
        sources = [ckpt / CHECKPOINT_META, ckpt.parent / MANIFEST_NAME]
    for path in sources:
        date = ((read_json_lenient(path) if path.is_file() else {}).get("chat_template") or {}).get("date")
        if isinstance(date, str):
            return date
    return None


def pin_template_date(config: TrainingConfig, resume_from: Optional[str] = None, run_id: Optional[str] = None) -> str:
    """config.template_date, the day every render of this process uses (template_kwargs): a resumed run's recorded
    date (so a resume on another day or machine tokenizes as the run did), else today."""
    recorded = _recorded_template_date(config, resume_from, run_id) if resume_from else None
    config.template_date = recorded or today_date()
    return config.template_date


_TOKENIZERS: dict = {}  # (base checkpoint, its tokenizer files' mtimes) -> its tokenizer (load_tokenizer)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _tokenizer_stamp(ref: str) -> tuple:
    d = Path(ref)
    return tuple((n, (d / n).stat().st_mtime_ns) for n in TOKENIZER_FILES if (d / n).is_file()) if d.is_dir() else ()


def base_chat_template(config: TrainingConfig) -> Optional[str]:
    """The base tokenizer's chat template."""
    return getattr(load_tokenizer(config), "chat_template", None)


def record_template_kwargs(kwargs: Optional[dict], record: Optional[dict]) -> dict:
    """`kwargs` with a record's own chat_template_kwargs over them, key by key. A null value is unset: datasets fills
    in, as null, the keys that only other records of the split have."""
    out = dict(kwargs or {})
    own = (record or {}).get("chat_template_kwargs")
    if isinstance(own, dict):
        out.update({k: v for k, v in own.items() if v is not None})
    return out


def template_kwargs(config: TrainingConfig, record: Optional[dict] = None) -> dict:
    """The keyword arguments of every apply_chat_template call of this script: data.chat_template_kwargs, `record`'s
    own chat_template_kwargs over them, and for a template that reads the clock the template itself with the run's
    date pinned (`chat_template`, see pinned_chat_template; config.template_date, today when no run set it)."""
    out = record_template_kwargs(config.data.chat_template_kwargs, record)
    template = base_chat_template(config)
    if template_reads_date(template):
        out["chat_template"] = pinned_chat_template(template, config.template_date or today_date())
    return out


def chat_template_record(config: TrainingConfig) -> dict:
    """What rendered the messages data, for the manifest and every checkpoint's meta: the template's sha256, whether
    it reads the clock and then the date it was pinned to (a resume reads it back: pin_template_date), and the
    template variables of data.chat_template_kwargs."""
    try:
        template = base_chat_template(config)
    except Exception as exc:  # the record of a run whose tokenizer cannot load must still be written
        log.warning("could not read the chat template of %s: %s", config.model.base_checkpoint, exc)
        template = None
    reads = template_reads_date(template)
    text = template if isinstance(template, str) or template is None else json.dumps(template, sort_keys=True)
    return {"sha256": chat_template_sha256(text), "reads_date": reads,
            "date": (config.template_date or today_date()) if reads else None,
            "kwargs": dict(config.data.chat_template_kwargs or {})}


def end_of_turn_ids(tokenizer) -> list[int]:
    """The tokens that end an answer: EOS, and <|im_end|> where the vocabulary has it (SmolLM3-3B's EOS; the
    base model's tokenizer ends text with <|endoftext|> while its chat template closes turns with <|im_end|>)."""
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)}
    return sorted(t for t in ids if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id)


def _chat_segments(messages: list, tokenizer, kwargs: Optional[dict] = None) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, is_answer) pieces by rendering growing prefixes, every render with
    `kwargs` (template_kwargs). What a template adds at the start of an answer (the generation prompt: SmolLM3's
    `<|im_start|>assistant\n`, and in /no_think mode its empty `<think>\n\n</think>\n`) is prompt, outside the loss.
    Raises ValueError when the chat template is not prefix-stable (then answer masking is impossible)."""
    kwargs = kwargs or {}
    segments, done = [], ""
    for k, msg in enumerate(messages):
        if msg["role"] == "assistant":
            head = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True,
                                                 **kwargs) if k else ""
            if not head.startswith(done):
                raise ValueError("chat template is not prefix-stable")
            segments.append((head[len(done):], False))
            done = head
        full = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False, **kwargs)
        if not full.startswith(done):
            raise ValueError("chat template is not prefix-stable")
        segments.append((full[len(done):], msg["role"] == "assistant"))
        done = full
    return segments


def record_pieces(record: dict, tokenizer, shape: str, chat_kwargs: Optional[dict] = None) -> list[tuple[str, bool]]:
    """A record as (text, is_answer) pieces in order, for tokenize_records. `chat_kwargs`: the run's template
    variables (template_kwargs), the record's own over them."""
    if shape == "text":
        return [(record["text"], True)]
    if shape == "prompt_completion":
        return [(record["prompt"], False), (record["completion"], True)]
    if shape == "instruction":
        return [(render_instruction_prompt(record), False), (record["output"], True)]
    return _chat_segments(record["messages"], tokenizer, record_template_kwargs(chat_kwargs, record))


def tokenize_records(records: list[dict], tokenizer, shape: str, max_seq_length: int, train_on_prompt: bool,
                     chat_kwargs: Optional[dict] = None, truncation_side: str = "right") -> list[dict]:
    """Records -> input_ids, labels (IGNORE_INDEX on prompt tokens), truncation flag, trainable label count, and for
    the truncation numbers the untruncated length and the answer tokens the record has and loses. A record longer
    than max_seq_length loses its end (truncation_side right) or the start of its prompt (left: the answer is kept
    unless it alone is longer). Every piece of every record goes to the tokenizer in one call (its Rust batch
    encoder), not one call per piece."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pieces = [record_pieces(r, tokenizer, shape, chat_kwargs) for r in records]
    texts = [text for p in pieces for text, _ in p if text]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    rows = []
    for p in pieces:
        input_ids, labels, answer = [], [], []
        for text, is_answer in p:
            ids = next(encoded) if text else []
            input_ids += ids
            labels += ids if (is_answer or train_on_prompt) else [IGNORE_INDEX] * len(ids)
            answer += [is_answer] * len(ids)
        if shape != "messages":  # chat templates close turns themselves
            input_ids += eos
            labels += eos
            answer += [True] * len(eos)
        length = len(input_ids)
        keep = slice(max(0, length - max_seq_length), None) if truncation_side == "left" else slice(0, max_seq_length)
        input_ids, labels = input_ids[keep], labels[keep]
        rows.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels,
                     "truncated": length > max_seq_length,
                     "answer_tokens": sum(1 for x in labels[1:] if x != IGNORE_INDEX),
                     "length": length, "answer_total": sum(answer), "answer_lost": sum(answer) - sum(answer[keep])})
    return rows


def tokenize_record(record: dict, tokenizer, shape: str, max_seq_length: int, train_on_prompt: bool,
                    chat_kwargs: Optional[dict] = None, truncation_side: str = "right") -> dict:
    """One record -> input_ids, labels (IGNORE_INDEX on prompt tokens), truncation flag, answer token count."""
    return tokenize_records([record], tokenizer, shape, max_seq_length, train_on_prompt, chat_kwargs,
                            truncation_side)[0]


def _tokenize_batch(batch: dict, tokenizer, shape: str, max_seq_length: int, train_on_prompt: bool,
                    chat_kwargs: Optional[dict] = None, truncation_side: str = "right") -> dict:
    keys = list(batch)
    rows = tokenize_records([{k: batch[k][i] for k in keys} for i in range(len(batch[keys[0]]))], tokenizer,
                            shape, max_seq_length, train_on_prompt, chat_kwargs, truncation_side)
    return {k: [r[k] for r in rows] for k in rows[0]}


def _raw_splits(config: TrainingConfig):
    """The three JSONL files as one DatasetDict (always all three: the cache fingerprint depends on it)."""
    from datasets import load_dataset
    files = {split: str(data_path(config, f"{split}_path")) for split in ("train", "valid", "test")}
    return load_dataset("json", data_files=files)


def _tokenize_split(ds, config: TrainingConfig, tokenizer, shape: str, split: str):
    """datasets.map over tokenize_records: validation (_truncation_rules, _packing_rules) and load_splits make the
    same call, so the later ones are cache hits. fn_kwargs are part of the cache key: the template variables, with
    a date-reading template pinned to the run's date (template_kwargs), so a warm cache never serves another day's
    tokens. Other shapes render no template: their key holds no date. Large splits are tokenized by
    tokenize_processes(len(ds)) processes, with progress."""
    chat_kwargs = template_kwargs(config) if shape == "messages" else {}
    with datasets_progress(f"tokenizing {split}"):
        return ds.map(_tokenize_batch, batched=True, remove_columns=ds.column_names,
                      fn_kwargs={"tokenizer": tokenizer, "shape": shape, "max_seq_length": config.data.max_seq_length,
                                 "train_on_prompt": config.data.train_on_prompt, "chat_kwargs": chat_kwargs,
                                 "truncation_side": config.data.truncation_side},
                      desc=f"tokenizing {split}", num_proc=tokenize_processes(len(ds)))


# Rendering chat templates is CPU-bound Python (~1 ms a record) and the tokenizer's batch encoder already uses every
# core from this one process. bench/tokenize_speed.py on 2 cores shared with other jobs: a pool of 2 processes was
# slower at 20,000 and 50,000 records (+40%; +34% and +42%) and faster at 200,000 (-18%, one round): no gain, so
# a pool is used only with at least TOKENIZE_MIN_PROCESSES cores per rank (not measured: no such machine was at
# hand). The count depends on the cores alone, never on the load, so preflight and training hit the same cache.
TOKENIZE_PARALLEL_MIN_RECORDS = 20_000  # below this a pool's start-up (~1 s, the tokenizer pickled to each) dominates
TOKENIZE_MIN_PROCESSES = 4
TOKENIZE_MAX_PROCESSES = 8


def tokenize_processes(records: int) -> Optional[int]:
    """datasets.map's num_proc for a split of `records`: None (this process) for a small split or a machine with
    fewer than TOKENIZE_MIN_PROCESSES cores per rank, else those cores (the node's shared between its ranks), at most
    TOKENIZE_MAX_PROCESSES."""
    if records < TOKENIZE_PARALLEL_MIN_RECORDS:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = min(cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))), TOKENIZE_MAX_PROCESSES)
    return n if n >= TOKENIZE_MIN_PROCESSES else None


@contextlib.contextmanager
def datasets_progress(desc: str):
    """Progress of one datasets.map call as our Progress (a bar on a terminal, a line every ~10 s in a pipe).
    datasets counts the records its workers finish and reports them to the tqdm class it imported as
    `datasets.arrow_dataset.hf_tqdm`; for the length of the call that name is Progress. A datasets release without
    that name still maps, only without progress."""
    import datasets.arrow_dataset as arrow_dataset
    original = getattr(arrow_dataset, "hf_tqdm", None)
    if original is None:
        yield
        return
    arrow_dataset.hf_tqdm = lambda *a, total=None, initial=0, **kw: Progress(total or 0, desc, initial=initial)
    try:
        yield
    finally:
        arrow_dataset.hf_tqdm = original


def column(ds, name: str):
    """One column of a datasets.Dataset as a pyarrow array (a filter's indices applied). datasets' own column view
    reads row by row: summing answer_tokens over 200,000 records took 21 s that way, 0.6 s this way."""
    return ds.with_format("arrow")[name]


def record_lines(path: Path) -> list[int]:
    """The line number of each record of a JSONL file, in order (a blank line holds none)."""
    with path.open("rb") as fh:
        return [n for n, raw in enumerate(fh, 1) if raw.strip()]


_TOKENIZED: dict = {}  # tokenized_splits' answers in this process, by _tokenization_key


def _tokenization_key(config: TrainingConfig, tokenizer, shapes: dict, limit: Optional[int]) -> tuple:
    """Everything tokenized_splits' answer depends on: the files (path, size, mtime), the record shapes, the slice,
    the data keys that change tokens, the template variables (the pinned date included) and the tokenizer."""
    files = tuple((str(p), st.st_size, st.st_mtime_ns) for p in (data_path(config, f"{s}_path")
                                                                 for s in ("train", "valid", "test"))
                  for st in [p.stat()])
    d = config.data
    return (files, tuple(sorted(shapes.items())), limit, d.max_seq_length, d.train_on_prompt, d.truncation_side,
            d.dedup, json.dumps(template_kwargs(config), sort_keys=True, default=str),
            getattr(tokenizer, "name_or_path", None), len(tokenizer))


def tokenized_splits(config: TrainingConfig, tokenizer, shapes: dict, limit: Optional[int] = None):
    """The three splits as training tokenizes them (data.dedup applied, the first `limit` records of each), with the
    JSONL line number of every row. Returns (split -> tokenized Dataset, split -> line numbers, split -> records
    data.dedup dropped). Validation's call and training's are the same: the second is answered from memory (reading
    the JSONL files again and looking the tokenized splits up in the datasets cache took ~0.5 s of every run)."""
    key = _tokenization_key(config, tokenizer, shapes, limit)
    if key not in _TOKENIZED:
        _TOKENIZED.clear()  # one answer kept: a process tokenizes one run's data
        _TOKENIZED[key] = _tokenized_splits(config, tokenizer, shapes, limit)
    out, lines, dropped = _TOKENIZED[key]
    return dict(out), {k: list(v) for k, v in lines.items()}, dict(dropped)


def _tokenized_splits(config: TrainingConfig, tokenizer, shapes: dict, limit: Optional[int]):
    raw = _raw_splits(config)
    dropped: dict = {}
    if config.data.dedup:
        raw, dropped = dedup_splits(raw, shapes)
    out, lines = {}, {}
    for split, ds in raw.items():
        gone = set(dropped.get(split, ()))
        lines[split] = [n for i, n in enumerate(record_lines(data_path(config, f"{split}_path"))) if i not in gone]
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
            lines[split] = lines[split][:len(ds)]
        out[split] = _tokenize_split(ds, config, tokenizer, shapes[split], split)
    return out, lines, {s: len(v) for s, v in dropped.items()}


MAX_TRUNCATION_LINES = 10  # line numbers shown (and recorded) per split for cut and dropped answers


def _percentile(ordered: list[int], p: float) -> int:
    """Nearest rank: the smallest value that at least p% of `ordered` (sorted) do not exceed."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else 0


def truncation_report(tok, lines: list[int], max_seq_length: int) -> dict:
    """One tokenized split against max_seq_length: the records whose answer it cuts (some answer tokens lost) or
    drops (all lost), with their line numbers, and the untruncated token lengths' percentiles: P99 is the
    max_seq_length that would fit 99% of the records."""
    cut, dropped = [], []
    for line, total, lost in zip(lines, column(tok, "answer_total").to_pylist(), column(tok, "answer_lost").to_pylist()):
        if lost:
            (dropped if lost >= total else cut).append(line)
    ordered = sorted(column(tok, "length").to_pylist())
    n = len(ordered)
    return {"records": n, "truncated": sum(x > max_seq_length for x in ordered), "answers_cut": len(cut),
            "answers_dropped": len(dropped), "fraction": round((len(cut) + len(dropped)) / max(1, n), 4),
            "cut_lines": cut[:MAX_TRUNCATION_LINES], "dropped_lines": dropped[:MAX_TRUNCATION_LINES],
            "length_p50": _percentile(ordered, 50), "length_p95": _percentile(ordered, 95),
            "length_p99": _percentile(ordered, 99), "length_max": ordered[-1] if ordered else 0,
            "max_seq_length": max_seq_length}


def format_truncation(split: str, r: dict) -> str:
    """`train: 55 of 64 answers cut (lines 3, 8, ...) and 4 dropped whole (...) by max_seq_length 72; token
    lengths P50 ..., P95 ..., P99 ..., max ...`"""
    def where(key: str, count: int) -> str:
        shown = ", ".join(map(str, r[key]))
        return f" (line{'s' if count > 1 else ''} {shown}{', ...' if count > len(r[key]) else ''})" if count else ""
    return (f"{split}: {r['answers_cut']} of {r['records']} answers cut{where('cut_lines', r['answers_cut'])} and "
            f"{r['answers_dropped']} dropped whole{where('dropped_lines', r['answers_dropped'])} by max_seq_length "
            f"{r['max_seq_length']}; token lengths P50 {r['length_p50']}, P95 {r['length_p95']}, P99 "
            f"{r['length_p99']}, max {r['length_max']}")


def load_splits(config: TrainingConfig, tokenizer, shapes: dict, limit: Optional[int] = None) -> tuple[dict, dict]:
    """Tokenized train/valid/test datasets plus per-split stats (samples, truncated, dropped, tokens, and the
    truncation numbers of truncation_report). Tokenization goes through datasets.map, so a second run with the same
    data, tokenizer and template variables is a cache hit (validation already made the first)."""
    import pyarrow.compute as pc
    tokenized, lines, dropped = tokenized_splits(config, tokenizer, shapes, limit)
    if config.data.dedup:
        log.info("data.dedup: dropped %d duplicate train records, %d valid and %d test records whose prompt is in "
                 "train", dropped["train"], dropped["valid"], dropped["test"])
    out, stats = {}, {}
    files = {split: str(data_path(config, f"{split}_path")) for split in ("train", "valid", "test")}
    for split, tok in tokenized.items():
        truncation = truncation_report(tok, lines[split], config.data.max_seq_length)
        # A record whose answer was cut off entirely has nothing to learn from; a batch made only of such
        # records would give a 0/0 loss, so they are dropped (and counted).
        kept = tok.filter(lambda n: [x > 0 for x in n], input_columns="answer_tokens", batched=True,
                          desc=f"dropping {split} records with no answer tokens")
        lengths = pc.list_value_length(column(kept, "input_ids")).to_pylist()
        stats[split] = {"records": len(tok), "samples": len(kept), "truncated": truncation["truncated"],
                        "dropped_no_answer_tokens": len(tok) - len(kept), "dedup_dropped": dropped.get(split, 0),
                        "tokens": int(sum(lengths)),
                        "answer_tokens": int(pc.sum(column(kept, "answer_tokens")).as_py() or 0),
                        # the record length an average token attends over (sum n^2 / sum n): MFU's attention term
                        "attended_length": round(sum(n * n for n in lengths) / max(1, sum(lengths)), 2),
                        "truncation": truncation}
        if len(kept) == 0:
            raise TrainerError("EmptyDataset", {
                "field": f"data.{split}_path", "path": files[split], "line_count": len(tok),
                "suggestion": f"every {split} record lost its answer to truncation: raise data.max_seq_length "
                              f"(now {config.data.max_seq_length}) or shorten the prompts"})
        out[split] = kept.remove_columns(["truncated", "answer_tokens", "length", "answer_total", "answer_lost"])
        if config.data.packing and split == "train":
            out[split] = pack_dataset(out[split], config.data.max_seq_length)
            stats[split]["packed_rows"] = len(out[split])
            stats[split]["packing_fill"] = round(stats[split]["tokens"] / (len(out[split]) * config.data.max_seq_length), 4)
            log.info("packed %d train records into %d rows of %d tokens (%.1f%% filled)", len(kept),
                     len(out[split]), config.data.max_seq_length, 100 * stats[split]["packing_fill"])
    return out, stats


def pack_rows(lengths: list[int], max_seq_length: int) -> list[list[int]]:
    """Best-fit-decreasing: the record indices of each row of at most max_seq_length tokens. Used by
    pack_dataset and by preflight (_packing_rules), so the planned step count is the trained one."""
    import bisect
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, row index), sorted
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            cap, r = free.pop(k)
        else:
            cap, r = max_seq_length, len(rows)
            rows.append([])
        rows[r].append(i)
        if cap - lengths[i] > 0:
            bisect.insort(free, (cap - lengths[i], r))
    return rows


def pack_dataset(ds, max_seq_length: int):
    """Best-fit-decreasing packing of tokenized records into rows of at most max_seq_length tokens.
    position_ids restart at 0 for every record and no attention_mask is passed: sdpa and eager get a
    block-diagonal causal mask built from them per row, and flash-attention 2 gets each micro-batch flattened into
    one row (PadToLongestCollator(flatten=True)), the only form it runs as varlen. No token attends across
    records. The first label of every record is masked: nothing is predicted across a record boundary."""
    from datasets import Dataset
    if hasattr(ds, "with_format"):  # a datasets.Dataset: its columns read whole (column), not row by row
        ids, labels = column(ds, "input_ids").to_pylist(), column(ds, "labels").to_pylist()
    else:  # a mapping of lists (bench/gpu_check.py packs one on a GPU box without datasets or pyarrow)
        ids, labels = list(ds["input_ids"]), list(ds["labels"])
    lengths = [len(x) for x in ids]
    rows = pack_rows(lengths, max_seq_length)
    packed = {"input_ids": [], "labels": [], "position_ids": []}
    for row in rows:
        packed["input_ids"].append([t for i in row for t in ids[i]])
        packed["labels"].append([lab for i in row for lab in [IGNORE_INDEX] + list(labels[i][1:])])
        packed["position_ids"].append([p for i in row for p in range(lengths[i])])
    return Dataset.from_dict(packed)


class PadToLongestCollator:
    """Pads a batch to its longest record (never to max_seq_length); labels are padded with IGNORE_INDEX.
    flatten=True (flash-attention 2, see collator_for): packed rows are concatenated into one row of batch size 1
    with their position_ids, no padding, as transformers' DataCollatorWithFlattening does; flash-attention runs
    varlen only on such a batch (_is_packed_sequence needs batch size 1), a batch of several packed rows would get
    plain causal attention across records. Unpacked features (evaluation) are padded as usual."""

    def __init__(self, pad_token_id: int, flatten: bool = False):
        self.pad_token_id = pad_token_id
        self.flatten = flatten

    def __call__(self, features: list[dict]) -> dict:
        import numpy as np
        import torch
        width = max(len(f["input_ids"]) for f in features)
        packed = "position_ids" in features[0]
        if packed and self.flatten:
            return {k: torch.tensor([[x for f in features for x in f[k]]], dtype=torch.long)
                    for k in ("input_ids", "labels", "position_ids")}
        # each row written into a padded int64 array (3x faster than nested lists through torch.tensor)
        fills = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0, "position_ids": 0}
        batch = {}
        for key in ("input_ids", "labels", "position_ids" if packed else "attention_mask"):
            rows = np.full((len(features), width), fills[key], dtype=np.int64)
            for i, f in enumerate(features):
                rows[i, :len(f[key])] = f[key]
                if key == "position_ids":  # padding becomes one more "record" of its own, masked out of the loss
                    rows[i, len(f[key]):] = np.arange(width - len(f[key]))
            batch[key] = torch.from_numpy(rows)
        return batch


# --------------------------------------------------------------------------------------------------
# 7. Model: loading, LoRA, memory and disk estimates
# --------------------------------------------------------------------------------------------------

def attention_implementation(config: TrainingConfig) -> str:
    if not config.model.use_flash_attention_2:
        return "sdpa"
    import importlib.util
    if importlib.util.find_spec("flash_attn") is None:
        log.warning("model.use_flash_attention_2 is true but flash-attn is not installed: using sdpa "
                    "(pip install flash-attn to enable it)")
        return "sdpa"
    if config.compute.device != "cuda":
        log.warning("flash_attention_2 needs CUDA: using sdpa on %s", config.compute.device)
        return "sdpa"
    return "flash_attention_2"


# Every attn_implementation attention_implementation can return. Packed rows keep records apart under each:
# sdpa builds a block-diagonal causal mask per row from position_ids (masking_utils.find_packed_sequence_indices),
# flash-attention 2 needs the micro-batch flattened into one row (FLATTEN_PACKED). flex_attention and eager are
# never selected (eager would work like sdpa; flex_attention too, its document mask comes from the same code).
ATTENTION_IMPLEMENTATIONS = ("sdpa", "flash_attention_2")
FLATTEN_PACKED = ("flash_attention_2",)  # implementations that run varlen only on one flattened row


def collator_for(attn: Optional[str], pad_token_id: int) -> "PadToLongestCollator":
    """The training collator for a model loaded with `attn` (model.config._attn_implementation)."""
    return PadToLongestCollator(pad_token_id, flatten=attn in FLATTEN_PACKED)


def load_tokenizer(config: TrainingConfig):
    """The base checkpoint's tokenizer (eos as the pad token where it has none), loaded once per process and version
    of its files: validation's chat-template, truncation and packing rules, every template render and training use
    the same one (it was loaded up to four times a run). Nothing here changes it after loading."""
    ref = checkpoint_ref(config)
    key = (ref, _tokenizer_stamp(ref))
    if key not in _TOKENIZERS:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(ref)
        if tokenizer.pad_token_id is None:  # padding is masked out of loss and attention, so eos is a safe pad
            tokenizer.pad_token = tokenizer.eos_token
        _TOKENIZERS[key] = tokenizer
    return _TOKENIZERS[key]


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def stored_dtype(ckpt_cfg: dict) -> str:
    """The dtype a checkpoint's config.json says its weights are stored in (`dtype`, before transformers 5
    `torch_dtype`; float32 when it says none)."""
    value = ckpt_cfg.get("dtype") or ckpt_cfg.get("torch_dtype") or "float32"
    return str(value).removeprefix("torch.")


def compute_dtype(config: TrainingConfig) -> str:
    """The dtype autocast computes in: bfloat16/float16 under mixed precision, else float32."""
    return {"bf16": "bfloat16", "fp16": "float16"}.get(config.compute.mixed_precision, "float32")


def precision_facts(config: TrainingConfig, ckpt_cfg: dict) -> dict:
    """The dtypes of a run, from the config and the base's config.json: what load_base_model loads, estimate_memory
    counts and the manifest records. Full fine-tuning trains fp32 master weights whatever the checkpoint stores (bf16
    updates of ~lr x weight round away: most of a 2e-5 step is lost in bf16's 8 mantissa bits); LoRA keeps its frozen
    base in the compute dtype (QLoRA: quantized) and trains fp32 adapters (peft upcasts them). best/ is written in
    the stored dtype (full weights; an adapter stays as trained)."""
    lo, stored = config.model.lora, stored_dtype(ckpt_cfg)
    frozen = None
    if lo.enabled:
        frozen = {"4bit": "nf4", "8bit": "int8"}.get(lo.quantization, compute_dtype(config))
    return {"parameter_dtype": "float32", "frozen_base_dtype": frozen, "base_stored_dtype": stored,
            "compute_dtype": compute_dtype(config), "best_dtype": "float32" if lo.enabled else stored}


def load_base_model(config: TrainingConfig, attn: str):
    """Full fine-tuning loads fp32 weights (the master copy) whatever dtype the checkpoint stores (transformers 5
    would keep a bf16 checkpoint in bf16, and most small updates would round away); fp16/bf16 mixed precision is
    autocast. With model.lora the base is frozen in the compute dtype (4/8-bit quantized under QLoRA) and peft adds
    fp32 adapters (precision_facts)."""
    import torch
    from transformers import AutoModelForCausalLM
    lo = config.model.lora
    kwargs: dict = {"attn_implementation": attn,
                    "dtype": getattr(torch, compute_dtype(config)) if lo.enabled else torch.float32}
    if lo.enabled and lo.quantization != "none":
        from transformers import BitsAndBytesConfig
        compute = torch.bfloat16 if config.compute.mixed_precision == "bf16" else torch.float16
        kwargs["dtype"] = compute
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                               bnb_4bit_use_double_quant=True) if lo.quantization == "4bit"
            else BitsAndBytesConfig(load_in_8bit=True))
    model = AutoModelForCausalLM.from_pretrained(checkpoint_ref(config), **kwargs)
    if config.model.gradient_checkpointing:
        model.config.use_cache = False  # the KV cache is useless in training and conflicts with recompute
    if lo.enabled:
        model = add_lora(model, config)
    return model


LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_targets(model, config: TrainingConfig) -> list[str]:
    """The configured target modules, or the attention and MLP projections this architecture has."""
    if config.model.lora.target_modules:
        return list(config.model.lora.target_modules)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    found = [t for t in LORA_DEFAULT_TARGETS if t in names]
    if not found:
        raise TrainerError("InvalidConfig", {
            "field": "model.lora.target_modules", "value": None, "expected": "module names of this model",
            "suggestion": "list the linear layers to adapt, e.g. [q_proj, v_proj]"})
    return found


def add_lora(model, config: TrainingConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training
    lo = config.model.lora
    if lo.quantization != "none":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.model.gradient_checkpointing)
    targets = lora_targets(model, config)
    missing = [t for t in targets if not any(n.endswith(t) for n, _ in model.named_modules())]
    if missing:
        raise TrainerError("InvalidConfig", {
            "field": "model.lora.target_modules", "value": missing, "expected": "module names of this model",
            "suggestion": f"this model has none named {missing}; its projections are "
                          f"{[t for t in LORA_DEFAULT_TARGETS if t not in missing]}"})
    peft_config = PeftLoraConfig(task_type="CAUSAL_LM", r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                                 target_modules=targets, bias=lo.bias)
    model = get_peft_model(model, peft_config)
    counts = parameter_counts(model)
    trainable, total = counts["trainable"], counts["total"]
    log.info("LoRA r=%d alpha=%g on %s: %s trainable of %s parameters (%.3f%%)", lo.r, lo.alpha,
             ", ".join(targets), f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def parameter_counts(model) -> dict:
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in model.parameters())}


def architecture_dims(ckpt_cfg: dict) -> tuple[int, int, int, int, int, int]:
    """hidden, intermediate, layers, vocab, attention heads and key/value width from a config.json."""
    H, I, L, V = (ckpt_cfg.get(k, 0) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    heads = ckpt_cfg.get("num_attention_heads", 1)
    kv_dim = ckpt_cfg.get("num_key_value_heads", heads) * ckpt_cfg.get("head_dim", H // max(heads, 1))
    return H, I, L, V, heads, kv_dim


def count_parameters(ckpt_dir: Optional[Path], ckpt_cfg: dict) -> int:
    """Parameter count from the safetensors headers (no weights loaded), else from config.json."""
    if ckpt_dir is not None and list(Path(ckpt_dir).glob("*.safetensors")):
        total = 0
        for f in Path(ckpt_dir).glob("*.safetensors"):
            try:
                with f.open("rb") as fh:
                    header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
                total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise TrainerError("CheckpointNotFound", {
                    "field": "model.base_checkpoint", "value": str(ckpt_dir), "path": str(f),
                    "problem": f"unreadable safetensors header ({type(exc).__name__})",
                    "suggestion": f"{f.name} is truncated or corrupt: copy the checkpoint again"}) from exc
        return total
    H, I, L, V, heads, kv_dim = architecture_dims(ckpt_cfg)
    return V * H * (1 if ckpt_cfg.get("tie_word_embeddings", True) else 2) + L * layer_parameters(ckpt_cfg) + H


def layer_parameters(ckpt_cfg: dict) -> int:
    """One decoder layer: q/o (H x H each), k/v (H x kv_dim each), gate/up/down (H x I each), two norms."""
    H, I, L, V, heads, kv_dim = architecture_dims(ckpt_cfg)
    return 2 * H * H + 2 * H * kv_dim + 3 * H * I + 2 * H


def estimate_memory(config: TrainingConfig, ckpt_cfg: dict, n_params: int, shards: Optional[int] = None) -> dict:
    """Peak training memory per device, in bytes, before any weight is loaded.
    Model states (dtypes: precision_facts): fp32 weights (the master copy, whatever the checkpoint stores) + fp32
    grads + AdamW's two fp32 moments = 16 B/param, plus a 2 B/param autocast weight copy under fp16/bf16; under LoRA
    the frozen base in the compute dtype (2 B/param under fp16/bf16, else 4; QLoRA 0.5 or 1) and the adapters'
    fp32 states. Activations saved for backward, per token and layer:
    about 10*hidden + 4*intermediate + 2*kv_dim elements (measured on SmolLM3 with sdpa, which stores no
    seq x seq attention matrix); with gradient checkpointing only each layer's input (hidden) plus one
    layer's full set. Logits: fp32 logits and log-softmax, 2 x vocab x 4 B per token.
    FSDP full-shard / ZeRO-3 over `shards` ranks (default: the world size when compute.fsdp has full_shard):
    the states less the autocast copy are split evenly (states / shards), and each rank gathers whole units
    in the compute dtype instead: the largest unit (a decoder layer, or the embedding / LM head) twice, the
    one computing and the one prefetched. Activations and logits are per rank, as under DDP."""
    if shards is None:
        shards = world_size(config) if "full_shard" in (config.compute.fsdp or "") else 1
    hp = config.training.hyperparameters
    H, I, L, V, heads, kv_dim = architecture_dims(ckpt_cfg)
    amp = config.compute.mixed_precision in ("fp16", "bf16")
    elem = 2 if amp else 4
    optimizer_bytes = {"adamw": 8, "adamw_fused": 8, "adafactor": 4, "sgd": 0}[config.training.optimization.optimizer]
    lo = config.model.lora
    if lo.enabled:
        # frozen base: weights only, in the compute dtype (4/8-bit under QLoRA); adapters: weights + grads + optimizer
        frozen = {"none": 2 if amp else 4, "8bit": 1, "4bit": 0.5}[lo.quantization]
        dims = {"q_proj": (H, heads * (H // max(heads, 1))), "k_proj": (H, kv_dim), "v_proj": (H, kv_dim),
                "o_proj": (H, H), "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}
        targets = lo.target_modules or list(LORA_DEFAULT_TARGETS)
        adapter = L * sum(lo.r * sum(dims[t]) for t in targets if t in dims)
        states = int(n_params * frozen + adapter * (8 + optimizer_bytes))
    else:
        adapter = None
        states = n_params * (16 + (2 if amp else 0) + optimizer_bytes - 8)
    gathered = 0
    if shards > 1:
        amp_copy = 2 * n_params if amp and not lo.enabled else 0  # a LoRA base is in the compute dtype already
        states = int((states - amp_copy) / shards)
        gathered = 2 * max(layer_parameters(ckpt_cfg), V * H) * elem
    tokens = hp.batch_size * config.data.max_seq_length
    per_layer = (10 * H + 4 * I + 2 * kv_dim) * elem
    if config.model.gradient_checkpointing:
        activations = tokens * (L * H * elem + per_layer)
    else:
        activations = tokens * L * per_layer
    logits = tokens * V * 4 * 2
    out = {"parameters": n_params, "trainable_parameters": adapter if adapter is not None else n_params,
           "precision": precision_facts(config, ckpt_cfg),
           "weights_grads_optimizer_bytes": states, "activation_bytes": activations, "logits_bytes": logits}
    if shards > 1:
        out.update(shards=shards, gathered_units_bytes=gathered)
    out["total_bytes"] = int(sum(v for k, v in out.items() if k.endswith("_bytes")))
    out["total_gb"] = round(out["total_bytes"] / 2**30, 3)
    return out


def available_memory_bytes(config: TrainingConfig) -> tuple[Optional[int], str]:
    """Free memory of the smallest GPU in use, or the host's available RAM on CPU."""
    if config.compute.device == "cuda":
        import torch
        if torch.cuda.is_available():
            # a rank asks only about its own GPU: touching the others would put a CUDA context on each
            local = os.environ.get("LOCAL_RANK")
            devices = [int(local)] if local is not None else range(min(config.compute.num_gpus,
                                                                       torch.cuda.device_count()))
            return min(torch.cuda.mem_get_info(i)[0] for i in devices), torch.cuda.get_device_name(0)
        return None, "no CUDA device"
    for line in _read_text(Path("/proc/meminfo")).splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024, "host RAM"
    return None, "unknown"


def check_memory(config: TrainingConfig, ckpt_cfg: dict, validation: ValidationResult) -> dict:
    """Estimate vs available: warn above 80%, OutOfMemory above 100% with a batch size that would fit."""
    ref = config.resolved_paths.get("model.base_checkpoint")
    n_params = count_parameters(Path(ref["path"]) if ref else None, ckpt_cfg)
    est = estimate_memory(config, ckpt_cfg, n_params)
    available, device = available_memory_bytes(config)
    est.update(available_bytes=available, available_gb=round(available / 2**30, 3) if available else None,
               device=device)
    if not available:
        return est
    ratio = est["total_bytes"] / available
    est["fraction_of_available"] = round(ratio, 4)
    if ratio > 1:
        per_sample = (est["activation_bytes"] + est["logits_bytes"]) / config.training.hyperparameters.batch_size
        room = 0.8 * available - est["weights_grads_optimizer_bytes"] - est.get("gathered_units_bytes", 0)
        fits = int(room // per_sample) if per_sample and room > 0 else 0
        hp = config.training.hyperparameters
        if fits >= 1:
            fix = "Reduce " + smaller_batch_fix(hp.batch_size, hp.gradient_accumulation_steps, fits)
        else:
            fix = ("the weights, gradients and optimizer states alone do not fit: shard them across GPUs "
                   "(FSDP/DeepSpeed), use a smaller model, or LoRA")
        if not config.model.gradient_checkpointing:
            fix += ", or enable model.gradient_checkpointing"
        shard = fsdp_fix(config, ckpt_cfg, n_params, available)
        if shard:  # the estimate says FSDP would fit where DDP does not: lead with the exact change
            fix = f"{shard['suggestion']}; otherwise: {fix}"
        err = out_of_memory_error(config, f"estimated {est['total_gb']} GB > {est['available_gb']} GB available on "
                                          f"{device}", est["total_gb"], est["available_gb"], fix)
        if shard:
            err.details.update(config_change=shard["config_change"], fsdp_estimated_memory_gb=shard["gb_per_gpu"])
        raise err
    if ratio > 0.8:
        validation.warnings.append(f"estimated peak memory {est['total_gb']} GB is {ratio:.0%} of the "
                                   f"{est['available_gb']} GB available on {device} (spec: stay under 80%)")
    return est


# Plan before renting (--plan): target GPUs as one table. memory_mib: total memory as nvidia-smi reports it;
# peak_flops: dense bf16/fp16 tensor-core FLOP/s per GPU (vendor datasheets, SXM parts where there are two).
GPU_TYPES = {
    "H100-80GB": {"memory_mib": 81559, "peak_flops": 989e12},
    "H200-141GB": {"memory_mib": 143771, "peak_flops": 989e12},
    "A100-40GB": {"memory_mib": 40960, "peak_flops": 312e12},
    "A100-80GB": {"memory_mib": 81920, "peak_flops": 312e12},
    "L40S-48GB": {"memory_mib": 46068, "peak_flops": 362e12},
}
FIT_FRACTION = 0.8  # a strategy fits when its estimate is within 80% of a GPU's memory (spec: Memory Usage)
FSDP_FULL_SHARD = "full_shard auto_wrap"  # the compute.fsdp value --plan and the OutOfMemory fix name
PLAN_STRATEGIES = {  # strategy -> the settings that select it; activations and logits stay per GPU in all four
    "ddp": {"compute.fsdp": None, "model.lora.enabled": False, "model.lora.quantization": "none"},
    "fsdp": {"compute.fsdp": FSDP_FULL_SHARD, "model.lora.enabled": False, "model.lora.quantization": "none"},
    "lora": {"compute.fsdp": None, "model.lora.enabled": True, "model.lora.quantization": "none"},
    "qlora": {"compute.fsdp": None, "model.lora.enabled": True, "model.lora.quantization": "4bit"},
}


def _with_settings(config: TrainingConfig, settings: dict) -> TrainingConfig:
    """A copy of `config` with dotted keys set (the original is untouched)."""
    import copy
    out = copy.deepcopy(config)
    for dotted, value in settings.items():
        *parents, last = dotted.split(".")
        setattr(_dotted_get(out, ".".join(parents)), last, value)
    return out


def plan_strategy(config: TrainingConfig, ckpt_cfg: dict, n_params: int, name: str, num_gpus: int,
                  capacity_bytes: float) -> dict:
    """Per-GPU memory of one strategy (PLAN_STRATEGIES) with the configured batch on `num_gpus` GPUs of
    `capacity_bytes`. When it does not fit as configured and model.gradient_checkpointing is off, the estimate
    with it on is the one reported (gradient_checkpointing says which). config_change: the keys to set."""
    settings = dict(PLAN_STRATEGIES[name])
    shards = num_gpus if name == "fsdp" else 1
    est = estimate_memory(_with_settings(config, settings), ckpt_cfg, n_params, shards=shards)
    limit = FIT_FRACTION * capacity_bytes
    row = {"fits": est["total_bytes"] <= limit, "gradient_checkpointing": config.model.gradient_checkpointing}
    if not row["fits"] and not config.model.gradient_checkpointing:
        with_ckpt = {**settings, "model.gradient_checkpointing": True}
        est_ckpt = estimate_memory(_with_settings(config, with_ckpt), ckpt_cfg, n_params, shards=shards)
        row.update(fits=est_ckpt["total_bytes"] <= limit, gradient_checkpointing=True,
                   gb_per_gpu_without_gradient_checkpointing=est["total_gb"])
        settings, est = with_ckpt, est_ckpt
    row.update(gb_per_gpu=est["total_gb"], bytes_per_gpu=est["total_bytes"],
               config_change={k: v for k, v in settings.items() if _dotted_get(config, k) != v},
               breakdown={k: v for k, v in est.items() if k.endswith("_bytes") and k != "total_bytes"})
    return row


def fsdp_fix(config: TrainingConfig, ckpt_cfg: dict, n_params: int, capacity_bytes: float) -> Optional[dict]:
    """DDP (a full replica per GPU) does not fit but FSDP full-shard over the configured GPUs would: the exact
    config change and its estimate, for the OutOfMemory suggestion. None when that is not the case."""
    world = world_size(config)
    if (config.compute.device != "cuda" or world < 2 or "full_shard" in (config.compute.fsdp or "")
            or config.model.lora.enabled):
        return None
    row = plan_strategy(config, ckpt_cfg, n_params, "fsdp", world, capacity_bytes)
    if not row["fits"]:
        return None
    change = ", ".join(f"{k}: {json.dumps(v)}" for k, v in row["config_change"].items())
    return {"config_change": row["config_change"], "gb_per_gpu": row["gb_per_gpu"],
            "suggestion": f"DDP keeps a full replica of the model states on every GPU; FSDP full-shard over {world} "
                          f"GPUs needs about {row['gb_per_gpu']} GB per GPU: set {change}"}


OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_fused": 8, "adafactor": 4, "sgd": 0}  # per trainable parameter, fp32
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


def estimate_checkpoint_bytes(config: TrainingConfig, ckpt_cfg: dict, n_params: int) -> dict:
    """Bytes one checkpoint takes on disk: the weights as saved (fp32, 4 B per parameter; the adapter only under
    LoRA), the optimizer states (AdamW: two fp32 moments per trainable parameter), the base checkpoint's tokenizer
    and config files (20 MiB assumed for a Hub id), and 1 MiB for scheduler, RNG and trainer state."""
    trainable = estimate_memory(config, ckpt_cfg, n_params)["trainable_parameters"]
    weights = 4 * (trainable if config.model.lora.enabled else n_params)
    optimizer = trainable * OPTIMIZER_STATE_BYTES.get(config.training.optimization.optimizer, 8)
    ref = config.resolved_paths.get("model.base_checkpoint")
    if ref and Path(ref["path"]).is_dir():
        extra = sum(f.stat().st_size for f in Path(ref["path"]).iterdir()
                    if f.is_file() and not f.name.endswith(WEIGHT_FILE_SUFFIXES))
    else:
        extra = 20 * 2**20
    # under compute.fsdp Trainer's resume state holds the model's shards (fp32, every rank's piece) besides the
    # consolidated model.safetensors: the weights are on disk twice (_save_checkpoint_atomic)
    shards = weights if config.compute.fsdp else 0
    total = int(weights + shards + optimizer + extra + 2**20)
    out = {"weights_bytes": int(weights), "optimizer_bytes": int(optimizer), "other_bytes": int(extra + 2**20)}
    if shards:
        out["fsdp_model_shards_bytes"] = int(shards)
    return {**out, "total_bytes": total}


def check_disk(config: TrainingConfig, ckpt_cfg: dict, validation: ValidationResult, n_params: Optional[int] = None,
               resuming: bool = False) -> dict:
    """Free space on the output filesystem (shutil.disk_usage) against what the checkpoints need. The full need:
    the checkpoints retention keeps (save_total_limit scheduled saves, the latest and a backup, the best), the save
    under way before retention deletes the oldest, and the merged model under LoRA merge_at_end: a warning below it.
    Below two checkpoints (one when resuming: the run's own checkpoints are recycled) the run could not get past
    its second save: InsufficientDisk, exit 2, before any GPU time is spent."""
    if n_params is None:
        ref = config.resolved_paths.get("model.base_checkpoint")
        n_params = count_parameters(Path(ref["path"]) if ref else None, ckpt_cfg)
    one = estimate_checkpoint_bytes(config, ckpt_cfg, n_params)["total_bytes"]
    kept = config.training.checkpointing.save_total_limit + 3  # latest, backup and best may be none of them
    need = one * (kept + 1)
    lo = config.model.lora
    if lo.enabled and lo.merge_at_end:
        need += 4 * n_params
    best_dtype = precision_facts(config, ckpt_cfg)["best_dtype"]
    if not lo.enabled and best_dtype != "float32":  # best/ gets the weights rewritten in the stored dtype
        need += DTYPE_BYTES.get(best_dtype, 4) * n_params
    minimum = one * (1 if resuming else 2)
    probe = Path(config.logging.output_dir).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return {}
    gb, h = (lambda b: round(b / 2**30, 3)), format_bytes  # noqa: E731
    out = {"path": str(probe), "free_bytes": free, "checkpoint_bytes": one, "needed_bytes": need,
           "minimum_bytes": minimum, "free_gb": gb(free), "checkpoint_gb": gb(one), "needed_gb": gb(need)}
    if free < minimum:
        raise TrainerError("InsufficientDisk", {
            "field": "logging.output_dir", "value": config.logging.output_dir,
            "expected": f"a filesystem with at least {h(minimum)} free", **out,
            "suggestion": f"{h(free)} free on the filesystem of {probe}, but one checkpoint takes about {h(one)} and "
                          f"the run needs room for {1 if resuming else 2} at least ({h(need)} for all it keeps): free "
                          "space there, or set logging.output_dir (--output-dir) to a larger disk"})
    if free < need:
        validation.warnings.append(
            f"logging.output_dir: {h(free)} free on the filesystem of {probe}, less than the {h(need)} the "
            f"checkpoints may take ({kept} kept + 1 being saved, about {h(one)} each"
            + (", plus the merged model" if lo.enabled and lo.merge_at_end else "")
            + "): the run may stop with DiskFull; lower training.checkpointing.save_total_limit or free space")
    return out


def measure_training_memory(model, optimizer, batch: dict) -> dict:
    """What the estimate predicts, measured: bytes of weights, grads and optimizer states held now, and of
    the tensors autograd saves for backward on `batch` (storage-deduplicated), plus the logits."""
    import torch
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    states = sum(p.numel() * p.element_size() for p in model.parameters())
    states += sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)  # grads
    for st in optimizer.state.values():
        states += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    logits = out.logits.numel() * out.logits.element_size()
    del out
    return {"weights_grads_optimizer_bytes": states, "saved_activation_bytes": sum(saved.values()),
            "logits_bytes": logits, "total_bytes": states + sum(saved.values()) + logits}


def peak_memory() -> dict:
    import resource
    out = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    import torch
    if torch.cuda.is_available():
        out["gpu_peak_allocated_bytes"] = [torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())]
    return out


# --------------------------------------------------------------------------------------------------
# 8. Tracking: one metrics dict feeds the console/train.log line, the CSV curves, TensorBoard, W&B, MLflow
# --------------------------------------------------------------------------------------------------

@dataclass
class Tracker:
    run_id: str
    log_dir: Path  # <logging_dir>/<run_id>: train.log and the CSV curves
    tensorboard_dir: Optional[Path] = None
    tb_writer: Any = None
    wandb_run: Any = None
    mlflow_client: Any = None
    mlflow_run_id: Optional[str] = None
    is_main: bool = True
    echo: bool = True  # False: metrics go to the files only (the dry run before training prints one line)
    wandb_fallback: Optional[str] = None  # why wandb.init failed online and W&B went offline instead

    @property
    def train_curve(self) -> Path:
        return self.log_dir / "train_loss.csv"

    @property
    def val_curve(self) -> Path:
        return self.log_dir / "val_loss.csv"

    @property
    def wandb_url(self) -> Optional[str]:
        return getattr(self.wandb_run, "url", None) if self.wandb_run is not None else None

    def restart_at(self, step: int) -> None:
        """A resume from `step` continues the curves from there: the CSV rows logged after it (by the process that
        was interrupted, or on a timeline the resume abandons) are dropped, and TensorBoard purges its events after
        it (SummaryWriter's purge_step). W&B and MLflow keep what they were sent."""
        if not self.is_main:
            return
        for path in (self.train_curve, self.val_curve):
            rows = []
            if path.exists():
                with path.open(newline="") as fh:
                    rows = [r for r in list(csv.reader(fh))[1:] if int(r[0]) <= step]
            with open_atomic(path, newline="") as fh:
                csv.writer(fh).writerows([["step", "epoch", "value"], *rows])
        if self.tb_writer is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.tb_writer.close()
            self.tb_writer = SummaryWriter(log_dir=str(self.tensorboard_dir), purge_step=step + 1)

    def close(self, status: str = "completed", manifest_path: Optional[Path] = None) -> None:
        """Flush and close every tracker; the manifest becomes an MLflow artifact."""
        if self.tb_writer is not None:
            self.tb_writer.close()
            self.tb_writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=0 if status == "completed" else 1)
            self.wandb_run = None
        if self.mlflow_client is not None:
            if manifest_path is not None and Path(manifest_path).is_file():
                self.mlflow_client.log_artifact(self.mlflow_run_id, str(manifest_path))
            self.mlflow_client.set_terminated(self.mlflow_run_id, {"completed": "FINISHED", "interrupted": "KILLED",
                                                                    }.get(status, "FAILED"))
            self.mlflow_client = None


def init_tracking(config: TrainingConfig, run_id: Optional[str] = None, resume: bool = False,
                  is_main: bool = True, resume_step: Optional[int] = None,
                  wandb_mode: Optional[str] = None) -> Tracker:
    """Open the run's trackers. On resume the CSV curves are kept, and continue from `resume_step` when it is given
    (Tracker.restart_at; a training resume calls that when it starts training, so one that fails before keeps
    the run's curves whole), and W&B continues the same run id. `wandb_mode`: "offline" when preflight found the
    W&B server unreachable (None: W&B's own setting)."""
    run_id = run_id or make_run_id(config)
    paths = run_paths(config, run_id)
    tracker = Tracker(run_id=run_id, log_dir=paths["log_dir"], tensorboard_dir=paths["tensorboard_dir"],
                      is_main=is_main)
    if not is_main:
        return tracker
    tracker.log_dir.mkdir(parents=True, exist_ok=True)
    for path in (tracker.train_curve, tracker.val_curve):
        if not (resume and path.exists()):
            with open_atomic(path, newline="") as fh:
                csv.writer(fh).writerow(["step", "epoch", "value"])
    if tracker.tensorboard_dir is not None:
        from torch.utils.tensorboard import SummaryWriter
        tracker.tensorboard_dir.mkdir(parents=True, exist_ok=True)
        tracker.tb_writer = SummaryWriter(log_dir=str(tracker.tensorboard_dir))
    wb = config.logging.wandb
    if wb.enabled:
        import wandb
        wandb_dir = paths["run_dir"]  # W&B files live with the run, not in the working directory
        wandb_dir.mkdir(parents=True, exist_ok=True)
        argv, sys.argv = sys.argv, redact(sys.argv)  # W&B records sys.argv in the run's metadata: redacted there too
        def start(mode: Optional[str]):
            return wandb.init(
                project=wb.project, entity=wb.entity, tags=list(wb.tags), name=run_id, id=run_id,
                resume="allow", dir=str(wandb_dir), config=redact(config.to_dict()), mode=mode,
                settings=wandb.Settings(console="off", silent=True, init_timeout=WANDB_INIT_SECONDS))
        try:
            try:
                tracker.wandb_run = start(wandb_mode)
            except wandb.errors.Error as exc:  # online, reachable, and still refused (a bad key, a stalled API)
                if wandb_mode == "offline" or os.environ.get("WANDB_MODE", "").lower() == "offline":
                    raise
                tracker.wandb_fallback = f"{type(exc).__name__}: {str(exc)[:300]}"
                log.warning("W&B could not start online (%s): W&B runs offline for this run (`wandb sync` it later)",
                            tracker.wandb_fallback)
                tracker.wandb_run = start("offline")
        finally:
            sys.argv = argv
    if config.logging.mlflow.enabled:
        _init_mlflow(tracker, config, run_id, resume)
    if resume and resume_step is not None:
        tracker.restart_at(resume_step)
    return tracker


def mlflow_uri(config: TrainingConfig) -> str:
    """The configured tracking URI, or a SQLite store in the output dir (no server needed)."""
    uri = config.logging.mlflow.tracking_uri
    return uri or f"sqlite:///{Path(config.logging.output_dir).expanduser().resolve() / 'mlflow.db'}"


def _init_mlflow(tracker: Tracker, config: TrainingConfig, run_id: str, resume: bool) -> None:
    """One MLflow run per run_id: params (the flattened config), tags, metrics per step, the manifest at the end.
    A resumed run continues the same MLflow run."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient
    out_dir = Path(config.logging.output_dir).expanduser().resolve()
    client = MlflowClient(tracking_uri=mlflow_uri(config))
    name = config.logging.mlflow.experiment
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        name, artifact_location=(out_dir / "mlartifacts").as_uri())
    # newest first: a run id started over (--force) has a new MLflow run, and its resumes continue that one
    found = client.search_runs([exp_id], filter_string=f"tags.run_id = '{run_id}'", max_results=1,
                               order_by=["attributes.start_time DESC"]) if resume else []
    if found:
        tracker.mlflow_run_id = found[0].info.run_id
        client.update_run(tracker.mlflow_run_id, status="RUNNING")
    else:
        tags = redact({"run_id": run_id, "dataset": config.data.dataset_name,
                       "dataset_version": config.data.dataset_version, "base_model": config.model.base_checkpoint,
                       **{f"tag.{t}": "true" for t in config.logging.wandb.tags}})
        run = client.create_run(exp_id, run_name=run_id, tags=tags)
        tracker.mlflow_run_id = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in _flatten(redact(config.to_dict())).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(tracker.mlflow_run_id, params=params[i:i + 100])
    tracker.mlflow_client = client


def format_value(key: str, value: Any) -> str:
    """One format per metric, whatever its size: 4 significant digits for losses, perplexity, norms and learning
    rates; 4 decimals for rates in [0, 1]; k/M for throughput; 2 decimals for the epoch."""
    if not isinstance(value, float) or not math.isfinite(value):
        return str(value)
    if key == "epoch":
        return f"{value:.2f}"
    if key.endswith("per_second"):
        return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}k" if value >= 1e3 else f"{value:.0f}"
    if key.endswith(("accuracy", "exact_match", "numeric_match", "numeric_f1")):
        return f"{value:.4f}"
    if key.endswith("seconds"):
        return format_duration(value)
    return f"{value:.4g}"


def format_metrics(step: int, metrics: dict, max_steps: Optional[int] = None,
                   eta_seconds: Optional[float] = None) -> str:
    """`step 150/450 (33%) | epoch 1.00 | train_loss 1.078 | ... | eta 1m40s`."""
    head = f"step {step}" + (f"/{max_steps} ({100 * step // max_steps}%)" if max_steps else "")
    parts = [head] + [f"{key} {format_value(key, value)}" for key, value in metrics.items()]
    if eta_seconds is not None:
        parts.append(f"eta {format_duration(eta_seconds)}")
    return " | ".join(parts)


def format_epoch_line(epoch: int, total: Any, val_loss: Optional[float], val_perplexity: Optional[float],
                      best: bool) -> str:
    """`epoch 2/3: val_loss 0.80, val_perplexity 2.23 (best)`; total is num_epochs as the config gave it."""
    def num(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.2f}"
    return (f"epoch {epoch}/{total:g}: val_loss {num(val_loss)}, val_perplexity {num(val_perplexity)}"
            + (" (best)" if best else ""))


def log_metrics(tracker: Tracker, step: int, metrics: dict, max_steps: Optional[int] = None,
                eta_seconds: Optional[float] = None, console: bool = True) -> None:
    """Log one metrics dict everywhere: console + train.log (console=False: train.log only, the terminal's progress
    bar shows it), CSV curves, TensorBoard, W&B."""
    if not tracker.is_main:
        return
    if tracker.echo:
        log.info(format_metrics(step, metrics, max_steps, eta_seconds), extra={"file_only": not console})
    epoch = metrics.get("epoch", "")
    for key, path in (("train_loss", tracker.train_curve), ("val_loss", tracker.val_curve)):
        if key in metrics:
            with path.open("a", newline="") as fh:
                csv.writer(fh).writerow([step, epoch, _csv_float(metrics[key])])
    # train_loss -> train/loss, val_loss -> val/loss, test_perplexity -> test/perplexity: dashboards group by split
    scalars = {(k.replace("_", "/", 1) if k.startswith(("train_", "val_", "test_")) else k): float(v)
               for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if tracker.tb_writer is not None:
        for key, value in scalars.items():
            tracker.tb_writer.add_scalar(key, value, step)
        tracker.tb_writer.flush()
    if tracker.wandb_run is not None:
        tracker.wandb_run.log(scalars, step=step)
    if tracker.mlflow_client is not None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        tracker.mlflow_client.log_batch(tracker.mlflow_run_id, metrics=[
            Metric(k, v, now, step) for k, v in scalars.items() if math.isfinite(v)])


def _csv_float(value: Any) -> str:
    return "NaN" if isinstance(value, float) and math.isnan(value) else str(value)


# Progress of long work (training steps, evaluation batches, scanning and tokenizing data, answer generation), by
# output kind: where a person watches (stderr is a terminal) one live tqdm bar on stderr, which console log lines
# clear and redraw (ConsoleHandler, section 19); in a file or pipe a plain INFO line at most every
# PROGRESS_LINE_SECONDS, so a short task prints nothing and a log stays readable.
PROGRESS_LINE_SECONDS = 10.0
PROGRESS_BAR_DELAY_SECONDS = 1.0  # a bar appears only for work that lasts longer than this (no flicker)
PROGRESS_WARMUP_UPDATES = 3  # the ETA comes from the pace after these updates (the first ones pay for start-up)
_live_bars: set = set()  # open tqdm bars: ConsoleHandler clears them around each console line


def bars_on() -> bool:
    """A live bar only where a person watches: stderr is a terminal, and only rank 0 draws."""
    return is_main_process() and sys.stderr.isatty()


class Progress:
    """What `progress` yields: `update(n=1)`, `set_postfix(text)` (the bar's tail: loss, tokens/s, ...) and
    `eta_seconds()`. The ETA comes from the measured pace after the first PROGRESS_WARMUP_UPDATES updates, so a slow
    first step (compilation, caches) does not inflate it; None before that (no guess is shown)."""

    def __init__(self, total: int, desc: str, unit: str = "records", lines: bool = True, leave: bool = False,
                 initial: int = 0, delay_seconds: float = PROGRESS_BAR_DELAY_SECONDS, byte_counts: bool = False):
        self.total, self.desc, self.unit, self.leave = int(total or 0), desc, unit, leave
        self.n, self.byte_counts, self.delay_seconds = initial, byte_counts, delay_seconds
        self.mode = "bar" if bars_on() else ("lines" if lines and is_main_process() else "off")
        self.start = self.last_line = time.monotonic()
        self.initial, self.pace_from, self.bar, self.postfix, self.updates = initial, None, None, "", 0
        if self.mode == "bar" and delay_seconds <= 0:
            self._open_bar()

    def _open_bar(self) -> None:
        from tqdm import tqdm
        scale = {"unit_scale": True, "unit_divisor": 1024} if self.byte_counts else {}
        self.bar = tqdm(total=self.total or None, initial=self.n, desc=self.desc, unit=self.unit if not
                        self.byte_counts else "B", leave=self.leave, file=sys.stderr, dynamic_ncols=True,
                        mininterval=0.25, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit} "
                        "[{elapsed}{postfix}]", **scale)
        _live_bars.add(self.bar)
        self._refresh_postfix()

    def eta_seconds(self) -> Optional[float]:
        """Seconds left at the pace measured since the warm-up updates (None until then, or without a total)."""
        rate = self.pace()
        if rate is None or not self.total:
            return None
        return max(0.0, (self.total - self.n) / rate) if rate > 0 else None

    def pace(self) -> Optional[float]:
        """Units a second since the warm-up updates; None until there is a second measurement."""
        if self.pace_from is None or self.n <= self.pace_from[1]:
            return None
        return (self.n - self.pace_from[1]) / max(1e-9, time.monotonic() - self.pace_from[0])

    def update(self, n: int = 1) -> None:
        self.n += n
        self.updates += 1
        now = time.monotonic()
        if self.pace_from is None and self.updates >= PROGRESS_WARMUP_UPDATES:
            self.pace_from = (now, self.n)
        if self.mode == "bar":
            if self.bar is None and now - self.start >= self.delay_seconds:
                self._open_bar()
            elif self.bar is not None:
                self.bar.update(n)
                self._refresh_postfix()
        elif self.mode == "lines" and now - self.last_line >= PROGRESS_LINE_SECONDS:
            self.last_line = now
            log.info(self.line())

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        self._refresh_postfix()

    def _refresh_postfix(self) -> None:
        if self.bar is not None:
            eta = self.eta_seconds()
            tail = ", ".join(p for p in (self.postfix, f"eta {format_duration(eta)}" if eta is not None else "") if p)
            self.bar.set_postfix_str(tail, refresh=False)

    def line(self) -> str:
        """`tokenizing train: 120000/200000 records (60%), 4.1k records/s, eta 19s` (the plain line of a pipe)."""
        def amount(v: float) -> str:
            return format_bytes(v) if self.byte_counts else f"{int(v)}"
        done = f"{amount(self.n)}/{amount(self.total)}" if self.total else amount(self.n)
        pct = f" ({100 * self.n // self.total}%)" if self.total else ""
        rate = self.pace()
        if rate is None:
            rate = (self.n - self.initial) / max(1e-9, time.monotonic() - self.start)
        speed = (f"{format_bytes(rate)}/s" if self.byte_counts
                 else f"{format_value('per_second', float(rate))} {self.unit}/s")
        eta = self.eta_seconds()
        return (f"{self.desc}: {done}{'' if self.byte_counts else ' ' + self.unit}{pct}, {speed}"
                + (f", {self.postfix}" if self.postfix else "") + (f", eta {format_duration(eta)}" if eta is not None
                                                                   else ""))

    def close(self) -> None:
        if self.bar is not None:
            _live_bars.discard(self.bar)
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def progress(total: int, desc: str, **options):
    """`with progress(len(records), "generating answers") as p: ... p.update()`: a live bar on a terminal, a log
    line every ~10 s in a file or pipe (records done, total, rate, ETA). Options: unit ("records"), lines (False:
    nothing in a pipe, for work whose own log lines say enough), leave (keep the finished bar), byte_counts."""
    bar = Progress(total, desc, **options)
    try:
        yield bar
    finally:
        bar.close()


def _add_file_log(path: Path) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")  # flushed per record, so `tail -f` works
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(message)s"))  # secrets never logged
    log.addHandler(handler)
    return handler


LATEST_LOG_POINTER = "# finance_trainer: the most recently started run's log is "  # first line of a pointer file


def follow_latest_log(run_log: Path) -> None:
    """`<logging_dir>/train.log` follows the run most recently started under logging_dir (spec Phase 3: `tail -f
    logs/train.log`): a relative symlink to `<run_id>/train.log`, swapped atomically, so `tail -F` follows each new
    run; where symlinks fail, a one-line pointer file naming the log. A regular file of someone else's by that name
    is left alone (a warning says so). Never fails the run."""
    link = run_log.parent.parent / "train.log"
    try:
        if link.exists() and not link.is_symlink() and not link.read_text(errors="replace").startswith(
                LATEST_LOG_POINTER):
            log.warning("%s is not this trainer's link: left alone (this run's log is %s)", link, run_log)
            return
        tmp = link.with_name(f"{TMP_PREFIX}train.log-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            os.symlink(Path(run_log.parent.name) / run_log.name, tmp)
        except OSError:  # a filesystem without symlinks
            tmp.write_text(f"{LATEST_LOG_POINTER}{run_log}\n")
        os.replace(tmp, link)
    except OSError as exc:
        log.warning("could not point %s at this run's log (%s): follow %s", link, exc, run_log)


def echo_config(config: TrainingConfig) -> None:
    """Never silently change a hyperparameter: print the final config and what differs from defaults."""
    import yaml
    # the whole config goes to train.log and the manifest; the console gets what differs from the defaults, as
    # one block (a WARNING per key buried the warnings that need attention)
    log.info("resolved config:\n%s", yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip(),
             extra={"file_only": True})
    if config.overrides:
        log.info("command-line overrides: %s", ", ".join(config.overrides))  # --set, --output-dir, --baseline
    diffs = config_differences_from_defaults(config)
    if diffs:
        rows = [d.rsplit(" (default ", 1) for d in diffs]
        width = max(len(r[0]) for r in rows)
        log.info("%d settings differ from defaults (full config in train.log and the manifest):\n%s", len(diffs),
                 "\n".join(f"  {r[0]:<{width}}  (default {r[1]}" if len(r) == 2 else f"  {r[0]}" for r in rows))


# --------------------------------------------------------------------------------------------------
# 9. Callbacks: small, one job each (metrics, eval/save flow, guards, early stopping, preemption)
# --------------------------------------------------------------------------------------------------

NOISE_SUFFIXES = ("_runtime", "_per_second", "_preparation_time")  # Trainer's timing keys; tokens_per_second is ours
HF_TO_OURS = {"loss": "train_loss", "eval_loss": "val_loss", "eval_perplexity": "val_perplexity",
              "eval_token_accuracy": "val_token_accuracy"}


@dataclass
class RunHistory:
    """What the callbacks saw, for the manifest."""
    train: list = field(default_factory=list)  # (step, epoch, loss)
    evals: list = field(default_factory=list)  # (step, epoch, {val metrics})
    summary: dict = field(default_factory=dict)
    early_stopped: Optional[dict] = None
    anomalies: list = field(default_factory=list)  # every guard event, warnings included
    epoch_seconds: list = field(default_factory=list)  # wall time of each epoch run in this process
    start_tokens: int = 0  # tokens seen before this process started (resume)
    gpu_utilization: list = field(default_factory=list)  # % samples taken at log steps
    checkpoints_saved: int = 0
    # this process's train() time, split: inside optimizer steps (on_step_begin..on_step_end), in evaluations
    # during training, in checkpoint saves (with the manifest written after each)
    training_seconds: float = 0.0
    eval_seconds: float = 0.0
    save_seconds: float = 0.0
    stop: Optional[dict] = None  # the anomaly that stopped the run
    preempted: Optional[dict] = None  # {"signal", "step", "epoch"} when SIGTERM/SIGUSR1 stopped it
    val_answer_eval_seconds: list = field(default_factory=list)  # answer_eval.on_validation: per evaluation

    def record(self, step: int, metrics: dict) -> None:
        if "train_loss" in metrics:
            self.train.append((step, metrics["epoch"], metrics["train_loss"]))
        vals = {k: v for k, v in metrics.items() if k.startswith("val_")}
        if vals:
            self.evals.append((step, metrics["epoch"], vals))

    def record_anomaly(self, kind: str, state, stop: bool, step: Optional[int] = None, epoch: Optional[float] = None,
                       **details) -> None:
        """`step` and `epoch` default to the state's (the step that just ended); a guard acting inside the step
        under way passes both for that step (epoch_at_step). The first stopping anomaly is the run's stop."""
        event = {"kind": kind, "step": state.global_step if step is None else step,
                 "epoch": round(state.epoch or 0.0, 4) if epoch is None else round(epoch, 4),
                 "action": "stopped" if stop else "warned", **details}
        self.anomalies.append(event)
        if stop and self.stop is None:
            self.stop = event
        (log.error if stop else log.warning)("anomaly: %s", json.dumps(event, default=str))


@dataclass
class StepProbe:
    """Filled by FinanceTrainer inside each optimizer step, read by the guards before the update."""
    loss_sum: Any = None  # sum of this step's micro-batch losses (a tensor: no sync until a guard reads it)
    grad_norm: Optional[float] = None  # pre-clip norm


def _ignore_event(*args, **kw) -> None:
    return None


class Callback:
    """Our callbacks' base: every Trainer event is a no-op until a subclass defines it. Trainer's CallbackHandler
    only calls `getattr(callback, event)(args, state, control, **kw)` on each callback in turn (keeping `control`
    when one is returned) and never checks for TrainerCallback, so transformers stays out of this module's import.
    An event a later transformers adds is a no-op here too, as it is in TrainerCallback."""

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return _ignore_event
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def epoch_at_step(step: int, state, args, train_dataloader=None) -> float:
    """The epoch Trainer records when optimizer step `step` (1-based) ends: whole epochs done + micro-batches done
    in this epoch / micro-batches per epoch (the last step of an epoch takes the remainder), the same float as
    Trainer's `epoch + (step + 1) / steps_in_epoch`. Without the dataloader's length: step x epochs / max_steps."""
    try:
        per_epoch = len(train_dataloader)  # micro-batches per epoch on this rank
    except TypeError:
        per_epoch = 0
    if not per_epoch:
        return step * state.num_train_epochs / state.max_steps if state.max_steps else (state.epoch or 0.0)
    accumulation = args.gradient_accumulation_steps
    updates = max(1, math.ceil(per_epoch / accumulation))
    done, k = divmod(step - 1, updates)
    return done + min((k + 1) * accumulation, per_epoch) / per_epoch


class TrainingTimeCallback(Callback):
    """Where this process's time goes: seconds inside optimizer steps (history.training_seconds, the clock of
    tokens/s) and the wall time of each epoch. FinanceTrainer times evaluations and saves (eval_seconds,
    save_seconds)."""

    def __init__(self, history: RunHistory):
        self.history = history
        self.step_start, self.epoch_start = None, None

    def on_step_begin(self, args, state, control, **kw):
        self.step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        # training time = inside optimizer steps; evaluations, saves and logging come after on_step_end
        if self.step_start is not None:
            self.history.training_seconds += time.perf_counter() - self.step_start
            self.step_start = None

    def on_epoch_begin(self, args, state, control, **kw):
        self.epoch_start = time.time()

    def on_epoch_end(self, args, state, control, **kw):
        if self.epoch_start is not None:
            self.history.epoch_seconds.append(round(time.time() - self.epoch_start, 3))


class MetricsCallback(Callback):
    """Renames Trainer's log keys to ours, adds tokens/s, and sends the dict to log_metrics (and, with status_dir,
    to the run's status file)."""

    def __init__(self, tracker: Tracker, history: RunHistory, status_dir: Optional[Path] = None, dry_run: bool = False):
        self.tracker, self.history, self.status_dir, self.dry_run = tracker, history, status_dir, dry_run
        self.last_time, self.last_tokens = None, 0
        self.start_time, self.start_step = time.time(), 0
        self.latest: dict = {}
        self.steps: Optional[Progress] = None  # the training bar; its pace is the ETA of the step lines and --status

    def on_train_begin(self, args, state, control, **kw):
        self.last_time, self.last_tokens = self.history.training_seconds, state.num_input_tokens_seen
        self.start_time, self.start_step = time.time(), state.global_step
        self.history.start_tokens = state.num_input_tokens_seen
        # a pipe gets the step lines instead of bar lines; the dry run's bar leaves no trace (it prints one line)
        self.steps = Progress(state.max_steps, "dry run" if self.dry_run else "training", unit="steps", lines=False,
                              leave=not self.dry_run, initial=state.global_step, delay_seconds=0)

    def on_step_end(self, args, state, control, **kw):
        if self.steps is not None:
            self.steps.update(state.global_step - self.steps.n)

    def on_train_end(self, args, state, control, **kw):
        if self.steps is not None:
            self.steps.close()

    # checkpoints_saved is counted by _train's after_save, before the manifest that follows each save is written

    def eta(self, state) -> tuple[float, Optional[float]]:
        """(elapsed seconds in this process, estimated seconds left) from the pace of the steps after the first few
        (PROGRESS_WARMUP_UPDATES): those pay for start-up and would inflate it; evaluations and saves between later
        steps are in the pace, as they will be in the time left. None until it is measured."""
        return time.time() - self.start_time, self.steps.eta_seconds() if self.steps is not None else None

    def write_status(self, state, status: str = "running") -> None:
        if self.status_dir is None or not self.tracker.is_main:
            return
        elapsed, eta = self.eta(state)
        write_status(self.status_dir, {"run_id": self.tracker.run_id, "status": status, "step": state.global_step,
                                       "max_steps": state.max_steps, "epoch": round(state.epoch or 0.0, 4),
                                       "elapsed_seconds": round(elapsed, 1),
                                       "eta_seconds": round(eta, 1) if eta is not None else None, **self.latest})

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        if "train_loss" in logs and "loss" not in logs:  # Trainer's end-of-run summary, not a curve point
            self.history.summary.update(logs)
            return
        metrics = {"epoch": round(state.epoch or 0.0, 4)}
        for key, value in logs.items():
            if key in ("epoch", "num_input_tokens_seen") or key.endswith(NOISE_SUFFIXES):
                continue
            metrics[HF_TO_OURS.get(key, key.replace("eval_", "val_"))] = value
        if "train_loss" in metrics:
            util = _gpu_utilization()
            if util is not None:
                self.history.gpu_utilization.append(util)
            now = self.history.training_seconds  # time in optimizer steps: evaluations and saves left out
            tokens = state.num_input_tokens_seen
            if self.last_time is not None and now > self.last_time and tokens >= self.last_tokens:
                metrics["tokens_per_second"] = round((tokens - self.last_tokens) / (now - self.last_time), 1)
            self.last_time, self.last_tokens = now, tokens
        self.history.record(state.global_step, metrics)
        step_line = "train_loss" in metrics
        if step_line and self.steps is not None:
            self.steps.set_postfix(bar_postfix(metrics))
        # on a terminal the bar carries the step line (train.log still gets it); evaluations print as events
        on_bar = step_line and self.steps is not None and self.steps.mode == "bar" and sys.stdout.isatty()
        log_metrics(self.tracker, state.global_step, metrics, state.max_steps,
                    eta_seconds=self.eta(state)[1] if step_line else None, console=not on_bar)
        self.latest.update({k: _json_float(metrics[k]) for k in ("train_loss", "val_loss", "tokens_per_second")
                            if k in metrics})
        self.write_status(state)


def bar_postfix(metrics: dict) -> str:
    """The training bar's tail, in the step line's formats: `epoch 1.00, loss 1.078, lr 0.0003, 3.1k tok/s`."""
    names = {"epoch": "epoch", "train_loss": "loss", "learning_rate": "lr"}
    parts = [f"{short} {format_value(key, metrics[key])}" for key, short in names.items() if key in metrics]
    if "tokens_per_second" in metrics:
        parts.append(f"{format_value('tokens_per_second', metrics['tokens_per_second'])} tok/s")
    return ", ".join(parts)


class EvalProgressCallback(Callback):
    """One bar per evaluation (batches done of the split's), closed when its metrics arrive; in a pipe a line every
    ~10 s only when an evaluation takes that long."""

    def __init__(self):
        self.bar: Optional[Progress] = None

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kw):
        if self.bar is None:
            try:
                total = len(eval_dataloader)
            except TypeError:
                total = 0
            self.bar = Progress(total, "evaluating", unit="batches")
        self.bar.update(1)

    def on_evaluate(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    on_predict = on_evaluate


class EvalSaveFlowCallback(Callback):
    """Checkpoint at every evaluation (spec: save before every eval, so the best is always on disk),
    and evaluate + save at every epoch end under save_strategy: epoch."""

    def __init__(self, save_strategy: str, dry_run: bool):
        self.save_strategy, self.dry_run = save_strategy, dry_run
        self.last_saved_step = -1

    def on_step_end(self, args, state, control, **kw):
        if control.should_evaluate and not self.dry_run:
            control.should_save = True
        return control

    def on_epoch_end(self, args, state, control, **kw):
        if (self.save_strategy == "epoch" and not self.dry_run
                and state.global_step != self.last_saved_step and state.global_step > 0):
            control.should_evaluate = True
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kw):
        self.last_saved_step = state.global_step


class EpochSummaryCallback(Callback):
    """One line per epoch end, as the spec's Session 1 shows it: `epoch 2/3: val_loss 0.80, val_perplexity
    2.23 (best)`. The epoch-end evaluation arrives in on_evaluate (after on_epoch_end, or before it when a
    step evaluation falls on the epoch's last step), so the line is printed there for an evaluation at a whole
    epoch. `(best)` is Trainer's own test, made just after on_evaluate: metric_for_best_model strictly better
    than state.best_metric (the best of every earlier evaluation), which is how the best checkpoint is chosen."""

    def __init__(self, history: RunHistory, num_epochs: Any, metric: str, dry_run: bool):
        self.history, self.total, self.metric, self.dry_run = history, num_epochs, metric, dry_run
        self.printed: set = set()

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        epoch = state.epoch or 0.0
        if self.dry_run or state.global_step == 0 or not metrics or abs(epoch - round(epoch)) > 1e-6 \
                or round(epoch) in self.printed:
            return
        greater = EVAL_METRICS[self.metric]
        ref = state.best_metric if state.best_metric is not None else (-math.inf if greater else math.inf)
        value = metrics.get(self.metric.replace("val_", "eval_"))
        best = value is not None and (value > ref if greater else value < ref)  # NaN is never best
        self.printed.add(round(epoch))
        log.info(format_epoch_line(round(epoch), self.total, metrics.get("eval_loss"),
                                   metrics.get("eval_perplexity"), best))

    def on_epoch_end(self, args, state, control, **kw):
        # Runs after EvalSaveFlowCallback: no evaluation at this epoch end (save_strategy: steps with
        # eval_steps off the epoch boundary) still gets its line, from the latest evaluation.
        epoch = state.epoch or 0.0
        if self.dry_run or control.should_evaluate or abs(epoch - round(epoch)) > 1e-6 \
                or round(epoch) in self.printed:
            return
        last = next((e for e in reversed(self.history.evals) if e[0] > 0), None)
        self.printed.add(round(epoch))
        log.info(format_epoch_line(round(epoch), self.total, last[2].get("val_loss") if last else None,
                                   last[2].get("val_perplexity") if last else None, False)
                 + (f" (no evaluation at this epoch end; last at step {last[0]})" if last
                    else " (no evaluation yet)"))


class EarlyStoppingCallback(Callback):
    """Stop after `patience` evaluations without improvement of early_stopping_metric. Not an anomaly:
    the run completes normally. Works whether or not load_best_at_end is on."""

    def __init__(self, history: RunHistory, metric: str, patience: int):
        self.history = history
        self.key, self.patience = metric.replace("val_", "eval_"), patience
        self.greater = EVAL_METRICS[metric]
        self.best, self.bad_evals = None, 0

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if state.global_step == 0 or not metrics or self.key not in metrics:
            return  # the eval_on_start baseline is not an epoch of training
        value = metrics[self.key]
        if self.best is None or (value > self.best if self.greater else value < self.best):
            self.best, self.bad_evals = value, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            control.should_training_stop = True
            self.history.early_stopped = {"epoch": round(state.epoch, 4), "step": state.global_step,
                                          "metric": self.key.replace("eval_", "val_"), "best": self.best,
                                          "evals_without_improvement": self.bad_evals}
            log.info("early stopping: %s has not improved for %d evaluations (best %.4f)",
                     self.key, self.bad_evals, self.best)


class NonFiniteAndExplodingGradGuard(Callback):
    """NaN/inf loss or grad norm, or grad norm > grad_norm_limit: skip the update and stop.
    Runs in on_pre_optimizer_step, while gradients exist and before the weights change; a guard in
    on_log would fire after the poisoned update. The grad norm is all-reduced under DDP, so every rank
    takes the same decision."""

    def __init__(self, history: RunHistory, probe: StepProbe, grad_norm_limit: float, fp16: bool, dry_run: bool):
        self.history, self.probe, self.grad_norm_limit, self.fp16, self.dry_run = \
            history, probe, grad_norm_limit, fp16, dry_run
        self.fp16_overflows = 0  # consecutive steps the fp16 loss scaler skipped

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        norm = self.probe.grad_norm
        loss = float(self.probe.loss_sum) if self.probe.loss_sum is not None else None
        reason, kind = None, None
        # the step under way, and its epoch (state.epoch still holds the previous step's until it ends)
        at = {"step": state.global_step + 1,
              "epoch": epoch_at_step(state.global_step + 1, state, args, kw.get("train_dataloader"))}
        if loss is not None and not math.isfinite(loss):
            reason = "loss is NaN/inf"
        elif norm is not None and not math.isfinite(norm) and self.fp16:
            # fp16 gradient overflow with a finite loss: routine while the loss scaler finds its scale; the
            # scaler skips this update itself. Only a long run of them means the training is broken.
            self.fp16_overflows += 1
            if self.fp16_overflows >= FP16_MAX_OVERFLOWS:
                reason = f"{self.fp16_overflows} consecutive fp16 gradient overflows (loss scaler cannot recover)"
                kind = "fp16_overflow"  # the scaler's range, not an exploding gradient: the fix differs
            elif self.fp16_overflows == 1:
                self.history.record_anomaly(
                    "fp16_overflow", state, stop=False, **at,
                    reason="fp16 gradient overflow: the loss scaler skips the step and lowers its scale")
        elif norm is not None and not math.isfinite(norm):
            reason = "gradient norm is NaN/inf"
        elif norm is not None and norm > self.grad_norm_limit:
            reason = f"gradient norm {norm:.4g} exceeds grad_norm_limit {self.grad_norm_limit:g}"
        if _any_rank(reason is not None, model) and reason is None:
            reason = "another rank saw a NaN/inf loss or gradient"  # every rank stops at the same step
        if reason:
            for p in model.parameters():  # optimizers skip parameters without a gradient
                p.grad = None
            control.should_training_stop = True
            kind = kind or ("nonfinite" if "NaN" in reason else "grad_explosion")
            self.history.record_anomaly(kind, state, stop=True,
                                        **at, reason=reason, train_loss=_json_float(loss),
                                        grad_norm=_json_float(norm), update_skipped=True)
        if norm is not None and math.isfinite(norm):
            self.fp16_overflows = 0
        self.probe.loss_sum, self.probe.grad_norm = None, None
        return control

    def on_step_end(self, args, state, control, **kw):
        if self.history.stop is not None and self.history.stop["step"] == state.global_step and not self.dry_run:
            control.should_save = True  # a checkpoint of the last good weights to resume from
        return control


class DivergenceGuard(Callback):
    """Validation loss above the best so far by more than divergence_increase for divergence_evals
    consecutive evaluations: stop."""

    def __init__(self, history: RunHistory, divergence_increase: float, divergence_evals: int):
        self.history, self.increase, self.evals = history, divergence_increase, divergence_evals
        self.best, self.bad = None, 0

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return
        if not math.isfinite(loss):
            control.should_training_stop = True
            self.history.record_anomaly("nonfinite_val_loss", state, stop=True, val_loss=_json_float(loss),
                                        reason="validation loss is NaN/inf")
            return
        if self.best is None or loss < self.best:
            self.best, self.bad = loss, 0
            return
        if loss > self.best * (1 + self.increase):
            self.bad += 1
            if self.bad >= self.evals:
                control.should_training_stop = True
                self.history.record_anomaly("divergence", state, stop=True, val_loss=loss, best_val_loss=self.best,
                                            reason=f"validation loss {loss:.4f} has been more than "
                                                   f"{self.increase:.0%} above the best ({self.best:.4f}) for "
                                                   f"{self.bad} consecutive evaluations")
        else:
            self.bad = 0


class LossSpikeWarning(Callback):
    """Train loss far above its recent mean: a warning in the manifest, training goes on."""

    def __init__(self, history: RunHistory, spike_factor: float, spike_window: int):
        self.history, self.factor, self.window = history, spike_factor, spike_window
        self.recent: list = []

    def on_log(self, args, state, control, logs=None, **kw):
        loss = (logs or {}).get("loss")
        if loss is None or not math.isfinite(loss):
            return
        # the recent mean once 3 losses exist; before that the initial validation loss, so a blow-up in the
        # first steps (lr far too high) is flagged at once
        evals = self.history.evals
        initial = evals[0][2].get("val_loss") if evals and evals[0][0] == 0 else None
        if len(self.recent) >= 3:
            ref, what = sum(self.recent) / len(self.recent), "its recent mean"
        elif isinstance(initial, float) and math.isfinite(initial):
            ref, what = initial, "the initial validation loss"
        else:
            ref = None
        if ref is not None and loss > self.factor * ref:
            self.history.record_anomaly("loss_spike", state, stop=False, train_loss=loss, recent_mean=ref,
                                        reason=f"train loss {loss:.4f} is over {self.factor:g}x {what} ({ref:.4f})")
        self.recent = (self.recent + [loss])[-self.window:]


class PreemptionCallback(Callback):
    """A SIGTERM/SIGUSR1 (install_preemption_handlers) stops at the end of the optimizer step under way, with a
    verified checkpoint of it. Under DDP the flag is all-reduced, so every rank saves and stops at the same
    step when any one of them got the signal."""

    def __init__(self, history: RunHistory, dry_run: bool, signal_flag: dict):
        self.history, self.dry_run = history, dry_run
        self.signal_flag = signal_flag  # {"signal": name} once one arrived (_preempt, set by the handler)

    def on_step_end(self, args, state, control, model=None, **kw):
        if self.dry_run or not _any_rank(bool(self.signal_flag), model):
            return control
        if self.history.preempted is None:
            self.history.preempted = {"signal": self.signal_flag.get("signal", "signal on another rank"),
                                      "step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
            log.warning("preempted (%s): saving a checkpoint at step %d and stopping",
                        self.history.preempted["signal"], state.global_step)
        control.should_save = True
        control.should_training_stop = True
        return control


def callbacks_for_run(config: TrainingConfig, tracker: Tracker, history: RunHistory, probe: StepProbe,
                      dry_run: bool, status_dir: Optional[Path] = None) -> list:
    """The run's callbacks in the order Trainer calls them at each event (EvalSaveFlowCallback before
    EpochSummaryCallback: the epoch line needs to know whether an epoch-end evaluation was requested), their
    counters continued from the interrupted run on resume."""
    g, ckpt, opt = config.training.guards, config.training.checkpointing, config.training.optimization
    callbacks = [
        TrainingTimeCallback(history),
        MetricsCallback(tracker, history, status_dir, dry_run),
        EvalProgressCallback(),
        EvalSaveFlowCallback(ckpt.save_strategy, dry_run),
        EpochSummaryCallback(history, config.training.hyperparameters.num_epochs, ckpt.metric_for_best_model,
                             dry_run),
        NonFiniteAndExplodingGradGuard(history, probe, g.grad_norm_limit, config.compute.mixed_precision == "fp16",
                                       dry_run),
        DivergenceGuard(history, g.divergence_increase, g.divergence_evals),
        LossSpikeWarning(history, g.spike_factor, g.spike_window),
        PreemptionCallback(history, dry_run, _preempt)]
    if opt.early_stopping_patience and not dry_run:
        callbacks.append(EarlyStoppingCallback(history, opt.early_stopping_metric, opt.early_stopping_patience))
    _replay_history(callbacks, history)
    return callbacks


def _replay_history(callbacks: list, history: RunHistory) -> None:
    """On resume, feed the evaluations and train losses the interrupted process saw (restored from its
    manifest) back through the callbacks that count them, so patience and divergence counters, and the
    spike window, continue exactly where they were."""
    if not (history.evals or history.train):
        return
    from transformers import TrainerControl, TrainerState
    for step, epoch, vals in history.evals:
        state, metrics = TrainerState(global_step=step, epoch=epoch), {k.replace("val_", "eval_"): v
                                                                       for k, v in vals.items()}
        for cb in callbacks:
            if isinstance(cb, (EarlyStoppingCallback, DivergenceGuard)):
                cb.on_evaluate(None, state, TrainerControl(), metrics=metrics)
    for cb in callbacks:
        if isinstance(cb, LossSpikeWarning):
            cb.recent = [x[2] for x in history.train if isinstance(x[2], float)][-cb.window:]


def _any_rank(flag: bool, model) -> bool:
    """True on every rank when it is True on one (a one-element all-reduce per optimizer step under DDP)."""
    import torch
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=next(model.parameters()).device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _gpu_utilization() -> Optional[float]:
    """GPU utilisation in % (needs CUDA and NVML); None where it cannot be measured."""
    try:
        import torch
        if torch.cuda.is_available():
            return float(torch.cuda.utilization())
    except Exception:  # NVML missing: not measurable here
        return None
    return None


# --------------------------------------------------------------------------------------------------
# 10. Trainer: token-level eval metrics, answer-only logits, samplers, TrainingArguments
# --------------------------------------------------------------------------------------------------

def preprocess_logits_for_metrics(logits, labels):
    """Reduce [B, T, V] logits to per-token argmax and NLL on the device, so full logits are never stored."""
    import torch
    import torch.nn.functional as F
    if isinstance(logits, tuple):
        logits = logits[0]
    shift_logits, shift_labels = logits[:, :-1, :].float(), labels[:, 1:]
    nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none")
    # [B, T-1, 2]: Trainer pads batches of different lengths along dim 1, so time must be dim 1
    return torch.stack([shift_logits.argmax(-1).float(), nll], dim=-1)


def _accepts_logits_to_keep(model) -> bool:
    """Whether the (unwrapped) model's forward slices its hidden states before lm_head with a boolean mask
    (transformers' slice_logits_to_keep; every built-in causal LM of transformers 5 takes `logits_to_keep`) and
    its loss function takes labels already shifted and selected (`shift_labels`, ForCausalLMLoss)."""
    import inspect

    from transformers import modeling_utils
    if not hasattr(modeling_utils, "slice_logits_to_keep"):
        return False
    inner = model
    while hasattr(inner, "module"):  # DDP and other wrappers
        inner = inner.module
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters \
            and "shift_labels" in inspect.signature(inner.loss_function).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def answer_only_inputs(inputs: dict) -> dict:
    """The model inputs with lm_head and the loss restricted to the positions whose next token is an answer
    token: `logits_to_keep` (a [B, T] mask) and the matching targets as `shift_labels`. The loss and every
    gradient equal those of the full logits (the other positions' labels are IGNORE_INDEX, they add nothing);
    lm_head, softmax and their backward skip the prompt tokens, and the [B, T, vocab] logits tensor, the
    largest activation of a large-vocabulary model, shrinks to [answer tokens, vocab]. Trainer's num_items_in_batch
    (answer tokens across the accumulated batch) still divides the sum, as before."""
    import torch
    target = inputs["labels"][:, 1:]
    answer = target != IGNORE_INDEX  # position t predicts token t+1
    keep = torch.cat([answer, torch.zeros_like(answer[:, :1])], dim=1)
    return {**inputs, "logits_to_keep": keep, "shift_labels": target[answer]}


def without_padding_mask(inputs: dict) -> dict:
    """A batch from PadToLongestCollator (each record first, its padding after it) without its attention_mask, for a
    model under sdpa attention. Attention is causal, so a record's tokens never see the padding after them: the mask
    changes only the padding positions' own outputs, which have no label (and under answer_only_inputs no logits).
    The loss and every gradient are the same (tested); without the mask transformers builds no [B, 1, T, T] mask and
    sdpa runs its causal kernel (is_causal) instead of the masked one (~5-10% faster steps on 2 CPU cores; on a GPU,
    sdpa's flash backend takes no mask). The collated batch keeps its mask (Trainer counts non-padding tokens from
    it). Not under flash-attention 2, which drops the padding itself (varlen) using the mask."""
    return {k: v for k, v in inputs.items() if k != "attention_mask"}


def answer_token_predictions(model, inputs: dict):
    """(mean NLL over the batch's answer tokens, [B, T-1, 2] per-token argmax and NLL) for compute_metrics, with
    logits computed only where a label is an answer token: lm_head and the softmax run on those positions alone
    (a third of a demo record's tokens are prompt, often more), and the loss is taken from the same NLL, so the
    model does not compute a second cross-entropy over every position. Values at prompt positions are 0
    (compute_metrics masks them). The result equals preprocess_logits_for_metrics on the full logits."""
    import torch
    import torch.nn.functional as F
    fwd = answer_only_inputs(inputs)
    fwd.pop("labels")
    targets = fwd.pop("shift_labels")
    logits = model(**fwd, use_cache=False).logits  # [N, V], row-major like target[answer]
    logits = logits.reshape(-1, logits.shape[-1]).float()
    nll = F.cross_entropy(logits, targets, reduction="none")
    answer = fwd["logits_to_keep"][:, :-1]
    preds = torch.zeros((*answer.shape, 2), dtype=torch.float32, device=logits.device)
    preds[answer] = torch.stack([logits.argmax(-1).float(), nll], dim=-1)
    return nll.mean(), preds


def compute_metrics(eval_pred) -> dict:
    """Token-level loss (mean NLL over answer tokens), perplexity = exp(loss), token accuracy."""
    import numpy as np
    preds, labels = eval_pred.predictions, eval_pred.label_ids
    target = labels[:, 1:1 + preds.shape[1]]
    mask = target != IGNORE_INDEX
    if not mask.any():
        return {"token_loss": float("nan"), "token_accuracy": float("nan"), "exact_match": float("nan")}
    argmax, nll = preds[:, : target.shape[1], 0], preds[:, : target.shape[1], 1]
    correct = (argmax == target) | ~mask
    rows = mask.any(axis=1)
    # A record is an exact match when every answer token is the argmax under teacher forcing, which is
    # exactly when greedy decoding reproduces the whole answer.
    return {"token_loss": float(np.mean(nll[mask])), "token_accuracy": float(np.mean((argmax == target)[mask])),
            "exact_match": float(np.mean(correct.all(axis=1)[rows]))}


class SeededLengthGroupedSampler:
    """Batches of similar lengths in a shuffled order, from a generator seeded by (seed, epoch): Trainer calls
    set_epoch before every epoch (a resumed one too, before skipping the batches already trained), so the order of
    each epoch is a function of the seed alone and a resume is bit-exact.

    The batches are transformers' length-grouped ones (records shuffled, then sorted by length within mega-batches
    of 50 batches and cut into batches), but transformers trains them in that order: longest to shortest
    within each mega-batch, a saw-tooth curriculum. Here the full batches are shuffled (the longest stays first,
    so an OOM shows at once; a last partial batch stays last, so no batch straddles two groups). On the demo
    data (1,600 records, 2 epochs) the test loss was 3.71 in transformers' order, 3.65 shuffled, 3.32 with
    Trainer's uniform shuffle: records of similar length are similar records, so a grouped batch is a
    narrower sample. Hence data.group_by_length is off by default."""

    def __init__(self, lengths: list[int], seed: int, batch_size: int):
        self.lengths, self.seed, self.batch_size, self.epoch = lengths, seed, batch_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        grouped = get_length_grouped_indices(self.lengths, self.batch_size, generator=generator)
        bs = self.batch_size
        batches = [grouped[i:i + bs] for i in range(0, len(grouped), bs)]
        tail = [batches.pop()] if len(batches) > 1 and len(batches[-1]) < bs else []
        rest = batches[1:]
        order = batches[:1] + [rest[k] for k in torch.randperm(len(rest), generator=generator).tolist()] + tail
        return iter([i for batch in order for i in batch])


class LengthOrderedSampling:
    """A Trainer mixin (FinanceTrainer's): seeded length-grouped training batches under data.group_by_length, and
    evaluation in length order."""

    def _get_train_sampler(self, train_dataset=None):
        """Under data.group_by_length: batches of similar lengths (SeededLengthGroupedSampler), so a batch padded
        to its longest record carries little padding (the demo data: ~20% padding in random batches, <1%
        grouped). Seeded by (seed, epoch) alone, never the global RNG, so a resumed run sees the same batches.
        Otherwise, and for packed rows (all ~max_seq_length), Trainer's own uniform shuffle."""
        ds = train_dataset if train_dataset is not None else self.train_dataset
        config = getattr(self, "run_config", None)
        if ds is None or not hasattr(ds, "column_names") or "position_ids" in ds.column_names \
                or (config is not None and not config.data.group_by_length):
            return super()._get_train_sampler(train_dataset)
        args = self.args
        seed = args.data_seed if args.data_seed is not None else args.seed
        return SeededLengthGroupedSampler([len(x) for x in ds["input_ids"]], seed,
                                          args.train_batch_size * args.gradient_accumulation_steps
                                          * max(1, args.world_size))

    def _get_eval_sampler(self, eval_dataset):
        """Evaluation in length order (longest first: an OOM shows at once), so batches carry almost no
        padding. The metrics are per token and per record, so the order does not change them."""
        if self.args.world_size > 1 or not hasattr(eval_dataset, "column_names") \
                or "input_ids" not in eval_dataset.column_names:
            return super()._get_eval_sampler(eval_dataset)
        key = getattr(eval_dataset, "_fingerprint", None) or id(eval_dataset)
        cache = self.__dict__.setdefault("_eval_orders", {})
        if key not in cache:
            lengths = [len(x) for x in eval_dataset["input_ids"]]
            cache[key] = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        return cache[key]


def _trainer_class():
    from transformers import Trainer
    # the test hooks' mixin only when one is set; read here, where a run first needs them (malformed: InvalidConfig)
    bases = (FaultInjection, LengthOrderedSampling, Trainer) if injected_faults().on_trainer \
        else (LengthOrderedSampling, Trainer)

    class FinanceTrainer(*bases):
        """Trainer with checkpoints named as the spec names them, written atomically and verified."""

        run_config: TrainingConfig
        run_id: str
        checkpoint_records: dict  # name -> meta
        dry_run = False  # True for the dry run's Trainer (_build_trainer)

        def evaluation_loop(self, *args, **kwargs):
            out = super().evaluation_loop(*args, **kwargs)
            prefix = kwargs.get("metric_key_prefix", args[-1] if len(args) >= 5 else "eval")
            m = out.metrics
            if f"{prefix}_token_loss" in m:  # token-level loss is the true per-token NLL: use it as the loss
                m[f"{prefix}_loss"] = m.pop(f"{prefix}_token_loss")
                m[f"{prefix}_perplexity"] = math.exp(min(m[f"{prefix}_loss"], 700.0))
            if prefix == "eval":
                m.update(self._answer_metrics())
                self.last_eval = (self.state.global_step, {k.replace("eval_", "val_"): v for k, v in m.items()})
            return out

        def _answer_metrics(self) -> dict:
            """evaluation.answer_eval.on_validation: the validation answers generated and scored like the test's
            (answer_evaluation), as eval_numeric_match and eval_answer_exact_match (NaN when no reference has a
            number: never best). Every rank generates (a sharded model needs them all; the others get the same
            greedy answers), so every rank's Trainer sees the metric it picks the best checkpoint by."""
            job = getattr(self, "val_answers", None)
            if not job or self.dry_run:
                return {}
            records, shape = job
            t0 = time.perf_counter()
            summary, _ = answer_evaluation(self.model, self.processing_class, records, shape,
                                           self.run_config.evaluation.max_new_tokens, self.run_config,
                                           desc="answer evaluation (validation)")
            if getattr(self, "history", None) is not None:
                self.history.val_answer_eval_seconds.append(time.perf_counter() - t0)
            return {f"eval_{name}": float("nan") if summary[key] is None else summary[key]
                    for name, key in (("numeric_match", "numeric_match"), ("answer_exact_match", "exact_match"))}

        def evaluate(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return super().evaluate(*args, **kwargs)
            finally:  # evaluations inside train() (the test evaluation after it is not training wall time)
                if self.is_in_train and getattr(self, "history", None) is not None:
                    self.history.eval_seconds += time.perf_counter() - t0

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            """Our metrics from logits at the answer positions only (answer_token_predictions); the full logits
            through preprocess_logits_for_metrics for a model whose forward takes no logits_to_keep."""
            if prediction_loss_only or self.compute_metrics is not compute_metrics or inputs.get("labels") is None:
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            import torch
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                if self._answer_logits_only(model):
                    loss, preds = answer_token_predictions(model, self._causal_inputs(inputs))
                else:
                    out = model(**inputs, use_cache=False)
                    loss, preds = out.loss, preprocess_logits_for_metrics(out.logits, inputs["labels"])
            return loss.detach(), preds, inputs["labels"]

        def _answer_logits_only(self, model) -> bool:
            if not hasattr(self, "_answer_logits"):
                self._answer_logits = _accepts_logits_to_keep(model)
            return self._answer_logits

        def _causal_inputs(self, inputs: dict) -> dict:
            """without_padding_mask where it holds: our collator's right-padded batches, a model under sdpa."""
            if not hasattr(self, "_mask_free"):
                self._mask_free = isinstance(self.data_collator, PadToLongestCollator) and \
                    getattr(getattr(self.model, "config", None), "_attn_implementation", None) == "sdpa"
            return without_padding_mask(inputs) if self._mask_free and "attention_mask" in inputs else inputs

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """Logits and loss at the answer positions only (answer_only_inputs), and no padding mask under sdpa
            (without_padding_mask), where the model supports it and Trainer computes the loss the default way (no
            label smoothing, no custom loss function)."""
            if not return_outputs and inputs.get("labels") is not None and self.label_smoother is None \
                    and self.compute_loss_func is None and self._answer_logits_only(model):
                inputs = answer_only_inputs(self._causal_inputs(inputs))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def _save_checkpoint(self, model, trial):
            t0 = time.perf_counter()
            try:
                save_checkpoint(self)
            finally:
                if getattr(self, "history", None) is not None:
                    self.history.save_seconds += time.perf_counter() - t0

        def _load_optimizer_and_scheduler(self, checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)
            if checkpoint is not None and getattr(self, "resume_plan", None) is not None:
                apply_resume_plan(self, checkpoint)
            if checkpoint is not None and getattr(self, "on_resumed", None) is not None:
                self.on_resumed()  # weights and optimizer state loaded: the resume becomes the run

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.probe.loss_sum = loss if self.probe.loss_sum is None else self.probe.loss_sum + loss
            return loss

        def _clip_grad_norm(self, model):
            norm = super()._clip_grad_norm(model)
            # a sync point Trainer pays anyway when it logs the norm; the global norm under FSDP (global_grad_norm)
            self.probe.grad_norm = global_grad_norm(norm)
            return norm

    return FinanceTrainer


def full_state_dict(trainer) -> Optional[dict]:
    """Under FSDP every rank holds a shard of each weight (DTensors): the full weights, gathered through
    accelerate (torch.distributed.checkpoint's get_model_state_dict under FSDP2), whatever the plugin's
    state_dict_type. A collective: every rank calls it; rank 0 receives the tensors on CPU (one full fp32 copy of the
    model in host RAM for the length of the save), the others an empty dict. None without FSDP: the model's own
    state_dict is already whole."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    return trainer.accelerator.get_state_dict(trainer.model)


def global_grad_norm(norm: Any) -> float:
    """The pre-clip gradient norm as a float. Under FSDP2 clip_grad_norm_ returns a DTensor: its full_tensor() is
    the norm over every rank's shard (a no-op when it is already replicated), never one rank's local piece."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if callable(full) else norm)


def choose_cpu_threads(config: TrainingConfig, previous: Optional[dict] = None) -> Optional[int]:
    """torch's CPU threads for a run on compute.device cpu. torch's default is one thread per core; where the cores
    are busy (a shared CI runner, other jobs) those threads wait on each other and a run takes several times longer
    (the demo on 2 loaded cores: README, Two commands). So a CPU run uses the cores free when it starts (cores
    minus the 1-minute load average, rounded down; at least 1, at most torch's default: all of them on an idle
    machine). OMP_NUM_THREADS (torchrun sets it) decides instead, as it does for torch. A resume takes the count its
    run started with, from the manifest: how a sum is split between threads can change its last bits."""
    if config.compute.device != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch
    recorded = (((previous or {}).get("reproducibility") or {}).get("hardware") or {}).get("cpu_threads")
    if isinstance(recorded, int) and recorded > 0:
        threads, why = recorded, "as this run started with"
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        threads = max(1, min(torch.get_num_threads(), cores - int(load)))  # a core partly busy still helps
        why = f"{cores} cores, load average {load:.1f}"
    torch.set_num_threads(threads)
    log.info("CPU threads: %d (%s; OMP_NUM_THREADS sets them instead)", threads, why)
    return threads


def seed_everything(seed: int) -> None:
    """Python, NumPy, torch and CUDA RNGs; data shuffling uses the same seed through TrainingArguments."""
    from transformers import set_seed
    set_seed(seed)


def optimizer_implementation(config: TrainingConfig) -> str:
    """The TrainingArguments optim that runs `training.optimization.optimizer`. `adamw` takes torch's fused AdamW
    (one kernel per step instead of a loop over tensors; the same update rule, deterministic, bit-exact on resume)
    where torch has fused kernels for the device (CUDA, and CPU since torch 2.4), else the for-each AdamW.
    Recorded in the manifest as hyperparameters.optimizer_implementation."""
    name = OPTIMIZERS[config.training.optimization.optimizer]
    if name != "adamw_torch":
        return name
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        fused = config.compute.device in _get_fused_kernels_supported_devices()
    except (ImportError, AttributeError):  # a torch without fused AdamW
        fused = False
    return "adamw_torch_fused" if fused else name


FSDP_OPTIONS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")  # compute.fsdp words FSDP2 accepts
FSDP_DEFAULTS = {  # the fsdp_config compute.fsdp gets; compute.fsdp_config's keys win over these
    "version": 2,  # FSDP2: fully_shard, DTensor parameters (FSDP1 is deprecated in transformers)
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # one FSDP unit per decoder layer (the model's _no_split_modules)
    # Trainer's resume state (model + optimizer) is written per rank through torch.distributed.checkpoint: no rank
    # gathers the optimizer. The full model.safetensors that from_pretrained and inference servers load is
    # consolidated separately at every save (full_state_dict), so the full weights are not written twice.
    "state_dict_type": "SHARDED_STATE_DICT",
    # every rank loads the base weights from disk (no meta-device init + broadcast): slower to start on a big node,
    # but it leaves tied embeddings and non-persistent buffers exactly as from_pretrained made them
    "cpu_ram_efficient_loading": False,
}


def fsdp_settings(config: TrainingConfig, model=None) -> tuple[str, Optional[dict]]:
    """(TrainingArguments.fsdp, TrainingArguments.fsdp_config) for compute.fsdp: FSDP2 with FSDP_DEFAULTS,
    `reshard_after_forward` from the sharding word (full_shard: true, ZeRO-3; shard_grad_op: false, ZeRO-2),
    cpu_offload from `offload`, and the layer class to wrap from the loaded model's `_no_split_modules`
    (SmolLM3DecoderLayer), merged with compute.fsdp_config (its keys win; a `fsdp_` prefix is dropped as
    transformers does). The compute.fsdp string itself is passed on: every transformers version reads it."""
    c = config.compute
    if not c.fsdp:
        return "", None
    words = c.fsdp.split()
    settings: dict = {**FSDP_DEFAULTS, "reshard_after_forward": "shard_grad_op" not in words}
    if "offload" in words:
        settings["cpu_offload"] = True
    if config.model.gradient_checkpointing:  # FSDP's own: Trainer's would add an all-gather per layer in backward
        settings["activation_checkpointing"] = True
    try:  # a peft model answers with its base model's attribute
        wrap = list(getattr(model, "_no_split_modules", None) or []) if model is not None else []
    except Exception:
        wrap = []
    if wrap:
        settings["transformer_layer_cls_to_wrap"] = wrap
    for key, value in (c.fsdp_config or {}).items():
        settings[key[5:] if key.startswith("fsdp_") else key] = value
    return c.fsdp, settings


def build_training_args(config: TrainingConfig, run_dir: Path, dry_run: bool, max_steps: Optional[int],
                        resuming: bool, model=None):
    """TrainingArguments for a run (or a dry run: no evaluation, no saves). Under compute.fsdp (not in a dry run,
    which is one plain process) the FSDP2 setup of fsdp_settings; Trainer refuses FSDP outside a distributed
    launch, so a process not started by torchrun / accelerate launch (LOCAL_RANK unset) gets InvalidConfig here,
    naming the CLI that launches itself (main: launch_distributed, one process per GPU, even for one GPU)."""
    from transformers import TrainingArguments
    hp, opt, ck, lg, c = (config.training.hyperparameters, config.training.optimization,
                          config.training.checkpointing, config.logging, config.compute)
    metric = ck.metric_for_best_model
    fsdp, fsdp_config = fsdp_settings(config, model) if not dry_run else ("", None)
    if fsdp and TrainingArguments.__dataclass_fields__["fsdp"].metadata.get("const") is True:
        fsdp = True  # transformers that take `fsdp=True` deprecate the string; fsdp_config already says it all
    if fsdp and "LOCAL_RANK" not in os.environ:
        raise TrainerError("InvalidConfig", {
            "field": "compute.fsdp", "value": c.fsdp, "expected": "a distributed launch (LOCAL_RANK set)",
            "suggestion": "run the CLI (`python train_finance_ssc_model.py --config ...` starts torch.distributed.run "
                          "itself under compute.fsdp, even for one GPU) or torchrun / accelerate launch"})
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=hp.batch_size,
        per_device_eval_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        num_train_epochs=hp.num_epochs,
        max_steps=max_steps if max_steps else -1,
        learning_rate=hp.learning_rate,
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        warmup_steps=hp.warmup_steps,
        lr_scheduler_type=opt.lr_scheduler,
        optim=optimizer_implementation(config),
        fp16=c.mixed_precision == "fp16",
        bf16=c.mixed_precision == "bf16",
        # under FSDP fsdp_config's activation_checkpointing does it (Trainer refuses both at once)
        activation_checkpointing=config.model.gradient_checkpointing
        and not str((fsdp_config or {}).get("activation_checkpointing", False)).lower() == "true",
        logging_strategy="steps",
        logging_steps=1 if dry_run else lg.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # the filter reports a NaN loss as a stale finite value
        eval_strategy="no" if dry_run else "steps",
        eval_steps=lg.eval_steps,
        eval_on_start=not (dry_run or resuming),  # the "before" perplexity
        # Trainer decides the best checkpoint only under a save strategy; our EvalSaveFlowCallback adds a
        # save at every eval and every epoch end, so under `epoch` Trainer's own step saves coincide with evals.
        save_strategy="no" if dry_run else "steps",
        save_steps=lg.save_steps if ck.save_strategy == "steps" else lg.eval_steps,
        save_total_limit=None,  # retention is ours (apply_retention keeps best + latest + backup)
        metric_for_best_model=metric.replace("val_", ""),
        greater_is_better=EVAL_METRICS[metric],
        seed=config.training.seed,
        data_seed=config.training.seed,
        use_cpu=c.device == "cpu",
        ddp_backend=c.distributed_backend if world_size(config) > 1 else None,
        fsdp=fsdp,
        fsdp_config=fsdp_config,
        deepspeed=c.deepspeed,
        report_to="none",  # trackers are fed by MetricsCallback -> log_metrics
        disable_tqdm=True,  # Trainer's bar prints its raw log dicts on a terminal: our Progress bars instead
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
    )


def _build_trainer(ctx: RunContext, tokenizer, datasets_, model, args, dry_run: bool):
    FinanceTrainer = _trainer_class()
    probe = StepProbe()
    callbacks = callbacks_for_run(ctx.config, ctx.tracker, ctx.history, probe, dry_run=dry_run,
                                  status_dir=None if dry_run else ctx.run_dir)
    trainer = FinanceTrainer(
        model=model, args=args, train_dataset=datasets_["train"], eval_dataset=datasets_["valid"],
        processing_class=tokenizer,
        data_collator=collator_for(getattr(model.config, "_attn_implementation", None), tokenizer.pad_token_id),
        compute_metrics=compute_metrics, callbacks=callbacks)
    trainer.run_config, trainer.run_id, trainer.probe, trainer.dry_run = ctx.config, ctx.run_id, probe, dry_run
    trainer.history = ctx.history  # evaluation and save times (performance_block)
    ae = ctx.config.evaluation.answer_eval
    if ae.on_validation and ae.max_records and not dry_run:  # scored at every evaluation (_answer_metrics)
        trainer.val_answers = (_read_jsonl(data_path(ctx.config, "valid_path"), ae.max_records),
                               ctx.validation.data["valid"]["shape"])
    trainer.data_sha256 = {k: v["sha256"] for k, v in (ctx.reproducibility.get("data_files") or {}).items()}
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    for raw_printer in (PrinterCallback, ProgressCallback):  # both print raw log dicts; MetricsCallback formats them
        trainer.remove_callback(raw_printer)
    return trainer


# --------------------------------------------------------------------------------------------------
# 11. Test hooks: deterministic faults for the test suite (unset in normal use)
# --------------------------------------------------------------------------------------------------

# The FINANCE_TRAINER_INJECT_* hooks (documented in the README) make a fault happen at a moment the test knows: a
# NaN loss, an exploding gradient norm, given validation losses, a signal, a full disk. Unset in normal use. They
# are read from the environment when a run first needs them (injected_faults, when the Trainer class is
# assembled), so `--help` never parses them and a malformed value is InvalidConfig naming the variable. What they
# do happens here alone: FaultInjection (a Trainer mixin that FinanceTrainer gets only when a hook is set),
# InjectedGradScale (a callback ahead of the guards) and injected_enospc (asked by the atomic writers).

def _hook_int(text: str, minimum: int) -> int:
    value = int(text)
    if value < minimum:
        raise ValueError(text)
    return value


def _on_this_rank(rank_text: Optional[str], rank: int) -> bool:
    return rank_text is None or _hook_int(rank_text, 0) == rank


# Each parser takes the variable's text and this process's rank, and returns InjectedFaults fields (ValueError:
# malformed).

def _parse_nan_hook(text: str, rank: int) -> dict:
    step, *rest = text.removeprefix("dry:").split(":")
    if len(rest) > 1:
        raise ValueError(text)
    step_n = _hook_int(step, 1)
    return {"nan_at_step": step_n if _on_this_rank(rest[0] if rest else None, rank) else None,
            "nan_in_dry_run": text.startswith("dry:")}


def _parse_grad_scale_hook(text: str, rank: int) -> dict:
    step, factor = text.split(":")  # exactly two parts, else ValueError
    return {"grad_scale": (_hook_int(step, 1), float(factor))}


def _parse_val_losses_hook(text: str, rank: int) -> dict:
    losses = [float(x) for x in text.split(",") if x]
    if not losses:
        raise ValueError(text)
    return {"val_losses": losses}


SIGNAL_PLACES = ("analysis", "record")  # besides a step: as the analysis after training starts; amid the final record


def _parse_signal_hook(text: str, rank: int) -> dict:
    step, name, *rest = text.split(":")
    if len(rest) > 1 or name not in signal.Signals.__members__:
        raise ValueError(text)
    at = (step if step in SIGNAL_PLACES else _hook_int(step, 1), signal.Signals[name])
    if rest and rest[0] == "launcher":  # rank 0 signals the CLI that launched the ranks, and waits for the relay
        return {"signal_at_step": at if rank == 0 else None, "signal_launcher": True}
    return {"signal_at_step": at if _on_this_rank(rest[0] if rest else None, rank) else None}


def _parse_enospc_hook(text: str, rank: int) -> dict:
    subs, colon, mode = text.partition(":")
    names = [s for s in subs.split(",") if s]
    if not names or (colon and mode != "sticky"):
        raise ValueError(text)
    return {"enospc_paths": names, "enospc_sticky": bool(colon)}


def _exhaust_address_space() -> BaseException:
    """FINANCE_TRAINER_INJECT_OOM=STEP:exhaust: cap this process's address space (RLIMIT_AS, as `ulimit -v` does) at
    what it uses now, so that the next large allocation fails for real, and return that MemoryError. What the
    run then records, it records within the room RunRecorder set aside (the cap is never lifted)."""
    import resource
    used_kib = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (used_kib * 1024, resource.getrlimit(resource.RLIMIT_AS)[1]))
    failure = None
    for size in (2**20, 2**16, 2**12, 2**8):  # and the allocator's free lists, down to small objects
        try:
            while True:
                _EXHAUSTED.append(bytes(size))
        except MemoryError as exc:
            failure = exc
    return failure


_EXHAUSTED: list = []  # what _exhaust_address_space holds on to: nothing the failure unwinds gives it back


# What each kind of FINANCE_TRAINER_INJECT_OOM raises: the exception type and message the real allocator gives.
OOM_INJECTIONS = {
    "memory": lambda: MemoryError(),
    "cpu": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate "
                                "memory: you tried to allocate 268435456 bytes. Error code 12 (Cannot allocate "
                                "memory)"),
    "mmap": lambda: OSError("Memory mapping file failed: Cannot allocate memory"),  # pyarrow: no errno set
    "exhaust": lambda: _exhaust_address_space(),  # a real MemoryError, with the address space really used up
    "cuda": lambda: __import__("torch").OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
        "1.06 GiB is free."),
}
OOM_PLACES = ("data", "plot")  # besides a training step: loading the data splits, drawing the loss plot


def _parse_oom_hook(text: str, rank: int) -> dict:
    where, kind = text.split(":")  # exactly two parts, else ValueError
    if kind not in OOM_INJECTIONS:
        raise ValueError(text)
    if where not in OOM_PLACES:
        _hook_int(where, 1)
    return {"oom_at": (where, kind)}


def _parse_today_hook(text: str, rank: int) -> dict:
    return {"today": dt.date.fromisoformat(text).isoformat()}  # ValueError unless YYYY-MM-DD


FAULT_HOOKS = {  # variable -> (parser, what it takes, an example)
    "FINANCE_TRAINER_INJECT_NAN_AT_STEP": (
        _parse_nan_hook, "STEP, STEP:RANK, dry:STEP or dry:STEP:RANK: an optimizer step >= 1 (of the dry run with "
                         "dry:), on rank RANK only when given", "5"),
    "FINANCE_TRAINER_INJECT_GRAD_SCALE": (
        _parse_grad_scale_hook, "STEP:FACTOR: an optimizer step >= 1 and a number", "3:1000"),
    "FINANCE_TRAINER_INJECT_VAL_LOSSES": (
        _parse_val_losses_hook, "numbers separated by commas, one per evaluation", "6.0,3.0,2.0"),
    "FINANCE_TRAINER_INJECT_SIGNAL": (
        _parse_signal_hook, "STEP:SIGNAL, STEP:SIGNAL:RANK or STEP:SIGNAL:launcher: an optimizer step >= 1 (or "
                            "`analysis`: as the analysis after training starts, `record`: while the final record is "
                            "written) and a signal name (SIGKILL, SIGTERM, ...), sent on rank RANK only when given; "
                            "`launcher`: rank 0 sends it to the CLI that launched the ranks", "8:SIGTERM"),
    "FINANCE_TRAINER_INJECT_ENOSPC": (
        _parse_enospc_hook, "SUBSTR[,SUBSTR...] or SUBSTR[,SUBSTR...]:sticky", "checkpoint-6"),
    "FINANCE_TRAINER_INJECT_OOM": (
        _parse_oom_hook, f"WHERE:KIND: WHERE an optimizer step >= 1 or one of {list(OOM_PLACES)}, KIND one of "
                         f"{list(OOM_INJECTIONS)}", "3:cpu"),
    "FINANCE_TRAINER_TEST_TODAY": (
        _parse_today_hook, "a date YYYY-MM-DD: the day a run starting now takes as today (today_date)", "2025-11-17"),
}


@dataclass
class InjectedFaults:
    """The test hooks of this process (FAULT_HOOKS), parsed once by injected_faults. A hook meant for another
    rank (the `:RANK` forms) is None here."""
    nan_at_step: Optional[int] = None  # poison this optimizer step's gradients and loss with NaN
    nan_in_dry_run: bool = False  # `dry:STEP`: the step of the dry run, not of the training run
    grad_scale: Optional[tuple[int, float]] = None  # (step, factor): the guards see that step's norm times factor
    val_losses: list[float] = field(default_factory=list)  # what successive evaluations report, consumed in turn
    signal_at_step: Optional[tuple[Any, signal.Signals]] = None  # (step or SIGNAL_PLACES name, signal) sent to itself
    signal_launcher: bool = False  # ... sent to the launching CLI instead (FINANCE_TRAINER_LAUNCHER_PID)
    # FINANCE_TRAINER_INJECT_ENOSPC: injected_enospc parses it at each write (tests set it with monkeypatch)
    enospc_paths: list[str] = field(default_factory=list)
    enospc_sticky: bool = False
    oom_at: Optional[tuple[str, str]] = None  # (a step number or an OOM_PLACES name, an OOM_INJECTIONS kind)
    # FINANCE_TRAINER_TEST_TODAY: the local date a run starting now takes as today (injected_today reads it alone)
    today: Optional[str] = None

    @property
    def on_trainer(self) -> bool:
        """Whether a hook acts on the Trainer (FaultInjection); the disk-full hook acts on the writers."""
        return self.nan_at_step is not None or self.grad_scale is not None or bool(self.val_losses) \
            or (self.signal_at_step is not None and isinstance(self.signal_at_step[0], int)) \
            or (self.oom_at is not None and self.oom_at[0].isdigit())

    @classmethod
    def from_env(cls, env: typing.Mapping[str, str], rank: int) -> "InjectedFaults":
        """Every malformed hook at once, as InvalidConfig naming the variable."""
        fields, problems = {}, []
        for var, (parse, expected, example) in FAULT_HOOKS.items():
            text = env.get(var, "")
            try:
                fields.update(parse(text, rank) if text else {})
            except ValueError:
                problems.append(problem("InvalidConfig", field=var, value=text, expected=expected,
                                        suggestion=f"unset {var} (a test hook, for the test suite) or write it as "
                                                   f"e.g. {var}={example}"))
        if problems:
            raise TrainerError.collected(problems)
        return cls(**fields)


_INJECTED_FAULTS: Optional[InjectedFaults] = None


def injected_faults() -> InjectedFaults:
    """This process's InjectedFaults, parsed from the environment on the first call (a failed parse is not kept:
    the next call raises the same InvalidConfig). One object per process, so the validation losses are consumed
    across the dry run's Trainer and the run's."""
    global _INJECTED_FAULTS
    if _INJECTED_FAULTS is None:
        _INJECTED_FAULTS = InjectedFaults.from_env(os.environ, int(os.environ.get("RANK", "0") or 0))
    return _INJECTED_FAULTS


class FaultInjection:
    """The Trainer mixin of the test hooks: _trainer_class puts it between FinanceTrainer and Trainer when a hook
    is set, so each method acts right after Trainer's and before FinanceTrainer's bookkeeping reads the result (the
    guards' probe sees the NaN loss; the injected validation loss becomes the eval_loss that Trainer logs and picks
    the best checkpoint by). The hooks act on the training run's steps, never on a dry run's: the dry run before
    training would otherwise take the NaN or the signal meant for step N of the run (the NaN hook's `dry:N` form
    is the one meant for the dry run)."""

    def __init__(self, *args, **kwargs):
        grad_scale = injected_faults().grad_scale
        if grad_scale is not None:  # ahead of the guards, which read the norm in the same event
            kwargs["callbacks"] = [injected_grad_scale(self, *grad_scale), *(kwargs.get("callbacks") or [])]
        super().__init__(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.dry_run:
            injected_oom(str(self.state.global_step + 1))
        loss = super().training_step(model, inputs, num_items_in_batch)
        faults, step = injected_faults(), self.state.global_step + 1
        if faults.signal_at_step is not None and step == faults.signal_at_step[0] and not self.dry_run \
                and not getattr(self, "_signal_sent", False):
            self._signal_sent = True  # once, even with gradient accumulation
            if faults.signal_launcher:
                _signal_launcher(faults.signal_at_step[1])
            else:
                os.kill(os.getpid(), faults.signal_at_step[1])
        if faults.nan_at_step == step and self.dry_run == faults.nan_in_dry_run:
            loss = _inject_nan(model, loss)
        return loss

    def evaluation_loop(self, *args, **kwargs):
        out = super().evaluation_loop(*args, **kwargs)
        losses = injected_faults().val_losses
        if losses and "eval_token_loss" in out.metrics:  # validation only: a test evaluation reports its own
            out.metrics["eval_token_loss"] = losses.pop(0)
        return out


def injected_grad_scale(trainer, step: int, factor: float):
    """The callback of FINANCE_TRAINER_INJECT_GRAD_SCALE: in on_pre_optimizer_step of `step`, before the guards,
    the probe's pre-clip norm times `factor`; the norm Trainer logs stays the real one. It holds the Trainer
    weakly (no cycle keeps a dropped dry-run Trainer alive) and reads its probe and dry_run when the step comes,
    as _build_trainer sets them after construction."""
    import weakref

    from transformers import TrainerCallback
    owner = weakref.ref(trainer)

    class InjectedGradScale(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            t = owner()
            if t is not None and state.global_step + 1 == step and not t.dry_run and t.probe.grad_norm is not None:
                t.probe.grad_norm *= factor

    return InjectedGradScale()


def _signal_launcher(sig: signal.Signals) -> None:
    """The `:launcher` form of FINANCE_TRAINER_INJECT_SIGNAL: signal the CLI that launched the ranks, and wait (up to
    a minute) until its relay reaches this process, so the step the run stops at is this one, not a later one."""
    os.kill(int(os.environ["FINANCE_TRAINER_LAUNCHER_PID"]), sig)
    waited_until = time.monotonic() + 60
    while not _preempt and time.monotonic() < waited_until:
        time.sleep(0.01)


def injected_signal(place: str) -> None:
    """FINANCE_TRAINER_INJECT_SIGNAL=PLACE:SIGNAL (a SIGNAL_PLACES name): this process sends itself the signal."""
    at = injected_faults().signal_at_step
    if at is not None and at[0] == place:
        # raised in this thread, so its handler runs before the next line (os.kill may deliver it to another
        # thread of the process, and the main thread would act on it a moment later: after the place it was for)
        signal.raise_signal(at[1])


def injected_oom(where: str) -> None:
    """FINANCE_TRAINER_INJECT_OOM=WHERE:KIND: raise, at `where`, the allocation failure of that kind."""
    at = injected_faults().oom_at
    if at is not None and at[0] == where:
        raise OOM_INJECTIONS[at[1]]()


def _inject_nan(model, loss):
    """Poison every gradient with NaN, as a real overflow would."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad.fill_(float("nan"))
    return loss * float("nan")


def injected_today() -> Optional[str]:
    """Test hook FINANCE_TRAINER_TEST_TODAY=YYYY-MM-DD: the date today_date answers, so a test starts a run "on one
    day" and resumes it "on the next". Read alone at each call (it is asked before validation, before the other
    hooks are parsed); malformed: InvalidConfig naming it."""
    text = os.environ.get("FINANCE_TRAINER_TEST_TODAY", "")
    return InjectedFaults.from_env({"FINANCE_TRAINER_TEST_TODAY": text}, rank=0).today if text else None


_ENOSPC_STUCK: list = []  # FINANCE_TRAINER_INJECT_ENOSPC=...:sticky: set once the first injected write failed


def injected_enospc(path: Any) -> Optional[OSError]:
    """Test hook FINANCE_TRAINER_INJECT_ENOSPC=SUBSTR[,SUBSTR...][:sticky]: this script's JSON writes and checkpoint
    saves to a path containing one of the substrings fail with ENOSPC, as on a full disk; with `:sticky` every
    later write fails too (the disk stays full). Read at each call, so tests can set it with monkeypatch. A
    malformed value injects nothing here (a write is no place to fail a run over it): injected_faults refuses it
    as InvalidConfig when the run assembles its Trainer."""
    hook = os.environ.get("FINANCE_TRAINER_INJECT_ENOSPC", "")
    if not hook:
        return None
    try:
        faults = InjectedFaults.from_env({"FINANCE_TRAINER_INJECT_ENOSPC": hook}, rank=0)
    except TrainerError:
        return None
    if _ENOSPC_STUCK or any(s in str(path) for s in faults.enospc_paths):
        if faults.enospc_sticky:
            _ENOSPC_STUCK.append(str(path))
        return OSError(28, os.strerror(28), str(path))
    return None


# --------------------------------------------------------------------------------------------------
# 12. Checkpoints and the run directory: atomic verified saves, retention, where a run lives, who owns it
# --------------------------------------------------------------------------------------------------

def make_run_id(config: TrainingConfig) -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y_%m_%d_%H%M%S")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.data.dataset_name)[:MAX_RUN_ID_LENGTH - 20] or "run"
    return f"{name}_{stamp}"


def run_paths(config: TrainingConfig, run_id: str) -> dict:
    lg = config.logging
    return {"run_dir": Path(lg.output_dir).expanduser().resolve() / run_id,
            "log_dir": Path(lg.logging_dir).expanduser().resolve() / run_id,
            "tensorboard_dir": (Path(lg.tensorboard.log_dir).expanduser().resolve() / run_id
                                if lg.tensorboard.enabled else None)}


CHECKPOINT_RE = re.compile(r"^checkpoint-(?:epoch-)?\d+$")


def checkpoint_name(config: TrainingConfig, global_step: int, epoch: float) -> str:
    """`checkpoint-epoch-N` for epoch-end saves under save_strategy: epoch (as the spec names them),
    `checkpoint-<step>` otherwise."""
    if config.training.checkpointing.save_strategy == "epoch" and epoch and abs(epoch - round(epoch)) < 1e-9:
        return f"checkpoint-epoch-{round(epoch)}"
    return f"checkpoint-{global_step}"


def verify_weights(ckpt_dir: Path, state_dict: Optional[dict]) -> dict:
    """Reload every saved tensor; check it is finite and equal to the in-memory weights it came from."""
    import torch
    from safetensors import safe_open
    files = sorted(ckpt_dir.glob("*.safetensors"))
    report = {"weights_files": [f.name for f in files], "tensors": 0, "nonfinite_tensors": [],
              "mismatched_tensors": [], "checksums": {}}
    if not files:
        report["health"] = "missing_weights"
        return report
    for f in files:
        report["checksums"][f.name] = _sha256_cached(f)
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                t = fh.get_tensor(key)
                report["tensors"] += 1
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    report["nonfinite_tensors"].append(key)
                ref = state_dict.get(key) if state_dict is not None else None
                if ref is not None and not torch.equal(ref.detach().to("cpu", t.dtype), t):
                    report["mismatched_tensors"].append(key)
    report["health"] = ("nonfinite" if report["nonfinite_tensors"] else
                        "mismatch" if report["mismatched_tensors"] else "ok")
    return report


RESUME_STATE_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json")  # besides the weights


def check_checkpoint_integrity(ckpt_dir: Path, meta: Optional[dict] = None, resume: bool = True) -> Optional[str]:
    """None when every file recorded in checkpoint_meta.json is present with the sha256 recorded at save time;
    else a short reason naming the first damaged file. Without it a file torn by a crash or a disk error after
    the save loads silently (Trainer even skips a missing optimizer.pt). `resume=False`: only what inference
    loads. A dir without checkpoint_meta.json is checked against its SHA256SUMS if it has one, else not at all; one
    whose checkpoint_meta.json is torn is damaged."""
    d = Path(ckpt_dir)
    if meta is None:
        meta = read_json_lenient(d / CHECKPOINT_META)
        if not meta and (d / CHECKPOINT_META).is_file():  # torn: the checksums it held are lost with it
            return f"{CHECKPOINT_META}: not a JSON object (truncated or overwritten)"
    sums = dict(meta.get("checksums") or {})
    if not meta and (d / "SHA256SUMS").is_file():
        sums = {name: sha for sha, _, name in (line.partition("  ") for line in
                                               (d / "SHA256SUMS").read_text().splitlines()) if name}
    needed = set(sums) | set(meta.get("weights_files") or [])
    if meta.get("weights_files") and "trainer_state.json" not in sums:  # saved before every file was hashed
        compute = (meta.get("config") or {}).get("compute") or {}  # FSDP/DeepSpeed keep the optimizer elsewhere
        needed |= {"trainer_state.json"} if compute.get("fsdp") or compute.get("deepspeed") else set(RESUME_STATE_FILES)
    if not resume:
        import fnmatch
        needed = {n for n in needed if any(fnmatch.fnmatch(n, pat) for pat in INFERENCE_FILES)}
    for name in sorted(needed, key=lambda n: (not n.endswith(".safetensors"), n)):  # weights first
        f = d / name
        if not f.is_file():
            return f"{name}: file missing"
        now = _sha256_cached(f) if name in sums else None
        if now is not None and now != sums[name]:
            return (f"{name}: sha256 mismatch (recorded {sums[name][:12]}..., now {now[:12]}..., "
                    f"{f.stat().st_size} bytes)")
    return None


def save_checkpoint(trainer) -> Path:
    """_save_checkpoint_atomic, leaving nothing partial behind when it fails: the `.tmp-<name>` dir is removed (on a
    full disk that also gives the space back for the failed manifest and error.json), and a full disk becomes
    DiskFull naming the file that failed, the errno and the free space, so no later write can mask it."""
    try:
        return _save_checkpoint_atomic(trainer)
    except Exception as exc:
        st = trainer.state
        tmp = Path(trainer.args.output_dir) / f"{TMP_PREFIX}{checkpoint_name(trainer.run_config, st.global_step, st.epoch)}"
        free = _free_bytes(tmp)
        if trainer.args.should_save and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        # torch.save reports a short write without an errno ("[enforce fail at inline_container.cc] unexpected
        # pos ..."): a write that failed with (almost) nothing left on the filesystem is a full disk too
        nearly_full = free is not None and free < SAVE_FULL_BELOW_BYTES and isinstance(exc, (OSError, RuntimeError))
        if not isinstance(exc, TrainerError) and (is_disk_full(exc) or nearly_full):
            raise disk_full_error(exc, tmp, free, getattr(trainer, "run_id", None), trainer.run_config) from exc
        raise


def _save_checkpoint_atomic(trainer) -> Path:
    """Trainer._save_checkpoint, made atomic: write into `.tmp-<name>`, verify, write checkpoint_meta.json
    last, then rename. An interrupted save never looks like a checkpoint to list_checkpoints or resume."""
    from transformers.trainer_callback import ExportableState
    args, st, config = trainer.args, trainer.state, trainer.run_config
    run_dir = Path(args.output_dir)
    name = checkpoint_name(config, st.global_step, st.epoch)
    tmp, final = run_dir / f"{TMP_PREFIX}{name}", run_dir / name
    if args.should_save and tmp.exists():
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    trainer.store_flos()
    full = full_state_dict(trainer)  # under FSDP: gathered once, saved and verified from the same tensors
    if full is None:
        trainer.save_model(str(tmp), _internal_call=True)
    elif args.should_save:  # one consolidated model.safetensors (+ config, tokenizer) that from_pretrained loads
        trainer._save(str(tmp), state_dict=full)
    injected = injected_enospc(tmp / "model.safetensors") if args.should_save else None
    if injected is not None:  # test hook: the weights file did not fit
        raise injected
    if not args.save_only_model:
        trainer._save_optimizer_and_scheduler(str(tmp))
        trainer._save_scaler(str(tmp))
        trainer._save_rng_state(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if args.should_save:
        for cb in trainer.callback_handler.callbacks + [trainer.control]:
            if isinstance(cb, ExportableState):
                st.stateful_callbacks[cb.__class__.__name__] = cb.state()
        st.save_to_json(str(tmp / "trainer_state.json"))
        model = trainer.accelerator.unwrap_model(trainer.model)
        if is_peft_model(model):  # the adapter file holds these keys (no adapter name, trainable only)
            from peft import get_peft_model_state_dict
            check = verify_weights(tmp, get_peft_model_state_dict(model, state_dict=full))
        else:
            check = verify_weights(tmp, full if full is not None else model.state_dict())
        # optimizer, scheduler, RNG, trainer state, config, and FSDP's per-rank shard dirs: one read each
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = f.relative_to(tmp).as_posix()
            if rel not in check["checksums"]:
                check["checksums"][rel] = _sha256_cached(f)
        eval_step, eval_metrics = getattr(trainer, "last_eval", (None, None))
        meta = {"name": name, "run_id": trainer.run_id, "step": st.global_step, "epoch": round(st.epoch or 0, 4),
                "metrics": eval_metrics if eval_step == st.global_step else None,
                "dataset": {"name": config.data.dataset_name, "version": config.data.dataset_version},
                "base_model": config.model.base_checkpoint, "base_config_sha256": base_config_sha256(config),
                "base_identity": base_identity(config),
                "data_sha256": getattr(trainer, "data_sha256", None), "world_size": world_size(config),
                "chat_template": chat_template_record(config),
                "adapter": is_peft_model(model), "config": config.to_dict(),
                "schedule": getattr(trainer, "schedule", None) or schedule_spec(config, st.max_steps),
                "created_at": utc_now(), **check}
        write_json_atomic(tmp / CHECKPOINT_META, meta)
        if final.exists():  # resumed from an older checkpoint: keep the superseded one, out of the listing
            aside = run_dir / f"{name}.superseded-{int(time.time())}"
            os.rename(final, aside)
            log.warning("%s already existed (resumed from an earlier step); kept it as %s", name, aside.name)
        os.rename(tmp, final)
        _fsync_dir(run_dir)
        healthy = check["health"] == "ok"
        log.info("saved %s (step %d, weights %s)", name, st.global_step, check["health"])
        if not healthy:
            log.error("checkpoint %s failed verification (%s); it will never be used as best or latest",
                      name, check["health"])
        if healthy and st.best_global_step == st.global_step and eval_step == st.global_step:
            trainer.best_checkpoint = str(final)
        ckpt = config.training.checkpointing
        apply_retention(run_dir, ckpt.save_total_limit, getattr(trainer, "best_checkpoint", None),
                        ckpt.save_strategy, config.logging.save_steps)
        if getattr(trainer, "after_save", None):
            trainer.after_save()
    trainer.accelerator.wait_for_everyone()
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():  # rank 0 verified the save: every rank adopts its verdict
        shared = [getattr(trainer, "best_checkpoint", None)]
        dist.broadcast_object_list(shared, src=0)
        trainer.best_checkpoint = shared[0]
    st.best_model_checkpoint = getattr(trainer, "best_checkpoint", None)
    return final


def base_config_sha256(config: TrainingConfig) -> Optional[str]:
    """sha256 of the base checkpoint's config.json: an adapter checkpoint names the exact base it needs."""
    d = base_model_dir(config)
    return _sha256_cached(d / "config.json") if d is not None and (d / "config.json").is_file() else None


def base_model_dir(config: TrainingConfig) -> Optional[Path]:
    """The base checkpoint's local directory: the resolved path, or the Hub cache snapshot that holds its
    config.json (None when it is not cached)."""
    ref = config.resolved_paths.get("model.base_checkpoint")
    if ref:
        return Path(ref["path"])
    cached = _hub_cached_file(config.model.base_checkpoint, "config.json")
    return Path(cached).parent if cached else None


def chat_template_in_dir(model_dir: Path) -> Optional[str]:
    """The chat template the base's tokenizer loads: chat_template.jinja, else tokenizer_config.json's (a list of
    named templates as canonical JSON)."""
    jinja = Path(model_dir) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = read_json_lenient(Path(model_dir) / "tokenizer_config.json").get("chat_template")
    return template if template is None or isinstance(template, str) else json.dumps(template, sort_keys=True)


WEIGHT_SAMPLE_BYTES = 4096  # read from the start and from the end of every tensor's data by weights_fingerprint
WEIGHTS_FINGERPRINT_METHOD = ("sha256 of each weight file's name and size, its safetensors header, and the first "
                              f"and last {WEIGHT_SAMPLE_BYTES} bytes of every tensor's data")


def weights_fingerprint(model_dir: Path) -> Optional[str]:
    """A sha256 that changes with the base's weights, read in milliseconds even for SmolLM3-3B's 6 GB: per weight
    file its name and size; for safetensors also the header (every tensor's name, dtype, shape and offsets) and the
    first and last WEIGHT_SAMPLE_BYTES of every tensor's data (a few MB for a 3B model); for other formats the
    first and last MiB. Why not the alternatives: a full sha256 reads every byte (~10 s per 6 GB on every start and
    resume); the sharded index and the headers alone name tensors, shapes and offsets but miss a tensor whose
    values changed in place (a base with one tensor scaled, another fine-tune saved the same way). Sampling both
    ends of every tensor sees any change that touches a whole tensor (scaling, re-initialising, another fine-tune,
    a cast); it misses only an edit confined to the middle of one tensor. None without weight files."""
    files = sorted(p for p in Path(model_dir).iterdir() if p.is_file() and p.name.endswith(WEIGHT_FILE_SUFFIXES))
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little") if f.suffix == ".safetensors" else -1
            if 0 <= n <= size - 8:
                header = fh.read(n)
                h.update(header)
                try:
                    entries = json.loads(header)
                except ValueError:
                    entries = {}
                spans = sorted(tuple(v["data_offsets"]) for k, v in entries.items()
                               if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets") or ()) == 2)
                for begin, end in spans:
                    for at in dict.fromkeys((begin, max(begin, end - WEIGHT_SAMPLE_BYTES))):
                        fh.seek(8 + n + at)
                        h.update(fh.read(min(WEIGHT_SAMPLE_BYTES, end - at)))
            else:
                fh.seek(0)
                h.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read(1 << 20))
    return h.hexdigest() if files else None


_BASE_IDENTITIES: dict[tuple, dict] = {}  # (dir, its files' names, sizes and mtimes) -> base_identity


def base_identity(config: TrainingConfig) -> dict:
    """What the base model is beyond its name: sha256 of its config.json and of its chat template, and its weights
    fingerprint (weights_fingerprint). Recorded in the manifest and in every checkpoint_meta.json; a resume compares
    them (base_identity_problem). Remembered per version of the directory's files: every save records it."""
    d = base_model_dir(config)
    if d is None or not d.is_dir():
        return {"config_sha256": None, "chat_template_sha256": None, "weights_fingerprint": None,
                "weights_fingerprint_method": WEIGHTS_FINGERPRINT_METHOD}
    key = (str(d.resolve()), tuple(sorted((p.name, st.st_size, st.st_mtime_ns) for p in d.iterdir()
                                          if p.is_file() for st in [p.stat()])))
    if key not in _BASE_IDENTITIES:
        _BASE_IDENTITIES[key] = {
            "config_sha256": base_config_sha256(config),
            "chat_template_sha256": chat_template_sha256(chat_template_in_dir(d)),
            "weights_fingerprint": weights_fingerprint(d), "weights_fingerprint_method": WEIGHTS_FINGERPRINT_METHOD}
    return dict(_BASE_IDENTITIES[key])


def read_checkpoints(run_dir: Path, verify: bool = False) -> list[dict]:
    """Complete checkpoints of a run (those with checkpoint_meta.json), oldest first. `verify`: health is the
    measured one: a checkpoint damaged since its save (check_checkpoint_integrity) becomes `corrupt`, with the
    reason in `integrity`, so whoever picks the latest, best or backup from this list passes it over."""
    out = []
    for d in Path(run_dir).iterdir() if Path(run_dir).is_dir() else []:
        meta_path = d / CHECKPOINT_META
        if d.is_dir() and CHECKPOINT_RE.match(d.name) and meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            meta["path"] = str(d)
            if isinstance(meta.get("metrics"), dict):  # a NaN/inf metric is stored as a string (strict JSON)
                meta["metrics"] = {k: _float_from_json(v) for k, v in meta["metrics"].items()}
            if verify and meta.get("health") == "ok":
                try:
                    reason = check_checkpoint_integrity(d, meta)
                except FileNotFoundError as exc:  # a file went between the listing and its read
                    reason = f"{Path(exc.filename or '?').name}: file missing"
                if reason and not d.is_dir():  # renamed away while it was read (retention deleting it): gone,
                    continue                    # not damaged
                if reason:
                    meta.update(health="corrupt", integrity=reason)
            out.append(meta)
    return sorted(out, key=lambda m: (m["step"], m["name"]))


def run_index_path() -> Path:
    """$XDG_CACHE_HOME/finance_smollm3/runs.json (default ~/.cache/...): run_id -> run dir of every training run
    this machine started, so a bare run id is found from any working directory."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"  # the XDG spec ignores relative values
    return base / "finance_smollm3" / "runs.json"


def _run_index() -> dict:
    return read_json_lenient(run_index_path())


RUN_INDEX_LOCK_SECONDS = 30  # how long register_run waits for another process's update of the index


@contextlib.contextmanager
def flocked(path: Path, timeout_seconds: float):
    """An exclusive flock on `path` (created if missing; the same OS lock as lock_run_dir, dropped by the OS
    when the holder dies), waited for up to `timeout_seconds`; TimeoutError after that."""
    import fcntl
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} is held by another process") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # releases the lock


def register_run(run_id: str, run_dir: Path) -> None:
    """Record the run in the run index: read, updated and written (atomically) under a lock on `runs.json.lock`,
    so runs starting at the same moment all keep their entry (a plain read-modify-write kept 2 of 12). Never fails
    the run: preflight checked the index's folder is writable, and without the index a run is still found by its
    directory or output_dir."""
    index = run_index_path()
    try:
        with flocked(index.with_name(index.name + ".lock"), RUN_INDEX_LOCK_SECONDS):
            write_json_atomic(index, {**_run_index(), run_id: str(Path(run_dir).resolve())})
    except Exception as exc:  # noqa: BLE001 - a read-only or full home must not stop training
        log.warning("run index %s not updated (%s): find this run by its directory", index, exc)


def _config_output_dir(config_file: str = "training_config.yaml") -> Optional[str]:
    """logging.output_dir of the working directory's training_config.yaml, if it exists and parses."""
    try:
        raw = _parse_yaml(Path(config_file).read_text(encoding="utf-8"), config_file)
        value = raw["logging"]["output_dir"]
    except (OSError, UnicodeDecodeError, TrainerError, TypeError, KeyError):
        return None
    return value if isinstance(value, str) and value else None


def find_run_dir(run: str, output_dir: Optional[str] = None) -> Path:
    """A run named by its directory, or by run_id: under `output_dir` when given, else under the working
    directory and then the logging.output_dir of ./training_config.yaml; last, in the index of runs this machine
    started (run_index_path). The error lists every place it looked."""
    p = Path(run).expanduser()
    if p.is_dir():
        return p.resolve()
    looked: list[str] = []
    for base in [output_dir] if output_dir else [".", _config_output_dir()]:
        candidate = Path(base).expanduser().resolve() / run if base else None
        if candidate is None or str(candidate) in looked:
            continue
        if candidate.is_dir():
            return candidate
        looked.append(str(candidate))
    indexed = _run_index().get(run) if RUN_ID_RE.match(run) else None
    if isinstance(indexed, str) and Path(indexed).is_dir():
        return Path(indexed)
    looked.append(f"{run_index_path()} ({'its entry ' + repr(indexed) + ' no longer exists' if indexed else 'no entry'})")
    raise TrainerError("CheckpointNotFound", {
        "field": "run", "value": run, "path": looked[0], "looked_in": looked,
        "suggestion": "name the run by its directory (<output_dir>/<run_id>), pass the output_dir it lives in "
                      "(--output-dir or --config), or run from the folder whose training_config.yaml trained it"})


def scheduled_save(checkpoint: dict, save_strategy: str, save_steps: int) -> bool:
    """Whether a checkpoint is one the user scheduled with save_strategy (an epoch end under `epoch`, a multiple of
    save_steps under `steps`) rather than one saved for an evaluation or at the end."""
    if save_strategy == "epoch":
        return checkpoint["name"].startswith("checkpoint-epoch-")
    return save_strategy == "steps" and save_steps > 0 and checkpoint.get("step", 0) % save_steps == 0


def apply_retention(run_dir: Path, limit: int, best: Optional[str], save_strategy: str = "steps",
                    save_steps: int = 1) -> list[str]:
    """Keep the newest `limit` of the scheduled saves (scheduled_save), and always the best, the latest healthy
    and one backup. A checkpoint saved only for an evaluation is kept while it is one of those three: under
    save_strategy: epoch with an evaluation every 100 steps, the evaluations' checkpoints would otherwise push the
    epoch checkpoints out within 300 steps (the spec's Session 2 resumes from checkpoint-epoch-2 after an
    interruption, and its Output lists checkpoint-epoch-1 to -3 under save_total_limit: 3)."""
    ckpts = read_checkpoints(run_dir, verify=True)  # a damaged checkpoint is never kept as latest or backup
    healthy = [c for c in ckpts if c.get("health") == "ok"]
    scheduled = [c for c in ckpts if scheduled_save(c, save_strategy, save_steps)]
    keep = {c["path"] for c in scheduled[-limit:]} | {c["path"] for c in healthy[-2:]}
    if best:
        keep.add(best)
    deleted = []
    for c in ckpts:
        if c["path"] not in keep:
            doomed = Path(c["path"])
            trash = doomed.with_name(f"{TMP_PREFIX}delete-{doomed.name}")
            os.rename(doomed, trash)  # gone from the listing at once, even if rmtree is interrupted
            shutil.rmtree(trash, ignore_errors=True)
            deleted.append(doomed.name)
    if deleted:
        log.info("retention (save_total_limit=%d): deleted %s", limit, ", ".join(deleted))
    return deleted


SUPERSEDED_DIR = "superseded"  # <run_dir>/superseded/<UTC time>-after-step-<S>/: one folder per resume that moved any


def supersede_checkpoints(run_dir: Path, after_step: int) -> Optional[dict]:
    """One timeline per run: a resume from step S abandons every later checkpoint of the run (the future it belonged
    to will not happen), so before the first new step each complete checkpoint with step > S, and `best/` when it
    was built from one, moves to superseded/<UTC time>-after-step-<S>/. Nothing is deleted; read_checkpoints looks
    at the run dir's top level only, so they are never listed, latest, best, a backup, last_valid_checkpoint or a
    resume point again (an explicit --resume-from of one still works). Returns what moved, for the resume's
    `resumes` entry, or None when nothing was later."""
    run_dir = Path(run_dir)
    later = [c for c in read_checkpoints(run_dir) if c["step"] > after_step]
    best = run_dir / "best"
    best_later = best.is_dir() and (read_json_lenient(best / CHECKPOINT_META).get("step") or 0) > after_step
    if not later and not best_later:
        return None
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = run_dir / SUPERSEDED_DIR / f"{stamp}-after-step-{after_step}"
    n = 1
    while folder.exists():  # two resumes within a second
        n += 1
        folder = folder.with_name(f"{stamp}-after-step-{after_step}.{n}")
    folder.mkdir(parents=True)
    for c in later:
        os.rename(c["path"], folder / Path(c["path"]).name)
    if best_later:
        os.rename(best, folder / "best")
    _fsync_dir(run_dir)
    names = [c["name"] for c in later] + (["best"] if best_later else [])
    log.warning("resuming from step %d: %s of the abandoned timeline moved to %s (kept, never used again)",
                after_step, ", ".join(names), folder.relative_to(run_dir))
    return {"folder": folder.relative_to(run_dir).as_posix(), "after_step": after_step,
            "checkpoints": [{"name": c["name"], "step": c["step"]} for c in later], "best_archive": best_later}


def clean_partial_saves(run_dir: Path, *more_dirs: Optional[Path]) -> list[str]:
    """Remove what an earlier process of the run left half-written when it was killed: `.tmp-*` directories
    (checkpoint saves, `best/` builds, retention deletes) and `.tmp-*` files (a JSON record, a CSV curve or the
    plot caught mid-write), in the run dir and `more_dirs` (its log dir). Called with the run's lock held, so no
    live writer owns any of them."""
    removed = []
    for folder in (run_dir, *more_dirs):
        for p in Path(folder).glob(f"{TMP_PREFIX}*") if folder is not None else []:
            try:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove %s: %s", p, exc)
                continue
            removed.append(p.name)
    if removed:
        log.warning("removed what an interrupted process left half-written: %s", ", ".join(removed))
    return removed


INFERENCE_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                   "tokenizer*", "special_tokens_map.json", "chat_template.jinja", "*.model", "vocab.json",
                   "merges.txt", CHECKPOINT_META, "adapter_config.json")


def write_status(run_dir: Path, status: dict) -> None:
    """status.json, rewritten atomically at every log step, read by monitor_training from another shell."""
    write_json_atomic(run_dir / "status.json", {**status, "pid": os.getpid(), "hostname": platform.node(),
                                                "updated_at": utc_now()})


_RUN_LOCKS: dict[str, int] = {}  # resolved run dir -> fd holding its flock


def lock_run_dir(run_dir: Path) -> None:
    """One writer per run dir: an exclusive flock on `<run_dir>/.lock`, held until unlock_run_dir or the end of
    the process. The OS drops it when the process dies, however it dies, so the file a killed run leaves behind
    never blocks. The holder writes its pid, host and start time into it for the second writer's RunLocked."""
    import fcntl
    key = str(Path(run_dir).resolve())
    if key in _RUN_LOCKS:
        return
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    path = Path(run_dir) / RUN_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = read_json_lenient(path)
        who = f"pid {holder.get('pid')} on {holder.get('hostname')}, since {holder.get('started_at')}"
        raise TrainerError("RunLocked", {
            "path": str(path), "pid": holder.get("pid"), "hostname": holder.get("hostname"),
            "started_at": holder.get("started_at"),
            "suggestion": f"another process ({who}) is writing this run; wait for it to end (follow it with "
                          f"--status {Path(run_dir).resolve()}), or stop it first"}) from None
    except OSError as exc:  # a filesystem without locks: train anyway, unguarded
        os.close(fd)
        log.warning("could not lock %s (%s): a second writer to this run would not be refused", path, exc)
        return
    os.ftruncate(fd, 0)
    os.write(fd, (json_text({"pid": os.getpid(), "hostname": platform.node(), "started_at": utc_now(),
                             "argv": sys.argv}) + "\n").encode())  # secrets in the command line redacted
    _RUN_LOCKS[key] = fd


def unlock_run_dir(run_dir: Path) -> None:
    """Release lock_run_dir's lock (the file stays: unlocked, it blocks nobody)."""
    import fcntl
    fd = _RUN_LOCKS.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def refuse_existing_run(manifest_path: Path, run_id: str, config: Optional[TrainingConfig] = None) -> None:
    """A run dir that already holds a manifest is never overwritten."""
    if manifest_path.exists():
        command = resume_command(run_id, config.config_path, config.overrides) if config else None
        raise TrainerError("RunExists", {
            "run_id": run_id, "path": str(manifest_path), "resume_command": command,
            "suggestion": f"choose another --run-id, continue it with "
                          f"{command or f'--resume-from latest --run-id {run_id}'}, or "
                          f"start this run id over with --force (the old run is moved aside to "
                          f"{run_id}.abandoned-<time>, nothing is deleted)"})


def check_run_id(run_id: Any, field_: str = "--run-id") -> None:
    """A run id names a directory under output_dir: letters, digits, `-`, `_`, `.`, not `.`/`..`, at most
    MAX_RUN_ID_LENGTH characters. Checked before anything under it is read or written (`../../etc` never is)."""
    if isinstance(run_id, str) and RUN_ID_RE.match(run_id) and run_id not in (".", "..") \
            and len(run_id) <= MAX_RUN_ID_LENGTH:
        return
    too_long = isinstance(run_id, str) and len(run_id) > MAX_RUN_ID_LENGTH
    raise TrainerError("InvalidConfig", {
        "field": field_, "value": _jsonable(run_id),
        "expected": f"letters, digits, '-', '_' and '.' only, at most {MAX_RUN_ID_LENGTH} characters",
        "suggestion": (f"shorten it to {MAX_RUN_ID_LENGTH} characters or fewer (it has {len(run_id)})" if too_long
                       else "choose an id like finance_ssc_2025_11_17_a (no `/`, not `.` or `..`)")})


def abandon_run(config: TrainingConfig, run_id: str) -> list[str]:
    """--force without --resume-from on a run id that already has a manifest: start it over, deleting nothing. The
    run dir, and its log and TensorBoard dirs, are renamed to `<run_id>.abandoned-<UTC time>` beside themselves;
    the caller holds the run dir's lock (so no live writer is moved), and takes it again on the new, empty dir."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    moved = []
    for path in dict.fromkeys(p for p in run_paths(config, run_id).values() if p is not None):
        if path.exists():
            aside = path.with_name(f"{run_id}.abandoned-{stamp}")
            os.rename(path, aside)
            moved.append(str(aside))
    run_dir = run_paths(config, run_id)["run_dir"]
    unlock_run_dir(run_dir)
    lock_run_dir(run_dir)
    log.warning("--force: run %s starts over; the earlier run was moved aside to %s", run_id, ", ".join(moved))
    return moved


def last_valid_checkpoint(ctx: RunContext, stop_val_loss: Optional[float]) -> tuple[Optional[str], str]:
    """The newest checkpoint whose weights are healthy, and why. A checkpoint is healthy when it verified at save
    time and its validation loss (recorded at its evaluation; for the checkpoint saved at the stop, measured on
    its weights now) is finite and at most spike_factor x the lowest validation loss of the run (initial
    included), or, for a divergence stop, within divergence_increase of it. Skipping only the last update is
    not enough: at a learning rate far too high, the updates before the stop may already have ruined the
    weights. None means no checkpoint qualifies: restart from the base model."""
    g, stop = ctx.config.training.guards, ctx.history.stop
    vals = [v["val_loss"] for _, _, v in ctx.history.evals
            if isinstance(v.get("val_loss"), float) and math.isfinite(v["val_loss"])]
    best = min(vals) if vals else None
    factor = 1 + g.divergence_increase if stop["kind"] == "divergence" else g.spike_factor
    rejected = []
    # at or before the stop: a later one could only be a leftover of another timeline (resume moves those aside)
    for c in reversed([c for c in read_checkpoints(ctx.run_dir, verify=True)
                       if c.get("health") == "ok" and c["step"] <= stop["step"]]):
        loss = stop_val_loss if c["step"] == ctx.global_step else (c.get("metrics") or {}).get("val_loss")
        if best is None and loss is not None and math.isfinite(loss):
            return c["path"], f"{c['name']}: validation loss {loss:.4g} (no earlier evaluation to compare with)"
        if loss is not None and math.isfinite(loss) and best is not None and loss <= factor * best:
            return c["path"], (f"{c['name']}: validation loss {loss:.4g} is within {factor:g}x the run's best "
                               f"({best:.4g})" + (f"; rejected {', '.join(rejected)}" if rejected else ""))
        rejected.append(f"{c['name']} (validation loss {_json_float(loss)})")
    return None, (f"no checkpoint has a validation loss within {factor:g}x the run's best ({_json_float(best)}); "
                  f"rejected {', '.join(rejected) or 'none saved'}: restart from the base model")


# --------------------------------------------------------------------------------------------------
# 13. Resume: which checkpoint, what changed, the schedule it continues
# --------------------------------------------------------------------------------------------------

RESTART_WARMUP_FRACTION = 0.1  # a schedule restarted at a resume warms up over at most this share of the steps left


def schedule_spec(config: TrainingConfig, num_training_steps: int, start_step: int = 0) -> dict:
    """The learning-rate schedule a checkpoint continues: Trainer's own from step 0, or one restarted at a resume
    that changed the schedule (start_step > 0, num_training_steps = the steps left, so the decay ends at the run's
    true last step). A restart's warmup is warmup_steps capped at RESTART_WARMUP_FRACTION of the steps left: a
    warmup sized for a whole run (the spec's 500) would otherwise outlast a late resume, which then never decays
    and ends near its peak. Recorded in checkpoint_meta.json so a later resume rebuilds the same one."""
    hp = config.training.hyperparameters
    warmup = min(hp.warmup_steps, num_training_steps)
    if start_step:
        warmup = min(hp.warmup_steps, int(RESTART_WARMUP_FRACTION * num_training_steps))
    return {"type": config.training.optimization.lr_scheduler, "peak_lr": hp.learning_rate,
            "warmup_steps": warmup, "num_training_steps": num_training_steps, "start_step": start_step}


def _build_scheduler(trainer, spec: dict):
    from transformers import get_scheduler
    for group in trainer.optimizer.param_groups:  # the scheduler's base lr is each group's initial_lr
        group["initial_lr"] = group["lr"] = spec["peak_lr"]
    return get_scheduler(spec["type"], optimizer=trainer.optimizer, num_warmup_steps=spec["warmup_steps"],
                         num_training_steps=spec["num_training_steps"],
                         scheduler_specific_kwargs=trainer.args.lr_scheduler_kwargs)


def apply_resume_plan(trainer, checkpoint: str) -> None:
    """Trainer restores optimizer.pt and scheduler.pt as saved, so on its own a resume with a new learning rate,
    warmup, scheduler or epoch count would keep the old schedule (and a new weight decay would be ignored).
    Optimizer moments are kept; then:
    - a changed schedule key restarts the schedule at the resume step: a fresh warmup to the new peak learning rate
      (warmup_steps, at most RESTART_WARMUP_FRACTION of the steps left: schedule_spec), then the configured decay
      ending at the run's last step;
    - a checkpoint that already runs a restarted schedule (an earlier resume changed it) gets that same schedule
      back, with its saved position;
    - a changed weight_decay is set on the decayed parameter group (Trainer's group 0)."""
    import torch
    plan, config, st = trainer.resume_plan, trainer.run_config, trainer.state
    changes = plan["changes"]
    if any(k in changes for k in SCHEDULE_KEYS):
        spec = schedule_spec(config, max(st.max_steps - st.global_step, 1), st.global_step)
        trainer.lr_scheduler = _build_scheduler(trainer, spec)
        log.info("resume: %s (%s)", format_schedule_restart(spec, config.training.hyperparameters.warmup_steps),
                 ", ".join(f"{k.rsplit('.', 1)[1]} {o!r} -> {n!r}" for k, (o, n) in changes.items()))
    elif plan.get("schedule") and plan["schedule"].get("start_step"):
        spec = plan["schedule"]
        saved_lrs = [g["lr"] for g in trainer.optimizer.param_groups]  # restored from optimizer.pt: the position
        trainer.lr_scheduler = _build_scheduler(trainer, spec)
        trainer.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / "scheduler.pt", weights_only=True))
        for group, lr in zip(trainer.optimizer.param_groups, saved_lrs):
            group["lr"] = lr
    else:
        spec = None
    if spec is not None:
        trainer.schedule = spec
    if OPTIMIZER_GROUP_KEYS[0] in changes:
        trainer.optimizer.param_groups[0]["weight_decay"] = config.training.hyperparameters.weight_decay
        log.info("resume: weight_decay %r -> %r on the decayed parameters", *changes[OPTIMIZER_GROUP_KEYS[0]])


def format_schedule_restart(spec: dict, configured_warmup: int) -> str:
    """The numbers a restarted schedule uses, as the resume's log line states them."""
    start, left, warmup = spec["start_step"], spec["num_training_steps"], spec["warmup_steps"]
    why = (f"warmup_steps {configured_warmup} capped at {RESTART_WARMUP_FRACTION:.0%} of the {left} steps left"
           if warmup < configured_warmup else "warmup_steps")
    then = ("then constant" if spec["type"] in ("constant", "constant_with_warmup") else
            f"then {spec['type']} decay over {left - warmup} steps, reaching its end at step {start + left}")
    return (f"learning-rate schedule restarted at step {start} of {start + left}: warmup over {warmup} steps "
            f"({why}) to lr {spec['peak_lr']:g}, {then}")


def previous_manifest(manifest_path: Path, force: bool, main_proc: bool = True) -> dict:
    """The manifest a resume continues (its history, anomalies, resumes, timings); {} when there is none (a
    checkpoint copied to a new output dir). A damaged one is refused unless --force: then it is renamed to
    `run_manifest.json.damaged-<time>` (kept, not overwritten) and the run continues without the earlier history."""
    try:
        return read_json_strict(manifest_path, (
            "the run's history (curves, evaluations, anomalies, earlier resumes) cannot be read from it: restore "
            "it from a backup, or add --force to resume without the earlier history (the damaged file is kept as "
            f"{MANIFEST_NAME}.damaged-<time>)")) or {}
    except TrainerError as exc:
        if not force:
            raise
        if main_proc and manifest_path.exists():
            aside = manifest_path.with_name(f"{MANIFEST_NAME}.damaged-{int(time.time())}")
            os.rename(manifest_path, aside)
            log.warning("%s is damaged (%s): --force resumes without the earlier history; the file is kept as %s",
                        manifest_path, exc.details["problem"], aside.name)
        return {}


def _history_from_manifest(previous: dict, up_to_step: int) -> RunHistory:
    """The curves up to the resume point, as the interrupted process recorded them in its manifest."""
    h = previous.get("history") or {}
    return RunHistory(train=[(x[0], x[1], _float_from_json(x[2])) for x in h.get("train", []) if x[0] <= up_to_step],
                      evals=[(x[0], x[1], {k: _float_from_json(v) for k, v in x[2].items()})
                             for x in h.get("evals", []) if x[0] <= up_to_step],
                      anomalies=[a for a in previous.get("anomalies") or [] if a.get("step", 0) <= up_to_step],
                      checkpoints_saved=((previous.get("cost") or {}).get("inputs") or {}).get("checkpoints_saved", 0))


# Changes that make a resumed run a different experiment (exit 2 unless --force); the training data's checksum,
# the base model's identity (base_identity) and the global batch are checked besides these keys. The model.lora
# keys count only when LoRA is on before or after (with it off they configure nothing).
RESUME_FATAL_KEYS = ("model.base_checkpoint", "data.max_seq_length", "model.lora.enabled", "model.lora.r",
                     "model.lora.alpha", "model.lora.target_modules", "model.lora.bias", "model.lora.quantization",
                     # how the data is rendered and cut: another tokenization of the same records
                     "data.chat_template_kwargs", "data.truncation_side", "data.train_on_prompt")
# Turning FSDP or DeepSpeed on or off across a resume: each saves the weights and optimizer state in its own layout
# (FSDP: SHARDED_STATE_DICT shards, DeepSpeed: its global_step dirs), which the other setting does not load (Trainer
# fails, or skips a missing optimizer.pt and starts a fresh optimizer without a word). Exit 2 unless --force; a change
# of options while it stays on is allowed.
SHARDING_KEYS = ("compute.fsdp", "compute.deepspeed")
# Of those, the keys that change which parameters exist or train: the checkpoint's weights (an adapter of another
# shape, or none) and its optimizer state cannot load into the new set of parameters (peft: `size mismatch for
# ...lora_A`), so --force cannot make such a resume work: it is refused at preflight, before data or weights load.
RESUME_SHAPE_KEYS = ("model.lora.enabled", "model.lora.r", "model.lora.target_modules", "model.lora.bias")

# Changes a resume applies to the restored optimizer and scheduler (Trainer would restore the old ones):
# any of these restarts the learning-rate schedule at the resume step; weight_decay updates the param group.
SCHEDULE_KEYS = ("training.hyperparameters.learning_rate", "training.hyperparameters.warmup_steps",
                 "training.hyperparameters.num_epochs", "training.optimization.lr_scheduler")
OPTIMIZER_GROUP_KEYS = ("training.hyperparameters.weight_decay",)
BASE_IDENTITY_PARTS = {"config_sha256": "config.json", "chat_template_sha256": "chat template",
                       "weights_fingerprint": "weights"}
# Optimizers whose optimizer.pt the other loads (fused and for-each AdamW keep the same state). Any other change of
# training.optimization.optimizer cannot resume: Trainer would load AdamW's moments and param-group settings into
# SGD or Adafactor and fail at the first step (SGD: KeyError 'momentum'), after the run's record was rewritten.
OPTIMIZER_STATE_FAMILY = {"adamw": "adamw", "adamw_fused": "adamw"}


def global_batch(cfg: dict, world: int) -> int:
    hp = cfg["training"]["hyperparameters"]
    return world * hp["batch_size"] * hp["gradient_accumulation_steps"]


def no_such_run_error(config: TrainingConfig, run_id: str, run_dir: Path) -> TrainerError:
    """`--resume-from latest --run-id X` for a run that is not under the output dir: where it looked, the runs that
    are there, and where this machine's run index last saw X."""
    out = run_dir.parent
    runs = sorted(p.name for p in out.iterdir() if (p / MANIFEST_NAME).is_file()) if out.is_dir() else []
    indexed = _run_index().get(run_id)
    where = (f"this machine's run index has it in {Path(indexed).parent}: add --output-dir {Path(indexed).parent}"
             if isinstance(indexed, str) and Path(indexed).is_dir() else
             f"runs there: {', '.join(runs[:10])}{' ...' if len(runs) > 10 else ''}" if runs else
             "that directory holds no runs")
    return TrainerError("CheckpointNotFound", {
        "field": "--run-id", "value": run_id, "path": str(run_dir), "looked_in": [str(run_dir)],
        "output_dir": str(out), "runs_there": runs[:50],
        "suggestion": f"there is no run {run_id!r} in {out} (logging.output_dir, or --output-dir): {where}. Check "
                      "the run id; to start a new run with it, drop --resume-from"})


def _latest_checkpoint(config: TrainingConfig, run_id: Optional[str]) -> dict:
    """`--resume-from latest`: the run's newest complete, healthy checkpoint whose files are intact (its meta,
    with its path); a damaged one is passed over with a warning."""
    if not run_id:
        raise TrainerError("InvalidConfig", {
            "field": "--resume-from", "value": "latest", "expected": "--run-id RUN with `latest`",
            "suggestion": "add --run-id <run id>, or pass the checkpoint directory itself"})
    run_dir = run_paths(config, run_id)["run_dir"]
    if not run_dir.is_dir():
        raise no_such_run_error(config, run_id, run_dir)
    damaged = {}
    for c in reversed([c for c in read_checkpoints(run_dir) if c.get("health") == "ok"]):  # newest intact
        reason = check_checkpoint_integrity(Path(c["path"]), c)
        if not reason:
            if damaged:
                log.warning("resuming from %s, the newest intact checkpoint", c["name"])
            return c
        damaged[c["name"]] = reason
        log.warning("checkpoint %s is damaged (%s): not resuming from it", c["path"], reason)
    raise TrainerError("CheckpointNotFound", {
        "field": "--resume-from", "value": "latest", "path": str(run_dir), "damaged": damaged,
        "suggestion": "this run has no complete, healthy checkpoint (an interrupted save is never used); "
                      f"start this run id over with the same command without --resume-from, plus --force "
                      f"(the old run is moved aside to {run_id}.abandoned-<time>, nothing is deleted), start "
                      "a new run with another --run-id, or pass a checkpoint directory explicitly"})


def _named_checkpoint(resume_from: str) -> dict:
    """`--resume-from PATH`: the checkpoint there (its meta, with its path), complete, healthy and intact."""
    path = Path(resume_from).expanduser().resolve()
    meta_path = path / CHECKPOINT_META
    if not meta_path.is_file():
        here = [c["name"] for c in read_checkpoints(path.parent)]  # a run dir: retention may have deleted it
        raise TrainerError("CheckpointNotFound", {
            "field": "--resume-from", "value": resume_from, "path": str(path),
            **({"checkpoints_in_run": here} if here else {}),
            "suggestion": ("the directory has no checkpoint_meta.json, so it is not a complete checkpoint of "
                           "this tool; use --resume-from latest --run-id RUN") if path.is_dir()
            else f"no such checkpoint; the run has {', '.join(here)} (--resume-from latest --run-id "
                 f"{path.parent.name} takes the newest intact one)" if here
            else "no such directory; `--list-checkpoints <run_id>` lists a run's checkpoints"})
    meta = read_json_lenient(meta_path)
    if not meta:
        raise damaged_checkpoint_error("--resume-from", resume_from, path, check_checkpoint_integrity(path),
                                       "this checkpoint's record was damaged after it was saved; resume from an "
                                       "earlier one (--resume-from latest --run-id RUN picks the newest intact one)")
    meta = {**meta, "path": str(path)}
    if meta.get("health") != "ok":
        raise TrainerError("CheckpointNotFound", {
            "field": "--resume-from", "value": resume_from, "health": meta.get("health"),
            "suggestion": "this checkpoint failed verification after saving; resume from an earlier one"})
    reason = check_checkpoint_integrity(path, meta)
    if reason:
        raise damaged_checkpoint_error("--resume-from", resume_from, path, reason,
                                       "this checkpoint was damaged after it was saved; resume from an earlier "
                                       "one (--resume-from latest --run-id RUN picks the newest intact one)")
    return meta


def base_identity_problem(meta: dict, config: TrainingConfig) -> Optional[dict]:
    """The base model is part of a run's identity: its config.json, chat template or weights differing from those
    the checkpoint recorded (base_identity) make the resume train another model, like changed training data.
    A checkpoint saved before the identity was recorded is compared on its base_config_sha256 alone."""
    recorded = meta.get("base_identity") or (
        {"config_sha256": meta["base_config_sha256"]} if meta.get("base_config_sha256") else {})
    now = base_identity(config)
    changed = {label: {"recorded": recorded[k], "now": now.get(k)} for k, label in BASE_IDENTITY_PARTS.items()
               if k in recorded and recorded[k] != now.get(k)}
    if not changed:
        return None
    return problem("InvalidConfig", field="model.base_checkpoint", value=config.model.base_checkpoint,
                   path=str(base_model_dir(config)), changed=changed,
                   expected="the base model the checkpoint was trained on",
                   suggestion=f"the base model's {' and '.join(changed)} changed since the checkpoint was saved "
                              "(the resumed run would train another model): restore the base, start a new run "
                              "(another --run-id, without --resume-from), or pass --force to resume on this base")


def resume_config_problems(meta: dict, config: TrainingConfig, new_run: bool) -> tuple[list, list, list]:
    """(differences, problems --force accepts, problems it cannot) between the checkpoint and this command: the
    config keys (RESUME_FATAL_KEYS, RESUME_SHAPE_KEYS, an optimizer that cannot load the saved state), the base
    model's identity, and for a resume of the same run the training data's sha256 and the global batch."""
    # the checkpoint stored its config redacted: compare like with like (a secret is not a config difference)
    old, new = _flatten(meta.get("config") or {}), _flatten(redact(config.to_dict()))
    diffs = [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    lora_on = bool(old.get("model.lora.enabled")) or config.model.lora.enabled
    fatal, shape = [], []
    for k, o, n in diffs:
        if k.startswith("model.lora.") and not lora_on:
            continue
        if k == "training.optimization.optimizer" and not new_run and \
                OPTIMIZER_STATE_FAMILY.get(o, o) != OPTIMIZER_STATE_FAMILY.get(n, n):
            shape.append(problem(
                "InvalidConfig", field=k, value=_jsonable(n), expected=_jsonable(o),
                suggestion=f"the checkpoint's optimizer.pt holds {o}'s state, which {n} cannot load, even with "
                           f"--force. Restore {k}, or start a new run from these weights with a fresh {n} "
                           "optimizer: --resume-from <this checkpoint> --run-id NEW_ID --force"))
        if k in RESUME_SHAPE_KEYS:
            shape.append(problem(
                "InvalidConfig", field=k, value=_jsonable(n), expected=_jsonable(o),
                suggestion=f"the checkpoint was trained with {k}={o!r}: its weights and optimizer state do not fit "
                           f"a model with {k}={n!r}, so this resume cannot work, even with --force. Restore {k}, or "
                           "train the new setting as a new run (the same command with another --run-id and "
                           "without --resume-from)"))
        elif k in SHARDING_KEYS and bool(o) != bool(n):
            fatal.append(config_problem(k, n, _jsonable(o), f"the checkpoint was saved {'with' if o else 'without'} "
                                        f"{k}, whose layout of weights and optimizer state a run "
                                        f"{'without' if o else 'with'} it does not load (it fails, or starts a fresh "
                                        f"optimizer silently); restore {k}={o!r}, or pass --force to resume anyway"))
        elif k in RESUME_FATAL_KEYS or k.startswith("data.chat_template_kwargs."):
            fatal.append(config_problem(k, n, _jsonable(o), f"the checkpoint was trained with {k}={o!r}; restore "
                                        "it, start a new run (another --run-id, without --resume-from), or pass "
                                        "--force to resume anyway"))
    changed_base = base_identity_problem(meta, config)
    if changed_base:
        fatal.append(changed_base)
    if new_run:  # a new run has its own data and batch
        return diffs, fatal, shape
    old_sha = (meta.get("data_sha256") or {}).get("train")
    new_sha = _sha256(data_path(config, "train_path"))
    if old_sha and old_sha != new_sha:
        fatal.append(problem("InvalidConfig", field="data.train_path", value=str(data_path(config, "train_path")),
                             expected=f"training data with sha256 {old_sha}", actual_sha256=new_sha,
                             suggestion="the training data changed since the checkpoint was saved: restore it, start "
                                        "a new run, or pass --force to resume anyway"))
    if meta.get("config") and meta.get("world_size"):
        before, now = global_batch(meta["config"], meta["world_size"]), global_batch(config.to_dict(), world_size(config))
        if before != now:
            fatal.append(problem("InvalidConfig", field="training.hyperparameters.batch_size",
                                 value=f"global batch {now}", expected=f"global batch {before}",
                                 suggestion="world size x batch_size x gradient_accumulation_steps must stay "
                                            f"{before} (it was {meta['world_size']} x ...); restore them, start a "
                                            "new run, or pass --force"))
    return diffs, fatal, shape


def resolve_resume(config: TrainingConfig, resume_from: str, run_id: Optional[str], force: bool = False) -> dict:
    """Find the checkpoint to resume from and compare it with this command (resume_config_problems), at preflight:
    before any data or weights load. A checkpoint belongs to its run: `--resume-from PATH --run-id B` where PATH is
    run A's is refused, or with --force answered as a new run B that starts from those weights (`new_run`)."""
    meta = _latest_checkpoint(config, run_id) if resume_from == "latest" else _named_checkpoint(resume_from)
    owner = meta.get("run_id") or run_id
    new_run = resume_from != "latest" and run_id is not None and run_id != owner
    if new_run and not force:
        raise TrainerError("InvalidConfig", {
            "field": "--run-id", "value": run_id, "expected": f"{owner} (the run {Path(meta['path']).name} "
                                                              "belongs to)",
            "checkpoint": meta["path"], "checkpoint_run_id": owner,
            "suggestion": f"this checkpoint is run {owner}'s. To continue run {owner}, drop --run-id (or pass "
                          f"--run-id {owner}); to start a new run {run_id} from its weights (step 0, a fresh "
                          f"optimizer and learning-rate schedule; run {owner} is not touched), add --force"})
    diffs, fatal, shape = resume_config_problems(meta, config, new_run)
    if shape or (fatal and not force):
        raise TrainerError.collected(shape + fatal)
    return {"run_id": run_id if resume_from == "latest" or new_run else owner, "path": meta["path"],
            "step": meta["step"], "epoch": meta["epoch"], "new_run": new_run, "checkpoint_run_id": owner,
            "config_diff": [f"config differs from the checkpoint's: {k}: {o!r} -> {n!r}" for k, o, n in diffs],
            "hyperparameter_changes": {k: [o, n] for k, o, n in diffs if k in SCHEDULE_KEYS + OPTIMIZER_GROUP_KEYS},
            "schedule": meta.get("schedule")}


def init_weights_from(model, ckpt_dir: Path) -> None:
    """A new run started from another run's checkpoint (`--resume-from PATH --run-id NEW --force`): that checkpoint's
    weights (its adapter under LoRA) replace the base's just after loading, before the dry run and training; the
    optimizer and the learning-rate schedule start fresh at step 0 (the moments and schedule position belong to
    the other run's timeline: to continue them, resume that run). Weights that do not fit are exit 2."""
    from safetensors.torch import load_file
    state: dict = {}
    for f in sorted(Path(ckpt_dir).glob("*.safetensors")):
        state.update(load_file(str(f)))
    if is_peft_model(model):
        from peft import set_peft_model_state_dict
        result = set_peft_model_state_dict(model, state)
        missing = [k for k in result.missing_keys if "lora_" in k]
    else:
        result = model.load_state_dict(state, strict=False)
        own = model.state_dict()
        loaded = {own[k].data_ptr() for k in state if k in own}
        missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]  # tied weights are loaded
    if missing or result.unexpected_keys or not state:
        raise TrainerError("InvalidConfig", {
            "field": "--resume-from", "value": str(ckpt_dir), "missing": missing[:20],
            "unexpected": list(result.unexpected_keys)[:20],
            "expected": "a checkpoint of this model (base and model.lora settings)",
            "suggestion": "this checkpoint's weights do not fit the model this config builds: use the base model and "
                          "model.lora settings it was trained with"})
    log.info("weights initialised from %s (%d tensors)", ckpt_dir, len(state))


def format_resume_line(resume: dict) -> str:
    """`resuming from checkpoint-epoch-2 (step 4980, epoch 2): config unchanged` (spec Session 2); the config
    differences themselves are logged as warnings just before this line."""
    n = len(resume["config_diff"])
    verdict = "config unchanged" if not n else f"{n} config difference{'s' if n > 1 else ''} (listed above)"
    return f"resuming from {Path(resume['path']).name} (step {resume['step']}, epoch {resume['epoch']:g}): {verdict}"


# --------------------------------------------------------------------------------------------------
# 14. Dry run (spec Phase 2)
# --------------------------------------------------------------------------------------------------

DRY_RUN_STEPS = 10  # spec Phase 2 (`--dry-run --max-steps 10`), also the dry run the training command runs first
DRY_RUN_REPORT = "dry_run_report.json"


def dry_run_records(config: TrainingConfig, steps: int) -> int:
    """Train records that `steps` optimizer steps take on all ranks together: the dry run's slice."""
    hp = config.training.hyperparameters
    return max(hp.batch_size * hp.gradient_accumulation_steps * world_size(config) * steps, hp.batch_size)


def dry_run_model(config: TrainingConfig, validation: ValidationResult, run_id: str, steps: int) -> RunResult:
    """`--dry-run`: the real pipeline on a slice (only the slice is tokenized): data, batches, model, `steps`
    optimizer steps, logging setup (run_dry_steps). No checkpoints, no manifest (so it cannot block the real run)."""
    run_dir = run_paths(config, run_id)["run_dir"]
    run_dir.mkdir(parents=True, exist_ok=True)
    # Trackers get their own `-dryrun` id so the real run's curves and W&B run start clean.
    tracker = init_tracking(config, f"{run_id}-dryrun", is_main=is_main_process(),
                            wandb_mode=validation.wandb.get("mode"))
    ctx = RunContext(config=config, run_id=run_id, run_dir=run_dir, validation=validation, tracker=tracker,
                     history=RunHistory(), reproducibility={}, created_at=utc_now(), start_time=time.time())
    try:
        for w in validation.warnings:  # as the training command and --validate-only show them
            log.warning(w)
        echo_config(config)
        tokenizer, datasets_, model = _prepare(ctx, limit=dry_run_records(config, steps))
        report = run_dry_steps(ctx, tokenizer, datasets_, model, steps, ctx.data_stats)
    except Exception as exc:  # an allocation failure while loading the model (run_dry_steps reports its own)
        if is_out_of_memory(exc):
            raise out_of_memory_error(config, str(exc)) from exc
        raise
    finally:
        tracker.close()
    if report["status"] != "passed":
        raise dry_run_failed(report, run_dir / DRY_RUN_REPORT)
    return RunResult(run_id, "dry_run", str(run_dir), None, report, EXIT_OK)


def default_dry_run_steps(config: TrainingConfig, train_stats: dict) -> int:
    """DRY_RUN_STEPS, or a tenth of the run's planned optimizer steps when that is fewer (at least 2, so the loss is
    seen after an update): a short run does not spend a third of its time rehearsing (the tiny test runs: 2)."""
    return max(2, min(DRY_RUN_STEPS, total_optimizer_steps(config, train_rows(train_stats)) // 10))


def dry_run_before_training(ctx: RunContext, tokenizer, datasets_: dict, model, steps: Optional[int],
                            skip: bool = False, resuming: bool = False) -> None:
    """Spec Phase 2 inside the training command (Example Session 1: validate, dry run, train): the same dry run as
    --dry-run, for `steps` (default default_dry_run_steps) on the first records of the data already tokenized and
    with the model already loaded, so it costs seconds and no second load. It must not change the run: the trainable
    weights are copied to CPU before and put back after (the optimizer and scheduler are the dry Trainer's own,
    dropped with it), and the RNGs are re-seeded (Trainer seeds again when it is built), so the final weights are
    bit-identical with or without it (tested). Its trackers get the `-dryrun` id, CSV and TensorBoard only (no
    second W&B or MLflow run), and its step lines stay off the console: the run's curves start clean and the
    console gets one line. A failure raises TrainingFailed before the first training step. Skipped with
    --skip-dry-run, on a resume (the run had its dry run before it first trained; the manifest keeps that record),
    and under FSDP/DeepSpeed, which shard the model in place."""
    import torch
    config, c = ctx.config, ctx.config.compute
    reason = ("resuming a run that has trained already" if resuming else "--skip-dry-run" if skip
              else "compute.fsdp/deepspeed shard the model in place; run --dry-run on its own first"
              if c.fsdp or c.deepspeed else None)
    if reason:
        if not resuming:
            ctx.dry_run = {"status": "skipped", "reason": reason}
        log.info("dry run skipped: %s", reason)
        return
    t0 = time.perf_counter()
    steps = steps or default_dry_run_steps(config, ctx.data_stats["train"])
    train = datasets_["train"]
    sliced = {**datasets_, "train": train.select(range(min(dry_run_records(config, steps), len(train))))}
    saved = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    lg = config.logging
    trackers_config = dataclasses.replace(config, logging=dataclasses.replace(
        lg, wandb=dataclasses.replace(lg.wandb, enabled=False), mlflow=dataclasses.replace(lg.mlflow, enabled=False)))
    tracker = init_tracking(trackers_config, f"{ctx.run_id}-dryrun", is_main=ctx.tracker.is_main)
    tracker.echo = False
    dry_ctx = dataclasses.replace(ctx, tracker=tracker, history=RunHistory())
    try:
        report = run_dry_steps(dry_ctx, tokenizer, sliced, model, steps,
                               {"train_slice_samples": len(sliced["train"]), "splits": ctx.data_stats},
                               before_training=True)
    finally:
        tracker.close()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in saved:
                    p.copy_(saved[name])
                p.grad = None
        del saved
        seed_everything(config.training.seed)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()  # the run's performance block measures the run
    ctx.dry_run = {"status": report["status"], "report": str(ctx.run_dir / DRY_RUN_REPORT),
                   "steps": report["steps_run"], "initial_loss": report["initial_loss"],
                   "ln_vocab": report["ln_vocab"], "measured_over_estimated":
                   report["memory"]["measured_over_estimated"], "seconds": round(time.perf_counter() - t0, 2)}
    if report["status"] != "passed":
        raise dry_run_failed(report, ctx.run_dir / DRY_RUN_REPORT)


def run_dry_steps(ctx: RunContext, tokenizer, datasets_: dict, model, steps: int, data: dict,
                  before_training: bool = False) -> dict:
    """The dry run proper, for --dry-run and the training command alike: `steps` real optimizer steps on
    datasets_["train"], the first batch's shapes, a masked sample, the initial loss beside ln(vocab) (where a
    fresh head starts), and the memory of a full-length batch measured beside the estimate. Writes
    dry_run_report.json into the run dir and says how it went in one console line; returns the report (status
    `failed` when a loss was not finite or the curve was not written)."""
    import torch
    config, validation, tracker, history = ctx.config, ctx.validation, ctx.tracker, ctx.history
    hp, scratch = config.training.hyperparameters, ctx.run_dir / "dry_run_tmp"
    trainer = None
    try:
        collator = collator_for(getattr(model.config, "_attn_implementation", None), tokenizer.pad_token_id)
        first = collator([datasets_["train"][i] for i in range(min(hp.batch_size, len(datasets_["train"])))])
        sample = datasets_["train"][0]
        args = build_training_args(config, scratch, dry_run=True, max_steps=steps, resuming=False)
        trainer = _build_trainer(ctx, tokenizer, datasets_, model, args, dry_run=True)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        measured = _measure_after_dry_run(trainer, config, tokenizer)
        steps_run, tokens = trainer.state.global_step, trainer.state.num_input_tokens_seen
    except Exception as exc:
        if is_out_of_memory(exc):  # the CUDA allocator's, or the CPU's (MemoryError, ENOMEM, ...)
            raise out_of_memory_error(config, str(exc)) from exc
        raise
    finally:
        # Its optimizer states and wrappers go before the real Trainer makes its own: on CPU dropping the reference
        # is enough (the real Trainer.train collects garbage as it starts; a gc pass here costs ~0.5 s with torch
        # loaded); on a GPU the memory is handed back at once.
        trainer = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            gc.collect()
            torch.cuda.empty_cache()
        shutil.rmtree(scratch, ignore_errors=True)
    losses = [x[2] for x in history.train]
    initial = losses[0] if losses else float("nan")
    estimated = validation.memory.get("total_bytes")
    checks = {"initial_loss_finite": math.isfinite(initial),
              "final_loss_finite": bool(losses) and math.isfinite(losses[-1]),
              "logging_ok": tracker.train_curve.exists() or not tracker.is_main}  # only rank 0 writes curves
    report = {
        "run_id": ctx.run_id, "status": "passed" if all(checks.values()) else "failed", "steps": steps,
        "steps_run": steps_run, "before_training": before_training,
        "batch_shapes": {k: list(v.shape) for k, v in first.items()},
        "sample": _masked_sample(tokenizer, sample),
        "initial_loss": _json_float(initial), "ln_vocab": round(math.log(model.config.vocab_size), 4),
        "loss_after_steps": _json_float(losses[-1]) if losses else None,
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None, "train_seconds": round(seconds, 3),
        "memory": {"estimated": validation.memory, "measured": measured,
                   "measured_over_estimated": round(measured["total_bytes"] / estimated, 4) if estimated else None},
        "data": data, "checks": checks, "anomalies": history.anomalies, "warnings": validation.warnings,
        "baseline_memory": _dry_run_vs_baseline(validation, measured["total_bytes"]),
        "tracking": {"csv": str(tracker.log_dir), "tensorboard": str(tracker.tensorboard_dir)
                     if tracker.tensorboard_dir else None, "wandb": tracker.wandb_run is not None},
        "created_at": utc_now(),
    }
    path = ctx.run_dir / DRY_RUN_REPORT
    if tracker.is_main:
        write_json_atomic(path, report)
    stopped = f" (a guard stopped it: {history.stop['reason']})" if history.stop else ""
    failed = "" if report["status"] == "passed" else f", failed: {', '.join(k for k, v in checks.items() if not v)}"
    vs = report["baseline_memory"]
    vs_text = (f" ({format_bytes(vs['delta_bytes'], signed=True)} on baseline {vs['baseline_run_id']}'s "
               f"{format_bytes(vs['baseline_bytes'])})" if vs else "")
    (log.info if report["status"] == "passed" else log.error)(
        "dry run %s: %d step%s%s, initial loss %.2f (ln vocab %.2f), memory %s measured%s vs %s estimated%s -> %s",
        report["status"], steps_run, "" if steps_run == 1 else "s", stopped, initial, report["ln_vocab"],
        format_bytes(measured["total_bytes"]), vs_text, format_bytes(estimated), failed, path)
    return report


def _dry_run_vs_baseline(validation: ValidationResult, measured_bytes: Optional[float]) -> Optional[dict]:
    """The dry run's measured memory beside the baseline's (spec Session 3: "Dry-run passes with 8GB extra memory
    usage"): the baseline's own dry-run measurement, or its GPU peak when it has none."""
    mem = (validation.baseline or {}).get("memory") or {}
    base = (mem.get("measured") or {}).get("baseline_bytes") or mem.get("baseline_gpu_peak_bytes")
    if not base or measured_bytes is None:
        return None
    return {"baseline_run_id": validation.baseline.get("baseline_run_id"), "baseline_bytes": base,
            "current_bytes": measured_bytes, "delta_bytes": measured_bytes - base}


def _measure_after_dry_run(trainer, config: TrainingConfig, tokenizer) -> dict:
    """Memory of a full-length batch (batch_size x max_seq_length), measured the way the estimate counts it;
    on CUDA also the allocator's peak over the dry run."""
    import torch
    hp, device = config.training.hyperparameters, trainer.args.device
    ids = torch.full((hp.batch_size, config.data.max_seq_length), tokenizer.pad_token_id or 0, device=device)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    autocast = torch.autocast(device.type, dtype=torch.float16 if config.compute.mixed_precision == "fp16"
                              else torch.bfloat16, enabled=config.compute.mixed_precision != "no")
    with autocast:
        out = measure_training_memory(trainer.model, trainer.optimizer, batch)
    if device.type == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def _masked_sample(tokenizer, example: dict) -> dict:
    """The first training record decoded, with the prompt (no loss) and answer (loss) parts shown apart."""
    ids, labels = example["input_ids"], example["labels"]
    prompt = tokenizer.decode([i for i, l in zip(ids, labels) if l == IGNORE_INDEX])
    answer = tokenizer.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX])
    return {"tokens": len(ids), "answer_tokens": sum(l != IGNORE_INDEX for l in labels),
            "prompt_text_masked": prompt[:400], "answer_text_trained": answer[:400]}


# --------------------------------------------------------------------------------------------------
# 15. Train (spec Phase 3): train_model reads as the phases
# --------------------------------------------------------------------------------------------------

PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGHUP")  # Docker/Kubernetes/spot reclaim; SLURM's --signal; a closed
# terminal or SSH session. SIGHUP is a preemption too: the work since the last checkpoint is saved, not lost (a
# process started under nohup ignores SIGHUP, and keeps ignoring it)
_preempt: dict = {}  # {"signal": name, "at": time} once one arrived
_after_training = False  # set once the last optimizer step is done: a signal then skips the remaining analysis


class StopNow(BaseException):
    """A second preemption signal: stop at once, without a checkpoint (RunRecorder still records the run). A
    BaseException, as KeyboardInterrupt, so that no `except Exception` on the way swallows it."""

    def __init__(self, signal_name: str):
        self.signal_name = signal_name
        super().__init__(signal_name)


def _on_preempt_signal(signum, frame) -> None:
    name = signal.Signals(signum).name
    if _preempt:  # a second signal: stop now, no save
        raise StopNow(name)
    _preempt.update(signal=name, at=time.time())
    if _after_training:
        log.warning("%s received after training: skipping the rest of the analysis, then writing the run's final "
                    "record (send it again to stop at once)", name)
    else:
        log.warning("%s received: finishing this optimizer step, then saving a checkpoint and stopping "
                    "(send it again to stop at once)", name)


def install_preemption_handlers() -> dict:
    """SIGTERM/SIGUSR1/SIGHUP set a flag that PreemptionCallback reads at the next step boundary (and
    post_training_analysis between its steps). A signal that is ignored (SIGHUP under nohup) stays ignored.
    Returns the previous handlers, for restore_signal_handlers."""
    global _after_training
    _preempt.clear()
    _after_training = False
    previous = {}
    for name in PREEMPT_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, _on_preempt_signal)
    return previous


def restore_signal_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@contextlib.contextmanager
def signals_deferred():
    """While the run's final record is written (the manifest, `best/`, error.json, the trackers closed): every
    preemption signal and Ctrl-C is noted and acted on only once the record is complete, so a signal never leaves
    a half-built `best/` or a manifest that says `running` behind a process that is gone. Each step is bounded
    (the archive is hard links; nothing is trained or generated here); SIGKILL still stops it."""
    arrived: list[str] = []

    def note(signum, frame) -> None:
        arrived.append(signal.Signals(signum).name)

    previous = {}
    for name in (*PREEMPT_SIGNALS, "SIGINT"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, note)
    try:
        yield arrived
    finally:
        restore_signal_handlers(previous)
        if arrived:
            log.warning("%s arrived while the run's final record was being written: it was completed first",
                        ", ".join(dict.fromkeys(arrived)))


@dataclass
class RunContext:
    """Everything one run accumulates; build_manifest reads it."""
    config: TrainingConfig
    run_id: str
    run_dir: Path
    validation: ValidationResult
    tracker: Tracker
    history: RunHistory
    reproducibility: dict
    created_at: str
    start_time: float
    end_time: Optional[float] = None
    prior_seconds: float = 0.0  # wall time of the processes before a resume (GPU time was paid for)
    data_stats: dict = field(default_factory=dict)
    best_checkpoint: Optional[str] = None
    global_step: int = 0
    max_steps: Optional[int] = None
    epoch: Optional[float] = None
    tokens_seen: Optional[int] = None
    wandb_url: Optional[str] = None
    test_results: Optional[dict] = None
    resume_from: Optional[dict] = None
    resumes: list = field(default_factory=list)
    error: Optional[dict] = None
    performance: Optional[dict] = None
    samples: Optional[dict] = None
    loss_plot: Optional[str] = None
    baseline_comparison: Optional[dict] = None
    best_archive: Optional[str] = None
    lora: Optional[dict] = None
    distributed: Optional[dict] = None
    resume_plan: Optional[dict] = None  # hyperparameter changes a resume applies (apply_resume_plan)
    optimizer_implementation: Optional[str] = None  # the TrainingArguments optim the Trainer ran
    dry_run: Optional[dict] = None  # the dry run before training: passed (with its report) or skipped, and why
    evaluated: Optional[str] = None  # what the test evaluation measured: the best checkpoint's name, or final weights
    log_handler: Optional[logging.Handler] = None  # train.log's, removed when the run's record is written
    # False while a resume has not started training: the run's record is still the previous process's, and a
    # resume that ends before its first step leaves it so (RunRecorder, record_resume_attempt)
    record_started: bool = True
    previous_record: dict = field(default_factory=dict)  # the manifest a resume continues, as it was read
    initialized_from: Optional[dict] = None  # a new run started from another run's checkpoint (resolve_resume)
    analysis_skipped: Optional[dict] = None  # a signal after training: what of the analysis was skipped
    precision: Optional[dict] = None  # precision_facts, with the parameter dtype measured on the loaded model


@dataclass
class RunResult:
    run_id: str
    status: str  # completed | diverged | failed | interrupted | dry_run
    run_dir: str
    manifest_path: Optional[str]
    manifest: dict
    exit_code: int = EXIT_OK


def train_model(config: TrainingConfig, dry_run: bool = False, resume_from: Optional[str] = None, *,
                run_id: Optional[str] = None, max_steps: Optional[int] = None, force: bool = False,
                argv: Optional[list] = None, skip_dry_run: bool = False) -> RunResult:
    """Run the whole workflow for a validated-or-not config and return what happened: validation, the dry run
    (`max_steps` steps, default default_dry_run_steps; not on a resume, nor with skip_dry_run), training, analysis.
    dry_run=True: the dry run only (dry_run_model).
    Raises TrainerError for failures the user can fix (the manifest records them when a run dir exists).
    The run dir lock taken on the way (lock_run_dir) is released when this returns or raises."""
    held, collecting = set(_RUN_LOCKS), gc.isenabled()
    gc.disable()  # until _prepare ends (startup_done): see there
    try:
        return _train_model(config, dry_run, resume_from, run_id=run_id, max_steps=max_steps, force=force,
                            argv=argv, skip_dry_run=skip_dry_run)
    finally:
        for locked in set(_RUN_LOCKS) - held:
            unlock_run_dir(Path(locked))
        (gc.enable if collecting else gc.disable)()
        if __name__ != "__main__":  # a caller in the same process (tests): its objects are collectable again
            gc.unfreeze()


def _train_model(config: TrainingConfig, dry_run: bool, resume_from: Optional[str], *, run_id: Optional[str],
                 max_steps: Optional[int], force: bool, argv: Optional[list], skip_dry_run: bool) -> RunResult:
    """The spec's workflow, a phase a line: preflight (Phase 1), the run claimed and opened, then inside its record
    (RunRecorder: the final manifest however the run ends) data and model, the dry run (Phase 2), training (Phase
    3) and the post-training analysis (Phase 4)."""
    if run_id is not None:
        check_run_id(run_id)  # before anything is read or written under <output_dir>/<run_id>
    pin_template_date(config, resume_from, run_id)  # before validation tokenizes: the run's date, kept on resume
    choose_baseline(config, exclude=own_run_dir(config, run_id, resume_from))
    validation = validate_config(config, resuming=bool(resume_from))
    validation.raise_if_failed()
    injected_faults()  # a malformed test hook is refused here, before anything is written
    claim = claim_run(config, validation, resume_from, run_id, force, dry_run)
    choose_cpu_threads(config, claim.previous)
    if dry_run:
        return dry_run_model(config, validation, claim.run_id, max_steps or DRY_RUN_STEPS)
    ctx = open_run(config, validation, claim, sys.argv[1:] if argv is None else argv)
    resume_path = claim.resume["path"] if claim.resume else None
    with RunRecorder(ctx, claim.resume) as recorder:
        tokenizer, datasets_, model = _prepare(ctx)
        dry_run_before_training(ctx, tokenizer, datasets_, model, max_steps, skip=skip_dry_run,
                                resuming=resume_path is not None)
        trainer = fit(ctx, tokenizer, datasets_, model, resume_path)
        post_training_analysis(ctx, trainer, tokenizer, datasets_)
    return recorder.result


def own_run_dir(config: TrainingConfig, run_id: Optional[str], resume_from: Optional[str]) -> Optional[Path]:
    """The run dir this command will write, where it is known before the claim (never its own baseline)."""
    if run_id:
        return run_paths(config, run_id)["run_dir"]
    if resume_from and resume_from != "latest":
        return Path(resume_from).expanduser().resolve().parent
    return None


@dataclass
class RunClaim:
    """The run a training command writes: its id and dir (locked), and what it resumes, if anything."""
    run_id: str
    run_dir: Path
    resume: Optional[dict] = None  # resolve_resume's answer
    previous: dict = field(default_factory=dict)  # the manifest a resume continues
    init_from: Optional[dict] = None  # another run's checkpoint this new run starts from (--force)


def claim_run(config: TrainingConfig, validation: ValidationResult, resume_from: Optional[str],
              run_id: Optional[str], force: bool, dry_run: bool) -> RunClaim:
    """Which run this command writes, taken before anything is written: the resume checkpoint (resolve_resume),
    the run id, the run dir's lock (one writer), RunExists for a run that exists (or --force: moved aside), and the
    manifest a resume continues (a damaged one is refused, or with --force set aside)."""
    main_proc = is_main_process()
    if resume_from == "latest" and run_id and main_proc and run_paths(config, run_id)["run_dir"].is_dir():
        lock_run_dir(run_paths(config, run_id)["run_dir"])  # before `latest` is chosen: its writer may be saving it
    resume = resolve_resume(config, resume_from, run_id, force) if resume_from else None
    init_from = None
    if resume:
        run_id = resume["run_id"]
        validation.warnings.extend(resume["config_diff"])
    if resume and resume["new_run"]:  # another run's checkpoint with --force: a new run from its weights
        init_from = {k: resume[k] for k in ("path", "step", "epoch")} | {"run_id": resume["checkpoint_run_id"]}
        resume = None
    run_id = run_id or make_run_id(config)
    check_run_id(run_id)  # also the one a checkpoint's meta names
    run_dir = run_paths(config, run_id)["run_dir"]
    manifest_path = run_dir / MANIFEST_NAME
    if main_proc:
        lock_run_dir(run_dir)  # one writer per run dir (dry run included), before RunExists and any write
    if not dry_run and not resume and main_proc:
        if force and manifest_path.exists() and not init_from:  # --force alone: start this run id over
            abandon_run(config, run_id)
        refuse_existing_run(manifest_path, run_id, config)  # that --force was for the other run's checkpoint
    previous = previous_manifest(manifest_path, force, main_proc) if resume and not dry_run else {}
    return RunClaim(run_id, run_dir, resume, previous, init_from)


def open_run(config: TrainingConfig, validation: ValidationResult, claim: RunClaim, argv: list) -> RunContext:
    """The run dir (partial saves of an earlier process removed, registered in the run index), trackers, train.log,
    the run context (a resume's history, timings and dry-run record carried over), the console's opening lines and
    the manifest with status `running`."""
    main_proc, resume, previous = is_main_process(), claim.resume, claim.previous
    if main_proc:
        claim.run_dir.mkdir(parents=True, exist_ok=True)
        clean_partial_saves(claim.run_dir, run_paths(config, claim.run_id)["log_dir"])
        register_run(claim.run_id, claim.run_dir)
    # a resume keeps the curves whole until it starts training (start_resumed_timeline)
    tracker = init_tracking(config, claim.run_id, resume=bool(resume), is_main=main_proc,
                            wandb_mode=validation.wandb.get("mode"))
    if tracker.wandb_fallback:  # reachable, yet wandb.init failed online: offline, recorded as preflight's would be
        validation.wandb = {"requested_mode": os.environ.get("WANDB_MODE") or "online", "mode": "offline",
                            "server": os.environ.get("WANDB_BASE_URL") or WANDB_DEFAULT_URL,
                            "reason": tracker.wandb_fallback, "sync": "wandb sync <run_dir>/wandb/offline-run-*"}
        validation.warnings.append(f"logging.wandb: W&B could not start online ({tracker.wandb_fallback}): it ran "
                                   "offline; `wandb sync` the files under <run_dir>/wandb later")
    ctx = RunContext(config=config, run_id=claim.run_id, run_dir=claim.run_dir, validation=validation,
                     tracker=tracker, history=RunHistory(),
                     reproducibility=reproducibility_block(config, validation, argv) if main_proc else {},
                     created_at=previous.get("created_at") or utc_now(), start_time=time.time(),
                     wandb_url=tracker.wandb_url, resumes=list(previous.get("resumes") or []),
                     initialized_from=claim.init_from)
    ctx.log_handler = _add_file_log(tracker.log_dir / "train.log") if main_proc else None
    if claim.init_from:
        log.warning("run %s starts from run %s's %s (step %d): its weights, with a fresh optimizer and learning-rate "
                    "schedule from step 0; run %s is not touched", claim.run_id, claim.init_from["run_id"],
                    Path(claim.init_from["path"]).name, claim.init_from["step"], claim.init_from["run_id"])
    if main_proc:
        follow_latest_log(tracker.log_dir / "train.log")
    if resume:
        ctx.resume_from = {"path": resume["path"], "step": resume["step"], "epoch": resume["epoch"]}
        ctx.resumes.append({**ctx.resume_from, "at": utc_now(), "config_differences": resume["config_diff"],
                            "hyperparameter_changes": {k: {"old": o, "new": n} for k, (o, n)
                                                       in resume["hyperparameter_changes"].items()},
                            "previous_status": previous.get("status")})
        ctx.previous_record, ctx.record_started = previous, not previous
        ctx.resume_plan = {"changes": resume["hyperparameter_changes"], "schedule": resume["schedule"]}
        ctx.history = _history_from_manifest(previous, resume["step"])
        ctx.prior_seconds = float((previous.get("reproducibility") or {}).get("duration_seconds") or 0.0)
        ctx.dry_run = previous.get("dry_run")  # the run's own, from before it started training
    return ctx


RECORD_RESERVE_BYTES = 64 * 2**20  # set aside while a run trains, handed back to record an out-of-memory failure
# How a run ends, by the error that ended it (no error: completed; anything else: failed).
END_STATUS = {"TrainingDiverged": "diverged", "Preempted": "interrupted", "Interrupted": "interrupted"}


class RunRecorder:
    """The run's record, however it ends. On entry: the opening console lines, the manifest with status `running`
    and the preemption signal handlers. On exit: the final status (run_ending), the final manifest
    (finalize_manifest: for a completed run also the `best/` archive), error.json for a failure, the trackers closed
    and train.log's handler removed. While an error is on its way out, recording it must not replace it (on a full
    disk the manifest write fails too): each record is tried, and one that fails is logged and listed in the error's
    `not_recorded`. `result` is the RunResult of a completed run."""

    def __init__(self, ctx: RunContext, resume: Optional[dict] = None):
        self.ctx, self.resume, self.result = ctx, resume, None
        self.manifest_path = ctx.run_dir / MANIFEST_NAME
        self.previous_handlers: dict = {}
        self.reserve = None  # memory set aside for recording an out-of-memory failure (_free_for_recording)

    def __enter__(self) -> "RunRecorder":
        ctx = self.ctx
        # first: from the manifest that says `running` on, a signal ends in a record that says how the run ended
        self.previous_handlers = install_preemption_handlers()
        import mmap
        import resource  # noqa: F401 - peak_memory's, imported while memory is plentiful
        import traceback  # noqa: F401 - _free_for_recording's
        # address space, not resident memory (an untouched anonymous map): what `ulimit -v` and strict overcommit
        # count, and what a MemoryError has run out of
        try:
            self.reserve = mmap.mmap(-1, RECORD_RESERVE_BYTES)
        except (OSError, MemoryError):  # already at the limit: the run fails soon, recorded as well as it can be
            self.reserve = None
        try:
            for w in ctx.validation.warnings:
                log.warning(w)
            if self.resume:
                log.info(format_resume_line(self.resume))
            echo_config(ctx.config)
            if is_main_process() and ctx.record_started:  # a resume's: when it starts training
                save_manifest(ctx.run_id, build_manifest(ctx, "running"), str(self.manifest_path))
        except BaseException as exc:
            if not self.__exit__(type(exc), exc, exc.__traceback__):
                raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._free_for_recording(exc)
        try:
            with signals_deferred():
                return self._end(exc)
        finally:
            restore_signal_handlers(self.previous_handlers)

    def _free_for_recording(self, exc: Optional[BaseException]) -> None:
        """Make room to write the record: the reserve is handed back, and after an allocation failure the frames
        the exception unwound are cleared (their locals, the Trainer and its optimizer states among them, go)."""
        if self.reserve is not None:
            self.reserve.close()
            self.reserve = None
        if exc is not None and is_out_of_memory(exc):
            import traceback
            traceback.clear_frames(exc.__traceback__)
            gc.collect()

    def _end(self, exc: Optional[BaseException]) -> bool:
        ctx = self.ctx
        ctx.end_time = time.time()
        status, error, instead = run_ending(exc, ctx)
        if error is not None:
            ctx.error = error.payload
        pending = instead or exc
        manifest = self._record(status, pending)
        if pending is None:
            self.result = RunResult(ctx.run_id, status, str(ctx.run_dir), str(self.manifest_path), manifest, EXIT_OK)
            return False
        if manifest:  # main prints it on stdout before the error JSON on stderr
            pending.run_output = run_output(manifest, self.manifest_path)
        if error is not None and not isinstance(pending, TrainerError):  # Ctrl-C: main reports what was recorded
            pending.recorded_error = error.payload
        if instead is not None:
            raise instead from exc
        return False

    def _record(self, status: str, pending: Optional[BaseException]) -> dict:
        ctx, not_recorded, manifest = self.ctx, [], {}

        def record(what: Any, write) -> Any:
            try:
                return write()
            except Exception as exc:
                if pending is None:
                    raise
                log.error("could not record the failure in %s: %s: %s", what, type(exc).__name__, exc)
                not_recorded.append({"path": str(what), "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                return None

        try:
            if is_main_process() and not ctx.record_started:  # a resume that never trained: the record stays
                record(self.manifest_path, lambda: record_resume_attempt(ctx, status))
            elif is_main_process():
                manifest = record(self.manifest_path, lambda: finalize_manifest(ctx, status)) or {}
                if ctx.error is not None:
                    record(ctx.run_dir / "error.json",
                           lambda: write_json_atomic(ctx.run_dir / "error.json", ctx.error))
                else:  # an earlier process's failure (a preemption before this resume) is not this run's end
                    record(ctx.run_dir / "error.json", lambda: (ctx.run_dir / "error.json").unlink(missing_ok=True))
            record("trackers", lambda: ctx.tracker.close(status, self.manifest_path if is_main_process() else None))
        finally:
            if not_recorded and isinstance(pending, TrainerError):
                pending.details["not_recorded"] = not_recorded
            if ctx.log_handler:
                log.removeHandler(ctx.log_handler)
                ctx.log_handler.close()
        return manifest


def run_ending(exc: Optional[BaseException], ctx: RunContext) -> tuple[str, Optional[TrainerError],
                                                                         Optional[TrainerError]]:
    """(final status, the error recorded, the error raised instead of `exc` or None) for a run that ended with
    `exc` (None: completed). A full disk is reported as DiskFull (the first failed write, its path and the free
    space); Ctrl-C is recorded as Interrupted; anything else unexpected as TrainingFailed."""
    if exc is None:
        return "completed", None, None
    if isinstance(exc, TrainerError):
        if exc.kind == "OutOfMemory" and "measured_peak_memory_gb" not in exc.details:  # raised during the run
            add_measured_memory(exc.details, ctx)
        return END_STATUS.get(exc.kind, "failed"), exc, None
    if isinstance(exc, KeyboardInterrupt):
        command = run_resume_command(ctx)
        return "interrupted", TrainerError("Interrupted", {"resume_command": command,
                                                           "suggestion": f"continue with {command}"}), None
    if isinstance(exc, StopNow):  # a second signal: stopped where it was, without a checkpoint
        stopped = TrainerError("Preempted", {
            "signal": exc.signal_name, "step": ctx.global_step, "epoch": ctx.epoch, "checkpoint": None,
            "resume_command": run_resume_command(ctx),
            "suggestion": "stopped at once by a second signal, without saving the step under way: the "
                          "resume_command continues from the last checkpoint"})
        return "interrupted", stopped, stopped
    if isinstance(exc, Exception) and is_disk_full(exc):
        full = disk_full_error(exc, ctx.run_dir, run_id=ctx.run_id, config=ctx.config)
        return "failed", full, full
    if is_out_of_memory(exc):
        oom = out_of_memory_failure(ctx, exc)
        return "failed", oom, oom
    return "failed", unexpected_error(exc) if isinstance(exc, Exception) else None, None


def out_of_memory_failure(ctx: RunContext, exc: BaseException) -> TrainerError:
    """OutOfMemory (exit 4) for an allocation that failed during the run: the allocator's message, the memory the
    process measured (its peak, and the GPUs' peak allocated) next to what preflight estimated, and the fix."""
    config, est = ctx.config, ctx.validation.memory or {}
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    err = out_of_memory_error(config, message, est.get("total_gb"), est.get("available_gb"))
    if isinstance(exc, OSError):
        err.details["suggestion"] = (
            "memory-mapping the datasets cache failed: the process's address space is limited (ulimit -v) or the "
            "host is out of memory; raise the limit (`ulimit -v unlimited`), free memory, or train on a machine "
            "with more RAM. " + err.details["suggestion"])
    add_measured_memory(err.details, ctx)
    return err


def add_measured_memory(details: dict, ctx: RunContext) -> None:
    """The memory measured at an OutOfMemory, beside the estimate already in `details`: this process's peak
    resident memory and, on CUDA, each GPU's peak allocated bytes, in GB as the estimate is."""
    try:
        measured = peak_memory()
    except Exception:  # noqa: BLE001 - a measurement that fails must not replace the error
        return
    gpus = measured.get("gpu_peak_allocated_bytes")
    details["measured_peak_memory_gb"] = round((max(gpus) if gpus else measured["host_peak_rss_bytes"]) / 2**30, 3)
    details["measured_on"] = "GPU (peak allocated, largest)" if gpus else "host RAM (peak resident set of this process)"
    for key, estimate in (("estimated_memory_gb", "total_gb"), ("available_memory_gb", "available_gb")):
        if details.get(key) is None:
            details[key] = (ctx.validation.memory or {}).get(estimate)


def _prepare(ctx: RunContext, limit: Optional[int] = None):
    """Tokenizer, tokenized splits and model, all seeded."""
    config = ctx.config
    if not sys.stderr.isatty():  # progress bars in a log file are noise
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    seed_everything(config.training.seed)
    if is_main_process():
        import_plotting(ctx)
    tokenizer = load_tokenizer(config)
    shapes = {s: i["shape"] for s, i in ctx.validation.data.items()}
    injected_oom("data")
    datasets_, ctx.data_stats = load_splits(config, tokenizer, shapes, limit)
    attn = attention_implementation(config)
    model = load_base_model(config, attn)
    if ctx.initialized_from:
        init_weights_from(model, Path(ctx.initialized_from["path"]))
    trainable = next((p for p in model.parameters() if p.requires_grad), None)
    measured = str(trainable.dtype).removeprefix("torch.") if trainable is not None else None
    ctx.precision = {**precision_facts(config, ctx.validation.checkpoint or {}), "parameter_dtype": measured}
    startup_done()
    return tokenizer, datasets_, model


def import_plotting(ctx: RunContext) -> None:
    """matplotlib, imported now, before training: imported only for the loss plot after hours of training, under
    memory pressure the import itself failed and took the finished run down with it. Here a failure costs nothing
    but the plot (skipped, with a warning in the console and the manifest)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - MemoryError too: the plot is optional, the run is not
        ctx.validation.warnings.append(f"matplotlib could not be imported ({type(exc).__name__}: {exc}): "
                                       "loss_curves.png will be skipped; everything else is kept")
        log.warning(ctx.validation.warnings[-1])


def startup_done() -> None:
    """The cyclic garbage collector is off from train_model's start to here: imports, validation, tokenization and
    loading make long-lived objects (modules, the model, the data), and each full collection walks all of them
    (~0.1-0.3 s apiece with torch and transformers loaded: 9 of them, ~1.2 s, before the first training step of the
    bench's issue-size run). Then gc.freeze moves everything alive now out of the collector's view for the rest of
    the run (reference counting still frees it; the ~15k cyclic garbage objects the imports leave are kept, the
    same number whatever the data size), so Trainer's own gc.collect() calls (at the start of every train(), the
    dry run's included) and the one at interpreter exit walk only what the run makes after this point."""
    gc.freeze()
    gc.enable()


def fit(ctx: RunContext, tokenizer, datasets_: dict, model, resume_path: Optional[str]):
    """Spec Phase 3: Trainer.train from the start or from `resume_path`; the manifest follows every checkpoint. A
    guard's stop raises TrainingDiverged, a preemption Preempted (both after their checkpoint is saved). Ends with
    the best checkpoint's weights in the model (load_best_at_end). Returns the Trainer."""
    config = ctx.config
    args = build_training_args(config, ctx.run_dir, dry_run=False, max_steps=None, resuming=resume_path is not None,
                               model=model)
    ctx.optimizer_implementation = str(getattr(args.optim, "value", args.optim))
    if args.fsdp:  # the manifest's `distributed` block: the FSDP setup as Trainer received it
        ctx.distributed = {"fsdp": config.compute.fsdp, "fsdp_config": json.loads(json.dumps(args.fsdp_config or {}, default=str))}
    trainer = _build_trainer(ctx, tokenizer, datasets_, model, args, dry_run=False)
    if resume_path:
        trainer.resume_plan = ctx.resume_plan
        # the best as of the resumed checkpoint, never a later one from the abandoned timeline
        best_step = read_json_lenient(Path(resume_path) / "trainer_state.json").get("best_global_step")
        trainer.best_checkpoint = next((c["path"] for c in read_checkpoints(ctx.run_dir, verify=True)
                                        if c["step"] == best_step and c.get("health") == "ok"), None)

    def sync_ctx() -> None:
        st = trainer.state
        ctx.global_step, ctx.max_steps, ctx.epoch = st.global_step, st.max_steps, st.epoch
        ctx.tokens_seen, ctx.best_checkpoint = st.num_input_tokens_seen, getattr(trainer, "best_checkpoint", None)

    def after_save() -> None:  # the manifest follows every checkpoint, so a killed run can resume its history
        ctx.history.checkpoints_saved += 1  # before the manifest: a resume reads the count from it
        sync_ctx()
        save_manifest(ctx.run_id, build_manifest(ctx, "running"), str(ctx.run_dir / MANIFEST_NAME))

    trainer.after_save = after_save
    train = ctx.data_stats["train"]
    log.info("training %s: %d train%s / %d valid samples, %d optimizer steps planned", ctx.run_id, train["samples"],
             f" (packed into {train['packed_rows']} rows)" if "packed_rows" in train else "",
             ctx.data_stats["valid"]["samples"], total_optimizer_steps(config, train_rows(train)))
    if resume_path:  # once the checkpoint's state has loaded, before the first new step
        trainer.on_resumed = lambda: start_resumed_timeline(ctx)
    global _after_training
    try:
        trainer.train(resume_from_checkpoint=resume_path)  # an allocation failure: run_ending says OutOfMemory
    finally:
        close_progress_bars()  # a guard's or a signal's stop skips on_train_end
        sync_ctx()
    if resume_path and not ctx.record_started:  # a Trainer that loaded the state without the hook
        start_resumed_timeline(ctx)
    _after_training = True
    if world_size(config) > 1:
        ctx.distributed = {**(ctx.distributed or {}), **rank_weight_agreement(trainer)}
    if ctx.history.stop is not None:
        raise diverged_error(ctx, stop_validation_loss(trainer, datasets_["valid"]))
    if ctx.history.preempted is not None:
        raise preempted_error(ctx)
    ctx.evaluated = "final weights"
    if config.training.checkpointing.load_best_at_end and ctx.best_checkpoint:
        trainer.state.best_model_checkpoint = ctx.best_checkpoint
        # the best saved at the last step holds the weights in memory (verified equal when saved): no reload,
        # which for a multi-GB model is a read of every shard
        if read_json_lenient(Path(ctx.best_checkpoint) / "trainer_state.json").get("global_step") != trainer.state.global_step:
            trainer._load_best_model()
        ctx.evaluated = Path(ctx.best_checkpoint).name
    return trainer


def start_resumed_timeline(ctx: RunContext) -> None:
    """The moment a resume becomes the run: just before its first training step, once data, weights and the
    checkpoint's optimizer state have loaded (a resume that ends before, in loading or on Ctrl-C, leaves the run's
    record as it was: record_resume_attempt).
    The checkpoints after the resume step, a future this timeline abandons, move to superseded/
    (supersede_checkpoints) and are listed in this resume's `resumes` entry; the curves drop what was logged after
    the step; the manifest says `running` and describes this timeline."""
    step = ctx.resume_from["step"]
    if is_main_process():
        ctx.resumes[-1]["superseded"] = supersede_checkpoints(ctx.run_dir, step)
    ctx.tracker.restart_at(step)
    ctx.record_started = True
    if is_main_process():
        save_manifest(ctx.run_id, build_manifest(ctx, "running"), str(ctx.run_dir / MANIFEST_NAME))


def rank_weight_agreement(trainer) -> dict:
    """sha256 of every rank's weights after training: DDP keeps replicas identical, this proves it. Under FSDP
    each rank holds different shards (there are no replicas to compare): said so, nothing hashed."""
    import torch.distributed as dist
    if getattr(trainer, "is_fsdp_enabled", False):
        return {"world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "backend": trainer.args.ddp_backend, "sharded": "fsdp", "ranks_agree": None}
    h = hashlib.sha256()
    for _, p in sorted(trainer.accelerator.unwrap_model(trainer.model).state_dict().items()):
        h.update(p.detach().to("cpu").contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    hashes = [None] * dist.get_world_size() if dist.is_initialized() else [None]
    if dist.is_initialized():
        dist.all_gather_object(hashes, h.hexdigest())
    else:
        hashes = [h.hexdigest()]
    agree = len(set(hashes)) == 1
    if not agree:
        log.error("ranks finished with different weights: %s", hashes)
    return {"world_size": len(hashes), "backend": trainer.args.ddp_backend, "rank_weight_sha256": hashes,
            "ranks_agree": agree}


def stop_validation_loss(trainer, valid) -> Optional[float]:
    """Validation loss of the weights in memory at a stop (the update that tripped a guard was skipped, so they
    are the weights of the checkpoint saved at the stop). No callbacks run: this is a check, not a curve point."""
    try:
        out = trainer.evaluation_loop(trainer.get_eval_dataloader(valid), "restart check", metric_key_prefix="check")
    except Exception as exc:  # a check that cannot run must not hide the divergence report
        log.warning("could not evaluate the weights at the stop: %s", exc)
        return None
    loss = out.metrics.get("check_loss")
    return float(loss) if loss is not None else None


# --------------------------------------------------------------------------------------------------
# 16. Post-training analysis (spec Phase 4): samples, baseline comparison, plot, archive, cost, performance
# --------------------------------------------------------------------------------------------------

def prompt_and_reference(record: dict, shape: str, tokenizer, chat_kwargs: Optional[dict] = None) -> tuple[str, str]:
    """The text a user would send, and the answer the data says is right. `messages`: the conversation before the
    last assistant turn through the chat template with the generation prompt on and `chat_kwargs` (the run's
    template variables, template_kwargs), the record's own over them, as training rendered the record and a server
    renders it; the other shapes are trained on their raw prompt, and sent so."""
    if shape == "messages":
        msgs = record["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return (tokenizer.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True,
                                              **record_template_kwargs(chat_kwargs, record)),
                msgs[last]["content"])
    if shape == "prompt_completion":
        return record["prompt"], record["completion"]
    if shape == "instruction":
        return render_instruction_prompt(record), record["output"]
    ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"]  # text: first half -> second half
    cut = max(1, len(ids) // 2)
    return tokenizer.decode(ids[:cut]), tokenizer.decode(ids[cut:])


SAMPLE_BATCH = 8  # prompts decoded together in generate_samples (the post-training samples)
ANSWER_BATCH = 128  # ... in answer evaluation: at most this many rows per generate call,
ANSWER_BATCH_TOKENS = 65_536  # and rows x (prompt width + max_new_tokens) within this (the KV cache grows with it)


def _generation_batches(lengths: list[int], order: list[int], max_new_tokens: int, max_rows: int,
                        max_tokens: int) -> list[list[int]]:
    """`order` (ascending prompt length) cut into consecutive batches of at most max_rows rows whose padded size,
    rows x (longest prompt + max_new_tokens), stays within max_tokens (one row at least)."""
    batches, chunk = [], []
    for i in order:
        if chunk and (len(chunk) >= max_rows or (len(chunk) + 1) * (lengths[i] + max_new_tokens) > max_tokens):
            batches.append(chunk)
            chunk = []
        chunk.append(i)
    return batches + ([chunk] if chunk else [])


def generate_samples(model, tokenizer, records: list[dict], shape: str, max_new_tokens: int,
                     config: Optional[TrainingConfig] = None, batch_rows: int = SAMPLE_BATCH,
                     batch_tokens: int = ANSWER_BATCH_TOKENS, desc: str = "generating") -> list[dict]:
    """Greedy (deterministic) completions for test prompts, up to `batch_rows` prompts of similar length per generate
    call (_generation_batches), left-padded with an attention mask (positions follow the mask, so each prompt
    decodes as it would alone; tests/test_dry_run_before_training.py proves that on every step's logits), with the
    KV cache on. A row ends at its first stop token (end of turn or eos): generate pads a finished row while the
    others go on and stops the call when every row has finished. `messages` prompts are rendered with
    template_kwargs(config, record) (the record's own chat_template_kwargs alone without a config)."""
    import torch
    stop = end_of_turn_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop or [0])[0]
    device = next(model.parameters()).device
    pairs = [prompt_and_reference(rec, shape, tokenizer, template_kwargs(config) if config is not None else None)
             for rec in records]
    encoded = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt, _ in pairs]
    lengths = [len(e) for e in encoded]
    order = sorted(range(len(encoded)), key=lambda i: lengths[i])
    texts: dict[int, str] = {}
    model.eval()
    with progress(len(order), desc) as bar:
        for chunk in _generation_batches(lengths, order, max_new_tokens, batch_rows, batch_tokens):
            width = max(lengths[i] for i in chunk)
            ids = torch.tensor([[pad] * (width - lengths[i]) + encoded[i] for i in chunk], device=device)
            mask = torch.tensor([[0] * (width - lengths[i]) + [1] * lengths[i] for i in chunk], device=device)
            with torch.no_grad():
                gen = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=stop or None, use_cache=True,  # the config says False in training
                                     pad_token_id=pad)
            for row, i in enumerate(chunk):
                new = gen[row, width:].tolist()
                end = next((k + 1 for k, t in enumerate(new) if t in stop), len(new))  # padding after the stop
                texts[i] = tokenizer.decode(new[:end], skip_special_tokens=True)
            bar.update(len(chunk))
    return [{"prompt": prompt, "reference": reference, "generated": texts[i],
             "exact_match": texts[i].strip() == reference.strip()} for i, (prompt, reference) in enumerate(pairs)]


# Answer evaluation: the rules (README "Answer evaluation", --help) in one place, for every path that scores
# answers: the test evaluation after training, --evaluate, and validation under answer_eval.on_validation.
CURRENCY_MARK_RE = re.compile(r"(?<![A-Za-z])(?:PHP|Php)(?![A-Za-z])\s*|₱\s*|(?<!\w)P(?=\d)")
AMOUNT_RE = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")  # the thousands form first
CENTAVO = decimal.Decimal("0.01")


def answer_numbers(text: str) -> list:
    """The values in a text, in order, as Decimals rounded to centavos (half up): currency marks removed (PHP, Php
    or ₱ and the spaces after it; a P directly before a digit, unless a letter or digit precedes the P), each
    AMOUNT_RE match with its commas dropped, negative in parentheses `(1,234.50)` or after a `-` that does not
    follow a letter or digit. `12%` gives 12; form numbers count: `1601-C` gives 1601, `2550Q` 2550."""
    clean = CURRENCY_MARK_RE.sub("", text)
    values = []
    for m in AMOUNT_RE.finditer(clean):
        start, end = m.span()
        digits = m.group().replace(",", "")
        ctx = decimal.Context(prec=len(digits) + 4, rounding=decimal.ROUND_HALF_UP)  # exact at any length
        value = decimal.Decimal(digits).quantize(CENTAVO, context=ctx)
        in_parens = start > 0 and clean[start - 1] == "(" and clean[end:end + 1] == ")"
        minus = start > 0 and clean[start - 1] == "-" and not (start > 1 and clean[start - 2].isalnum())
        values.append(-value if in_parens or minus else value)
    return values


def _number_json(value) -> Any:
    """A centavo value as JSON: a number (its float is exact to the centavo below 1e13), a string beyond floats."""
    f = float(value)
    return f if math.isfinite(f) else str(value)


def score_answers(pairs: list[tuple[str, str]]) -> tuple[dict, list[dict]]:
    """(prediction, reference) pairs -> the summary ({records, exact_match, numeric_records, numeric_match,
    numeric_f1}, rates in [0, 1]) and one row per pair. exact_match: equal after trimming and collapsing
    whitespace. Only a reference with at least one number is scored on numbers (others count in records -
    numeric_records): numeric_match when the sorted values of the prediction equal the reference's (every amount
    right, none missing, none extra); numeric_f1 the F1 of the two bags of values. A rate over no record is null."""
    from collections import Counter
    rows = []
    for prediction, reference in pairs:
        pred, ref = answer_numbers(prediction), answer_numbers(reference)
        row = {"reference_numbers": [_number_json(v) for v in ref],
               "prediction_numbers": [_number_json(v) for v in pred],
               "exact_match": " ".join(prediction.split()) == " ".join(reference.split()),
               "numeric_match": None, "numeric_f1": None}
        if ref:
            overlap = sum((Counter(pred) & Counter(ref)).values())
            row["numeric_match"] = sorted(pred) == sorted(ref)
            row["numeric_f1"] = 2 * overlap / (len(pred) + len(ref))  # = 2PR / (P + R); 0 without overlap
        rows.append(row)
    numeric = [r for r in rows if r["numeric_match"] is not None]

    def mean(values: list) -> Optional[float]:
        return sum(values) / len(values) if values else None

    return ({"records": len(rows), "exact_match": mean([r["exact_match"] for r in rows]),
             "numeric_records": len(numeric), "numeric_match": mean([r["numeric_match"] for r in numeric]),
             "numeric_f1": mean([r["numeric_f1"] for r in numeric])}, rows)


def answer_evaluation(model, tokenizer, records: list[dict], shape: str, max_new_tokens: int,
                      config: Optional[TrainingConfig] = None, desc: str = "answer evaluation") -> tuple[dict, list]:
    """Greedy answers to `records` (generate_samples, ANSWER_BATCH rows per call) scored by score_answers:
    (summary, one row per record: index, prompt, reference, prediction, the numbers, the scores)."""
    samples = generate_samples(model, tokenizer, records, shape, max_new_tokens, config, batch_rows=ANSWER_BATCH,
                               desc=desc)
    summary, scores = score_answers([(s["generated"], s["reference"]) for s in samples])
    rows = [{"index": i, "prompt": s["prompt"], "reference": s["reference"], "prediction": s["generated"], **score}
            for i, (s, score) in enumerate(zip(samples, scores))]
    return summary, rows


def write_predictions(path: Path, rows: list[dict]) -> None:
    """test_predictions.jsonl: one JSON object per scored record (written atomically)."""
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows))


COMPARED_METRICS = {  # manifest location -> lower is better; the metric is named by the last key
    ("training_results", "final_val_loss"): True, ("training_results", "final_val_perplexity"): True,
    ("training_results", "final_val_token_accuracy"): False, ("test_results", "test_loss"): True,
    ("test_results", "test_perplexity"): True, ("test_results", "test_token_accuracy"): False,
    ("test_results", "test_exact_match"): False, ("test_results", "answer_eval", "numeric_match"): False,
}
MAX_LISTED_REGRESSIONS = 50  # answer regressions kept in the manifest (the count covers them all)
REGRESSIONS_PRINTED = 5  # ... and printed under the comparison table


def _manifest_value(manifest: dict, keys: tuple) -> Any:
    for key in keys:
        manifest = manifest.get(key) if isinstance(manifest, dict) else None
    return manifest


def _answer_right(row: dict) -> bool:
    """A scored answer is right: numeric_match where its reference has a number, else exact_match."""
    return bool(row["numeric_match"] if row.get("numeric_match") is not None else row.get("exact_match"))


def answer_regressions(manifest: dict, manifest_dir: Path, base: dict, base_dir: Path) -> Optional[dict]:
    """The test records this run answers wrong that the baseline answered right (_answer_right), from the two
    runs' test_predictions.jsonl, paired by index and reference (the same test file gives the same pairs; a
    changed one pairs only what still matches). None when either run has no predictions file."""
    paths = [resolve_manifest_path(_manifest_value(m, ("test_results", "answer_eval", "predictions")), d)
             for m, d in ((manifest, manifest_dir), (base, base_dir))]
    if not all(p and Path(p).is_file() for p in paths):
        return None
    current, baseline = (list(_jsonl_rows(Path(p))) for p in paths)
    before = {(r["index"], r["reference"]): r for _, r in baseline}
    pairs = [(before[(r["index"], r["reference"])], r) for _, r in current if (r["index"], r["reference"]) in before]
    lost = [{"index": new["index"], "prompt": new["prompt"], "reference": new["reference"],
             "baseline_prediction": old["prediction"], "prediction": new["prediction"],
             "reference_numbers": new["reference_numbers"], "baseline_prediction_numbers": old["prediction_numbers"],
             "prediction_numbers": new["prediction_numbers"]}
            for old, new in pairs if _answer_right(old) and not _answer_right(new)]
    return {"compared": len(pairs), "count": len(lost), "records": lost[:MAX_LISTED_REGRESSIONS]}


def compare_to_baseline(manifest: dict, baseline_ref: str, manifest_dir: Optional[Path] = None) -> dict:
    """Each validation and test metric of this run against the baseline run's: both values, delta, improved; and
    the test answers that regressed (answer_regressions; `manifest_dir` resolves this run's predictions path)."""
    path = _baseline_manifest_path(baseline_ref)
    if path is None:
        raise TrainerError("InvalidConfig", {"field": "--baseline", "value": baseline_ref,
                                             "expected": "a run_manifest.json or a run dir holding one",
                                             "suggestion": "point it at a finished run's directory"})
    base = json.loads(path.read_text())
    rows = []
    for keys, lower_better in COMPARED_METRICS.items():
        old, new = _manifest_value(base, keys), _manifest_value(manifest, keys)
        if not isinstance(old, (int, float)) or not isinstance(new, (int, float)):
            continue
        rows.append({"metric": keys[-1], "baseline": old, "current": new, "delta": new - old,
                     "improved": new < old if lower_better else new > old})
    diffs = baseline_differences(_run_facts(manifest), _run_facts(base))
    regressions = answer_regressions(manifest, manifest_dir, base, path.parent) if manifest_dir else None
    return {"baseline_run_id": base.get("run_id"), "baseline_manifest": str(path), "metrics": rows, **diffs,
            "answer_regressions": regressions}


BASELINE_IGNORED_KEYS = ("evaluation.baseline",)  # differs between a run and its baseline by construction
MEMORY_SCALING_KEYS = ("batch_size", "max_seq_length", "r", "num_gpus")  # more of these: more memory per device


def _dry_run_measured_bytes(manifest: dict) -> Optional[float]:
    """The memory a run's dry run measured for a full-length batch (its estimate x measured_over_estimated)."""
    est = (manifest.get("memory_estimate") or {}).get("total_bytes")
    ratio = (manifest.get("dry_run") or {}).get("measured_over_estimated")
    return round(est * ratio) if isinstance(est, (int, float)) and isinstance(ratio, (int, float)) else None


def _run_facts(manifest: dict) -> dict:
    """What a baseline comparison compares, read from a manifest."""
    ds = manifest.get("dataset") or {}
    gpu_peak = ((manifest.get("performance") or {}).get("peak_memory") or {}).get("gpu_peak_allocated_bytes")
    return {"config": manifest.get("config") or {},
            "data_files": (manifest.get("reproducibility") or {}).get("data_files") or {},
            "dataset": {"name": ds.get("name"), "version": ds.get("version")},
            "memory": {"estimated": (manifest.get("memory_estimate") or {}).get("total_bytes"),
                       "measured": _dry_run_measured_bytes(manifest),
                       "gpu_peak": max(gpu_peak) if gpu_peak else None}}


def _config_facts(config: TrainingConfig, res: ValidationResult) -> dict:
    """_run_facts of the run about to start, from its config and preflight (nothing measured yet)."""
    return {"config": config.to_dict(),
            "data_files": {s: {"path": i["path"], "sha256": _sha256_cached(Path(i["path"])), "samples": i["samples"]}
                           for s, i in res.data.items()},
            "dataset": {"name": config.data.dataset_name, "version": config.data.dataset_version},
            "memory": {"estimated": res.memory.get("total_bytes"), "measured": None, "gpu_peak": None}}


def _change_note(key: str, old: Any, new: Any) -> str:
    """`doubled, check memory`: the size of a numeric change, and what it risks."""
    nums = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (old, new))
    if not nums or not old:
        return ""
    ratio = new / old
    note = {2: "doubled", 0.5: "halved"}.get(ratio, f"x{ratio:.3g}")
    return note + (", check memory" if ratio > 1 and key.rsplit(".", 1)[-1] in MEMORY_SCALING_KEYS else "")


def baseline_differences(current: dict, base: dict) -> dict:
    """Config, data and memory of a run against its baseline's (both _run_facts): every changed config key with
    a note, a changed data file (sha256, record count) or dataset name/version, and the memory deltas."""
    old, new = _flatten(redact(base["config"])), _flatten(redact(current["config"]))
    config_diffs = []
    for key in sorted(set(old) & set(new)):  # a key one script version lacks is not a change the user made
        if key in BASELINE_IGNORED_KEYS or re.fullmatch(r"data\.(train|valid|test)_path", key) \
                or old[key] == new[key]:
            continue
        config_diffs.append({"key": key, "baseline": _jsonable(old[key]), "current": _jsonable(new[key]),
                             "note": _change_note(key, old[key], new[key])})
    data_diffs = []
    for split in ("train", "valid", "test"):
        o, n = base["data_files"].get(split) or {}, current["data_files"].get(split) or {}
        if o.get("sha256") and n.get("sha256") and o["sha256"] != n["sha256"]:
            data_diffs.append({
                "key": f"data.{split}_path", "baseline": o.get("path"), "current": n.get("path"),
                "baseline_sha256": o["sha256"], "current_sha256": n["sha256"],
                "baseline_samples": o.get("samples"), "current_samples": n.get("samples"),
                "note": f"{split} data changed: {o.get('samples')} -> {n.get('samples')} records"
                        + ("" if o.get("path") == n.get("path") else " (another file)")})
    for key in ("name", "version"):
        o, n = base["dataset"].get(key), current["dataset"].get(key)
        if o is not None and o != n:
            data_diffs.append({"key": f"data.dataset_{key}", "baseline": o, "current": n,
                               "note": f"dataset {key} changed"})
    memory = {}
    for kind in ("estimated", "measured"):
        o, n = base["memory"].get(kind), current["memory"].get(kind)
        memory[kind] = {"baseline_bytes": o, "current_bytes": n,
                        "delta_bytes": n - o if o is not None and n is not None else None}
    memory["baseline_gpu_peak_bytes"] = base["memory"].get("gpu_peak")
    return {"config_differences": config_diffs, "data_differences": data_diffs, "memory": memory}


def baseline_lines(diffs: dict, run_id: Any) -> list[str]:
    """One console line per difference from the baseline (spec Session 3: `batch_size 4 -> 8: doubled, check
    memory`); hyperparameters by their short name."""
    lines = []
    for d in diffs["config_differences"]:
        key = d["key"].removeprefix("training.hyperparameters.")
        lines.append(f"vs baseline {run_id}: {key} {d['baseline']} -> {d['current']}"
                     + (f": {d['note']}" if d["note"] else ""))
    for d in diffs["data_differences"]:
        sha = (f", sha256 {d['baseline_sha256'][:12]} -> {d['current_sha256'][:12]}"
               if "baseline_sha256" in d else "")
        lines.append(f"vs baseline {run_id}: {d['note']} ({d['key']} {d['baseline']} -> {d['current']}{sha}); "
                     "metric deltas compare different data")
    est = diffs["memory"]["estimated"]
    if est["delta_bytes"]:
        lines.append(f"vs baseline {run_id}: memory estimate {format_bytes(est['current_bytes'])}, "
                     f"{format_bytes(est['delta_bytes'], signed=True)} on the baseline's "
                     f"{format_bytes(est['baseline_bytes'])}")
    return lines


def format_comparison(cmp: dict) -> str:
    lines = [f"baseline comparison against {cmp['baseline_run_id']}:",
             f"{'metric':<26}{'baseline':>12}{'current':>12}{'delta':>12}  improved"]
    for r in cmp["metrics"]:
        lines.append(f"{r['metric']:<26}{r['baseline']:>12.4f}{r['current']:>12.4f}{r['delta']:>+12.4f}  "
                     f"{'yes' if r['improved'] else 'no'}")
    changed = [d["key"].removeprefix("training.hyperparameters.") for d in cmp.get("config_differences") or []]
    changed += [d["key"] for d in cmp.get("data_differences") or []]
    changed = list(dict.fromkeys(changed))  # data.dataset_version is a config key and a data difference
    if changed:
        lines.append(f"differences from the baseline: {', '.join(changed)}")
    reg = cmp.get("answer_regressions")
    if reg:
        lines.append(f"test answers right in the baseline and wrong now: {reg['count']} of {reg['compared']}"
                     + (" (manifest baseline_comparison.answer_regressions)" if reg["count"] else ""))
        for r in reg["records"][:REGRESSIONS_PRINTED]:
            lines.append(f"  #{r['index']}: reference {r['reference_numbers']}, baseline "
                         f"{r['baseline_prediction_numbers']}, now {r['prediction_numbers']}")
    return "\n".join(lines)


def plot_loss_curves(train_csv: Path, val_csv: Path, best_step: Optional[int], out: Path,
                     title: Optional[str] = None) -> Path:
    """loss_curves.png: train and validation loss against step, best checkpoint marked, titled with the run id
    and the best checkpoint so a copied PNG still says what it shows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def read(path: Path) -> tuple[list, list]:
        # a diverged step's "NaN" or "inf" is left out: an inf point would set the axis to nothing useful
        with path.open(newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r["value"] and math.isfinite(float(r["value"]))]
        return [int(r["step"]) for r in rows], [float(r["value"]) for r in rows]

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for path, label in ((train_csv, "train loss"), (val_csv, "validation loss")):
        steps, values = read(path)
        ax.plot(steps, values, marker="o" if label.startswith("val") else None, markersize=3, label=label)
    if best_step is not None:
        ax.axvline(best_step, color="green", linestyle="--", label=f"best checkpoint (step {best_step})")
    if title:
        ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean NLL per answer token)")
    ax.legend()
    ax.grid(alpha=0.3)
    try:
        with open_atomic(out, "wb") as fh:
            fig.savefig(fh, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return out


SERVING_TEMPLATE_KWARGS = "chat_template_kwargs.json"  # best/'s template variables, for the server's renders


def prepare_for_serving(d: Path, dtype: Optional[str] = None, chat_kwargs: Optional[dict] = None) -> list[str]:
    """Rewrite, as new files in `d` (never through a hard link), the settings that are right for training and wrong
    for inference; return the names rewritten. config.json: use_cache true (training turns the KV cache off), and
    `dtype` when the weights were written in it (archive_best). generation_config.json (made from config.json when
    missing): the cache on, pad/bos ids the tokenizer's where unset, and eos_token_id listing every end-of-turn token
    (end_of_turn_ids: SmolLM3's <|im_end|> beside EOS), so generation stops where training taught the model to.
    tokenizer_config.json: padding_side left, so a batch of prompts of different lengths generates what each prompt
    generates alone (right padding, right for training, puts pads between prompt and answer).
    chat_template_kwargs.json: the template variables the run trained with (data.chat_template_kwargs), for the
    server to pass to every apply_chat_template call."""
    from transformers import AutoTokenizer
    rewritten = []

    def rewrite(name: str, data: dict) -> None:
        path = d / name
        if path.is_file() and read_json_lenient(path) == data:
            return
        # a new file renamed in: where `path` is a hard link to the checkpoint's file, the link is replaced, not
        # the bytes behind it
        write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        rewritten.append(name)

    tok = AutoTokenizer.from_pretrained(str(d)) if (d / "config.json").is_file() else None
    if tok is not None:
        config = read_json_lenient(d / "config.json")
        rewrite("config.json", {**config, "use_cache": True, **({"dtype": dtype} if dtype else {}),
                                **({"torch_dtype": dtype} if dtype and "torch_dtype" in config else {})})
        gen = read_json_lenient(d / "generation_config.json") or {
            k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
        for key, value in (("pad_token_id", tok.pad_token_id), ("bos_token_id", tok.bos_token_id)):
            if gen.get(key) is None and value is not None:
                gen[key] = value
        given = gen.get("eos_token_id")
        eos = [] if given is None else list(given) if isinstance(given, list) else [given]
        eos += [t for t in end_of_turn_ids(tok) if t not in eos]
        if eos:
            gen["eos_token_id"] = eos if len(eos) > 1 or isinstance(given, list) else eos[0]
        rewrite("generation_config.json", {**gen, **({"use_cache": True} if "use_cache" in gen else {})})
    if (d / "tokenizer_config.json").is_file():
        rewrite("tokenizer_config.json", {**read_json_lenient(d / "tokenizer_config.json"), "padding_side": "left"})
    if tok is not None and getattr(tok, "chat_template", None):
        rewrite(SERVING_TEMPLATE_KWARGS, dict(chat_kwargs or {}))
    return rewritten


CARD_METRICS = (  # model-index metric type, its name there (the manifest's key), where the manifest holds it
    ("perplexity", "test_perplexity", ("test_results", "test_perplexity")),
    ("loss", "test_loss", ("test_results", "test_loss")),
    ("numeric_match", "numeric_match", ("test_results", "answer_eval", "numeric_match")),
    ("f1", "numeric_f1", ("test_results", "answer_eval", "numeric_f1")),
    ("exact_match", "exact_match", ("test_results", "answer_eval", "exact_match")),
)


def _card_number(value: Any, rate: bool = False) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.1%}" if rate else f"{value:.4g}"
    return "n/a" if value is None else str(value)


def _card_usage(manifest: dict) -> list[str]:
    """How to load the archive and prompt it as the run trained and evaluated it."""
    data = (manifest.get("config") or {}).get("data") or {}
    shape = ((manifest.get("dataset") or {}).get("format") or {}).get("test") or "messages"
    kwargs = data.get("chat_template_kwargs") or {}
    lines = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             'tokenizer = AutoTokenizer.from_pretrained("best")  # this folder; it pads on the left for batches',
             'model = AutoModelForCausalLM.from_pretrained("best")']
    if shape == "messages":
        lines += ['messages = [{"role": "user", "content": "How much VAT is payable on PHP 112,000.00, VAT '
                  'included?"}]',
                  "prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True"
                  + "".join(f", {k}={v!r}" for k, v in kwargs.items()) + ")"]
    elif shape == "instruction":
        lines += ['prompt = "### Instruction:\\nHow much VAT is payable on PHP 112,000.00, VAT included?\\n\\n'
                  '### Response:\\n"']
    else:
        lines += ['prompt = "How much VAT is payable on PHP 112,000.00, VAT included?"  # raw text, as trained']
    lines += ["inputs = tokenizer(prompt, return_tensors=\"pt\", add_special_tokens=False)",
              f"out = model.generate(**inputs, max_new_tokens="
              f"{(manifest.get('config') or {}).get('evaluation', {}).get('max_new_tokens', 128)}, do_sample=False)",
              "print(tokenizer.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))", "```"]
    if manifest.get("lora"):
        lines += ["", "This folder holds a LoRA adapter (peft, installed, loads it onto the base model named above); "
                  "with `model.lora.merge_at_end` the run also saved the merged model in `merged/` beside it."]
    if shape == "messages":
        lines.append("")
        lines.append("The chat template arguments used in training and evaluation: "
                     + (f"`{json.dumps(kwargs, sort_keys=True)}`." if kwargs else "none (the template's defaults)."))
    return lines


def model_card(manifest: dict, manifest_sha256: str) -> str:
    """best/README.md: a Hugging Face model card (huggingface_hub.ModelCard parses it) written from the manifest
    alone (as archive_best wrote it), so archiving the same manifest again gives the same card. Front matter: base_model, library_name,
    license (the base's, else `other`), tags (the run's plus finance), datasets, and a model-index whose metrics
    are the manifest's test values exactly; body: purpose, limitations, data, procedure, results, usage,
    framework versions, provenance."""
    import yaml
    ds, tr = manifest.get("dataset") or {}, manifest.get("test_results") or {}
    repro, hp, answers = manifest.get("reproducibility") or {}, manifest.get("hyperparameters") or {}, \
        tr.get("answer_eval") or {}
    tags = list(dict.fromkeys([*(manifest.get("tags") or []), "finance"]))
    metrics = [{"type": kind, "name": name, "value": _manifest_value(manifest, keys)}
               for kind, name, keys in CARD_METRICS if isinstance(_manifest_value(manifest, keys), (int, float))]
    front = {"base_model": manifest.get("base_model"), "library_name": "transformers",
             "license": repro.get("base_model_license") or "other", "pipeline_tag": "text-generation", "tags": tags,
             "datasets": [ds.get("name")], "dataset_version": ds.get("version"),
             "model-index": [{"name": manifest.get("run_id"), "results": [{
                 "task": {"type": "text-generation", "name": "Text Generation"},
                 "dataset": {"name": ds.get("name"), "type": ds.get("name"), "split": "test",
                             "revision": ds.get("version")},
                 "metrics": metrics}]}]}
    results = (manifest.get("training_results") or {})
    cost, hw = manifest.get("cost") or {}, repro.get("hardware") or {}
    gpus = f"{hw['gpu_count']} x {hw.get('gpu_model')}" if hw.get("gpu_count") else "CPU only"
    files = repro.get("data_files") or {}
    body = [
        f"# {manifest.get('run_id')}", "",
        f"`{manifest.get('base_model')}` fine-tuned to answer Philippine BIR tax and Odoo accounting questions "
        "(forms and deadlines, VAT, withholding, penalties, journal entries, reconciliation) for a shared "
        f"services center, on `{ds.get('name')}` version `{ds.get('version')}`.", "",
        "## Limitations", "",
        "- Not tax advice. Answers can be wrong or out of date; a qualified person checks anything filed or paid.",
        "- Amounts must be checked: of the test answers with amounts, "
        f"{_card_number(answers.get('numeric_match'), rate=True)} had every amount right (numeric_match; "
        f"numeric_f1 {_card_number(answers.get('numeric_f1'))}).",
        f"- Evaluation coverage: test loss on {ds.get('test_samples')} test records; generated answers scored on the "
        f"first {answers.get('records', 0)} ({answers.get('numeric_records', 0)} with amounts) of the same split, "
        "greedy decoding. Questions unlike the training data are not covered.", "",
        "## Training data", "", "| split | file | sha256 | records |", "|---|---|---|---|",
        *[f"| {split} | `{Path(str(i.get('path'))).name}` | `{i.get('sha256')}` | {i.get('samples')} |"
          for split, i in files.items()], "",
        f"Dataset `{ds.get('name')}`, version `{ds.get('version')}`, format "
        f"{', '.join(sorted(set((ds.get('format') or {}).values())))}.", "",
        "## Training procedure", "", "| hyperparameter | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in hp.items()], "",
        f"Hardware: {gpus} ({hw.get('cpu_model')}). "
        f"Training time: {_card_number(results.get('training_time_hours'))} h, {results.get('total_steps')} steps, "
        f"best checkpoint at step {results.get('best_step')}. Cost: {_card_number(cost.get('gpu_hours'))} GPU hours, "
        f"USD {_card_number(cost.get('cost_per_run_usd'))}.", "",
        "## Results (test split)", "", "| metric | value |", "|---|---|",
        *[f"| {m['name']} | {_card_number(m['value'])} |" for m in metrics], "",
        "numeric_match: every amount in the answer right, none missing, none extra (amounts rounded to centavos, "
        "form numbers counted); exact_match: the whole answer equal after collapsing whitespace.", "",
        "## How to use", "", *_card_usage(manifest), "",
        "## Framework versions", "", *[f"- {k}: {v}" for k, v in (repro.get("versions") or {}).items() if v], "",
        "## Provenance", "",
        f"- run id: `{manifest.get('run_id')}`",
        f"- manifest: `run_manifest.json` in this folder, sha256 `{manifest_sha256}`",
        f"- git commit: `{(repro.get('git') or {}).get('commit')}`, completed {manifest.get('completed_at')}", ""]
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(body)


def write_weights_as(src: Path, dst: Path, dtype: str) -> list[str]:
    """The safetensors weights of `src` written to `dst` as new files with every floating-point tensor in `dtype`
    (one file in memory at a time; the index's total_size follows). Returns the names written."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save
    target, written, total = getattr(torch, dtype), [], 0
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            metadata = fh.metadata() or {"format": "pt"}
            tensors = {}
            for key in fh.keys():
                t = fh.get_tensor(key)
                tensors[key] = t.to(target) if t.is_floating_point() else t
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        write_atomic(dst / f.name, save(tensors, metadata=metadata))  # the one atomic writer (disk-full hook too)
        written.append(f.name)
        del tensors
    for index in sorted(src.glob("*.safetensors.index.json")):
        data = read_json_lenient(index)
        data["metadata"] = {**(data.get("metadata") or {}), "total_size": total}
        write_atomic(dst / index.name, json.dumps(data, indent=2) + "\n")
        written.append(index.name)
    return written


def archive_best(run_dir: Path, best_checkpoint: str, manifest: dict) -> Path:
    """`<run_dir>/best`: what inference needs from the best checkpoint, ready to serve as it is (the inference team
    loads the dir with plain from_pretrained): full weights in the base checkpoint's stored dtype (the manifest's
    precision.best_dtype: a bf16 base gives bf16 weights, what serving expects, half the fp32 checkpoint's size;
    written as new files, the checkpoint keeps its exact fp32 weights for resume), prepare_for_serving's settings,
    files 0644 and dirs 0755 (a service user must read them; safetensors writes its weights 0600), the manifest, its
    model card README.md (model_card), and SHA256SUMS of every other file. Unchanged files are hard links where the
    filesystem allows (no second copy; a link shares the checkpoint file's inode, so that file becomes 0644 too, its
    bytes untouched); rewritten ones are new files, so the checkpoint's own files keep the sha256 its
    checkpoint_meta.json records (check_checkpoint_integrity), and best/'s copy of checkpoint_meta.json records
    best/'s. Built under a temporary name, then renamed."""
    src, final = Path(best_checkpoint), run_dir / "best"
    precision = manifest.get("precision") or {}
    dtype = precision.get("best_dtype")
    convert = dtype in ("bfloat16", "float16") and not (src / "adapter_config.json").is_file()
    with build_dir_atomic(final) as tmp:
        for pattern in INFERENCE_FILES:
            for f in sorted(src.glob(pattern)):
                if convert and f.name.endswith((".safetensors", ".safetensors.index.json")):
                    continue
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
        rewritten = write_weights_as(src, tmp, dtype) if convert else []
        rewritten += prepare_for_serving(tmp, dtype if convert else None,
                                         (manifest.get("chat_template") or {}).get("kwargs"))
        if rewritten and (tmp / CHECKPOINT_META).is_file():
            meta = read_json_lenient(tmp / CHECKPOINT_META)
            meta["checksums"] = {**(meta.get("checksums") or {}), **{n: _sha256(tmp / n) for n in rewritten}}
            meta["rewritten_for_serving"] = rewritten
            if convert:
                meta["weights_dtype"] = dtype
            write_json_atomic(tmp / CHECKPOINT_META, meta)  # a new file (rename), never a write through the link
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
        # the card from the manifest as written (redacted, strict JSON), so re-reading it gives the same card
        write_atomic(tmp / "README.md", model_card(json.loads((tmp / MANIFEST_NAME).read_text()),
                                                   _sha256(tmp / MANIFEST_NAME)))
        write_atomic(tmp / "SOURCE", f"{src.name}\n")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        write_atomic(tmp / "SHA256SUMS",
                     "".join(f"{_sha256_cached(p)}  {p.relative_to(tmp).as_posix()}\n" for p in files))
        for p in [tmp, *tmp.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return final


def hourly_price(cost: CostConfig, gpu_count: int, gpus_per_node: Optional[int] = None) -> tuple[float, str]:
    """USD per hour of `gpu_count` GPUs and which price that is: whole nodes of `gpus_per_node` GPUs
    (compute.num_gpus) at cost.node_hourly_usd when it is set (providers list multi-GPU nodes at their own
    price, usually below N x the 1-GPU price), else cost.gpu_hourly_usd per GPU. No GPU: nothing."""
    if gpu_count <= 0:
        return 0.0, "none (no GPU in use)"
    if cost.node_hourly_usd is not None:
        per_node = max(1, gpus_per_node or gpu_count)
        nodes = math.ceil(gpu_count / per_node)
        return nodes * cost.node_hourly_usd, f"cost.node_hourly_usd x {nodes} node(s) of {per_node} GPUs"
    return gpu_count * cost.gpu_hourly_usd, f"cost.gpu_hourly_usd x {gpu_count} GPUs"


def compute_cost(wall_seconds: float, gpu_count: int, checkpoints_saved: int, tokens: int,
                 cost: CostConfig, gpus_per_node: Optional[int] = None) -> dict:
    """GPU hours, cost per run and per checkpoint, and the spec's ROI line against an API price.
    Every input is recorded next to the result, with the hourly price used and its basis (hourly_price)."""
    gpu_hours = wall_seconds / 3600 * gpu_count
    hourly_usd, price_basis = hourly_price(cost, gpu_count, gpus_per_node)
    run_cost = wall_seconds / 3600 * hourly_usd
    api_cost = tokens / 1e6 * cost.api_usd_per_million_tokens
    per_token = cost.api_usd_per_million_tokens / 1e6
    return {
        "inputs": {"wall_seconds": round(wall_seconds, 3), "gpu_count": gpu_count,
                   "gpu_hourly_usd": cost.gpu_hourly_usd, "gpu_price_source": cost.gpu_price_source,
                   "node_hourly_usd": cost.node_hourly_usd, "hourly_usd": hourly_usd, "price_basis": price_basis,
                   "checkpoints_saved": checkpoints_saved, "tokens": tokens, "api_name": cost.api_name,
                   "api_usd_per_million_tokens": cost.api_usd_per_million_tokens},
        "gpu_hours": round(gpu_hours, 6),
        "cost_per_run_usd": round(run_cost, 4),
        "cost_per_checkpoint_usd": round(run_cost / checkpoints_saved, 4) if checkpoints_saved else None,
        "api_cost_same_tokens_usd": round(api_cost, 4),
        # rounded before ceil: 1.1 / 0.5e-6 is 2200000.0000000005 in floating point, not a token more
        "break_even_tokens": math.ceil(round(run_cost / per_token, 6)) if per_token > 0 else None,
        "roi_note": ("the run costs as much as sending break_even_tokens tokens through the API once; the "
                     "fine-tuned model is cheaper than the API beyond that volume (serving cost not included)"),
    }


def sample_completions(ctx: RunContext, model, tokenizer) -> list[dict]:
    """Greedy completions of the first evaluation.num_samples test prompts (their seconds: performance)."""
    ev = ctx.config.evaluation
    t0 = time.perf_counter()
    records = _read_jsonl(data_path(ctx.config, "test_path"), ev.num_samples)
    samples = generate_samples(model, tokenizer, records, ctx.validation.data["test"]["shape"], ev.max_new_tokens,
                               ctx.config, desc="samples")
    if ctx.performance is not None:
        ctx.performance["samples_seconds"] = round(time.perf_counter() - t0, 3)
    return samples


PREDICTIONS_NAME = "test_predictions.jsonl"  # in the run dir: answer evaluation's record of every scored answer


def answer_eval_on_test(ctx: RunContext, model, tokenizer) -> None:
    """evaluation.answer_eval after training, on the weights the test loss was measured on: the first max_records
    test records answered and scored (answer_evaluation), test_predictions.jsonl in the run dir, the summary as
    test_results.answer_eval and its seconds as performance.answer_eval_seconds."""
    ev = ctx.config.evaluation
    t0 = time.perf_counter()
    records = _read_jsonl(data_path(ctx.config, "test_path"), ev.answer_eval.max_records)
    summary, rows = answer_evaluation(model, tokenizer, records, ctx.validation.data["test"]["shape"],
                                      ev.max_new_tokens, ctx.config, desc="answer evaluation (test)")
    if is_main_process():
        write_predictions(ctx.run_dir / PREDICTIONS_NAME, rows)
    ctx.test_results["answer_eval"] = {**summary, "predictions": PREDICTIONS_NAME}
    ctx.performance["answer_eval_seconds"] = round(time.perf_counter() - t0, 3)
    log.info("answer evaluation: %d test records, numeric_match %s on the %d with amounts, numeric_f1 %s, "
             "exact_match %s (%s)", summary["records"], format_value("numeric_match", summary["numeric_match"]),
             summary["numeric_records"], format_value("numeric_f1", summary["numeric_f1"]),
             format_value("exact_match", summary["exact_match"]), PREDICTIONS_NAME)


def analyse_run(ctx: RunContext, model, tokenizer, samples: Optional[list] = None) -> None:
    """Spec Phase 4 after a completed run: sample completions (`samples` when every rank generated them already,
    under multi-GPU FSDP), loss plot (baseline comparison and the best archive follow once the final manifest
    exists)."""
    ev = ctx.config.evaluation
    if ev.num_samples:
        samples = samples if samples is not None else sample_completions(ctx, model, tokenizer)
        path = ctx.run_dir / "samples.jsonl"
        write_atomic(path, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in samples))
        ctx.samples = {"path": str(path), "count": len(samples), "greedy": True,
                       "max_new_tokens": ev.max_new_tokens,
                       "exact_match_rate": sum(x["exact_match"] for x in samples) / len(samples),
                       "first": samples[0] if samples else None}
        log.info("sample completion: %r -> %r", samples[0]["prompt"][-80:], samples[0]["generated"][:120])
    png = ctx.tracker.log_dir / "loss_curves.png"
    best_step = next((c["step"] for c in read_checkpoints(ctx.run_dir) if c["path"] == ctx.best_checkpoint), None)
    title = f"{ctx.run_id}: best " + (f"{Path(ctx.best_checkpoint).name} (step {best_step})" if ctx.best_checkpoint
                                      else "checkpoint: none")
    try:
        injected_oom("plot")
        ctx.loss_plot = str(plot_loss_curves(ctx.tracker.train_curve, ctx.tracker.val_curve, best_step, png, title))
    except Exception as exc:  # a full disk is the run's failure; anything else costs the plot only
        if is_disk_full(exc):
            raise
        ctx.validation.warnings.append(f"loss_curves.png skipped ({type(exc).__name__}: {str(exc)[:300]}); the run's "
                                       "results are kept")
        log.warning(ctx.validation.warnings[-1])


def merge_adapter(config: TrainingConfig, adapter_dir: Path, out: Path) -> Path:
    """Merge a LoRA adapter into a fresh copy of the base weights (never into quantized weights) and save a
    plain checkpoint, loadable by AutoModelForCausalLM.from_pretrained without peft. The merge is done in fp32 (the
    adapter's update is added to exact fp32 copies of the base weights), then the result is saved in the base's
    stored dtype (bf16 for SmolLM3: what serving expects), rounded once."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    stored = AutoConfig.from_pretrained(checkpoint_ref(config)).dtype
    base = AutoModelForCausalLM.from_pretrained(checkpoint_ref(config), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    if stored in (torch.bfloat16, torch.float16):
        merged = merged.to(stored)
    with build_dir_atomic(out) as tmp:
        merged.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(tmp))
        write_json_atomic(tmp / "merge_info.json", {
            "adapter": str(adapter_dir), "base_model": config.model.base_checkpoint,
            "base_config_sha256": base_config_sha256(config), "created_at": utc_now()})
    log.info("merged %s into the base weights: %s", adapter_dir.name, out)
    return out


# Dense bf16/fp16 tensor-core peak FLOP/s per GPU (vendor datasheets, SXM parts); MFU is reported only for these.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def model_flops_utilization(ctx: RunContext, tokens_per_second: Optional[float],
                            trainable: Optional[int] = None) -> Optional[dict]:
    """MFU = achieved model FLOP/s / peak. Training FLOPs per token: forward 2 x params, backward 2 x params for
    the input gradients plus 2 x params for the weight gradients of trainable weights only, so 6 x trainable +
    4 x frozen (LoRA: the frozen base skips its weight-gradient matmuls); plus attention, 12 x layers x hidden x
    the length of the record a token attends over (token-weighted from the real train lengths: packed rows keep
    records apart, padding does no model work), not max_seq_length."""
    hw = ctx.reproducibility.get("hardware") or {}
    gpu = hw.get("gpu_model") or ""
    peak = next((v for k, v in PEAK_FLOPS.items() if k in gpu.upper().replace(" ", "")), None)
    if not (peak and tokens_per_second and ctx.validation.memory):
        return None
    ck, params = ctx.validation.checkpoint, ctx.validation.memory["parameters"]
    if ctx.config.model.lora.enabled:  # base frozen, adapters trained
        frozen = params
        trainable = trainable if trainable is not None else ctx.validation.memory.get("trainable_parameters") or 0
    else:
        frozen, trainable = 0, params
    attended = (ctx.data_stats.get("train") or {}).get("attended_length") or ctx.config.data.max_seq_length
    per_token = 6 * trainable + 4 * frozen + 12 * ck.get("num_hidden_layers", 0) * ck.get("hidden_size", 0) * attended
    gpus = max(1, world_size(ctx.config))
    return {"value": round(tokens_per_second * per_token / (peak * gpus), 4), "peak_flops_per_gpu": peak,
            "gpu": gpu, "gpus": gpus, "flops_per_token": per_token, "trainable_parameters": trainable,
            "frozen_parameters": frozen, "attended_length": attended}


def performance_block(ctx: RunContext, trainable: Optional[int] = None) -> dict:
    """Throughput on real (non-padding) tokens, per-epoch wall time, peak memory, GPU utilisation.
    tokens_per_second is training throughput: tokens over the time spent inside optimizer steps; evaluations and
    checkpoint saves during train() are timed apart (eval_seconds, save_seconds) and left out.
    wall_tokens_per_second divides by train_runtime (Trainer's wall time of train(), all of it)."""
    h = ctx.history
    runtime = h.summary.get("train_runtime")
    tokens = (ctx.tokens_seen or 0) - h.start_tokens
    tps = tokens / h.training_seconds if h.training_seconds else None
    wall = tokens / runtime if runtime else None
    return {"train_runtime_seconds": runtime, "tokens_trained_this_process": tokens,
            "tokens_per_second": round(tps, 2) if tps else None,
            "wall_tokens_per_second": round(wall, 2) if wall else None,
            "training_seconds": round(h.training_seconds, 6), "eval_seconds": round(h.eval_seconds, 6),
            "save_seconds": round(h.save_seconds, 6),
            "mfu": model_flops_utilization(ctx, tps, trainable),
            "samples_per_second": h.summary.get("train_samples_per_second"),
            "epoch_wall_seconds": h.epoch_seconds, "peak_memory": peak_memory(),
            "gpu_utilization_percent_mean": round(sum(h.gpu_utilization) / len(h.gpu_utilization), 1)
            if h.gpu_utilization else None,
            # answer_eval.on_validation: what scoring answers added to each evaluation (inside eval_seconds)
            "val_answer_evals": len(h.val_answer_eval_seconds),
            "val_answer_eval_seconds_per_eval": round(sum(h.val_answer_eval_seconds)
                                                      / len(h.val_answer_eval_seconds), 3)
            if h.val_answer_eval_seconds else None}


def post_training_analysis(ctx: RunContext, trainer, tokenizer, datasets_: dict) -> None:
    """Spec Phase 4, after a completed training: the test evaluation of the weights `fit` left in the model (the best
    checkpoint's), performance, the LoRA block, sample completions and the loss plot (analyse_run), the merged
    adapter, the baseline comparison, and the console's before/after line. The final manifest and the `best/`
    archive follow (finalize_manifest)."""
    config = ctx.config
    injected_signal("analysis")
    if _any_rank(bool(_preempt), trainer.model):  # collective: every rank skips the (collective) evaluation alike
        ctx.performance = performance_block(ctx, parameter_counts(trainer.model)["trainable"])
        skip_analysis(ctx, ["test evaluation", "samples", "loss plot", "merged adapter", "baseline comparison"])
        return
    t0 = time.perf_counter()
    test = trainer.evaluate(datasets_["test"], metric_key_prefix="test")
    test_seconds = time.perf_counter() - t0
    # the weights in memory: the best checkpoint's fp32 master copy (best/ holds them in the base's stored dtype)
    weights_dtype = str(trainer.model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    ctx.test_results = {"evaluated": ctx.evaluated, "evaluated_dtype": weights_dtype,
                        **{k: _json_float(v) for k, v in test.items()
                           if k.startswith("test_") and not k.endswith(NOISE_SUFFIXES)}}
    ctx.performance = performance_block(ctx, parameter_counts(trainer.model)["trainable"])
    ctx.performance["test_eval_seconds"] = round(test_seconds, 3)
    if config.model.lora.enabled:
        ctx.lora = {**dataclasses.asdict(config.model.lora), **parameter_counts(trainer.model),
                    "target_modules": sorted(trainer.model.peft_config["default"].target_modules),
                    "adapter_checkpoint": ctx.best_checkpoint, "merged_checkpoint": None}
    samples = None
    # a sharded model runs a forward only with every rank taking part (generate keeps the ranks in step:
    # synced_gpus); rank 0 alone would wait forever on the first all-gather
    every_rank = getattr(trainer, "is_fsdp_enabled", False) and world_size(config) > 1
    if config.evaluation.answer_eval.max_records and (every_rank or is_main_process()):
        answer_eval_on_test(ctx, trainer.model, tokenizer)
    if every_rank and config.evaluation.num_samples:
        samples = sample_completions(ctx, trainer.model, tokenizer)
    if is_main_process() and not (_preempt and skip_analysis(ctx, ["samples", "loss plot", "merged adapter",
                                                                    "baseline comparison"])):
        analyse_run(ctx, trainer.model, tokenizer, samples)
        _log_test_metrics(ctx)
        if config.model.lora.enabled and config.model.lora.merge_at_end:
            source = ctx.best_checkpoint or (read_checkpoints(ctx.run_dir) or [{}])[-1].get("path")
            if source:
                ctx.lora["merged_checkpoint"] = str(merge_adapter(config, Path(source), ctx.run_dir / "merged"))
        ref = baseline_reference(config)
        try:
            if ref:
                ctx.baseline_comparison = {**compare_to_baseline(build_manifest(ctx, "completed"), ref, ctx.run_dir),
                                           "chosen": "evaluation.baseline" if config.evaluation.baseline else
                                           f"automatic: the most recent completed run of {config.data.dataset_name} "
                                           f"in {config.auto_baseline['found_in']}"}
                log.info(format_comparison(ctx.baseline_comparison))
        except TrainerError as exc:
            if config.evaluation.baseline:  # asked for by name: its loss is the user's to fix
                raise
            log.warning("no baseline comparison: the automatically chosen run %s is gone (%s)", ref,
                        exc.details.get("suggestion"))
    _report_before_after(ctx)


def _log_test_metrics(ctx: RunContext) -> None:
    """The answer evaluation's metrics beside the test perplexity through log_metrics (console, train.log,
    TensorBoard, W&B, MLflow as test/numeric_match, ...; the test evaluation logged its own line before), and
    what answer evaluation cost against the test loss and the samples
    (performance.answer_eval_over_test_eval_and_samples)."""
    test, perf = ctx.test_results or {}, ctx.performance or {}
    answers = test.get("answer_eval") or {}
    metrics = {"test_perplexity": test["test_perplexity"]} if isinstance(test.get("test_perplexity"), float) else {}
    metrics.update({f"test_{k}": answers[k] for k in ("numeric_match", "numeric_f1") if answers.get(k) is not None})
    if answers.get("exact_match") is not None:
        metrics["test_answer_exact_match"] = answers["exact_match"]
    if metrics:
        log_metrics(ctx.tracker, ctx.global_step, metrics)
    base = (perf.get("test_eval_seconds") or 0) + (perf.get("samples_seconds") or 0)
    if perf.get("answer_eval_seconds") is not None and base > 0:
        perf["answer_eval_over_test_eval_and_samples"] = round(perf["answer_eval_seconds"] / base, 3)


def skip_analysis(ctx: RunContext, what: list[str]) -> bool:
    """A signal arrived after training: the rest of the analysis (`what`) is skipped so the final record, and
    `best/`, are written while the platform's grace period lasts. The run is complete (its checkpoints are), so
    it still ends `completed`; the manifest's `analysis_skipped` and warnings say what is missing and why."""
    ctx.analysis_skipped = {"signal": _preempt.get("signal", "signal on another rank"), "skipped": what}
    ctx.validation.warnings.append(f"{ctx.analysis_skipped['signal']} after training: skipped {', '.join(what)}")
    log.warning(ctx.validation.warnings[-1])
    return True


def _report_before_after(ctx: RunContext) -> None:
    if not ctx.history.evals:
        return
    first, last = ctx.history.evals[0], ctx.history.evals[-1]
    answers = (ctx.test_results or {}).get("answer_eval") or {}
    log.info("validation perplexity: %.3f at step %d -> %.3f at step %d; test perplexity %.3f%s (%s)",
             first[2].get("val_perplexity", float("nan")), first[0], last[2].get("val_perplexity", float("nan")),
             last[0], (ctx.test_results or {}).get("test_perplexity", float("nan")),
             f", numeric_match {format_value('numeric_match', answers.get('numeric_match'))} on "
             f"{answers.get('numeric_records')} test answers with amounts" if answers else "",
             ctx.test_results.get("evaluated") if ctx.test_results else "-")


# --------------------------------------------------------------------------------------------------
# 17. Manifest: the run record, written atomically at start (status running) and at the end
# --------------------------------------------------------------------------------------------------

def portable_path(path: Any, run_dir: Path, given_absolute: bool = False) -> Any:
    """How the manifest stores a path: relative to the manifest's own directory (the run dir), so a run dir that is
    copied or moved to another machine still names its checkpoints. A path outside the run dir (the CSV curves under
    logging_dir) is stored relative to it as well (`../../logs/RUN/train_loss.csv`), unless the user configured that
    directory as an absolute path, which is kept. None and relative paths pass through."""
    if not path or not Path(path).is_absolute():
        return path
    p, base = Path(path), Path(run_dir)
    if p == base or base in p.parents:
        return p.relative_to(base).as_posix() or "."
    return str(p) if given_absolute else os.path.relpath(p, base)


def resolve_manifest_path(value: Any, manifest_dir: Path) -> Any:
    """A path read from a manifest, usable here: a relative one is relative to the manifest's directory (absolute
    paths, from older manifests or configured as such, are used as they are)."""
    if not isinstance(value, str) or not value:
        return value
    p = Path(value).expanduser()
    return str(p) if p.is_absolute() else os.path.normpath(Path(manifest_dir) / p)


def _portable_manifest(manifest: dict, run_dir: Path, config: TrainingConfig) -> dict:
    """build_manifest's paths made portable_path's: checkpoints, curves, logs, samples, reports, resume points.
    Dicts the run context still holds are replaced, never edited in place."""
    lg = config.logging
    logs_abs = Path(lg.logging_dir).expanduser().is_absolute()
    ck, m = manifest["checkpoints"], manifest["metrics"]
    for key in ("best_checkpoint", "final_checkpoint", "best_archive"):
        ck[key] = portable_path(ck[key], run_dir)
    for key in ("train_loss_curve", "val_loss_curve", "train_log", "loss_curves_plot"):
        m[key] = portable_path(m[key], run_dir, logs_abs)
    m["tensorboard_logs"] = portable_path(m["tensorboard_logs"], run_dir,
                                          Path(lg.tensorboard.log_dir).expanduser().is_absolute())
    m["wandb_dir"] = portable_path(m["wandb_dir"], run_dir)
    for block, key in (("samples", "path"), ("dry_run", "report"), ("lora", "adapter_checkpoint"),
                       ("lora", "merged_checkpoint"), ("resume_from", "path")):
        if isinstance(manifest.get(block), dict) and manifest[block].get(key):
            manifest[block] = {**manifest[block], key: portable_path(manifest[block][key], run_dir, True)}
    manifest["resumes"] = [{**r, "path": portable_path(r.get("path"), run_dir, True)} if isinstance(r, dict) else r
                           for r in manifest.get("resumes") or []]
    if isinstance(manifest.get("baseline_comparison"), dict):  # another run's: relative to this run dir too
        cmp = manifest["baseline_comparison"]
        manifest["baseline_comparison"] = {**cmp, "baseline_manifest": portable_path(cmp.get("baseline_manifest"),
                                                                                     run_dir)}
    if isinstance(manifest.get("error"), dict):  # the stderr payload keeps absolute paths, to paste into a shell
        manifest["error"] = _portable_error(manifest["error"], run_dir)
    return manifest


def _portable_error(payload: dict, run_dir: Path) -> dict:
    """An error payload as the manifest stores it: details.last_valid_checkpoint relative to the run dir (the spec's
    `"last_valid_checkpoint": "checkpoint-epoch-1"`), in the top object and in `errors`."""
    def details(d: Any) -> Any:
        if isinstance(d, dict) and d.get("last_valid_checkpoint"):
            return {**d, "last_valid_checkpoint": portable_path(d["last_valid_checkpoint"], run_dir)}
        return d
    out = {**payload, "details": details(payload.get("details"))}
    if isinstance(payload.get("errors"), list):
        out["errors"] = [{**e, "details": details(e.get("details"))} if isinstance(e, dict) else e
                         for e in payload["errors"]]
    return out


def save_manifest(run_id: str, manifest: dict, output_path: str) -> str:
    """Write the manifest for `run_id` atomically to `output_path` (a file, or a run dir)."""
    path = Path(output_path)
    if path.is_dir() or not path.suffix:
        path = path / MANIFEST_NAME
    if manifest.get("run_id") not in (None, run_id):
        raise ValueError(f"manifest run_id {manifest.get('run_id')!r} does not match {run_id!r}")
    write_json_atomic(path, {"run_id": run_id, **manifest})
    return str(path)


def _git_info(config_path: Optional[str] = None) -> dict:
    """The training code's commit and whether the working tree differs from it; `config_file` says whether the
    config used is committed, modified, untracked (either counts as dirty) or outside the repository."""
    import subprocess
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        info = {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
        if config_path:  # the config is part of what ran: an untracked or edited config inside the repo makes it dirty
            cfg = Path(config_path).resolve()
            if here == cfg.parent or here in cfg.parents:
                state = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=all",
                                        "--ignored", "--", str(cfg)], capture_output=True, text=True,
                                       timeout=10).stdout.strip()
                info["config_file"] = {"??": "untracked", "!!": "ignored"}.get(state[:2], "modified" if state
                                                                               else "committed")
                info["dirty"] = info["dirty"] or bool(state)
            else:  # its text and sha256 are in the manifest all the same
                info["config_file"] = "outside the repository"
        return info
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _hardware() -> dict:
    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        ram_gb = None
    hw = {"cpu_model": cpu, "cpu_cores": os.cpu_count(), "ram_gb": ram_gb, "platform": platform.platform(),
          "gpu_model": None, "gpu_count": 0, "cuda_version": None, "gpu_driver": None}
    try:
        import torch
        hw["cpu_threads"] = torch.get_num_threads()  # choose_cpu_threads; a resume reuses it
        if torch.cuda.is_available():
            hw.update(gpu_model=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                      cuda_version=torch.version.cuda)
            try:
                import subprocess
                out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=10)
                hw["gpu_driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
            except (OSError, IndexError, Exception):
                pass
    except ImportError:
        pass
    return hw


def _versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "datasets", "accelerate", "numpy", "tokenizers", "safetensors", "wandb",
                "tensorboard"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _card_front_matter(text: str) -> dict:
    """The YAML block between the leading `---` lines of a model card ({} when there is none)."""
    import yaml
    m = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    try:
        data = yaml.safe_load(m.group(1)) if m else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_model_license(config: TrainingConfig) -> Optional[str]:
    """The base model's license as its model card (README.md front matter) or config.json states it, read from
    the local dir or the Hub cache (never downloaded); None when neither says. best/README.md's `license`."""
    ref = checkpoint_ref(config)
    for name in ("README.md", "config.json"):
        path = Path(ref) / name if Path(ref).is_dir() else _hub_cached_file(ref, name)
        if not path or not Path(path).is_file():
            continue
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        found = _card_front_matter(text).get("license") if name == "README.md" else \
            read_json_lenient(Path(path)).get("license")
        if isinstance(found, str) and found.strip():
            return found.strip()
    return None


def reproducibility_block(config: TrainingConfig, validation: ValidationResult, argv: list[str]) -> dict:
    return {
        "seed": config.training.seed,
        "git": _git_info(config.config_path),
        "config_path": config.config_path,
        "config_sha256": hashlib.sha256((config.config_text or "").encode()).hexdigest(),
        "config_text": config.config_text,
        "config_overrides": config.overrides,
        "resolved_config": config.to_dict(),
        "resolved_paths": config.resolved_paths,
        "data_files": {split: {"path": info["path"], "sha256": _sha256_cached(Path(info["path"])),
                               "samples": info["samples"], "shape": info["shape"]}
                       for split, info in validation.data.items()},
        "hardware": _hardware(),
        "versions": _versions(),
        # the command as typed: interpreter, script (sys.argv[0], as the shell passed it; the caller's own script
        # when train_model is imported), arguments
        "command_line": [sys.executable, *sys.argv[:1]] + list(argv),
        "working_directory": os.getcwd(),  # where the command's relative paths resolve (resume_command cds here)
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE"),
        "base_model_license": base_model_license(config),
    }


def _best_epoch(epoch: Optional[float]) -> Optional[int]:
    """The (1-based) epoch a checkpoint was saved in: 2.0 -> 2, 1.5 -> 2."""
    return None if epoch is None else max(1, math.ceil(epoch - 1e-9))


def _dataset_block(ctx: "RunContext") -> dict:
    """The manifest's `dataset`: the spec's name, version and sample counts, then what the data phase measured."""
    config, stats = ctx.config, ctx.data_stats
    return {
        "name": config.data.dataset_name, "version": config.data.dataset_version,
        "train_samples": stats.get("train", {}).get("samples"),
        "valid_samples": stats.get("valid", {}).get("samples"),
        "test_samples": stats.get("test", {}).get("samples"),
        "format": {s: i.get("shape") for s, i in ctx.validation.data.items()},
        "paths": {s: i["path"] for s, i in ctx.validation.data.items()},
        "truncated_records": {s: v["truncated"] for s, v in stats.items()},
        "dropped_records": {s: v["dropped_no_answer_tokens"] for s, v in stats.items()},
        "truncation": {s: v.get("truncation") for s, v in stats.items()},
        "truncation_side": config.data.truncation_side,
        "tokens": {s: v["tokens"] for s, v in stats.items()},
        "max_seq_length": config.data.max_seq_length, "train_on_prompt": config.data.train_on_prompt,
        "packing": ({"rows": stats["train"].get("packed_rows"), "fill": stats["train"].get("packing_fill")}
                    if config.data.packing and "train" in stats else None),
    }


def build_manifest(ctx: "RunContext", status: str) -> dict:
    config, hp = ctx.config, ctx.config.training.hyperparameters
    ckpts = read_checkpoints(ctx.run_dir, verify=True) if ctx.run_dir.is_dir() else []
    healthy = [c for c in ckpts if c.get("health") == "ok"]
    best = next((c for c in ckpts if c["path"] == ctx.best_checkpoint), None)
    last_train = ctx.history.train[-1] if ctx.history.train else None
    last_eval = ctx.history.evals[-1][2] if ctx.history.evals else {}
    first_eval = ctx.history.evals[0] if ctx.history.evals and ctx.history.evals[0][0] == 0 else None
    elapsed = ctx.prior_seconds + (ctx.end_time or time.time()) - ctx.start_time  # all processes of the run
    stats = ctx.data_stats
    manifest = {
        "run_id": ctx.run_id,
        "status": status,
        "base_model": config.model.base_checkpoint,
        "base_identity": base_identity(config),
        "dataset": _dataset_block(ctx),
        "data_integrity": ({**ctx.validation.integrity, "dedup": config.data.dedup,
                            "dropped": {s: v.get("dedup_dropped", 0) for s, v in stats.items()}}
                           if ctx.validation.integrity else None),
        "chat_template": chat_template_record(config),
        "hyperparameters": {
            "learning_rate": hp.learning_rate, "batch_size": hp.batch_size,
            "gradient_accumulation_steps": hp.gradient_accumulation_steps, "num_epochs": hp.num_epochs,
            "max_seq_length": config.data.max_seq_length, "warmup_steps": hp.warmup_steps,
            "weight_decay": hp.weight_decay, "max_grad_norm": hp.max_grad_norm,
            "optimizer": config.training.optimization.optimizer,
            "optimizer_implementation": ctx.optimizer_implementation or optimizer_implementation(config),
            "lr_scheduler": config.training.optimization.lr_scheduler,
            "mixed_precision": config.compute.mixed_precision, "seed": config.training.seed,
            "world_size": world_size(config),
            "effective_batch_size": hp.batch_size * hp.gradient_accumulation_steps * world_size(config),
        },
        "precision": ctx.precision or precision_facts(config, ctx.validation.checkpoint or {}),
        "training_results": {
            "final_train_loss": _json_float(last_train[2]) if last_train else None,
            "final_val_loss": _json_float(last_eval.get("val_loss")),
            "final_val_perplexity": _json_float(last_eval.get("val_perplexity")),
            "final_val_token_accuracy": _json_float(last_eval.get("val_token_accuracy")),
            "initial_val_loss": _json_float(first_eval[2].get("val_loss")) if first_eval else None,
            "initial_val_perplexity": _json_float(first_eval[2].get("val_perplexity")) if first_eval else None,
            "best_epoch": _best_epoch(best["epoch"]) if best else None,
            "best_step": best["step"] if best else None,
            "best_metric": ({"name": config.training.checkpointing.metric_for_best_model,
                             "value": (best.get("metrics") or {}).get(config.training.checkpointing.metric_for_best_model)}
                            if best else None),
            "total_steps": ctx.global_step,
            "max_steps": ctx.max_steps,
            "epochs_completed": ctx.epoch,
            "training_time_hours": round(elapsed / 3600, 6),
            "early_stopped": ctx.history.early_stopped is not None,
            "early_stopping": ctx.history.early_stopped,
        },
        "test_results": ctx.test_results,
        "samples": ctx.samples,
        "baseline_comparison": ctx.baseline_comparison,
        "anomalies": ctx.history.anomalies,
        "performance": ctx.performance,
        "cost": compute_cost(elapsed, world_size(config) if config.compute.device == "cuda" else 0,
                             ctx.history.checkpoints_saved, ctx.tokens_seen or 0, config.cost,
                             gpus_per_node=config.compute.num_gpus),
        "memory_estimate": ctx.validation.memory,
        "dry_run": ctx.dry_run,
        "lora": ctx.lora,
        "distributed": ctx.distributed,
        "checkpoints": {
            "best_checkpoint": ctx.best_checkpoint,
            "final_checkpoint": healthy[-1]["path"] if healthy else None,
            "best_archive": ctx.best_archive,
            "best_archive_dtype": (ctx.precision or {}).get("best_dtype") if ctx.best_archive else None,
            "all_checkpoints": [c["name"] for c in ckpts],
            "details": [{k: c.get(k) for k in ("name", "step", "epoch", "health", "metrics")} for c in ckpts],
        },
        "metrics": {
            "train_loss_curve": str(ctx.tracker.train_curve),
            "val_loss_curve": str(ctx.tracker.val_curve),
            "train_log": str(ctx.tracker.log_dir / "train.log"),
            "loss_curves_plot": ctx.loss_plot,
            "mlflow": ({"tracking_uri": mlflow_uri(config), "experiment": config.logging.mlflow.experiment,
                        "run_id": ctx.tracker.mlflow_run_id} if config.logging.mlflow.enabled else None),
            "tensorboard_logs": str(ctx.tracker.tensorboard_dir) if ctx.tracker.tensorboard_dir else None,
            "wandb_url": ctx.wandb_url,
            "wandb_dir": str(ctx.run_dir / "wandb") if config.logging.wandb.enabled else None,
            "tokens_seen": ctx.tokens_seen,
        },
        "tags": list(config.logging.wandb.tags),
        "created_at": ctx.created_at,
        "completed_at": utc_now() if status != "running" else None,
        "config": config.to_dict(),
        "config_overrides": config.overrides,
        "config_differences_from_defaults": config_differences_from_defaults(config),
        "warnings": ctx.validation.warnings,
        "resume_from": ctx.resume_from,
        "resumes": ctx.resumes,
        "initialized_from": ctx.initialized_from,
        "history": {"train": ctx.history.train, "evals": ctx.history.evals},
        "reproducibility": {**ctx.reproducibility, "started_at": ctx.created_at,
                            "ended_at": utc_now() if status != "running" else None,
                            "duration_seconds": round(elapsed, 3)},
    }
    if ctx.analysis_skipped is not None:
        manifest["analysis_skipped"] = ctx.analysis_skipped
    if ctx.validation.wandb:
        manifest["wandb_fallback"] = ctx.validation.wandb
    if ctx.error is not None:
        manifest["error"] = ctx.error
    return _portable_manifest(manifest, ctx.run_dir, config)


def run_output(manifest: dict, manifest_path: Path) -> dict:
    """The spec's Output object (Example Session 1), printed as the last line on stdout at the end of a run
    (completed, diverged, failed or interrupted): its values are the final manifest's, plus the manifest's path."""
    results, ckpts = manifest.get("training_results") or {}, manifest.get("checkpoints") or {}
    # The manifest's path is relative to the manifest; this line's is usable from the caller's working directory:
    # relative to it when the run is below it (`checkpoints/finance_ssc_baseline/checkpoint-epoch-3`), else absolute.
    best = resolve_manifest_path(ckpts.get("best_checkpoint"), Path(manifest_path).parent)
    if best and Path.cwd() in Path(best).parents:
        best = os.path.relpath(best)
    return {"run_id": manifest.get("run_id"), "status": manifest.get("status"),
            "best_checkpoint": best,
            "final_val_perplexity": results.get("final_val_perplexity"),
            "training_time_hours": results.get("training_time_hours"), "manifest": str(manifest_path)}


def print_run_output(output: Optional[dict]) -> None:
    """One JSON line on stdout, after every log line (the logger writes to stdout too), so a caller reads
    the last stdout line."""
    if not output:
        return
    for h in log.handlers:
        h.flush()
    try:
        print(json_text(output), file=sys.stdout, flush=True)
    except (OSError, ValueError):  # the terminal is gone (SIGHUP): the manifest holds the same, the exit code stands
        pass


def record_resume_attempt(ctx: RunContext, status: str) -> None:
    """A resume that ended before its first training step (refused weights, a data or load failure, Ctrl-C) changed
    nothing of the run: its manifest stays the last training process's (status, results, history, checkpoints),
    with only this attempt appended to `resumes`, with how it ended and its error. error.json is not written (an
    earlier one stays the run's); the error itself goes to stderr as always."""
    attempt = {**ctx.resumes[-1], "path": portable_path(ctx.resumes[-1]["path"], ctx.run_dir, True),
               "outcome": f"{status} before its first training step: nothing trained, the run's record was kept",
               "error": ctx.error}
    record = {**ctx.previous_record, "resumes": [*(ctx.previous_record.get("resumes") or []), attempt]}
    save_manifest(ctx.run_id, record, str(ctx.run_dir / MANIFEST_NAME))


def finalize_manifest(ctx: RunContext, status: str) -> dict:
    """The final manifest; for a completed run also the `best` archive (the baseline comparison is Phase 4's)."""
    path = ctx.run_dir / MANIFEST_NAME
    manifest = build_manifest(ctx, status)
    if status == "completed" and ctx.best_checkpoint:
        ctx.best_archive = str(ctx.run_dir / "best")
        manifest = build_manifest(ctx, status)
        injected_signal("record")
        archive_best(ctx.run_dir, ctx.best_checkpoint, manifest)
    save_manifest(ctx.run_id, manifest, str(path))
    monitor = ctx.history.train[-1] if ctx.history.train else None
    write_status(ctx.run_dir, {"run_id": ctx.run_id, "status": status, "step": ctx.global_step,
                               "max_steps": ctx.max_steps, "epoch": ctx.epoch,
                               "train_loss": _json_float(monitor[2]) if monitor else None,
                               "val_loss": manifest["training_results"]["final_val_loss"],
                               "elapsed_seconds": round(ctx.end_time - ctx.start_time, 1), "eta_seconds": 0})
    return manifest


# --------------------------------------------------------------------------------------------------
# 18. Tools: --status, --list-checkpoints, --evaluate, --plan, and the spec's tool functions
# --------------------------------------------------------------------------------------------------

def list_checkpoints(run_id: str, output_dir: Optional[str] = None, details: bool = False) -> list[str] | list[dict]:
    """The spec's `list_checkpoints(run_id) -> List[str]`: the paths of a run's complete checkpoints in step order.
    details=True: checkpoint_details' records instead (what --list-checkpoints --json prints)."""
    records = checkpoint_details(run_id, output_dir)
    return records if details else [c["path"] for c in records]


def checkpoint_details(run_id: str, output_dir: Optional[str] = None) -> list[dict]:
    """Complete checkpoints of a run, oldest first: name, path, step, epoch, metrics, health, and which one is
    the best (the manifest's best_checkpoint) and the latest (newest healthy). Interrupted saves never appear.
    Health is measured (every file hashed): a checkpoint damaged since its save is `corrupt`, never best or
    latest, and `integrity` says which file and how."""
    run_dir = find_run_dir(run_id, output_dir)
    ckpts = read_checkpoints(run_dir, verify=True)
    recorded = (read_json_strict(run_dir / MANIFEST_NAME, DAMAGED_MANIFEST_HINT) or {}).get("checkpoints")
    best = resolve_manifest_path(recorded.get("best_checkpoint"), run_dir) if isinstance(recorded, dict) else None
    healthy = [c["path"] for c in ckpts if c.get("health") == "ok"]
    return [{"name": c["name"], "path": c["path"], "step": c["step"], "epoch": c["epoch"],
             "metrics": c.get("metrics"), "health": c.get("health"), "integrity": c.get("integrity"),
             "run_id": c.get("run_id"), "dataset": c.get("dataset"),
             "is_best": c["path"] == best and c["path"] in healthy,
             "is_latest": bool(healthy) and c["path"] == healthy[-1]} for c in ckpts]


def load_checkpoint(path: str):
    """A checkpoint's model, loaded exactly as the inference side will load it (plain from_pretrained)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    p = Path(path).expanduser()
    reason = check_checkpoint_integrity(p, resume=False) if p.is_dir() else None
    if reason:
        raise damaged_checkpoint_error("path", path, p, reason, "this checkpoint was damaged after it was saved; "
                                       "use another one (--list-checkpoints RUN shows which are intact)")
    if (p / "adapter_config.json").is_file():  # LoRA checkpoint: base + adapter, as peft loads it
        from peft import AutoPeftModelForCausalLM
        base = (read_json_lenient(p / CHECKPOINT_META).get("config") or {}).get("model", {}).get("base_checkpoint")
        try:
            return AutoPeftModelForCausalLM.from_pretrained(str(p))
        except OSError as exc:
            raise TrainerError("CheckpointNotFound", {
                "field": "path", "value": str(path), "base_checkpoint": base,
                "suggestion": f"this adapter needs its base model ({base}) at the path it was trained from"}) from exc
    if not (p / "config.json").is_file():
        raise TrainerError("CheckpointNotFound", {
            "field": "path", "value": str(path), "path": str(p.resolve()),
            "suggestion": "pass a checkpoint directory (it holds config.json and *.safetensors); "
                          "list a run's checkpoints with list_checkpoints(run_id)"})
    try:
        return AutoModelForCausalLM.from_pretrained(str(p))
    except SafetensorError as exc:  # a damaged file in a dir with no recorded checksums to catch it earlier
        raise TrainerError("CheckpointNotFound", {
            "field": "path", "value": str(path), "path": str(p.resolve()), "reason": f"{type(exc).__name__}: {exc}",
            "suggestion": "a weights file in this directory is damaged; use another checkpoint"}) from exc


def _stored_config(stored: dict) -> Optional[TrainingConfig]:
    """The TrainingConfig a checkpoint's checkpoint_meta.json recorded (None when it has none, or one this version of
    the script cannot read): what --evaluate renders prompts and sizes generation with."""
    problems: list = []
    built = {name: _build_section(cls, stored.get(name) or {}, name, problems) for name, cls in SECTIONS.items()}
    if problems or any(v is None for v in built.values()) or not stored:
        return None
    return TrainingConfig(**built)


def evaluate_loss_metrics(model, tokenizer, records: list[dict], shape: str, max_seq_length: int,
                          batch_size: int, chat_kwargs: Optional[dict] = None,
                          truncation_side: str = "right") -> tuple[dict, int]:
    """(test_loss, test_perplexity, test_token_accuracy, test_exact_match; records with answer tokens) of `records`,
    through the run's Trainer class, collator and compute_metrics (evaluate_checkpoint; bench/bench_answer_eval.py)."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import TrainingArguments
    rows = tokenize_records(records, tokenizer, shape, max_seq_length, False, chat_kwargs, truncation_side)
    rows = [{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows if r["answer_tokens"] > 0]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_eval_batch_size=batch_size, report_to="none",
                                 use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
        trainer = _trainer_class()(model=model, args=args, eval_dataset=Dataset.from_list(rows),
                                   processing_class=tokenizer, data_collator=PadToLongestCollator(tokenizer.pad_token_id),
                                   compute_metrics=compute_metrics, callbacks=[EvalProgressCallback()])
        from transformers.trainer_callback import PrinterCallback
        trainer.remove_callback(PrinterCallback)
        metrics = trainer.evaluate(metric_key_prefix="test")
    return ({k: _json_float(v) for k, v in metrics.items() if k.startswith("test_") and not k.endswith(NOISE_SUFFIXES)},
            len(rows))


def evaluate_checkpoint(checkpoint_path: str, test_data_path: str, max_seq_length: Optional[int] = None,
                        batch_size: int = 8, predictions_out: Optional[str] = None) -> dict:
    """Test metrics of any checkpoint on any JSONL file, computed exactly as the post-training evaluation
    computes them: test_loss (mean NLL per answer token), test_perplexity, test_token_accuracy, test_exact_match,
    and `answer_eval` (the first evaluation.answer_eval.max_records records answered and scored by score_answers,
    with the checkpoint's own max_new_tokens and chat template arguments when it recorded a config; the defaults
    otherwise). `predictions_out`: where to write the per-record file (test_predictions.jsonl's form)."""
    from transformers import AutoTokenizer
    ckpt = Path(checkpoint_path).expanduser()
    model = load_checkpoint(str(ckpt))
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    meta = read_json_lenient(ckpt / CHECKPOINT_META)
    recorded = meta.get("config") or {}  # the run's whole config, as its checkpoint recorded it
    stored = recorded.get("data") or {}
    max_len = max_seq_length or stored.get("max_seq_length") or model.config.max_position_embeddings
    info, problems = scan_jsonl(Path(test_data_path).expanduser().resolve(), "test", "auto", "as given")
    if problems:
        raise TrainerError.collected(problems)
    # rendered as the run rendered its data: its template variables and, for a date-reading template, its date
    date = (meta.get("chat_template") or {}).get("date")
    chat_kwargs = dict(stored.get("chat_template_kwargs") or {})
    if template_reads_date(tokenizer.chat_template):
        chat_kwargs["chat_template"] = pinned_chat_template(tokenizer.chat_template, date or today_date())
    out, samples = evaluate_loss_metrics(model, tokenizer, _read_jsonl(Path(info["path"])), info["shape"], max_len,
                                         batch_size, chat_kwargs, stored.get("truncation_side") or "right")
    config = _stored_config(recorded)
    if config is not None:
        config.template_date = date  # answer prompts rendered on the run's date too (template_kwargs)
    ev = config.evaluation if config is not None else EvaluationConfig()
    answers = None
    if ev.answer_eval.max_records:
        records = _read_jsonl(Path(info["path"]), ev.answer_eval.max_records)
        summary, scored = answer_evaluation(model, tokenizer, records, info["shape"], ev.max_new_tokens, config)
        if predictions_out:
            write_predictions(Path(predictions_out).expanduser(), scored)
        answers = {**summary, "predictions": str(Path(predictions_out).expanduser().resolve()) if predictions_out
                   else None}
    return {**out, "samples": samples, "checkpoint": str(ckpt.resolve()), "data_path": info["path"],
            "max_seq_length": max_len, "answer_eval": answers}


def monitor_training(run_id: str, output_dir: Optional[str] = None) -> dict:
    """The state of a run, running or not: status, step/max_steps, epoch, latest losses, tokens/s, elapsed,
    ETA, last checkpoint. A run whose process died without finishing is reported as failed."""
    run_dir = find_run_dir(run_id, output_dir)
    status = read_json_strict(run_dir / "status.json", (
        "status.json is rewritten (atomically) at every log step: something else damaged it. Remove it to have "
        "--status report from the manifest, or follow the run's train.log")) or {}
    manifest = read_json_strict(run_dir / MANIFEST_NAME, DAMAGED_MANIFEST_HINT) or {}
    holder = read_json_lenient(run_dir / RUN_LOCK) if not status else {}  # start-up: who holds the run
    if not status and not manifest and not holder:
        raise TrainerError("CheckpointNotFound", {"field": "run", "value": run_id, "path": str(run_dir),
                                                  "suggestion": "no status.json or manifest: is this a run dir?"})
    out = {"run_id": manifest.get("run_id") or status.get("run_id"), "run_dir": str(run_dir),
           **{k: status.get(k) for k in ("status", "step", "max_steps", "epoch", "train_loss", "val_loss",
                                         "tokens_per_second", "elapsed_seconds", "eta_seconds", "updated_at",
                                         "pid", "hostname")}}
    if not status:  # status.json comes with the first logged step: until then the run is starting
        out.update(run_id=out["run_id"] or run_dir.name, pid=holder.get("pid"), hostname=holder.get("hostname"),
                   status=manifest.get("status") if manifest.get("status") not in (None, "running") else "starting")
        if out["status"] == "starting":
            out["note"] = "starting: preflight, data, model or the dry run; no training step logged yet"
    healthy = [c for c in read_checkpoints(run_dir) if c.get("health") == "ok"]
    out["last_checkpoint"] = healthy[-1]["path"] if healthy else None
    final = manifest.get("status")
    if final and final != "running":
        out["status"] = final
        perf = manifest.get("performance") or {}
        if perf.get("tokens_per_second") is not None:  # the whole run's training throughput
            out["tokens_per_second"] = perf["tokens_per_second"]
    elif out["status"] in ("running", "starting") and out["hostname"] == platform.node() and out["pid"] \
            and not _process_alive(int(out["pid"])):
        out["status"] = "failed"
        rep = manifest.get("reproducibility") or {}
        out["resume_command"] = resume_command(out["run_id"], rep.get("config_path"), rep.get("config_overrides"),
                                               cwd=rep.get("working_directory"))
        out["note"] = (f"process {out['pid']} is gone and never wrote a final status (killed?); "
                       f"resume with {out['resume_command']}")
    return out


def run_tool(args: argparse.Namespace) -> int:
    """--status / --list-checkpoints / --evaluate: a table for people, --json for machines."""
    import contextlib
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # libraries' chatter must not corrupt --json output
        result, rows = _tool_result(args)
    out = json_text(result, indent=2) if args.json else redact(_table(rows))
    print(out, file=real_stdout)
    return EXIT_OK


def _tool_result(args: argparse.Namespace) -> tuple[Any, list]:
    output_dir = args.output_dir
    if output_dir is None and args.config:
        output_dir = load_training_config(args.config).logging.output_dir
    if args.status:
        result: Any = monitor_training(args.status, output_dir)
        rows = status_rows(result)
    elif args.list_checkpoints:
        result = list_checkpoints(args.list_checkpoints, output_dir, details=True)
        rows = [["name", "step", "epoch", "health", "val_loss", "val_perplexity", "best", "latest"]] + [
            [c["name"], c["step"], c["epoch"], c["health"], (c["metrics"] or {}).get("val_loss"),
             (c["metrics"] or {}).get("val_perplexity"), "*" if c["is_best"] else "", "*" if c["is_latest"] else ""]
            for c in result]
    else:
        result = evaluate_checkpoint(args.evaluate, args.test_data, predictions_out=args.predictions_out)
        rows = [[k, v] for k, v in result.items() if k != "answer_eval"]
        rows += [[f"answer_eval.{k}", v] for k, v in (result["answer_eval"] or {}).items()]
    return result, rows


def status_rows(status: dict) -> list[list]:
    """--status for people, in the step lines' formats: `step 150/450 (33%)`, `train_loss 1.078`,
    `tokens_per_second 3.1k tok/s`, `elapsed 1m22s`, `eta 2m12s` (--json keeps the raw numbers)."""
    rows = []
    for key in ("run_id", "status", "step", "epoch", "train_loss", "val_loss", "tokens_per_second",
                "elapsed_seconds", "eta_seconds", "last_checkpoint", "note"):
        if key not in status:
            continue
        value, label = status[key], key.removesuffix("_seconds")
        if value is None:
            text = "-"
        elif key == "step" and status.get("max_steps"):
            text = f"{value}/{status['max_steps']} ({100 * value // status['max_steps']}%)"
        elif key == "tokens_per_second":
            text = f"{format_value(key, float(value))} tok/s"
        elif key.endswith("_seconds"):
            text = format_duration(float(value))
        else:
            text = format_value(key, value) if isinstance(value, float) else str(value)
        rows.append([label, text])
    return rows


def _table(rows: list[list]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))
    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(map(len, cells)))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


STRATEGY_LABELS = {"ddp": "DDP", "fsdp": "FSDP full-shard", "lora": "LoRA", "qlora": "QLoRA"}


def target_gpu(config: TrainingConfig, res: ValidationResult) -> Optional[dict]:
    """compute.gpu_type from GPU_TYPES, or the visible GPU (the only reason --plan may import torch)."""
    name = config.compute.gpu_type
    if name is not None:
        return None if name not in GPU_TYPES else {  # an unknown name is reported by _field_rules
            "gpu_type": name, "source": "compute.gpu_type", "memory_bytes": GPU_TYPES[name]["memory_mib"] * 2**20,
            "peak_flops": GPU_TYPES[name]["peak_flops"]}
    import torch
    seen = "no CUDA GPU is visible"
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_properties(0)
        peak = next((v for k, v in PEAK_FLOPS.items() if k in dev.name.upper().replace(" ", "")), None)
        if peak:
            return {"gpu_type": dev.name, "source": "visible GPU", "memory_bytes": dev.total_memory, "peak_flops": peak}
        seen = f"the visible GPU ({dev.name}) has no peak FLOP/s in the table"
    res.errors.append(config_problem("compute.gpu_type", None, f"one of {list(GPU_TYPES)}",
                                     f"{seen}: name the GPU to plan for, e.g. --set compute.gpu_type=H100-80GB"))
    return None


def plan_training(config: TrainingConfig) -> dict:
    """--plan, before renting: from the model's config.json and the train split's record count alone (no weights,
    no tokenizer, no GPU), the memory per GPU of DDP, FSDP full-shard, LoRA and QLoRA with the configured batch on
    compute.num_gpus x compute.gpu_type, which of them fit, and the wall time and cost of the full fine-tune:
    tokens x 6 x parameters / (GPUs x peak FLOP/s x compute.assumed_mfu), tokens = records x epochs x
    max_seq_length (an upper bound: shorter records are padded only to their batch's longest)."""
    res = ValidationResult(warnings=list(config.warnings))
    _field_rules(config, res)
    _data_rules(config, res)
    shape = ValidationResult()
    _checkpoint_rules(config, shape, need_weights=False)
    if not shape.errors and not shape.checkpoint:  # a Hub id not in the local cache: fetch its config.json only
        try:
            from huggingface_hub import hf_hub_download
            fetched = hf_hub_download(config.model.base_checkpoint, "config.json")
            shape.checkpoint = json.loads(Path(fetched).read_text())
        except Exception as exc:  # offline, unknown repo, no access
            shape.errors.append(problem("CheckpointNotFound", field="model.base_checkpoint",
                                        value=config.model.base_checkpoint,
                                        suggestion=f"--plan reads the model's config.json and could not fetch it "
                                                   f"({type(exc).__name__}): point model.base_checkpoint at a local "
                                                   "directory holding config.json (no weights needed), or declare "
                                                   "model.vocab_size, hidden_size, num_layers and num_heads"))
    declared = None
    if not shape.checkpoint and all(e["error"] == "CheckpointNotFound" for e in shape.errors):
        declared = declared_shape(config.model)  # not on disk: the architecture the config declares, if it does
    if declared:
        shape.errors, shape.checkpoint = [], declared["config"]
    res.errors += shape.errors
    res.checkpoint = shape.checkpoint
    gpu = target_gpu(config, res)
    res.raise_if_failed()
    c, hp, ckpt_cfg = config.compute, config.training.hyperparameters, res.checkpoint
    ref = config.resolved_paths.get("model.base_checkpoint")
    n_params = count_parameters(Path(ref["path"]) if ref and not declared else None, ckpt_cfg)
    strategies = {name: plan_strategy(config, ckpt_cfg, n_params, name, c.num_gpus, gpu["memory_bytes"])
                  for name in PLAN_STRATEGIES}
    fitting = [name for name, row in strategies.items() if row["fits"]]
    records = res.data["train"]["samples"]
    tokens = math.ceil(records * hp.num_epochs) * config.data.max_seq_length
    flops = 6 * n_params * tokens
    hours = flops / (c.num_gpus * gpu["peak_flops"] * c.assumed_mfu) / 3600
    hourly_usd, price_basis = hourly_price(config.cost, c.num_gpus, c.num_gpus)
    lora = config.model.lora
    configured = ("fsdp" if "full_shard" in (c.fsdp or "") else "ddp" if not lora.enabled
                  else "lora" if lora.quantization == "none" else "qlora")
    return {
        "gpu_type": gpu["gpu_type"], "gpu_source": gpu["source"], "num_gpus": c.num_gpus,
        "gpu_memory_gb": round(gpu["memory_bytes"] / 2**30, 3), "fit_fraction": FIT_FRACTION,
        "fit_limit_gb": round(FIT_FRACTION * gpu["memory_bytes"] / 2**30, 3), "peak_flops_per_gpu": gpu["peak_flops"],
        "model": {"base_checkpoint": config.model.base_checkpoint, "parameters": n_params,
                  **{k: ckpt_cfg.get(k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                   "num_hidden_layers", "num_attention_heads", "num_key_value_heads")},
                  "tie_word_embeddings": ckpt_cfg.get("tie_word_embeddings", True),
                  "shape_source": "model.vocab_size, hidden_size, num_layers and num_heads of the config (the base "
                                  "checkpoint's config.json is not here)"
                  if declared else "config.json", "assumptions": declared["assumptions"] if declared else {}},
        "batch": {"batch_size_per_gpu": hp.batch_size, "max_seq_length": config.data.max_seq_length,
                  "mixed_precision": c.mixed_precision, "optimizer": config.training.optimization.optimizer,
                  "gradient_checkpointing": config.model.gradient_checkpointing,
                  "precision": precision_facts(config, ckpt_cfg)},
        "configured_strategy": configured, "strategies": strategies, "fits": fitting,
        "recommended": fitting[0] if fitting else None, "verdict": plan_verdict(strategies),
        "train_records": records, "num_epochs": hp.num_epochs, "tokens": tokens,
        "tokens_basis": "train records x num_epochs x max_seq_length (upper bound)",
        "flops": flops, "assumed_mfu": c.assumed_mfu, "estimated_hours": round(hours, 6),
        "hourly_usd": hourly_usd, "price_basis": price_basis, "estimated_cost_usd": round(hours * hourly_usd, 4),
        "warnings": res.warnings,
    }


# What --plan assumes for a model known only by the four numbers the spec's config declares: SmolLM3's own choices
# (grouped-query attention with 4 query heads per key/value head, tied input/output embeddings) and an 8B-class MLP
# width (Llama-3-8B's 14336 for hidden 4096). The real config.json replaces all of them once the checkpoint is here.
ASSUMED_QUERY_HEADS_PER_KV_HEAD = 4
ASSUMED_MLP_RATIO = 3.5
ASSUMED_TIED_EMBEDDINGS = True


def declared_shape(model: ModelConfig) -> Optional[dict]:
    """A config.json-shaped dict from model.vocab_size, hidden_size, num_layers and num_heads, with the assumptions
    stated (what each is, why); None unless all four are declared."""
    dims = (model.vocab_size, model.hidden_size, model.num_layers, model.num_heads)
    if any(d is None for d in dims):
        return None
    vocab, hidden, layers, heads = dims
    kv_heads = max(1, heads // ASSUMED_QUERY_HEADS_PER_KV_HEAD)
    mlp = -(-int(ASSUMED_MLP_RATIO * hidden) // 256) * 256  # rounded up to a multiple of 256, as model cards do
    return {
        "config": {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
                   "num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": mlp,
                   "tie_word_embeddings": ASSUMED_TIED_EMBEDDINGS, "torch_dtype": "bfloat16"},
        "assumptions": {
            "num_key_value_heads": f"{kv_heads} (num_heads / {ASSUMED_QUERY_HEADS_PER_KV_HEAD}: SmolLM3's "
                                   "grouped-query attention)",
            "intermediate_size": f"{mlp} ({ASSUMED_MLP_RATIO:g} x hidden_size, rounded up to a multiple of 256: an "
                                 "8B-class MLP, as Llama-3-8B's 14336 for hidden 4096)",
            "tie_word_embeddings": f"{str(ASSUMED_TIED_EMBEDDINGS).lower()} (SmolLM3 ties its input and output "
                                   "embeddings)",
            "torch_dtype": "bfloat16 (SmolLM3's checkpoints are stored in bf16; training still keeps fp32 master "
                           "weights)"}}


def plan_verdict(strategies: dict) -> str:
    """`DDP does not fit (...); FSDP full-shard fits with model.gradient_checkpointing: true (...); ...`"""
    parts = []
    for name, row in strategies.items():
        ckpt = "model.gradient_checkpointing" in row["config_change"]
        if row["fits"]:
            parts.append(f"{STRATEGY_LABELS[name]} fits" + (" with model.gradient_checkpointing: true" if ckpt else "")
                         + f" ({row['gb_per_gpu']} GB per GPU)")
        else:
            parts.append(f"{STRATEGY_LABELS[name]} does not fit ({row['gb_per_gpu']} GB per GPU"
                         + (", even with model.gradient_checkpointing: true" if ckpt else "") + ")")
    return "; ".join(parts)


def format_plan(plan: dict) -> str:
    """--plan's table for people."""
    m, b = plan["model"], plan["batch"]
    rows, changes = [["strategy", "fits", "GB/GPU", "gradient_checkpointing", "config change"]], {}
    for name, row in plan["strategies"].items():
        changes[name] = ", ".join(f"{k}: {json.dumps(v)}" for k, v in row["config_change"].items()) or "as configured"
        rows.append([name + (" *" if name == plan["configured_strategy"] else ""), "yes" if row["fits"] else "no",
                     f"{row['gb_per_gpu']:.1f}", str(row["gradient_checkpointing"]).lower(), changes[name]])
    rec = plan["recommended"]
    lines = [
        f"plan: {plan['num_gpus']} x {plan['gpu_type']} ({plan['gpu_source']}; {plan['gpu_memory_gb']:.1f} GB each, "
        f"a strategy fits within {plan['fit_fraction']:.0%} = {plan['fit_limit_gb']:.1f} GB per GPU)",
        f"model: {m['parameters']:,} parameters ({m['base_checkpoint']}: hidden {m['hidden_size']}, "
        f"{m['num_hidden_layers']} layers, vocab {m['vocab_size']}); per GPU {b['batch_size_per_gpu']} x "
        f"{b['max_seq_length']} tokens, mixed_precision {b['mixed_precision']}, {b['optimizer']}; "
        f"{b['precision']['parameter_dtype']} master weights (the checkpoint stores "
        f"{b['precision']['base_stored_dtype']}; a LoRA base stays frozen in {b['precision']['compute_dtype']})",
        *([f"shape: {m['shape_source']}; assumed:"] + [f"  {k} {v}" for k, v in m["assumptions"].items()]
          if m.get("assumptions") else []),
        _table(rows), "(* = as configured)",
        f"verdict: {plan['verdict']}",
        f"recommended: {STRATEGY_LABELS[rec]} ({changes[rec]})" if rec else "recommended: none fits: more or "
        "larger GPUs, a shorter max_seq_length or a smaller batch_size",
        f"time: {plan['tokens']:,} tokens ({plan['train_records']} records x {plan['num_epochs']:g} epochs x "
        f"{b['max_seq_length']}, an upper bound) x 6 x {m['parameters']:,} parameters / ({plan['num_gpus']} GPUs x "
        f"{plan['peak_flops_per_gpu'] / 1e12:g} TFLOP/s x assumed MFU {plan['assumed_mfu']:g} "
        f"[compute.assumed_mfu]) = {plan['estimated_hours']:.2f} h ({format_duration(plan['estimated_hours'] * 3600)})",
        f"cost: {plan['estimated_hours']:.2f} h x {plan['hourly_usd']:.2f} $/h ({plan['price_basis']}) = "
        f"{plan['estimated_cost_usd']:.2f} $",
    ]
    return "\n".join(lines + [f"warning: {w}" for w in plan["warnings"]])


def run_plan(config: TrainingConfig, as_json: bool) -> int:
    plan = plan_training(config)
    print(json_text(plan, indent=2) if as_json else redact(format_plan(plan)))
    return EXIT_OK


# --------------------------------------------------------------------------------------------------
# 19. CLI
# --------------------------------------------------------------------------------------------------

EPILOG = """exit codes: 0 success; 2 invalid config, data, checkpoint or paths, or the run dir is in use by
another process (nothing trained); 3 training stopped by an anomaly guard; 4 out of memory;
143 preempted (SIGTERM/SIGUSR1/SIGHUP: checkpoint saved, resume with --resume-from latest); 130 Ctrl-C;
1 anything else.
Failures end with one JSON object on stderr: {"error": Kind, "details": {...}, "errors": [...]}.

answer evaluation (evaluation.answer_eval; after training, --evaluate, and each evaluation under
on_validation): the first max_records records are answered greedily and scored on these rules.
  amounts: currency marks are removed (PHP, Php or \u20b1 and the spaces after it; a P directly before a
    digit unless a letter or digit precedes the P); a number is \\d{1,3}(,\\d{3})+(\\.\\d+)? or \\d+(\\.\\d+)?
    (the first form first), commas dropped; negative in parentheses (1,234.50) or after a - that does
    not follow a letter or digit; each value rounded half up to 2 decimals (centavos). 12% counts as 12;
    form numbers count (1601-C gives 1601, 2550Q gives 2550): naming the wrong form is a wrong answer.
  numeric_match: the reference has a number and the sorted values of the answer equal the reference's
    (every amount right, none missing, none extra); numeric_f1: F1 of the two bags of values; records
    whose reference has no number are left out of both (records - numeric_records).
  exact_match: equal after trimming and collapsing whitespace."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train_finance_ssc_model.py", description="Fine-tune SmolLM3 on finance data from a YAML config.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="path to training_config.yaml (required to train, validate or dry-run)")
    p.add_argument("--dry-run", action="store_true",
                   help="only the dry run: the real pipeline for --max-steps steps on a slice, a report in "
                        "dry_run_report.json; no checkpoints or manifest")
    p.add_argument("--max-steps", type=int, default=None,
                   help=f"optimizer steps of the dry run: --dry-run's (default {DRY_RUN_STEPS}) or the one training "
                        f"runs first (default {DRY_RUN_STEPS}, or a tenth of the planned steps when fewer, at least 2)")
    p.add_argument("--skip-dry-run", action="store_true",
                   help="train without the dry run that otherwise runs first (a resume never repeats it)")
    p.add_argument("--validate-only", action="store_true", help="check config, data and checkpoint, then exit")
    p.add_argument("--plan", action="store_true",
                   help="before renting: memory per GPU under DDP, FSDP full-shard, LoRA and QLoRA on "
                        "compute.num_gpus x compute.gpu_type, which fit, wall time and cost, from the model's "
                        "config.json alone (no weights, no GPU); --json for machines")
    p.add_argument("--resume-from", metavar="PATH|latest",
                   help="continue a run from a checkpoint dir, or from its newest healthy one (with --run-id)")
    p.add_argument("--force", action="store_true",
                   help="resume even if a config change makes the resume a different experiment, or its manifest "
                        "is damaged (the history is then lost); without --resume-from: start an existing run id "
                        "over (the old run is moved aside to <run_id>.abandoned-<time>, nothing is deleted)")
    p.add_argument("--run-id", help=f"run id (letters, digits, - _ ., at most {MAX_RUN_ID_LENGTH} characters); "
                                    "default: <dataset_name>_<UTC time>")
    p.add_argument("--output-dir", help="without --run-id: the run's own directory (run id = its name, spec Phase 3); "
                                        "with --run-id, and for the tools: overrides logging.output_dir, the parent "
                                        "of <run_id>/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set training.hyperparameters.learning_rate=1e-5 "
                        "(repeatable; recorded in the manifest)")
    baseline = p.add_mutually_exclusive_group()
    baseline.add_argument("--baseline", metavar="MANIFEST_OR_RUN_DIR",
                          help="compare this run's validation and test metrics with a previous run's (default: the "
                               "most recent completed run of the same data.dataset_name, if any)")
    baseline.add_argument("--no-baseline", action="store_true",
                          help="no baseline comparison (evaluation.baseline: none)")
    tools = p.add_argument_group("monitoring and checkpoint tools (RUN = run dir, or run_id under the output dir; "
                                 "a bare run_id is also looked up under ./training_config.yaml's output_dir and in "
                                 "the index of runs started here, $XDG_CACHE_HOME/finance_smollm3/runs.json)")
    tools.add_argument("--status", metavar="RUN", help="status of a running or finished run, with ETA")
    tools.add_argument("--list-checkpoints", metavar="RUN", help="complete checkpoints with metrics and health")
    tools.add_argument("--evaluate", metavar="CHECKPOINT",
                       help="test metrics of a checkpoint (with --test-data), answer evaluation included")
    tools.add_argument("--test-data", metavar="PATH", help="JSONL file for --evaluate")
    tools.add_argument("--predictions-out", metavar="PATH",
                       help="--evaluate: write each scored answer here (JSONL, the form of test_predictions.jsonl)")
    tools.add_argument("--json", action="store_true", help="print tool or --plan output as JSON instead of a table")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    args = p.parse_args(argv)
    if not (args.config or args.status or args.list_checkpoints or args.evaluate):
        p.error("--config is required (or one of --status, --list-checkpoints, --evaluate)")
    if args.evaluate and not args.test_data:
        p.error("--evaluate needs --test-data PATH")
    if args.predictions_out and not args.evaluate:
        p.error("--predictions-out goes with --evaluate")
    return args


# The CLI that started torch.distributed.run stays in charge of the run: these signals are forwarded to the launcher
# (started in its own session, so a terminal's Ctrl-C or a `kill -- -PGID` reaches it once, through here), which
# relays each to every rank. The ranks then have LAUNCHER_GRACE_SECONDS to finish the step, save, write the
# manifest and exit (torchrun's --shutdown-timeout, then SIGKILL): 90 s fits in AWS's 2-minute spot notice; set the
# platform's own grace to more (Kubernetes terminationGracePeriodSeconds: 120, `docker stop -t 120`).
LAUNCHER_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGHUP")
LAUNCHER_GRACE_SECONDS = 90
LAUNCHER_TEARDOWN_SECONDS = 30  # beyond the grace: torchrun's own SIGKILL and exit, before this CLI kills it


class LauncherSignals:
    """Forward LAUNCHER_SIGNALS sent to this CLI to the launcher's process group, each time one arrives (a second
    one reaches the ranks as a second signal: stop at once). `first` is the first signal's name, `deadline` the
    monotonic time by which the launcher must be gone. A signal this process ignores (SIGHUP under nohup) stays
    ignored."""

    def __init__(self, proc, ranks: int):
        self.proc, self.ranks, self.first, self.deadline, self.previous = proc, ranks, None, None, {}
        for name in LAUNCHER_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                self.previous[sig] = signal.signal(sig, self.forward)

    def forward(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.first is None:
            self.first = name
            self.deadline = time.monotonic() + LAUNCHER_GRACE_SECONDS + LAUNCHER_TEARDOWN_SECONDS
            log.warning("%s received: forwarded to the %d ranks, which finish the step, save a checkpoint and stop "
                        "(up to %d s)", name, self.ranks, LAUNCHER_GRACE_SECONDS)
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:  # already gone
            pass

    def restore(self) -> None:
        restore_signal_handlers(self.previous)


def _die_with_parent():
    """A preexec_fn: the launcher gets SIGTERM (and relays it to the ranks, which save) when this CLI dies, even by
    SIGKILL, instead of training on unsupervised. Linux only (prctl PR_SET_PDEATHSIG); None elsewhere."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


def launch_distributed(config: TrainingConfig, args: argparse.Namespace, argv: list[str]) -> int:
    """Launched plainly with compute.num_gpus > 1, or with compute.fsdp on CUDA (one process is still a
    distributed launch, which Trainer's FSDP requires): validate here, then start this script under
    torch.distributed.run with num_gpus processes, forwarding signals to it (LauncherSignals), and end with the
    ranks' own error payload and exit code. Under torchrun / accelerate launch (LOCAL_RANK set) this is skipped
    and the launcher's processes are used as they are."""
    import subprocess
    # one error report before any process starts; the device probe is left to the ranks, so this parent
    # never holds a CUDA context while they train
    validate_config(config, check_device=False, resuming=bool(args.resume_from)).raise_if_failed()
    if args.resume_from == "latest" and not args.run_id:
        resolve_resume(config, "latest", None)  # raises the "needs --run-id" error
    run_id = args.run_id or make_run_id(config)  # every rank must use the same id
    if run_paths(config, run_id)["run_dir"].is_dir():  # a live writer answers RunLocked now, before any rank starts
        lock_run_dir(run_paths(config, run_id)["run_dir"])
        unlock_run_dir(run_paths(config, run_id)["run_dir"])  # rank 0 takes it for the run
    if not args.resume_from and not args.force:  # --force: rank 0 moves the old run aside (abandon_run)
        refuse_existing_run(run_paths(config, run_id)["run_dir"] / MANIFEST_NAME, run_id, config)
    n = config.compute.num_gpus
    child_argv = list(argv) + ([] if args.run_id else ["--run-id", run_id])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           f"--signals-to-handle={','.join(LAUNCHER_SIGNALS)}", f"--shutdown-timeout={LAUNCHER_GRACE_SECONDS}",
           str(Path(__file__).resolve()), *child_argv]
    log.info("compute.num_gpus=%d: starting %d processes with torch.distributed.run (backend %s), run %s",
             n, n, config.compute.distributed_backend, run_id)
    env = {**os.environ, "FINANCE_TRAINER_LAUNCHER_PID": str(os.getpid())}  # the ranks' test hook signals it
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                            preexec_fn=_die_with_parent())
    relay = LauncherSignals(proc, n)
    try:
        last_error = _follow_launcher(proc, relay, args.debug)
    finally:
        relay.restore()
    if proc.returncode == 0 and last_error is None:
        return EXIT_OK
    if last_error is None and relay.first is not None:  # stopped before the ranks could say anything
        kind = "Interrupted" if relay.first == "SIGINT" else "Preempted"
        last_error = TrainerError(kind, {
            "signal": relay.first, "step": None, "checkpoint": None, "launcher_exit_code": proc.returncode,
            "suggestion": f"the ranks stopped before reporting (killed after the {LAUNCHER_GRACE_SECONDS} s grace "
                          f"period, or before training started): continue with --resume-from latest --run-id "
                          f"{run_id} (a run with no checkpoint yet starts over with --force)"}).payload
    last_error = last_error or unexpected_error(
        RuntimeError(f"torch.distributed.run exited with {proc.returncode}")).payload
    emit_error(last_error)
    return ERROR_EXIT_CODES.get(last_error.get("error"), EXIT_FAILED)


def _follow_launcher(proc, relay: LauncherSignals, debug: bool) -> Optional[dict]:
    """Forward the ranks' stderr (the launcher's own failure report left out unless --debug) until the launcher
    exits, and return the ranks' error payload (the first specific one wins over a rank's generic follow-up
    failure), or None. After a forwarded signal the wait is bounded: past relay.deadline the launcher's process
    group is killed."""
    import subprocess
    import threading
    found: dict = {}

    def pump() -> None:
        in_launcher_trace = False
        for line in proc.stderr:
            payload = _error_payload(line)
            if payload is not None:
                if "error" not in found or found["error"].get("error") == "TrainingFailed":
                    found["error"] = payload
                continue
            if line.startswith("Traceback") or "torch.distributed.elastic" in line or "ChildFailedError" in line:
                in_launcher_trace = True
            noise = in_launcher_trace or (relay.first is not None and "torch/distributed/elastic" in line)
            if debug or not noise:
                sys.stderr.write(line)

    reader = threading.Thread(target=pump, name="launcher-stderr", daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            proc.wait(timeout=0.5)  # short: a signal handled meanwhile sets a deadline this loop must see
        except subprocess.TimeoutExpired:
            pass
        if relay.deadline is not None and time.monotonic() > relay.deadline and proc.poll() is None:
            log.error("the launcher did not exit within %d s of %s: killing it", LAUNCHER_GRACE_SECONDS
                      + LAUNCHER_TEARDOWN_SECONDS, relay.first)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=LAUNCHER_TEARDOWN_SECONDS)  # the ranks may hold the pipe a moment longer
    return found.get("error")


def _error_payload(line: str) -> Optional[dict]:
    if not line.startswith('{"error"'):
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


# Read by the libraries when they are imported: set before the first heavy import (tests/forkserver.py too).
QUIET_LIBRARY_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                     "WANDB_SILENT": "true", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


class ConsoleHandler(logging.StreamHandler):
    """The console's log lines; while a progress bar is live on the terminal, each line clears the bar, prints, and
    redraws it (tqdm's external write mode), so lines and bar never overwrite each other."""

    def emit(self, record: logging.LogRecord) -> None:
        if not _live_bars:
            return super().emit(record)
        from tqdm import tqdm
        with tqdm.external_write_mode(file=self.stream):
            super().emit(record)


def output_dir_as_run_dir(args: argparse.Namespace) -> Optional[str]:
    """Spec Phase 3 types `--output-dir /mnt/finance-smollm3/checkpoints/run_$(date +%Y%m%d_%H%M%S)` without --run-id:
    that directory is then the run's own (run id = its name; its parent plays logging.output_dir). With --run-id,
    --output-dir stays the parent of `<run_id>/`, and the tools always read it as the parent. Returns the note the
    console gets, or None. Deterministic, so the ranks torch.distributed.run starts derive the same run."""
    if args.output_dir is None or args.run_id is not None or args.plan:
        return None
    run_dir = Path(args.output_dir).expanduser().resolve()
    check_run_id(run_dir.name, "--output-dir")
    args.run_id, args.output_dir = run_dir.name, str(run_dir.parent)
    return (f"--output-dir {run_dir} is this run's directory (run id {run_dir.name}); with --run-id it would be "
            "the parent of <run_id>/")


def setup_logging(debug: bool) -> None:
    handler = ConsoleHandler(sys.stdout)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handler.addFilter(lambda record: not getattr(record, "file_only", False))  # e.g. the full config: train.log
    log.handlers[:] = [handler]
    # other ranks only report problems: rank 0 speaks for the run
    log.setLevel(logging.DEBUG if debug else logging.INFO if is_main_process() else logging.WARNING)
    log.propagate = False
    if not debug:
        for noisy in ("transformers", "datasets", "accelerate", "torch"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        for key, value in QUIET_LIBRARY_ENV.items():
            os.environ.setdefault(key, value)


def close_progress_bars() -> None:
    """Close every live bar (a run that stops by an exception never reaches its bars' own close)."""
    for bar in list(_live_bars):
        _live_bars.discard(bar)
        bar.close()


def emit_error(payload: dict) -> None:
    """The last thing on stderr: one JSON object (not at all when the terminal is gone: error.json has it)."""
    try:
        close_progress_bars()
        sys.stdout.flush()
        sys.stderr.write(json_text(payload) + "\n")  # secrets redacted, strict JSON
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "LOCAL_RANK" in os.environ:  # a rank: a native crash (an abort in a collective) shows where Python was, in
        import faulthandler  # the stderr the launching CLI forwards, instead of only torchrun's exit code -6
        faulthandler.enable(all_threads=True)
    redact_library_output()  # before any library prints, or keeps a handle on the streams
    args = parse_args(argv)
    setup_logging(args.debug)
    try:
        if args.status or args.list_checkpoints or args.evaluate:
            return run_tool(args)
        if args.run_id is not None:
            check_run_id(args.run_id)  # before the config, the data or anything under <output_dir>/<run_id> is read
        run_dir_note = output_dir_as_run_dir(args)
        if run_dir_note:
            log.info(run_dir_note)
        literal = {k: v for k, v in (("logging.output_dir", args.output_dir),
                                     ("evaluation.baseline", "none" if args.no_baseline else args.baseline))
                   if v is not None}
        config = load_training_config(args.config, list(args.overrides), literal)
        if args.plan:
            return run_plan(config, args.json)
        if config.compute.device == "cuda" and config.compute.num_gpus == 1 and "LOCAL_RANK" not in os.environ \
                and "CUDA_VISIBLE_DEVICES" not in os.environ:
            # one GPU asked for: without this, Trainer wraps the model in DataParallel over every visible GPU
            os.environ["CUDA_VISIBLE_DEVICES"] = "0"
        if args.validate_only:
            pin_template_date(config, args.resume_from, args.run_id)  # the date training would render with
            choose_baseline(config, exclude=own_run_dir(config, args.run_id, args.resume_from))
            result = validate_config(config, resuming=bool(args.resume_from))
            for w in result.warnings:
                log.warning(w)
            result.raise_if_failed()
            log.info("config OK: %s", ", ".join(f"{s} {i['samples']} samples ({i['shape']})"
                                                 for s, i in result.data.items()))
            for split, info in result.data.items():
                if "truncation" in info:
                    log.info("data: %s", format_truncation(split, info["truncation"]))
            return EXIT_OK
        # several GPUs, or FSDP on any number (Trainer runs FSDP only in a distributed launch): torch.distributed.run.
        # compute.fsdp on CPU stays in this process, where validation refuses it.
        fsdp_launch = bool(config.compute.fsdp) and config.compute.device == "cuda"
        if (config.compute.num_gpus > 1 or fsdp_launch) and "LOCAL_RANK" not in os.environ and not args.dry_run:
            return launch_distributed(config, args, argv)
        result = train_model(config, dry_run=args.dry_run, resume_from=args.resume_from, run_id=args.run_id,
                             max_steps=args.max_steps, force=args.force, argv=argv, skip_dry_run=args.skip_dry_run)
        if result.manifest_path:
            log.info("run %s %s; manifest: %s", result.run_id, result.status, result.manifest_path)
        if result.manifest_path and result.manifest:  # a dry run has no manifest: its report is logged above
            print_run_output(run_output(result.manifest, result.manifest_path))
        return result.exit_code
    except TrainerError as exc:
        if args.debug:
            import traceback
            traceback.print_exc()
        print_run_output(getattr(exc, "run_output", None))
        emit_error(exc.payload)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print_run_output(getattr(exc, "run_output", None))
        emit_error(getattr(exc, "recorded_error", None)
                   or TrainerError("Interrupted", {"suggestion": "resume with --resume-from latest --run-id RUN"}).payload)
        return EXIT_INTERRUPTED
    except Exception as exc:  # unexpected: still one JSON object, traceback only with --debug
        if args.debug:
            import traceback
            traceback.print_exc()
        print_run_output(getattr(exc, "run_output", None))
        emit_error(unexpected_error(exc).payload)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
