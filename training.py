"""The pieces of training that more than one script uses: precision, the loss, the
optimizer, the learning-rate schedule and the memory a model needs.

ddp_train.py assembles them into the training step and loop; bench.py,
test_loss.py and the -f search use them so that they measure and evaluate
exactly what training runs.
"""

import math
import os
import warnings

import torch

import perf
from config import TOKEN_BUDGET_KEYS
from errors import UserError

# The reference harness's LinearLR warmup starts at learning_rate x this.
WARMUP_START_FACTOR = 1e-5
# fp32 weights, fp32 gradients and AdamW's two fp32 moments.
TRAINING_BYTES_PER_PARAMETER = 16


def amp_dtype_for(train_cfg, device):
    """The autocast dtype, or None for full fp32."""
    if not train_cfg.use_amp:
        return None
    if train_cfg.amp_dtype is not None:
        return getattr(torch, train_cfg.amp_dtype)
    # Without including_emulation=False a V100 or T4 counts as bf16-capable (it can hold
    # bf16 tensors), and would then run bf16 matmuls emulated, without tensor cores.
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16
    return torch.bfloat16


def compute_loss(model, inputs, targets, amp_dtype, device):
    """The mean cross-entropy, which the model computes in fp32 from its logits."""
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        return model(inputs, targets)


def make_optimizer(model, train_cfg):
    # One parameter group, as in the reference harness, so its optimizer.pt files load.
    # Fused: one kernel for all parameters, and it can skip a step on a device-side flag.
    return torch.optim.AdamW(model.parameters(), lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay,
                             fused=True)


# ---------------------------------------------------------------- learning-rate schedule

def warmup_steps_for(total_steps, warmup_period_percent):
    """The reference harness's `total_steps * warmup_period_percent // 100`."""
    return int(total_steps * warmup_period_percent // 100)


def lr_factor(step, total_steps, warmup_steps, min_ratio):
    """The reference harness's schedule, as a multiple of learning_rate at optimizer step
    `step` (0-based): its LinearLR warmup from WARMUP_START_FACTOR to 1 over
    `warmup_steps` steps, then its CosineAnnealingLR from 1 to `min_ratio` with a
    period of `total_steps - warmup_steps` steps, so the last step stops just short of
    the floor. Written in closed form, which equals torch's step-by-step recurrences
    to float rounding (tests/test_lr_schedule.py), so that a resumed run only needs
    its step number to be back on the schedule."""
    if step < warmup_steps:
        return WARMUP_START_FACTOR + (1 - WARMUP_START_FACTOR) * step / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2


def make_lr_scheduler(optimizer, train_cfg, total_steps):
    """A LambdaLR on the reference schedule (constant without schedule_learning_rate).
    Stepped once after every optimizer step, skipped ones included, as in the reference."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(schedule_record(train_cfg, total_steps)))


# What the schedule is computed from: every checkpoint records it (meta.json "schedule"), so
# that a run resumed with other values can say what changed.
SCHEDULE_KEYS = ("schedule_learning_rate", "learning_rate", "min_lr", "warmup_period_percent", *TOKEN_BUDGET_KEYS)


def schedule_record(train_cfg, total_steps):
    return {"total_steps": total_steps, **{key: getattr(train_cfg, key) for key in SCHEDULE_KEYS}}


def schedule_factor(record):
    """step -> the multiple of learning_rate at that step, for a schedule_record."""
    if not record["schedule_learning_rate"]:
        return lambda step: 1.0
    total_steps = record["total_steps"]
    warmup_steps = warmup_steps_for(total_steps, record["warmup_period_percent"])
    min_lr = record["learning_rate"] / 10 if record["min_lr"] is None else record["min_lr"]
    min_ratio = min_lr / record["learning_rate"]
    return lambda step: lr_factor(step, total_steps, warmup_steps, min_ratio)


def learning_rate_at(step, record):
    return record["learning_rate"] * schedule_factor(record)(step)


def schedule_change_note(saved, now, step, checkpoint_name):
    """The note for resuming at `step` under schedule_record `now` from a checkpoint whose
    schedule was `saved` (None: written before checkpoints recorded it), or None when they
    agree. Resuming with more steps (or another decay) is legitimate; doing it silently is not."""
    if saved is None:
        return (f"note: checkpoint {checkpoint_name} does not record its learning-rate schedule (an older "
                "checkpoint); this run's schedule cannot be compared with the one it was trained on")
    changed = [key for key in SCHEDULE_KEYS if saved.get(key) != now[key]]
    if not changed and saved["total_steps"] == now["total_steps"]:
        return None
    keys = ", ".join(f"{key} {saved.get(key)} -> {now[key]}" for key in changed) or "no key (the dataset's size)"
    return (f"note: the learning-rate schedule differs from checkpoint {checkpoint_name}'s ({keys}): total steps "
            f"{saved['total_steps']:,} -> {now['total_steps']:,}; the learning rate at global step {step} is "
            f"{learning_rate_at(step, now):.6g} (it would have been {learning_rate_at(step, saved):.6g})")


def move_lr_scheduler_to(scheduler, step):
    """Put the schedule where it is after `step` optimizer steps (on resume)."""
    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():
        # torch's warning that the optimizer has not stepped yet: true, and meant here.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        scheduler.step()


# ---------------------------------------------------------------- memory

def device_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_model_fits(model_cfg, device, source, shards=1):
    """Refuse, before allocating anything, a model whose weights, gradients and AdamW
    state alone (cut into `shards` under FSDP) exceed the device's memory (a typo like
    n_layers 10,000,000)."""
    parameters = perf.parameter_count(model_cfg)
    needed = parameters * TRAINING_BYTES_PER_PARAMETER // shards
    available = device_memory_bytes(device)
    if needed > available:
        per_shard = f", 1/{shards} of it per device" if shards > 1 else ""
        raise UserError(
            f"{source}: this model has {parameters:,} parameters, whose weights, gradients and AdamW state "
            f"need {needed / 2**30:,.1f} GiB ({TRAINING_BYTES_PER_PARAMETER} bytes each{per_shard}), more than the "
            f"{available / 2**30:,.1f} GiB of {device}; check n_layers, emb_dim and vocab_size")
