"""Packing keeps records apart under every attention implementation the script selects; steps are planned on
packed rows; the manifest's throughput, MFU, checkpoint count, anomaly epochs and optimizer mean what they say."""
from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import AutoConfig
from transformers.masking_utils import _preprocess_mask_arguments
from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

import train_finance_ssc_model as tf
from conftest import base_config, run_cli, set_key, write_config

RECORDS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16], [20, 21], [30, 31, 32]]


def packed_batch(attn: str) -> tuple[dict, list[list[int]]]:
    """The real collated training batch for `attn`: rows packed by pack_dataset, collated by the collator the
    trainer gets (collator_for); plus the record lengths of each row, in the order the batch holds them."""
    packed = tf.pack_dataset(Dataset.from_dict({"input_ids": RECORDS, "labels": RECORDS}), 9)
    assert len(packed) > 1  # several rows per micro-batch: the case flash-attention 2 got wrong
    batch = tf.collator_for(attn, pad_token_id=1)(list(packed))
    rows = [[len(RECORDS[i]) for i in row] for row in tf.pack_rows([len(r) for r in RECORDS], 9)]
    return batch, rows


def sdpa_like_is_packed(attn: str, tiny_dir: Path, batch: dict, rows: list[list[int]]) -> None:
    """sdpa, eager, flex_attention: masking_utils decides (with no 2D attention mask): each row gets a
    block-diagonal causal mask with one block per record, and one for the row's padding."""
    config = AutoConfig.from_pretrained(tiny_dir / "model")
    config._attn_implementation = attn
    embeds = torch.zeros(*batch["input_ids"].shape, config.hidden_size)
    _, _, seq_ids, *_ = _preprocess_mask_arguments(config, embeds, batch.get("attention_mask"), None,
                                                   batch["position_ids"], 0)
    assert seq_ids is not None, f"{attn}: masking_utils sees no packed sequences"
    width = batch["input_ids"].shape[1]
    expected = [row + ([width - sum(row)] if sum(row) < width else []) for row in rows]
    assert [torch.unique_consecutive(r, return_counts=True)[1].tolist() for r in seq_ids] == expected


def flash_is_packed(attn: str, tiny_dir: Path, batch: dict, rows: list[list[int]]) -> None:
    """flash-attention 2: _flash_attention_forward runs varlen from position_ids only when _is_packed_sequence
    (batch size 1) and no attention_mask or cu_seq_lens are given; the varlen boundaries are then the records."""
    assert "attention_mask" not in batch and "cu_seq_lens_q" not in batch
    assert _is_packed_sequence(batch["position_ids"], batch["input_ids"].shape[0])
    (cu_q, _), _ = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert torch.diff(cu_q).tolist() == [n for row in rows for n in row]


# The transformers code that decides, per attention implementation, whether a batch is packed.
DECIDES = {"sdpa": sdpa_like_is_packed, "eager": sdpa_like_is_packed, "flex_attention": sdpa_like_is_packed,
           "flash_attention_2": flash_is_packed}


@pytest.mark.parametrize("attn", tf.ATTENTION_IMPLEMENTATIONS)
def test_collated_packed_batch_is_packed_for_every_selectable_attention(tiny_dir, attn):
    assert attn in DECIDES  # a newly selectable implementation needs its check here
    batch, rows = packed_batch(attn)
    DECIDES[attn](attn, tiny_dir, batch, rows)


def test_flash_attention_batch_is_one_flattened_row_without_padding():
    batch, rows = packed_batch("flash_attention_2")
    assert batch["input_ids"].shape == (1, sum(map(sum, rows)))
    assert sorted(batch["input_ids"][0].tolist()) == sorted(t for r in RECORDS for t in r)
    starts = [i for i, p in enumerate(batch["position_ids"][0].tolist()) if p == 0]
    assert all(batch["labels"][0, i] == tf.IGNORE_INDEX for i in starts)  # nothing predicted across records


def packed_config(tiny_dir: Path, out: Path, **keys) -> dict:
    cfg = set_key(base_config(tiny_dir, out, "prompt_completion"), "data.packing", True)
    cfg = set_key(cfg, "data.max_seq_length", 512)
    for k, v in keys.items():
        cfg = set_key(cfg, k, v)
    return cfg


def validate(path: Path, cfg: dict) -> tf.ValidationResult:
    return tf.validate_config(tf.load_training_config(str(write_config(path, cfg))))


