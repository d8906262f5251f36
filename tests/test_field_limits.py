"""Per-field limits declared in the config dataclasses' metadata, checked by one generic function.

The tables below are built from the metadata itself: every declared bound, choice list and finite flag is
driven just past its edge, so a limit declared on a new field is tested without editing this file. A few
are run through the real CLI (`--validate-only`) to check the payload a user sees.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import train_finance_ssc_model as tf
from conftest import base_config, last_json, run_cli, set_key, write_config

BOUNDS = ("minimum", "exclusive_minimum", "maximum", "exclusive_maximum")


def valid_config() -> tf.TrainingConfig:
    """Defaults plus the required keys; LoRA on, so that the limits that apply only then are checked too."""
    config = tf.TrainingConfig(
        model=tf.ModelConfig(base_checkpoint="model"), training=tf.TrainingSection(),
        data=tf.DataConfig(train_path="t", valid_path="v", test_path="s", dataset_name="n", dataset_version="1"),
        logging=tf.LoggingConfig(output_dir="runs"))
    config.model.lora.enabled = True
    return config


def declared_fields() -> list[tuple[str, dataclasses.Field, typing.Any]]:
    """(dotted key, field, type without Optional) of every YAML leaf key."""
    out = []

    def walk(cls: type, path: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if tf._is_optional(tp):
                tp = next(a for a in typing.get_args(tp) if a is not type(None))
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{path}.{f.name}")
            else:
                out.append((f"{path}.{f.name}", f, tp))
    for name, cls in tf.SECTIONS.items():
        walk(cls, name)
    return out


FIELDS = declared_fields()


def with_value(dotted: str, value: typing.Any) -> tf.TrainingConfig:
    config = valid_config()
    *parents, last = dotted.split(".")
    node = config
    for p in parents:
        node = getattr(node, p)
    setattr(node, last, value)
    return config


def problem_fields(config: tf.TrainingConfig) -> list[str]:
    return [p["details"]["field"] for p in tf._field_limit_problems(config)]


def outside(key: str, bound: float, tp: typing.Any) -> typing.Any:
    """A value just past `bound` on the wrong side."""
    step = 1 if tp is int else 0.5
    return {"minimum": bound - step, "exclusive_minimum": bound,
            "maximum": bound + step, "exclusive_maximum": bound}[key]


BOUND_CASES = [(dotted, key, f.metadata[key], tp) for dotted, f, tp in FIELDS for key in BOUNDS if key in f.metadata]
CHOICE_CASES = [(dotted, f) for dotted, f, _ in FIELDS if "choices" in f.metadata]
FLOAT_FIELDS = [dotted for dotted, _, tp in FIELDS if tp is float]


def test_the_valid_config_is_within_every_limit():
    assert tf._field_limit_problems(valid_config()) == []


def test_the_tables_cover_the_declared_limits():
    """The spec's numeric keys are here (a typo in a metadata key would drop a field from the tables)."""
    declared = {dotted for dotted, *_ in BOUND_CASES}
    assert {"training.hyperparameters.batch_size", "training.hyperparameters.learning_rate", "logging.eval_steps",
            "training.guards.spike_window", "compute.assumed_mfu", "model.lora.dropout"} <= declared
    assert {d for d, _ in CHOICE_CASES} >= {"training.optimization.optimizer", "compute.device", "compute.gpu_type"}
    known = {"doc", "int_stays_int", "choices", "finite", "non_empty", "check", "when", "expected", "suggestion",
             "closest", "recommended", "advice", *BOUNDS}
    for dotted, f, _ in FIELDS:
        assert set(f.metadata) <= known, (dotted, set(f.metadata) - known)


@pytest.mark.parametrize("dotted,key,bound,tp", BOUND_CASES, ids=[f"{c[0]}-{c[1]}" for c in BOUND_CASES])
def test_a_value_past_a_declared_bound_is_an_error_naming_the_field(dotted, key, bound, tp):
    bad = outside(key, bound, tp)
    problems = tf._field_limit_problems(with_value(dotted, bad))
    assert [p["details"]["field"] for p in problems] == [dotted], problems
    d = problems[0]["details"]
    assert problems[0]["error"] == "InvalidConfig" and d["value"] == bad and d["suggestion"].strip()
    at_bound_ok = key in ("minimum", "maximum")  # the inclusive bounds admit the bound itself
    assert (problem_fields(with_value(dotted, bound)) == []) == at_bound_ok


@pytest.mark.parametrize("dotted,f", CHOICE_CASES, ids=[c[0] for c in CHOICE_CASES])
def test_every_declared_choice_passes_and_anything_else_is_an_error(dotted, f):
    choices = tf._declared_choices(f.metadata)
    for choice in choices:
        assert problem_fields(with_value(dotted, choice)) == [], choice
    problems = tf._field_limit_problems(with_value(dotted, "no-such-choice"))
    assert [p["details"]["field"] for p in problems] == [dotted]
    assert problems[0]["details"]["value"] == "no-such-choice"


