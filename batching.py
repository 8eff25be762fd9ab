"""Which tokens each rank trains on, exactly as the reference harness slices them.

The training slice starts at `start_train_token` and holds whole global batches
of `world_size x microbatch_size x gradient_accumulation_steps x context_length`
tokens (the accumulation given in train.json, or derived from its
global_batch_tokens: gradient_accumulation_for), as many as its token budget asks
(token_budget, count_optimizer_steps), plus one token so the last target exists. Microbatch number
`(global_step x accumulation_steps + accumulation_step) x world_size + rank` is
the one a rank uses, so N ranks with accumulation 1 see exactly the tokens of
1 rank with accumulation N, step for step.
"""

import decimal
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

import perf
from errors import RankLocalUserError, UserError


def gradient_accumulation_for(train_cfg, world_size, context_length, train_json):
    """train.json's gradient_accumulation_steps, or the one its global_batch_tokens gives on
    `world_size` ranks: global_batch_tokens / (world_size x microbatch_size x context_length),
    which must be whole, so every world size trains on the same tokens per optimizer step."""
    if train_cfg.global_batch_tokens is None:
        return train_cfg.gradient_accumulation_steps
    sequences = sequences_per_rank(train_cfg, world_size, context_length, train_json)
    accumulation, remainder = divmod(sequences, train_cfg.microbatch_size)
    if remainder:
        global_batch, microbatch = train_cfg.global_batch_tokens, train_cfg.microbatch_size
        step_tokens = world_size * microbatch * context_length
        below = [d for d in divisors(sequences) if d < microbatch]
        above = [d for d in divisors(sequences) if d > microbatch]
        microbatches = " or ".join(str(d) for d in [below[-1], *above[:1]])
        raise UserError(f"{train_json}: key 'global_batch_tokens' ({global_batch}) is not a multiple of world size "
                        f"{world_size} x microbatch_size {microbatch} x context_length {context_length} = "
                        f"{step_tokens} tokens, so it gives no whole number of gradient accumulation steps; set "
                        f"global_batch_tokens to {nearest_multiples(global_batch, step_tokens)}, or microbatch_size "
                        f"to {microbatches}")
    return accumulation


def sequences_per_rank(train_cfg, world_size, context_length, train_json):
    """train.json's global_batch_tokens as sequences per rank per optimizer step on `world_size` ranks."""
    global_batch, rank_tokens = train_cfg.global_batch_tokens, world_size * context_length
    if global_batch % rank_tokens:
        raise UserError(f"{train_json}: key 'global_batch_tokens' ({global_batch}) is not a multiple of world size "
                        f"{world_size} x context_length {context_length} = {rank_tokens} tokens, so no microbatch_size "
                        f"splits it into whole sequences on every rank; set global_batch_tokens to "
                        f"{nearest_multiples(global_batch, rank_tokens)}")
    return global_batch // rank_tokens


def nearest_multiples(value, unit):
    """The multiples of `unit` just below and above `value`, as train.json would hold them."""
    below, above = value // unit * unit, (value // unit + 1) * unit
    return f"{below} or {above}" if below else str(above)


