"""ddp_train.py with faults injected, for the end-to-end tests that need real processes
(torchrun, signals, a second rank). Production code has no test hooks; this file
replaces functions at these seams, each a module attribute that every caller looks up
through its module:
- training.train_step and training.compute_loss (the loop's step, and the loss that
  train_step and evaluate compute);
- checkpointing.save_safetensors (every model.safetensors a checkpoint writes);
- microbatch_search.require_gpu and microbatch_search.make_trial (the -f search's
  CUDA check and its trial of one microbatch size);
- torch.distributed.checkpoint's FileSystemWriter.write_data (a sharded checkpoint's
  writes).
Run it exactly like ddp_train.py:

    torchrun --nproc_per_node=2 tests/train_with_faults.py RUN DATASETS_DIR ...

Faults, from the environment:
- FAULT_NAN_LOSS="RANK:STEP,STEP;RANK:STEP": that rank's training loss is NaN at those
  optimizer steps, counted from the first step this process trains (0 on a fresh run);
- FAULT_SAVE_DELAY_S=SECONDS: a checkpoint save pauses that long after writing
  model.safetensors, so that a kill can land in the middle of it;
- FAULT_MAX_MICROBATCH="RANK:N,...": for -f on CPU, microbatches above N fail on that
  rank as if out of memory (and -f runs without CUDA);
- FAULT_SHARD_WRITE="RANK:STEP": under FSDP, that rank's write of its shards of the
  checkpoint of that global step fails as on a full disk.
"""

import errno
import itertools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import checkpointing  # noqa: E402
import ddp_train  # noqa: E402
import microbatch_search  # noqa: E402
import training  # noqa: E402


def inject_nan_losses(spec):
    nan_steps = {int(rank): {int(step) for step in steps.split(",")}
                 for rank, steps in (item.split(":") for item in spec.split(";"))}
    steps = itertools.count()
    real_train_step, real_compute_loss = training.train_step, training.compute_loss

    def train_step(setup, run, ctx, microbatches, stop_requested):
        poisoned = next(steps) in nan_steps.get(ctx.rank, ())
        training.compute_loss = ((lambda *args: real_compute_loss(*args) * float("nan"))
                                 if poisoned else real_compute_loss)
        return real_train_step(setup, run, ctx, microbatches, stop_requested)

    training.train_step = train_step


def delay_saves(seconds):
    real_save = checkpointing.save_safetensors

    def save_safetensors(*args, **kwargs):
        real_save(*args, **kwargs)
        time.sleep(seconds)

    checkpointing.save_safetensors = save_safetensors


def limit_microbatches(spec):
    limits = {int(rank): int(limit) for rank, limit in
              (item.split(":") for item in spec.split(","))}
    real_make_trial = microbatch_search.make_trial

    def make_trial(model, optimizer, scaler, compute_loss, ctx, *args):
        try_microbatch = real_make_trial(model, optimizer, scaler, compute_loss, ctx, *args)
        limit = limits.get(ctx.rank)
        return lambda size: None if limit is not None and size > limit else try_microbatch(size)

    microbatch_search.require_gpu = lambda device: None
    microbatch_search.make_trial = make_trial


def fail_shard_write(spec):
    from torch.distributed.checkpoint import FileSystemWriter

    rank_text, step_text = spec.split(":")
    real_write_data = FileSystemWriter.write_data

    def write_data(self, plan, planner):
        if int(os.environ["RANK"]) == int(rank_text) and f"iteration-{step_text}" in str(self.path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_data(self, plan, planner)

    FileSystemWriter.write_data = write_data


if __name__ == "__main__":
    if os.environ.get("FAULT_NAN_LOSS"):
        inject_nan_losses(os.environ["FAULT_NAN_LOSS"])
    if os.environ.get("FAULT_SAVE_DELAY_S"):
        delay_saves(float(os.environ["FAULT_SAVE_DELAY_S"]))
    if os.environ.get("FAULT_MAX_MICROBATCH"):
        limit_microbatches(os.environ["FAULT_MAX_MICROBATCH"])
    if os.environ.get("FAULT_SHARD_WRITE"):
        fail_shard_write(os.environ["FAULT_SHARD_WRITE"])
    ddp_train.main(prog_name="ddp_train.py")
