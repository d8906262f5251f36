#!/usr/bin/env python
"""GPU check (issue 14, part 3): one command, one JSON report, under 8 minutes on one H100/H200.

    HF_HUB_OFFLINE=1 python bench/gpu_check.py --out gpu_check.json            # GPU: 3B shape, budget 7 min
    HF_HUB_OFFLINE=1 python bench/gpu_check.py --cpu --out /tmp/gpu_check.json # CPU: tiny shape, < 1 min
                                                                               # (tests/test_gpu_check.py runs it)

Nothing is downloaded: every model is built from a config with random weights (the GPU sections use a
SmolLM3-3B-shaped one: hidden 2048, 36 layers, 16 heads, 4 kv heads, intermediate 11008, vocab 128256), the
data is random token ids with realistic record lengths (log-normal, median ~400 tokens on GPU), and the
tokenizer is a small byte-level BPE built on the spot (scripts/make_demo_assets.build_tokenizer). The product
script is imported as a module and its own functions do the work: estimate_memory, pack_dataset, collator_for,
SeededLengthGroupedSampler, model_flops_utilization, add_lora, fsdp_settings / build_training_args and
FinanceTrainer (_trainer_class: atomic verified checkpoints, the guards, full_state_dict under FSDP).

Sections (each prints progress; a failure is recorded with its error and the next section still runs; a section
that would start after the time budget is spent is skipped with a note). Every result goes into one JSON
object, printed last on stdout and written to --out:
  environment               versions, device, the shape used
  throughput_memory         bf16 autocast + sdpa, packed max_seq_length rows vs batches padded to their longest
                            record (length-grouped, as the script trains), each with and without gradient
                            checkpointing: real tokens/s, MFU (989 TFLOP/s bf16 dense peak for H100 and H200),
                            peak torch.cuda.max_memory_allocated against estimate_memory (goal: within 15%)
  packed_vs_unpacked_loss   per attention implementation available (sdpa; flash_attention_2 if flash_attn
                            imports; flex_attention if torch has it): the mean token loss of packed rows equals
                            that of the same records run one by one
  fp16_overflows            FinanceTrainer with fp16 and a loss scale forced far too high: the scaler's overflows
                            are skipped steps and a warning, not a stop (the guard's FP16_MAX_OVERFLOWS)
  fsdp_one_process          compute.fsdp under torch.distributed.run with one process (FSDP2, SmolLM3DecoderLayer
                            units): train with evaluations and checkpoints, checkpoint health (model.safetensors
                            consolidated and verified), resume from the first checkpoint and compare with the
                            uninterrupted run, load the checkpoint with from_pretrained
  save_resume_load          --cpu only: the same steps without FSDP, so that code runs in the test suite
  lora                      LoRA adapters on the 3B shape through FinanceTrainer: steps, peak memory vs estimate,
                            a verified adapter checkpoint
  qlora                     the same with 4-bit weights, only where bitsandbytes imports

On CPU (--cpu) the same code runs on a tiny shape in under a minute; what needs CUDA (peak CUDA memory, MFU, fp16, FSDP,
QLoRA) is reported as skipped with the reason, never as measured.

No `datasets` needed: the GPU machines do not have it, and its wheels with pyarrow and pandas are ~66 MiB
(pyarrow 26 alone 52.5 MiB, measured with pip download for cp312 manylinux_2_28_x86_64), over the 64 MiB that
can be carried. The script's pack_dataset imports `datasets.Dataset` only to wrap its result: where `datasets`
is missing this check registers a stand-in for that one call (from_dict returns the columns as they are), and
every other data path here uses plain lists (Trainer accepts them). The script's own CLI training path does
need `datasets` (load_splits), so this check drives FSDP through the script's Trainer pieces in a
torch.distributed.run child, not through the CLI. Trackers are off throughout (the script imports wandb and
mlflow only when they are enabled).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHAPES = {  # SmolLM3ForCausalLM config kwargs
    "3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=4,
               intermediate_size=11008, vocab_size=128256),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=1536, vocab_size=32000),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512),
}
GPU = dict(shape="3b", seq=2048, median_len=400, max_len=2048, records=600, warmup=2, steps=6, small="small")
CPU = dict(shape="tiny", seq=128, median_len=40, max_len=128, records=96, warmup=1, steps=2, small="tiny")
MEMORY_GOAL = 0.15  # |measured / estimated - 1| the issue asks for
# Mean token loss, packed vs one record at a time. fp32: the two layouts run the same math through kernels of
# different shapes (another summation order), ~1e-6 relative on a loss of ~ln(vocab) ~ 6-12, so 1e-4 absolute
# is ~100x that noise and far below any real leak (attending across records moves the loss by >1e-2).
# bf16 (flash-attention 2 runs only in half precision): rounding of 2^-8 relative per op, averaged over the
# tokens: 2e-2 absolute.
LOSS_TOL = {"float32": 1e-4, "bfloat16": 2e-2}


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def import_script():
    """train_finance_ssc_model as a module (it imports only the standard library at import time)."""
    import train_finance_ssc_model as t
    return t


def pack(t, records: dict, seq: int):
    """t.pack_dataset. Where `datasets` is missing, a stand-in module is registered for the length of the call
    only (pack_dataset imports `datasets.Dataset` to wrap its result; from_dict here returns the columns as they
    are): left in sys.modules, a module without a spec would make importlib.util.find_spec("datasets") raise,
    and transformers asks it."""
    if "datasets" in sys.modules or importlib.util.find_spec("datasets") is not None:
        return t.pack_dataset(records, seq)
    shim = types.ModuleType("datasets")
    shim.Dataset = type("Dataset", (), {"from_dict": staticmethod(lambda columns: dict(columns))})
    sys.modules["datasets"] = shim
    try:
        return t.pack_dataset(records, seq)
    finally:
        del sys.modules["datasets"]


# --------------------------------------------------------------------------------------------------
# Builders: config, model, tokenizer, data
# --------------------------------------------------------------------------------------------------

def make_config(t, out: Path, model_dir: str, *, device: str, seq: int, batch: int, precision: str = "no",
                checkpointing: bool = False, fsdp=None, lora: bool = False, quantization: str = "none",
                steps_between_saves: int = 3):
    """A TrainingConfig built from the script's dataclasses (no YAML, no data files: the data paths are unused)."""
    hp = t.HyperparametersConfig(learning_rate=1e-4, batch_size=batch, gradient_accumulation_steps=1, num_epochs=1,
                                 warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                                 fp16=precision == "fp16", bf16=precision == "bf16")
    return t.TrainingConfig(
        model=t.ModelConfig(base_checkpoint=model_dir, gradient_checkpointing=checkpointing,
                            lora=t.LoraConfig(enabled=lora, quantization=quantization, merge_at_end=False)),
        data=t.DataConfig(train_path="unused", valid_path="unused", test_path="unused", max_seq_length=seq,
                          dataset_name="gpu_check", dataset_version="random", packing=True),
        training=t.TrainingSection(
            hyperparameters=hp,
            optimization=t.OptimizationConfig(lr_scheduler="constant", early_stopping_patience=None),
            checkpointing=t.CheckpointingConfig(save_strategy="steps", save_total_limit=3, load_best_at_end=False,
                                                metric_for_best_model="val_loss"),
            guards=t.GuardsConfig(grad_norm_limit=1e6)),  # random weights: the norm guard is not under test here
        logging=t.LoggingConfig(output_dir=str(out / "runs"), logging_dir=str(out / "logs"), logging_steps=1,
                                eval_steps=steps_between_saves, save_steps=steps_between_saves,
                                tensorboard=t.TensorboardConfig(enabled=False)),
        compute=t.ComputeConfig(device=device, num_gpus=1, distributed_backend="nccl" if device == "cuda" else "gloo",
                                mixed_precision=precision, fsdp=fsdp),
        evaluation=t.EvaluationConfig(num_samples=0))


