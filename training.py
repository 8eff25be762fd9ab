"""Training, one piece at a time: precision, the loss, the optimizer, the learning-rate
schedule, the memory a model needs, the model as training builds it, one optimizer
step, a validation pass, and the loop's schedule of what follows each step.

ddp_train.py's loop runs them; preflight.py, bench.py, test_loss.py and the -f search
use them so that they measure and evaluate exactly what training runs.

Seams for tests (tests/train_with_faults.py, tests/test_run_safety.py): the loop and
preflight call `training.train_step`, and train_step and evaluate call
`training.compute_loss`, through this module, so replacing either attribute here
changes what every caller runs.
"""

import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import perf
from config import TOKEN_BUDGET_KEYS
from errors import UserError
from gpt import GPTModel
from initial_weights import apply_initial_weights
from metrics import DIAGNOSTIC_PREFIXES
from parallelism import check_supported, clip_gradients, local_tensor, shard, shard_count

# The reference harness's LinearLR warmup starts at learning_rate x this.
WARMUP_START_FACTOR = 1e-5
# fp32 weights, fp32 gradients and AdamW's two fp32 moments.
TRAINING_BYTES_PER_PARAMETER = 16


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


def compute_loss(model, inputs, targets, amp_dtype, device, target_weights=None):
    """The mean cross-entropy, which the model computes in fp32 from its logits; with
    `target_weights` (a loss mask, scaled: batching.ScheduledMicrobatches), the sum of
    each target's cross-entropy times its weight."""
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        if target_weights is None:
            return model(inputs, targets)
        return model(inputs, targets, target_weights)


def make_optimizer(model, train_cfg):
    """train.json's optimizer for `model` (the bare or sharded GPTModel, not a wrapper)."""
    if train_cfg.optimizer == "muon":
        return MuonWithAdamW(model, train_cfg)
    # One parameter group, as in the reference harness, so its optimizer.pt files load.
    # Fused: one kernel for all parameters, and it can skip a step on a device-side flag.
    return torch.optim.AdamW(model.parameters(), lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay,
                             fused=True)


