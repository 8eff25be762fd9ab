"""Train a GPT-2-class base model with DistributedDataParallel.

    uv run torchrun --nproc_per_node=8 ddp_train.py RUN DATASETS_DIR [CHECKPOINT] [--force]
        [--set KEY=VALUE ...] [--quiet]
    uv run torchrun --nproc_per_node=8 ddp_train.py RUN DATASETS_DIR -f [--target-global-batch 96] [--write]

RUN is a name under runs/ or a path to a run directory holding model.json and
train.json (config.py lists every key). CHECKPOINT resumes a run: a checkpoint
directory name, `latest`, `best`, or `auto` (`latest`, or the newest complete
checkpoint when `latest` is broken; a fresh start only when there are no
checkpoints). Without torchrun it runs as a single process. Rank 0 holds the run
directory's lock and writes checkpoints, metrics.jsonl and charts into it. SIGTERM
or SIGINT stops every rank after the step under way and at most two more, with a
checkpoint. `--set KEY=VALUE` overrides a train.json key for this launch
(docs/training.md).

This file is the command line and the loop with its decisions: `train` is the loop
(when to stop), `save_training_checkpoint` decides whether the weights may be saved
and what is `best`, `count_skipped_steps` stops a streak of non-finite steps. What
it runs lives in modules: training_setup.py builds what a rank trains with (fresh or
resumed), training.py has one optimizer step, validation and the schedule of what
follows each step (`work_after_step`), checkpointing.py saves and restores,
metrics.py records, console.py prints, charts.py draws, microbatch_search.py is the
whole of -f.
"""

import contextlib
import dataclasses
import gc
import math
import os
import sys
import time

import click
import torch
import torch.distributed as dist

import charts
import checkpointing
import core_scoring
import hellaswag_scoring
import training
from batching import prefetch_to_device, rank_microbatch_indices, token_budget
from config import RUNS_DIR, load_run, override_option, parse_overrides
from console import Console, unused_gpus_warning
from distributed import StopSignals, check_connectivity, init_distributed, run_and_share_errors
from errors import RankLost, UserError, report_user_errors
from metrics import IntervalStats, MetricsLog, TrainingLog, WandbLog, require_tensorboard, require_wandb
from microbatch_search import find_max_microbatch
from run_lock import lock_run_dir
from training_setup import set_up_training

# Where gloo's RuntimeErrors about a connection that broke (a peer closed or reset it) come from.
GLOO_TRANSPORT_ERROR = "gloo/transport/"


# ---------------------------------------------------------------- checkpoints

def last_good_checkpoint_text(progress):
    if progress.last_checkpoint is None:
        return "this run has no checkpoint yet"
    return f"the last good checkpoint is {progress.last_checkpoint} (resume with `latest` or `auto`)"


def checkpoint_meta(run, ctx, data, interval, progress):
    """meta.json for a checkpoint at the last recorded step (the reference harness's keys, and ours)."""
    train_cfg = run.train
    return {"global_step": progress.last_row["step"], **interval.summary(),
            "learning_rate": progress.last_row["lr"], "val_loss": progress.last_val_loss,
            "best_loss": progress.best_loss, "tokens_seen": progress.tokens_seen,
            "elapsed_s": progress.elapsed_s, "world_size": ctx.world_size,
            "microbatch_size": train_cfg.microbatch_size,
            "gradient_accumulation_steps": data.gradient_accumulation_steps,
            "pad_vocab_to_multiple_of": train_cfg.pad_vocab_to_multiple_of,
            "parallelism": train_cfg.parallelism, "optimizer": train_cfg.optimizer,
            "model_config": run.model.to_dict(), "schedule": training.schedule_record(train_cfg, data.total_steps),
            "train_config": dataclasses.asdict(train_cfg), "overrides": run.overrides,
            **({"init_from": progress.init_from} if progress.init_from else {}),
            **({"wandb_run_id": progress.wandb_run_id} if progress.wandb_run_id else {})}


