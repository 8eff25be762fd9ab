"""Per-step metrics: `metrics.jsonl` in the run directory (rank 0), TensorBoard, the progress
bar, and the statistics each checkpoint's meta.json records.

metrics.jsonl has one JSON object per optimizer step: step, loss (mean over ranks
and microsteps), lr, grad_norm (before clipping), clipped, skipped (a non-finite
step not applied), tokens (cumulative, all ranks), tokens_per_sec (all ranks) and
tokens_per_sec_per_device, mfu (null when the device's peak is unknown), eta_s and
elapsed_s; validated steps also carry val_loss. Non-finite values are null.
Throughput, ETA and elapsed time are measured over each log window (log_interval
steps, read from the device in one transfer) and interpolated within it.
"""

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import perf
from errors import UserError

# metrics.jsonl keys written to TensorBoard, under these tags.
TENSORBOARD_TAGS = {"loss": "train/loss", "val_loss": "validation/loss", "lr": "train/learning_rate",
                    "grad_norm": "train/grad_norm", "tokens_per_sec": "throughput/tokens_per_sec",
                    "mfu": "throughput/mfu"}


def read_metrics(path):
    """The rows of a metrics.jsonl; a torn last line (a run killed mid-write) is ignored,
    a bad line anywhere else is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise UserError(f"{path}: line {number} is not valid JSON")
    return rows


class MetricsLog:
    def __init__(self, path):
        self.path = Path(path)

    def truncate_after(self, step):
        """On resume, drop rows the previous run logged after the checkpoint it resumes
        from: those steps are about to be trained again."""
        rows = [row for row in read_metrics(self.path) if row["step"] <= step]
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text("".join(json.dumps(row) + "\n" for row in rows))
        os.replace(partial, self.path)

    def append(self, row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def require_tensorboard():
    """torch's SummaryWriter, or one clear error when the optional package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("train.json: key 'tensorboard' is true but the tensorboard package is not "
                        "installed; run `uv sync --extra tensorboard`")
    return SummaryWriter


class TensorBoardLog:
    """The same per-step scalars, for `tensorboard --logdir runs/<run>/tb` (train.json `tensorboard`)."""

    def __init__(self, log_dir):
        self.writer = require_tensorboard()(log_dir=str(log_dir))

    def append(self, row):
        for key, tag in TENSORBOARD_TAGS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], global_step=row["step"])

    def close(self):
        self.writer.close()


@dataclass
class IntervalStats:
    """What happened since the last checkpoint, for its meta.json (the reference harness's key names)."""
    losses: list = field(default_factory=list)
    grad_norms: list = field(default_factory=list)
    clipped: list = field(default_factory=list)

    def add(self, row):
        if row["loss"] is not None:
            self.losses.append(row["loss"])
        if row["grad_norm"] is not None:
            self.grad_norms.append(row["grad_norm"])
        self.clipped.append(row["clipped"])

    def summary(self):
        def stats(values, name):
            if not values:
                return {f"min_{name}": None, f"avg_{name}": None, f"max_{name}": None}
            return {f"min_{name}": min(values), f"avg_{name}": sum(values) / len(values),
                    f"max_{name}": max(values)}

        return {**stats(self.losses, "train_loss"), **stats(self.grad_norms, "grad_norms"),
                "frac_clipped": sum(self.clipped) / max(1, len(self.clipped))}


def finite_or_none(value):
    """metrics.jsonl stays strict JSON: a NaN or inf is logged as null."""
    return value if math.isfinite(value) else None


