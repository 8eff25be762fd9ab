"""Training throughput of gpt.py's GPTModel on this device: tokens/s, step time,
peak memory and MFU for each microbatch size.

    uv run bench.py 8xh100m80 --microbatch 1,2,4
    uv run bench.py runs/demo/model.json --steps 3 --warmup 1 --compare

RUN_OR_MODEL_JSON is a run name under runs/, a run directory, or a model.json.
A step is what ddp_train.py does for one microbatch on one rank, without the
all-reduce: forward under autocast, fp32 cross-entropy, backward, gradient norm,
AdamW step, on random full-length sequences. --compare also measures PlainGPT,
the book's eager implementation of the same model with the same weights, in the
same process and precision, and prints the throughput ratio. The models take
turns step by step, so a change in load on a shared machine hits both alike.

Step times are wall-clock; tokens/s uses the median (p50) step time, which a
noisy neighbour disturbs less than the mean. Peak memory is the most allocated
on the GPU (torch.cuda.max_memory_allocated), or the peak resident set size on
CPU, during that model's steps; it is the whole process's, so with --compare it
includes the other model's weights and optimizer state.
"""

import gc
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import click
import torch

import perf
from config import ModelConfig, TrainConfig, load_json, resolve_run_dir
from errors import UserError, report_user_errors
from gpt import GPTModel
from plain_gpt import PlainGPT, separate_qkv
from training import compute_loss, make_optimizer

# The train.json keys make_optimizer reads, at their defaults.
DEFAULT_OPTIMIZER_SETTINGS = SimpleNamespace(learning_rate=TrainConfig.learning_rate,
                                             weight_decay=TrainConfig.weight_decay)

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
    amp_dtype: torch.dtype | None  # None: no autocast, fp32

    @property
    def peak_key(self):
        """perf.PRECISIONS key of the matmul peak this precision runs at, or None."""
        if self.amp_dtype is not None:
            return str(self.amp_dtype).removeprefix("torch.")
        return "tf32" if torch.get_float32_matmul_precision() != "highest" else None

    def __str__(self):
        return f"autocast {self.peak_key}" if self.amp_dtype else "fp32 (no autocast)"


def load_model_config(run_or_model_json):
    path = Path(run_or_model_json)
    model_json = path if path.is_file() else resolve_run_dir(run_or_model_json) / "model.json"
    return ModelConfig.from_dict(load_json(model_json), source=str(model_json))


def build(implementation, cfg, device, gpt_options, fused_qkv, compile_model):
    """A freshly initialised model; the same seed gives every implementation the same
    weights. PlainGPT is never compiled: it is the eager baseline. `gpt_options`:
    GPTModel's keyword arguments (padding, activation checkpointing, chunked loss)."""
    torch.manual_seed(0)
    model = GPTModel(cfg, **gpt_options)
    model = (model if fused_qkv else separate_qkv(model)).to(device).train()
    if implementation == "PlainGPT":
        plain = PlainGPT(cfg).to(device).train()
        plain.load_state_dict(model.state_dict())
        return plain
    return torch.compile(model) if compile_model else model