def model_config(shape: str, attn: str = "sdpa", pad_token_id: int = 0):
    from transformers import SmolLM3Config
    cfg = SmolLM3Config(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=True,
                        pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = attn
    cfg.architectures = ["SmolLM3ForCausalLM"]
    return cfg


def build_model(shape: str, device: str, attn: str = "sdpa", dtype=None, seed: int = 0):
    """Random weights, built on the device (a 3B model initialised on CPU first would take a minute)."""
    import torch
    from transformers import SmolLM3ForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        model = SmolLM3ForCausalLM(model_config(shape, attn))
    if dtype is not None:
        model = model.to(dtype)
    model.config.use_cache = False
    return model


def ckpt_dict(model) -> dict:
    return model.config.to_dict()


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def make_tokenizer():
    import make_demo_assets as assets
    texts = [r for rec in assets.generate_records(seed=3, n=40) for r in assets.record_texts(rec)]
    return assets.build_tokenizer(texts, vocab_size=300)


def random_records(n: int, vocab: int, median_len: int, max_len: int, seed: int = 0) -> dict:
    """Token ids and labels: lengths log-normal around `median_len` (sigma 0.7: most records a few hundred tokens,
    a tail to max_len), the first 30% of each record a prompt masked out of the loss as the script masks it."""
    rng = random.Random(seed)
    ids, labels = [], []
    for _ in range(n):
        length = max(8, min(max_len, int(rng.lognormvariate(math.log(median_len), 0.7))))
        row = [rng.randrange(3, vocab) for _ in range(length)]
        prompt = int(length * 0.3)
        ids.append(row)
        labels.append([-100] * prompt + row[prompt:])
    return {"input_ids": ids, "labels": labels, "attention_mask": [[1] * len(r) for r in ids]}


def packed_rows(t, records: dict, seq: int) -> list[dict]:
    packed = pack(t, records, seq)  # the script's best-fit-decreasing packing
    cols = ("input_ids", "labels", "position_ids")
    columns = {k: list(packed[k]) for k in cols}
    return [{k: columns[k][i] for k in cols} for i in range(len(columns["input_ids"]))]


def record_rows(records: dict) -> list[dict]:
    return [{"input_ids": i, "labels": l, "attention_mask": a}
            for i, l, a in zip(records["input_ids"], records["labels"], records["attention_mask"])]


def real_tokens(batch: dict) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())  # packed rows: every position is a record token (no padding rows)


