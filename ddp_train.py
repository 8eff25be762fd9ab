"""Train a GPT-2-class base model with DistributedDataParallel.

    uv run torchrun --nproc_per_node=8 ddp_train.py RUN DATASETS_DIR [CHECKPOINT] [--force]
    uv run torchrun --nproc_per_node=8 ddp_train.py RUN DATASETS_DIR -f [--target-global-batch 96] [--write]

RUN is a name under runs/ or a path to a run directory holding model.json and
train.json (config.py lists every key). CHECKPOINT resumes a run: a checkpoint
directory name, `latest`, `best`, or `auto` (`latest` if there is one, else a
fresh start). Without torchrun it runs as a single process. Rank 0 writes
checkpoints, metrics.jsonl and charts into the run directory. SIGTERM or SIGINT
stops every rank after the current optimizer step, with a checkpoint.
"""

import gc
import math
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass

import click
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import charts
import checkpointing
import token_data
from batching import (Microbatches, check_validation_length, count_optimizer_steps, prefetch_to_device,
                      rank_microbatch_indices)
from config import load_run
from distributed import StopSignals, check_connectivity, init_distributed, run_and_share_errors
from errors import UserError, report_user_errors
from gpt import GPTModel
from metrics import TrainingLog, read_metrics, require_tensorboard
from microbatch_search import (TEST_LIMIT_VARIABLE, largest_passing, make_trial, suggest_batch_split,
                               write_batch_split)


# ---------------------------------------------------------------- set-up

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


def lr_multiplier(step, total_steps, warmup_steps, min_ratio):
    """Linear warmup from ~0 to 1, then cosine decay to `min_ratio` at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Data:
    train: Microbatches
    validation: Microbatches | None
    total_steps: int
    global_batch_tokens: int


def load_data(run, ctx, datasets_dir):
    train_cfg, context_length = run.train, run.model.context_length
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
    global_batch_tokens = ctx.world_size * train_cfg.gradient_accumulation_steps * microbatch_tokens
    train_json = run.run_dir / "train.json"
    train_tokens = token_data.open_split(dataset_dir, "train")
    total_steps = count_optimizer_steps(len(train_tokens), global_batch_tokens, train_cfg,
                                        dataset_dir / "train.safetensors", train_json)
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
    return Data(train, validation, total_steps, global_batch_tokens)


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

def nan_injection_for_tests():
    """Test hook: DDP_TRAIN_TEST_NAN_AT="RANK:STEP,STEP" makes that rank's loss NaN at those steps."""
    spec = os.environ.get("DDP_TRAIN_TEST_NAN_AT")
    if not spec:
        return set()
    rank, steps = spec.split(":")
    return {(int(rank), int(step)) for step in steps.split(",")}


NAN_INJECTION = nan_injection_for_tests()


def compute_loss(model, inputs, targets, amp_dtype, device):
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def train_step(global_step, t, run, ctx, microbatches, stop_requested):
    """One optimizer step over `gradient_accumulation_steps` microbatches on every rank.

    Returns, without waiting for the device, a tensor [loss (mean over ranks and
    microsteps), gradient norm before clipping, ranks with a non-finite loss, ranks
    asking to stop]. A step with a non-finite loss or gradient on any rank is skipped
    on every rank alike, inside the fused optimizer (its `found_inf`), with no sync.
    """
    accumulation_steps = run.train.gradient_accumulation_steps
    loss_sum = torch.zeros((), device=ctx.device)
    for accumulation_step in range(accumulation_steps):
        inputs, targets = next(microbatches)
        # Gradients are all-reduced only on the last microstep.
        is_last_microstep = accumulation_step == accumulation_steps - 1
        with nullcontext() if is_last_microstep else t.ddp_model.no_sync():
            loss = compute_loss(t.forward_model, inputs, targets, t.amp_dtype, ctx.device)
            if (ctx.rank, global_step) in NAN_INJECTION:
                loss = loss * float("nan")
            t.scaler.scale(loss / accumulation_steps).backward()
        loss_sum += loss.detach()

    t.scaler.unscale_(t.optimizer)
    max_norm = run.train.clipping_max_norm or float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(t.model.parameters(), max_norm)
    # One all-reduce carries the loss, the non-finite flag and the stop flag. The stop flag is
    # picked from constants already on the device: making a tensor from a Python value would
    # be a copy that waits for the device.
    stats = torch.stack([loss_sum / accumulation_steps, (~torch.isfinite(loss_sum)).float(),
                         t.zero_and_one[int(stop_requested)]])
    dist.all_reduce(stats)
    if t.scaler.is_enabled():
        # float16: the scaler found any inf/NaN in the (all-reduced) gradients and skips for us.
        t.scaler.step(t.optimizer)
        t.scaler.update()
    else:
        t.optimizer.found_inf = ((stats[1] > 0) | ~torch.isfinite(grad_norm)).float()
        t.optimizer.step()
        del t.optimizer.found_inf
    t.optimizer.zero_grad(set_to_none=True)
    return torch.stack([stats[0] / ctx.world_size, grad_norm.float(), stats[1], stats[2]])