def muon_parameter_names(model):
    """The parameters Muon trains: the weights of the nn.Linear layers inside the transformer
    blocks. torch.optim.Muon would take any 2-D parameter, but the token and position
    embeddings and the output head are 2-D too and are no hidden-layer maps: they stay with
    AdamW, as do norms and biases."""
    block_matrices = {f"trf_blocks.{name}.weight" for name, module in model.trf_blocks.named_modules()
                      if isinstance(module, torch.nn.Linear)}
    return [name for name, _ in model.named_parameters() if name in block_matrices]


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon (Nesterov) on muon_parameter_names, fused AdamW on every other
    parameter, as one torch optimizer: param group 0 is AdamW's (learning_rate,
    weight_decay), group 1 Muon's (muon_learning_rate, ...). So the learning-rate schedule
    scales both groups by the same factor, zero_grad, GradScaler and the clipping before
    step() see every parameter, and state_dict() is torch's usual layout over both groups
    (state numbered group 0's parameters first, then group 1's; Muon's state is its
    `momentum_buffer`), which torch.distributed.checkpoint handles as any optimizer's.

    Like fused AdamW, step() skips on the device when the caller sets `found_inf` to a
    nonzero tensor, so no rank waits for the device to decide: AdamW through its own flag,
    Muon (which has none) by stepping and then putting back, with torch.where, each matrix
    and momentum buffer copied before the step: one extra copy of both during the step."""

    def __init__(self, model, train_cfg):
        muon_names = set(muon_parameter_names(model))
        named = list(model.named_parameters())
        self.adamw = torch.optim.AdamW([p for name, p in named if name not in muon_names],
                                       lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay, fused=True)
        muon_class = Float32Muon if train_cfg.muon_newton_schulz_dtype == "float32" else torch.optim.Muon
        self.muon = muon_class([p for name, p in named if name in muon_names], lr=train_cfg.muon_learning_rate,
                               weight_decay=train_cfg.muon_weight_decay, momentum=train_cfg.muon_momentum,
                               nesterov=True, adjust_lr_fn=train_cfg.muon_adjust_lr)
        # The same group dicts, so a change of lr by the schedule reaches the optimizer that steps.
        super().__init__(self.adamw.param_groups + self.muon.param_groups, defaults={})
        self._share_groups_and_state()

    def _share_groups_and_state(self):
        # Both optimizers keep their state in this one (their parameters are disjoint).
        self.adamw.param_groups, self.muon.param_groups = self.param_groups[:1], self.param_groups[1:]
        self.adamw.state = self.muon.state = self.state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)  # which replaces the groups and the state
        self._share_groups_and_state()

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonWithAdamW.step takes no closure")
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            self.adamw.step()
            self.muon.step()
            return
        self.adamw.found_inf = found_inf
        try:
            self.adamw.step()
        finally:
            del self.adamw.found_inf
        self._muon_step_unless(found_inf > 0)

    def _muon_step_unless(self, skip):
        stepped = [p for group in self.muon.param_groups for p in group["params"] if p.grad is not None]
        for p in stepped:  # made here, as Muon would, so that a skipped first step leaves zeros
            self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad, memory_format=torch.preserve_format))
        tensors = [local_tensor(t) for p in stepped for t in (p, self.state[p]["momentum_buffer"])]
        before = [t.clone() for t in tensors]
        self.muon.step()
        for now, then in zip(tensors, before):
            now.copy_(torch.where(skip, then, now))


class Float32Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iterations in float32 instead of bfloat16
    (train.json muon_newton_schulz_dtype "float32"): on a CPU without bfloat16 matrix units
    a bfloat16 matmul is about 30 times slower than a float32 one. Everything else is
    torch's Muon: its parameter groups, momentum buffers (so the two load each other's
    state_dict), Nesterov momentum, learning-rate adjustment and decoupled weight decay."""

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Float32Muon.step takes no closure")
        for group in self.param_groups:
            params, grads, momentum_buffers = [], [], []
            self._init_group(group, params, grads, momentum_buffers)
            for param, grad, momentum_buffer in zip(params, grads, momentum_buffers):
                momentum_buffer.lerp_(grad, 1 - group["momentum"])
                update = grad.lerp(momentum_buffer, group["momentum"]) if group["nesterov"] else momentum_buffer
                update = newton_schulz_float32(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update, alpha=-group["lr"] * muon_lr_scale(group["adjust_lr_fn"], param.shape))


def newton_schulz_float32(matrix, coefficients, steps, eps):
    """torch.optim.Muon's quintic Newton-Schulz iteration (an approximate orthogonalisation
    of `matrix`), computed in float32. Works on the wide orientation, whose Gram matrix is
    the smaller one."""
    a, b, c = coefficients
    tall = matrix.size(0) > matrix.size(1)
    x = matrix.T if tall else matrix
    x = x.to(torch.float32) / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def muon_lr_scale(adjust_lr, shape):
    """The factor torch.optim.Muon's adjust_lr_fn applies to the learning rate of a
    (out, in) matrix (config.MUON_ADJUST_LR)."""
    rows, columns = shape[:2]
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, columns))
    return math.sqrt(max(1, rows / columns))


# ---------------------------------------------------------------- learning-rate schedule

