"""Measure a training recipe against a tuned baseline, budget-matched, with the real trainer.

    uv run bench_recipe.py [DATASETS_DIR] [--run demo] [--configs baseline,muon,...]
        [--define 'NAME:key=value,...'] [--budget TOKENS] [--budget-fractions 0.25,0.3333,0.5,1]
        [--seeds 3] [--baseline-learning-rates 1.5e-3,3e-3,6e-3] [--work-dir DIR] [--threads N]
        [--json PATH] [--markdown PATH] [--chart PATH]

It trains the base run's model (runs/demo by default) with each configuration, each budget
with its own complete learning-rate schedule, for each seed, by calling ddp_train.py's own
`train` in this process (a world of one), so every number is one ddp_train.py produces.

- A seed sets `random_seed` and the data order: the base dataset's train split permuted in
  blocks of one microbatch by numpy.random.default_rng(seed); the validation split is the same.
- The baseline (the base run as it is) trains at the full budget B with each of
  --baseline-learning-rates; the rate with the lowest mean final validation loss is the
  baseline, and the other configurations' AdamW use it too.
- Every other configuration trains at each fraction of B. Its crossing is the budget at which
  its mean-over-seeds final validation loss equals the baseline's, linear in log(tokens)
  between the two budgets around it; ratio = baseline tokens / crossing. Where the seeds'
  min-max ranges of final loss at B overlap the baseline's, the table says "no difference".
"""

import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import click
import matplotlib
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import ddp_train  # noqa: E402
import token_data  # noqa: E402
from batching import gradient_accumulation_for  # noqa: E402
from chart_style import chart_style  # noqa: E402
from config import (TOKEN_BUDGET_KEYS, ModelConfig, TrainConfig, closest_or_all, load_json, load_run,  # noqa: E402
                    parse_key_values)
from distributed import init_distributed  # noqa: E402
from errors import UserError, report_user_errors  # noqa: E402
from jsonfiles import write_json_result  # noqa: E402

SWITCHES = {"qk_norm": True, "mlp": "relu2", "zero_init_projections": True, "logit_softcap": 30.0}
# The baseline is the reference's optimizer, whatever the base run uses (the demo trains with Muon).
ADAMW = {"optimizer": "adamw"}
# Newton-Schulz in float32: bfloat16 matmuls are ~30x slower than float32 ones on CPU.
MUON = {"optimizer": "muon", "muon_newton_schulz_dtype": "float32"}
CONFIGS = {"baseline": ADAMW, "adamw-switches": SWITCHES | ADAMW, "muon": MUON, "muon-switches": SWITCHES | MUON}
BASELINE = "baseline"
# Keys the bench sets for every run: a configuration may not change them (the comparison is
# at the base run's data, batch and model shape).
BENCH_KEYS = ("dataset", "random_seed", "validation_interval", "validation_batches", "checkpoint_interval",
              "keep_last_checkpoints",
              "start_train_token", "microbatch_size", "gradient_accumulation_steps", "global_batch_tokens",
              "context_length", "vocab_size", *TOKEN_BUDGET_KEYS)
# Off in every bench run: they record elsewhere or evaluate beyond the validation loss.
OFF_KEYS = {"tensorboard": False, "wandb_project": None, "hellaswag_interval": None, "core_interval": None}
VALIDATIONS_PER_RUN = 8
MODEL_KEYS = frozenset(f.name for f in dataclasses.fields(ModelConfig))


# ---------------------------------------------------------------- the measurement (pure)

@dataclasses.dataclass(frozen=True)
class Crossing:
    """Where a loss-vs-tokens curve reaches a target: `kind` is "crossed" (at `tokens`),
    "below at smallest" (already below at `tokens`, the smallest measured: a bound) or "not reached"."""
    kind: str
    tokens: float | None = None

    def ratio(self, baseline_tokens):
        return None if self.tokens is None else baseline_tokens / self.tokens

    def describe(self, baseline_tokens):
        if self.kind == "not reached":
            return "not reached"
        ratio = f"{self.ratio(baseline_tokens):.2f}x"
        return f">= {ratio}" if self.kind == "below at smallest" else ratio


