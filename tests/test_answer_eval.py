"""Answer evaluation (issue 26): the scoring rules case by case, the config rules of the answer metrics, and the real
CLI: --evaluate on references that write the same amounts differently (1.0) or one centavo off (0.0), and a run
that picks its best checkpoint by val_numeric_match. The run-level checks (manifest, test_predictions.jsonl
recomputed independently, console/trackers, baseline regressions, best/README.md) are in tests/test_analysis.py,
on its shared runs."""
from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

import train_finance_ssc_model as tf
from conftest import base_config, last_json, run_cli, set_key, write_config

D = Decimal


# --------------------------------------------------------------------------------------------------
# 1. The rules, case by case (answer_numbers: the values of one text)
# --------------------------------------------------------------------------------------------------

NUMBER_CASES = [
    # amounts and currency marks
    ("PHP 12,700.00", [D("12700.00")]),
    ("₱12700", [D("12700")]),
    ("₱ 12,700", [D("12700")]),
    ("Php 1,000,000.50", [D("1000000.50")]),
    ("PHP12,700.00", [D("12700")]),
    ("P12,700.00 due", [D("12700")]),  # a P directly before a digit, starting a word: a currency mark
    ("pay P5", [D("5")]),
    ("1P5", [D("1"), D("5")]),  # a P after a digit is inside a word: not a mark, so 1 and 5 (never 15)
    ("AP5", [D("5")]),
    ("PHPUnit 5", [D("5")]),  # PHP inside a longer word is not a mark
    ("no amount here", []),
    # the thousands form first, commas dropped
    ("12,700", [D("12700")]),
    ("1,2345", [D("1234"), D("5")]),  # the thousands form matches 1,234 first; 5 is a number of its own
    ("1234,567", [D("1234"), D("567")]),
    ("April 15, 2024", [D("15"), D("2024")]),  # ", " is not a thousands separator
    ("total 473,655.00.", [D("473655")]),  # the sentence's full stop is no decimal point
    # negatives
    ("(1,234.50)", [D("-1234.50")]),
    ("(PHP 1,234.50)", [D("-1234.50")]),  # the mark goes first, then the parentheses enclose the number
    ("( 1,234.50)", [D("1234.50")]),  # not directly in parentheses
    ("(AP5)", [D("5")]),
    ("a loss of -5", [D("-5")]),
    ("-5", [D("-5")]),
    ("-P500", [D("-500")]),
    ("A-5", [D("5")]),  # a - after a letter is a hyphen
    ("2023-2024", [D("2023"), D("2024")]),  # ... and after a digit
    ("1601-C", [D("1601")]),  # form numbers count
    ("2550Q", [D("2550")]),
    ("12%", [D("12")]),
    # rounding to centavos, half up
    ("0.005", [D("0.01")]),
    ("0.004", [D("0.00")]),
    ("12.345", [D("12.35")]),
    ("-12.345", [D("-12.35")]),
    ("99999999999999999999999.995", [D("100000000000000000000000.00")]),  # exact at any length
]


@pytest.mark.parametrize("text,values", NUMBER_CASES, ids=[c[0] for c in NUMBER_CASES])
def test_answer_numbers(text, values):
    got = tf.answer_numbers(text)
    assert got == values
    assert all(v == v.quantize(D("0.01")) for v in got)  # centavos


