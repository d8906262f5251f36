"""--plan (plan before renting): memory per GPU under DDP, FSDP full-shard, LoRA and QLoRA for a target GPU, wall
time and cost, from a config.json alone; the FSDP per-rank arithmetic; node prices; compute.fsdp refused on CPU.
Every number is checked against a hand computation written out here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train_finance_ssc_model as tf
from conftest import ROOT, base_config, last_json, run_cli, set_key, write_config

GiB = 2**30
H100_BYTES = 81559 * 2**20  # nvidia-smi's total for an H100 80GB

# The spec's production shape (vocab 49152, hidden 4096, 32 layers, 32 heads), with the 8B-class MLP width and
# 8 key/value heads; config.json only, no weights.
PROD = {"architectures": ["SmolLM3ForCausalLM"], "model_type": "smollm3", "vocab_size": 49152, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 65536, "tie_word_embeddings": True}
# A shape whose largest FSDP unit is the embedding, not a decoder layer.
WIDE_VOCAB = {**PROD, "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4,
              "num_attention_heads": 16, "num_key_value_heads": 16}

# Hand computation for PROD: head_dim 4096/32 = 128, kv_dim 8 x 128 = 1024
PROD_LAYER = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096  # 218,112,000
PROD_PARAMS = 49152 * 4096 + 32 * PROD_LAYER + 4096  # tied embedding + layers + final norm
assert PROD_LAYER == 218_112_000 and PROD_PARAMS == 7_180_914_688
TOKENS_PER_GPU = 4 * 2048  # batch_size x max_seq_length
ACT_PER_TOKEN_LAYER = (10 * 4096 + 4 * 14336 + 2 * 1024) * 2  # fp16 elements saved for backward, per token and layer
ACT_FULL = TOKENS_PER_GPU * 32 * ACT_PER_TOKEN_LAYER  # 52,613,349,376 B: every layer's set
ACT_CKPT = TOKENS_PER_GPU * (32 * 4096 * 2 + ACT_PER_TOKEN_LAYER)  # 3,791,650,816 B: layer inputs + one layer's set
LOGITS = TOKENS_PER_GPU * 49152 * 4 * 2  # fp32 logits + log-softmax
DDP_STATES = PROD_PARAMS * 18  # fp32 weights 4 + grads 4 + AdamW moments 8 + fp16 autocast copy 2
FSDP_STATES = PROD_PARAMS * 16 // 8  # the fp32 states split over 8 ranks (no autocast copy: FSDP casts per unit)
FSDP_GATHERED = 2 * max(PROD_LAYER, 49152 * 4096) * 2  # the largest unit (a layer here), computing + prefetched, fp16


def production_config(tiny_dir, tmp_path, **sets) -> Path:
    model = tmp_path / "prod-shape"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(PROD))
    cfg = base_config(tiny_dir, tmp_path)
    for key, value in {"model.base_checkpoint": str(model), "data.max_seq_length": 2048,
                       "training.hyperparameters.batch_size": 4,
                       "training.hyperparameters.gradient_accumulation_steps": 8,
                       "training.hyperparameters.num_epochs": 3, "training.hyperparameters.fp16": True,
                       "compute.device": "cuda", "compute.num_gpus": 8, "compute.distributed_backend": "nccl",
                       "compute.mixed_precision": "fp16", "compute.gpu_type": "H100-80GB", **sets}.items():
        cfg = set_key(cfg, key, value)
    return write_config(tmp_path / "prod.yaml", cfg)


def plan_json(config_path, *extra) -> dict:
    r = run_cli("--config", config_path, "--plan", "--json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.slow
def test_production_shape_on_8x_h100_ddp_does_not_fit_fsdp_does(tiny_dir, tmp_path):
    plan = plan_json(production_config(tiny_dir, tmp_path))
    assert (plan["gpu_type"], plan["num_gpus"], plan["model"]["parameters"]) == ("H100-80GB", 8, PROD_PARAMS)
    limit = 0.8 * H100_BYTES
    ddp, fsdp = plan["strategies"]["ddp"], plan["strategies"]["fsdp"]

    # DDP: a full replica per GPU does not fit, not even with gradient checkpointing
    assert ddp["fits"] is False and ddp["gradient_checkpointing"] is True
    assert ddp["bytes_per_gpu"] == DDP_STATES + ACT_CKPT + LOGITS == 136_269_340_672 > limit
    assert ddp["gb_per_gpu"] == round(136_269_340_672 / GiB, 3) == 126.911

    # FSDP full-shard fits, and needs gradient checkpointing to: without it the activations take it over 80%
    assert fsdp["fits"] is True and fsdp["gradient_checkpointing"] is True
    assert fsdp["config_change"] == {"compute.fsdp": "full_shard auto_wrap", "model.gradient_checkpointing": True}
    assert fsdp["breakdown"] == {"weights_grads_optimizer_bytes": FSDP_STATES, "gathered_units_bytes": FSDP_GATHERED,
                                 "activation_bytes": ACT_CKPT, "logits_bytes": LOGITS}
    assert fsdp["bytes_per_gpu"] == FSDP_STATES + FSDP_GATHERED + ACT_CKPT + LOGITS == 22_247_153_664 < limit
    assert fsdp["gb_per_gpu"] == 20.719
    without = FSDP_STATES + FSDP_GATHERED + ACT_FULL + LOGITS  # 71,068,852,224 B = 66.19 GB > 63.7 GB
    assert without > limit and fsdp["gb_per_gpu_without_gradient_checkpointing"] == round(without / GiB, 3)

    assert plan["configured_strategy"] == "ddp" and plan["recommended"] == "fsdp"
    assert plan["verdict"].startswith("DDP does not fit (126.911 GB per GPU, even with model.gradient_checkpointing: "
                                      "true); FSDP full-shard fits with model.gradient_checkpointing: true "
                                      "(20.719 GB per GPU)")

    # wall time: tokens x 6 x parameters / (GPUs x peak x MFU); cost at 8 x the 1-GPU price by default
    tokens = 96 * 3 * 2048  # 96 train records x 3 epochs x max_seq_length
    hours = tokens * 6 * PROD_PARAMS / (8 * 989e12 * 0.4) / 3600
    assert (plan["tokens"], plan["assumed_mfu"]) == (tokens, 0.4)
    assert plan["estimated_hours"] == round(hours, 6)
    assert plan["estimated_cost_usd"] == round(hours * 8 * 3.39, 4)
    assert plan["price_basis"] == "cost.gpu_hourly_usd x 8 GPUs" and plan["hourly_usd"] == pytest.approx(27.12)


@pytest.mark.slow
def test_the_repo_production_config_plans_fsdp_on_8_h100(tmp_path):
    """training_config.yaml as shipped (its 8 GPUs, batch 4 x 2048, fp16, the repo's data), the model as a bare
    config.json: the README's example."""
    (tmp_path / "config.json").write_text(json.dumps(PROD))
    plan = plan_json(ROOT / "training_config.yaml", "--set", f"model.base_checkpoint={tmp_path}",
                     "--set", "compute.gpu_type=H100-80GB", "--set", "cost.node_hourly_usd=23.92")
    assert plan["strategies"]["ddp"]["fits"] is False and plan["strategies"]["fsdp"]["fits"] is True
    assert plan["strategies"]["fsdp"]["bytes_per_gpu"] == FSDP_STATES + FSDP_GATHERED + ACT_CKPT + LOGITS
    assert plan["price_basis"].startswith("cost.node_hourly_usd") and plan["hourly_usd"] == 23.92


@pytest.mark.slow
def test_plan_json_shape_and_table(tiny_dir, tmp_path):
    cfg = production_config(tiny_dir, tmp_path)
    plan = plan_json(cfg)
    for key in ("gpu_type", "num_gpus", "strategies", "assumed_mfu", "estimated_hours", "estimated_cost_usd"):
        assert key in plan
    assert set(plan["strategies"]) == {"ddp", "fsdp", "lora", "qlora"}
    for row in plan["strategies"].values():
        assert isinstance(row["fits"], bool) and isinstance(row["gb_per_gpu"], float)
    # LoRA/QLoRA: the frozen base (in the fp16 compute dtype, or 4-bit) replicated per GPU, plus the adapters'
    # fp32 states (weights 4 + grads 4 + AdamW 8)
    adapter = 32 * 16 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 2 * (4096 + 14336) + (14336 + 4096))
    assert plan["strategies"]["lora"]["breakdown"]["weights_grads_optimizer_bytes"] == PROD_PARAMS * 2 + adapter * 16
    assert plan["batch"]["precision"] == {"parameter_dtype": "float32", "frozen_base_dtype": None,
                                          "base_stored_dtype": "float32", "compute_dtype": "float16",
                                          "best_dtype": "float32"}
    qlora = plan["strategies"]["qlora"]
    assert qlora["breakdown"]["weights_grads_optimizer_bytes"] == int(PROD_PARAMS * 0.5 + adapter * 16)
    assert qlora["fits"] is True and qlora["config_change"] == {"model.lora.enabled": True,
                                                                "model.lora.quantization": "4bit"}

    r = run_cli("--config", cfg, "--plan")
    assert r.returncode == 0, r.stderr
    assert "verdict: DDP does not fit" in r.stdout
    assert "FSDP full-shard fits with model.gradient_checkpointing: true" in r.stdout
    assert 'recommended: FSDP full-shard (compute.fsdp: "full_shard auto_wrap", model.gradient_checkpointing: true)' \
        in r.stdout
    assert "assumed MFU 0.4 [compute.assumed_mfu]" in r.stdout


