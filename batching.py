"""Which tokens each rank trains on, exactly as the reference harness slices them.

The training slice starts at `start_train_token` and holds whole global batches
of `world_size x microbatch_size x gradient_accumulation_steps x context_length`
tokens, plus one token so the last target exists. Microbatch number
`(global_step x accumulation_steps + accumulation_step) x world_size + rank` is
the one a rank uses, so N ranks with accumulation 1 see exactly the tokens of
1 rank with accumulation N, step for step.
"""

import math

import numpy as np
import torch

from errors import RankLocalUserError, UserError


def count_optimizer_steps(available_tokens, global_batch_tokens, train_cfg, token_file, train_json):
    """Optimizer steps needed to cover train.json's `min_train_tokens` from its
    `start_train_token` (rounded up to whole global batches), or every whole global
    batch available when it is -1."""
    whole_batches = max(0, available_tokens - train_cfg.start_train_token - 1) // global_batch_tokens
    if train_cfg.min_train_tokens == -1:
        steps = whole_batches
    else:
        steps = math.ceil(train_cfg.min_train_tokens / global_batch_tokens)
    if steps == 0 or steps > whole_batches:
        raise training_slice_error(available_tokens, global_batch_tokens, train_cfg, token_file, train_json)
    return steps


def training_slice_error(available_tokens, global_batch_tokens, train_cfg, token_file, train_json):
    """What is wrong with train.json's training slice of `token_file`, and the values that would fit."""
    start, min_tokens = train_cfg.start_train_token, train_cfg.min_train_tokens
    steps = 1 if min_tokens == -1 else math.ceil(min_tokens / global_batch_tokens)
    needed = steps * global_batch_tokens + 1  # one more token for the last target
    if start >= available_tokens:
        problem = f"start token {start:,} is past the end of the file ({available_tokens:,} tokens)"
    else:
        wanted = ("one global batch" if min_tokens == -1
                  else f"min_train_tokens {min_tokens} in {steps:,} global batch{'es' if steps > 1 else ''}")
        problem = (f"too short: training needs {needed:,} tokens from start_train_token {start} ({wanted} of "
                   f"{global_batch_tokens:,} tokens, plus 1) but the file has {available_tokens:,}")
    fits = training_slice_fits(available_tokens, global_batch_tokens, train_cfg, needed)
    remedy = f"in {train_json} set {', or '.join(fits)}" if fits else "use a dataset with more tokens"
    return UserError(f"{token_file}: {problem}; {remedy}")


def training_slice_fits(available_tokens, global_batch_tokens, train_cfg, needed):
    """The train.json changes, each enough on its own, that make the training slice fit.
    Values of keys are written as in train.json (no thousands separators)."""
    fits = []
    if needed <= available_tokens:
        fits.append(f"start_train_token to at most {available_tokens - needed}")
    room = max(0, available_tokens - train_cfg.start_train_token - 1)
    if train_cfg.min_train_tokens != -1 and room >= global_batch_tokens:
        fits.append(f"min_train_tokens to at most {room // global_batch_tokens * global_batch_tokens}")
    # A global batch is world size x microbatch_size x gradient_accumulation_steps x context_length tokens.
    largest_microbatch = room // (global_batch_tokens // train_cfg.microbatch_size)
    if room < global_batch_tokens and largest_microbatch:
        fits.append(f"microbatch_size to at most {largest_microbatch}"
                    + ("" if train_cfg.min_train_tokens == -1 else " with min_train_tokens -1"))
    return fits


