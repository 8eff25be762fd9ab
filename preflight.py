"""Preflight: speed, memory, fit and cost of a run on this machine, before paying for it.

    uv run torchrun --nproc_per_node=8 preflight.py RUN DATASETS_DIR [--steps 30]
        [--price-per-gpu-hour 2.99] [--json OUT] [--markdown OUT] [--chart OUT]

Started exactly as training is, it runs the run's own code paths (the training loop's
model, data, step, validation and checkpoint writer) with the run's config on every rank:

1. machine: GPUs, versions, CPUs, free disk against what the run will write;
2. interconnect: all-reduce bus bandwidth at the gradients' size and below it, with the
   orders of magnitude a working fabric gives;
3. fit: the configured microbatch for STEPS_PER_TRY steps on random tokens; if it runs
   out of memory, the -f search and the split it suggests for the configured global batch;
4. speed: --steps real optimizer steps on the dataset, without and with `compile`
   (--compile), after --warmup-steps untimed ones; then one validation pass, one HellaSwag
   evaluation (when the run has them) and one checkpoint save, into a temporary directory;
5. projection: the run's wall-clock time, GPU-hours and cost, as configured and with the
   recommended settings.

Rank 0 prints the report (markdown), and writes --json, --markdown and --chart (the step
times) where they are given. The run directory's checkpoints, metrics and train.json are
not touched: the checkpoint save goes into a hidden temporary directory in the run
directory (the same disk), removed afterwards.
"""

import gc
import os
import shutil
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import click
import torch
import torch.distributed as dist

import charts
import checkpointing
import hellaswag_scoring
import microbatch_search
import perf
import training
from batching import prefetch_to_device, rank_microbatch_indices
from checkpointing import size_text
from config import load_run, override_option, parse_overrides
from devices import machine_description, peak_memory, release, reset_peak_memory, synchronize
from distributed import check_connectivity, init_distributed, run_and_share_errors, share_from_main
from errors import UserError, report_user_errors
from jsonfiles import strict_json
from metrics import peak_flops_for
from training_setup import set_up_training

# Bus bandwidth (nccl-tests' busbw: what each GPU's links carry) that all-reduces of tens
# of MB and up reach on working hardware, as orders of magnitude.
EXPECTED_BUS_BANDWIDTH = (
    ("NVLink/NVSwitch (A100/H100/B200 SXM, one node)", "100-500 GB/s"),
    ("PCIe, no NVLink (one node)", "5-25 GB/s"),
    ("InfiniBand/RoCE between nodes", "10-50 GB/s"),
    ("TCP over Ethernet between nodes", "1-10 GB/s"),
    ("gloo on one CPU host (tests)", "0.1-5 GB/s"),
)
ALL_REDUCE_SIZE_FRACTIONS = (1 / 64, 1 / 8, 1)  # of the gradients' bytes
ALL_REDUCE_REPEATS = 5


# ---------------------------------------------------------------- machine

def gpu_description(ctx):
    """This rank's device, for the report."""
    entry = {"rank": ctx.rank, "host": socket.gethostname(), "device": str(ctx.device)}
    if ctx.device.type != "cuda":
        return {**entry, "name": machine_description(ctx.device)}
    properties = torch.cuda.get_device_properties(ctx.device)
    return {**entry, "name": properties.name, "memory_gib": round(properties.total_memory / 2**30, 1),
            "compute_capability": f"{properties.major}.{properties.minor}",
            "bf16": torch.cuda.is_bf16_supported()}


def machine_report(ctx):
    ranks = [None] * ctx.world_size
    dist.all_gather_object(ranks, gpu_description(ctx))
    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
            "cpu_count": os.cpu_count(), "nodes": ctx.world_size // ctx.local_world_size, "ranks": ranks}