@pytest.mark.parametrize("shape,gpus,precision", [(PROD, 2, "fp16"), (PROD, 4, "no"), (WIDE_VOCAB, 8, "bf16")])
@pytest.mark.slow
def test_fsdp_per_rank_memory_is_states_over_world_plus_gathered_units_plus_activations(
        tiny_dir, tmp_path, shape, gpus, precision):
    model = tmp_path / "shape"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(shape))
    cfg = production_config(tiny_dir, tmp_path, **{
        "model.base_checkpoint": str(model), "compute.num_gpus": gpus, "compute.mixed_precision": precision,
        "training.hyperparameters.fp16": precision == "fp16", "training.hyperparameters.bf16": precision == "bf16",
        "model.gradient_checkpointing": True, "compute.gpu_type": "H200-141GB"})
    fsdp = plan_json(cfg)["strategies"]["fsdp"]
    H, I, L, V = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * H // shape["num_attention_heads"]
    layer = 2 * H * H + 2 * H * kv + 3 * H * I + 2 * H
    n = V * H + L * layer + H
    elem = 4 if precision == "no" else 2
    tokens = 4 * 2048
    states = n * 16 // gpus
    gathered = 2 * max(layer, V * H) * elem
    activations = tokens * (L * H * elem + (10 * H + 4 * I + 2 * kv) * elem)
    logits = tokens * V * 8
    assert fsdp["breakdown"] == {"weights_grads_optimizer_bytes": states, "gathered_units_bytes": gathered,
                                 "activation_bytes": activations, "logits_bytes": logits}
    assert fsdp["bytes_per_gpu"] == states + gathered + activations + logits
    if shape is WIDE_VOCAB:
        assert V * H > layer  # the embedding is the unit gathered
    assert fsdp["config_change"] == {"compute.fsdp": "full_shard auto_wrap"}  # checkpointing already on


