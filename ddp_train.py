"""Train a GPT-2-class base model with DistributedDataParallel.

    uv run torchrun --nproc_per_node=8 ddp_train.py RUN DATASETS_DIR [CHECKPOINT] [--force]
    uv run torchrun --nproc_per_node=8 ddp_train.py RUN DATASETS_DIR -f [--target-global-batch 96] [--write]

RUN is a name under runs/ or a path to a run directory holding model.json and
train.json (config.py lists every key). CHECKPOINT resumes a run: a checkpoint
directory name, `latest`, `best`, or `auto` (`latest`, or the newest complete
checkpoint when `latest` is broken; a fresh start only when there are no
checkpoints). Without torchrun it runs as a single process. Rank 0 holds the run
directory's lock and writes checkpoints, metrics.jsonl and charts into it. SIGTERM
or SIGINT stops every rank after the step under way and at most two more, with a
checkpoint.

Where things are decided: `train` is the loop (when to stop), `work_after_step` its
schedule (when to checkpoint, validate, score HellaSwag); `checkpoint` decides whether
the weights may be saved and what is `best`; `count_skipped_steps` stops a streak of
non-finite steps; `train_step` is one optimizer step.
"""

import gc
import math
import random
from dataclasses import dataclass

import click
import numpy as np
import torch
import torch.distributed as dist

import charts
import checkpointing
import eval_hellaswag
import token_data
from batching import (Microbatches, check_validation_length, count_optimizer_steps, gradient_accumulation_for,
                      prefetch_to_device, rank_microbatch_indices, sequences_per_rank, token_budget)
from config import ModelConfig, load_run
from distributed import StopSignals, check_connectivity, init_distributed, run_and_share_errors, share_from_main
from errors import RankLost, UserError, report_user_errors
from gpt import GPTModel
from initial_weights import apply_initial_weights, load_initial_weights
from parallelism import (ParallelModel, autocast_dtype_for, check_supported, clip_gradients, local_tensor,
                         shard, shard_count, wrap_for_training)
from metrics import IntervalStats, TrainingLog, read_metrics, require_tensorboard, require_wandb
from run_lock import lock_run_dir
from training import (amp_dtype_for, check_model_fits, compute_loss, make_lr_scheduler, make_optimizer,
                      move_lr_scheduler_to)
from microbatch_search import (largest_passing, make_trial, require_gpu, suggest_batch_split,
                               suggest_dividing_microbatch, write_batch_split)


# ---------------------------------------------------------------- set-up

@dataclass
class Data:
    train: Microbatches
    validation: Microbatches | None
    total_steps: int
    global_batch_tokens: int
    gradient_accumulation_steps: int  # train.json's, or derived from its global_batch_tokens for this world size
    tokenizer: str  # the dataset's (its meta.json), for evaluations that tokenize text