def warmup_steps_for(total_steps, warmup_period_percent):
    """The reference harness's `total_steps * warmup_period_percent // 100`."""
    return int(total_steps * warmup_period_percent // 100)


def lr_factor(step, total_steps, warmup_steps, min_ratio):
    """The reference harness's schedule, as a multiple of learning_rate at optimizer step
    `step` (0-based): its LinearLR warmup from WARMUP_START_FACTOR to 1 over
    `warmup_steps` steps, then its CosineAnnealingLR from 1 to `min_ratio` with a
    period of `total_steps - warmup_steps` steps, so the last step stops just short of
    the floor. Written in closed form, which equals torch's step-by-step recurrences
    to float rounding (tests/test_lr_schedule.py), so that a resumed run only needs
    its step number to be back on the schedule."""
    if step < warmup_steps:
        return WARMUP_START_FACTOR + (1 - WARMUP_START_FACTOR) * step / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2


def make_lr_scheduler(optimizer, train_cfg, total_steps):
    """A LambdaLR on the reference schedule (constant without schedule_learning_rate).
    Stepped once after every optimizer step, skipped ones included, as in the reference."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(schedule_record(train_cfg, total_steps)))


# What the schedule is computed from: every checkpoint records it (meta.json "schedule"), so
# that a run resumed with other values can say what changed.
SCHEDULE_KEYS = ("schedule_learning_rate", "learning_rate", "min_lr", "warmup_period_percent", *TOKEN_BUDGET_KEYS)


def schedule_record(train_cfg, total_steps):
    return {"total_steps": total_steps, **{key: getattr(train_cfg, key) for key in SCHEDULE_KEYS}}


def schedule_factor(record):
    """step -> the multiple of learning_rate at that step, for a schedule_record."""
    if not record["schedule_learning_rate"]:
        return lambda step: 1.0
    total_steps = record["total_steps"]
    warmup_steps = warmup_steps_for(total_steps, record["warmup_period_percent"])
    min_lr = record["learning_rate"] / 10 if record["min_lr"] is None else record["min_lr"]
    min_ratio = min_lr / record["learning_rate"]
    return lambda step: lr_factor(step, total_steps, warmup_steps, min_ratio)


def learning_rate_at(step, record):
    return record["learning_rate"] * schedule_factor(record)(step)


def schedule_change_note(saved, now, step, checkpoint_name):
    """The note for resuming at `step` under schedule_record `now` from a checkpoint whose
    schedule was `saved` (None: written before checkpoints recorded it), or None when they
    agree. Resuming with more steps (or another decay) is legitimate; doing it silently is not."""
    if saved is None:
        return (f"note: checkpoint {checkpoint_name} does not record its learning-rate schedule (an older "
                "checkpoint); this run's schedule cannot be compared with the one it was trained on")
    changed = [key for key in SCHEDULE_KEYS if saved.get(key) != now[key]]
    if not changed and saved["total_steps"] == now["total_steps"]:
        return None
    keys = ", ".join(f"{key} {saved.get(key)} -> {now[key]}" for key in changed) or "no key (the dataset's size)"
    return (f"note: the learning-rate schedule differs from checkpoint {checkpoint_name}'s ({keys}): total steps "
            f"{saved['total_steps']:,} -> {now['total_steps']:,}; the learning rate at global step {step} is "
            f"{learning_rate_at(step, now):.6g} (it would have been {learning_rate_at(step, saved):.6g})")


def move_lr_scheduler_to(scheduler, step):
    """Put the schedule where it is after `step` optimizer steps (on resume)."""
    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():
        # torch's warning that the optimizer has not stepped yet: true, and meant here.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        scheduler.step()


# ---------------------------------------------------------------- memory

def device_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_model_fits(model_cfg, device, source, shards=1):
    """Refuse, before allocating anything, a model whose weights, gradients and AdamW
    state alone (cut into `shards` under FSDP) exceed the device's memory (a typo like
    n_layers 10,000,000)."""
    parameters = perf.parameter_count(model_cfg)
    needed = parameters * TRAINING_BYTES_PER_PARAMETER // shards
    available = device_memory_bytes(device)
    if needed > available:
        per_shard = f", 1/{shards} of it per device" if shards > 1 else ""
        raise UserError(
            f"{source}: this model has {parameters:,} parameters, whose weights, gradients and AdamW state "
            f"need {needed / 2**30:,.1f} GiB ({TRAINING_BYTES_PER_PARAMETER} bytes each{per_shard}), more than the "
            f"{available / 2**30:,.1f} GiB of {device}; check n_layers, emb_dim and vocab_size")


# ---------------------------------------------------------------- the model

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


# ---------------------------------------------------------------- diagnostics

def diagnostic_group(name):
    """The group train.json `diagnostics` reports a parameter in: embeddings (token and
    position), attention (its projections and their biases), mlp, norms (every norm's
    scale and shift), head (an untied output layer; a tied one is the token embedding),
    or other (anything a new architecture option adds outside these)."""
    parts = name.split(".")
    if any("norm" in part for part in parts[:-1]):
        return "norms"
    if parts[0] in ("tok_emb", "pos_emb"):
        return "embeddings"
    if parts[0] == "out_head":
        return "head"
    if parts[0] == "trf_blocks" and parts[2] in ("att", "ff"):
        return {"att": "attention", "ff": "mlp"}[parts[2]]
    return "other"


def total_norm(tensors):
    """The 2-norm of all of `tensors` together; under FSDP over every rank's shards."""
    norm = torch.nn.utils.get_total_norm(tensors)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


