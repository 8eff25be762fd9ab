"""Everything one rank trains with, fresh or resumed from a checkpoint: the data, the
model (wrapped for its parallelism), optimizer, scaler and schedule, the HellaSwag
share, and the loop's progress state where a checkpoint left it.

ddp_train.py's loop trains with what `set_up_training` returns; preflight.py times
the same set-up.
"""

import json
import math
from dataclasses import dataclass

import torch

import checkpointing
import core_scoring
import hellaswag_scoring
import token_data
from batching import (Microbatches, MixtureSchedule, ScheduledMicrobatches, check_validation_length,
                      count_optimizer_steps, gradient_accumulation_for, token_budget)
from config import RUN_IDENTITY_KEYS, DatasetSource, ModelConfig
from distributed import run_and_share_errors
from errors import UserError
from initial_weights import load_initial_weights
from parallelism import ParallelModel, wrap_for_training
from training import (STEP_STATISTICS, Diagnostics, build_model, make_lr_scheduler, move_lr_scheduler_to,
                      schedule_change_note, schedule_record)


# ---------------------------------------------------------------- data

@dataclass
class Data:
    train: Microbatches | ScheduledMicrobatches  # scheduled for a mixture or a dataset with a loss mask
    # One split; or for a mixture {source name: (weight, split)} (training.validation_losses).
    validation: Microbatches | dict | None
    total_steps: int
    global_batch_tokens: int
    gradient_accumulation_steps: int  # train.json's, or derived from its global_batch_tokens for this world size
    tokenizer: str  # the dataset's (its meta.json), for evaluations that tokenize text
    mixture: list | None = None  # SourceShare for each source of a mixture


@dataclass(frozen=True)
class SourceShare:
    """What a run reads of one mixture source, for the start-up line."""
    source: DatasetSource
    tokens: int  # training tokens the run reads from it
    available_tokens: int  # its train split


def load_data(run, ctx, datasets_dir):
    train_cfg, context_length = run.train, run.model.context_length
    train_json = run.run_dir / "train.json"
    # Before any download: a global batch that this world size cannot split is a mistake in train.json.
    accumulation = gradient_accumulation_for(train_cfg, ctx.world_size, context_length, train_json)
    sources = train_cfg.dataset_sources
    dataset_dirs = [fetch_dataset(run, ctx, source.dataset, datasets_dir) for source in sources]
    tokenizer = check_tokenizers(run, sources, [token_data.read_meta(d) for d in dataset_dirs])

    microbatch_tokens = train_cfg.microbatch_size * context_length
    microbatches_per_step = ctx.world_size * accumulation
    global_batch_tokens = microbatches_per_step * microbatch_tokens
    splits = [open_split(run, dataset_dir, "train", train_cfg.start_train_token) for dataset_dir in dataset_dirs]
    if train_cfg.is_mixture:
        total_steps = math.ceil(token_budget(train_cfg, run.model).tokens / global_batch_tokens)
    else:
        total_steps = count_optimizer_steps(len(splits[0].tokens), global_batch_tokens, train_cfg,
                                            splits[0].path, train_json, run.model)
        splits[0].num_microbatches = total_steps * global_batch_tokens // microbatch_tokens
    train, mixture = splits[0], None
    if train_cfg.is_mixture or train.loss_mask is not None:
        schedule = MixtureSchedule([source.weight for source in sources], total_steps * microbatches_per_step,
                                   train_cfg.random_seed)
        check_source_sizes(sources, splits, schedule, train_json)
        for split, count in zip(splits, schedule.counts):
            split.num_microbatches = int(count)
        train = ScheduledMicrobatches(splits, schedule, microbatches_per_step)
        mixture = [SourceShare(source, int(count) * microbatch_tokens, len(split.tokens))
                   for source, split, count in zip(sources, splits, schedule.counts)]

    validation = None
    if train_cfg.validation_interval:
        validations = [open_split(run, dataset_dir, "validation", train_cfg.start_val_token,
                                  train_cfg.validation_batches) for dataset_dir in dataset_dirs]
        for split in validations:
            check_validation_length(len(split.tokens), context_length, train_cfg, split.path, train_json)
        validation = ({source.name: (source.weight, split) for source, split in zip(sources, validations)}
                      if train_cfg.is_mixture else validations[0])
    return Data(train, validation, total_steps, global_batch_tokens, accumulation, tokenizer, mixture)


def fetch_dataset(run, ctx, spec, datasets_dir):
    """The directory of dataset `spec`, fetched (built or downloaded) by one process per node,
    or once in all when every node sees the same DATASETS_DIR."""
    fetches = ctx.is_main if run.train.shared_filesystem else ctx.is_local_main
    dataset_dir = run_and_share_errors(fetches, lambda: token_data.fetch_dataset(spec, datasets_dir, run.run_dir))
    return dataset_dir or token_data.dataset_location(spec, datasets_dir, run.run_dir)[1]