def load_data(run, ctx, datasets_dir):
    train_cfg, context_length = run.train, run.model.context_length
    train_json = run.run_dir / "train.json"
    # Before any download: a global batch that this world size cannot split is a mistake in train.json.
    accumulation = gradient_accumulation_for(train_cfg, ctx.world_size, context_length, train_json)
    # Once per node, or once in all when every node sees the same DATASETS_DIR.
    fetches = ctx.is_main if train_cfg.shared_filesystem else ctx.is_local_main
    dataset_dir = run_and_share_errors(
        fetches, lambda: token_data.fetch_dataset(train_cfg.dataset, datasets_dir, run.run_dir))
    dataset_dir = dataset_dir or token_data.dataset_location(train_cfg.dataset, datasets_dir, run.run_dir)[1]
    meta = token_data.read_meta(dataset_dir)
    if run.model.vocab_size < meta.vocab_size:
        raise UserError(f"{run.run_dir / 'model.json'}: key 'vocab_size' ({run.model.vocab_size}) is smaller "
                        f"than the dataset's tokenizer vocabulary ({meta.tokenizer}: {meta.vocab_size}); "
                        f"it must be at least {meta.vocab_size}")

    microbatch_tokens = train_cfg.microbatch_size * context_length
    global_batch_tokens = ctx.world_size * accumulation * microbatch_tokens
    train_tokens = token_data.open_split(dataset_dir, "train")
    total_steps = count_optimizer_steps(len(train_tokens), global_batch_tokens, train_cfg,
                                        dataset_dir / "train.safetensors", train_json, run.model)
    train = Microbatches(train_tokens, train_cfg.start_train_token,
                         total_steps * global_batch_tokens // microbatch_tokens,
                         train_cfg.microbatch_size, context_length, vocab_size=run.model.vocab_size,
                         path=dataset_dir / "train.safetensors")

    validation = None
    if train_cfg.validation_interval:
        val_tokens = token_data.open_split(dataset_dir, "validation")
        check_validation_length(len(val_tokens), context_length, train_cfg, dataset_dir / "validation.safetensors",
                                train_json)
        validation = Microbatches(val_tokens, train_cfg.start_val_token, train_cfg.validation_batches,
                                  train_cfg.microbatch_size, context_length, vocab_size=run.model.vocab_size,
                                  path=dataset_dir / "validation.safetensors")
    return Data(train, validation, total_steps, global_batch_tokens, accumulation, meta.tokenizer)


# ---------------------------------------------------------------- RNG state

def capture_rng_state(device):
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
        "torch": torch.get_rng_state(),
        # This rank's GPU only: touching the others would open a CUDA context on each.
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore_rng_state(state, device):
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def set_rank_rng(ctx, random_seed, saved_states=None):
    """Give each rank its own dropout masks: its saved RNG state if `saved_states` has one
    per rank of this world size, otherwise the seed random_seed + rank. Returns whether
    the saved state was restored."""
    if saved_states is not None and len(saved_states) == ctx.world_size:
        restore_rng_state(saved_states[ctx.rank], ctx.device)
        return True
    torch.manual_seed(random_seed + ctx.rank)
    return False


# ---------------------------------------------------------------- steps

# Where gloo's RuntimeErrors about a connection that broke (a peer closed or reset it) come from.
GLOO_TRANSPORT_ERROR = "gloo/transport/"
# What train_step returns: one device tensor per step holding these, in this order,
# read from the device once per log window.
STEP_STATISTICS = ("loss", "grad_norm", "nonfinite_ranks", "stop_votes")


def train_step(trainer, run, ctx, microbatches, stop_requested):
    """One optimizer step over `gradient_accumulation_steps` microbatches on every rank.

    Returns, without waiting for the device, a tensor of STEP_STATISTICS: the loss
    (mean over ranks and microsteps), the gradient norm before clipping, the number of
    ranks with a non-finite loss and of ranks asking to stop. A step with a non-finite
    loss or gradient on any rank is skipped on every rank alike, inside the fused
    optimizer (its `found_inf`), with no sync.
    """
    accumulation_steps = trainer.data.gradient_accumulation_steps
    loss_sum = torch.zeros((), device=ctx.device)
    for accumulation_step in range(accumulation_steps):
        inputs, targets = next(microbatches)
        # Gradients are all-reduced only on the last microstep.
        is_last_microstep = accumulation_step == accumulation_steps - 1
        with trainer.parallel.gradient_sync(is_last_microstep):
            loss = compute_loss(trainer.parallel.forward_model, inputs, targets, trainer.parallel.autocast_dtype,
                                ctx.device)
            trainer.state.scaler.scale(loss / accumulation_steps).backward()
        loss_sum += loss.detach()

    trainer.state.scaler.unscale_(trainer.state.optimizer)
    max_norm = run.train.clipping_max_norm or float("inf")
    grad_norm = clip_gradients(trainer.state.model.parameters(), max_norm)
    # One all-reduce carries the loss, the non-finite flag and the stop flag. The stop flag is
    # picked from constants already on the device: making a tensor from a Python value would
    # be a copy that waits for the device.
    stop_flag = trainer.stop_flags[1 if stop_requested else 0]
    reduced = torch.stack([loss_sum / accumulation_steps, (~torch.isfinite(loss_sum)).float(), stop_flag])
    dist.all_reduce(reduced)
    mean_loss, nonfinite_ranks, stop_votes = reduced
    if trainer.state.scaler.is_enabled():
        # float16: the scaler found any inf/NaN in the (all-reduced) gradients and skips for us.
        trainer.state.scaler.step(trainer.state.optimizer)
        trainer.state.scaler.update()
    else:
        trainer.state.optimizer.found_inf = ((nonfinite_ranks > 0) | ~torch.isfinite(grad_norm)).float()
        trainer.state.optimizer.step()
        del trainer.state.optimizer.found_inf
    trainer.state.optimizer.zero_grad(set_to_none=True)
    return torch.stack([mean_loss / ctx.world_size, grad_norm.float(), nonfinite_ranks, stop_votes])