class Diagnostics:
    """train.json `diagnostics`: for each diagnostic_group, the norm of its gradients before
    clipping and ||update|| / ||weight||, the norm of its weights' change in the step over
    their norm before it, as device tensors that train_step appends to the step's statistics
    (read with them once per log window: no wait for the device). The update is measured,
    not derived from an optimizer's formula: a copy of the weights is kept during the step.
    A skipped step's ratio is 0; under FSDP the norms are over the full tensors (one
    all-reduce per group and statistic)."""

    def __init__(self, model):
        self.groups = {}
        for name, param in model.named_parameters():
            self.groups.setdefault(diagnostic_group(name), []).append(param)
        self.names = tuple(prefix + group for prefix in DIAGNOSTIC_PREFIXES for group in self.groups)

    def gradient_norms(self):
        return [total_norm([p.grad for p in params if p.grad is not None]) for params in self.groups.values()]

    def weights(self):
        return {param: param.detach().clone() for params in self.groups.values() for param in params}

    def update_ratios(self, before):
        return [total_norm([p.detach() - before[p] for p in params]) / total_norm([before[p] for p in params])
                for params in self.groups.values()]


# ---------------------------------------------------------------- one step

# What train_step returns: one device tensor per step holding these, in this order,
# read from the device once per log window.
STEP_STATISTICS = ("loss", "grad_norm", "nonfinite_ranks", "stop_votes", "skipped")


def train_step(setup, run, ctx, microbatches, stop_requested):
    """One optimizer step over `gradient_accumulation_steps` microbatches on every rank
    (`setup`: a training_setup.TrainingSetup).

    Returns, without waiting for the device, a tensor of STEP_STATISTICS (and with
    train.json diagnostics, then setup.diagnostics.names): the loss
    (mean over ranks and microsteps), the gradient norm before clipping, the number of
    ranks with a non-finite loss and of ranks asking to stop, and 1 if the step was
    skipped (else 0). A step with a non-finite loss or gradient on any rank is skipped on
    every rank alike, inside the optimizer (fused AdamW's `found_inf`, which MuonWithAdamW
    honours too), with no sync.
    """
    accumulation_steps = setup.data.gradient_accumulation_steps
    state = setup.state
    loss_sum = torch.zeros((), device=ctx.device)
    for accumulation_step in range(accumulation_steps):
        # (inputs, targets), or with a mixture or loss mask (inputs, targets, target weights), weighted so
        # that the loss is the microbatch's share of the global batch's masked mean times accumulation_steps
        # x world_size, as a mean loss is (batching.ScheduledMicrobatches): what follows is the same.
        batch = next(microbatches)
        # Gradients are all-reduced only on the last microstep.
        is_last_microstep = accumulation_step == accumulation_steps - 1
        with setup.parallel.gradient_sync(is_last_microstep):
            loss = compute_loss(setup.parallel.forward_model, *batch[:2], setup.parallel.autocast_dtype, ctx.device,
                                *batch[2:])
            state.scaler.scale(loss / accumulation_steps).backward()
        loss_sum += loss.detach()

    state.scaler.unscale_(state.optimizer)
    gradient_norms = setup.diagnostics.gradient_norms() if setup.diagnostics else []
    grad_norm = clip_gradients(state.model.parameters(), run.train.gradient_clip_norm)
    # One all-reduce carries the loss, the non-finite flag and the stop flag. The stop flag is
    # picked from constants already on the device: making a tensor from a Python value would
    # be a copy that waits for the device.
    stop_flag = setup.stop_flags[1 if stop_requested else 0]
    reduced = torch.stack([loss_sum / accumulation_steps, (~torch.isfinite(loss_sum)).float(), stop_flag])
    dist.all_reduce(reduced)
    mean_loss, nonfinite_ranks, stop_votes = reduced
    skipped = ((nonfinite_ranks > 0) | ~torch.isfinite(grad_norm)).float()
    weights_before = setup.diagnostics.weights() if setup.diagnostics else None
    if state.scaler.is_enabled():
        # float16: the scaler found any inf/NaN in the (all-reduced) gradients and skips for us.
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.found_inf = skipped
        state.optimizer.step()
        del state.optimizer.found_inf
    state.optimizer.zero_grad(set_to_none=True)
    update_ratios = setup.diagnostics.update_ratios(weights_before) if setup.diagnostics else []
    return torch.stack([mean_loss / ctx.world_size, grad_norm.float(), nonfinite_ranks, stop_votes, skipped,
                        *gradient_norms, *update_ratios])