def check_tokenizers(run, sources, metas):
    """The tokenizer the run's text is in; refuse sources tokenized differently, or a vocabulary
    smaller than a source's (a chat tokenizer adds ids after its base's)."""
    bases = {token_data.base_tokenizer(meta.tokenizer) for meta in metas}
    if len(bases) > 1:
        described = ", ".join(f"{source.name}: {meta.tokenizer}" for source, meta in zip(sources, metas))
        raise UserError(f"{run.run_dir / 'train.json'}: key 'dataset': the sources are tokenized differently "
                        f"({described}); mix only datasets of one tokenizer (or its chat extension)")
    largest = max(metas, key=lambda meta: meta.vocab_size)
    if run.model.vocab_size < largest.vocab_size:
        raise UserError(f"{run.run_dir / 'model.json'}: key 'vocab_size' ({run.model.vocab_size}) is smaller "
                        f"than the dataset's tokenizer vocabulary ({largest.tokenizer}: {largest.vocab_size}); "
                        f"it must be at least {largest.vocab_size}")
    return bases.pop()


def open_split(run, dataset_dir, split, start_token, num_microbatches=0):
    """Microbatches of a dataset's split, with its loss mask when it has one; `num_microbatches`
    is set by the caller once the run's length is known."""
    tokens = token_data.open_split(dataset_dir, split)
    return Microbatches(tokens, start_token, num_microbatches, run.train.microbatch_size, run.model.context_length,
                        vocab_size=run.model.vocab_size, path=dataset_dir / f"{split}.safetensors",
                        loss_mask=token_data.open_split_mask(dataset_dir, split, len(tokens)))


def check_source_sizes(sources, splits, schedule, train_json):
    """Refuse a source too small for its share of the run: no microbatch is read twice."""
    for source, split, count in zip(sources, splits, schedule.counts):
        if count > split.available:
            needed = count * split.microbatch_tokens + 1
            raise UserError(f"{split.path}: too short for its share of the run: source '{source.name}' (weight "
                            f"{source.weight:g}) gets {count:,} microbatches, {needed:,} tokens, but the file holds "
                            f"{split.available:,} microbatches ({len(split.tokens):,} tokens); in {train_json} "
                            "lower its weight or the token budget, or give it more data")


# ---------------------------------------------------------------- progress, and resuming it

@dataclass
class Progress:
    """What the loop decides with across steps and restarts: where the run is (from the last
    recorded metrics row, or the checkpoint resumed), what is best, and what went wrong."""
    start_step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0  # training time up to the last recorded step, earlier sessions included
    last_val_loss: float | None = None  # the newest validation loss of this session
    best_val_loss: float | None = None  # the lowest finite validation loss so far, for the console
    last_row: dict | None = None  # the last metrics.jsonl row of this session
    best_loss: float | None = None  # the score of the `best` checkpoint
    last_checkpoint: str | None = None  # the newest checkpoint of this run, for messages
    skipped_in_a_row: int = 0
    init_from: dict | None = None  # where a run that started from existing weights started
    wandb_run_id: str | None = None  # the W&B run a resumed run continues

    def advance(self, rows):
        """Move past recorded metrics rows (the last one is the newest)."""
        self.last_row = rows[-1]
        self.tokens_seen, self.elapsed_s = self.last_row["tokens"], self.last_row["elapsed_s"]
        self.last_val_loss = self.last_row.get("val_loss", self.last_val_loss)
        val_loss = self.last_row.get("val_loss")  # a non-finite one is recorded as null
        if val_loss is not None and (self.best_val_loss is None or val_loss < self.best_val_loss):
            self.best_val_loss = val_loss


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


def check_overrides_resumable(run, ctx, checkpoint_dir, meta):
    """Refuse a --set that changes what the checkpoint was trained on (RUN_IDENTITY_KEYS),
    as a changed model.json is refused; note the others that change a recorded value."""
    saved = meta.get("train_config")
    for key, value in run.overrides.items():
        recorded = "not recorded" if saved is None or key not in saved else json.dumps(saved[key])
        if key in RUN_IDENTITY_KEYS and recorded != json.dumps(value):
            raise UserError(f"--set {key}={json.dumps(value)}: checkpoint {checkpoint_dir.name} was trained with "
                            f"{key} {recorded}; a resumed run cannot change {key} (it chooses the data or the "
                            "shape of the saved state). Resume without it, or start a new run with --force")
        if ctx.is_main and recorded != json.dumps(value):
            print(f"note: resuming with --set {key}={json.dumps(value)} (checkpoint {checkpoint_dir.name}: {recorded})")


def mixture_change_note(meta, train_cfg, checkpoint_dir):
    """A note when a mixture's schedule (drawn from its sources, weights and seed) differs from the
    one the checkpoint trained with (its meta.json train_config): the data from here on is not what
    an uninterrupted run would have read. None when it is the same, or neither is a mixture."""
    saved = meta.get("train_config")
    if saved is None or not (train_cfg.is_mixture or isinstance(saved.get("dataset"), list)):
        return None
    then, now = (saved.get("dataset"), saved.get("random_seed")), (train_cfg.dataset, train_cfg.random_seed)
    if then == now:
        return None
    return (f"note: checkpoint {checkpoint_dir.name} was trained on dataset {json.dumps(then[0])} with random_seed "
            f"{then[1]}, this run has {json.dumps(now[0])} with {now[1]}: from step {meta['global_step'] + 1} on the "
            "data follows this run's mixture, not the one an uninterrupted run would have read")