def test_estimate_memory_shards_a_configured_full_shard(tiny_dir, tmp_path):
    """compute.fsdp with full_shard: preflight's estimate is per rank (world size shards), not a DDP replica."""
    config = tf.load_training_config(str(production_config(tiny_dir, tmp_path, **{
        "compute.fsdp": "full_shard auto_wrap", "model.gradient_checkpointing": True})))
    est = tf.estimate_memory(config, PROD, PROD_PARAMS)
    assert est["shards"] == 8 and est["total_bytes"] == FSDP_STATES + FSDP_GATHERED + ACT_CKPT + LOGITS
    ddp = tf.estimate_memory(config, PROD, PROD_PARAMS, shards=1)
    assert ddp["total_bytes"] == DDP_STATES + ACT_CKPT + LOGITS and "shards" not in ddp


def test_out_of_memory_fix_names_the_fsdp_change(tiny_dir, tmp_path):
    """Preflight's OutOfMemory suggestion (check_memory) on an 80 GB GPU: DDP does not fit, FSDP would."""
    config = tf.load_training_config(str(production_config(tiny_dir, tmp_path)))
    fix = tf.fsdp_fix(config, PROD, PROD_PARAMS, H100_BYTES)
    assert fix["config_change"] == {"compute.fsdp": "full_shard auto_wrap", "model.gradient_checkpointing": True}
    assert 'set compute.fsdp: "full_shard auto_wrap", model.gradient_checkpointing: true' in fix["suggestion"]
    assert fix["gb_per_gpu"] == 20.719
    one_gpu = tf.load_training_config(str(production_config(tiny_dir, tmp_path, **{"compute.num_gpus": 1})))
    assert tf.fsdp_fix(one_gpu, PROD, PROD_PARAMS, H100_BYTES) is None  # nothing to shard over
    small = tf.fsdp_fix(config, PROD, PROD_PARAMS, 16 * GiB)  # 20.7 GB per GPU does not fit in 80% of 16 GB
    assert small is None