def crossing(tokens, losses, target):
    """The first point where `losses` (at increasing `tokens`) reach `target`, interpolated
    linearly in log(tokens) between the two measurements around it; never extrapolated."""
    for index, (at, loss) in enumerate(zip(tokens, losses)):
        if loss <= target:
            if index == 0:
                return Crossing("below at smallest", at)
            before, loss_before = tokens[index - 1], losses[index - 1]
            fraction = (loss_before - target) / (loss_before - loss)
            return Crossing("crossed", math.exp(math.log(before) + fraction * (math.log(at) - math.log(before))))
    return Crossing("not reached")


def ranges_overlap(a, b):
    """Whether the min-max ranges of the values `a` and `b` overlap."""
    return max(min(a), min(b)) <= min(max(a), max(b))


def best_learning_rate(final_losses_by_lr):
    """The learning rate whose final losses (one per seed) have the lowest mean."""
    return min(final_losses_by_lr, key=lambda lr: statistics.fmean(final_losses_by_lr[lr]))


def spread(values):
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "min": min(values), "max": max(values)}


# ---------------------------------------------------------------- configurations

def parse_define(text):
    """--define 'NAME:key=value,key=value' as (name, {key: value}), each key a model.json or
    train.json key whose value is validated as in those files."""
    name, separator, body = text.partition(":")
    name = name.strip()
    if not separator or not name or not body.strip():
        raise UserError(f"--define {text}: expected NAME:key=value,key=value")
    if name in CONFIGS:
        raise UserError(f"--define {name}: '{name}' is a built-in configuration; give yours another name")
    return name, parse_configuration([item.strip() for item in body.split(",")], option=f"--define {name}:")


def parse_configuration(items, option):
    """model.json and train.json KEY=VALUE items as one {key: value}; keys of neither, or that
    the bench sets itself, are refused."""
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    by_file = {ModelConfig: [], TrainConfig: []}
    for item in items:
        key = item.partition("=")[0].strip()
        if key in BENCH_KEYS:
            raise UserError(f"{option} key '{key}' is set by the bench for every run; a configuration may not "
                            "change it")
        if key not in MODEL_KEYS | train_keys:
            valid = sorted(MODEL_KEYS | train_keys)
            raise UserError(f"{option} unknown key '{key}'"
                            f"{closest_or_all(key, valid, 'model.json and train.json keys')}")
        by_file[ModelConfig if key in MODEL_KEYS else TrainConfig].append(item)
    return {key: value for cls, cls_items in by_file.items()
            for key, value in parse_key_values(cls_items, cls, option).items()}


def choose_configs(names, defines):
    """{name: overrides} of the baseline, the chosen built-in configurations and the --define ones."""
    configs = {}
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in CONFIGS:
            raise UserError(f"--configs: unknown configuration '{name}'{closest_or_all(name, list(CONFIGS), 'valid')}")
        configs[name] = CONFIGS[name]
    configs |= dict(parse_define(text) for text in defines)
    return {BASELINE: CONFIGS[BASELINE]} | {name: overrides for name, overrides in configs.items() if name != BASELINE}


@dataclasses.dataclass(frozen=True)
class Base:
    """The base run's configs (raw JSON, written into each bench run) and its data."""
    model: dict
    train: dict
    dataset_dir: Path
    tokens_per_step: int
    microbatch_tokens: int


