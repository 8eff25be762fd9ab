"""`ddp_train.py RUN DATASETS_DIR -f`: the largest microbatch that trains without running
out of memory, and the accumulation that reaches a target global batch with it (or, when
train.json fixes the global batch with global_batch_tokens, the microbatch that splits it).

`find_max_microbatch` is the whole -f; preflight.py uses its parts (`microbatch_trial`,
`largest_microbatch`, `batch_suggestion`). Seams for tests (tests/train_with_faults.py,
tests/test_microbatch_search.py): `require_gpu` and `make_trial` are called through this
module, so replacing them here lets the search run on CPU with a simulated memory limit.
"""

import gc
import json
import math
import os

import torch
import torch.distributed as dist

from batching import divisors, sequences_per_rank
from distributed import run_and_share_errors
from errors import UserError
from parallelism import autocast_dtype_for
from training import build_model, compute_loss

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


# ---------------------------------------------------------------- the search on every rank

def microbatch_trial(run, ctx):
    """`fits(size)`: STEPS_PER_TRY training steps at that microbatch size on every rank, on
    a freshly built model; the peak memory of the fullest device in bytes (0 on CPU) if
    they ran everywhere, None if any rank ran out of memory. A collective call."""
    model, amp_dtype, optimizer, scaler = build_model(run, ctx)
    autocast_dtype = autocast_dtype_for(run.train, amp_dtype)
    try_microbatch = make_trial(model, optimizer, scaler,
                                lambda m, inputs, targets: compute_loss(m, inputs, targets, autocast_dtype, ctx.device),
                                ctx, run.model.context_length, run.model.vocab_size)

    def fits(size):
        peak = try_microbatch(size)
        # One all-reduce (MAX) answers both: the first value is 0 if any rank failed.
        outcome = torch.tensor([0.0 if peak is None else -1.0, float(peak or 0)], dtype=torch.float64,
                               device=ctx.device)
        dist.all_reduce(outcome, op=dist.ReduceOp.MAX)
        return None if outcome[0].item() == 0 else int(outcome[1].item())

    return fits


def largest_microbatch(run, ctx, fits):
    """The -f search with `fits` (microbatch_trial's): (the largest microbatch that fits on
    every rank, its peak memory on the fullest device)."""
    peaks = {}

    def passes(size):
        peaks[size] = fits(size)
        if ctx.is_main:
            print(f"microbatch {size}: {'fits' if peaks[size] is not None else 'out of memory'}", flush=True)
        return peaks[size] is not None

    largest = largest_passing(passes)
    if largest == 0:
        raise UserError(f"even a microbatch of 1 sequence of {run.model.context_length} tokens runs out of "
                        "memory; use a smaller model or context_length")
    return largest, peaks[largest]


def find_max_microbatch(run, ctx, target_global_batch, write):
    """The -f search: no validation, no checkpoints, random tokens (memory depends only on shapes)."""
    require_gpu(ctx.device)
    train_json = run.run_dir / "train.json"
    # A global batch fixed in train.json that this world size cannot split is said before the search, not after.
    sequences = fixed_sequences_per_rank(run, ctx)
    largest, peak = largest_microbatch(run, ctx, microbatch_trial(run, ctx))
    keys, suggestion = batch_suggestion(run, ctx, largest, sequences, target_global_batch)
    if ctx.is_main:
        peak_text = f"{peak / 2**30:.1f} GiB on the fullest device" if peak else "n/a on CPU"
        print(f"Largest microbatch that fits on every rank: {largest} (peak memory {peak_text}).\n{suggestion}")
    if write:
        run_and_share_errors(ctx.is_main, lambda: write_batch_split(train_json, keys))
        if ctx.is_main:
            print(f"Updated {train_json}.")


def fixed_sequences_per_rank(run, ctx):
    """Sequences per rank per optimizer step when train.json fixes them with
    global_batch_tokens (an error if this world size cannot split them), else None."""
    if run.train.global_batch_tokens is None:
        return None
    return sequences_per_rank(run.train, ctx.world_size, run.model.context_length, run.run_dir / "train.json")


def batch_suggestion(run, ctx, largest, sequences, target_global_batch):
    """-f's suggestion for the largest microbatch that fits: the train.json keys to write and
    what to print. `sequences`: per rank per step, when train.json fixes them with global_batch_tokens."""
    if sequences is None:
        microbatch, accumulation = suggest_batch_split(largest, ctx.world_size, target_global_batch)
        return ({"microbatch_size": microbatch, "gradient_accumulation_steps": accumulation},
                f"For a global batch of at least {target_global_batch} sequences on {ctx.world_size} rank(s): "
                f"microbatch_size {microbatch}, gradient_accumulation_steps {accumulation} "
                f"(global batch {microbatch * accumulation * ctx.world_size}).")
    microbatch, accumulation = suggest_dividing_microbatch(largest, sequences)
    return ({"microbatch_size": microbatch},  # the accumulation is derived at start-up
            f"For train.json's global_batch_tokens {run.train.global_batch_tokens} ({sequences} sequences per rank "
            f"on {ctx.world_size} rank(s)): microbatch_size {microbatch}, the largest that fits and divides it "
            f"(gradient_accumulation_steps {accumulation}, derived at start-up).")
