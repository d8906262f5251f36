"""Preflight: a table of broken configs and data files, each run through the real CLI with --validate-only.

Every row asserts the error contract of README "Errors and exit codes": the exit code (2 for config, data,
checkpoint and path problems, 4 for a predicted out-of-memory), the kind of the relevant entry, the dotted
`field` or the data `line` it names, a non-empty `suggestion` on every entry, no traceback, the last line
of stderr is one strict-JSON object whose top describes `errors[0]`, and that the run touched nothing on
disk (every file and folder under the test's tmp dir and the shared tiny model/data is hashed before and
after: nothing overwritten, removed or created).

A row is one broken thing on top of `conftest.base_config`, which validates cleanly (see
test_valid_config_validates_and_exits_0), so every problem reported comes from the row.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import yaml

from conftest import base_config, last_json, run_cli, set_key, write_config

pytestmark = pytest.mark.slow  # every test here launches the CLI (conftest.run_cli)

SPEC_EMPTY_SUGGESTION = "Run DataPrepAgent first to generate training data"
CONFIG_ERRORS = {"InvalidConfig"}
DATA_ERRORS = {"EmptyDataset", "InvalidDataset", "DataPathNotFound"}
ANY = object()  # "do not check this detail"
DELETE = object()  # mutation value: remove the key


# --------------------------------------------------------------------------------------------------
# Per-case context: builds the broken inputs inside the test's own tmp dir
# --------------------------------------------------------------------------------------------------

@dataclass
class Ctx:
    tmp: Path
    tiny: Path
    env: dict = field(default_factory=dict)  # extra environment for the CLI run
    args: list = field(default_factory=list)  # extra CLI arguments
    expected_line: int = 0  # set by rows whose expectation depends on what they wrote
    missing: Optional[Path] = None

    def base(self, fmt: str = "messages") -> dict:
        return base_config(self.tiny, self.tmp / "out", fmt)

    def mutate(self, cfg: dict, changes: dict) -> dict:
        for dotted, value in changes.items():
            if value is DELETE:
                *parents, last = dotted.split(".")
                node = cfg
                for p in parents:
                    node = node[p]
                del node[last]
            else:
                cfg = set_key(cfg, dotted, value)
        return cfg

    def config(self, changes: Optional[dict] = None, fmt: str = "messages", cfg: Optional[dict] = None) -> Path:
        cfg = self.mutate(cfg if cfg is not None else self.base(fmt), changes or {})
        return write_config(self.tmp / "cfg" / "config.yaml", cfg)

    def text_config(self, text: str | bytes) -> Path:
        path = self.tmp / "cfg" / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
        return path

    def good_lines(self, fmt: str = "messages", n: int = 96) -> list[str]:
        return (self.tiny / fmt / "train.jsonl").read_text().splitlines()[:n]

    def with_bad_line(self, bad: str, at: int, fmt: str = "messages") -> list[str]:
        """All 96 good train records with `bad` as line `at` (so the schedule rules see the full count)."""
        lines = self.good_lines(fmt)
        return lines[:at - 1] + [bad] + lines[at - 1:]

    def jsonl(self, name: str, lines: list[str]) -> Path:
        path = self.tmp / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in lines))
        return path

    def train_file(self, lines: list[str], changes: Optional[dict] = None, fmt: str = "messages") -> Path:
        path = self.jsonl("train.jsonl", lines)
        return self.config({"data.train_path": str(path), **(changes or {})}, fmt)

    def model_copy(self, drop: tuple[str, ...] = (), edit: Optional[Callable[[Path], None]] = None) -> Path:
        dst = self.tmp / "ckpt"
        shutil.copytree(self.tiny / "model", dst)
        for name in drop:
            for f in dst.glob(name):
                f.unlink()
        if edit:
            edit(dst)
        return dst


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    build: Callable[[Ctx], Path]  # writes the inputs, returns the config path; may set ctx.args / ctx.env
    kind: str
    field: Any = ANY  # expected details.field of the relevant entry (None: a document-level problem)
    line: Any = ANY  # expected details.line of the relevant entry
    exit: int = 2
    top: bool = True  # the relevant entry is the top object (errors[0])
    # fields every entry of `errors` may name; default: only the relevant one (one mistake -> no follow-on errors)
    allowed: Optional[set] = None
    check: Optional[Callable[[dict, dict, Ctx], None]] = None  # (relevant details, whole payload, ctx)


def cfg_case(id_: str, changes: dict, kind: str = "InvalidConfig", field_: Any = ANY, **kw) -> Case:
    """A row that is the base config with `changes` applied; `field_` defaults to the one changed key."""
    if field_ is ANY and len(changes) == 1:
        field_ = next(iter(changes))
    return Case(id_, lambda ctx: ctx.config(changes), kind, field=field_, **kw)


def _yaml_syntax(ctx: Ctx) -> Path:
    lines = yaml.safe_dump(ctx.base(), sort_keys=False).splitlines()
    i = next(n for n, s in enumerate(lines) if s.strip().startswith("learning_rate:"))
    lines[i] = lines[i].split(":")[0] + ": 1e-2: oops"  # "mapping values are not allowed here"
    ctx.expected_line = i + 1
    return ctx.text_config("\n".join(lines) + "\n")


def _check_yaml_line(d, payload, ctx):
    assert d["line"] == ctx.expected_line, d
    assert f"line {ctx.expected_line}" in d["suggestion"]


def _missing_train(ctx: Ctx) -> Path:
    ctx.missing = ctx.tmp / "nope" / "deeper" / "train.jsonl"
    return ctx.config({"data.train_path": str(ctx.missing)})


def _check_missing_train(d, payload, ctx):
    assert Path(d["path"]).is_absolute() and d["path"] == str(ctx.missing)
    assert d["nearest_existing_parent"] == str(ctx.tmp)


def _missing_relative_train(ctx: Ctx) -> Path:
    return ctx.config({"data.train_path": "splits/train.jsonl"})


def _check_missing_relative(d, payload, ctx):
    # relative data paths are read from the config file's folder first: that is where it was looked for
    assert d["path"] == str((ctx.tmp / "cfg" / "splits" / "train.jsonl").resolve())
    assert d["nearest_existing_parent"] == str((ctx.tmp / "cfg").resolve())
    assert "working directory" in d["resolved"]


def _check_empty(d, payload, ctx):
    assert d["line_count"] == 0
    assert d["suggestion"] == SPEC_EMPTY_SUGGESTION
    assert d["path"] == str(ctx.tmp / "data" / "train.jsonl")


def _check_bad_json(d, payload, ctx):
    assert d["snippet"].startswith('{"messages": [{"role": "user"'), d
    assert d["path"] == str(ctx.tmp / "data" / "train.jsonl")


def _blocked_output(ctx: Ctx) -> Path:
    blocker = ctx.tmp / "blocker"
    blocker.write_text("a file, not a folder\n")
    return ctx.config({"logging.output_dir": str(blocker / "runs")})


def _blocked_logging_dir(ctx: Ctx) -> Path:
    blocker = ctx.tmp / "blocker"
    blocker.write_text("a file, not a folder\n")
    return ctx.config({"logging.logging_dir": str(blocker / "logs" / "deeper")})


def _check_blocked(d, payload, ctx):
    assert str(ctx.tmp / "blocker") in d["suggestion"]


def _wandb_no_credentials(ctx: Ctx) -> Path:
    home = ctx.tmp / "home"
    home.mkdir()
    ctx.env.update(WANDB_MODE="", WANDB_API_KEY="", HOME=str(home))
    return ctx.config({"logging.wandb.enabled": True})


def _unwritable_env(var: str) -> Callable[[Ctx], Path]:
    """`var` pointing below a regular file: no user, root included, can create anything there."""
    def build(ctx: Ctx) -> Path:
        blocker = ctx.tmp / "blocker"
        blocker.write_text("a file, not a folder\n")
        ctx.env[var] = str(blocker / "cache")
        return ctx.config()
    return build


def _check_names_variable(d, payload, ctx):
    assert d["value"] == str(ctx.tmp / "blocker" / "cache"), d
    assert f"export {d['field']}=" in d["suggestion"] and "is a file, not a directory" in d["suggestion"], d


def _hub_not_cached(ctx: Ctx) -> Path:
    hf_home = ctx.tmp / "hf_home"
    hf_home.mkdir()
    ctx.env.update(HF_HOME=str(hf_home), HF_HUB_CACHE=str(hf_home / "hub"), HF_HUB_OFFLINE="1")
    return ctx.config({"model.base_checkpoint": "HuggingFaceTB/SmolLM3-3B-Base"})


def _ckpt_missing(name: str) -> Callable[[Ctx], Path]:
    return lambda ctx: ctx.config({"model.base_checkpoint": str(ctx.model_copy(drop=(name,)))})


def _ckpt_missing_tokenizer(ctx: Ctx) -> Path:
    return ctx.config({"model.base_checkpoint": str(ctx.model_copy(drop=("tokenizer*.json",)))})


def _ckpt_edit(edit: Callable[[Path], None]) -> Callable[[Ctx], Path]:
    return lambda ctx: ctx.config({"model.base_checkpoint": str(ctx.model_copy(edit=edit))})


def _check_missing(what: str):
    def check(d, payload, ctx):
        assert any(what in m for m in d["missing"]), d
        assert d["path"] == str(ctx.tmp / "ckpt")
    return check


def _oom(ctx: Ctx) -> Path:
    return ctx.config({"training.hyperparameters.batch_size": 1_000_000, "data.max_seq_length": 512,
                       "training.hyperparameters.warmup_steps": 0})


def _check_oom(d, payload, ctx):
    assert d["batch_size"] == 1_000_000 and d["seq_length"] == 512
    assert d["estimated_memory_gb"] > d["available_memory_gb"] > 0, d
    m = re.search(r"batch_size to (\d+)", d["suggestion"])
    assert m and 1 <= int(m.group(1)) < 1_000_000, d["suggestion"]


def _multiline_valid(ctx: Ctx) -> Path:
    path = ctx.jsonl("valid.jsonl", ctx.good_lines(n=4) + ["not json at all"])
    return ctx.config({"data.valid_path": str(path)})


CASES = [
    # --- the YAML document itself -------------------------------------------------------------------
    Case("yaml_syntax_error", _yaml_syntax, "InvalidConfig", field=None, check=_check_yaml_line),
    Case("yaml_is_a_list", lambda ctx: ctx.text_config("- model\n- data\n"), "InvalidConfig", field=None,
         check=lambda d, p, c: (d["value"] == ["model", "data"]) or pytest.fail(str(d))),
    Case("config_not_utf8", lambda ctx: ctx.text_config(b"model:\n  base_checkpoint: caf\xe9\xff\n"),
         "InvalidConfig", field=ANY),
    Case("config_path_missing", lambda ctx: ctx.tmp / "cfg" / "nope.yaml", "InvalidConfig", field="--config"),
    Case("set_without_equals", lambda ctx: (ctx.args.extend(["--set", "training.hyperparameters.learning_rate"]),
                                            ctx.config())[1], "InvalidConfig",
         field="training.hyperparameters.learning_rate"),
    # --- structure: sections, keys, types -----------------------------------------------------------
    cfg_case("missing_section_model", {"model": DELETE}),
    cfg_case("missing_train_path", {"data.train_path": DELETE}),
    cfg_case("unknown_key_did_you_mean", {"training.hyperparameters.learning_rat": 1e-5},
             field_="training.hyperparameters.learning_rat",
             check=lambda d, p, c: ("learning_rate" in d["suggestion"]) or pytest.fail(d["suggestion"])),
    Case("unknown_top_level_section",
         lambda ctx: ctx.config(cfg={("trainig" if k == "training" else k): v for k, v in ctx.base().items()}),
         "InvalidConfig", field="trainig",
         check=lambda d, p, c: ("`training`" in d["suggestion"]) or pytest.fail(d["suggestion"])),
    cfg_case("batch_size_string", {"training.hyperparameters.batch_size": "eight"},
             check=lambda d, p, c: (d["value"] == "eight" and "without quotes" in d["suggestion"]) or pytest.fail(str(d))),
    cfg_case("section_is_a_list", {"training": [1, 2]}),
    # --- one field at a time ------------------------------------------------------------------------
    cfg_case("learning_rate_zero", {"training.hyperparameters.learning_rate": 0.0},
             check=lambda d, p, c: ("2e-5" in d["suggestion"]) or pytest.fail(d["suggestion"])),
    cfg_case("learning_rate_nan", {"training.hyperparameters.learning_rate": float("nan")}),
    cfg_case("batch_size_zero", {"training.hyperparameters.batch_size": 0}),
    cfg_case("grad_accum_zero", {"training.hyperparameters.gradient_accumulation_steps": 0}),
    cfg_case("num_epochs_zero", {"training.hyperparameters.num_epochs": 0}),
    cfg_case("num_epochs_nan", {"training.hyperparameters.num_epochs": float("nan")}),
    cfg_case("warmup_negative", {"training.hyperparameters.warmup_steps": -1}),
    # base: 96 samples / batch 8 = 12 steps per epoch x 2 epochs = 24 optimizer steps
    cfg_case("warmup_ge_total_steps", {"training.hyperparameters.warmup_steps": 24},
             check=lambda d, p, c: ("24" in d["expected"] and "warmup_steps: 2" in d["suggestion"])
             or pytest.fail(str(d))),
    cfg_case("weight_decay_negative", {"training.hyperparameters.weight_decay": -0.1}),
    cfg_case("max_grad_norm_zero", {"training.hyperparameters.max_grad_norm": 0.0}),
    cfg_case("save_total_limit_zero", {"training.checkpointing.save_total_limit": 0}),
    cfg_case("logging_steps_zero", {"logging.logging_steps": 0}),
    cfg_case("eval_steps_zero", {"logging.eval_steps": 0}),
    cfg_case("max_seq_length_tiny", {"data.max_seq_length": 4}),
    cfg_case("early_stopping_patience_zero", {"training.optimization.early_stopping_patience": 0}),
    cfg_case("early_stopping_metric_unknown", {"training.optimization.early_stopping_metric": "val_acc"}),
    cfg_case("metric_for_best_model_unknown", {"training.checkpointing.metric_for_best_model": "bleu"}),
    cfg_case("save_strategy_best", {"training.checkpointing.save_strategy": "best"}),
    # the records themselves may be reported against the unknown format, but nothing derived from a count of
    # 0 accepted records (warmup_steps) may be
    cfg_case("data_format_unknown", {"data.format": "jsonl"},
             allowed={"data.format", "data.train_path", "data.valid_path", "data.test_path"}),
    cfg_case("architecture_wrong", {"model.architecture": "encoder-decoder"}),
    # --- precision and device -----------------------------------------------------------------------
    cfg_case("fp16_and_bf16", {"training.hyperparameters.fp16": True, "training.hyperparameters.bf16": True,
                               "compute.mixed_precision": "fp16"}, field_="training.hyperparameters.bf16"),
    cfg_case("fp16_on_cpu", {"training.hyperparameters.fp16": True, "compute.mixed_precision": "fp16"},
             field_="training.hyperparameters.fp16"),
    cfg_case("mixed_precision_disagrees", {"compute.mixed_precision": "bf16"},
             check=lambda d, p, c: ("mixed_precision: no" in d["suggestion"]) or pytest.fail(d["suggestion"])),
    cfg_case("device_cuda_without_gpu", {"compute.device": "cuda"},
             check=lambda d, p, c: ("found none" in d["suggestion"] and "torch" in d["suggestion"])
             or pytest.fail(d["suggestion"])),
    cfg_case("device_unknown", {"compute.device": "tpu"}),
    cfg_case("nccl_on_cpu", {"compute.distributed_backend": "nccl"}),
    # --- the base checkpoint ------------------------------------------------------------------------
    cfg_case("max_seq_length_over_context", {"data.max_seq_length": 1024},
             check=lambda d, p, c: ("512" in d["expected"]) or pytest.fail(str(d))),
    cfg_case("hidden_size_disagrees", {"model.hidden_size": 64},
             check=lambda d, p, c: (d["value"] == 64 and "32" in d["expected"] and "32" in d["suggestion"])
             or pytest.fail(str(d))),
    Case("ckpt_missing_config_json", _ckpt_missing("config.json"), "CheckpointNotFound",
         field="model.base_checkpoint", check=_check_missing("config.json")),
    Case("ckpt_missing_weights", _ckpt_missing("*.safetensors"), "CheckpointNotFound",
         field="model.base_checkpoint", check=_check_missing("weights")),
    Case("ckpt_missing_tokenizer", _ckpt_missing_tokenizer, "CheckpointNotFound",
         field="model.base_checkpoint", check=_check_missing("tokenizer")),
    Case("ckpt_config_json_not_an_object", _ckpt_edit(lambda d: (d / "config.json").write_text("[]\n")),
         "CheckpointNotFound", field="model.base_checkpoint"),
    Case("ckpt_weights_truncated", _ckpt_edit(lambda d: (d / "model.safetensors").write_bytes(b"")),
         "CheckpointNotFound", field="model.base_checkpoint"),
    cfg_case("ckpt_spec_name_not_hub_id", {"model.base_checkpoint": "smollm3-base-8b"}, kind="CheckpointNotFound",
             field_="model.base_checkpoint",
             check=lambda d, p, c: ("HuggingFaceTB/SmolLM3-3B-Base" in d["suggestion"]) or pytest.fail(d["suggestion"])),
    Case("ckpt_hub_id_not_cached_offline", _hub_not_cached, "CheckpointNotFound", field="model.base_checkpoint",
         check=lambda d, p, c: ("HF_HUB_OFFLINE" in d["suggestion"]) or pytest.fail(d["suggestion"])),
    # --- data files ---------------------------------------------------------------------------------
    Case("train_missing", _missing_train, "DataPathNotFound", field="data.train_path", check=_check_missing_train),
    Case("train_missing_relative", _missing_relative_train, "DataPathNotFound", field="data.train_path",
         check=_check_missing_relative),
    Case("train_is_a_directory", lambda ctx: ctx.config({"data.train_path": str(ctx.tiny / "messages")}),
         "DataPathNotFound", field="data.train_path"),
    Case("train_empty", lambda ctx: ctx.train_file([]), "EmptyDataset", field="data.train_path",
         check=_check_empty),
    Case("train_blank_lines_only", lambda ctx: ctx.train_file(["", "   ", ""]), "EmptyDataset",
         field="data.train_path", check=_check_empty),
    Case("train_bad_json_line", lambda ctx: ctx.train_file(
        ctx.with_bad_line('{"messages": [{"role": "user", "content": "hi"}', at=3)),
         "InvalidDataset", field="data.train_path", line=3, check=_check_bad_json),
    Case("train_unknown_shape", lambda ctx: ctx.train_file(
        ctx.with_bad_line(json.dumps({"question": "VAT?", "answer": "12%"}), at=40)),
         "InvalidDataset", field="data.train_path", line=40),
    Case("train_empty_answer", lambda ctx: ctx.train_file(
        ctx.with_bad_line(json.dumps({"prompt": "Q: VAT rate?\nA:", "completion": "  "}), 2, "prompt_completion"),
        fmt="prompt_completion"), "InvalidDataset", field="data.train_path", line=2),
    Case("train_no_assistant_turn", lambda ctx: ctx.train_file(
        ctx.with_bad_line(json.dumps({"messages": [{"role": "user", "content": "VAT rate?"}]}), at=1)),
         "InvalidDataset", field="data.train_path", line=1),
    Case("train_mixed_shapes", lambda ctx: ctx.train_file(ctx.good_lines(n=60) + ctx.good_lines("text", 36)),
         "InvalidDataset", field="data.train_path", line=61),
    # every record of all three splits is rejected, and only that: the schedule rules must not compute a
    # total step count from the 0 records that survived (warmup_steps is fine)
    Case("train_format_forced_wrong", lambda ctx: ctx.config({"data.format": "text"}),
         "InvalidDataset", field="data.train_path", line=1,
         allowed={"data.train_path", "data.valid_path", "data.test_path"}),
    Case("valid_bad_line", _multiline_valid, "InvalidDataset", field="data.valid_path", line=5),
    # every record of every split loses its answer to truncation: training would drop them all
    cfg_case("every_answer_truncated", {"data.max_seq_length": 8}, kind="EmptyDataset", field_="data.train_path",
             allowed={"data.train_path", "data.valid_path", "data.test_path"},
             check=lambda d, p, c: ("max_seq_length=8" in d["suggestion"] and d["line_count"] == 96)
             or pytest.fail(str(d))),
    # --- outputs and tracking -----------------------------------------------------------------------
    Case("output_dir_under_a_file", _blocked_output, "InvalidConfig", field="logging.output_dir",
         check=_check_blocked),
    Case("logging_dir_under_a_file", _blocked_logging_dir, "InvalidConfig", field="logging.logging_dir",
         check=_check_blocked),
    Case("wandb_without_credentials", _wandb_no_credentials, "InvalidConfig", field="logging.wandb.enabled",
         check=lambda d, p, c: ("WANDB_MODE=offline" in d["suggestion"]) or pytest.fail(d["suggestion"])),
    # --- the environment: where a run writes outside its run dir ------------------------------------
    Case("datasets_cache_unwritable", _unwritable_env("HF_DATASETS_CACHE"), "InvalidConfig",
         field="HF_DATASETS_CACHE", check=_check_names_variable),
    Case("tmpdir_unwritable", _unwritable_env("TMPDIR"), "InvalidConfig", field="TMPDIR",
         check=_check_names_variable),
    Case("run_index_unwritable", _unwritable_env("XDG_CACHE_HOME"), "InvalidConfig", field="XDG_CACHE_HOME",
         check=lambda d, p, c: d["value"] == str(c.tmp / "blocker" / "cache" / "finance_smollm3") or pytest.fail(d)),
    # --- memory -------------------------------------------------------------------------------------
    Case("oom_absurd_batch_size", _oom, "OutOfMemory", exit=4, check=_check_oom),
]


# --------------------------------------------------------------------------------------------------
# Assertions shared by every row
# --------------------------------------------------------------------------------------------------

def snapshot(*roots: Path) -> dict:
    """Every file (sha256) and folder under roots: equal before and after = nothing written or removed."""
    out = {}
    for i, root in enumerate(roots):
        for p in sorted(root.rglob("*")):
            key = (i, str(p.relative_to(root)))
            out[key] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def error_payload(stderr: str) -> dict:
    """The last line of stderr is one strict-JSON object (no NaN/Infinity)."""
    assert stderr.strip(), "nothing on stderr"
    last = stderr.strip().splitlines()[-1]
    payload = json.loads(last, parse_constant=_reject_constant)
    assert payload == last_json(stderr)
    assert isinstance(payload, dict) and {"error", "details", "errors"} <= set(payload), payload
    return payload


def assert_contract(payload: dict) -> None:
    errors = payload["errors"]
    assert isinstance(errors, list) and errors, payload
    assert {"error": payload["error"], "details": payload["details"]} == errors[0], "top object is not errors[0]"
    for e in errors:
        d = e["details"]
        assert isinstance(d.get("suggestion"), str) and d["suggestion"].strip(), f"no suggestion: {e}"
        if e["error"] in CONFIG_ERRORS:
            assert {"field", "value", "expected"} <= set(d), f"config error without field/value/expected: {e}"
        if e["error"] in DATA_ERRORS:
            assert "path" in d and "field" in d, e
        if e["error"] == "InvalidDataset":
            assert isinstance(d.get("line"), int), e
        if e["error"] == "OutOfMemory":
            assert {"batch_size", "seq_length", "estimated_memory_gb", "available_memory_gb"} <= set(d), e


def relevant_entry(payload: dict, case: Case) -> dict:
    for e in payload["errors"]:
        d = e["details"]
        if e["error"] != case.kind:
            continue
        if case.field is not ANY and d.get("field", ANY) != case.field:
            continue
        if case.line is not ANY and d.get("line") != case.line:
            continue
        return e
    pytest.fail(f"no {case.kind} entry with field={case.field if case.field is not ANY else '*'} "
                f"line={case.line if case.line is not ANY else '*'} in {json.dumps(payload['errors'], indent=1)}")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_broken_config_is_rejected_by_validate_only(case: Case, tmp_path: Path, tiny_dir: Path):
    ctx = Ctx(tmp_path, tiny_dir)
    config_path = case.build(ctx)
    before = snapshot(tmp_path, tiny_dir)

    proc = run_cli("--config", config_path, "--validate-only", *ctx.args, env=ctx.env, timeout=600)

    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == case.exit, (proc.returncode, proc.stderr.strip().splitlines()[-1:])
    payload = error_payload(proc.stderr)
    assert_contract(payload)
    entry = relevant_entry(payload, case)
    if case.top:
        assert entry == payload["errors"][0], f"the relevant problem is not the top object: {payload}"
    if case.check:
        case.check(entry["details"], payload, ctx)
    allowed = case.allowed if case.allowed is not None else {case.field} if case.field is not ANY else None
    if allowed is not None:
        extra = [e for e in payload["errors"] if e["details"].get("field") not in allowed]
        assert not extra, f"follow-on errors for a config with one mistake: {extra}"
    assert snapshot(tmp_path, tiny_dir) == before, "--validate-only changed files on disk"


# --------------------------------------------------------------------------------------------------
# Several problems in one run; a valid config
# --------------------------------------------------------------------------------------------------

def test_every_load_problem_reported_in_one_run(tmp_path: Path, tiny_dir: Path):
    ctx = Ctx(tmp_path, tiny_dir)
    path = ctx.config({"training.hyperparameters.learning_rat": 1e-5, "training.hyperparameters.batch_size": "eight",
                       "data.train_path": DELETE, "logging.tensorbord": {}, "compute": [1]})
    proc = run_cli("--config", path, "--validate-only")
    assert "Traceback" not in proc.stderr
    payload = error_payload(proc.stderr)
    assert proc.returncode == 2
    assert_contract(payload)
    fields = [e["details"]["field"] for e in payload["errors"]]
    assert {"training.hyperparameters.learning_rat", "training.hyperparameters.batch_size", "data.train_path",
            "logging.tensorbord", "compute"} <= set(fields), fields


def test_every_validation_problem_reported_in_one_run(tmp_path: Path, tiny_dir: Path):
    ctx = Ctx(tmp_path, tiny_dir)
    (tmp_path / "blocker").write_text("x\n")
    valid = ctx.jsonl("valid.jsonl", ctx.good_lines(n=2) + ["{broken"])
    path = ctx.config({"training.hyperparameters.learning_rate": 0.0, "training.hyperparameters.weight_decay": -0.1,
                       "training.checkpointing.save_strategy": "best", "compute.distributed_backend": "nccl",
                       "logging.output_dir": str(tmp_path / "blocker" / "runs"),
                       "data.train_path": str(tmp_path / "missing.jsonl"), "data.valid_path": str(valid),
                       "model.hidden_size": 64})
    before = snapshot(tmp_path, tiny_dir)
    proc = run_cli("--config", path, "--validate-only")
    assert "Traceback" not in proc.stderr
    payload = error_payload(proc.stderr)
    assert proc.returncode == 2
    assert_contract(payload)
    # the first problem found is the top object: field rules run first, learning_rate first among them
    assert payload["error"] == "InvalidConfig"
    assert payload["details"]["field"] == "training.hyperparameters.learning_rate"
    found = {(e["error"], e["details"].get("field"), e["details"].get("line")) for e in payload["errors"]}
    for expected in [("InvalidConfig", "training.hyperparameters.learning_rate", None),
                     ("InvalidConfig", "training.hyperparameters.weight_decay", None),
                     ("InvalidConfig", "training.checkpointing.save_strategy", None),
                     ("InvalidConfig", "compute.distributed_backend", None),
                     ("InvalidConfig", "logging.output_dir", None),
                     ("DataPathNotFound", "data.train_path", None),
                     ("InvalidDataset", "data.valid_path", 3),
                     ("InvalidConfig", "model.hidden_size", None)]:
        assert expected in found, (expected, sorted(found, key=str))
    assert snapshot(tmp_path, tiny_dir) == before


def test_valid_config_validates_and_exits_0(tmp_path: Path, tiny_dir: Path):
    ctx = Ctx(tmp_path, tiny_dir)
    path = ctx.config()
    before = snapshot(tmp_path, tiny_dir)
    proc = run_cli("--config", path, "--validate-only")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert '"error"' not in proc.stderr
    assert "config OK" in proc.stdout and "train 96 samples (messages)" in proc.stdout
    assert snapshot(tmp_path, tiny_dir) == before, "--validate-only wrote to disk"


@pytest.mark.slow
def test_an_unwritable_environment_stops_a_run_before_its_run_dir_exists(tmp_path: Path, tiny_dir: Path):
    """A read-only home (the datasets cache, the run index) used to fail after setup, leaving a `failed` run dir
    that turned the rerun after the fix into RunExists."""
    blocker = tmp_path / "home-file"
    blocker.write_text("not a folder\n")
    path = write_config(tmp_path / "c.yaml", base_config(tiny_dir, tmp_path))
    proc = run_cli("--config", path, "--run-id", "r", env={"XDG_CACHE_HOME": str(blocker / "cache")})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last_json(proc.stderr)["details"]["field"] == "XDG_CACHE_HOME"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "logs").exists()


def test_the_write_probe_sees_a_read_only_filesystem(tmp_path, monkeypatch):
    """os.access answers yes to root on a read-only mount; the probe writes, so EROFS is seen."""
    import errno
    import os

    import train_finance_ssc_model as tf
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).startswith(str(tmp_path)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    assert tf._write_probe(tmp_path / "datasets") is None
    monkeypatch.setattr(os, "open", read_only)
    assert tf._write_probe(tmp_path / "datasets") == f"{tmp_path} is not writable (Read-only file system)"
    assert list(tmp_path.iterdir()) == []  # nothing created, not even the missing folder


def test_a_fifo_as_data_path_is_not_called_a_directory(tmp_path):
    import os

    import train_finance_ssc_model as tf
    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    _, problems = tf.scan_jsonl(fifo, "train", "auto", "absolute")
    assert [p["error"] for p in problems] == ["DataPathNotFound"]
    assert "not a regular file (a FIFO" in problems[0]["details"]["suggestion"]
    assert "directory" not in problems[0]["details"]["suggestion"]