PAIR_CASES = [
    # (prediction, reference, numeric_match, numeric_f1, exact_match)
    ("PHP 12,700.00", "₱12700", True, 1.0, False),  # the same amount written differently
    ("PHP 12,700.01", "₱12700", False, 0.0, False),  # one centavo off
    ("PHP 12,699.99", "PHP 12,700.00", False, 0.0, False),
    ("12,700.004", "12700", True, 1.0, False),  # rounded to centavos first
    ("Pay 3 then 5.", "Pay 5 then 3.", True, 1.0, False),  # order does not matter
    ("5", "5 5", False, 2 / 3, False),  # a missing amount: P 1, R 1/2
    ("5 5 7", "5 5", False, 0.8, False),  # an extra amount: P 2/3, R 1
    ("", "PHP 5", False, 0.0, False),  # no amount at all
    ("(1,234.50)", "-1,234.50", True, 1.0, False),
    ("1,234.50", "(1,234.50)", False, 0.0, False),  # the sign counts
    ("BIR Form 1601-C", "BIR Form 1601-E", True, 1.0, False),  # the form letter is not a number
    ("BIR Form 2550Q", "BIR Form 2550M", True, 1.0, False),
    ("BIR Form 1701Q", "BIR Form 2550Q", False, 0.0, False),  # naming the wrong form is a wrong answer
    ("12% VAT", "VAT at 12 percent", True, 1.0, False),
    ("  The answer\n is  PHP 5. ", "The answer is PHP 5.", True, 1.0, True),  # whitespace collapsed
    ("The answer is PHP 5", "The answer is PHP 5.", True, 1.0, False),
    ("Use the Odoo journal.", "Open the bank journal.", None, None, False),  # no number: not scored on numbers
    ("Open the bank journal.", "Open the bank journal.", None, None, True),
    ("1", "Open the bank journal.", None, None, False),  # a number in the prediction alone does not count
]


@pytest.mark.parametrize("prediction,reference,numeric,f1,exact", PAIR_CASES,
                         ids=[f"{c[0]!r}~{c[1]!r}" for c in PAIR_CASES])
def test_score_one_pair(prediction, reference, numeric, f1, exact):
    summary, (row,) = tf.score_answers([(prediction, reference)])
    assert row["numeric_match"] is numeric
    assert row["exact_match"] is exact
    if f1 is None:
        assert row["numeric_f1"] is None
    else:
        assert row["numeric_f1"] == pytest.approx(f1)
    assert row["reference_numbers"] == [float(v) for v in tf.answer_numbers(reference)]
    assert row["prediction_numbers"] == [float(v) for v in tf.answer_numbers(prediction)]
    assert summary["records"] == 1 and summary["numeric_records"] == (0 if numeric is None else 1)


def test_summary_rates_and_records_without_numbers():
    pairs = [("PHP 5", "₱5.00"), ("PHP 6", "PHP 7"), ("PHP 1 and 2", "1"), ("same text", "same  text"),
             ("other", "no number here")]
    summary, rows = tf.score_answers(pairs)
    assert summary == {"records": 5, "numeric_records": 3, "numeric_match": pytest.approx(1 / 3),
                       "numeric_f1": pytest.approx((1.0 + 0.0 + 2 / 3) / 3), "exact_match": pytest.approx(1 / 5)}
    assert [r["numeric_match"] for r in rows] == [True, False, False, None, None]
    none, _ = tf.score_answers([("x", "y")])
    assert none["numeric_records"] == 0 and none["numeric_match"] is None and none["numeric_f1"] is None
    empty, _ = tf.score_answers([])
    assert empty["records"] == 0 and empty["exact_match"] is None


def test_numbers_beyond_floats_stay_exact_in_json():
    huge = "9" * 400
    _, (row,) = tf.score_answers([(huge, huge)])
    assert row["numeric_match"] is True
    assert row["reference_numbers"] == [huge + ".00"]  # a string, never a bare Infinity
    json.dumps(row, allow_nan=False)


def test_generation_batches_respect_rows_and_tokens():
    lengths = [10, 20, 30, 40, 50, 200]
    order = list(range(6))
    assert tf._generation_batches(lengths, order, 10, 8, 10_000) == [[0, 1, 2, 3, 4, 5]]
    assert tf._generation_batches(lengths, order, 10, 2, 10_000) == [[0, 1], [2, 3], [4, 5]]
    # rows x (longest prompt + 10 new tokens) <= 100: 2 x 30, 2 x 50, then 60 and 210 alone (one row always fits)
    assert tf._generation_batches(lengths, order, 10, 8, 100) == [[0, 1], [2, 3], [4], [5]]