@torch.no_grad()
def evaluate(model, validation, ctx, amp_dtype):
    """Mean validation loss; each rank takes every world_size-th batch, then all-reduce.

    Every rank runs the same number of forward passes, because a sharded model's
    all-gathers are collective: a rank past the last batch scores the last one again
    and does not count it."""
    model.eval()
    totals = torch.zeros(2, device=ctx.device)
    passes = math.ceil(len(validation) / ctx.world_size) * ctx.world_size
    for index in range(ctx.rank, passes, ctx.world_size):
        inputs, targets = (tensor.to(ctx.device) for tensor in validation[min(index, len(validation) - 1)])
        loss = compute_loss(model, inputs, targets, amp_dtype, ctx.device)
        if index < len(validation):
            totals[0] += loss
            totals[1] += 1
    dist.all_reduce(totals)
    model.train()
    return (totals[0] / totals[1]).item()


@torch.no_grad()
def weights_are_finite(model):
    """Whether every rank's weights are finite (one all-reduce; a sync, so only before saving)."""
    finite = torch.stack([torch.isfinite(local_tensor(p)).all() for p in model.parameters()]).all().float()
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


# ---------------------------------------------------------------- resuming

@dataclass
class Progress:
    """What the loop decides with across steps and restarts."""
    start_step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0
    best_loss: float | None = None  # the score of the `best` checkpoint
    last_checkpoint: str | None = None  # the newest checkpoint of this run, for messages
    skipped_in_a_row: int = 0
    init_from: dict | None = None  # where a run that started from existing weights started
    wandb_run_id: str | None = None  # the W&B run a resumed run continues