class TrainingLog:
    """Turns the device-side statistics of each step into rows, on every rank alike
    (all ranks need the skip count and the stop decision); rank 0 also writes them.

    `flush` reads a whole log window from the device in one transfer, so the
    training loop never waits for the device between log points.
    """

    def __init__(self, run, ctx, total_steps, global_batch_tokens, amp_dtype, progress):
        self.run, self.ctx = run, ctx
        self.total_steps, self.global_batch_tokens = total_steps, global_batch_tokens
        self.tokens_seen, self.best_loss = progress.tokens_seen, progress.best_loss
        self.elapsed_before = progress.elapsed_before
        self.session_start = self.last_flush = time.time()
        self.session_tokens = 0
        self.interval = IntervalStats()
        self.skipped_in_a_row = 0
        self.last_row = None
        self.last_val_loss = None
        self.flops_per_token = perf.training_flops_per_token(run.model)
        precision = None if amp_dtype is None else str(amp_dtype).removeprefix("torch.")
        override = None if run.train.peak_tflops is None else run.train.peak_tflops * 1e12
        self.peak_flops = (override if precision is None or ctx.device.type != "cuda" else
                           perf.peak_flops(torch.cuda.get_device_name(ctx.device), precision, override))
        self.metrics_file = MetricsLog(run.run_dir / "metrics.jsonl") if ctx.is_main else None
        self.tensorboard = TensorBoardLog(run.run_dir / "tb") if ctx.is_main and run.train.tensorboard else None
        if self.metrics_file:
            self.metrics_file.truncate_after(progress.start_step - 1)
        self.bar = tqdm(total=total_steps, initial=progress.start_step, disable=not ctx.is_main,
                        unit="step", dynamic_ncols=True)

    def flush(self, pending, val_loss):
        """`pending`: (step, lr, stats) since the last flush, stats being the device tensor
        [loss, grad_norm, non-finite ranks, stop votes]. Returns whether any rank asked to stop."""
        values = torch.stack([stats for _, _, stats in pending]).tolist()  # the one device-to-host sync
        now = time.time()
        window_seconds = max(now - self.last_flush, 1e-9)
        tokens_per_sec = len(pending) * self.global_batch_tokens / window_seconds
        per_device = tokens_per_sec / self.ctx.world_size
        stop_requested = False
        for position, ((step, lr, _), (loss, grad_norm, nonfinite_ranks, stop_votes)) in enumerate(
                zip(pending, values)):
            self.tokens_seen += self.global_batch_tokens
            self.session_tokens += self.global_batch_tokens
            clip = self.run.train.clipping_max_norm
            row = {"step": step, "loss": finite_or_none(loss), "lr": lr, "grad_norm": finite_or_none(grad_norm),
                   "clipped": clip is not None and grad_norm > clip,
                   "skipped": nonfinite_ranks > 0 or not math.isfinite(grad_norm),
                   "tokens": self.tokens_seen, "tokens_per_sec": tokens_per_sec,
                   "tokens_per_sec_per_device": per_device,
                   "mfu": perf.mfu(per_device, self.flops_per_token, self.peak_flops),
                   "eta_s": (self.total_steps - step - 1) * window_seconds / len(pending),
                   "elapsed_s": self.elapsed_before + (self.last_flush - self.session_start)
                   + window_seconds * (position + 1) / len(pending)}
            if position == len(pending) - 1 and val_loss is not None:
                row["val_loss"] = self.last_val_loss = val_loss
            self.skipped_in_a_row = self.skipped_in_a_row + 1 if row["skipped"] else 0
            stop_requested |= stop_votes > 0
            self.interval.add(row)
            self._write(row)
            self.last_row = row
        self.last_flush = now
        if self.skipped_in_a_row >= self.run.train.max_skipped_steps:
            # Every rank reaches this at the same step: the flags were all-reduced.
            raise UserError(
                f"{self.skipped_in_a_row} optimizer steps in a row had a non-finite loss or gradient (last at "
                f"step {self.last_row['step']}); stopping with the last good checkpoint kept. Try a lower "
                "learning_rate, clipping_max_norm, or amp_dtype \"bfloat16\"")
        return stop_requested

    def _write(self, row):
        if not self.ctx.is_main:
            return
        self.metrics_file.append(row)
        if self.tensorboard:
            self.tensorboard.append(row)
        self.bar.update(1)
        mfu = "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}"
        loss = "nan" if row["loss"] is None else f"{row['loss']:.3f}"
        self.bar.set_postfix(loss=loss, tok_per_s=f"{row['tokens_per_sec']:,.0f}",
                             per_dev=f"{row['tokens_per_sec_per_device']:,.0f}", mfu=mfu)

    def checkpoint_meta(self, validates):
        """meta.json for a checkpoint at the last flushed step, and whether it is the best so far:
        by validation loss when the run validates, else by average train loss."""
        summary = self.interval.summary()
        score = self.last_val_loss if validates else summary["avg_train_loss"]
        is_best = score is not None and (self.best_loss is None or score < self.best_loss)
        self.best_loss = score if is_best else self.best_loss
        self.interval = IntervalStats()
        train_cfg = self.run.train
        meta = {"global_step": self.last_row["step"], **summary, "learning_rate": self.last_row["lr"],
                "val_loss": self.last_val_loss, "best_loss": self.best_loss, "tokens_seen": self.tokens_seen,
                "elapsed_s": self.last_row["elapsed_s"], "world_size": self.ctx.world_size,
                "microbatch_size": train_cfg.microbatch_size,
                "gradient_accumulation_steps": train_cfg.gradient_accumulation_steps,
                "pad_vocab_to_multiple_of": train_cfg.pad_vocab_to_multiple_of,
                "model_config": self.run.model.to_dict()}
        return meta, is_best

    def close(self):
        self.bar.close()
        if self.tensorboard:
            self.tensorboard.close()

    def summary(self):
        seconds = time.time() - self.session_start
        text = (f"Training complete in {seconds:,.1f} s; tokens seen this session {self.session_tokens:,} "
                f"(total {self.tokens_seen:,}); throughput {self.session_tokens / seconds:,.0f} tokens/s")
        if self.last_row is not None and self.last_row["loss"] is not None:
            text += f"; final train loss {self.last_row['loss']:.4f}"
        if self.last_val_loss is not None:
            text += f"; final validation loss {self.last_val_loss:.4f}"
        return text