def save_training_checkpoint(run, ctx, setup, interval, progress, console, draw_charts=True):
    """Save a checkpoint at the last recorded step, unless the weights have diverged;
    it is `best` when its score (validation loss when the run validates, else the
    average train loss since the last checkpoint) is finite and the lowest so far.
    Rank 0 then redraws the charts (with `draw_charts`)."""
    step = progress.last_row["step"]
    if not training.weights_are_finite(setup.state.model):
        raise UserError(f"the weights are not finite after global step {step} (the run diverged); no "
                        f"checkpoint written: {last_good_checkpoint_text(progress)}. Try a lower learning_rate "
                        "or weight_decay, or clipping_max_norm")
    score = progress.last_val_loss if setup.data.validation is not None else interval.summary()["avg_train_loss"]
    is_best = score is not None and math.isfinite(score) and (progress.best_loss is None
                                                              or score < progress.best_loss)
    if is_best:
        progress.best_loss = score
    meta = checkpoint_meta(run, ctx, setup.data, interval, progress)
    saved = checkpointing.save_and_prune(run.checkpoints_dir, run.train, ctx, setup.state, meta, is_best)
    if ctx.is_main:
        console.saved(step, saved, is_best)
        if draw_charts:
            charts.draw_run_charts(run, setup.data.total_steps)
    # Only rank 0 knows the directory's name (it holds the time of the save).
    progress.last_checkpoint = saved.name if saved else f"the checkpoint of global step {step}"


# ---------------------------------------------------------------- the loop

def read_window(pending, names):
    """(step, lr, {statistic: value}) for each pending step, `names` naming the statistics
    (TrainingSetup.statistic_names): one device-to-host copy."""
    values = torch.stack([statistics for _, _, statistics in pending]).tolist()
    return [(step, lr, dict(zip(names, step_values)))
            for (step, lr, _), step_values in zip(pending, values)]


def count_skipped_steps(rows, run, progress, console):
    """Stop after max_skipped_steps non-finite steps in a row, counted step by step.
    Every rank reaches the same verdict at the same step: the flags were all-reduced."""
    for row in rows:
        progress.skipped_in_a_row = progress.skipped_in_a_row + 1 if row["skipped"] else 0
        if row["skipped"]:
            console.skipped(row["step"], progress.skipped_in_a_row, run.train.max_skipped_steps)
        if progress.skipped_in_a_row >= run.train.max_skipped_steps:
            raise UserError(
                f"{progress.skipped_in_a_row} optimizer steps in a row had a non-finite loss or gradient (the "
                f"last at global step {row['step']}), train.json max_skipped_steps is "
                f"{run.train.max_skipped_steps}; stopping: {last_good_checkpoint_text(progress)}. Try a lower "
                "learning_rate, clipping_max_norm, or amp_dtype \"bfloat16\"")


def print_batch_and_budget(run, ctx, data):
    """What train.json's global_batch_tokens and token budget came to, when it gives them."""
    if run.train.global_batch_tokens is not None:
        print(f"global batch: global_batch_tokens {data.global_batch_tokens:,} = world size {ctx.world_size} x "
              f"microbatch_size {run.train.microbatch_size} x gradient_accumulation_steps "
              f"{data.gradient_accumulation_steps} (derived) x context_length {run.model.context_length}")
    budget = token_budget(run.train, run.model)
    if budget.key is not None:
        print(f"budget: {budget} -> {data.total_steps:,} steps of {data.global_batch_tokens:,} tokens")
    if run.train.is_mixture:
        total_weight = sum(share.source.weight for share in data.mixture)
        print("mixture: " + "; ".join(
            f"{share.source.name} ({share.source.dataset}) weight {share.source.weight:g} "
            f"({share.source.weight / total_weight:.1%}): {share.tokens:,} of its {share.available_tokens:,} "
            "train tokens"
            for share in data.mixture))


def open_training_log(run, ctx, setup, progress):
    """The metrics log, on every rank. On rank 0 metrics.jsonl continues at the step the run
    resumes from (rows an earlier session logged after that checkpoint are about to be
    trained again; a fresh start empties it) and the W&B run starts (a resumed run's
    continues)."""
    wandb = None
    if ctx.is_main:
        MetricsLog(run.run_dir / "metrics.jsonl").truncate_after(progress.start_step - 1)
        if run.train.wandb_project:
            wandb = WandbLog(run, progress.wandb_run_id)
            progress.wandb_run_id = wandb.run_id
    return TrainingLog(run, ctx, setup.data.total_steps, setup.data.global_batch_tokens, setup.amp_dtype, wandb)