def check_resumable(run, ctx, checkpoint_dir, meta, accumulation):
    """Refuse a different model; allow a different split of the same global batch, and say so.
    `accumulation`: this run's gradient accumulation steps (train.json's, or derived)."""
    saved_model = meta.get("model_config")
    if saved_model is not None:
        # Through ModelConfig, so keys written at their defaults (or not at all) compare equal.
        saved_model = ModelConfig.from_dict(saved_model, source=f"{checkpoint_dir / 'meta.json'} model_config")
    if saved_model is not None and saved_model != run.model:
        saved_model, now = saved_model.to_dict(), run.model.to_dict()
        changed = sorted(k for k in saved_model.keys() | now.keys() if saved_model.get(k) != now.get(k))
        raise UserError(f"checkpoint {checkpoint_dir.name} was trained with a different model.json "
                        f"(differs in: {', '.join(changed)}); resume it with the model.json it was trained with")
    saved_optimizer = meta.get("optimizer", "adamw")  # the reference harness's checkpoints: AdamW
    if saved_optimizer != run.train.optimizer:
        raise UserError(f"checkpoint {checkpoint_dir.name} was trained with optimizer \"{saved_optimizer}\"; resume "
                        f"it with the same optimizer in train.json (its optimizer state fits no other)")
    # The optimizer state holds the padded output layer: it only fits the same padding.
    saved_padding = meta.get("pad_vocab_to_multiple_of", 1)
    if saved_padding != run.train.pad_vocab_to_multiple_of:
        raise UserError(f"checkpoint {checkpoint_dir.name} was trained with pad_vocab_to_multiple_of "
                        f"{saved_padding}; resume it with the same value in train.json")
    now = {"world_size": ctx.world_size, "microbatch_size": run.train.microbatch_size,
           "gradient_accumulation_steps": accumulation}
    saved = {key: meta.get(key) for key in now}
    if None in saved.values() or saved == now:
        return
    if math.prod(saved.values()) != math.prod(now.values()):
        raise UserError(
            f"checkpoint {checkpoint_dir.name} was trained with a global batch of {math.prod(saved.values())} "
            f"sequences ({saved}) but this run has {math.prod(now.values())} ({now}); keep world_size x "
            "microbatch_size x gradient_accumulation_steps the same to resume (or global_batch_tokens "
            f"{math.prod(saved.values()) * run.model.context_length})")
    if ctx.is_main:
        changes = ", ".join(f"{key} {saved[key]} -> {now[key]}" for key in now if saved[key] != now[key])
        print(f"note: resuming with {changes} (same global batch, same data order)")


def restore(run, ctx, checkpoint_dir, state, data):
    meta = checkpointing.read_checkpoint_meta(checkpoint_dir)
    check_resumable(run, ctx, checkpoint_dir, meta, data.gradient_accumulation_steps)
    meta, rng_states = checkpointing.load_training_state(checkpoint_dir, state, ctx.device)
    start_step = meta["global_step"] + 1
    # The schedule is a function of the step: this also continues a reference-harness run,
    # whose scheduler.pt holds another kind of scheduler, or none.
    move_lr_scheduler_to(state.scheduler, start_step)
    if not set_rank_rng(ctx, run.train.random_seed, rng_states) and ctx.is_main:
        print("note: checkpoint has no RNG state for this world size; dropout masks will differ "
              "from an uninterrupted run")
    best_dir = run.checkpoints_dir / "best"
    best_meta = checkpointing.read_checkpoint_meta(best_dir) if best_dir.exists() else meta
    best_loss = best_meta.get("best_loss", best_meta.get("val_loss") or best_meta.get("avg_train_loss"))
    if ctx.is_main:
        print(f"Resuming from {checkpoint_dir.name} at global step {start_step}")
    return Progress(start_step=start_step,
                    tokens_seen=meta.get("tokens_seen", start_step * data.global_batch_tokens),
                    elapsed_before=meta.get("elapsed_s", 0.0), best_loss=best_loss,
                    last_checkpoint=checkpoint_dir.name, init_from=meta.get("init_from"),
                    wandb_run_id=meta.get("wandb_run_id"))


# ---------------------------------------------------------------- checkpoints

def last_good_checkpoint_text(progress):
    if progress.last_checkpoint is None:
        return "this run has no checkpoint yet"
    return f"the last good checkpoint is {progress.last_checkpoint} (resume with `latest` or `auto`)"


def checkpoint_meta(run, ctx, data, log, interval, progress):
    """meta.json for a checkpoint at the last recorded step (the reference harness's keys, and ours)."""
    train_cfg = run.train
    return {"global_step": log.last_row["step"], **interval.summary(), "learning_rate": log.last_row["lr"],
            "val_loss": log.last_val_loss, "best_loss": progress.best_loss, "tokens_seen": log.tokens_seen,
            "elapsed_s": log.last_row["elapsed_s"], "world_size": ctx.world_size,
            "microbatch_size": train_cfg.microbatch_size,
            "gradient_accumulation_steps": data.gradient_accumulation_steps,
            "pad_vocab_to_multiple_of": train_cfg.pad_vocab_to_multiple_of,
            "parallelism": train_cfg.parallelism, "optimizer": train_cfg.optimizer,
            "model_config": run.model.to_dict(),
            **({"init_from": progress.init_from} if progress.init_from else {}),
            **({"wandb_run_id": log.wandb_run_id} if log.wandb_run_id else {})}


