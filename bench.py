"""Training throughput of gpt.py's GPTModel on this device: tokens/s, step time,
peak memory and MFU for each microbatch size.

    uv run bench.py 8xh100m80 --microbatch-size 1,2,4
    uv run bench.py runs/demo/model.json --steps 3 --warmup-steps 1 --compare
    uv run torchrun --nproc_per_node=8 bench.py 8xh100m80 --microbatch-size 8 --parallelism fsdp

RUN_OR_MODEL_JSON is a run name under runs/, a run directory, or a model.json.
A step is what ddp_train.py does for one microbatch on one rank: its compute_loss
(fp32 cross-entropy), backward, gradient norm (parallelism.clip_gradients) and
fused AdamW step, on random full-length sequences.

--parallelism ddp (the default): one device, no process group; the step without
DDP's all-reduce, forward under autocast. --compare also measures PlainGPT, the
book's eager implementation of the same model with the same weights, in the same
process and precision, and prints the throughput ratio. The models take turns
step by step, so a change in load on a shared machine hits both alike.

--parallelism fsdp: started like training, under torchrun (a plain `python
bench.py` is a world of one). Every rank builds the same GPTModel and shards it
as ddp_train.py does (parallelism.shard: FSDP2, MixedPrecisionPolicy instead of
autocast), so the step includes FSDP's all-gathers and reduce-scatters. Each rank
trains on its own random tokens. The numbers are per rank: tokens/s, step times
and MFU of the slowest rank, peak memory of the fullest; rank 0 prints them.
--compare, --separate-qkv and --pad-vocab are single-device variants that
training never shards, and float16 is refused as in training.

Step times are wall-clock; tokens/s uses the median (p50) step time, which a
noisy neighbour disturbs less than the mean. Peak memory is the most allocated
on the GPU (torch.cuda.max_memory_allocated), or the peak resident set size on
CPU, during that model's steps; it is the whole process's, so with --compare it
includes the other model's weights and optimizer state.
"""

import gc
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

import click
import torch
import torch.distributed as dist

import perf
from cli_aliases import command_with_old_spellings
from config import TrainConfig, load_model_config
from devices import machine_description, peak_memory, release, reset_peak_memory, synchronize
from distributed import DistContext, check_connectivity, init_distributed
from errors import UserError, report_user_errors
from gpt import GPTModel
from parallelism import autocast_dtype_for, check_supported, clip_gradients, shard
from plain_gpt import PlainGPT, separate_qkv
from training import compute_loss, make_optimizer

# Under fsdp a rank waits for the others only inside a step, while a slower one catches
# up; one that waits this long is stuck (see measure), and ends the run.
PROCESS_GROUP_TIMEOUT_MINUTES = 10

# ---------------------------------------------------------------- measuring


@dataclass
class Measurement:
    implementation: str
    microbatch: int
    tokens_per_step: int
    step_times: list  # seconds, timed steps only; empty when the microbatch did not fit
    peak_memory_bytes: int = 0

    @property
    def fits(self):
        return bool(self.step_times)

    @property
    def p50(self):
        return statistics.median(self.step_times)

    @property
    def tokens_per_sec(self):
        return self.tokens_per_step / self.p50


@dataclass(frozen=True)
class Precision:
    amp_dtype: torch.dtype | None  # None: fp32
    autocast_dtype: torch.dtype | None  # compute_loss's: amp_dtype, or None where FSDP's policy casts

    @property
    def peak_key(self):
        """perf.PRECISIONS key of the matmul peak this precision runs at, or None."""
        if self.amp_dtype is not None:
            return str(self.amp_dtype).removeprefix("torch.")
        return "tf32" if torch.get_float32_matmul_precision() != "highest" else None

    def __str__(self):
        if self.amp_dtype is None:
            return "fp32 (no autocast)"
        if self.autocast_dtype is None:
            return f"{self.peak_key} (FSDP2 MixedPrecisionPolicy, no autocast)"
        return f"autocast {self.peak_key}"


def bench_train_config(parallelism, microbatch, amp, dtype, pad_vocab, activation_checkpointing,
                       loss_chunk_tokens, compile_model):
    """The train.json that trains the way bench.py's options say, for the functions
    training builds with (GPTModel's options, parallelism.shard, make_optimizer)."""
    return TrainConfig(dataset="", microbatch_size=microbatch,  # no dataset: random tokens
                       use_amp=amp, amp_dtype=dtype, parallelism=parallelism, compile=compile_model,
                       pad_vocab_to_multiple_of=pad_vocab, activation_checkpointing=activation_checkpointing,
                       loss_chunk_tokens=loss_chunk_tokens)


