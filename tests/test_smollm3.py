"""The real SmolLM3's ways, on the tiny SmolLM3-faithful model: bf16 storage trained on fp32 master weights, a chat
template that reads the clock pinned to the run's date, /no_think's empty think block kept out of the loss, template
variables everywhere, and data that does not fit max_seq_length refused with the numbers."""
from __future__ import annotations

import json
import math
import shutil
import signal
from pathlib import Path

import pytest

import train_finance_ssc_model as tf
from conftest import base_config, last_json, run_cli, set_key, write_config

DAY1, DAY2 = "2025-11-17", "2025-11-18"


def manifest(out: Path, run_id: str) -> dict:
    return json.loads((out / "runs" / run_id / "run_manifest.json").read_text())


def config_for(tiny_dir: Path, tmp_path: Path, cfg: dict):
    return tf.load_training_config(str(write_config(tmp_path / "c.yaml", cfg)))


def first_record(tiny_dir: Path) -> dict:
    return json.loads((tiny_dir / "messages" / "train.jsonl").read_text().splitlines()[0])


# -- fp32 master weights for a bf16-stored checkpoint -------------------------------------------------------------

@pytest.fixture(scope="module")
def fp32_copy(tiny_dir, tmp_path_factory) -> Path:
    """The bf16-stored tiny model's values, stored as fp32 (bf16 -> fp32 is exact)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path_factory.mktemp("fp32") / "model"
    AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_dir / "model").save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    return out


@pytest.mark.slow
def test_bf16_checkpoint_learns_like_its_fp32_copy(tiny_dir, fp32_copy, tmp_path):
    """100 steps at lr 2e-5 from the bf16 checkpoint and from its fp32 copy: full fine-tuning trains fp32 master
    weights either way, so the validation loss falls alike (pure bf16 training rounds most of these updates away:
    the issue measured 30% of the fp32 decrease). best/ is written back in each checkpoint's stored dtype, and the
    test evaluation says it measured the fp32 weights."""
    assert json.loads((tiny_dir / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    results = {}
    for name, model in (("bf16", tiny_dir / "model"), ("fp32", fp32_copy)):
        cfg = base_config(tiny_dir, tmp_path)
        cfg["model"]["base_checkpoint"] = str(model)
        hp = cfg["training"]["hyperparameters"]
        hp.update(learning_rate=2e-5, batch_size=6, num_epochs=6.25, warmup_steps=10)  # 16 steps/epoch: 100 steps
        cfg["logging"].update(eval_steps=25, logging_steps=25)
        cfg["evaluation"]["num_samples"] = 0
        proc = run_cli("--config", write_config(tmp_path / f"{name}.yaml", cfg), "--run-id", name, "--skip-dry-run")
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = manifest(tmp_path, name)
    bf16, fp32 = results["bf16"], results["fp32"]
    for m, stored in ((bf16, "bfloat16"), (fp32, "float32")):
        assert m["training_results"]["total_steps"] == 100
        assert m["precision"]["parameter_dtype"] == "float32" and m["precision"]["base_stored_dtype"] == stored
        assert m["precision"]["compute_dtype"] == "float32" and m["test_results"]["evaluated_dtype"] == "float32"
        assert m["checkpoints"]["best_archive_dtype"] == stored
        best = tmp_path / "runs" / m["run_id"] / "best"
        assert json.loads((best / "config.json").read_text())["dtype"] == stored
        from safetensors import safe_open
        with safe_open(str(best / "model.safetensors"), "pt") as fh:
            assert {str(fh.get_tensor(k).dtype) for k in fh.keys()} == {f"torch.{stored}"}
        assert tf.check_checkpoint_integrity(best, resume=False) is None  # best/'s checksums follow its rewrites
        ckpt = tmp_path / "runs" / m["run_id"] / m["checkpoints"]["final_checkpoint"]
        with safe_open(str(ckpt / "model.safetensors"), "pt") as fh:  # training checkpoints stay exact fp32
            assert {str(fh.get_tensor(k).dtype) for k in fh.keys()} == {"torch.float32"}
    drop = {n: m["training_results"]["initial_val_loss"] - m["training_results"]["final_val_loss"]
            for n, m in results.items()}
    assert drop["fp32"] > 0
    assert abs(drop["bf16"] - drop["fp32"]) <= 0.05 * drop["fp32"], drop
    assert bf16["training_results"]["final_val_loss"] == pytest.approx(fp32["training_results"]["final_val_loss"],
                                                                      rel=0.03)
    # best/ in bf16 is half the size of the fp32 checkpoint it came from
    best = tmp_path / "runs" / "bf16" / "best" / "model.safetensors"
    source = tmp_path / "runs" / "bf16" / bf16["checkpoints"]["best_checkpoint"] / "model.safetensors"
    assert best.stat().st_size < 0.6 * source.stat().st_size


def test_precision_facts_and_the_memory_estimate_agree(tiny_dir, tmp_path):
    """The dtypes load_base_model uses are the ones the estimate counts: fp32 master weights for full fine-tuning
    (16 B/param + a 2 B/param autocast copy under bf16), a LoRA base frozen in the compute dtype (2 B/param under
    bf16, no autocast copy)."""
    ck = json.loads((tiny_dir / "model" / "config.json").read_text())
    n = 1_000_000
    cfg = set_key(set_key(base_config(tiny_dir, tmp_path), "compute.mixed_precision", "bf16"),
                  "training.hyperparameters.bf16", True)
    full = tf.estimate_memory(config_for(tiny_dir, tmp_path, cfg), ck, n)
    assert full["precision"] == {"parameter_dtype": "float32", "frozen_base_dtype": None,
                                 "base_stored_dtype": "bfloat16", "compute_dtype": "bfloat16",
                                 "best_dtype": "bfloat16"}
    assert full["weights_grads_optimizer_bytes"] == 18 * n
    lora = tf.estimate_memory(config_for(tiny_dir, tmp_path, set_key(cfg, "model.lora.enabled", True)), ck, n)
    assert lora["precision"]["frozen_base_dtype"] == "bfloat16" and lora["precision"]["best_dtype"] == "float32"
    adapters = lora["trainable_parameters"]
    assert lora["weights_grads_optimizer_bytes"] == 2 * n + 16 * adapters


def test_load_base_model_trains_fp32_from_a_bf16_checkpoint(tiny_dir, tmp_path):
    import torch
    config = config_for(tiny_dir, tmp_path, base_config(tiny_dir, tmp_path))
    model = tf.load_base_model(config, "sdpa")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.no_rope_layers == [1, 0] and model.config.tie_word_embeddings  # SmolLM3's shape, tiny
    lora = config_for(tiny_dir, tmp_path, set_key(base_config(tiny_dir, tmp_path), "model.lora.enabled", True))
    peft_model = tf.load_base_model(lora, "sdpa")
    assert {p.dtype for p in peft_model.parameters() if p.requires_grad} == {torch.float32}


# -- a chat template that reads the clock ------------------------------------------------------------------------

def test_pinned_template_renders_the_run_date_whatever_the_clock(tiny_dir, tmp_path):
    config = config_for(tiny_dir, tmp_path, base_config(tiny_dir, tmp_path))
    tok = tf.load_tokenizer(config)
    assert tf.template_reads_date(tok.chat_template)
    rec = first_record(tiny_dir)
    rendered = {}
    for day in (DAY1, DAY2):
        config.template_date = day
        kwargs = tf.template_kwargs(config)
        rendered[day] = tok.apply_chat_template(rec["messages"], tokenize=False, **kwargs)
        row = tf.tokenize_record(rec, tok, "messages", 10_000, False, kwargs)
        assert tok.decode(row["input_ids"]) == rendered[day]
    assert "Today Date: 17 November 2025\n" in rendered[DAY1] and "Today Date: 18 November 2025\n" in rendered[DAY2]
    # the same record is other tokens on another day: what pinning the date protects a resume from
    assert rendered[DAY1] != rendered[DAY2]
    pinned = tf.pinned_chat_template("{{ strftime_now('%Y-%m-%d %A %d %B %y, 100%%') }}", "2024-02-29")
    from transformers.utils.chat_template_utils import render_jinja_template
    assert render_jinja_template([[]], chat_template=pinned)[0] == ["2024-02-29 Thursday 29 February 24, 100%"]
    assert tf.chat_template_sha256(tok.chat_template) == tf.chat_template_record(config)["sha256"]


@pytest.mark.slow
def test_killed_on_day_one_resumed_on_day_two_is_bit_identical(tiny_dir, tmp_path):
    """A run started on day 1 and killed, resumed on day 2 with a fresh datasets cache (nothing tokenized on day 1
    is reused), ends bit-identical to an uninterrupted day-1 run: the resume renders with the recorded date."""
    cfg = set_key(base_config(tiny_dir, tmp_path), "evaluation.num_samples", 0)
    path = write_config(tmp_path / "c.yaml", cfg)
    day1 = {"FINANCE_TRAINER_TEST_TODAY": DAY1}
    proc = run_cli("--config", path, "--run-id", "ref", env=day1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("--config", path, "--run-id", "k", env={**day1, "FINANCE_TRAINER_INJECT_SIGNAL": "15:SIGKILL"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    fresh = tmp_path / "day2-datasets-cache"
    proc = run_cli("--config", path, "--run-id", "k", "--resume-from", "latest",
                   env={"FINANCE_TRAINER_TEST_TODAY": DAY2, "HF_DATASETS_CACHE": str(fresh)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # day 2 tokenized afresh, in its own cache, with day 1's date in every record's metadata block (were the
    # template left to read the clock, both runs would render today and still match each other)
    from datasets import Dataset
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_dir / "model")
    tokenized = [ds for ds in (Dataset.from_file(str(p)) for p in fresh.rglob("*.arrow"))
                 if "input_ids" in ds.column_names]
    assert tokenized and all("Today Date: 17 November 2025\n" in tok.decode(ds[0]["input_ids"]) for ds in tokenized)
    from safetensors.torch import load_file
    import torch
    a = load_file(tmp_path / "runs" / "ref" / "checkpoint-epoch-2" / "model.safetensors")
    b = load_file(tmp_path / "runs" / "k" / "checkpoint-epoch-2" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m = manifest(tmp_path, "k")
    assert m["resume_from"]["step"] == 12 and m["chat_template"]["reads_date"]
    assert m["chat_template"]["date"] == DAY1 == manifest(tmp_path, "ref")["chat_template"]["date"]
    assert m["chat_template"]["kwargs"] == {"enable_thinking": False}
    meta = json.loads((tmp_path / "runs" / "k" / "checkpoint-epoch-2" / "checkpoint_meta.json").read_text())
    assert meta["chat_template"]["date"] == DAY1


@pytest.mark.slow
def test_a_malformed_today_hook_is_refused(tiny_dir, tmp_path):
    path = write_config(tmp_path / "c.yaml", base_config(tiny_dir, tmp_path))
    proc = run_cli("--config", path, "--validate-only", env={"FINANCE_TRAINER_TEST_TODAY": "17/11/2025"})
    assert proc.returncode == 2
    assert last_json(proc.stderr)["details"]["field"] == "FINANCE_TRAINER_TEST_TODAY"


# -- reasoning mode and template variables -------------------------------------------------------------------------

def test_no_think_block_is_prompt_not_answer(tiny_dir, tmp_path):
    config = config_for(tiny_dir, tmp_path, base_config(tiny_dir, tmp_path))
    tok = tf.load_tokenizer(config)
    rec = first_record(tiny_dir)
    answer_text = rec["messages"][-1]["content"]
    row = tf.tokenize_record(rec, tok, "messages", 10_000, False, tf.template_kwargs(config))
    prompt = tok.decode([i for i, lab in zip(row["input_ids"], row["labels"]) if lab == tf.IGNORE_INDEX])
    answer = tok.decode([lab for lab in row["labels"] if lab != tf.IGNORE_INDEX])
    assert "Reasoning Mode: /no_think" in prompt and prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n")
    assert answer == answer_text + "<|im_end|>\n"
    # a record's own chat_template_kwargs overrides the config's: this one trains in /think mode
    own = {**rec, "chat_template_kwargs": {"enable_thinking": True}}
    row = tf.tokenize_record(own, tok, "messages", 10_000, False, tf.template_kwargs(config))
    prompt = tok.decode([i for i, lab in zip(row["input_ids"], row["labels"]) if lab == tf.IGNORE_INDEX])
    assert "Reasoning Mode: /think" in prompt and "<think>" not in prompt
    # null is unset (datasets fills a key other records have with null)
    assert tf.record_template_kwargs({"enable_thinking": False}, {"chat_template_kwargs": {"enable_thinking": None}}) \
        == {"enable_thinking": False}
    # the generation prompt of samples and evaluation is the training prompt
    gen_prompt, reference = tf.prompt_and_reference(rec, "messages", tok, tf.template_kwargs(config))
    assert gen_prompt.endswith("<think>\n\n</think>\n") and reference == answer_text


@pytest.mark.slow
def test_no_think_data_trains_without_the_think_block_in_its_loss(tiny_dir, tmp_path):
    """The dry run's masked sample, from the real CLI: what the loss trains on is the answer and <|im_end|>, never
    the empty think block /no_think puts before it."""
    path = write_config(tmp_path / "c.yaml", base_config(tiny_dir, tmp_path))
    day = {"FINANCE_TRAINER_TEST_TODAY": DAY1}  # the same date in the CLI and here: the same metadata block
    proc = run_cli("--config", path, "--dry-run", "--run-id", "nothink", "--max-steps", "2", env=day)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sample = json.loads((tmp_path / "runs" / "nothink" / "dry_run_report.json").read_text())["sample"]
    rec = first_record(tiny_dir)
    assert sample["answer_text_trained"] == (rec["messages"][-1]["content"] + "<|im_end|>\n")[:400]
    assert "think" not in sample["answer_text_trained"]
    # the config's enable_thinking: false reached the template (the metadata block says /no_think), and the empty
    # think block it adds is in the masked part: the prompt is exactly as long as /no_think's, longer than /think's
    assert "Reasoning Mode: /no_think" in sample["prompt_text_masked"]
    config = config_for(tiny_dir, tmp_path, base_config(tiny_dir, tmp_path))
    config.template_date = DAY1
    tok = tf.load_tokenizer(config)
    prompt_tokens = {}
    for thinking in (False, True):
        row = tf.tokenize_record(rec, tok, "messages", 10_000, False,
                                 {**tf.template_kwargs(config), "enable_thinking": thinking})
        prompt_tokens[thinking] = sum(label == tf.IGNORE_INDEX for label in row["labels"])
    assert sample["tokens"] - sample["answer_tokens"] == prompt_tokens[False] > prompt_tokens[True]


@pytest.mark.slow
def test_reasoning_mode_left_on_for_answers_without_reasoning_is_warned(tiny_dir, tmp_path):
    cfg = base_config(tiny_dir, tmp_path)
    cfg["data"].pop("chat_template_kwargs")
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--validate-only")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = [line for line in proc.stdout.splitlines() if "reasoning mode" in line]
    assert len(warned) == 1 and "data.chat_template_kwargs.enable_thinking: false" in warned[0]
    proc = run_cli("--config", write_config(tmp_path / "d.yaml", base_config(tiny_dir, tmp_path)), "--validate-only")
    assert proc.returncode == 0 and "reasoning mode" not in proc.stdout


@pytest.mark.slow
def test_template_kwargs_are_checked(tiny_dir, tmp_path):
    cfg = set_key(base_config(tiny_dir, tmp_path), "data.chat_template_kwargs", {"messages": []})
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--validate-only")
    assert proc.returncode == 2 and last_json(proc.stderr)["details"]["field"] == "data.chat_template_kwargs"
    bad = tmp_path / "train.jsonl"
    lines = (tiny_dir / "messages" / "train.jsonl").read_text().splitlines()
    lines[2] = json.dumps({**json.loads(lines[2]), "chat_template_kwargs": ["enable_thinking"]})
    bad.write_text("\n".join(lines) + "\n")
    cfg = set_key(base_config(tiny_dir, tmp_path), "data.train_path", str(bad))
    proc = run_cli("--config", write_config(tmp_path / "d.yaml", cfg), "--validate-only")
    assert proc.returncode == 2
    err = last_json(proc.stderr)["details"]
    assert err["line"] == 3 and "chat_template_kwargs" in err["problem"]


def test_best_generation_config_stops_at_the_end_of_turn(chatml_model, tmp_path):
    """A tokenizer whose EOS is <|endoftext|> while its template closes turns with <|im_end|>: best/'s
    generation_config lists both, and chat_template_kwargs.json holds the run's template variables."""
    d = tmp_path / "best"
    shutil.copytree(chatml_model, d)
    (d / "generation_config.json").unlink()
    rewritten = tf.prepare_for_serving(d, None, {"enable_thinking": False})
    from transformers import AutoTokenizer, GenerationConfig
    tok = AutoTokenizer.from_pretrained(d)
    eos = GenerationConfig.from_pretrained(d).eos_token_id
    assert tok.eos_token == "<|endoftext|>" and sorted(eos) == sorted(
        [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")])
    assert json.loads((d / "chat_template_kwargs.json").read_text()) == {"enable_thinking": False}
    assert {"generation_config.json", "chat_template_kwargs.json"} <= set(rewritten)


@pytest.mark.slow
def test_a_template_whose_answers_do_not_end_a_turn_is_warned(chatml_model, tiny_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(chatml_model, model)
    template = (model / "chat_template.jinja").read_text()
    (model / "chat_template.jinja").write_text(template.replace("message['content'] + '<|im_end|>\\n'",
                                                                "message['content'] + '\\n'"))
    cfg = set_key(base_config(tiny_dir, tmp_path), "model.base_checkpoint", str(model))
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--validate-only")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not an end-of-turn token" in proc.stdout and "never learns to stop" in proc.stdout


# -- truncation with numbers ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_split_whose_answers_would_be_cut_is_refused_with_the_numbers(tiny_dir, tmp_path):
    """max_seq_length 300 cuts most answers of the tiny data: the training command refuses it before anything is
    written, naming the counts, the lines, P95/P99 and the max_seq_length that fits 99%; --validate-only says the
    same; truncation_side: left keeps the answers; a larger max_truncated_fraction lets it run with a warning."""
    cfg = set_key(base_config(tiny_dir, tmp_path), "data.max_seq_length", 300)
    path = write_config(tmp_path / "c.yaml", cfg)
    proc = run_cli("--config", path, "--run-id", "cut")
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = last_json(proc.stderr)
    assert err["error"] == "InvalidDataset" and not (tmp_path / "runs" / "cut").exists()
    by_field = {e["details"]["field"]: e["details"] for e in err["errors"]}
    train = by_field["data.train_path"]
    config = tf.load_training_config(str(path))
    tok = tf.load_tokenizer(config)
    records = [json.loads(x) for x in Path(cfg["data"]["train_path"]).read_text().splitlines()]
    rows = tf.tokenize_records(records, tok, "messages", 300, False, tf.template_kwargs(config))
    lengths = sorted(r["length"] for r in rows)
    cut = [i + 1 for i, r in enumerate(rows) if 0 < r["answer_lost"] < r["answer_total"]]
    dropped = [i + 1 for i, r in enumerate(rows) if r["answer_lost"] and r["answer_lost"] == r["answer_total"]]
    assert len(cut) + len(dropped) > 0.05 * len(rows)
    assert (train["answers_cut"], train["answers_dropped"]) == (len(cut), len(dropped))
    assert train["cut_lines"] == cut[:tf.MAX_TRUNCATION_LINES]
    nearest_rank = lambda p: lengths[math.ceil(p / 100 * len(lengths)) - 1]  # noqa: E731
    assert train["length_p99"] == train["max_seq_length_fitting_99_percent"] == nearest_rank(99)
    assert train["length_p95"] == nearest_rank(95) and train["length_p50"] == nearest_rank(50)
    assert "max_seq_length to" in train["suggestion"] and "truncation_side: left" in train["suggestion"]
    proc = run_cli("--config", path, "--validate-only")
    assert proc.returncode == 2 and last_json(proc.stderr)["details"]["answers_cut"] == train["answers_cut"]
    # left: the prompt's start goes, the answers stay (the tiny answers are far shorter than 300 tokens)
    proc = run_cli("--config", path, "--validate-only", "--set", "data.truncation_side=left")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 of 96 answers cut and 0 dropped whole by max_seq_length 300" in proc.stdout
    # a split allowed to lose more trains, with the numbers in a warning and the manifest
    proc = run_cli("--config", path, "--run-id", "allowed", "--skip-dry-run", "--set",
                   "data.max_truncated_fraction=1", "--set", "evaluation.num_samples=0",
                   "--set", "training.hyperparameters.num_epochs=1", "--set", "training.hyperparameters.warmup_steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"train: {len(cut)} of 96 answers cut (lines {', '.join(map(str, cut[:10]))}" in proc.stdout
    m = manifest(tmp_path, "allowed")
    assert m["dataset"]["truncation"]["train"]["answers_cut"] == len(cut)
    assert m["dataset"]["truncated_records"]["train"] == sum(x > 300 for x in lengths)


def test_left_truncation_keeps_the_answer(tiny_dir, tmp_path):
    config = config_for(tiny_dir, tmp_path, base_config(tiny_dir, tmp_path))
    tok = tf.load_tokenizer(config)
    rec = first_record(tiny_dir)
    full = tf.tokenize_record(rec, tok, "messages", 10_000, False, tf.template_kwargs(config))
    n = len(full["input_ids"]) - 40
    left = tf.tokenize_record(rec, tok, "messages", n, False, tf.template_kwargs(config), "left")
    right = tf.tokenize_record(rec, tok, "messages", n, False, tf.template_kwargs(config), "right")
    assert left["input_ids"] == full["input_ids"][-n:] and left["labels"] == full["labels"][-n:]
    assert left["answer_lost"] == 0 and left["truncated"]
    assert right["answer_lost"] > 0 and right["input_ids"] == full["input_ids"][:n]