def save(run, ctx, state, meta, is_best):
    """Save a checkpoint into the run's checkpoints directory, prune old ones and redraw the
    charts; rank 0 gets the checkpoint directory back (the others get None). A failure on
    any rank reaches every rank (no one waits forever)."""
    write = write_checkpoint(run.checkpoints_dir, run.train, ctx, state, meta, is_best)

    def write_and_tidy():
        saved = write()
        if run.train.keep_last_checkpoints:
            checkpointing.prune_checkpoints(run.checkpoints_dir, run.train.keep_last_checkpoints)
        draw_charts(run)
        return saved

    return run_and_share_errors(ctx.is_main, write_and_tidy)


def write_checkpoint(checkpoints_dir, train_cfg, ctx, state, meta, is_best):
    """The collective part of a save, on every rank: every rank sends its RNG state to rank
    0, and under fsdp/hsdp writes its shards (the full weights gathered on rank 0). Returns
    rank 0's remaining work, which writes the rest and returns the checkpoint directory."""
    rng_states = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(capture_rng_state(ctx.device), rng_states, dst=0)
    if not state.sharded:
        return lambda: checkpointing.save_checkpoint(checkpoints_dir, state, rng_states, meta, is_best)
    consolidated = train_cfg.consolidated_weights
    partial = share_from_main(run_and_share_errors(ctx.is_main, lambda: checkpointing.begin_checkpoint(
        checkpoints_dir, meta["global_step"], state.size_estimate(full_weights_too=consolidated))))
    checkpointing.write_sharded_state(partial, state)
    weights = checkpointing.gather_full_weights(state.model) if consolidated else None
    return lambda: checkpointing.finish_checkpoint(partial, state, rng_states, meta, is_best, weights)


def draw_charts(run):
    """Rank 0, after a save: the charts from metrics.jsonl."""
    try:
        best_dir = run.checkpoints_dir / "best"
        best_step = checkpointing.read_checkpoint_meta(best_dir)["global_step"] if best_dir.exists() else None
        charts.write_charts(run.run_dir, read_metrics(run.run_dir / "metrics.jsonl"),
                            best_step=best_step, clip_norm=run.train.clipping_max_norm)
    except Exception as e:  # noqa: BLE001 - a chart is never worth a training run
        print(f"warning: could not draw charts: {type(e).__name__}: {e}")


def checkpoint(run, ctx, trainer, log, interval, progress):
    """Save a checkpoint at the last recorded step, unless the weights have diverged;
    it is `best` when its score (validation loss when the run validates, else the
    average train loss since the last checkpoint) is finite and the lowest so far."""
    step = log.last_row["step"]
    if not weights_are_finite(trainer.state.model):
        raise UserError(f"the weights are not finite after global step {step} (the run diverged); no "
                        f"checkpoint written: {last_good_checkpoint_text(progress)}. Try a lower learning_rate "
                        "or weight_decay, or clipping_max_norm")
    score = log.last_val_loss if trainer.data.validation is not None else interval.summary()["avg_train_loss"]
    is_best = score is not None and math.isfinite(score) and (progress.best_loss is None
                                                              or score < progress.best_loss)
    if is_best:
        progress.best_loss = score
    meta = checkpoint_meta(run, ctx, trainer.data, log, interval, progress)
    saved = save(run, ctx, trainer.state, meta, is_best)
    # Only rank 0 knows the directory's name (it holds the time of the save).
    progress.last_checkpoint = saved.name if saved else f"the checkpoint of global step {step}"