def train_step(model, optimizer, scaler, inputs, targets, precision, device):
    """ddp_train.py's step for one microbatch on one rank (its compute_loss, and the
    gradient norm it logs), without the all-reduce."""
    loss = compute_loss(model, inputs, targets, precision.amp_dtype, device)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    scaler.step(optimizer)  # a plain optimizer.step() unless float16 enabled the scaler
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the peak RSS that getrusage reports to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the peak is the process's high-water mark so far


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(models, cfg, microbatch, steps, warmup, precision, device):
    """Train every model in `models` ({name: model}) for warmup + steps steps on the
    same batch, taking turns step by step so that a change in load on a shared
    machine hits all of them alike; time the last `steps` steps of each."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (microbatch, cfg.context_length + 1), generator=generator)
    inputs, targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    measurements, trainers = {}, {}
    for name, model in models.items():
        measurements[name] = Measurement(name, microbatch, inputs.numel(), [])
        optimizer = make_optimizer(model, DEFAULT_OPTIMIZER_SETTINGS)
        trainers[name] = (model, optimizer,
                          torch.amp.GradScaler(device.type, enabled=precision.amp_dtype == torch.float16))
    for step in range(warmup + steps):
        for name, (model, optimizer, scaler) in list(trainers.items()):
            m = measurements[name]
            reset_peak_memory(device)
            synchronize(device)
            start = time.perf_counter()
            try:
                train_step(model, optimizer, scaler, inputs, targets, precision, device)
            except torch.OutOfMemoryError:
                m.step_times.clear()
                del trainers[name]
                optimizer.zero_grad(set_to_none=True)
                continue
            synchronize(device)
            if step >= warmup:
                m.step_times.append(time.perf_counter() - start)
            m.peak_memory_bytes = max(m.peak_memory_bytes, peak_memory(device))
    return list(measurements.values())


def release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- reporting


def machine_description(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} x{torch.cuda.device_count()}"
    cpuinfo = Path("/proc/cpuinfo")
    fields = {}
    if cpuinfo.is_file():  # the first processor's fields
        for line in cpuinfo.read_text().split("\n\n")[0].splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    name = fields.get("model name") or platform.processor() or "unknown"
    if "cpu family" in fields:  # a bare "AMD EPYC" says little; family and model name the generation
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return f"CPU {name}, {os.cpu_count()} logical CPUs"


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


def print_report(measurements, cfg, gpt_options, device, precision, peak, peak_text, steps, warmup):
    flops_per_token = perf.training_flops_per_token(cfg)
    print(f"machine: {machine_description(device)}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"model: {', '.join(f'{key}={value}' for key, value in cfg.to_dict().items())}")
    print(f"GPTModel built with: {gpt_options}")
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
        raise UserError(f"--microbatch: expected comma-separated integers, got {text!r}")
    if not sizes or min(sizes) < 1:
        raise UserError(f"--microbatch: sizes must be positive, got {text!r}")
    return sizes


@click.command()
@click.argument("run_or_model_json")
@click.option("--microbatch", "microbatch_text", default="1,2,4", show_default=True,
              help="Comma-separated microbatch sizes to measure.")
@click.option("--steps", default=10, show_default=True, type=click.IntRange(min=1), help="Timed steps.")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(min=0),
              help="Untimed steps first (allocation, kernel selection, optimizer state).")
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
def main(run_or_model_json, microbatch_text, steps, warmup, compare, amp, dtype, fused_qkv, pad_vocab,
         activation_checkpointing, loss_chunk_tokens, compile_model, threads, peak_tflops):
    cfg = load_model_config(run_or_model_json)
    if threads:
        torch.set_num_threads(threads)
    microbatches = parse_microbatches(microbatch_text)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = Precision(getattr(torch, dtype) if amp else None)
    peak, peak_text = device_peak(device, precision, peak_tflops)
    implementations = ["GPTModel", "PlainGPT"] if compare else ["GPTModel"]
    options = dict(pad_vocab_to_multiple_of=pad_vocab, activation_checkpointing=activation_checkpointing,
                   loss_chunk_tokens=loss_chunk_tokens)
    measurements = []
    for microbatch in microbatches:
        models = {name: build(name, cfg, device, options, fused_qkv, compile_model) for name in implementations}
        measurements += measure(models, cfg, microbatch, steps, warmup, precision, device)
        del models
        release(device)
    gpt_options = (f"fused_qkv={fused_qkv}, " + ", ".join(f"{key}={value}" for key, value in options.items())
                   + (", torch.compile" if compile_model else ""))
    print_report(measurements, cfg, gpt_options, device, precision, peak, peak_text, steps, warmup)


if __name__ == "__main__":
    main()
