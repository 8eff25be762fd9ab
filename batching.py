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

from errors import UserError


def count_optimizer_steps(available_tokens, start_token, min_train_tokens, global_batch_tokens, source):
    """Optimizer steps needed to cover `min_train_tokens` (rounded up to whole global
    batches), or every whole global batch available when it is -1."""
    if start_token >= available_tokens:
        raise UserError(f"{source}: start token {start_token:,} is past the end of the file "
                        f"({available_tokens:,} tokens)")
    if min_train_tokens == -1:
        steps = (available_tokens - start_token - 1) // global_batch_tokens
    else:
        steps = math.ceil(min_train_tokens / global_batch_tokens)
    needed = steps * global_batch_tokens + 1
    if steps == 0 or start_token + needed > available_tokens:
        raise UserError(
            f"{source}: too short: training needs {max(needed, global_batch_tokens + 1):,} tokens from "
            f"token {start_token:,} (global batch {global_batch_tokens:,} tokens) but the file has "
            f"{available_tokens:,}")
    return steps


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
        raise UserError(f"{self.path}: token {begin + position:,} is id {int(window[position])}, but the model's "
                        f"vocab_size is {self.vocab_size} (model.json key 'vocab_size'; ids must be below it): "
                        "the file is damaged, or its tokenizer is not the one its meta.json names")


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