@pytest.mark.slow
def test_node_price_is_used_and_recorded(tiny_dir, tmp_path):
    plan = plan_json(production_config(tiny_dir, tmp_path, **{"cost.node_hourly_usd": 23.92}))
    assert plan["hourly_usd"] == 23.92 and plan["price_basis"] == "cost.node_hourly_usd x 1 node(s) of 8 GPUs"
    hours = 96 * 3 * 2048 * 6 * PROD_PARAMS / (8 * 989e12 * 0.4) / 3600
    assert plan["estimated_cost_usd"] == round(hours * 23.92, 4)  # the node's price, not 8 x 3.39 = 27.12 $/h

    node = tf.CostConfig(gpu_hourly_usd=3.39, node_hourly_usd=23.92)
    c = tf.compute_cost(7200, 8, 4, 0, node, gpus_per_node=8)
    assert c["cost_per_run_usd"] == pytest.approx(2 * 23.92) and c["gpu_hours"] == 16  # not 16 x 3.39 = 54.24
    assert (c["inputs"]["node_hourly_usd"], c["inputs"]["hourly_usd"]) == (23.92, 23.92)
    assert c["inputs"]["price_basis"] == "cost.node_hourly_usd x 1 node(s) of 8 GPUs"
    two_nodes = tf.compute_cost(3600, 16, 1, 0, node, gpus_per_node=8)  # torchrun over 2 nodes of 8
    assert two_nodes["cost_per_run_usd"] == pytest.approx(2 * 23.92)
    per_gpu = tf.compute_cost(3600, 8, 1, 0, tf.CostConfig(gpu_hourly_usd=3.39), gpus_per_node=8)
    assert per_gpu["cost_per_run_usd"] == pytest.approx(27.12)
    assert per_gpu["inputs"]["price_basis"] == "cost.gpu_hourly_usd x 8 GPUs"


@pytest.mark.slow
def test_manifest_records_the_node_price(tiny_dir, tmp_path):
    cfg = set_key(base_config(tiny_dir, tmp_path, fmt="text"), "cost.node_hourly_usd", 23.92)
    cfg = set_key(set_key(cfg, "training.hyperparameters.num_epochs", 1), "evaluation.num_samples", 0)
    path = write_config(tmp_path / "c.yaml", cfg)
    r = run_cli("--config", path, "--run-id", "node", "--skip-dry-run")
    assert r.returncode == 0, r.stderr[-3000:]
    inputs = json.loads((tmp_path / "runs" / "node" / "run_manifest.json").read_text())["cost"]["inputs"]
    assert inputs["node_hourly_usd"] == 23.92 and inputs["gpu_count"] == 0  # a CPU run rents no GPU
    assert inputs["price_basis"] == "none (no GPU in use)" and inputs["hourly_usd"] == 0


@pytest.mark.slow
def test_plan_config_errors_exit_2_with_every_problem(tiny_dir, tmp_path):
    cfg = production_config(tiny_dir, tmp_path, **{"compute.gpu_type": "H100", "compute.assumed_mfu": 1.5,
                                                   "cost.node_hourly_usd": -1})
    r = run_cli("--config", cfg, "--plan", "--json")
    assert r.returncode == 2 and r.stdout == ""
    err = last_json(r.stderr)
    assert err["error"] == "InvalidConfig"
    by_field = {e["details"]["field"]: e["details"] for e in err["errors"]}
    assert set(by_field) == {"compute.gpu_type", "compute.assumed_mfu", "cost.node_hourly_usd"}
    assert "H100-80GB" in by_field["compute.gpu_type"]["expected"]
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_plan_without_gpu_type_on_a_host_without_gpu_names_the_key(tiny_dir, tmp_path):
    r = run_cli("--config", production_config(tiny_dir, tmp_path, **{"compute.gpu_type": None}), "--plan")
    assert r.returncode == 2
    err = last_json(r.stderr)["details"]
    assert err["field"] == "compute.gpu_type" and "--set compute.gpu_type=H100-80GB" in err["suggestion"]