@torch.no_grad()
def evaluate(model, validation, ctx, amp_dtype):
    """Mean validation loss; each rank takes every world_size-th batch, then all-reduce."""
    model.eval()
    totals = torch.zeros(2, device=ctx.device)
    for index in range(ctx.rank, len(validation), ctx.world_size):
        inputs, targets = (t.to(ctx.device) for t in validation[index])
        totals[0] += compute_loss(model, inputs, targets, amp_dtype, ctx.device)
        totals[1] += 1
    dist.all_reduce(totals)
    model.train()
    return (totals[0] / totals[1]).item()


# ---------------------------------------------------------------- bookkeeping

@dataclass
class Progress:
    start_step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0
    best_loss: float | None = None


def check_resumable(run, ctx, checkpoint_dir, meta):
    """Refuse a different model; allow a different split of the same global batch, and say so."""
    saved_model = meta.get("model_config")
    if saved_model is not None and saved_model != run.model.to_dict():
        changed = sorted(k for k in saved_model if saved_model[k] != run.model.to_dict().get(k))
        raise UserError(f"checkpoint {checkpoint_dir.name} was trained with a different model.json "
                        f"(differs in: {', '.join(changed)}); resume it with the model.json it was trained with")
    # The optimizer state holds the padded output layer: it only fits the same padding.
    saved_padding = meta.get("pad_vocab_to_multiple_of", 1)
    if saved_padding != run.train.pad_vocab_to_multiple_of:
        raise UserError(f"checkpoint {checkpoint_dir.name} was trained with pad_vocab_to_multiple_of "
                        f"{saved_padding}; resume it with the same value in train.json")
    now = {"world_size": ctx.world_size, "microbatch_size": run.train.microbatch_size,
           "gradient_accumulation_steps": run.train.gradient_accumulation_steps}
    saved = {key: meta.get(key) for key in now}
    if None in saved.values() or saved == now:
        return
    if math.prod(saved.values()) != math.prod(now.values()):
        raise UserError(
            f"checkpoint {checkpoint_dir.name} was trained with a global batch of {math.prod(saved.values())} "
            f"sequences ({saved}) but this run has {math.prod(now.values())} ({now}); keep world_size x "
            "microbatch_size x gradient_accumulation_steps the same to resume")
    if ctx.is_main:
        changes = ", ".join(f"{key} {saved[key]} -> {now[key]}" for key in now if saved[key] != now[key])
        print(f"note: resuming with {changes} (same global batch, same data order)")


def restore(run, ctx, checkpoint_dir, model, optimizer, scaler, scheduler, data):
    meta = checkpointing.read_checkpoint_meta(checkpoint_dir)
    check_resumable(run, ctx, checkpoint_dir, meta)
    meta, rng_states = checkpointing.load_training_state(
        checkpoint_dir, model, optimizer, scaler, scheduler, ctx.device)
    start_step = meta["global_step"] + 1
    if "scheduler.pt" not in meta.get("files", {}):
        # A reference-harness checkpoint: put the schedule where it would have been.
        scheduler.last_epoch = start_step - 1
        scheduler.step()
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
                    elapsed_before=meta.get("elapsed_s", 0.0), best_loss=best_loss)


def save(run, ctx, model, optimizer, scaler, scheduler, meta, is_best):
    """Every rank sends its RNG state; rank 0 writes the checkpoint and charts.
    A failure on rank 0 reaches every rank (no one waits forever)."""
    rng_states = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(capture_rng_state(ctx.device), rng_states, dst=0)

    def write():
        checkpointing.save_checkpoint(run.checkpoints_dir, model, optimizer, scaler, scheduler,
                                      rng_states, meta, is_best)
        if run.train.keep_last_checkpoints:
            checkpointing.prune_checkpoints(run.checkpoints_dir, run.train.keep_last_checkpoints)
        try:
            best_dir = run.checkpoints_dir / "best"
            best_step = checkpointing.read_checkpoint_meta(best_dir)["global_step"] if best_dir.exists() else None
            charts.write_charts(run.run_dir, read_metrics(run.run_dir / "metrics.jsonl"),
                                best_step=best_step, clip_norm=run.train.clipping_max_norm)
        except Exception as e:  # noqa: BLE001 - a chart is never worth a training run
            print(f"warning: could not draw charts: {type(e).__name__}: {e}")

    run_and_share_errors(ctx.is_main, write)