def fake_ctx(t, config, out: Path, run_id: str, gpu_name: str = "", memory: dict | None = None,
             ckpt: dict | None = None, attended: float | None = None):
    """What _build_trainer and model_flops_utilization read from a RunContext (no validation, no manifest)."""
    run_dir = Path(config.logging.output_dir) / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker = t.Tracker(run_id=run_id, log_dir=out / "logs" / run_id, is_main=True, echo=False)
    tracker.log_dir.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(config=config, run_id=run_id, run_dir=run_dir, tracker=tracker, history=t.RunHistory(),
                           reproducibility={"hardware": {"gpu_model": gpu_name}},
                           validation=SimpleNamespace(memory=memory or {}, checkpoint=ckpt or {}),
                           data_stats={"train": {"attended_length": attended}})


def finance_trainer(t, ctx, model, tokenizer, train: list, valid: list, max_steps: int, resuming: bool = False):
    """The script's FinanceTrainer with its callbacks, on plain lists of rows."""
    args = t.build_training_args(ctx.config, ctx.run_dir, dry_run=False, max_steps=max_steps, resuming=resuming,
                                 model=model)
    trainer = t._build_trainer(ctx, tokenizer, {"train": train, "valid": valid}, model, args, dry_run=False)
    return trainer


def free_cuda() -> None:
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------

def section_environment(t, p, a) -> dict:
    import accelerate
    import torch
    import transformers
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "accelerate": accelerate.__version__,
           "device": torch.cuda.get_device_name(0) if p["device"] == "cuda" else "cpu",
           "shape": {"name": p["shape"], **SHAPES[p["shape"]]}, "max_seq_length": p["seq"],
           "packages": {m: importlib.util.find_spec(m) is not None
                        for m in ("datasets", "peft", "bitsandbytes", "flash_attn", "wandb", "mlflow")}}
    if p["device"] == "cuda":
        out["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return out


def _train_steps(t, model, batches: list, device: str, amp_dtype, steps: int, warmup: int) -> dict:
    """A plain loop as Trainer runs one step (autocast forward, backward, clip, fused AdamW): real tokens/s over
    the timed steps, peak CUDA memory over all of them (optimizer states included from the first step)."""
    import torch
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5,
                            fused=device == "cuda")
    free_cuda()
    tokens, seconds, losses = 0, 0.0, []
    for i in range(warmup + steps):
        batch = {k: v.to(device) for k, v in batches[i % len(batches)].items()}
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device_type=device, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        losses.append(float(loss.detach()))
        if i >= warmup:
            seconds += time.perf_counter() - t0
            tokens += real_tokens(batch)
    out = {"steps_timed": steps, "real_tokens": tokens, "seconds": round(seconds, 4),
           "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
           "losses_finite": all(math.isfinite(x) for x in losses)}
    if device == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    del opt
    free_cuda()
    return out