def divisors(number):
    small = [d for d in range(1, math.isqrt(number) + 1) if number % d == 0]
    return sorted({*small, *(number // d for d in small)})


@dataclass(frozen=True)
class TokenBudget:
    """How long train.json asks to train: the `value` of its `key` (no key: every whole global
    batch available), worth `tokens_per_unit` tokens per unit (1 for min_train_tokens, the
    parameter count for train_tokens_per_parameter, 1 / training FLOPs per token for train_flops)."""
    key: str | None = None
    value: float | None = None
    tokens_per_unit: Fraction = Fraction(1)
    per_unit_text: str = ""  # how units become tokens, for messages: "x 124,439,808 parameters"

    @property
    def tokens(self):
        return None if self.key is None else math.ceil(exact(self.value) * self.tokens_per_unit)

    def __str__(self):
        text = f"{self.key} {number(self.value)}"
        return f"{text} {self.per_unit_text} = {self.tokens:,} tokens" if self.per_unit_text else text

    def largest_value(self, tokens):
        """The largest value of the key that asks for at most `tokens`, as train.json would hold it
        (a ratio or FLOPs rounded down to 4 significant digits)."""
        if self.tokens_per_unit == 1:
            return str(tokens)
        largest = Fraction(tokens) / self.tokens_per_unit
        rounded = decimal.Context(prec=4, rounding=decimal.ROUND_FLOOR).divide(largest.numerator, largest.denominator)
        return format(rounded, "g")


def token_budget(train_cfg, model_cfg=None):
    """train.json's training length, from whichever of min_train_tokens, train_tokens_per_parameter
    and train_flops it gives (at most one: config.py checks); only the last two need the model's
    config. Parameters are perf.parameter_count's: every unique trainable parameter, embeddings
    included, as Chinchilla counts them."""
    if train_cfg.train_tokens_per_parameter is not None:
        parameters = perf.parameter_count(model_cfg)
        return TokenBudget("train_tokens_per_parameter", train_cfg.train_tokens_per_parameter, Fraction(parameters),
                           f"x {parameters:,} parameters")
    if train_cfg.train_flops is not None:
        per_token = perf.training_flops_per_token(model_cfg)
        return TokenBudget("train_flops", train_cfg.train_flops, Fraction(1, per_token),
                           f"/ {per_token:,} FLOPs per token")
    if train_cfg.min_train_tokens != -1:
        return TokenBudget("min_train_tokens", train_cfg.min_train_tokens)
    return TokenBudget()


def exact(value):
    """A train.json number as the decimal written there (0.1 is 1/10, not the float nearest it),
    so that token counts are exact integer arithmetic."""
    return Fraction(repr(value))


def number(value):
    """A train.json number as written there: 20, not 20.0; 1e+18, not 1000000000000000000.0."""
    return repr(value).removesuffix(".0")


def count_optimizer_steps(available_tokens, global_batch_tokens, train_cfg, token_file, train_json, model_cfg=None):
    """Optimizer steps needed to cover train.json's token budget (token_budget) from its
    `start_train_token`, rounded up to whole global batches, or every whole global batch
    available when it gives none."""
    budget = token_budget(train_cfg, model_cfg)
    whole_batches = max(0, available_tokens - train_cfg.start_train_token - 1) // global_batch_tokens
    steps = whole_batches if budget.tokens is None else math.ceil(budget.tokens / global_batch_tokens)
    if steps == 0 or steps > whole_batches:
        raise training_slice_error(available_tokens, global_batch_tokens, train_cfg, budget, token_file, train_json)
    return steps


def training_slice_error(available_tokens, global_batch_tokens, train_cfg, budget, token_file, train_json):
    """What is wrong with train.json's training slice of `token_file`, and the values that would fit."""
    start = train_cfg.start_train_token
    steps = 1 if budget.tokens is None else math.ceil(budget.tokens / global_batch_tokens)
    needed = steps * global_batch_tokens + 1  # one more token for the last target
    if start >= available_tokens:
        problem = f"start token {start:,} is past the end of the file ({available_tokens:,} tokens)"
    else:
        wanted = ("one global batch" if budget.key is None
                  else f"{budget} in {steps:,} global batch{'es' if steps > 1 else ''}")
        problem = (f"too short: training needs {needed:,} tokens from start_train_token {start} ({wanted} of "
                   f"{global_batch_tokens:,} tokens, plus 1) but the file has {available_tokens:,}")
    fits = training_slice_fits(available_tokens, global_batch_tokens, train_cfg, budget, needed)
    remedy = f"in {train_json} set {', or '.join(fits)}" if fits else "use a dataset with more tokens"
    return UserError(f"{token_file}: {problem}; {remedy}")


def training_slice_fits(available_tokens, global_batch_tokens, train_cfg, budget, needed):
    """The train.json changes, each enough on its own, that make the training slice fit.
    Values of keys are written as in train.json (no thousands separators)."""
    fits = []
    if needed <= available_tokens:
        fits.append(f"start_train_token to at most {available_tokens - needed}")
    room = max(0, available_tokens - train_cfg.start_train_token - 1)
    whole_batches_tokens = room // global_batch_tokens * global_batch_tokens
    if budget.key is not None and whole_batches_tokens:
        fits.append(f"{budget.key} to at most {budget.largest_value(whole_batches_tokens)}")
    if room >= global_batch_tokens:
        return fits
    # Not even one global batch fits: a smaller one, then with no budget beyond it.
    no_budget = {None: "", "min_train_tokens": " with min_train_tokens -1"}.get(budget.key, f" without {budget.key}")
    if train_cfg.global_batch_tokens is not None:
        fits.append(f"global_batch_tokens to at most {room} (a multiple of world size x microbatch_size x "
                    f"context_length){no_budget}")
        return fits
    # A global batch is world size x microbatch_size x gradient_accumulation_steps x context_length tokens.
    largest_microbatch = room // (global_batch_tokens // train_cfg.microbatch_size)
    if largest_microbatch:
        fits.append(f"microbatch_size to at most {largest_microbatch}{no_budget}")
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

    With a `loss_mask` (an array as long as `tokens`, conversation data) an item also
    holds the targets' mask, as float32 [microbatch_size, context_length]: 1 where the
    target token counts in the loss.
    """

    def __init__(self, tokens, start_token, num_microbatches, microbatch_size, context_length, *,
                 vocab_size=None, path=None, loss_mask=None):
        self.tokens = tokens
        self.loss_mask = loss_mask
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
        if self.loss_mask is None:
            return window[:-1].view(self.shape), window[1:].view(self.shape)
        target_mask = torch.from_numpy(self.target_mask(index).astype("float32"))
        return window[:-1].view(self.shape), window[1:].view(self.shape), target_mask.view(self.shape)

    def target_mask(self, index):
        """The loss mask of microbatch `index`'s targets (all ones without a loss_mask)."""
        if self.loss_mask is None:
            return np.ones(self.microbatch_tokens, dtype=np.uint8)
        begin = self.start_token + index * self.microbatch_tokens + 1  # targets are the window shifted by one
        return self.loss_mask[begin:begin + self.microbatch_tokens]

    @property
    def available(self):
        """How many whole microbatches the token file holds from start_token (one pass over it)."""
        return max(0, len(self.tokens) - self.start_token - 1) // self.microbatch_tokens

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


class MixtureSchedule:
    """Which source each global microbatch of a run comes from, and which of that source's
    microbatches (its `cursor`: each source is read in order, one pass, nothing repeated).

    Source i's k-th microbatch is due at time (k + offset_i) / weight_i, the offsets drawn
    from `seed`; microbatches go in order of due time. So every prefix of the schedule
    holds each source within one microbatch of its weight's share, and the whole
    schedule is a function of the weights, the seed and the length: a resumed run finds
    its place from the step number alone.
    """

    def __init__(self, weights, num_microbatches, seed):
        weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        offsets = np.random.default_rng(seed).random(len(weights))
        due, sources = [], []
        for source, (weight, offset) in enumerate(zip(weights, offsets)):
            if weight == 0:
                continue
            # Enough due times to fill any prefix (a source is never more than len(weights) ahead).
            count = math.ceil(num_microbatches * weight) + len(weights) + 1
            due.append((np.arange(count) + offset) / weight)
            sources.append(np.full(count, source, dtype=np.int16))
        due, sources = np.concatenate(due), np.concatenate(sources)
        self.source = sources[np.lexsort((sources, due))[:num_microbatches]]
        self.cursor = np.empty(num_microbatches, dtype=np.int64)
        self.counts = np.zeros(len(weights), dtype=np.int64)
        for source in range(len(weights)):
            slots = np.flatnonzero(self.source == source)
            self.cursor[slots] = np.arange(len(slots))
            self.counts[source] = len(slots)

    def __len__(self):
        return len(self.source)


class ScheduledMicrobatches:
    """Global microbatch i of a run with a mixture or a loss mask: (inputs, targets, target
    weights), from the source and window MixtureSchedule says.

    The target weights are the loss mask (all ones for a source without one) times
    microbatches_per_step / (masked-in targets of the whole global step), so that the sum
    of weighted token losses over every microbatch of every rank, averaged over the ranks as
    DDP and FSDP average gradients, is the mean over the global batch's masked-in targets.
    Every rank counts the step's targets from the masks of all its microbatches (host memory,
    microbatch_size x context_length bytes each): no collective is needed.
    """

    def __init__(self, sources, schedule, microbatches_per_step):
        self.sources = sources
        self.schedule = schedule
        self.microbatches_per_step = microbatches_per_step
        self.path = sources[0].path
        self._step_targets = (None, None)  # (global step, its masked-in target count)

    def __len__(self):
        return len(self.schedule)

    def __getitem__(self, index):
        source = self.sources[self.schedule.source[index]]
        inputs, targets, *mask = source[int(self.schedule.cursor[index])]
        mask = mask[0] if mask else torch.ones(source.shape)
        targets_in_step = self.step_targets(index // self.microbatches_per_step)
        scale = self.microbatches_per_step / targets_in_step if targets_in_step else 0.0
        return inputs, targets, mask * scale

    def step_targets(self, global_step):
        """The masked-in targets of every microbatch of `global_step`, all ranks together."""
        if self._step_targets[0] != global_step:
            first = global_step * self.microbatches_per_step
            count = sum(int(self.sources[self.schedule.source[i]].target_mask(int(self.schedule.cursor[i])).sum())
                        for i in range(first, first + self.microbatches_per_step))
            self._step_targets = (global_step, count)
        return self._step_targets[1]