def test_warmup_is_checked_against_packed_steps(tiny_dir, tmp_path):
    # 96 records / batch 8 x 2 epochs = 24 steps unpacked (warmup 2 to 4 is near 10%); packed into rows of 512
    # there are fewer rows than records, so fewer steps
    warm = "training.hyperparameters.warmup_steps"
    unpacked = validate(tmp_path / "u.yaml",
                        set_key(packed_config(tiny_dir, tmp_path, **{warm: 4}), "data.packing", False))
    assert unpacked.ok and not any("warmup_steps" in w for w in unpacked.warnings)
    packed = validate(tmp_path / "p.yaml", packed_config(tiny_dir, tmp_path, **{warm: 4}))
    rows = packed.data["train"]["packed_rows"]
    steps = 2 * -(-rows // 8)
    assert rows <= 96 * 0.6 and steps < 24 and max(1, round(0.1 * steps)) * 2 < 4
    assert packed.ok and any(f"warmup_steps=4 is far from 10% of the {steps} total optimizer steps ({rows} packed rows"
                             in w for w in packed.warnings)
    too_long = validate(tmp_path / "e.yaml", packed_config(tiny_dir, tmp_path, **{warm: steps}))
    assert [e["details"]["field"] for e in too_long.errors] == [warm]
    assert too_long.errors[0]["details"]["expected"].startswith(f"fewer than the {steps} total optimizer steps")
    unpacked_same = validate(tmp_path / "u2.yaml",
                             set_key(packed_config(tiny_dir, tmp_path, **{warm: steps}), "data.packing", False))
    assert unpacked_same.ok  # unpacked, the same warmup is under the 24 steps


@pytest.fixture(scope="module")
def packed_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed_numbers")
    cfg = packed_config(tiny_dir, out, **{"training.hyperparameters.warmup_steps": 1})
    proc = run_cli("--config", write_config(out / "c.yaml", cfg), "--run-id", "p", "--skip-dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc, json.loads((out / "runs" / "p" / "run_manifest.json").read_text())


@pytest.mark.slow
def test_planned_steps_are_the_trained_steps(packed_run):
    _, proc, m = packed_run
    planned = int(re.search(r"(\d+) optimizer steps planned", proc.stdout).group(1))
    rows = m["dataset"]["packing"]["rows"]
    assert f"96 train (packed into {rows} rows)" in proc.stdout
    assert planned == m["training_results"]["max_steps"] == m["training_results"]["total_steps"] == 2 * -(-rows // 8)


@pytest.mark.slow
def test_throughput_counts_training_time_only(packed_run):
    _, _, m = packed_run
    p = m["performance"]
    tokens, runtime = p["tokens_trained_this_process"], p["train_runtime_seconds"]
    # training_seconds is written to 6 decimals, the rate to 2: equal up to that rounding
    assert p["tokens_per_second"] == pytest.approx(tokens / p["training_seconds"], rel=1e-4, abs=0.01)
    assert p["wall_tokens_per_second"] == round(tokens / runtime, 2)
    # evaluations (at step 0 and every 6 steps) and saves happened inside train() and are timed apart
    assert p["eval_seconds"] > 0 and p["save_seconds"] > 0 and p["training_seconds"] > 0
    assert p["training_seconds"] < runtime and p["tokens_per_second"] > p["wall_tokens_per_second"]


@pytest.mark.slow
def test_manifest_records_the_fused_adamw_that_ran(packed_run):
    out, _, m = packed_run
    assert m["hyperparameters"]["optimizer"] == "adamw"
    assert m["hyperparameters"]["optimizer_implementation"] == "adamw_torch_fused"
    ckpt = out / "runs" / "p" / m["checkpoints"]["final_checkpoint"]  # relative to the manifest's dir
    groups = torch.load(ckpt / "optimizer.pt", weights_only=False)["param_groups"]
    assert all(g["fused"] is True for g in groups)


def mfu_ctx(config: tf.TrainingConfig, params: int, trainable_estimate: int, attended: float):
    return SimpleNamespace(config=config, reproducibility={"hardware": {"gpu_model": "NVIDIA H100 80GB HBM3"}},
                           validation=SimpleNamespace(memory={"parameters": params,
                                                              "trainable_parameters": trainable_estimate},
                                                      checkpoint={"num_hidden_layers": 2, "hidden_size": 64}),
                           data_stats={"train": {"attended_length": attended}})


def test_mfu_uses_real_lengths_and_lora_flops(tiny_dir, tmp_path):
    path = write_config(tmp_path / "c.yaml", base_config(tiny_dir, tmp_path, "prompt_completion"))
    config = tf.load_training_config(str(path))
    # attended_length is sum(n^2) / sum(n) over the real tokenized train records
    tokenizer = tf.load_tokenizer(config)
    splits, stats = tf.load_splits(config, tokenizer, {s: "prompt_completion" for s in ("train", "valid", "test")})
    lengths = [len(x) for x in splits["train"]["input_ids"]]
    assert stats["train"]["attended_length"] == round(sum(n * n for n in lengths) / sum(lengths), 2)
    assert stats["train"]["attended_length"] < config.data.max_seq_length
    full = tf.model_flops_utilization(mfu_ctx(config, 1000, 1000, 100.0), 10.0)
    assert full["flops_per_token"] == 6 * 1000 + 12 * 2 * 64 * 100.0
    config.model.lora.enabled = True
    lora = tf.model_flops_utilization(mfu_ctx(config, 1000, 50, 100.0), 10.0, trainable=40)
    assert lora["flops_per_token"] == 4 * 1000 + 6 * 40 + 12 * 2 * 64 * 100.0
    assert lora["value"] == round(10.0 * lora["flops_per_token"] / 989e12, 4)


@pytest.mark.slow
def test_checkpoint_count_survives_kill_and_resume(tiny_dir, tmp_path):
    # one epoch of 12 steps, an evaluation (and so a save) every 4: checkpoints at steps 4, 8 and 12
    cfg = set_key(set_key(base_config(tiny_dir, tmp_path), "training.hyperparameters.num_epochs", 1),
                  "logging.eval_steps", 4)
    path = write_config(tmp_path / "c.yaml", cfg)
    killed = run_cli("--config", path, "--run-id", "k", "--skip-dry-run",
                     env={"FINANCE_TRAINER_INJECT_SIGNAL": "6:SIGKILL"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    manifest = tmp_path / "runs" / "k" / "run_manifest.json"
    assert json.loads(manifest.read_text())["cost"]["inputs"]["checkpoints_saved"] == 1  # the one at step 4
    resumed = run_cli("--config", path, "--run-id", "k", "--resume-from", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    saves = len(re.findall(r"INFO saved checkpoint-", killed.stdout + resumed.stdout))
    assert json.loads(manifest.read_text())["cost"]["inputs"]["checkpoints_saved"] == saves == 3


@pytest.mark.slow
def test_anomaly_step_and_epoch_are_the_same_moment(tiny_dir, tmp_path):
    # 12 micro-batches per epoch, accumulation 5: optimizer steps of 5, 5 and 2 micro-batches. Step 2 ends at
    # epoch 10/12; a NaN there is caught before it ends (state.epoch still holds step 1's 5/12).
    cfg = set_key(base_config(tiny_dir, tmp_path), "training.hyperparameters.gradient_accumulation_steps", 5)
    cfg = set_key(cfg, "training.hyperparameters.warmup_steps", 1)
    proc = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--run-id", "n", "--skip-dry-run",
                   env={"FINANCE_TRAINER_INJECT_NAN_AT_STEP": "2"})
    assert proc.returncode == 3, proc.stderr[-2000:]
    m = json.loads((tmp_path / "runs" / "n" / "run_manifest.json").read_text())
    stop = next(a for a in m["anomalies"] if a["action"] == "stopped")
    assert stop["step"] == 2 and stop["epoch"] == round(10 / 12, 4)
    saved = json.loads((tmp_path / "runs" / "n" / "checkpoint-2" / "checkpoint_meta.json").read_text())
    assert saved["step"] == 2 and saved["epoch"] == stop["epoch"]  # the checkpoint saved at the stop agrees


@pytest.mark.slow
def test_packing_without_a_varlen_kernel_is_flagged_before_training_with_its_cost(tiny_dir, tmp_path):
    # sdpa on CPU has no varlen kernel: --validate-only warns with the attention work and the optimizer steps
    # per epoch, packed and unpacked, and the numbers are the ones packing_cost gives for the real rows
    path = write_config(tmp_path / "p.yaml", packed_config(tiny_dir, tmp_path))
    proc = run_cli("--config", path, "--validate-only")
    assert proc.returncode == 0, proc.stderr[-2000:]
    warning = next(line for line in proc.stdout.splitlines() if "data.packing: true without a varlen" in line)
    cost = validate(tmp_path / "q.yaml", packed_config(tiny_dir, tmp_path)).data["train"]["packing_cost"]
    assert cost["attention_ratio"] > 1 and cost["steps_per_epoch_packed"] < cost["steps_per_epoch_unpacked"]
    for key in ("attention_scores_packed", "attention_scores_unpacked", "positions_packed", "positions_unpacked"):
        assert f"{cost[key]:,}" in warning
    assert (f"optimizer steps per epoch {cost['steps_per_epoch_packed']} packed, "
            f"{cost['steps_per_epoch_unpacked']} unpacked" in warning and "set data.packing: false" in warning)
    unpacked = validate(tmp_path / "u.yaml", set_key(packed_config(tiny_dir, tmp_path), "data.packing", False))
    assert not any("varlen" in w for w in unpacked.warnings)


def test_packing_cost_counts_padded_batches():
    # records 4, 3, 2, 1 tokens, batch 2: unpacked batches (4, 3) and (2, 1) padded to 4 and 2;
    # packed rows [4], [3, 1], [2] -> row widths 4, 4, 2: batches (4, 4) and (2)
    cost = tf.packing_cost([4, 3, 2, 1], [[0], [1, 3], [2]], global_batch=2, accumulation=1)
    assert cost["attention_scores_unpacked"] == 2 * 16 + 2 * 4 and cost["positions_unpacked"] == 2 * 4 + 2 * 2
    assert cost["attention_scores_packed"] == 2 * 16 + 1 * 4 and cost["positions_packed"] == 2 * 4 + 2
    assert cost["steps_per_epoch_unpacked"] == 2 and cost["steps_per_epoch_packed"] == 2
    # the default sampler (uniform shuffle): unpacked batches are a seeded shuffle of the records, so they carry
    # more padding than sorted ones, the same figures every time, and none when every record has one length
    lengths = [(i * 37) % 200 + 1 for i in range(64)]
    rows = tf.pack_rows(lengths, 256)
    grouped = tf.packing_cost(lengths, rows, global_batch=8, accumulation=1)
    uniform = tf.packing_cost(lengths, rows, global_batch=8, accumulation=1, grouped=False, seed=3)
    assert uniform == tf.packing_cost(lengths, rows, global_batch=8, accumulation=1, grouped=False, seed=3)
    assert uniform["positions_unpacked"] > grouped["positions_unpacked"] >= sum(lengths)
    assert uniform["attention_scores_unpacked"] > grouped["attention_scores_unpacked"]
    assert {k: v for k, v in uniform.items() if "unpacked" not in k and "ratio" not in k} == \
        {k: v for k, v in grouped.items() if "unpacked" not in k and "ratio" not in k}
    same = tf.packing_cost([5] * 8, [[0, 1], [2, 3], [4, 5], [6, 7]], global_batch=4, accumulation=1, grouped=False)
    assert same["positions_unpacked"] == 40 and same["attention_scores_unpacked"] == 8 * 25


def test_length_grouped_batches_are_seeded_shuffled_and_off_by_default(tiny_dir, tmp_path):
    # data.group_by_length: true gives the sampler: similar lengths per batch, the same order for the same
    # (seed, epoch) whatever the global RNG did (so a resume sees the same batches), another order next epoch;
    # the batches are transformers' length-grouped ones but trained in a shuffled order (not longest to shortest
    # within each mega-batch), the longest record's batch first. The default is Trainer's uniform shuffling.
    from transformers import AutoModelForCausalLM, TrainingArguments
    from transformers.trainer_pt_utils import get_length_grouped_indices
    lengths = [(i * 37) % 200 + 1 for i in range(66)]  # 16 batches of 4 and a partial one of 2
    ds = Dataset.from_dict({"input_ids": [[1] * n for n in lengths]})
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    args = TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, seed=3, use_cpu=True,
                             report_to=[])
    trainer = tf._trainer_class()(model=model, args=args, train_dataset=ds)
    trainer.run_config = tf.load_training_config(write_config(tmp_path / "c.yaml", base_config(tiny_dir, tmp_path)))
    assert trainer.run_config.data.group_by_length is False
    assert not isinstance(trainer._get_train_sampler(), tf.SeededLengthGroupedSampler)
    trainer.run_config = tf.load_training_config(write_config(
        tmp_path / "d.yaml", set_key(base_config(tiny_dir, tmp_path), "data.group_by_length", True)))
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, tf.SeededLengthGroupedSampler)
    first = list(sampler)
    torch.manual_seed(12345)
    assert list(sampler) == first and sorted(first) == list(range(66))
    sampler.set_epoch(1)
    assert list(sampler) != first

    def batches(order):
        return [order[k:k + 4] for k in range(0, len(order), 4)]

    def padding(order):  # padded positions over real positions, batches of 4 padded to their longest
        return sum(4 * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches(order)) / sum(lengths)
    assert padding(first) < padding(list(range(66)))
    hf = get_length_grouped_indices(lengths, 4, generator=torch.Generator().manual_seed(3))
    assert sorted(map(sorted, batches(first))) == sorted(map(sorted, batches(hf)))  # the same batches
    assert batches(first) != batches(hf) and batches(first)[0] == batches(hf)[0]  # another order, same first
    assert max(lengths[i] for i in batches(first)[0]) == max(lengths)
    assert len(batches(first)[-1]) == 2 and batches(first)[-1] == batches(hf)[-1]  # the partial batch last