# ---------------------------------------------------------------- the loop

@dataclass
class Trainer:
    """Everything one rank trains with."""
    model: GPTModel  # the bare model: checkpoints, validation, gradient clipping
    ddp_model: DDP  # for no_sync
    forward_model: torch.nn.Module  # what the training forward pass calls: ddp_model, compiled or not
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: Data
    amp_dtype: torch.dtype | None
    zero_and_one: torch.Tensor  # [0., 1.] on the device


def make_optimizer(model, train_cfg):
    # One parameter group, as in the reference harness, so its optimizer.pt files load.
    # Fused: one kernel for all parameters, and it can skip a step on a device-side flag.
    return torch.optim.AdamW(model.parameters(), lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay,
                             fused=True)


def build_model(run, ctx):
    """The model on this rank's device, its autocast dtype, optimizer and gradient scaler,
    as training and the -f search use them."""
    torch.manual_seed(run.train.random_seed)  # identical initial weights on every rank
    model = GPTModel(run.model, pad_vocab_to_multiple_of=run.train.pad_vocab_to_multiple_of).to(ctx.device)
    amp_dtype = amp_dtype_for(run.train, ctx.device)
    if amp_dtype is not None:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and later
    optimizer = make_optimizer(model, run.train)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16)
    return model, amp_dtype, optimizer, scaler


def build_trainer(run, ctx, datasets_dir, checkpoint_dir):
    train_cfg = run.train
    model, amp_dtype, optimizer, scaler = build_model(run, ctx)
    data = load_data(run, ctx, datasets_dir)
    warmup_steps = int(data.total_steps * train_cfg.warmup_period_percent // 100)
    min_ratio = train_cfg.effective_min_lr / train_cfg.learning_rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, data.total_steps, warmup_steps, min_ratio)
        if train_cfg.schedule_learning_rate else 1.0)

    if checkpoint_dir:
        progress = restore(run, ctx, checkpoint_dir, model, optimizer, scaler, scheduler, data)
    else:
        progress = Progress()
        set_rank_rng(ctx, train_cfg.random_seed)
    ddp_model = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                    gradient_as_bucket_view=True)
    # Compiling the DDP module lets the compiler split graphs at DDP's bucket boundaries,
    # so gradient all-reduces still overlap the backward pass.
    forward_model = torch.compile(ddp_model) if train_cfg.compile else ddp_model
    zero_and_one = torch.tensor([0.0, 1.0], device=ctx.device)
    return Trainer(model, ddp_model, forward_model, optimizer, scaler, scheduler, data, amp_dtype,
                   zero_and_one), progress


def train(run, ctx, datasets_dir, checkpoint_dir):
    train_cfg = run.train
    t, progress = build_trainer(run, ctx, datasets_dir, checkpoint_dir)
    stop_signals = StopSignals()
    log = TrainingLog(run, ctx, t.data.total_steps, t.data.global_batch_tokens, t.amp_dtype, progress)
    if ctx.is_main:
        print(f"{run.name}: {t.model.num_parameters():,} parameters, world size {ctx.world_size}, "
              f"{t.data.total_steps:,} optimizer steps of {t.data.global_batch_tokens:,} tokens, "
              f"device {ctx.device}, autocast {t.amp_dtype or 'off'}"
              + (", compiled" if train_cfg.compile else ""))
    microbatches = prefetch_to_device(t.data.train, rank_microbatch_indices(
        progress.start_step, t.data.total_steps, train_cfg.gradient_accumulation_steps, ctx.world_size,
        ctx.rank), ctx.device)
    log_interval = train_cfg.log_interval or (10 if ctx.device.type == "cuda" else 1)
    pending = []
    try:
        for global_step in range(progress.start_step, t.data.total_steps):
            lr = t.scheduler.get_last_lr()[0]
            pending.append((global_step, lr, train_step(global_step, t, run, ctx, microbatches,
                                                        stop_signals.received is not None)))
            t.scheduler.step()

            # Every rank reaches the same decisions: they depend on step numbers and all-reduced values.
            is_checkpoint_step = ((global_step + 1) % train_cfg.effective_checkpoint_interval == 0
                                  or global_step == t.data.total_steps - 1)
            # Checkpoint steps are validated too, so every checkpoint's "best" is judged on a fresh number.
            is_validation_step = t.data.validation is not None and (
                (global_step + 1) % train_cfg.validation_interval == 0 or is_checkpoint_step)
            if not (is_checkpoint_step or is_validation_step or (global_step + 1) % log_interval == 0):
                continue
            val_loss = evaluate(t.model, t.data.validation, ctx, t.amp_dtype) if is_validation_step else None
            stop_requested = log.flush(pending, val_loss)
            pending = []
            if is_checkpoint_step or stop_requested:
                meta, is_best = log.checkpoint_meta(validates=t.data.validation is not None)
                save(run, ctx, t.model, t.optimizer, t.scaler, t.scheduler, meta, is_best)
            if stop_requested:
                if ctx.is_main:
                    print(f"\nStopped by {stop_signals.received or 'a signal to another rank'} after global step "
                          f"{global_step}, checkpoint saved. Resume with the same command plus `latest` "
                          "(or `auto`).")
                return
    finally:
        log.close()
    if ctx.is_main:
        print(log.summary())