def run_argument(run):
    """RUN as a command line names this run: its name when it is under runs/, else its path."""
    return run.name if run.run_dir == RUNS_DIR / run.name else str(run.run_dir)


def summary(run, progress, session_seconds, session_tokens):
    """The end of a run: what it did, where its checkpoints and charts are, how to sample from it."""
    text = (f"Training complete in {session_seconds:,.1f} s; tokens seen this session {session_tokens:,} "
            f"(total {progress.tokens_seen:,}); throughput {session_tokens / session_seconds:,.0f} tokens/s")
    if progress.last_row is not None and progress.last_row["loss"] is not None:
        text += f"; final train loss {progress.last_row['loss']:.4f}"
    if progress.last_val_loss is not None:
        text += f"; final validation loss {progress.last_val_loss:.4f}"
    return (f"{text}\ncheckpoints: {run.checkpoints_dir} (newest: {progress.last_checkpoint})"
            f"\ncharts: {run.run_dir / charts.VIEWER_FILE}"
            f"\nsample from it: uv run test_smoke.py {run_argument(run)}")


@contextlib.contextmanager
def quiet_output(quiet):
    """--quiet: standard output goes nowhere (errors go to standard error). Yields the
    stream for the final summary."""
    summary_out = sys.stdout
    if not quiet:
        yield summary_out
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield summary_out