def test_base_model_license_from_card_or_config(tmp_path):
    from types import SimpleNamespace

    def config_for(d: Path):
        return SimpleNamespace(resolved_paths={}, model=SimpleNamespace(base_checkpoint=str(d)))

    card = tmp_path / "card"
    card.mkdir()
    (card / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# SmolLM3\n")
    (card / "config.json").write_text(json.dumps({"license": "mit"}))
    assert tf.base_model_license(config_for(card)) == "apache-2.0"  # the card first
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "README.md").write_text("# no front matter\n")
    (conf / "config.json").write_text(json.dumps({"license": "mit"}))
    assert tf.base_model_license(config_for(conf)) == "mit"
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "README.md").write_text("---\n: [unclosed\n---\n")  # unreadable front matter: not a license
    assert tf.base_model_license(config_for(bare)) is None


def test_model_card_of_a_chat_lora_run_parses():
    """A manifest as a LoRA run on chat data with template arguments and a known license writes it: the card
    parses, carries them, and metrics the run did not produce are left out rather than written as null."""
    from huggingface_hub import ModelCard
    manifest = {
        "run_id": "r1", "base_model": "HuggingFaceTB/SmolLM3-3B", "tags": ["bir", "finance"],
        "dataset": {"name": "finance_ssc_bir_v1", "version": "2025-11-17", "test_samples": 10,
                    "format": {"train": "messages", "test": "messages"}},
        "test_results": {"test_loss": 1.25, "test_perplexity": 3.4903429574618414,
                         "answer_eval": {"records": 10, "exact_match": 0.1, "numeric_records": 0,
                                         "numeric_match": None, "numeric_f1": None,
                                         "predictions": "test_predictions.jsonl"}},
        "config": {"data": {"chat_template_kwargs": {"enable_thinking": False}}, "evaluation": {"max_new_tokens": 96}},
        "reproducibility": {"base_model_license": "apache-2.0", "versions": {"torch": "2.13"}},
        "lora": {"r": 16}, "hyperparameters": {"learning_rate": 2e-5}}
    text = tf.model_card(manifest, "ab" * 32)
    assert text == tf.model_card(manifest, "ab" * 32)
    card = ModelCard(text)
    assert card.data.license == "apache-2.0" and card.data.tags == ["bir", "finance"]
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == {
        "test_perplexity": 3.4903429574618414, "test_loss": 1.25, "exact_match": 0.1}
    assert "enable_thinking=False" in text and '{"enable_thinking": false}' in text
    assert "max_new_tokens=96" in text and "LoRA adapter" in text and "ab" * 32 in text


# --------------------------------------------------------------------------------------------------
# 2. Config: the answer metrics exist only under on_validation
# --------------------------------------------------------------------------------------------------

def test_answer_metrics_are_eval_metrics():
    for metric in ("val_numeric_match", "val_answer_exact_match"):
        assert tf.EVAL_METRICS[metric] is True  # greater is better
    assert tf.AnswerEvalConfig().max_records == 500 and tf.AnswerEvalConfig().on_validation is False


@pytest.mark.slow
@pytest.mark.parametrize("key", ["training.checkpointing.metric_for_best_model",
                                 "training.optimization.early_stopping_metric"])
def test_answer_metric_without_on_validation_is_refused(tiny_dir, tmp_path, key):
    cfg = set_key(base_config(tiny_dir, tmp_path), key, "val_numeric_match")
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--validate-only")
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = last_json(proc.stderr)
    assert err["error"] == "InvalidConfig"
    assert err["details"]["field"] == key and err["details"]["value"] == "val_numeric_match"
    assert "evaluation.answer_eval.on_validation: true" in err["details"]["suggestion"]
    # max_records 0 turns answer evaluation off, on_validation included
    cfg = set_key(set_key(cfg, "evaluation.answer_eval.on_validation", True), "evaluation.answer_eval.max_records", 0)
    proc = run_cli("--config", write_config(tmp_path / "c0.yaml", cfg), "--validate-only")
    assert proc.returncode == 2 and last_json(proc.stderr)["details"]["field"] == key
    cfg = set_key(cfg, "evaluation.answer_eval.max_records", 4)
    proc = run_cli("--config", write_config(tmp_path / "c4.yaml", cfg), "--validate-only")
    assert proc.returncode == 0, proc.stderr[-2000:]