def gpt_options(train_cfg):
    """GPTModel's keyword arguments, from the train.json keys of the same names."""
    return {key: getattr(train_cfg, key)
            for key in ("pad_vocab_to_multiple_of", "activation_checkpointing", "loss_chunk_tokens")}


def refuse_unsharded_options(compare, fused_qkv, pad_vocab):
    given = [option for option, is_given in (("--compare", compare), ("--separate-qkv", not fused_qkv),
                                             (f"--pad-vocab {pad_vocab}", pad_vocab != 1)) if is_given]
    if given:
        raise UserError(f"{', '.join(given)}: not with --parallelism fsdp, which measures the step as training "
                        "shards it (GPTModel, fused query/key/value, vocabulary unpadded); use --parallelism ddp")


@contextmanager
def placement(parallelism):
    """This process's DistContext. ddp: one device and no process group (the step leaves
    DDP's all-reduce out). fsdp: a rank of torchrun's process group (of one without
    torchrun), set up as ddp_train.py does, and destroyed at the end."""
    if parallelism == "ddp":
        yield DistContext(rank=0, local_rank=0, world_size=1,
                          device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        return
    ctx = init_distributed(PROCESS_GROUP_TIMEOUT_MINUTES)
    try:
        check_connectivity(ctx)
        yield ctx
    finally:
        # As in ddp_train.main: what still refers to the process group goes before it does.
        gc.collect()
        dist.destroy_process_group()


def build(implementation, cfg, train_cfg, fused_qkv, ctx, precision):
    """A freshly initialised model, sharded under fsdp as training shards it; the same seed
    gives every implementation, and every rank, the same weights. PlainGPT is never
    compiled: it is the eager baseline."""
    torch.manual_seed(0)
    model = GPTModel(cfg, **gpt_options(train_cfg))
    model = (model if fused_qkv else separate_qkv(model)).to(ctx.device).train()
    if implementation == "PlainGPT":
        plain = PlainGPT(cfg).to(ctx.device).train()
        plain.load_state_dict(model.state_dict())
        return plain
    if train_cfg.parallelism == "fsdp":
        return shard(model, train_cfg, ctx, precision.amp_dtype)  # compiles each block first with --compile
    return torch.compile(model) if train_cfg.compile else model


def train_step(model, optimizer, scaler, inputs, targets, precision, device):
    """ddp_train.py's step for one microbatch on one rank (its compute_loss, and the
    gradient norm it logs); under ddp without the all-reduce."""
    loss = compute_loss(model, inputs, targets, precision.autocast_dtype, device)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    clip_gradients(model.parameters(), float("inf"))
    scaler.step(optimizer)  # a plain optimizer.step() unless float16 enabled the scaler
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def measure(models, cfg, train_cfg, microbatch, steps, warmup, precision, ctx):
    """Train every model in `models` ({name: model}) for warmup + steps steps on the
    same batch, taking turns step by step so that a change in load on a shared
    machine hits all of them alike; time the last `steps` steps of each.

    A microbatch that runs out of memory on any rank is out of memory on every rank:
    each rank's outcome is shared after every step. Under fsdp every rank runs the
    same shapes on equally padded shards, so a microbatch too large for one is, as a
    rule, too large for all of them at the same allocation. Should one rank alone
    fail in the middle of a sharded step, the others are left in FSDP's next
    collective, which no flag can reach: the process-group timeout ends that case
    (PROCESS_GROUP_TIMEOUT_MINUTES); it needs GPUs to happen, and is untested."""
    device = ctx.device
    generator = torch.Generator().manual_seed(ctx.rank)  # each rank its own tokens, as in training
    tokens = torch.randint(0, cfg.vocab_size, (microbatch, cfg.context_length + 1), generator=generator)
    inputs, targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    measurements, trainers = {}, {}
    for name, model in models.items():
        measurements[name] = Measurement(name, microbatch, inputs.numel(), [])
        trainers[name] = (model, make_optimizer(model, train_cfg),
                          torch.amp.GradScaler(device.type, enabled=precision.amp_dtype == torch.float16))
    for step in range(warmup + steps):
        for name, (model, optimizer, scaler) in list(trainers.items()):
            m = measurements[name]
            reset_peak_memory(device)
            synchronize(device)
            start = time.perf_counter()
            try:
                train_step(model, optimizer, scaler, inputs, targets, precision, device)
                synchronize(device)
                seconds = time.perf_counter() - start
            except torch.OutOfMemoryError:
                seconds = None
                optimizer.zero_grad(set_to_none=True)
            if not fits_on_every_rank(seconds is not None, device):
                m.step_times.clear()
                del trainers[name]
                continue
            if step >= warmup:
                m.step_times.append(seconds)
            m.peak_memory_bytes = max(m.peak_memory_bytes, peak_memory(device))
    return slowest_rank(list(measurements.values()))


def fits_on_every_rank(fits, device):
    """Under fsdp, whether the step fitted on every rank; under ddp (no process group), `fits`."""
    if not dist.is_initialized():
        return fits
    everywhere = torch.tensor([float(fits)], device=device)
    dist.all_reduce(everywhere, op=dist.ReduceOp.MIN)
    return bool(everywhere.item())


def slowest_rank(measurements):
    """Under fsdp, each measurement as the slowest rank timed it (the largest p50), with the
    largest peak memory of any rank: a sharded step is as fast as its slowest rank, and
    must fit on the fullest. Under ddp (no process group), the measurements."""
    if not dist.is_initialized():
        return measurements
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, measurements)
    return [replace(max(ranks, key=lambda m: m.p50 if m.fits else 0.0),
                    peak_memory_bytes=max(m.peak_memory_bytes for m in ranks))
            for ranks in zip(*per_rank)]