def section_throughput_memory(t, p, a) -> dict:
    import torch
    device, seq = p["device"], p["seq"]
    amp = torch.bfloat16 if device == "cuda" else None
    precision = "bf16" if device == "cuda" else "no"
    model = build_model(p["shape"], device)
    ckpt, n = ckpt_dict(model), n_params(model)
    records = random_records(p["records"], ckpt["vocab_size"], p["median_len"], p["max_len"], seed=1)
    rows = packed_rows(t, records, seq)
    singles = record_rows(records)
    lengths = [len(x) for x in records["input_ids"]]
    # each token attends over its own record (packed rows keep records apart): token-weighted record length
    attended = sum(n_ * n_ for n_ in lengths) / sum(lengths)
    capacity = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None
    collate = t.collator_for("sdpa", 0)
    results = {}
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        batch = 1
        for b in (4, 2, 1):  # the largest batch whose estimate leaves 15% of the GPU free
            est = t.estimate_memory(make_config(t, a.work, "unused", device=device, seq=seq, batch=b,
                                                precision=precision, checkpointing=checkpointing), ckpt, n)
            if capacity is None or est["total_bytes"] <= 0.85 * capacity:
                batch = b
                break
        config = make_config(t, a.work, "unused", device=device, seq=seq, batch=batch, precision=precision,
                             checkpointing=checkpointing)
        estimate = t.estimate_memory(config, ckpt, n)
        ctx = fake_ctx(t, config, a.work, "throughput", torch.cuda.get_device_name(0) if device == "cuda" else "",
                       memory={"parameters": n, "trainable_parameters": n}, ckpt=ckpt, attended=attended)
        need = (p["warmup"] + p["steps"]) * batch
        for layout in ("packed", "padded"):
            name = f"{layout}{'+checkpointing' if checkpointing else ''}"
            log(f"throughput_memory: {name}, batch {batch} x {seq if layout == 'packed' else 'longest'}")
            if layout == "packed":
                pool = rows
                order = list(range(len(pool)))
            else:  # the script's length-grouped order, so a batch padded to its longest carries little padding
                pool = singles
                order = list(iter(t.SeededLengthGroupedSampler(lengths, 42, batch)))
            batches = [collate([pool[i] for i in order[k:k + batch]]) for k in range(0, min(need, len(order)), batch)]
            r = _train_steps(t, model, batches, device, amp, p["steps"], p["warmup"])
            r["batch_size"] = batch
            r["padding_fraction"] = round(1 - r["real_tokens"] / sum(
                int(batches[(i + p["warmup"]) % len(batches)]["input_ids"].numel()) for i in range(p["steps"])), 4)
            mfu = t.model_flops_utilization(ctx, r["tokens_per_second"])
            r["mfu"] = mfu["value"] if mfu else None
            r["mfu_note"] = None if mfu else "no peak FLOP/s for this device (PEAK_FLOPS): not measured"
            r["estimated_bytes"] = estimate["total_bytes"]
            if "peak_memory_bytes" in r:
                r["measured_over_estimated"] = round(r["peak_memory_bytes"] / estimate["total_bytes"], 4)
                # the estimate is for full max_seq_length rows: the packed layout is what it describes
                r["within_goal"] = abs(r["measured_over_estimated"] - 1) <= MEMORY_GOAL if layout == "packed" else None
            else:
                r["peak_memory_note"] = "needs CUDA (torch.cuda.max_memory_allocated): not measured"
            results[name] = r
    del model
    free_cuda()
    return {"status": "measured", "attended_length": round(attended, 1), "results": results}