# ---------------------------------------------------------------- the loop

@dataclass
class Trainer:
    """Everything one rank trains with."""
    state: checkpointing.TrainingState  # the bare or sharded model, optimizer, scaler, schedule: what checkpoints hold
    parallel: ParallelModel  # the forward model (DDP-wrapped, compiled or not) and the gradient-sync switch
    data: Data
    amp_dtype: torch.dtype | None  # the precision the model computes in
    stop_flags: torch.Tensor  # [0., 1.] on the device
    hellaswag: eval_hellaswag.RankShare | None  # this rank's HellaSwag items, with hellaswag_interval


def build_model(run, ctx, initial=None):
    """The model on this rank's device (sharded under fsdp/hsdp), from `initial` weights
    if given, its compute dtype, optimizer and gradient scaler, as training and the -f
    search use them."""
    model_json, train_json = run.run_dir / "model.json", run.run_dir / "train.json"
    check_model_fits(run.model, ctx.device, model_json, shard_count(run.train, ctx))
    amp_dtype = amp_dtype_for(run.train, ctx.device)
    check_supported(run.train, amp_dtype, train_json)
    torch.manual_seed(run.train.random_seed)  # identical initial weights on every rank
    model = GPTModel(run.model, pad_vocab_to_multiple_of=run.train.pad_vocab_to_multiple_of,
                     activation_checkpointing=run.train.activation_checkpointing,
                     loss_chunk_tokens=run.train.loss_chunk_tokens)
    if initial is not None:
        note = apply_initial_weights(model, initial)
        if ctx.is_main:
            print(f"init_from: weights of {initial.origin['source']}" + (f" ({note})" if note else ""))
    model.to(ctx.device)
    if run.train.parallelism != "ddp":
        shard(model, run.train, ctx, amp_dtype)
    if amp_dtype is not None:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and later
    optimizer = make_optimizer(model, run.train)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16)
    return model, amp_dtype, optimizer, scaler


def build_trainer(run, ctx, datasets_dir, checkpoint_dir):
    # A resumed run's weights come from its checkpoint, whatever init_from says.
    initial = (load_initial_weights(run.train, run.model, run.run_dir / "train.json")
               if run.train.init_from and not checkpoint_dir else None)
    model, amp_dtype, optimizer, scaler = build_model(run, ctx, initial)
    data = load_data(run, ctx, datasets_dir)
    state = checkpointing.TrainingState(model, optimizer, scaler,
                                        make_lr_scheduler(optimizer, run.train, data.total_steps))
    if checkpoint_dir:
        progress = restore(run, ctx, checkpoint_dir, state, data)
    else:
        progress = Progress(init_from=initial.origin if initial else None)
        set_rank_rng(ctx, run.train.random_seed)
    parallel = wrap_for_training(model, run.train, ctx, amp_dtype)
    stop_flags = torch.tensor([0.0, 1.0], device=ctx.device)
    hellaswag = (eval_hellaswag.training_share(run, ctx, datasets_dir, data.tokenizer)
                 if run.train.hellaswag_interval else None)
    return Trainer(state, parallel, data, amp_dtype, stop_flags, hellaswag), progress


def read_window(pending):
    """(step, lr, {statistic: value}) for each pending step: one device-to-host copy."""
    values = torch.stack([statistics for _, _, statistics in pending]).tolist()
    return [(step, lr, dict(zip(STEP_STATISTICS, step_values)))
            for (step, lr, _), step_values in zip(pending, values)]


def count_skipped_steps(rows, run, progress):
    """Stop after max_skipped_steps non-finite steps in a row, counted step by step.
    Every rank reaches the same verdict at the same step: the flags were all-reduced."""
    for row in rows:
        progress.skipped_in_a_row = progress.skipped_in_a_row + 1 if row["skipped"] else 0
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