def find_max_microbatch(run, ctx, target_global_batch, write):
    """The -f search: no validation, no checkpoints, random tokens (memory depends only on shapes)."""
    if ctx.device.type != "cuda" and TEST_LIMIT_VARIABLE not in os.environ:
        raise UserError("-f searches GPU memory for the largest microbatch, and this machine has no CUDA device")
    model, amp_dtype, optimizer, scaler = build_model(run, ctx)
    try_microbatch = make_trial(model, optimizer, scaler,
                                lambda m, inputs, targets: compute_loss(m, inputs, targets, amp_dtype, ctx.device),
                                ctx, run.model.context_length, run.model.vocab_size)
    peak_bytes = {}  # this rank's, for each size that fitted on every rank

    def fits_on_every_rank(size):
        peak = try_microbatch(size)
        passed_everywhere = torch.tensor([float(peak is not None)], device=ctx.device)
        dist.all_reduce(passed_everywhere, op=dist.ReduceOp.MIN)
        passed = bool(passed_everywhere.item())
        if ctx.is_main:
            print(f"microbatch {size}: {'fits' if passed else 'out of memory'}", flush=True)
        if passed:
            peak_bytes[size] = peak
        return passed

    largest = largest_passing(fits_on_every_rank)
    if largest == 0:
        raise UserError(f"even a microbatch of 1 sequence of {run.model.context_length} tokens runs out of "
                        "memory; use a smaller model or context_length")
    peak = torch.tensor([float(peak_bytes[largest])], device=ctx.device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    microbatch, accumulation = suggest_batch_split(largest, ctx.world_size, target_global_batch)
    if ctx.is_main:
        peak_text = f"{peak.item() / 2**30:.1f} GiB on the fullest device" if peak.item() else "n/a on CPU"
        print(f"Largest microbatch that fits on every rank: {largest} (peak memory {peak_text}).\n"
              f"For a global batch of at least {target_global_batch} sequences on {ctx.world_size} rank(s): "
              f"microbatch_size {microbatch}, gradient_accumulation_steps {accumulation} "
              f"(global batch {microbatch * accumulation * ctx.world_size}).")
    if write:
        train_json = run.run_dir / "train.json"
        run_and_share_errors(ctx.is_main, lambda: write_batch_split(train_json, microbatch, accumulation))
        if ctx.is_main:
            print(f"Updated {train_json}.")


def choose_checkpoint(run, checkpoint, force):
    """The checkpoint directory to resume from, or None for a fresh start."""
    if checkpoint == "auto":
        # For schedulers and `torchrun --max-restarts`: resume if there is anything to resume.
        has_latest = (run.checkpoints_dir / "latest").exists()
        return checkpointing.resolve_checkpoint(run.checkpoints_dir, "latest") if has_latest else None
    if checkpoint:
        return checkpointing.resolve_checkpoint(run.checkpoints_dir, checkpoint)
    existing = checkpointing.list_checkpoints(run.checkpoints_dir)
    if existing and not force:
        raise UserError(f"{run.checkpoints_dir} already holds {len(existing)} checkpoint(s) (newest: "
                        f"{existing[-1].name}); name one, or `latest` or `auto`, to resume, or pass --force "
                        "to start a fresh run beside them")
    return None


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
    checkpoint_dir = None if find_max else choose_checkpoint(run, checkpoint, force)
    if run.train.tensorboard:
        require_tensorboard()  # fail before any rank starts, not on rank 0 alone
    ctx = init_distributed(run.train.dist_timeout_minutes)
    try:
        check_connectivity(ctx)
        check_same_checkpoint(ctx, checkpoint_dir)
        if find_max:
            find_max_microbatch(run, ctx, target_global_batch, write)
        else:
            train(run, ctx, datasets_dir, checkpoint_dir)
    finally:
        # DDP's hooks form reference cycles that keep the process group alive; left to the
        # interpreter's teardown, gloo's threads are then destroyed too late and abort the process.
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