@pytest.mark.parametrize("dotted", FLOAT_FIELDS)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_no_number_may_be_inf_or_nan(dotted, bad):
    problems = tf._field_limit_problems(with_value(dotted, bad))
    assert [p["details"]["field"] for p in problems] == [dotted], problems


def test_limits_of_a_disabled_section_are_not_checked_but_numbers_stay_finite():
    config = with_value("model.lora.dropout", 1.0)
    config.model.lora.enabled = False
    assert problem_fields(config) == []
    config.model.lora.alpha = math.inf
    assert problem_fields(config) == ["model.lora.alpha"]


def test_a_new_field_gets_its_check_and_texts_by_declaring_them():
    @dataclass(kw_only=True)
    class Toy:
        steps: int = field(default=5, metadata={"minimum": 1})
        ratio: float = field(default=0.5, metadata={"exclusive_minimum": 0, "maximum": 1, "finite": True})
        mode: str = field(default="a", metadata={"choices": ("a", "b")})
        name: typing.Optional[str] = field(default=None, metadata={"non_empty": True})
        limit: int = field(default=4, metadata={"minimum": 1, "recommended": (3, None),
                                                "advice": "{field}={value}: low"})

    problems, warnings = [], []
    tf._section_limit_problems(Toy(steps=0, ratio=math.inf, mode="c", name=" ", limit=2), "toy", problems, warnings)
    got = {p["details"]["field"]: (p["details"]["expected"], p["details"]["suggestion"]) for p in problems}
    assert got == {"toy.steps": ("integer >= 1", "set steps: 5"), "toy.ratio": ("number in (0, 1]", "set ratio: 0.5"),
                   "toy.mode": ("one of ['a', 'b']", "set mode: a"), "toy.name": ("a non-empty string", "set name")}
    assert warnings == ["toy.limit=2: low"]
    problems, warnings = [], []
    tf._section_limit_problems(Toy(name=None), "toy", problems, warnings)  # null: no limits
    assert problems == [] and warnings == []


def test_cross_field_rules_do_not_repeat_a_field_outside_its_own_limits():
    res = tf.ValidationResult()
    tf._field_rules(with_value("compute.mixed_precision", "fp32"), res)
    assert [e["details"]["field"] for e in res.errors] == ["compute.mixed_precision"]
    assert res.errors[0]["details"]["expected"] == "no, fp16 or bf16"


# --------------------------------------------------------------------------------------------------
# Through the real CLI
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_declared_limits_reach_the_cli_error_payload(tmp_path: Path, tiny_dir: Path):
    cfg = base_config(tiny_dir, tmp_path / "out")
    broken = {"training.guards.spike_window": 1, "compute.assumed_mfu": 1.5, "compute.gpu_type": "H100-80G",
              "model.lora.enabled": True, "model.lora.dropout": 1.0,
              "training.optimization.early_stopping_metric": "val_los", "cost.gpu_hourly_usd": math.inf}
    for dotted, value in broken.items():
        cfg = set_key(cfg, dotted, value)
    proc = run_cli("--config", write_config(tmp_path / "cfg" / "c.yaml", cfg), "--validate-only")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    got = {e["details"]["field"]: e["details"] for e in last_json(proc.stderr)["errors"]}
    assert set(got) == {"training.guards.spike_window", "compute.assumed_mfu", "compute.gpu_type",
                        "model.lora.dropout", "training.optimization.early_stopping_metric", "cost.gpu_hourly_usd"}
    assert got["training.guards.spike_window"] == {
        "field": "training.guards.spike_window", "value": 1, "expected": "integer >= 2",
        "suggestion": "set spike_window: 10"}
    assert (got["compute.assumed_mfu"]["expected"], got["model.lora.dropout"]["expected"]) == (
        "number in (0, 1]", "number in [0, 1)")
    assert got["compute.gpu_type"]["suggestion"] == "use gpu_type: H100-80GB"
    assert got["training.optimization.early_stopping_metric"]["suggestion"] == "use val_loss"
    assert got["cost.gpu_hourly_usd"]["expected"] == "number >= 0"


@pytest.mark.slow
def test_limits_of_disabled_lora_are_not_enforced_and_advice_is_a_warning(tmp_path: Path, tiny_dir: Path):
    cfg = set_key(base_config(tiny_dir, tmp_path / "out"), "model.lora.dropout", 1.0)  # LoRA off: not checked
    cfg = set_key(cfg, "training.checkpointing.save_total_limit", 2)
    proc = run_cli("--config", write_config(tmp_path / "cfg" / "c.yaml", cfg), "--validate-only")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert "training.hyperparameters.learning_rate=0.01 is outside the recommended [1e-6, 1e-4]" in out
    assert "training.checkpointing.save_total_limit=2: the best, the latest and one backup" in out