# --------------------------------------------------------------------------------------------------
# 3. --evaluate: the same amounts written differently score 1.0, one centavo off 0.0
# --------------------------------------------------------------------------------------------------

AMOUNT_ANSWER = " VAT payable: PHP 12,700.00 on BIR Form 2550Q."


@pytest.fixture(scope="module")
def amount_checkpoint(tiny_dir, tmp_path_factory):
    """A checkpoint that answers AMOUNT_ANSWER to the first test prompts (trained here with plain torch until every
    answer token is the argmax, so greedy decoding reproduces it), and a JSONL file of those prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path_factory.mktemp("amount")
    torch.manual_seed(0)
    # fp32, as training loads it: the tiny model is stored in bf16, whose updates round away at this scale
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir / "model"), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(tiny_dir / "model"))
    test = [json.loads(x) for x in (tiny_dir / "prompt_completion" / "test.jsonl").read_text().splitlines()][:3]
    seqs = []
    for r in test:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(AMOUNT_ANSWER, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append((p + c, [-100] * len(p) + c))
    width = max(len(s) for s, _ in seqs)
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s, _ in seqs])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in seqs])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    answer = labels[:, 1:] != -100
    model.train()
    for _ in range(1500):
        outputs = model(input_ids=ids, attention_mask=mask, labels=labels)
        # every answer token the argmax, by a wide margin (a low loss), so greedy decoding reproduces the answer on
        # any CPU
        if bool((outputs.logits[:, :-1].argmax(-1) == labels[:, 1:])[answer].all()) and outputs.loss.item() < 0.05:
            break
        opt.zero_grad()
        outputs.loss.backward()
        opt.step()
    else:
        pytest.fail("the tiny model did not learn the amount answer")
    ckpt = out / "ckpt"
    model.save_pretrained(ckpt, safe_serialization=True)
    tok.save_pretrained(ckpt)
    data = out / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": AMOUNT_ANSWER}) + "\n" for r in test))
    return ckpt, data, out


def _evaluate(ckpt: Path, data: Path, predictions: Path) -> dict:
    proc = run_cli("--evaluate", ckpt, "--test-data", data, "--predictions-out", predictions, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_evaluate_scores_amounts_by_value(amount_checkpoint):
    ckpt, data, out = amount_checkpoint
    first = _evaluate(ckpt, data, out / "first.jsonl")
    rows = [json.loads(x) for x in (out / "first.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert all(r["prediction"] == AMOUNT_ANSWER.strip() or r["prediction"] == AMOUNT_ANSWER for r in rows), rows
    ae = first["answer_eval"]
    assert ae["predictions"] == str((out / "first.jsonl").resolve())
    assert (ae["records"], ae["numeric_records"], ae["numeric_match"], ae["numeric_f1"]) == (3, 3, 1.0, 1.0)
    # references built from what the checkpoint answered, the amounts written another way: still every amount right
    same = out / "same_amounts.jsonl"
    same.write_text("".join(json.dumps({"prompt": json.loads(line)["prompt"],
                                        "completion": r["prediction"].replace("PHP 12,700.00", "₱12700")},
                                       ensure_ascii=False) + "\n"
                            for line, r in zip(data.read_text().splitlines(), rows)), encoding="utf-8")
    assert "₱12700" in same.read_text(encoding="utf-8")
    got = _evaluate(ckpt, same, out / "same.jsonl")["answer_eval"]
    assert (got["numeric_records"], got["numeric_match"], got["numeric_f1"]) == (3, 1.0, 1.0)
    assert got["exact_match"] == 0.0  # the texts differ, the amounts do not
    # ... and one centavo off: no record right
    off = out / "one_centavo_off.jsonl"
    off.write_text("".join(json.dumps({"prompt": json.loads(line)["prompt"],
                                       "completion": r["prediction"].replace("12,700.00", "12,700.01")}) + "\n"
                           for line, r in zip(data.read_text().splitlines(), rows)))
    got = _evaluate(ckpt, off, out / "off.jsonl")["answer_eval"]
    assert (got["numeric_records"], got["numeric_match"], got["numeric_f1"]) == (3, 0.0, 0.5)  # 2550 still right
    scored = [json.loads(x) for x in (out / "off.jsonl").read_text().splitlines()]
    assert all(r["reference_numbers"] == [12700.01, 2550.0] and r["prediction_numbers"] == [12700.0, 2550.0]
               and r["numeric_match"] is False for r in scored)


@pytest.mark.slow
def test_evaluate_table_shows_the_answer_block(amount_checkpoint):
    ckpt, data, _ = amount_checkpoint
    proc = run_cli("--evaluate", ckpt, "--test-data", data)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for key in ("answer_eval.records", "answer_eval.numeric_match", "answer_eval.numeric_f1",
                "answer_eval.exact_match", "test_perplexity"):
        assert key in proc.stdout


def test_evaluate_checkpoint_returns_the_answer_block(amount_checkpoint, tmp_path):
    ckpt, data, _ = amount_checkpoint
    res = tf.evaluate_checkpoint(str(ckpt), str(data), predictions_out=str(tmp_path / "p.jsonl"))
    assert set(res["answer_eval"]) == {"records", "exact_match", "numeric_records", "numeric_match", "numeric_f1",
                                       "predictions"}
    assert res["answer_eval"]["numeric_match"] == 1.0
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 3


def test_predictions_out_needs_evaluate(capsys):
    with pytest.raises(SystemExit) as exc:
        tf.parse_args(["--config", "x.yaml", "--predictions-out", "p.jsonl"])
    assert exc.value.code == 2 and "--predictions-out goes with --evaluate" in capsys.readouterr().err


def test_help_documents_the_rules(capsys):
    with pytest.raises(SystemExit):
        tf.parse_args(["--help"])
    text = capsys.readouterr().out
    for phrase in ("numeric_match", "1601-C gives 1601", "2550Q gives 2550", "(1,234.50)", "centavos",
                   "12% counts as 12", "--predictions-out"):
        assert phrase in text, phrase


# --------------------------------------------------------------------------------------------------
# 4. The best checkpoint chosen by val_numeric_match
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_best_checkpoint_by_val_numeric_match(tiny_dir, tmp_path):
    cfg = base_config(tiny_dir, tmp_path, "prompt_completion")
    cfg = set_key(cfg, "training.checkpointing.metric_for_best_model", "val_numeric_match")
    cfg = set_key(cfg, "training.optimization.early_stopping_metric", "val_answer_exact_match")
    cfg = set_key(cfg, "training.optimization.early_stopping_patience", 10)
    cfg = set_key(cfg, "evaluation.answer_eval", {"max_records": 4, "on_validation": True})
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--run-id", "byanswers")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "byanswers"
    m = json.loads((run_dir / "run_manifest.json").read_text())
    evals = m["history"]["evals"]
    assert [e[0] for e in evals] == [0, 6, 12, 18, 24]
    for _, _, vals in evals:  # every evaluation scored answers, rates in [0, 1]
        assert 0.0 <= vals["val_numeric_match"] <= 1.0 and 0.0 <= vals["val_answer_exact_match"] <= 1.0
    assert "val_numeric_match" in proc.stdout and "val_answer_exact_match" in proc.stdout
    best = m["training_results"]["best_metric"]
    assert best["name"] == "val_numeric_match"
    details = {d["name"]: d for d in m["checkpoints"]["details"]}
    best_name = Path(m["checkpoints"]["best_checkpoint"]).name
    assert best["value"] == details[best_name]["metrics"]["val_numeric_match"]
    # Trainer's rule: the first evaluation with the highest value (after step 0, which saves no checkpoint)
    scored = [(step, vals["val_numeric_match"]) for step, _, vals in evals if step > 0]
    top = max(v for _, v in scored)
    assert details[best_name]["step"] == next(step for step, v in scored if v == top)
    perf = m["performance"]
    assert perf["val_answer_evals"] == len(evals)
    assert perf["val_answer_eval_seconds_per_eval"] > 0
    assert perf["eval_seconds"] >= perf["val_answer_eval_seconds_per_eval"] * (len(evals) - 1)


# --------------------------------------------------------------------------------------------------
# 5. A run: test_results.answer_eval and test_predictions.jsonl, recomputed independently
# --------------------------------------------------------------------------------------------------

def independent_numbers(text: str) -> list[int]:
    """The answer-evaluation rules (README "Answer evaluation") written again without the script's regexes: a scan
    over the characters, values as whole centavos (half up on the magnitude)."""
    kept, i = [], 0
    while i < len(text):  # currency marks out
        word_start = i == 0 or not text[i - 1].isalpha()
        if text.startswith(("PHP", "Php"), i) and word_start and not text[i + 3:i + 4].isalpha():
            i += 3
        elif text[i] == "₱":
            i += 1
        elif text[i] == "P" and text[i + 1:i + 2].isdigit() and (i == 0 or not (text[i - 1].isalnum()
                                                                               or text[i - 1] == "_")):
            i += 1
            continue
        else:
            kept.append(text[i])
            i += 1
            continue
        while i < len(text) and text[i].isspace():
            i += 1
    s = "".join(kept)
    values, i = [], 0
    while i < len(s):
        if not s[i].isdigit():
            i += 1
            continue
        start = j = i
        while j < len(s) and s[j].isdigit():
            j += 1
        whole = s[i:j]
        if len(whole) <= 3 and s[j:j + 1] == "," and s[j + 1:j + 4].isdigit() and len(s[j + 1:j + 4]) == 3:
            while s[j:j + 1] == "," and len(s[j + 1:j + 4]) == 3 and s[j + 1:j + 4].isdigit():
                whole += s[j + 1:j + 4]
                j += 4
        frac = ""
        if s[j:j + 1] == "." and s[j + 1:j + 2].isdigit():
            j += 1
            while j < len(s) and s[j].isdigit():
                frac += s[j]
                j += 1
        frac += "000"
        centavos = int(whole) * 100 + int(frac[:2]) + (1 if frac[2] >= "5" else 0)
        negative = (start > 0 and s[start - 1] == "(" and s[j:j + 1] == ")") or \
            (start > 0 and s[start - 1] == "-" and not (start > 1 and s[start - 2].isalnum()))
        values.append(-centavos if negative else centavos)
        i = j
    return values


def test_independent_rules_agree_on_the_rule_table():
    """The test's own implementation gives the script's values on every case of the table (so it can judge a
    run's file)."""
    for text in [c[0] for c in NUMBER_CASES] + [c[i] for c in PAIR_CASES for i in (0, 1)]:
        assert independent_numbers(text) == [int(v * 100) for v in tf.answer_numbers(text)], text



RUN_ANSWER = " VAT payable: PHP 12,700.00."  # short enough for the tiny model to learn in 36 steps
RUN_REFERENCES = (" VAT payable: ₱12700.", " VAT payable: PHP 9,999.99.", RUN_ANSWER, " No amount is due.")


@pytest.fixture(scope="module")
def amount_run(tiny_dir, tmp_path_factory):
    """A real run whose every train answer is one amount sentence, so the tiny model learns to write it; the test
    references cycle through the same amount written another way, another amount, the same sentence, and no
    amount: answer evaluation has matches, misses and records left out, and scores the first 12 of 16."""
    out = tmp_path_factory.mktemp("amount_run")
    src = {s: [json.loads(x) for x in (tiny_dir / "prompt_completion" / f"{s}.jsonl").read_text().splitlines()]
           for s in ("train", "valid", "test")}
    cfg = base_config(tiny_dir, out, "prompt_completion")
    for split, records in src.items():
        rows = [{"prompt": r["prompt"],
                 "completion": RUN_REFERENCES[i % 4] if split == "test" else RUN_ANSWER}
                for i, r in enumerate(records)]
        path = out / "data" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        cfg["data"][f"{split}_path"] = str(path)
    cfg = set_key(cfg, "training.hyperparameters.num_epochs", 3)
    cfg = set_key(cfg, "evaluation.answer_eval", {"max_records": 12})
    proc = run_cli("--config", write_config(out / "c.yaml", cfg), "--run-id", "amounts")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "runs" / "amounts", out / "data" / "test.jsonl", proc


@pytest.mark.slow
def test_run_answer_eval_recomputed_from_the_predictions_file(amount_run):
    """test_results.answer_eval and test_predictions.jsonl: one row per scored test record (the first max_records),
    and the numbers, per-record scores and rates recomputed here from the texts alone give the same values."""
    run_dir, test_path, proc = amount_run
    m = json.loads((run_dir / "run_manifest.json").read_text())
    ae = m["test_results"]["answer_eval"]
    assert set(ae) == {"records", "exact_match", "numeric_records", "numeric_match", "numeric_f1", "predictions"}
    assert ae["predictions"] == "test_predictions.jsonl"  # relative to the run dir
    rows = [json.loads(x) for x in (run_dir / ae["predictions"]).read_text(encoding="utf-8").splitlines()]
    test = [json.loads(x) for x in test_path.read_text(encoding="utf-8").splitlines()]
    assert ae["records"] == len(rows) == 12 < len(test)
    keys = {"index", "prompt", "reference", "prediction", "reference_numbers", "prediction_numbers", "exact_match",
            "numeric_match", "numeric_f1"}
    assert all(set(r) == keys for r in rows)
    assert [(r["index"], r["prompt"], r["reference"]) for r in rows] == \
        [(i, t["prompt"], t["completion"]) for i, t in enumerate(test[:12])]
    matches, f1s, exact = [], [], 0
    for r in rows:
        ref, pred = independent_numbers(r["reference"]), independent_numbers(r["prediction"])
        assert r["reference_numbers"] == [v / 100 for v in ref]
        assert r["prediction_numbers"] == [v / 100 for v in pred]
        same_text = " ".join(r["prediction"].split()) == " ".join(r["reference"].split())
        exact += same_text
        assert r["exact_match"] is same_text
        if not ref:
            assert r["numeric_match"] is None and r["numeric_f1"] is None
            continue
        common = sum(min(ref.count(v), pred.count(v)) for v in set(ref))
        matches.append(sorted(ref) == sorted(pred))
        f1s.append(2 * common / (len(ref) + len(pred)))
        assert r["numeric_match"] is matches[-1] and r["numeric_f1"] == pytest.approx(f1s[-1])
    assert ae["numeric_records"] == len(matches) == 9  # every fourth reference has no amount
    assert ae["numeric_match"] == pytest.approx(sum(matches) / len(matches))
    assert ae["numeric_f1"] == pytest.approx(sum(f1s) / len(f1s))
    assert ae["exact_match"] == pytest.approx(exact / len(rows))
    # the model learned to write amounts: the comparison is not vacuous
    assert any(r["prediction_numbers"] for r in rows), [r["prediction"] for r in rows]
    perf = m["performance"]
    assert perf["answer_eval_seconds"] > 0 and perf["test_eval_seconds"] > 0 and perf["samples_seconds"] > 0
    assert perf["answer_eval_over_test_eval_and_samples"] == pytest.approx(
        perf["answer_eval_seconds"] / (perf["test_eval_seconds"] + perf["samples_seconds"]), abs=2e-3)
    assert f"numeric_match {format(ae['numeric_match'], '.4f')}" in proc.stdout