def _mean_token_loss(model, batches: list, amp_dtype, device: str) -> tuple[float, int]:
    """Sum of next-token cross-entropy over every label != -100, and their count, computed from the logits."""
    import torch
    import torch.nn.functional as F
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            labels = b.pop("labels")
            with torch.autocast(device_type=device, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(**b).logits.float()
            shift, target = logits[:, :-1], labels[:, 1:]
            keep = target != -100
            total += float(F.cross_entropy(shift[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count, count


def section_packed_vs_unpacked(t, p, a) -> dict:
    import torch
    device = p["device"]
    impls = [("sdpa", None)]
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        impls.append(("flash_attention_2", torch.bfloat16))
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
        if device == "cuda":
            impls.append(("flex_attention", None))
    except ImportError:
        pass
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 really fp32: the tolerance assumes it
        torch.backends.cudnn.allow_tf32 = False
    seq = min(p["seq"], 512)
    records = random_records(24, SHAPES[p["small"]]["vocab_size"], max(16, seq // 6), seq // 2, seed=2)
    results, skipped = {}, {}
    if device != "cuda":
        skipped["flash_attention_2"] = "needs CUDA"
        skipped["flex_attention"] = "run on CUDA only here"
    elif "flash_attention_2" not in dict(impls):
        skipped["flash_attention_2"] = "flash_attn not importable"
    for attn, dtype in impls:
        log(f"packed_vs_unpacked_loss: {attn}")
        try:  # one implementation failing (flex_attention compiles with triton) must not hide the others
            model = build_model(p["small"], device, attn=attn, dtype=dtype, seed=3).eval()
            collate = t.collator_for(attn, 0)
            packed = [collate(r) for r in _chunks(packed_rows(t, records, seq), 2)]
            singles = [collate([r]) for r in record_rows(records)]  # one record per batch: no padding at all
            lp, n_p = _mean_token_loss(model, packed, None, device)
            lu, n_u = _mean_token_loss(model, singles, None, device)
            dtype_name = "bfloat16" if dtype is torch.bfloat16 else "float32"
            diff = abs(lp - lu)
            results[attn] = {"dtype": dtype_name, "packed_loss": lp, "unpacked_loss": lu, "abs_diff": diff,
                             "tolerance": LOSS_TOL[dtype_name], "tokens_packed": n_p, "tokens_unpacked": n_u,
                             "equal": diff <= LOSS_TOL[dtype_name] and n_p == n_u}
            del model
        except Exception as exc:
            results[attn] = {"equal": False, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        free_cuda()
    ok = all(r["equal"] for r in results.values())
    return {"status": "measured" if ok else "failed", "results": results, "skipped": skipped,
            **({} if ok else {"error": "packed and unpacked losses differ beyond the tolerance"})}


def _chunks(xs: list, n: int) -> list:
    return [xs[i:i + n] for i in range(0, len(xs), n)]


def _save_model(shape: str, out: Path, tokenizer, dtype=None) -> Path:
    import torch
    model = build_model(shape, "cuda" if torch.cuda.is_available() else "cpu", dtype=dtype)
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def section_fp16(t, p, a) -> dict:
    if p["device"] != "cuda":
        return {"status": "skipped", "reason": "needs CUDA (fp16 mixed precision and its loss scaler are GPU-only)"}
    tok = make_tokenizer()
    model_dir = _save_model(p["small"], a.work / "fp16_model", tok)
    config = make_config(t, a.work / "fp16", str(model_dir), device="cuda", seq=512, batch=4, precision="fp16",
                         steps_between_saves=1000)
    ctx = fake_ctx(t, config, a.work / "fp16", "fp16")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    rows = packed_rows(t, random_records(200, model.config.vocab_size, 100, 512, seed=4), 512)
    steps = 30
    trainer = finance_trainer(t, ctx, model, tok, rows, rows[:4], max_steps=steps)
    scaler = trainer.accelerator.scaler
    # 2^30 (the default start is 2^16): the gradient of the mean loss at each fp16 logit, ~2^30 / 2,000 tokens,
    # is far above fp16's 65504, so the first steps overflow for certain; the scaler halves the scale at each
    # one and should settle around 2^15 after ~15 of them, below the guard's FP16_MAX_OVERFLOWS (25)
    init_scale = 2.0 ** 30
    scaler._init_scale = init_scale
    log(f"fp16_overflows: {steps} steps from a loss scale of 2^30")
    trainer.train()
    anomalies = ctx.history.anomalies
    final_scale = float(scaler.get_scale())
    overflows = round(math.log2(init_scale / final_scale)) if final_scale < init_scale else 0
    global_step = trainer.state.global_step
    ok = ctx.history.stop is None and global_step == steps and overflows >= 1
    del trainer, model
    free_cuda()
    return {"status": "measured" if ok else "failed", "steps": steps, "global_step": global_step,
            "initial_scale": init_scale, "final_scale": final_scale, "overflows_at_least": overflows,
            "guard_stopped": ctx.history.stop, "fp16_overflow_warnings": sum(x["kind"] == "fp16_overflow"
                                                                              for x in anomalies),
            "max_consecutive_allowed": t.FP16_MAX_OVERFLOWS,
            **({} if ok else {"error": "the run stopped or saw no overflow"})}


def section_fsdp(t, p, a) -> dict:
    if p["device"] != "cuda":
        return {"status": "skipped", "reason": "needs CUDA (Trainer/accelerate run FSDP only on GPUs)"}
    work = a.work / "fsdp"
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(Path(__file__).resolve()), "--fsdp-worker", str(work)]
    log("fsdp_one_process: " + " ".join(cmd[2:6]) + " ...")
    remaining = max(60, int(a.deadline - time.time()))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=remaining)
    result_file = work / "result.json"
    if not result_file.is_file():
        return {"status": "failed", "error": f"worker exited {proc.returncode} without a result",
                "stderr_tail": proc.stderr[-3000:], "stdout_tail": proc.stdout[-1500:]}
    return json.loads(result_file.read_text())


def fsdp_worker(work: Path, device: str = "cuda") -> None:
    """Runs under torch.distributed.run (LOCAL_RANK set): train 6 steps with a verified checkpoint every 3, resume a
    second trainer from checkpoint-3 to step 6, compare, and load checkpoint-6 with from_pretrained.
    device="cpu" (section save_resume_load of --cpu): the same steps without FSDP on the tiny shape, so this code
    runs in the test suite; only the FSDP specifics are left to the GPU."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    t = import_script()
    out: dict = {"status": "failed"}
    try:
        tok = make_tokenizer()
        gpu = device == "cuda"
        shape, seq = ("small", 512) if gpu else ("tiny", 128)
        model_dir = _save_model(shape, work / "model", tok)
        config = make_config(t, work, str(model_dir), device=device, seq=seq, batch=2,
                             precision="bf16" if gpu else "no", checkpointing=gpu,
                             fsdp=t.FSDP_FULL_SHARD if gpu else None, steps_between_saves=3)
        rows = packed_rows(t, random_records(120 if gpu else 24, SHAPES[shape]["vocab_size"], seq // 5, seq, seed=5),
                           seq)

        def run(run_id: str, resume: str | None = None):
            ctx = fake_ctx(t, config, work, run_id)
            t.seed_everything(config.training.seed)
            model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
            trainer = finance_trainer(t, ctx, model, tok, rows, rows[:2], max_steps=6, resuming=resume is not None)
            clip = trainer._clip_grad_norm  # FinanceTrainer's: the norm the guard reads (global_grad_norm)

            def recording_clip(m):
                norm = clip(m)
                norms.append({"raw_type": type(norm).__name__, "guard_value": trainer.probe.grad_norm})
                return norm

            trainer._clip_grad_norm = recording_clip
            trainer.train(resume_from_checkpoint=resume)
            return ctx, trainer

        norms: list = []

        ctx, trainer = run("straight")
        out["fsdp_enabled"] = bool(trainer.is_fsdp_enabled)
        plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
        out["fsdp_plugin"] = None if plugin is None else {
            "version": getattr(plugin, "fsdp_version", None), "state_dict_type": str(plugin.state_dict_type),
            "wrap": getattr(plugin, "transformer_cls_names_to_wrap", None),
            "reshard_after_forward": getattr(plugin, "reshard_after_forward", None),
            "activation_checkpointing": getattr(plugin, "activation_checkpointing", None)}
        out["fsdp_config"] = trainer.args.fsdp_config
        run_dir = ctx.run_dir
        ckpts = {c: run_dir / c for c in ("checkpoint-3", "checkpoint-6")}
        metas = {c: json.loads((d / t.CHECKPOINT_META).read_text()) for c, d in ckpts.items()}
        out["checkpoints"] = {c: {"health": m["health"], "files": sorted(m["checksums"]),
                                  "integrity": t.check_checkpoint_integrity(ckpts[c]) or "ok"}
                              for c, m in metas.items()}
        out["losses_finite"] = bool(ctx.history.train) and all(math.isfinite(x[2]) for x in ctx.history.train)
        out["grad_norms"] = norms[:]
        out["grad_norms_finite"] = bool(norms) and all(math.isfinite(x["guard_value"]) for x in norms)
        out["names_in_meta"] = {c: m["name"] for c, m in metas.items()}
        out["anomalies"] = ctx.history.anomalies
        del trainer
        free_cuda()
        ctx2, trainer2 = run("resumed", resume=str(ckpts["checkpoint-3"]))
        a_ = load_file(str(ckpts["checkpoint-6"] / "model.safetensors"))
        b_ = load_file(str(ctx2.run_dir / "checkpoint-6" / "model.safetensors"))
        diffs = {k: float((a_[k].float() - b_[k].float()).abs().max()) for k in a_}
        out["resume"] = {"keys_equal": set(a_) == set(b_), "max_abs_diff": max(diffs.values()),
                         "bitwise_equal": all(v == 0 for v in diffs.values())}
        del trainer2
        free_cuda()
        loaded = AutoModelForCausalLM.from_pretrained(ckpts["checkpoint-6"]).to(device).eval()
        sd = loaded.state_dict()
        same = all(torch.equal(sd[k].cpu(), v) for k, v in a_.items() if k in sd)
        ids = torch.tensor([rows[0]["input_ids"][:64]], device=device)
        with torch.no_grad():
            logits = loaded(ids).logits
        out["from_pretrained"] = {"loaded": True, "weights_equal_safetensors": same,
                                  "forward_finite": bool(torch.isfinite(logits).all())}
        ok = (out["fsdp_enabled"] == gpu and all(c["health"] == "ok" and c["integrity"] == "ok"
                                          for c in out["checkpoints"].values())
              and out["losses_finite"] and out["grad_norms_finite"] and not ctx.history.stop
              and all("model.safetensors" in c["files"] for c in out["checkpoints"].values())
              and out["resume"]["keys_equal"] and out["resume"]["max_abs_diff"] < 1e-3 and same
              and out["from_pretrained"]["forward_finite"])
        out["status"] = "measured" if ok else "failed"
        if not ok:
            out["error"] = "a check failed: see the fields"
    except Exception as exc:  # recorded, the parent reports it
        out.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:])
    (work / "result.json").write_text(json.dumps(out, default=str, indent=2))


def section_save_resume_load(t, p, a) -> dict:
    """CPU mode only: fsdp_worker's steps without FSDP (train, verified checkpoints, resume, from_pretrained)."""
    if p["device"] == "cuda":
        return {"status": "skipped", "reason": "on a GPU fsdp_one_process runs these steps under FSDP"}
    work = a.work / "save_resume_load"
    work.mkdir(parents=True, exist_ok=True)
    fsdp_worker(work, device="cpu")
    res = json.loads((work / "result.json").read_text())
    return {**res, "note": "the fsdp_one_process steps without FSDP, so that code runs on CPU"}


def section_lora(t, p, a, quantization: str = "none") -> dict:
    import torch
    device = p["device"]
    if quantization != "none":
        if device != "cuda":
            return {"status": "skipped", "reason": "needs CUDA (bitsandbytes)"}
        if importlib.util.find_spec("bitsandbytes") is None:
            return {"status": "skipped", "reason": "bitsandbytes not importable here"}
    if importlib.util.find_spec("peft") is None:
        return {"status": "skipped", "reason": "peft not importable here"}
    tok = make_tokenizer()
    precision = "bf16" if device == "cuda" else "no"
    seq = p["seq"]
    work = a.work / f"lora-{quantization}"
    if quantization == "none":
        model_dir = "built-in-memory"
        base = build_model(p["shape"], device)
    else:  # load_base_model quantizes while loading: the weights must be on disk (bf16 halves the write)
        model_dir = str(_save_model(p["shape"], work / "model", tok, dtype=torch.bfloat16))
        base = None
    config = make_config(t, work, model_dir, device=device, seq=seq, batch=2 if device == "cuda" else 4,
                         precision=precision, checkpointing=device == "cuda", lora=True, quantization=quantization,
                         steps_between_saves=3)
    if base is None:
        model = t.load_base_model(config, "sdpa")
    else:
        model = t.add_lora(base, config)
    ckpt = ckpt_dict(model.get_base_model() if hasattr(model, "get_base_model") else model)
    counts = t.parameter_counts(model)
    n = sum(q.numel() for name, q in model.named_parameters() if "lora_" not in name)  # the base model's
    estimate = t.estimate_memory(config, ckpt, n)
    rows = packed_rows(t, random_records(60, ckpt["vocab_size"], p["median_len"], p["max_len"], seed=6), seq)
    ctx = fake_ctx(t, config, work, "lora")
    log(f"lora{'/' + quantization if quantization != 'none' else ''}: {counts['trainable']:,} trainable of "
        f"{counts['total']:,}, 3 steps and a checkpoint")
    free_cuda()
    trainer = finance_trainer(t, ctx, model, tok, rows, rows[:4], max_steps=3)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    meta = json.loads((ctx.run_dir / "checkpoint-3" / t.CHECKPOINT_META).read_text())
    out = {"trainable_parameters": counts["trainable"], "total_parameters": counts["total"],
           "steps": trainer.state.global_step, "train_seconds": round(seconds, 3),
           "losses_finite": bool(ctx.history.train) and all(math.isfinite(x[2]) for x in ctx.history.train),
           "checkpoint_health": meta["health"], "adapter_files": meta["weights_files"],
           "estimated_bytes": estimate["total_bytes"]}
    if device == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        out["measured_over_estimated"] = round(out["peak_memory_bytes"] / estimate["total_bytes"], 4)
    else:
        out["peak_memory_note"] = "needs CUDA (torch.cuda.max_memory_allocated): not measured"
    out["checkpoint_name"] = meta["name"]
    ok = (out["steps"] == 3 and out["losses_finite"] and meta["health"] == "ok" and meta.get("adapter") is True
          and meta["name"] == "checkpoint-3")
    del trainer, model
    free_cuda()
    return {"status": "measured" if ok else "failed", **out,
            **({} if ok else {"error": "steps, loss or the adapter checkpoint check failed"})}


SECTIONS = (
    ("environment", section_environment),
    ("throughput_memory", section_throughput_memory),
    ("packed_vs_unpacked_loss", section_packed_vs_unpacked),
    ("fp16_overflows", section_fp16),
    ("fsdp_one_process", section_fsdp),
    ("save_resume_load", section_save_resume_load),
    ("lora", section_lora),
    ("qlora", lambda t, p, a: section_lora(t, p, a, quantization="4bit")),
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="tiny shape on CPU, seconds (the test suite's mode)")
    ap.add_argument("--out", help="also write the JSON report here")
    ap.add_argument("--budget-seconds", type=float, default=None, help="default 420 on GPU, 120 on CPU")
    ap.add_argument("--only", nargs="*", help="run only these sections (environment always runs)")
    ap.add_argument("--work", help="scratch folder (default: a temporary one, removed at the end)")
    ap.add_argument("--fsdp-worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.fsdp_worker:
        fsdp_worker(Path(a.fsdp_worker))
        return 0
    if not a.cpu:  # one GPU: with several visible, Trainer would wrap the model in DataParallel
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    import torch
    start = time.time()
    if not a.cpu and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: run with --cpu for the tiny CPU check"}))
        return 2
    p = dict(CPU if a.cpu else GPU, device="cpu" if a.cpu else "cuda")
    budget = a.budget_seconds or (120.0 if a.cpu else 420.0)
    a.deadline = start + budget
    scratch = a.work is None
    a.work = Path(a.work or tempfile.mkdtemp(prefix="gpu_check-"))
    a.work.mkdir(parents=True, exist_ok=True)
    t = import_script()
    t.setup_logging(False)
    report = {"mode": "cpu" if a.cpu else "gpu", "budget_seconds": budget, "sections": {}}
    for name, fn in SECTIONS:
        if a.only and name != "environment" and name not in a.only:
            continue
        if time.time() > a.deadline:
            report["sections"][name] = {"status": "skipped", "reason": f"time budget of {budget:.0f} s spent"}
            log(f"{name}: skipped (budget spent)")
            continue
        log(f"{name}: start")
        t0 = time.perf_counter()
        try:
            res = fn(t, p, a)
        except Exception as exc:  # recorded; the next section still runs
            res = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()[-3000:]}
            free_cuda()
        res.setdefault("status", "measured")
        res["seconds"] = round(time.perf_counter() - t0, 2)
        report["sections"][name] = res
        log(f"{name}: {res['status']} in {res['seconds']} s" + (f" ({res.get('error') or res.get('reason')})"
                                                                 if res["status"] != "measured" else ""))
    report["total_seconds"] = round(time.time() - start, 2)
    report["failed"] = [n for n, r in report["sections"].items() if r["status"] == "failed"]
    text = json.dumps(report, default=str)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, default=str, indent=2) + "\n")
    if scratch:
        shutil.rmtree(a.work, ignore_errors=True)
    print(text, flush=True)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