@dataclass(frozen=True)
class StepWork:
    """What the loop does after an optimizer step, besides logging."""
    checkpoint: bool
    validation: bool
    hellaswag: bool


def work_after_step(global_step, total_steps, train_cfg, validates, scores_hellaswag):
    """The loop's schedule (preflight.py counts it for its projection)."""
    is_last = global_step == total_steps - 1
    # The reference harness's rule: after step 0, every checkpoint_interval steps, and the last.
    checkpoint = global_step % train_cfg.effective_checkpoint_interval == 0 or is_last
    # Checkpoint steps are validated too, so every checkpoint's "best" is judged on a fresh number.
    validation = validates and (global_step % train_cfg.validation_interval == 0 or checkpoint)
    # HellaSwag at the last step too, so the final weights always have a score.
    hellaswag = scores_hellaswag and (global_step % train_cfg.hellaswag_interval == 0 or is_last)
    return StepWork(checkpoint, validation, hellaswag)


def train(run, ctx, datasets_dir, checkpoint_dir):
    train_cfg = run.train
    trainer, progress = build_trainer(run, ctx, datasets_dir, checkpoint_dir)
    # Every rank hears of a W&B run that rank 0 cannot start (no login, no network).
    log = run_and_share_errors(True, lambda: TrainingLog(
        run, ctx, trainer.data.total_steps, trainer.data.global_batch_tokens, trainer.amp_dtype, progress.start_step,
        progress.tokens_seen, progress.elapsed_before, progress.wandb_run_id))
    interval = IntervalStats()  # for the next checkpoint's meta.json
    if ctx.is_main:
        print(f"{run.name}: {trainer.state.model.num_parameters():,} parameters, world size {ctx.world_size}, "
              f"{trainer.data.total_steps:,} optimizer steps of {trainer.data.global_batch_tokens:,} tokens, "
              f"device {ctx.device}, autocast {trainer.amp_dtype or 'off'}"
              + (", compiled" if train_cfg.compile else ""))
        print_batch_and_budget(run, ctx, trainer.data)
    microbatches = prefetch_to_device(trainer.data.train, rank_microbatch_indices(
        progress.start_step, trainer.data.total_steps, trainer.data.gradient_accumulation_steps, ctx.world_size,
        ctx.rank), ctx.device)
    log_interval = train_cfg.log_interval or (10 if ctx.device.type == "cuda" else 1)
    pending = []  # (global_step, lr, statistics on the device) not yet recorded
    with StopSignals() as stop_signals, log:
        try:
            for global_step in range(progress.start_step, trainer.data.total_steps):
                lr = trainer.state.scheduler.get_last_lr()[0]
                statistics = train_step(trainer, run, ctx, microbatches, stop_signals.received is not None)
                trainer.state.scheduler.step()
                # The previous step's all-reduced stop votes: reading them waits only for that
                # step, while this one is already queued, so the device never idles for it.
                stop_requested = bool(pending) and pending[-1][2][STEP_STATISTICS.index("stop_votes")].item() > 0
                pending.append((global_step, lr, statistics))

                # Every rank reaches the same decisions: they depend on step numbers and all-reduced values.
                work = work_after_step(global_step, trainer.data.total_steps, train_cfg,
                                       validates=trainer.data.validation is not None,
                                       scores_hellaswag=trainer.hellaswag is not None)
                if not (work.checkpoint or work.validation or work.hellaswag or stop_requested
                        or (global_step + 1) % log_interval == 0):
                    continue
                evaluations = {}
                if work.validation:
                    evaluations["val_loss"] = evaluate(trainer.state.model, trainer.data.validation, ctx,
                                                       trainer.parallel.autocast_dtype)
                if work.hellaswag:
                    evaluations |= eval_hellaswag.distributed_scores(trainer.state.model, trainer.hellaswag,
                                                                     trainer.parallel.autocast_dtype)
                window = read_window(pending)
                pending = []
                rows = log.record(window, evaluations)
                for row in rows:
                    interval.add(row)
                count_skipped_steps(rows, run, progress)
                stop_requested = any(statistics["stop_votes"] > 0 for _, _, statistics in window)
                if work.checkpoint or stop_requested:
                    checkpoint(run, ctx, trainer, log, interval, progress)
                    interval = IntervalStats()
                if stop_requested:
                    if ctx.is_main:
                        print(f"\nStopped by {stop_signals.received or 'a signal to another rank'} after global step "
                              f"{global_step}, checkpoint {progress.last_checkpoint} saved. Resume with the same "
                              "command plus `latest` (or `auto`).")
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
        print(log.summary())


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