# ---------------------------------------------------------------- reporting


def device_peak(device, precision, peak_tflops):
    """(peak FLOP/s or None, where it comes from) for MFU."""
    if peak_tflops is not None:
        return peak_tflops * 1e12, f"{peak_tflops:g} TFLOPS (--peak-tflops)"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = perf.peak_flops(device_name, precision.peak_key) if precision.peak_key else None
    if peak is None:
        return None, "n/a (not in perf.py's table for this device and precision; pass --peak-tflops)"
    gpu = perf.find_gpu(device_name)
    return peak, f"{peak / 1e12:g} TFLOPS dense {precision.peak_key} ({gpu.name}: {gpu.source})"


def format_row(m, flops_per_token, peak):
    if not m.fits:
        return f"{m.implementation:<10} {m.microbatch:>10}  out of memory"
    utilisation = perf.mfu(m.tokens_per_sec, flops_per_token, peak)
    mfu_text = "n/a" if utilisation is None else f"{utilisation:.1%}"
    return (f"{m.implementation:<10} {m.microbatch:>10} {m.tokens_per_sec:>12,.1f} "
            f"{statistics.fmean(m.step_times):>14.3f} {m.p50:>13.3f} "
            f"{m.peak_memory_bytes / 1e9:>12.2f} {mfu_text:>7}")


def parallelism_description(train_cfg, ctx):
    if train_cfg.parallelism == "ddp":
        return "ddp: one device, the step without the gradient all-reduce"
    ranks = f"{ctx.world_size} rank" + ("s" if ctx.world_size > 1 else "")
    return (f"fsdp: sharded over {ranks} (parallelism.shard); tokens/s, step times and MFU per rank, "
            "the slowest rank's; peak memory the fullest rank's")


def gpt_options_description(train_cfg, fused_qkv):
    return (f"fused_qkv={fused_qkv}, " + ", ".join(f"{key}={value}" for key, value in gpt_options(train_cfg).items())
            + (", torch.compile" if train_cfg.compile else ""))