def directory_size(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def disk_report(run, dataset_dir, checkpoint_bytes, checkpoints_written):
    """Free space where the run writes, against what it writes: every checkpoint, or
    keep_last_checkpoints of them plus `best`."""
    keep = run.train.keep_last_checkpoints
    kept = checkpoints_written if keep is None else min(checkpoints_written, keep + 1)
    needed = kept * checkpoint_bytes
    free = shutil.disk_usage(run.run_dir).free
    return {"run_dir": str(run.run_dir), "run_dir_free_bytes": free, "checkpoint_bytes": checkpoint_bytes,
            "checkpoints_kept": kept, "checkpoints_need_bytes": needed, "enough": free >= needed,
            "dataset_dir": str(dataset_dir), "dataset_bytes": directory_size(dataset_dir),
            "dataset_dir_free_bytes": shutil.disk_usage(dataset_dir).free}


# ---------------------------------------------------------------- interconnect

def time_all_reduce(ctx, numel, group=None):
    """Seconds per all-reduce of `numel` fp32 values, the slowest rank's."""
    tensor = torch.ones(numel, device=ctx.device)
    dist.all_reduce(tensor, group=group)  # warm-up: connections, buffers
    synchronize(ctx.device)
    start = time.perf_counter()
    for _ in range(ALL_REDUCE_REPEATS):
        dist.all_reduce(tensor, group=group)
    synchronize(ctx.device)
    elapsed = torch.tensor([(time.perf_counter() - start) / ALL_REDUCE_REPEATS], device=ctx.device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
    return elapsed.item()


def bandwidth_rows(ctx, gradient_bytes, group_size, group=None):
    rows = []
    for fraction in ALL_REDUCE_SIZE_FRACTIONS:
        numel = max(1, int(gradient_bytes * fraction) // 4)
        seconds = time_all_reduce(ctx, numel, group)
        algorithm_bandwidth = numel * 4 / seconds
        # nccl-tests' bus bandwidth: a ring all-reduce moves 2(n-1)/n of the data over each link.
        rows.append({"bytes": numel * 4, "seconds": seconds, "algbw_gb_per_s": algorithm_bandwidth / 1e9,
                     "busbw_gb_per_s": algorithm_bandwidth * 2 * (group_size - 1) / group_size / 1e9})
    return rows


def interconnect_report(ctx, gradient_bytes):
    """All-reduce bandwidth across all ranks, and within each node when there are several."""
    if ctx.world_size == 1:
        return {"all_ranks": None, "within_node": None, "expected": dict(EXPECTED_BUS_BANDWIDTH)}
    report = {"all_ranks": bandwidth_rows(ctx, gradient_bytes, ctx.world_size), "within_node": None,
              "expected": dict(EXPECTED_BUS_BANDWIDTH)}
    if ctx.local_world_size > 1 and ctx.world_size > ctx.local_world_size:
        node_group, _ = dist.new_subgroups(group_size=ctx.local_world_size)
        report["within_node"] = bandwidth_rows(ctx, gradient_bytes, ctx.local_world_size, node_group)
    return report


# ---------------------------------------------------------------- fit

def fit_report(run, ctx):
    """The configured microbatch, tried; if it runs out of memory, the -f search and the
    split it suggests for the configured global batch. Returns (report, the train config to
    measure: the configured one, or the suggested split)."""
    fits = microbatch_search.microbatch_trial(run, ctx)
    configured = run.train.microbatch_size
    peak = fits(configured)
    report = {"microbatch_size": configured, "fits": peak is not None, "peak_memory_bytes": peak,
              "searched": False}
    if peak is None:
        # Searched only after the configured size failed: sizes from there up fail too, so it ends.
        largest, peak = microbatch_search.largest_microbatch(run, ctx, fits)
        sequences = microbatch_search.fixed_sequences_per_rank(run, ctx)
        target = None if sequences is not None else ctx.world_size * configured * run.train.gradient_accumulation_steps
        keys, suggestion = microbatch_search.batch_suggestion(run, ctx, largest, sequences, target)
        report |= {"searched": True, "largest_microbatch": largest, "largest_peak_memory_bytes": peak,
                   "suggested": keys, "suggestion": suggestion}
    del fits
    release(ctx.device)
    measured = replace(run.train, **report.get("suggested", {}))
    return report, measured


# ---------------------------------------------------------------- speed

class TimedBatches:
    """An iterator of microbatches that adds up the time spent waiting for them."""

    def __init__(self, batches):
        self.batches = batches
        self.wait_s = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        batch = next(self.batches)
        self.wait_s += time.perf_counter() - start
        return batch


@dataclass
class Speed:
    compile: bool
    setup_s: float  # set_up_training: model, data, wrapping
    warmup_s: float  # the untimed first steps together (compiling, allocation)
    step_times_s: list  # each timed step, the slowest rank's
    data_wait_s: list  # each timed step's wait for its microbatches, the slowest rank's
    peak_memory_bytes: int  # the fullest device's (CPU: peak RSS of the fullest process)
    tokens_per_step: int
    step_rows: list = field(default_factory=list)  # each timed step's loss, gradient norm and learning rate

    @property
    def step_mean_s(self):
        return statistics.fmean(self.step_times_s)

    @property
    def step_p50_s(self):
        return statistics.median(self.step_times_s)

    def summary(self, world_size, flops_per_token, peak_flops):
        per_gpu = self.tokens_per_step / world_size / self.step_p50_s
        utilisation = perf.mfu(per_gpu, flops_per_token, peak_flops)
        return {"compile": self.compile, "setup_s": self.setup_s, "warmup_s": self.warmup_s,
                "step_mean_s": self.step_mean_s, "step_p50_s": self.step_p50_s,
                "tokens_per_sec_per_gpu": per_gpu, "mfu": utilisation,
                "peak_memory_bytes": self.peak_memory_bytes,
                "data_wait_per_step_s": statistics.fmean(self.data_wait_s), "step_times_s": self.step_times_s}


def slowest_rank(ctx, values):
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def train_steps(setup, run, ctx, batches, count):
    """`count` optimizer steps on `batches`, as the training loop takes them: (each step's
    seconds, each step's wait for its microbatches, each step's learning rate and statistics
    on the device)."""
    seconds, waits, learning_rates, step_statistics = [], [], [], []
    for _ in range(count):
        synchronize(ctx.device)
        start, wait_before = time.perf_counter(), batches.wait_s
        learning_rates.append(setup.state.scheduler.get_last_lr()[0])
        step_statistics.append(training.train_step(setup, run, ctx, batches, stop_requested=False))
        setup.state.scheduler.step()
        synchronize(ctx.device)
        seconds.append(time.perf_counter() - start)
        waits.append(batches.wait_s - wait_before)
    return seconds, waits, learning_rates, step_statistics


def measure_speed(run, ctx, datasets_dir, steps, warmup_steps):
    """The run's own training set-up for warmup_steps + steps optimizer steps on the run's first
    microbatches (from the start again if the run has fewer steps). Returns (Speed, the TrainingSetup)."""
    start = time.perf_counter()
    setup, _ = set_up_training(run, ctx, datasets_dir, resume_dir=None)
    setup_s = time.perf_counter() - start
    data = setup.data
    indices = rank_microbatch_indices(0, warmup_steps + steps, data.gradient_accumulation_steps, ctx.world_size,
                                      ctx.rank)
    batches = TimedBatches(prefetch_to_device(data.train, (index % len(data.train) for index in indices),
                                              ctx.device))
    warmup_times, *_ = train_steps(setup, run, ctx, batches, warmup_steps)
    reset_peak_memory(ctx.device)
    seconds, waits, learning_rates, step_statistics = train_steps(setup, run, ctx, batches, steps)
    peak = slowest_rank(ctx, [float(peak_memory(ctx.device))])[0]
    timings = slowest_rank(ctx, [setup_s, sum(warmup_times)] + seconds + waits)
    # Rows as metrics.jsonl has them, for the charts the timed checkpoint save draws.
    step_rows = [{"step": step, "lr": lr, "loss": values[0], "grad_norm": values[1]}
                 for step, (lr, values) in enumerate(zip(learning_rates, torch.stack(step_statistics).tolist()))]
    speed = Speed(compile=run.train.compile, setup_s=timings[0], warmup_s=timings[1],
                  step_times_s=timings[2:2 + steps], data_wait_s=timings[2 + steps:],
                  peak_memory_bytes=int(peak), tokens_per_step=data.global_batch_tokens, step_rows=step_rows)
    return speed, setup


def timed(ctx, work):
    """Seconds `work()` takes on the slowest rank."""
    synchronize(ctx.device)
    start = time.perf_counter()
    work()
    synchronize(ctx.device)
    return slowest_rank(ctx, [time.perf_counter() - start])[0]


def evaluation_times(run, ctx, setup, scratch_dir):
    """One validation pass, one HellaSwag evaluation (when the run has them) and one
    checkpoint save with its charts, as the training loop does them."""
    model, autocast_dtype = setup.state.model, setup.parallel.autocast_dtype
    times = {"validation_s": None, "hellaswag_s": None}
    if setup.data.validation is not None:
        times["validation_s"] = timed(ctx, lambda: training.validation_losses(model, setup.data.validation, ctx,
                                                                               autocast_dtype))
    if setup.hellaswag is not None:
        times["hellaswag_s"] = timed(ctx, lambda: hellaswag_scoring.distributed_scores(model, setup.hellaswag,
                                                                                        autocast_dtype))
    scratch_run = replace(run, run_dir=scratch_dir)

    def save():
        meta = {"global_step": 0, "preflight": True, "model_config": run.model.to_dict()}
        write = checkpointing.write_checkpoint(scratch_run.checkpoints_dir, run.train, ctx, setup.state, meta,
                                               is_best=False)
        total_steps = setup.data.total_steps
        run_and_share_errors(ctx.is_main, lambda: (write(), charts.draw_run_charts(scratch_run, total_steps)))

    times["checkpoint_save_s"] = timed(ctx, save)
    times["checkpoint_bytes"] = setup.state.size_estimate(
        full_weights_too=setup.state.sharded and run.train.consolidated_weights)
    return times


def write_scratch_metrics(scratch_dir, speed):
    """metrics.jsonl for the timed steps, so that the timed save draws charts as a run's does."""
    (scratch_dir / "metrics.jsonl").write_text("".join(strict_json(row) + "\n" for row in speed.step_rows))


# ---------------------------------------------------------------- projection

def scheduled_counts(run, total_steps, validates, scores_hellaswag):
    """How many validations, HellaSwag evaluations and checkpoints the whole run does."""
    counts = {"validations": 0, "hellaswag_evaluations": 0, "checkpoints": 0}
    for global_step in range(total_steps):
        work = training.work_after_step(global_step, total_steps, run.train, validates, scores_hellaswag)
        counts["validations"] += work.validation
        counts["hellaswag_evaluations"] += work.hellaswag
        counts["checkpoints"] += work.save_checkpoint
    return counts


def project(speed, total_steps, counts, evaluation, world_size, price_per_gpu_hour):
    """The run's wall-clock time: set-up, the warm-up's extra time over ordinary steps
    (compiling), every step at the measured mean, and every evaluation and checkpoint."""
    warmup_extra_s = max(0.0, speed["warmup_s"] - speed["warmup_steps"] * speed["step_mean_s"])
    steps_s = total_steps * speed["step_mean_s"]
    evaluations_s = (counts["validations"] * (evaluation["validation_s"] or 0)
                     + counts["hellaswag_evaluations"] * (evaluation["hellaswag_s"] or 0))
    checkpoints_s = counts["checkpoints"] * evaluation["checkpoint_save_s"]
    eta_s = speed["setup_s"] + warmup_extra_s + steps_s + evaluations_s + checkpoints_s
    gpu_hours = eta_s / 3600 * world_size
    return {"compile": speed["compile"], "total_steps": total_steps, "setup_s": speed["setup_s"],
            "warmup_extra_s": warmup_extra_s, "steps_s": steps_s, "evaluations_s": evaluations_s,
            "checkpoints_s": checkpoints_s, "eta_s": eta_s, "gpu_hours": gpu_hours,
            "cost": None if price_per_gpu_hour is None else gpu_hours * price_per_gpu_hour}


def project_settings(run, fit, summaries, fastest, split, total_steps, counts, evaluation, world_size,
                     price_per_gpu_hour):
    """{"configured": ..., "recommended": ...}: each a projection, or why there is none."""
    def projection(summary):
        return {**project(summary, total_steps, counts, evaluation, world_size, price_per_gpu_hour), **split}

    configured = next((summary for summary in summaries if summary["compile"] == run.train.compile), None)
    if not fit["fits"]:
        configured_projection = {"unavailable": "the configured microbatch does not fit"}
    elif configured is None:
        configured_projection = {"unavailable": f"compile {'on' if run.train.compile else 'off'} was not measured "
                                                "(--compile)"}
    else:
        configured_projection = projection(configured)
    return {"configured": configured_projection, "recommended": projection(fastest)}


# ---------------------------------------------------------------- report

def hours_text(seconds):
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def memory_text(size_bytes):
    return "n/a (CPU)" if not size_bytes else size_text(size_bytes)


def markdown_report(report):
    machine, run = report["machine"], report["run"]
    devices = sorted({rank["name"] for rank in machine["ranks"]})
    lines = [f"# Preflight: {run['name']}", "",
             f"{run['world_size']} rank(s) on {machine['nodes']} node(s): {', '.join(devices)}; "
             f"torch {machine['torch']}, CUDA {machine['cuda']}, NCCL {machine['nccl']}, "
             f"{machine['cpu_count']} CPUs per node", "",
             f"{run['parameters']:,} parameters, parallelism {run['parallelism']}, precision {run['precision']}, "
             f"{run['total_steps']:,} optimizer steps of {run['global_batch_tokens']:,} tokens", ""]
    disk = report["disk"]
    lines += ["## Disk", "",
              f"- run directory: {size_text(disk['run_dir_free_bytes'])} free; the run keeps "
              f"{disk['checkpoints_kept']} checkpoint(s) of {size_text(disk['checkpoint_bytes'])} = "
              f"{size_text(disk['checkpoints_need_bytes'])}: "
              + ("enough" if disk["enough"] else "**NOT ENOUGH**"),
              f"- dataset: {size_text(disk['dataset_bytes'])} in {disk['dataset_dir']} "
              f"({size_text(disk['dataset_dir_free_bytes'])} free there)", ""]
    lines += ["## Interconnect (all-reduce, fp32)", ""]
    interconnect = report["interconnect"]
    if interconnect["all_ranks"] is None:
        lines += ["One rank: nothing to measure.", ""]
    for scope in ("all_ranks", "within_node"):
        if interconnect[scope]:
            lines += [f"{scope.replace('_', ' ')}:", "", "| size | time | algbw | busbw |", "| --- | --- | --- | --- |"]
            lines += [f"| {row['bytes'] / 2**20:,.1f} MiB | {row['seconds'] * 1e3:.2f} ms | "
                      f"{row['algbw_gb_per_s']:.2f} GB/s | {row['busbw_gb_per_s']:.2f} GB/s |"
                      for row in interconnect[scope]]
            lines.append("")
    lines += ["Expected bus bandwidth: " + "; ".join(f"{name}: {value}"
                                                     for name, value in interconnect["expected"].items()), ""]
    fit = report["fit"]
    lines += ["## Fit", ""]
    if fit["fits"]:
        lines += [f"The configured microbatch ({fit['microbatch_size']}) fits; peak memory "
                  f"{memory_text(fit['peak_memory_bytes'])} on the fullest device.", ""]
    else:
        lines += [f"The configured microbatch ({fit['microbatch_size']}) does **not** fit. Largest that fits: "
                  f"{fit['largest_microbatch']} (peak {memory_text(fit['largest_peak_memory_bytes'])}). "
                  f"{fit['suggestion']}", ""]
    lines += ["## Speed", "", f"{report['steps']} timed optimizer steps after {report['warmup_steps']} warm-up "
              "step(s), on the run's data; times are the slowest rank's.", "",
              "| compile | tokens/s per GPU | step mean | step p50 | MFU | peak memory | data wait per step "
              "| set-up | warm-up |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for speed in report["speed"]:
        mfu_text = "n/a" if speed["mfu"] is None else f"{speed['mfu']:.1%}"
        lines.append(f"| {'on' if speed['compile'] else 'off'} | {speed['tokens_per_sec_per_gpu']:,.0f} | "
                     f"{speed['step_mean_s']:.3f} s | {speed['step_p50_s']:.3f} s | {mfu_text} | "
                     f"{memory_text(speed['peak_memory_bytes'])} | {speed['data_wait_per_step_s'] * 1e3:.1f} ms | "
                     f"{speed['setup_s']:.1f} s | {speed['warmup_s']:.1f} s |")
    evaluation = report["evaluation"]
    lines += ["", "Peak memory: torch.cuda.max_memory_allocated on a GPU, the process's peak resident set on a CPU."]
    lines += ["", "One validation pass: " + (f"{evaluation['validation_s']:.2f} s" if evaluation["validation_s"]
                                             is not None else "none configured")
              + "; one HellaSwag evaluation: " + (f"{evaluation['hellaswag_s']:.2f} s" if evaluation["hellaswag_s"]
                                                  is not None else "none configured")
              + f"; one checkpoint save (with charts): {evaluation['checkpoint_save_s']:.2f} s.", ""]
    counts = report["counts"]
    lines += ["## Projection", "",
              f"{counts['validations']:,} validation passes, {counts['hellaswag_evaluations']:,} HellaSwag "
              f"evaluations, {counts['checkpoints']:,} checkpoints over the run.", "",
              "| settings | compile | microbatch x accumulation | run time | GPU-hours | cost |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name in ("configured", "recommended"):
        projection = report["projection"][name]
        if "unavailable" in projection:
            lines.append(f"| {name} | | | {projection['unavailable']} | | |")
            continue
        cost = "n/a (no --price-per-gpu-hour)" if projection["cost"] is None else f"{projection['cost']:,.2f}"
        lines.append(f"| {name} | {'on' if projection['compile'] else 'off'} | "
                     f"{projection['microbatch_size']} x {projection['gradient_accumulation_steps']} | "
                     f"{hours_text(projection['eta_s'])} | {projection['gpu_hours']:,.2f} | {cost} |")
    recommended = report["recommended"]
    lines += ["", f"Recommended: compile {'on' if recommended['compile'] else 'off'}, microbatch_size "
              f"{recommended['microbatch_size']}, gradient_accumulation_steps "
              f"{recommended['gradient_accumulation_steps']}. Run time excludes the interpreter's start "
              "(importing torch) and any dataset download.", ""]
    return "\n".join(lines)


def draw_step_times(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from chart_style import chart_style

    with chart_style():
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for speed in report["speed"]:
            times = speed["step_times_s"]
            ax.plot(range(1, len(times) + 1), times, marker="o", label=f"compile {'on' if speed['compile'] else 'off'}")
        ax.set_xlabel("timed optimizer step")
        ax.set_ylabel("step time (s), slowest rank")
        ax.set_ylim(bottom=0)
        ax.set_title(f"Preflight step times: {report['run']['name']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def write_outputs(report, json_path, markdown_path, chart_path):
    text = markdown_report(report)
    print(text)
    if json_path:
        Path(json_path).write_text(strict_json(report, indent=2) + "\n")
    if markdown_path:
        chart_link = f"\n![step times]({Path(chart_path).name})\n" if chart_path else ""
        Path(markdown_path).write_text(text + "\n" + chart_link)
    if chart_path:
        draw_step_times(report, chart_path)
    written = [str(path) for path in (json_path, markdown_path, chart_path) if path]
    if written:
        print(f"Wrote {', '.join(written)}")


def check_output_paths(*paths):
    for path in paths:
        if path and not Path(path).resolve().parent.is_dir():
            raise UserError(f"{path}: its directory does not exist")


# ---------------------------------------------------------------- the command

def preflight(run, ctx, datasets_dir, steps, warmup_steps, compile_modes, price_per_gpu_hour, scratch_dir):
    """Every measurement, on every rank (the same collective calls in the same order);
    returns the report."""
    parameters = perf.parameter_count(run.model)
    machine = machine_report(ctx)
    interconnect = interconnect_report(ctx, gradient_bytes=4 * parameters)
    fit, measured_train = fit_report(run, ctx)
    speeds, evaluation, data = [], None, None
    for compile_model in compile_modes:
        variant = replace(run, train=replace(measured_train, compile=compile_model))
        speed, setup = measure_speed(variant, ctx, datasets_dir, steps, warmup_steps)
        if evaluation is None:
            data = setup.data
            run_and_share_errors(ctx.is_main, lambda: write_scratch_metrics(scratch_dir, speed))
            evaluation = evaluation_times(run, ctx, setup, scratch_dir)
        speeds.append(speed)
        del setup
        release(ctx.device)
        if compile_model:
            torch._dynamo.reset()  # the compiled graphs hold the model alive
    dataset_dir = Path(data.train.path).parent
    counts = scheduled_counts(run, data.total_steps, data.validation is not None,
                              run.train.hellaswag_interval is not None)
    amp_dtype = training.amp_dtype_for(run.train, ctx.device)
    precision = str(amp_dtype).removeprefix("torch.") if amp_dtype else "fp32"
    peak_flops = peak_flops_for(run.train, ctx.device, amp_dtype)
    flops_per_token = perf.training_flops_per_token(run.model)
    summaries = [{**speed.summary(ctx.world_size, flops_per_token, peak_flops), "warmup_steps": warmup_steps}
                 for speed in speeds]

    split = {"microbatch_size": measured_train.microbatch_size,
             "gradient_accumulation_steps": data.gradient_accumulation_steps}
    fastest = min(summaries, key=lambda summary: summary["step_p50_s"])
    projections = project_settings(run, fit, summaries, fastest, split, data.total_steps, counts, evaluation,
                                   ctx.world_size, price_per_gpu_hour)
    return {
        "run": {"name": run.name, "world_size": ctx.world_size, "parallelism": run.train.parallelism,
                "precision": precision, "parameters": parameters, "total_steps": data.total_steps,
                "global_batch_tokens": data.global_batch_tokens, "flops_per_token": flops_per_token,
                "peak_flops_per_gpu": peak_flops},
        "machine": machine,
        "disk": disk_report(run, dataset_dir, evaluation["checkpoint_bytes"], counts["checkpoints"]),
        "interconnect": interconnect, "fit": fit, "steps": steps, "warmup_steps": warmup_steps,
        "speed": summaries, "evaluation": evaluation, "counts": counts,
        "recommended": {"compile": fastest["compile"], **split},
        "projection": projections, "price_per_gpu_hour": price_per_gpu_hour,
    }


COMPILE_MODES = {"both": (False, True), "off": (False,), "on": (True,)}


@click.command(epilog="""\b
Example (8 GPUs on one machine):
  uv run torchrun --nproc_per_node=8 preflight.py 8xh100m80 datasets --price-per-gpu-hour 2.99 \\
      --markdown preflight.md --chart preflight.png""")
@click.argument("run")
@click.argument("datasets_dir", type=click.Path(file_okay=False))
@click.option("--steps", default=30, show_default=True, type=click.IntRange(min=1),
              help="Timed optimizer steps for each compile setting.")
@click.option("--warmup-steps", default=3, show_default=True, type=click.IntRange(min=1),
              help="Untimed optimizer steps first (compiling, allocation).")
@click.option("--compile", "compile_choice", type=click.Choice(list(COMPILE_MODES)), default="both",
              show_default=True, help="Measure without torch.compile, with it, or both.")
@click.option("--price-per-gpu-hour", type=click.FloatRange(min=0), default=None,
              help="What one GPU-hour costs, for the projected cost.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None,
              help="Write the report as markdown (for pasting into an issue).")
@click.option("--chart", "chart_path", type=click.Path(dir_okay=False), default=None,
              help="Also draw the step-time chart (PNG) to this path.")
@override_option
@report_user_errors
def main(run, datasets_dir, steps, warmup_steps, compile_choice, price_per_gpu_hour, json_path, markdown_path,
         chart_path, overrides):
    """Measure RUN (a name under runs/ or a run directory) on this machine with its datasets
    under DATASETS_DIR, and project its time and cost."""
    run = load_run(run, parse_overrides(overrides))
    ctx = init_distributed(run.train.dist_timeout_minutes)
    scratch_dir = None
    try:
        check_connectivity(ctx)
        # Where rank 0 will write, checked before the measurements (other nodes may not have the directory).
        run_and_share_errors(ctx.is_main, lambda: check_output_paths(json_path, markdown_path, chart_path))
        scratch_dir = Path(share_from_main(run_and_share_errors(
            ctx.is_main, lambda: tempfile.mkdtemp(prefix=".preflight-", dir=run.run_dir))))
        report = preflight(run, ctx, datasets_dir, steps, warmup_steps, COMPILE_MODES[compile_choice],
                           price_per_gpu_hour, scratch_dir)
        run_and_share_errors(ctx.is_main, lambda: write_outputs(report, json_path, markdown_path, chart_path))
    finally:
        if ctx.is_main and scratch_dir is not None:
            shutil.rmtree(scratch_dir, ignore_errors=True)
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
