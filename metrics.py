"""Per-step metrics: `metrics.jsonl` in the run directory (rank 0), TensorBoard, W&B, and
the statistics each checkpoint's meta.json records. (The console is console.py's.)

metrics.jsonl has one JSON object per optimizer step: step, loss (mean over ranks
and microsteps), lr, grad_norm (before clipping), clipped, skipped (a non-finite
step not applied), tokens (cumulative, all ranks), tokens_per_sec (all ranks) and
tokens_per_sec_per_device, mfu (null when the device's peak is unknown), eta_s and
elapsed_s; validated steps also carry val_loss, steps with a HellaSwag evaluation
hellaswag_acc and hellaswag_acc_norm, and steps with a CORE evaluation core, core_se and
core/<task label> (each task's centered accuracy). With train.json `diagnostics`, every row
also has grad_norm/GROUP (before clipping) and update_ratio/GROUP (||update|| / ||weight
before the step||) for each group of parameters (training.diagnostic_group). Non-finite
values are null. With train.json `wandb_project` rank 0 also logs every row to Weights & Biases.
Throughput, ETA and elapsed time are measured over each log window (log_interval
steps, read from the device in one transfer) and interpolated within it.
"""

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import perf
from errors import UserError
from jsonfiles import finite_or_none, strict_json

# metrics.jsonl keys written to TensorBoard, under these tags.
TENSORBOARD_TAGS = {"loss": "train/loss", "val_loss": "validation/loss", "lr": "train/learning_rate",
                    "grad_norm": "train/grad_norm", "tokens_per_sec": "throughput/tokens_per_sec",
                    "mfu": "throughput/mfu", "hellaswag_acc": "hellaswag/acc",
                    "hellaswag_acc_norm": "hellaswag/acc_norm", "core": "core/CORE", "core_se": "core/CORE_se"}
# The step statistics train.json `diagnostics` adds, one per group: these prefixes and the group's name.
DIAGNOSTIC_PREFIXES = ("grad_norm/", "update_ratio/")


def diagnostic_keys(row):
    return [key for key in row if key.startswith(DIAGNOSTIC_PREFIXES)]


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
        with self._reported_errors():
            partial.write_text("".join(strict_json(row) + "\n" for row in rows))
            os.replace(partial, self.path)

    def append(self, row):
        with self._reported_errors(), open(self.path, "a") as f:
            f.write(strict_json(row) + "\n")

    @contextlib.contextmanager
    def _reported_errors(self):
        try:
            yield
        except OSError as e:
            raise UserError(f"{self.path}: could not write the metrics ({e.strerror or e}); the checkpoints "
                            "are untouched")


def require_tensorboard():
    """torch's SummaryWriter, or one clear error when the optional package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("train.json: key 'tensorboard' is true but the tensorboard package is not "
                        "installed; run `uv sync --extra tensorboard`")
    return SummaryWriter


def run_config(run):
    """The run's config as one JSON object: model.json, the effective train.json (--set
    applied) and, when there are any, the --set overrides."""
    config = {"model": dataclasses.asdict(run.model), "train": dataclasses.asdict(run.train)}
    return config | ({"overrides": run.overrides} if run.overrides else {})


class TensorBoardLog:
    """The same per-step scalars, for `tensorboard --logdir runs/<run>/tb` (train.json
    `tensorboard`), and the run's config: as text (TEXT tab) and as hyperparameters
    (HPARAMS tab, beside the final train and validation loss)."""

    def __init__(self, log_dir, run):
        self.writer = require_tensorboard()(log_dir=str(log_dir))
        self.write_config(run)

    def write_config(self, run):
        from torch.utils.tensorboard.summary import hparams

        config = run_config(run)
        self.writer.add_text("config", f"run {run.name}\n\n```json\n{json.dumps(config, indent=2)}\n```")
        values = {f"{part}/{key}": value for part in ("model", "train") for key, value in config[part].items()}
        metrics = {TENSORBOARD_TAGS["loss"]: None, TENSORBOARD_TAGS["val_loss"]: None}
        for summary in hparams(values, metrics):
            self.writer.file_writer.add_summary(summary)

    def append(self, row):
        # Each CORE task's centered accuracy keeps its metrics.jsonl key, core/<task label>, as its tag.
        tags = TENSORBOARD_TAGS | {key: key for key in row if key.startswith("core/")}
        for key, tag in tags.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], global_step=row["step"])
        for key in diagnostic_keys(row):
            if row[key] is not None:
                self.writer.add_scalar(f"diagnostics/{key}", row[key], global_step=row["step"])

    def close(self):
        self.writer.close()


def require_wandb():
    """The wandb module, or one clear error when the optional package is missing."""
    try:
        import wandb
    except ImportError:
        raise UserError("train.json: key 'wandb_project' is set but the wandb package is not installed; "
                        "run `uv sync --extra wandb`")
    return wandb


class WandbLog:
    """The same rows, at the same steps, and the run's config, to a Weights & Biases run
    (train.json `wandb_project`). `run_id`: the W&B run to continue (a resumed run's, from
    its checkpoint); W&B's local files go to WANDB_DIR, or else the run directory."""

    def __init__(self, run, run_id=None):
        wandb = require_wandb()
        config = run_config(run)
        try:
            self.run = wandb.init(project=run.train.wandb_project, entity=run.train.wandb_entity,
                                  name=run.wandb_run_name, id=run_id, resume="allow",
                                  dir=os.environ.get("WANDB_DIR", run.run_dir), config=config)
        except wandb.Error as e:
            reason = " ".join(str(e).split())  # error output is one line
            raise UserError(f"could not start the W&B run of train.json's wandb_project "
                            f"'{run.train.wandb_project}' ({reason}); `wandb login`, or WANDB_MODE=offline "
                            "to keep it local")

    @property
    def run_id(self):
        return self.run.id

    def append(self, row):
        # W&B charts a key from the steps that have it: null values (a skipped step's loss) are left out.
        self.run.log({key: value for key, value in row.items() if key != "step" and value is not None},
                     step=row["step"])

    def close(self, failed=False):
        self.run.finish(exit_code=1 if failed else 0)


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