def train(run, ctx, datasets_dir, resume_dir, quiet=False, summary_out=None, draw_charts=True):
    """Train `run` from the start or from the checkpoint `resume_dir`. `quiet`: rank 0 prints
    only the final summary (or how the run stopped), to `summary_out` (default stdout).
    `draw_charts`: redraw the run's charts at each checkpoint (bench_recipe.py's many short
    runs leave them out: drawing takes longer than training such a run)."""
    train_cfg = run.train
    setup, progress = set_up_training(run, ctx, datasets_dir, resume_dir)
    session_start, tokens_at_start = time.time(), progress.tokens_seen
    # Every rank hears of a W&B run that rank 0 cannot start (no login, no network).
    log = run_and_share_errors(True, lambda: open_training_log(run, ctx, setup, progress))
    log_interval = train_cfg.log_interval_on(ctx.device)
    console = Console(ctx.is_main, setup.data.total_steps, progress.start_step, log_interval, quiet)
    interval = IntervalStats()  # for the next checkpoint's meta.json
    if ctx.is_main:
        print(f"{run.name}: {setup.state.model.num_parameters():,} parameters, world size {ctx.world_size}, "
              f"{setup.data.total_steps:,} optimizer steps of {setup.data.global_batch_tokens:,} tokens, "
              f"device {ctx.device}, autocast {setup.amp_dtype or 'off'}"
              + (", compiled" if train_cfg.compile else ""))
        print_batch_and_budget(run, ctx, setup.data)
    microbatches = prefetch_to_device(setup.data.train, rank_microbatch_indices(
        progress.start_step, setup.data.total_steps, setup.data.gradient_accumulation_steps, ctx.world_size,
        ctx.rank), ctx.device)
    stop_votes = training.STEP_STATISTICS.index("stop_votes")
    pending = []  # (global_step, lr, statistics on the device) not yet recorded
    with StopSignals() as stop_signals, log, contextlib.closing(console):
        try:
            for global_step in range(progress.start_step, setup.data.total_steps):
                lr = setup.state.scheduler.get_last_lr()[0]
                statistics = training.train_step(setup, run, ctx, microbatches, stop_signals.received is not None)
                setup.state.scheduler.step()
                # The previous step's all-reduced stop votes: reading them waits only for that
                # step, while this one is already queued, so the device never idles for it.
                stop_requested = bool(pending) and pending[-1][2][stop_votes].item() > 0
                pending.append((global_step, lr, statistics))

                # Every rank reaches the same decisions: they depend on step numbers and all-reduced values.
                work = training.work_after_step(global_step, setup.data.total_steps, train_cfg,
                                                validates=setup.data.validation is not None,
                                                scores_hellaswag=setup.hellaswag is not None)
                if not (work.save_checkpoint or work.validation or work.hellaswag or work.core or stop_requested
                        or (global_step + 1) % log_interval == 0):
                    continue
                evaluations = {}
                if work.validation:
                    evaluations |= training.validation_losses(setup.state.model, setup.data.validation, ctx,
                                                              setup.parallel.autocast_dtype)
                if work.hellaswag:
                    evaluations |= hellaswag_scoring.distributed_scores(setup.state.model, setup.hellaswag,
                                                                        setup.parallel.autocast_dtype)
                if work.core:
                    evaluations |= core_scoring.distributed_core(setup.state.model, setup.core,
                                                                 setup.parallel.autocast_dtype)
                window = read_window(pending, setup.statistic_names)
                pending = []
                rows = log.record(window, evaluations, progress.tokens_seen, progress.elapsed_s)
                progress.advance(rows)
                console.rows(rows)
                if work.validation:
                    console.validation(global_step, progress.last_val_loss, progress.best_val_loss)
                if work.hellaswag:
                    console.hellaswag(global_step, evaluations)
                if work.core:
                    console.core(global_step, evaluations)
                for row in rows:
                    interval.add(row)
                count_skipped_steps(rows, run, progress, console)
                stop_requested = any(statistics["stop_votes"] > 0 for _, _, statistics in window)
                if work.save_checkpoint or stop_requested:
                    save_training_checkpoint(run, ctx, setup, interval, progress, console, draw_charts)
                    interval = IntervalStats()
                if stop_requested:
                    if ctx.is_main:
                        print(f"\nStopped by {stop_signals.received or 'a signal to another rank'} after global step "
                              f"{global_step}, checkpoint {progress.last_checkpoint} saved. Resume with the same "
                              "command plus `latest` (or `auto`).", file=summary_out or sys.stdout)
                    return
        except RuntimeError as e:
            # A peer that died fails the next collective: NCCL raises a DistError, gloo a plain
            # RuntimeError from its transport (often before torchrun's SIGTERM arrives).
            if not (isinstance(e, dist.DistError) or GLOO_TRANSPORT_ERROR in str(e) or stop_signals.received):
                raise
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RankLost(f"rank {ctx.rank}: another rank was lost ({reason}); no checkpoint can be written now. "
                           f"A restart with `auto` resumes from "
                           f"{progress.last_checkpoint or 'the start (this run has no checkpoint yet)'}") from e
    if ctx.is_main:
        print(summary(run, progress, time.time() - session_start, progress.tokens_seen - tokens_at_start),
              file=summary_out or sys.stdout)


def choose_checkpoint(run, ctx, name, force):
    """The checkpoint directory to resume from (`name`: CHECKPOINT), or None for a fresh start."""
    if name == "auto":
        return auto_checkpoint(run.checkpoints_dir, ctx)
    if name:
        return checkpointing.resolve_checkpoint(run.checkpoints_dir, name)
    existing = checkpointing.list_checkpoints(run.checkpoints_dir)
    if existing and not force:
        raise UserError(f"{run.checkpoints_dir} already holds {len(existing)} checkpoint(s) (newest: "
                        f"{existing[-1].name}); name one, or `latest` or `auto`, to resume, or pass --force "
                        "to start a fresh run beside them")
    return None


def auto_checkpoint(checkpoints_dir, ctx):
    """For schedulers and `torchrun --max-restarts`: `latest`, or when that link is broken or
    its checkpoint damaged, the newest complete checkpoint (saying so). A fresh start only
    when the run has no checkpoints at all: a requeued job must never restart from step 0
    over a run's work."""
    if not checkpointing.has_checkpoint_entries(checkpoints_dir):
        return None
    try:
        latest = checkpointing.resolve_checkpoint(checkpoints_dir, "latest")
        checkpointing.verify_checkpoint(latest)
        return latest
    except UserError as problem:
        fallback = checkpointing.newest_complete_checkpoint(checkpoints_dir)
        if fallback is None:
            raise UserError(f"{problem}; {checkpoints_dir} holds no complete checkpoint to resume instead. "
                            "Start over with --force (without `auto`), or restore a checkpoint")
        if ctx.is_main:
            print(f"note: {problem}; resuming from the newest complete checkpoint, {fallback.name}")
        return fallback