def check_validation_length(available_tokens, context_length, train_cfg, token_file, train_json):
    """Refuse a validation split too short for train.json's validation_batches from its start_val_token."""
    start, batches = train_cfg.start_val_token, train_cfg.validation_batches
    microbatch_tokens = train_cfg.microbatch_size * context_length
    needed = batches * microbatch_tokens + 1  # one more token for the last target
    if start + needed <= available_tokens:
        return
    fits = []  # as in training_slice_fits
    whole_batches = max(0, available_tokens - start - 1) // microbatch_tokens
    if whole_batches:
        fits.append(f"validation_batches to at most {whole_batches}")
    if needed <= available_tokens:
        fits.append(f"start_val_token to at most {available_tokens - needed}")
    fits.append("validation_interval to null to train without validation")
    rebuild = ("" if whole_batches else f"; or rebuild {token_file.parent} with prepare_datasets.py from more "
               "documents or with a larger --validation-fraction")
    raise UserError(f"{token_file}: too short: validation_batches {batches} x microbatch_size "
                    f"{train_cfg.microbatch_size} x context_length {context_length} from start_val_token {start} "
                    f"need {start + needed:,} tokens but the file has {available_tokens:,}; in {train_json} set "
                    f"{', or '.join(fits)}{rebuild}")


def microbatch_index(global_step, accumulation_step, accumulation_steps, world_size, rank):
    return (global_step * accumulation_steps + accumulation_step) * world_size + rank


class Microbatches:
    """Microbatch i of a memory-mapped token array: inputs and next-token targets,
    each [microbatch_size, context_length], as int64 tensors.

    Given the model's `vocab_size`, each window is checked for ids at or above it
    while still on the host: on the device such an id is an IndexError on CPU and a
    device-side assert on a GPU, which kills the job without saying which file or
    token. `path` names the token file in that error.
    """

    def __init__(self, tokens, start_token, num_microbatches, microbatch_size, context_length, *,
                 vocab_size=None, path=None):
        self.tokens = tokens
        self.start_token = start_token
        self.num_microbatches = num_microbatches
        self.microbatch_tokens = microbatch_size * context_length
        self.shape = (microbatch_size, context_length)
        self.vocab_size = vocab_size
        self.path = path

    def __len__(self):
        return self.num_microbatches

    def __getitem__(self, index):
        if not 0 <= index < self.num_microbatches:
            raise IndexError(f"microbatch {index} out of range 0..{self.num_microbatches - 1}")
        begin = self.start_token + index * self.microbatch_tokens
        window = self.tokens[begin:begin + self.microbatch_tokens + 1]
        if self.vocab_size is not None:
            self.check_ids(window, begin)
        # Copies only this window out of the memory map.
        window = torch.from_numpy(window.astype("int64"))
        return window[:-1].view(self.shape), window[1:].view(self.shape)

    def check_ids(self, window, begin):
        """Refuse a window holding an id the model has no embedding for (one numpy max
        over the window, next to the copy it is about to make anyway)."""
        if window.max() < self.vocab_size:
            return
        position = int(np.argmax(window >= self.vocab_size))
        raise RankLocalUserError(
            f"{self.path}: token {begin + position:,} is id {int(window[position])}, but the model's vocab_size is "
            f"{self.vocab_size} (model.json key 'vocab_size'; ids must be below it): the file is damaged, or its "
            "tokenizer is not the one its meta.json names")


def rank_microbatch_indices(start_step, total_steps, accumulation_steps, world_size, rank):
    """The microbatches one rank trains on, in order, from optimizer step `start_step` on."""
    for global_step in range(start_step, total_steps):
        for accumulation_step in range(accumulation_steps):
            yield microbatch_index(global_step, accumulation_step, accumulation_steps, world_size, rank)


def prefetch_to_device(batches, indices, device):
    """Yield batches[i] for each index as device tensors, the next one already read from
    the memory map and its copy started before the current one is handed out, so the
    host-side work overlaps the device's work on the current microbatch."""
    pin = device.type == "cuda"  # page-locked host memory makes the copy truly asynchronous

    def load(index):
        return tuple((t.pin_memory() if pin else t).to(device, non_blocking=True) for t in batches[index])

    ready = None
    for index in indices:
        upcoming = load(index)
        if ready is not None:
            yield ready
        ready = upcoming
    if ready is not None:
        yield ready