def print_report(measurements, cfg, train_cfg, fused_qkv, ctx, precision, peak, peak_text, steps, warmup):
    device = ctx.device
    flops_per_token = perf.training_flops_per_token(cfg)
    print(f"machine: {machine_description(device)}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"model: {', '.join(f'{key}={value}' for key, value in cfg.to_dict().items())}")
    print(f"GPTModel built with: {gpt_options_description(train_cfg, fused_qkv)}")
    print(f"parallelism: {parallelism_description(train_cfg, ctx)}")
    print(f"precision: {precision}; {steps} timed steps after {warmup} warm-up; "
          f"{flops_per_token:,} model FLOPs per token (perf.py)")
    print(f"peak: {peak_text}")
    memory_header = "peak GB" if device.type == "cuda" else "peak RSS GB"
    print(f"{'model':<10} {'microbatch':>10} {'tokens/s':>12} {'step mean s':>14} {'step p50 s':>13} "
          f"{memory_header:>12} {'MFU':>7}")
    for m in measurements:
        print(format_row(m, flops_per_token, peak))
    for microbatch in sorted({m.microbatch for m in measurements}):
        pair = {m.implementation: m for m in measurements if m.microbatch == microbatch}
        if {"GPTModel", "PlainGPT"} <= pair.keys() and all(m.fits for m in pair.values()):
            ratio = pair["GPTModel"].tokens_per_sec / pair["PlainGPT"].tokens_per_sec
            print(f"ratio at microbatch {microbatch}: GPTModel / PlainGPT tokens/s = {ratio:.2f}x")


def parse_microbatches(text):
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--microbatch-size: expected comma-separated integers, got {text!r}")
    if not sizes or min(sizes) < 1:
        raise UserError(f"--microbatch-size: sizes must be positive, got {text!r}")
    return sizes


@click.command(cls=command_with_old_spellings({"--microbatch": "--microbatch-size", "--warmup": "--warmup-steps"}),
               epilog="""\b
Examples:
  uv run bench.py 8xh100m80 --microbatch-size 1,2,4
  uv run torchrun --nproc_per_node=8 bench.py 8xh100m80 --microbatch-size 8 --parallelism fsdp""")
@click.argument("run_or_model_json")
@click.option("--microbatch-size", "microbatch_text", default="1,2,4", show_default=True,
              help="Comma-separated microbatch sizes to measure.")
@click.option("--steps", default=10, show_default=True, type=click.IntRange(min=1), help="Timed steps.")
@click.option("--warmup-steps", "warmup", default=2, show_default=True, type=click.IntRange(min=0),
              help="Untimed steps first (allocation, kernel selection, optimizer state).")
@click.option("--parallelism", type=click.Choice(["ddp", "fsdp"]), default="ddp", show_default=True,
              help="ddp: one device, no process group. fsdp: shard the model as training does, over the "
                   "ranks of `torchrun --nproc_per_node=N bench.py ...`.")
@click.option("--compare", is_flag=True, help="Also measure PlainGPT, the book's eager implementation.")
@click.option("--amp/--no-amp", default=True, show_default=True, help="Autocast, as use_amp in train.json.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16"]), default="bfloat16", show_default=True,
              help="Autocast dtype.")
@click.option("--fused-qkv/--separate-qkv", default=True, show_default=True,
              help="GPTModel's query/key/value projections as one matmul or three.")
@click.option("--pad-vocab", default=1, show_default=True, type=click.IntRange(min=1),
              help="GPTModel's pad_vocab_to_multiple_of (64: 50257 -> 50304).")
@click.option("--activation-checkpointing", is_flag=True,
              help="Recompute each block in the backward pass, as the train.json key does.")
@click.option("--loss-chunk-tokens", type=click.IntRange(min=1), default=None,
              help="Compute the output head and loss this many tokens at a time, as the train.json key does.")
@click.option("--compile", "compile_model", is_flag=True,
              help="torch.compile GPTModel, as \"compile\": true in train.json does (the warm-up "
                   "steps then include compiling).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch (default: torch's, one per core). On a machine shared with "
                   "other work, 1 avoids stalls while a descheduled thread holds up the others.")
@click.option("--peak-tflops", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak TFLOPS per device for MFU, instead of perf.py's table (which has no CPUs).")
@report_user_errors
def main(run_or_model_json, microbatch_text, steps, warmup, parallelism, compare, amp, dtype, fused_qkv, pad_vocab,
         activation_checkpointing, loss_chunk_tokens, compile_model, threads, peak_tflops):
    """Training throughput, step time, peak memory and MFU of RUN_OR_MODEL_JSON's model (a run
    name under runs/, a run directory, or a model.json) for each microbatch size."""
    cfg = load_model_config(run_or_model_json)
    microbatches = parse_microbatches(microbatch_text)
    if parallelism == "fsdp":
        refuse_unsharded_options(compare, fused_qkv, pad_vocab)
    train_cfg = bench_train_config(parallelism, max(microbatches), amp, dtype, pad_vocab, activation_checkpointing,
                                   loss_chunk_tokens, compile_model)
    amp_dtype = getattr(torch, dtype) if amp else None
    check_supported(train_cfg, amp_dtype, f"bench.py --parallelism {parallelism}")
    precision = Precision(amp_dtype, autocast_dtype_for(train_cfg, amp_dtype))
    if threads:
        torch.set_num_threads(threads)
    implementations = ["GPTModel", "PlainGPT"] if compare else ["GPTModel"]
    with placement(parallelism) as ctx:
        peak, peak_text = device_peak(ctx.device, precision, peak_tflops)
        measurements = []
        for microbatch in microbatches:
            models = {name: build(name, cfg, train_cfg, fused_qkv, ctx, precision) for name in implementations}
            measurements += measure(models, cfg, train_cfg, microbatch, steps, warmup, precision, ctx)
            del models
            release(ctx.device)
        if ctx.is_main:
            print_report(measurements, cfg, train_cfg, fused_qkv, ctx, precision, peak, peak_text, steps, warmup)


if __name__ == "__main__":
    main()
