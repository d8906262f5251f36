"""Record shapes, answer-only label masking, truncation counting, datasets.map caching."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

import train_finance_ssc_model as tf
from conftest import base_config, write_config

IGNORE = tf.IGNORE_INDEX


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir / "model")


def first_record(tiny_dir, fmt):
    return json.loads((tiny_dir / fmt / "train.jsonl").read_text().splitlines()[0])


def split_by_label(tok, row):
    prompt = [i for i, l in zip(row["input_ids"], row["labels"]) if l == IGNORE]
    answer = [l for l in row["labels"] if l != IGNORE]
    return tok.decode(prompt), tok.decode(answer)


@pytest.mark.parametrize("fmt", ["text", "prompt_completion", "messages", "instruction"])
def test_shape_is_auto_detected(tiny_dir, fmt):
    assert tf.detect_shape(first_record(tiny_dir, fmt)) == fmt


@pytest.mark.parametrize("fmt", ["text", "prompt_completion", "messages", "instruction"])
def test_batched_tokenization_equals_one_record_at_a_time(tiny_dir, tok, fmt):
    """tokenize_records sends every piece of every record to the tokenizer in one batch call: the rows equal
    those of one record at a time, with truncation (a short max_seq_length) and prompt training both ways."""
    recs = [json.loads(line) for line in (tiny_dir / fmt / "train.jsonl").read_text().splitlines()[:20]]
    for max_len, on_prompt in ((10_000, False), (24, False), (10_000, True)):
        batch = tf.tokenize_records(recs, tok, fmt, max_len, on_prompt)
        assert batch == [tf.tokenize_record(r, tok, fmt, max_len, on_prompt) for r in recs]
    assert any(r["truncated"] for r in tf.tokenize_records(recs, tok, fmt, 24, False))


def test_prompt_completion_trains_on_completion_only(tiny_dir, tok):
    rec = first_record(tiny_dir, "prompt_completion")
    row = tf.tokenize_record(rec, tok, "prompt_completion", 10_000, train_on_prompt=False)
    prompt, answer = split_by_label(tok, row)
    assert prompt == rec["prompt"]
    assert answer == rec["completion"] + tok.eos_token
    assert len(row["input_ids"]) == len(row["labels"]) == len(row["attention_mask"])


def test_instruction_trains_on_output_only(tiny_dir, tok):
    rec = first_record(tiny_dir, "instruction")
    row = tf.tokenize_record(rec, tok, "instruction", 10_000, train_on_prompt=False)
    prompt, answer = split_by_label(tok, row)
    assert prompt == tf.render_instruction_prompt(rec)
    assert rec["instruction"].strip() in prompt
    assert answer == rec["output"] + tok.eos_token


def test_messages_train_on_assistant_turns_only(tiny_dir, tok):
    rec = first_record(tiny_dir, "messages")
    row = tf.tokenize_record(rec, tok, "messages", 10_000, train_on_prompt=False)
    prompt, answer = split_by_label(tok, row)
    assistant = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
    user = [m["content"] for m in rec["messages"] if m["role"] == "user"]
    assert all(a in answer for a in assistant)
    assert all(u in prompt and u not in answer for u in user)
    # the whole record is exactly the chat template's rendering
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(rec["messages"], tokenize=False)


def test_text_trains_on_everything(tiny_dir, tok):
    rec = first_record(tiny_dir, "text")
    row = tf.tokenize_record(rec, tok, "text", 10_000, train_on_prompt=False)
    assert row["labels"] == row["input_ids"]


def test_train_on_prompt_switch(tiny_dir, tok):
    rec = first_record(tiny_dir, "prompt_completion")
    row = tf.tokenize_record(rec, tok, "prompt_completion", 10_000, train_on_prompt=True)
    assert row["labels"] == row["input_ids"]


def test_truncation_is_flagged(tiny_dir, tok):
    rec = first_record(tiny_dir, "text")
    row = tf.tokenize_record(rec, tok, "text", 8, train_on_prompt=False)
    assert row["truncated"] and len(row["input_ids"]) == 8


def test_load_splits_counts_truncated_and_drops_answerless(tiny_dir, tok, tmp_path):
    rows = [json.loads(line) for line in (tiny_dir / "prompt_completion" / "train.jsonl").read_text().splitlines()]
    prompt_lens = [len(tok(r["prompt"])["input_ids"]) for r in rows]
    lengths = [p + len(tok(r["completion"])["input_ids"]) + 1 for p, r in zip(prompt_lens, rows)]
    limit = sorted(lengths)[len(lengths) // 2]  # half the records get truncated
    cfg = base_config(tiny_dir, tmp_path, "prompt_completion")
    cfg["data"]["max_seq_length"] = limit
    config = tf.load_training_config(str(write_config(tmp_path / "c.yaml", cfg)))
    shapes = {s: "prompt_completion" for s in ("train", "valid", "test")}
    splits, stats = tf.load_splits(config, tok, shapes)
    assert stats["train"]["truncated"] == sum(n > limit for n in lengths) > 0
    # a record keeps at least one trainable (shifted) answer token only if its prompt leaves room for one
    assert stats["train"]["dropped_no_answer_tokens"] == sum(p >= limit for p in prompt_lens)
    assert stats["train"]["samples"] == len(splits["train"]) == 96 - stats["train"]["dropped_no_answer_tokens"]
    assert all(any(l != IGNORE for l in row["labels"][1:]) for row in splits["train"])
    assert max(len(r["input_ids"]) for r in splits["train"]) <= limit


def test_collator_pads_to_longest_in_batch_not_max_seq_length():
    collate = tf.PadToLongestCollator(pad_token_id=0)
    batch = collate([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [IGNORE, 6, 7]},
                     {"input_ids": [5], "attention_mask": [1], "labels": [5]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [5, IGNORE, IGNORE]]
    assert all(t.dtype == __import__("torch").long for t in batch.values())
    packed = collate([{"input_ids": [5, 6, 7, 8], "labels": [IGNORE, 6, IGNORE, 8], "position_ids": [0, 1, 0, 1]},
                      {"input_ids": [5], "labels": [IGNORE], "position_ids": [0]}])
    assert set(packed) == {"input_ids", "labels", "position_ids"}  # no attention_mask for packed rows
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8], [5, 0, 0, 0]]
    assert packed["labels"].tolist() == [[IGNORE, 6, IGNORE, 8], [IGNORE, IGNORE, IGNORE, IGNORE]]
    assert packed["position_ids"].tolist() == [[0, 1, 0, 1], [0, 0, 1, 2]]  # padding: a record of its own


@pytest.mark.slow
def test_messages_without_a_chat_template_fail_in_preflight(tiny_dir, tmp_path):
    import shutil
    from conftest import last_json, run_cli
    model = tmp_path / "model"
    shutil.copytree(tiny_dir / "model", model)
    (model / "chat_template.jinja").unlink()
    cfg_json = json.loads((model / "tokenizer_config.json").read_text())
    cfg_json.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg_json))
    cfg = base_config(tiny_dir, tmp_path, "messages")
    cfg["model"]["base_checkpoint"] = str(model)
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--validate-only")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = last_json(proc.stderr)
    assert err["details"]["field"] == "model.base_checkpoint" and "chat_template" in err["details"]["suggestion"]