def restore(run, ctx, checkpoint_dir, state, data):
    """Load `checkpoint_dir` into `state`, put the schedule and every rank's RNG where it
    was, and return the Progress it records."""
    meta = checkpointing.read_checkpoint_meta(checkpoint_dir)
    check_resumable(run, ctx, checkpoint_dir, meta, data.gradient_accumulation_steps)
    schedule_note = schedule_change_note(meta.get("schedule"), schedule_record(run.train, data.total_steps),
                                         meta["global_step"] + 1, checkpoint_dir.name)
    if schedule_note and ctx.is_main:
        print(schedule_note)
    mixture_note = mixture_change_note(meta, run.train, checkpoint_dir)
    if mixture_note and ctx.is_main:
        print(mixture_note)
    meta, rng_states = checkpointing.load_training_state(checkpoint_dir, state, ctx.device)
    start_step = meta["global_step"] + 1
    # The schedule is a function of the step: this also continues a reference-harness run,
    # whose scheduler.pt holds another kind of scheduler, or none.
    move_lr_scheduler_to(state.scheduler, start_step)
    if not checkpointing.set_rank_rng(ctx, run.train.random_seed, rng_states) and ctx.is_main:
        print("note: checkpoint has no RNG state for this world size; dropout masks will differ "
              "from an uninterrupted run")
    best_dir = run.checkpoints_dir / "best"
    best_meta = checkpointing.read_checkpoint_meta(best_dir) if best_dir.exists() else meta
    best_loss = best_meta.get("best_loss", best_meta.get("val_loss") or best_meta.get("avg_train_loss"))
    if ctx.is_main:
        print(f"Resuming from {checkpoint_dir.name} at global step {start_step}")
    return Progress(start_step=start_step,
                    tokens_seen=meta.get("tokens_seen", start_step * data.global_batch_tokens),
                    elapsed_s=meta.get("elapsed_s", 0.0), best_loss=best_loss,
                    best_val_loss=best_meta.get("val_loss"),
                    last_checkpoint=checkpoint_dir.name, init_from=meta.get("init_from"),
                    wandb_run_id=meta.get("wandb_run_id"))


# ---------------------------------------------------------------- set-up

@dataclass
class TrainingSetup:
    """Everything one rank trains with."""
    state: checkpointing.TrainingState  # the bare or sharded model, optimizer, scaler, schedule: what checkpoints hold
    parallel: ParallelModel  # the forward model (DDP-wrapped, compiled or not) and the gradient-sync switch
    data: Data
    amp_dtype: torch.dtype | None  # the precision the model computes in
    stop_flags: torch.Tensor  # [0., 1.] on the device
    hellaswag: hellaswag_scoring.RankShare | None  # this rank's HellaSwag items, with hellaswag_interval
    core: core_scoring.RankShare | None  # the CORE items and this rank's rows, with core_interval
    diagnostics: Diagnostics | None  # with train.json diagnostics: per-group statistics of each step

    @property
    def statistic_names(self):
        """What each of train_step's statistics is, in order."""
        return STEP_STATISTICS + (self.diagnostics.names if self.diagnostics else ())


def set_up_training(run, ctx, datasets_dir, resume_dir):
    """(TrainingSetup, Progress): fresh, or resumed from the checkpoint `resume_dir` when given."""
    if resume_dir:  # before any download a --set dataset would start
        check_overrides_resumable(run, ctx, resume_dir, checkpointing.read_checkpoint_meta(resume_dir))
    # A resumed run's weights come from its checkpoint, whatever init_from says.
    initial = (load_initial_weights(run.train, run.model, run.run_dir / "train.json")
               if run.train.init_from and not resume_dir else None)
    model, amp_dtype, optimizer, scaler = build_model(run, ctx, initial)
    data = load_data(run, ctx, datasets_dir)
    state = checkpointing.TrainingState(model, optimizer, scaler,
                                        make_lr_scheduler(optimizer, run.train, data.total_steps))
    if resume_dir:
        progress = restore(run, ctx, resume_dir, state, data)
    else:
        progress = Progress(init_from=initial.origin if initial else None)
        checkpointing.set_rank_rng(ctx, run.train.random_seed)
    parallel = wrap_for_training(model, run.train, ctx, amp_dtype)
    stop_flags = torch.tensor([0.0, 1.0], device=ctx.device)
    hellaswag = (hellaswag_scoring.training_share(run, ctx, datasets_dir, data.tokenizer)
                 if run.train.hellaswag_interval else None)
    core = (core_scoring.training_share(run, ctx, datasets_dir, data.tokenizer)
            if run.train.core_interval else None)
    diagnostics = Diagnostics(model) if run.train.diagnostics else None
    return TrainingSetup(state, parallel, data, amp_dtype, stop_flags, hellaswag, core, diagnostics), progress