def choose_checkpoint(run, ctx, checkpoint, force):
    """The checkpoint directory to resume from, or None for a fresh start."""
    if checkpoint == "auto":
        return auto_checkpoint(run.checkpoints_dir, ctx)
    if checkpoint:
        return checkpointing.resolve_checkpoint(run.checkpoints_dir, checkpoint)
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


def check_same_checkpoint(ctx, checkpoint_dir):
    """Each node resolves CHECKPOINT (`latest`, `auto`) in its own view of the run directory.
    Nodes starting from different steps would run different numbers of steps and hang
    at the end, so a disagreement (a stale view, or run directories that are not one
    shared directory) stops every rank now."""
    names = [None] * ctx.world_size
    dist.all_gather_object(names, checkpoint_dir.name if checkpoint_dir else "a fresh start")
    if len(set(names)) > 1:
        per_rank = ", ".join(f"rank {rank}: {name}" for rank, name in enumerate(names))
        raise UserError(f"the ranks resolved the checkpoint to resume differently ({per_rank}); every node "
                        "must see the same run directory (a shared filesystem)")


@click.command()
@click.argument("run")
@click.argument("datasets_dir", type=click.Path(file_okay=False))
@click.argument("checkpoint", required=False)
@click.option("--force", is_flag=True, help="Start a fresh run even though the run directory has checkpoints.")
@click.option("-f", "--find-max-microbatch-size", "find_max", is_flag=True,
              help="Instead of training, find the largest microbatch that fits in GPU memory.")
@click.option("--target-global-batch", default=96, show_default=True, type=click.IntRange(min=1),
              help="With -f: the global batch (sequences) to suggest an accumulation for.")
@click.option("--write", is_flag=True, help="With -f: write the suggested sizes into train.json.")
@report_user_errors
def main(run, datasets_dir, checkpoint, force, find_max, target_global_batch, write):
    """Train RUN (a name under runs/ or a run directory) on datasets under DATASETS_DIR,
    resuming from CHECKPOINT (a checkpoint name, `latest`, `best`, or `auto`) if given."""
    run = load_run(run)
    # Optional packages: fail before any rank starts, not on rank 0 alone.
    if run.train.tensorboard:
        require_tensorboard()
    if run.train.wandb_project:
        require_wandb()
    ctx = init_distributed(run.train.dist_timeout_minutes)
    run_lock = None  # rank 0's lock on the run directory
    try:
        check_connectivity(ctx)
        run_lock = run_and_share_errors(ctx.is_main, lambda: lock_run_dir(run.run_dir))
        checkpoint_dir = None if find_max else choose_checkpoint(run, ctx, checkpoint, force)
        check_same_checkpoint(ctx, checkpoint_dir)
        if find_max:
            find_max_microbatch(run, ctx, target_global_batch, write)
        else:
            train(run, ctx, datasets_dir, checkpoint_dir)
    finally:
        if run_lock is not None:
            run_lock.close()  # the kernel would release it when the process ends, however it ends
        # DDP's hooks form reference cycles that keep the process group alive; left to the
        # interpreter's teardown, gloo's threads are then destroyed too late and abort the process.
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