def load_base(run_name, dataset, datasets_dir):
    run = load_run(run_name, {"dataset": dataset} if dataset else None)
    if run.train.is_mixture:
        raise UserError(f"{run.run_dir / 'train.json'}: key 'dataset' is a mixture; bench_recipe.py measures on "
                        "one dataset (give one with --dataset)")
    train_raw = load_json(run.run_dir / "train.json") | ({"dataset": dataset} if dataset else {})
    dataset_dir = token_data.fetch_dataset(run.train.dataset, datasets_dir, run.run_dir)
    microbatch_tokens = run.train.microbatch_size * run.model.context_length
    accumulation = gradient_accumulation_for(run.train, 1, run.model.context_length, run.run_dir / "train.json")
    return Base(load_json(run.run_dir / "model.json"), train_raw, dataset_dir, accumulation * microbatch_tokens,
                microbatch_tokens)


def run_configs(base, name, overrides, *, learning_rate, seed_dataset, seed, steps, validation_interval):
    """model.json and train.json of one bench run, validated exactly as the trainer will."""
    train = {key: value for key, value in base.train.items() if key not in TOKEN_BUDGET_KEYS}
    train |= OFF_KEYS | {"learning_rate": learning_rate, "dataset": str(seed_dataset), "random_seed": seed,
                         "min_train_tokens": steps * base.tokens_per_step, "start_train_token": 0,
                         "validation_interval": validation_interval, "checkpoint_interval": steps,
                         "keep_last_checkpoints": 1}
    model = base.model | {k: v for k, v in overrides.items() if k in MODEL_KEYS}
    train |= {k: v for k, v in overrides.items() if k not in model}
    ModelConfig.from_dict(model, source=f"configuration '{name}': model.json")
    TrainConfig.from_dict(train, source=f"configuration '{name}': train.json")
    return model, train


# ---------------------------------------------------------------- data

def write_seed_dataset(base_dir, seed_dir, block_tokens, seed):
    """`seed_dir`: the base train split's whole blocks of `block_tokens` in the order of
    numpy.random.default_rng(seed).permutation, the base validation split and meta.json as
    they are. Kept when one of the same seed and block size is there."""
    meta_path = Path(seed_dir) / "meta.json"
    marker = {"bench_seed": seed, "block_tokens": block_tokens, "base_dataset": str(base_dir)}
    if token_data.is_complete(seed_dir) and meta_path.is_file() and \
            {k: json.loads(meta_path.read_text()).get(k) for k in marker} == marker:
        return seed_dir
    tokens = token_data.open_split(base_dir, "train")
    num_blocks = len(tokens) // block_tokens
    blocks = tokens[:num_blocks * block_tokens].reshape(num_blocks, block_tokens)
    order = np.random.default_rng(seed).permutation(num_blocks)
    with token_data.staged_directory(seed_dir) as staging, \
            token_data.TokenFileWriter(staging / "train.safetensors", tokens.dtype) as train:
        for start in range(0, num_blocks, 1024):  # a few MB at a time out of the memory map
            train.write(blocks[order[start:start + 1024]].reshape(-1))
        train.commit()
        shutil.copyfile(Path(base_dir) / "validation.safetensors", staging / "validation.safetensors")
        meta = dataclasses.asdict(token_data.read_meta(base_dir)) | marker
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return seed_dir


# ---------------------------------------------------------------- training