def warn_of_unused_gpus(ctx):
    visible = torch.cuda.device_count() if ctx.device.type == "cuda" else 0
    warning = unused_gpus_warning(ctx.device.type, visible, ctx.local_world_size)
    if warning and ctx.is_main:
        print(warning)


def check_same_checkpoint(ctx, resume_dir):
    """Each node resolves CHECKPOINT (`latest`, `auto`) in its own view of the run directory.
    Nodes starting from different steps would run different numbers of steps and hang
    at the end, so a disagreement (a stale view, or run directories that are not one
    shared directory) stops every rank now."""
    names = [None] * ctx.world_size
    dist.all_gather_object(names, resume_dir.name if resume_dir else "a fresh start")
    if len(set(names)) > 1:
        per_rank = ", ".join(f"rank {rank}: {name}" for rank, name in enumerate(names))
        raise UserError(f"the ranks resolved the checkpoint to resume differently ({per_rank}); every node "
                        "must see the same run directory (a shared filesystem)")


@click.command(epilog="""\b
Launch under torchrun, one process per GPU (without torchrun: a single process):
  uv run torchrun --nproc_per_node=8 ddp_train.py 8xh100m80 datasets
  uv run torchrun --nproc_per_node=8 ddp_train.py 8xh100m80 datasets latest   # resume
  uv run torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
      ddp_train.py 8xh100m80 datasets   # on each of two machines
\b
Example (the demo, two CPU processes):
  uv run torchrun --nproc_per_node=2 ddp_train.py demo datasets""")
@click.argument("run")
@click.argument("datasets_dir", type=click.Path(file_okay=False))
@click.argument("resume_from", metavar="[CHECKPOINT]", required=False)
@click.option("--force", is_flag=True, help="Start a fresh run even though the run directory has checkpoints.")
@click.option("-f", "--find-max-microbatch-size", "find_max", is_flag=True,
              help="Instead of training, find the largest microbatch that fits in GPU memory.")
@click.option("--target-global-batch", default=96, show_default=True, type=click.IntRange(min=1),
              help="With -f: the global batch (sequences) to suggest an accumulation for.")
@click.option("--write", is_flag=True, help="With -f: write the suggested sizes into train.json.")
@override_option
@click.option("--quiet", is_flag=True, help="Print only errors and the final summary.")
@report_user_errors
def main(run, datasets_dir, resume_from, force, find_max, target_global_batch, write, overrides, quiet):
    """Train RUN (a name under runs/ or a run directory) on datasets under DATASETS_DIR,
    resuming from CHECKPOINT (a checkpoint name, `latest`, `best`, or `auto`) if given."""
    run = load_run(run, parse_overrides(overrides))
    # Optional packages: fail before any rank starts, not on rank 0 alone.
    if run.train.tensorboard:
        require_tensorboard()
    if run.train.wandb_project:
        require_wandb()
    ctx = init_distributed(run.train.dist_timeout_minutes)
    run_lock = None  # rank 0's lock on the run directory
    try:
        with quiet_output(quiet) as summary_out:
            warn_of_unused_gpus(ctx)
            check_connectivity(ctx)
            run_lock = run_and_share_errors(ctx.is_main, lambda: lock_run_dir(run.run_dir))
            resume_dir = None if find_max else choose_checkpoint(run, ctx, resume_from, force)
            check_same_checkpoint(ctx, resume_dir)
            if find_max:
                find_max_microbatch(run, ctx, target_global_batch, write)
            else:
                train(run, ctx, datasets_dir, resume_dir, quiet, summary_out)
    finally:
        if run_lock is not None:
            run_lock.close()  # the kernel would release it when the process ends, however it ends
        # DDP's hooks form reference cycles that keep the process group alive; left to the
        # interpreter's teardown, gloo's threads are then destroyed too late and abort the process.
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