@torch.no_grad()
def evaluate(model, validation, ctx, amp_dtype):
    """Mean validation loss; each rank takes every world_size-th batch, then all-reduce.
    With a loss mask, the mean over the masked-in targets of all batches.

    Every rank runs the same number of forward passes, because a sharded model's
    all-gathers are collective: a rank past the last batch scores the last one again
    and does not count it."""
    model.eval()
    totals = torch.zeros(2, device=ctx.device)
    passes = math.ceil(len(validation) / ctx.world_size) * ctx.world_size
    for index in range(ctx.rank, passes, ctx.world_size):
        inputs, targets, *mask = (tensor.to(ctx.device) for tensor in validation[min(index, len(validation) - 1)])
        loss = compute_loss(model, inputs, targets, amp_dtype, ctx.device, *mask)
        if index < len(validation):
            totals[0] += loss
            totals[1] += mask[0].sum() if mask else 1
    dist.all_reduce(totals)
    model.train()
    return (totals[0] / totals[1]).item()


def validation_losses(model, validation, ctx, amp_dtype):
    """{"val_loss": ...} for one validation split; for a mixture's ({name: (weight, split)}),
    also "val_loss/<name>" for each source, and as val_loss their mean weighted by the
    mixture's weights: the loss on data drawn as training draws it (a source of weight 0
    is validated but not in val_loss)."""
    if not isinstance(validation, dict):
        return {"val_loss": evaluate(model, validation, ctx, amp_dtype)}
    losses = {name: evaluate(model, split, ctx, amp_dtype) for name, (_, split) in validation.items()}
    weights = {name: weight for name, (weight, _) in validation.items()}
    overall = sum(weights[name] * loss for name, loss in losses.items()) / sum(weights.values())
    return {"val_loss": overall, **{f"val_loss/{name}": loss for name, loss in losses.items()}}


@torch.no_grad()
def weights_are_finite(model):
    """Whether every rank's weights are finite (one all-reduce; a sync, so only before saving)."""
    finite = torch.stack([torch.isfinite(local_tensor(p)).all() for p in model.parameters()]).all().float()
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


# ---------------------------------------------------------------- what follows a step

@dataclass(frozen=True)
class StepWork:
    """What the loop does after an optimizer step, besides logging."""
    save_checkpoint: bool
    validation: bool
    hellaswag: bool
    core: bool


def work_after_step(global_step, total_steps, train_cfg, validates, scores_hellaswag):
    """The loop's schedule (preflight.py counts it for its projection)."""
    is_last = global_step == total_steps - 1
    # The reference harness's rule: after step 0, every checkpoint_interval steps, and the last.
    save_checkpoint = global_step % train_cfg.effective_checkpoint_interval == 0 or is_last
    # Checkpoint steps are validated too, so every checkpoint's "best" is judged on a fresh number.
    validation = validates and (global_step % train_cfg.validation_interval == 0 or save_checkpoint)
    # HellaSwag at the last step too, so the final weights always have a score.
    hellaswag = scores_hellaswag and (global_step % train_cfg.hellaswag_interval == 0 or is_last)
    # CORE likewise (core_scoring.training_share is set up whenever core_interval is).
    core = train_cfg.core_interval is not None and (global_step % train_cfg.core_interval == 0 or is_last)
    return StepWork(save_checkpoint, validation, hellaswag, core)