@pytest.mark.slow
def test_plan_reads_config_json_only_and_never_imports_torch(tiny_dir, tmp_path):
    """No weights and no tokenizer in the model dir, and with compute.gpu_type set no torch import at all."""
    cfg = production_config(tiny_dir, tmp_path)
    code = ("import sys, train_finance_ssc_model as t; rc = t.main(['--config', sys.argv[1], '--plan', '--json']); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["strategies"]["fsdp"]["fits"] is True


@pytest.mark.slow
def test_fsdp_on_cpu_is_refused(tiny_dir, tmp_path):
    cfg = set_key(base_config(tiny_dir, tmp_path), "compute.fsdp", "full_shard auto_wrap")
    r = run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--validate-only")
    assert r.returncode == 2
    err = last_json(r.stderr)
    assert err["error"] == "InvalidConfig" and err["details"]["field"] == "compute.fsdp"
    assert "compute.device: cuda" in err["details"]["suggestion"] and "Traceback" not in r.stderr


def readme_plan_example() -> tuple[str, str]:
    """The README's --plan example: the command after `$ ` and the output printed under it, as written."""
    text = (ROOT / "README.md").read_text()
    block = text.split("\n$ python train_finance_ssc_model.py --config training_config.yaml --plan\n", 1)[1]
    return "python train_finance_ssc_model.py --config training_config.yaml --plan", block.split("\n```", 1)[0]


@pytest.mark.slow
def test_the_readme_plan_example_runs_as_written_on_a_fresh_clone(tmp_path):
    """The tracked files only (a clone: no model, no GPU), the command exactly as the README types it, its output
    exactly as the README prints it: the spec's config declares the architecture, and the plan says what it assumes."""
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    for name in tracked.stdout.splitlines():
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            (clone / name).write_bytes((ROOT / name).read_bytes())
    assert not (clone / "models").exists()
    command, expected = readme_plan_example()
    r = subprocess.run([sys.executable, *command.split()[1:]], cwd=clone, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == expected
    assert "assumed:" in expected and "num_key_value_heads 8" in expected


@pytest.mark.slow
def test_plan_from_the_declared_shape_states_its_assumptions(tiny_dir, tmp_path):
    cfg = production_config(tiny_dir, tmp_path, **{"model.base_checkpoint": str(tmp_path / "not-downloaded-yet"),
                                                   "model.vocab_size": 49152, "model.hidden_size": 4096,
                                                   "model.num_layers": 32, "model.num_heads": 32})
    plan = plan_json(cfg)
    m = plan["model"]
    assert m["parameters"] == PROD_PARAMS  # the assumptions are PROD's 8 kv heads, MLP 14336, tied embeddings
    assert (m["num_key_value_heads"], m["intermediate_size"], m["tie_word_embeddings"]) == (8, 14336, True)
    assert set(m["assumptions"]) == {"num_key_value_heads", "intermediate_size", "tie_word_embeddings", "torch_dtype"}
    assert m["shape_source"].startswith("model.vocab_size, hidden_size, num_layers and num_heads")
    assert plan["strategies"]["fsdp"]["bytes_per_gpu"] == FSDP_STATES + FSDP_GATHERED + ACT_CKPT + LOGITS
    # with config.json on disk the real shape is used and nothing is assumed
    assert plan_json(production_config(tiny_dir, tmp_path))["model"]["assumptions"] == {}
    # a shape the config does not fully declare: the checkpoint error as before
    partial = production_config(tiny_dir, tmp_path, **{"model.base_checkpoint": str(tmp_path / "missing"),
                                                       "model.vocab_size": 49152})
    r = run_cli("--config", partial, "--plan")
    assert r.returncode == 2 and last_json(r.stderr)["error"] == "CheckpointNotFound"
