"""`ddp_train.py RUN DATASETS_DIR -f`: the largest microbatch that trains without running
out of memory, and the accumulation that reaches a target global batch with it (or, when
train.json fixes the global batch with global_batch_tokens, the microbatch that splits it)."""

import gc
import json
import math
import os

import torch

from batching import divisors
from errors import UserError

STEPS_PER_TRY = 3


def largest_passing(passes):
    """The largest size for which `passes(size)` is true, assuming sizes pass up to some
    limit and fail above it: double from 1 until a size fails (no fixed cap), then
    binary-search between the last pass and the first failure. 0 if even 1 fails."""
    if not passes(1):
        return 0
    good, bad = 1, 2
    while passes(bad):
        good, bad = bad, bad * 2
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if passes(middle) else (good, middle)
    return good


def suggest_batch_split(max_microbatch, world_size, target_global_batch):
    """(microbatch_size, gradient_accumulation_steps) reaching at least the target global
    batch (in sequences) with the fewest accumulation steps and a microbatch that fits."""
    accumulation = math.ceil(target_global_batch / (max_microbatch * world_size))
    microbatch = math.ceil(target_global_batch / (accumulation * world_size))
    return microbatch, accumulation


def suggest_dividing_microbatch(max_microbatch, sequences_per_rank):
    """(microbatch_size, gradient_accumulation_steps) for a global batch fixed at
    `sequences_per_rank` sequences per rank (train.json's global_batch_tokens): the largest
    microbatch that fits and divides it, so the accumulation is whole."""
    microbatch = max(d for d in divisors(sequences_per_rank) if d <= max_microbatch)
    return microbatch, sequences_per_rank // microbatch


def require_gpu(device):
    if device.type != "cuda":
        raise UserError("-f searches GPU memory for the largest microbatch, and this machine has no CUDA device")


def make_trial(model, optimizer, scaler, compute_loss, ctx, context_length, vocab_size):
    """`try_microbatch(size)`: this rank's peak memory in bytes (0 on CPU, which has no
    allocator statistics) while STEPS_PER_TRY forward/backward/optimizer steps at that
    microbatch size ran, or None if they ran out of memory. The model is not wrapped in
    DDP here: an out-of-memory error in one rank's backward would leave the others
    waiting in a gradient all-reduce."""
    on_gpu = ctx.device.type == "cuda"

    def train_steps(size):
        for _ in range(STEPS_PER_TRY):
            tokens = torch.randint(0, vocab_size, (size, context_length + 1), device=ctx.device)
            loss = compute_loss(model, tokens[:, :-1], tokens[:, 1:])
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

    def try_microbatch(size):
        if on_gpu:  # otherwise the peak would be the largest of every try so far, failed ones included
            torch.cuda.reset_peak_memory_stats(ctx.device)
        try:
            train_steps(size)
            passed = True
        except torch.OutOfMemoryError:
            passed = False
        # Out here, once the exception and with it train_steps' frame (its activations) are
        # gone, so that emptying the cache hands the failed try's memory back.
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
        if not passed:
            return None
        return torch.cuda.max_memory_allocated(ctx.device) if on_gpu else 0

    return try_microbatch


def write_batch_split(train_json, keys):
    """Update `keys` (microbatch_size, and gradient_accumulation_steps unless train.json derives
    it from global_batch_tokens) in train.json, keeping every other key and their order."""
    raw = json.loads(train_json.read_text())
    raw.pop("minibatch_size", None)  # the old spelling would now contradict the new value
    raw.update(keys)
    partial = train_json.with_name(train_json.name + ".partial")
    partial.write_text(json.dumps(raw, indent=4) + "\n")
    os.replace(partial, train_json)