def peak_flops_for(train_cfg, device, amp_dtype):
    """The device's peak FLOP/s for MFU: train.json's peak_tflops, else perf.py's table for
    this GPU at the autocast precision; None when unknown (fp32, CPUs)."""
    override = None if train_cfg.peak_tflops is None else train_cfg.peak_tflops * 1e12
    if amp_dtype is None or device.type != "cuda":
        return override
    return perf.peak_flops(torch.cuda.get_device_name(device), str(amp_dtype).removeprefix("torch."), override)


class TrainingLog:
    """Turns the step statistics of each log window into metrics.jsonl rows on every rank
    (the training loop decides from them); rank 0 also writes them to metrics.jsonl,
    TensorBoard and W&B (`wandb`, a WandbLog the caller started). It records only:
    where the run is (tokens, elapsed time), stopping, skipping, what counts as best and
    when to evaluate are the training loop's.
    """

    def __init__(self, run, ctx, total_steps, global_batch_tokens, amp_dtype, wandb=None):
        self.run, self.ctx = run, ctx
        self.total_steps, self.global_batch_tokens = total_steps, global_batch_tokens
        self.last_record = time.time()
        self.flops_per_token = perf.training_flops_per_token(run.model)
        self.peak_flops = peak_flops_for(run.train, ctx.device, amp_dtype)
        self.metrics_file = MetricsLog(run.run_dir / "metrics.jsonl") if ctx.is_main else None
        self.tensorboard = TensorBoardLog(run.run_dir / "tb", run) if ctx.is_main and run.train.tensorboard else None
        self.wandb = wandb

    def record(self, window, evaluations, tokens_before, elapsed_before):
        """`window`: (step, lr, statistics) for each step since the last call, statistics
        being a dict of the step's training.STEP_STATISTICS. `evaluations`: the keys the
        evaluations at the window's last step add to its row (val_loss, hellaswag_acc,
        hellaswag_acc_norm, core, ...). `tokens_before`, `elapsed_before`: the run's tokens and
        training seconds before the window. Returns the rows."""
        now = time.time()
        window_seconds = max(now - self.last_record, 1e-9)
        tokens_per_sec = len(window) * self.global_batch_tokens / window_seconds
        per_device = tokens_per_sec / self.ctx.world_size
        clip = self.run.train.clipping_max_norm
        rows = []
        for position, (step, lr, statistics) in enumerate(window):
            loss, grad_norm = statistics["loss"], statistics["grad_norm"]
            row = {"step": step, "loss": finite_or_none(loss), "lr": lr, "grad_norm": finite_or_none(grad_norm),
                   "clipped": clip is not None and grad_norm > clip,
                   "skipped": statistics["skipped"] > 0,
                   "tokens": tokens_before + (position + 1) * self.global_batch_tokens,
                   "tokens_per_sec": tokens_per_sec, "tokens_per_sec_per_device": per_device,
                   "mfu": perf.mfu(per_device, self.flops_per_token, self.peak_flops),
                   "eta_s": (self.total_steps - step - 1) * window_seconds / len(window),
                   "elapsed_s": elapsed_before + window_seconds * (position + 1) / len(window)}
            row |= {key: finite_or_none(statistics[key]) for key in diagnostic_keys(statistics)}
            if position == len(window) - 1:
                row |= {key: finite_or_none(value) for key, value in evaluations.items()}
            self._write(row)
            rows.append(row)
        self.last_record = now
        return rows

    def _write(self, row):
        if not self.ctx.is_main:
            return
        self.metrics_file.append(row)
        if self.tensorboard:
            self.tensorboard.append(row)
        if self.wandb:
            self.wandb.append(row)

    def close(self, failed=False):
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.close(failed)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        self.close(failed=exc_type is not None)