def validation_curve(metrics_path):
    """[(tokens, val_loss)] of a run's validated steps, and the last step logged."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()] \
        if Path(metrics_path).is_file() else []
    curve = [(row["tokens"], row["val_loss"]) for row in rows if row.get("val_loss") is not None]
    return curve, rows[-1]["step"] if rows else None


def train_run(run_dir, datasets_dir):
    """ddp_train.py's training of `run_dir`, a world of one in this process, printing nothing
    and drawing no charts."""
    run = load_run(run_dir)
    ctx = init_distributed(run.train.dist_timeout_minutes)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            ddp_train.train(run, ctx, datasets_dir, None, quiet=True, summary_out=devnull, draw_charts=False)
    finally:
        gc.collect()  # as ddp_train.main: DDP's reference cycles hold the process group
        dist.destroy_process_group()


def finished_curve(spec):
    """The validation curve of `spec`'s run when its directory holds that very run (the same
    configs) validated at its last step, else None."""
    run_dir = Path(spec["run_dir"])
    if not all((run_dir / f"{name}.json").is_file() and json.loads((run_dir / f"{name}.json").read_text()) == spec[name]
               for name in ("model", "train")):
        return None
    curve, last_step = validation_curve(run_dir / "metrics.jsonl")
    return curve if last_step == spec["steps"] - 1 and curve and curve[-1][0] == spec["tokens"] else None


def bench_run(spec, datasets_dir):
    """Train one run (unless its directory already holds it, finished) and return its record."""
    run_dir = Path(spec["run_dir"])
    curve = finished_curve(spec)
    if curve is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        for name in ("model", "train"):
            (run_dir / f"{name}.json").write_text(json.dumps(spec[name], indent=2) + "\n")
        train_run(run_dir, datasets_dir)
        curve = finished_curve(spec)
    if curve is None:
        raise UserError(f"{run_dir}: the run ended without a finite validation loss at its last step")
    record = {k: v for k, v in spec.items() if k not in ("model", "train")}
    return record | {"final_val_loss": curve[-1][1], "curve": curve}


def plan_runs(base, configs, learning_rates, budget_steps, seeds, work_dir):
    """Specs of the learning-rate sweep's runs and a function giving every other configuration's
    runs once the baseline's learning rate is known."""
    full_steps = max(budget_steps)
    seed_datasets = {seed: work_dir / "data" / f"seed{seed}" for seed in seeds}

    def spec(name, overrides, lr, seed, steps):
        # The budget-B runs' curves are drawn; the shorter runs' final losses are what counts, and a
        # validation costs as much as tens of training steps at the demo's shape.
        validation_interval = max(1, full_steps // VALIDATIONS_PER_RUN) if steps == full_steps else steps
        model, train = run_configs(base, name, overrides, learning_rate=lr, seed_dataset=seed_datasets[seed], seed=seed,
                                   steps=steps, validation_interval=validation_interval)
        run_dir = work_dir / "runs" / f"{name}-lr{lr:g}-{steps}steps-seed{seed}"
        return {"config": name, "learning_rate": train["learning_rate"], "seed": seed, "steps": steps,
                "tokens": steps * base.tokens_per_step, "run_dir": str(run_dir), "model": model, "train": train}

    sweep = [spec(BASELINE, configs[BASELINE], lr, seed, max(budget_steps)) for lr in learning_rates for seed in seeds]

    def configuration_runs(baseline_lr):
        return [spec(name, overrides, baseline_lr, seed, steps) for name, overrides in configs.items()
                if name != BASELINE for steps in budget_steps for seed in seeds]

    return sweep, configuration_runs, seed_datasets


# ---------------------------------------------------------------- summarising

def summarise(records, baseline_lr, baseline_tokens):
    """Per configuration: final loss at the full budget, and where its final loss meets the baseline's."""
    baseline = [r for r in records if r["config"] == BASELINE and r["learning_rate"] == baseline_lr]
    baseline_finals = [r["final_val_loss"] for r in baseline]
    target = statistics.fmean(baseline_finals)
    summary = {BASELINE: {"learning_rate": baseline_lr, "final_val_loss": spread(baseline_finals)}}
    for name in dict.fromkeys(r["config"] for r in records if r["config"] != BASELINE):
        runs = [r for r in records if r["config"] == name]
        budgets = sorted({r["tokens"] for r in runs})
        seeds = sorted({r["seed"] for r in runs})
        final = {(r["tokens"], r["seed"]): r["final_val_loss"] for r in runs}
        mean_by_budget = [statistics.fmean(final[b, s] for s in seeds) for b in budgets]
        at_full = [final[budgets[-1], s] for s in seeds]
        mean_cross = crossing(budgets, mean_by_budget, target)
        seed_crosses = [crossing(budgets, [final[b, s] for b in budgets], target) for s in seeds]
        curve_cross = crossing(*zip(*mean_curve([r for r in runs if r["tokens"] == budgets[-1]])), target)
        summary[name] = {
            "learning_rate": runs[0]["learning_rate"], "final_val_loss": spread(at_full),
            "final_val_loss_by_budget": dict(zip(budgets, mean_by_budget)),
            "crossing": dataclasses.asdict(mean_cross), "ratio": mean_cross.ratio(baseline_tokens),
            "seed_crossings": [dataclasses.asdict(c) for c in seed_crosses],
            "seed_ratios": [c.ratio(baseline_tokens) for c in seed_crosses],
            "no_difference": ranges_overlap(at_full, baseline_finals),
            "gap_at_full_budget": statistics.fmean(at_full) - target,
            "curve_crossing": dataclasses.asdict(curve_cross)}
    return summary


def mean_curve(runs):
    """(tokens, mean val_loss over the runs) of runs validated at the same steps."""
    curves = [r["curve"] for r in runs]
    return [(points[0][0], statistics.fmean(p[1] for p in points)) for points in zip(*curves)]


def ratio_cell(entry, baseline_tokens):
    """The table's ratio: the budget-matched one with the seeds' range, or "no difference"."""
    cross = Crossing(**entry["crossing"])
    if cross.kind == "not reached":
        text = f"not reached (gap {entry['gap_at_full_budget']:+.4f} at B)"
    else:
        seeds = [Crossing(**c) for c in entry["seed_crossings"]]
        crossed = [c.ratio(baseline_tokens) for c in seeds if c.kind != "not reached"]
        seed_range = f"{min(crossed):.2f}-{max(crossed):.2f}" if crossed else "-"
        unbounded = sum(c.kind == "not reached" for c in seeds)
        text = (f"{cross.describe(baseline_tokens)}, seeds {seed_range}"
                + (f" ({unbounded} not reached)" if unbounded else ""))
    return f"no difference ({text})" if entry["no_difference"] else text


def markdown_table(summary, baseline_tokens, sweep):
    lines = ["| configuration | learning_rate | final val loss at B: mean ± std [min-max] | tokens to baseline's "
             "final loss | ratio (budget-matched) | read off one curve |", "|---|---|---|---|---|---|"]
    for name, entry in summary.items():
        f = entry["final_val_loss"]
        loss = f"{f['mean']:.4f} ± {f['std']:.4f} [{f['min']:.4f}-{f['max']:.4f}]"
        if name == BASELINE:
            lines.append(f"| {name} | {entry['learning_rate']:g} | {loss} | {baseline_tokens:,} | 1 | |")
            continue
        cross, curve = Crossing(**entry["crossing"]), Crossing(**entry["curve_crossing"])
        tokens = f"{cross.tokens:,.0f}" if cross.tokens is not None else "-"
        lines.append(f"| {name} | {entry['learning_rate']:g} | {loss} | {tokens} | "
                     f"{ratio_cell(entry, baseline_tokens)} | {curve.describe(baseline_tokens)} |")
    lines += ["", "Baseline learning-rate sweep at B (final val loss over seeds):", "",
              "| learning_rate | mean | std | min | max |", "|---|---|---|---|---|"]
    lines += [f"| {lr:g} | {s['mean']:.4f} | {s['std']:.4f} | {s['min']:.4f} | {s['max']:.4f} |"
              for lr, s in sweep.items()]
    return "\n".join(lines)


def describe_setup(base, seeds, budget_tokens):
    model = base.model
    return [f"command: `{shlex.join(['uv', 'run', 'bench_recipe.py', *sys.argv[1:]])}`",
            f"model: {model['n_layers']} layers x {model['emb_dim']} wide, {model['n_heads']} heads, context "
            f"{model['context_length']}, vocab {model['vocab_size']}; dataset {base.dataset_dir}",
            f"validation: {base.train.get('validation_batches')} microbatches of {base.microbatch_tokens:,} tokens",
            f"tokens per step: {base.tokens_per_step:,}; budgets (tokens): "
            f"{', '.join(f'{b:,}' for b in budget_tokens)}; seeds: {', '.join(map(str, seeds))}",
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads"]


def draw_chart(path, records, summary):
    with chart_style():
        draw_panels(path, records, summary)


def draw_panels(path, records, summary):
    figure, (curves, finals) = plt.subplots(1, 2, figsize=(13, 5))
    full = max(r["tokens"] for r in records)
    for name, entry in summary.items():
        runs = [r for r in records if r["config"] == name and r["tokens"] == full
                and r["learning_rate"] == entry["learning_rate"]]
        tokens = [t for t, _ in runs[0]["curve"]]
        losses = np.array([[loss for _, loss in r["curve"]] for r in runs])
        line, = curves.plot(tokens, losses.mean(axis=0), label=name)
        curves.fill_between(tokens, losses.min(axis=0), losses.max(axis=0), color=line.get_color(), alpha=0.2)
        if name == BASELINE:
            finals.axhline(entry["final_val_loss"]["mean"], color=line.get_color(), linestyle="--",
                           label=f"{name} at B")
        else:
            by_budget = entry["final_val_loss_by_budget"]
            finals.plot(list(by_budget), list(by_budget.values()), marker="o", color=line.get_color(), label=name)
    # The first validation (after one step, near ln(vocab_size)) would squash the rest of the curves.
    later = [loss for r in records if r["tokens"] == full for _, loss in r["curve"][1:]]
    curves.set_ylim(min(later) - 0.05, max(later) + 0.05)
    curves.set(xlabel="tokens", ylabel="validation loss (from the second validation)",
               title="budget-B runs: mean over seeds, min-max band")
    finals.set(xscale="log", xlabel="token budget", ylabel="final validation loss",
               title="final validation loss vs budget (mean over seeds)")
    for axes in (curves, finals):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------- command line

def parse_numbers(text, option, kind=float):
    try:
        values = [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UserError(f"{option} {text}: expected comma-separated numbers")
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise UserError(f"{option} {text}: expected positive numbers")
    return values


def run_all(specs, datasets_dir, bar):
    records = []
    for spec in specs:
        record = bench_run(spec, datasets_dir)
        records.append(record)
        bar.update(record["tokens"])
        tqdm.write(f"{record['config']} lr {record['learning_rate']:g} seed {record['seed']} "
                   f"{record['tokens']:,} tokens: final val loss {record['final_val_loss']:.4f}")
    return records


@click.command(epilog="""\b
Example (the demo model on the demo corpus, two threads):
  uv run bench_recipe.py datasets --threads 2 --markdown bench.md --chart bench.png --json bench.json""")
@click.argument("datasets_dir", default="datasets", type=click.Path(file_okay=False, path_type=Path))
@click.option("--run", "run_name", default="demo", show_default=True,
              help="The base run (a name under runs/ or a run directory): its model.json and train.json.")
@click.option("--dataset", help="Train on this token dataset instead of the base run's (as train.json's `dataset`).")
@click.option("--configs", "config_names", default=",".join(CONFIGS), show_default=True,
              help=f"Built-in configurations to compare, comma-separated, of {', '.join(CONFIGS)} (the "
                   "baseline always runs; --define adds more).")
@click.option("--define", "defines", multiple=True, metavar="'NAME:key=value,...'",
              help="Add a configuration: model.json/train.json keys over the base run's (repeatable).")
@click.option("--budget", default=1048576, show_default=True, type=click.IntRange(min=1),
              help="The full budget B in tokens (rounded to whole optimizer steps).")
@click.option("--budget-fractions", default="0.25,0.3333,0.5,1", show_default=True,
              help="The budgets the configurations other than the baseline train at, as fractions of B.")
@click.option("--seeds", default=3, show_default=True, type=click.IntRange(min=1), help="Seeds 0..N-1.")
@click.option("--baseline-learning-rates", default="1.5e-3,3e-3,6e-3", show_default=True,
              help="The baseline's learning rates to try at B; the best is the baseline's.")
@click.option("--validation-batches", type=click.IntRange(min=1),
              help="Microbatches each validation scores (default: the base run's validation_batches); every "
                   "run validates on the same ones.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the runs here (default: a temporary directory); a rerun skips the finished ones.")
@click.option("--threads", type=click.IntRange(min=1), help="torch.set_num_threads (default: torch's).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write every result here.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the table and the set-up here.")
@click.option("--chart", "chart_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Draw validation loss vs tokens and final loss vs budget here (PNG).")
@report_user_errors
def main(datasets_dir, run_name, dataset, config_names, defines, budget, budget_fractions, seeds,
         baseline_learning_rates, validation_batches, work_dir, threads, json_path, markdown_path, chart_path):
    """Compare training configurations against a learning-rate-tuned baseline at matched token
    budgets, over seeds that vary the initialisation and the data order, with ddp_train.py's own
    training loop on this machine (CPU is enough: tokens and losses do not depend on it)."""
    if threads:
        torch.set_num_threads(threads)
    configs = choose_configs(config_names, defines)
    learning_rates = list(dict.fromkeys(parse_numbers(baseline_learning_rates, "--baseline-learning-rates")))
    base = load_base(run_name, dataset, datasets_dir)
    if validation_batches:
        base = dataclasses.replace(base, train=base.train | {"validation_batches": validation_batches})
    full_steps = max(1, round(budget / base.tokens_per_step))
    budget_steps = sorted({max(1, round(f * full_steps)) for f in parse_numbers(budget_fractions, "--budget-fractions")}
                          | {full_steps})
    seed_list = list(range(seeds))
    with contextlib.ExitStack() as stack:
        work = work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_recipe-")))
        sweep, configuration_runs, seed_datasets = plan_runs(base, configs, learning_rates, budget_steps, seed_list,
                                                             work.resolve())
        for seed, seed_dir in seed_datasets.items():
            write_seed_dataset(base.dataset_dir, seed_dir, base.microbatch_tokens, seed)
        # Every run's configs are validated now, before any training (any learning rate of the sweep will do).
        later = configuration_runs(learning_rates[0])
        total = sum(s["tokens"] for s in sweep + later)
        with tqdm(total=total, unit="tok", unit_scale=True, desc="bench", dynamic_ncols=True) as bar:
            sweep_records = run_all(sweep, datasets_dir, bar)
            finals_by_lr = {lr: [r["final_val_loss"] for r in sweep_records if r["learning_rate"] == lr]
                            for lr in learning_rates}
            baseline_lr = best_learning_rate(finals_by_lr)
            records = sweep_records + run_all(configuration_runs(baseline_lr), datasets_dir, bar)
    baseline_tokens = full_steps * base.tokens_per_step
    summary = summarise(records, baseline_lr, baseline_tokens)
    sweep_summary = {lr: spread(values) for lr, values in finals_by_lr.items()}
    table = markdown_table(summary, baseline_tokens, sweep_summary)
    click.echo(table)
    setup = describe_setup(base, seed_list, [steps * base.tokens_per_step for steps in budget_steps])
    if markdown_path:
        markdown_path.write_text("\n".join(f"- {line}" for line in setup) + "\n\n" + table + "\n")
    if json_path:
        write_json_result(json_path, {"setup": setup, "baseline_tokens": baseline_tokens,
                                      "baseline_learning_rate": baseline_lr,
                                      "learning_rate_sweep": {f"{lr:g}": s for lr, s in sweep_summary.items()},
                                      "summary": summary, "runs": records})
    if chart_path:
        draw_chart(chart_path, records, summary)


if __name__ == "__main__":
    main()
