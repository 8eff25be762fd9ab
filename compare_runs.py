"""Compare training runs: one chart of their loss and learning-rate curves, and a table.

    uv run compare_runs.py RUN RUN ... [--smooth 0.9] [--final-steps 50] [--out comparison]

RUN is a directory under runs/ or a path to a run directory. Writes PREFIX.png
(smoothed training loss by tokens seen, validation points, learning rate below),
PREFIX.md (also printed) and PREFIX.csv: per run the tokens seen, final and best
training loss, last validation loss, test loss (runs/<run>/test_loss.json, when
present), mean tokens/s, wall time, and the config keys whose values differ
between the runs.
"""

import csv
import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import click
import matplotlib
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

from chart_style import chart_style
from config import load_json, load_run
from errors import UserError, report_user_errors
from metrics import read_metrics

# Render PNGs without a display (cloud machines have none).
matplotlib.use("Agg")

METRICS_FILE = "metrics.jsonl"
TEST_LOSS_FILE = "test_loss.json"
# Keys every metrics row must have for the chart and table; others are ignored.
REQUIRED_METRIC_KEYS = ("step", "loss", "lr", "tokens", "tokens_per_sec", "elapsed_s")


@dataclass(frozen=True)
class RunData:
    label: str
    config: dict  # model.json and train.json keys, defaults filled in
    steps: list  # metrics rows, one per optimizer step, in step order
    test_loss: float | None

    @property
    def loss_rows(self):
        """The steps with a finite loss: the trainer logs a non-finite loss as null and skips the step."""
        return [row for row in self.steps if row["loss"] is not None]


# ---------------------------------------------------------------- reading runs

def read_steps(run_dir):
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found (the run has not logged a step yet)")
    steps = read_metrics(path)
    for number, row in enumerate(steps, 1):
        missing = [key for key in REQUIRED_METRIC_KEYS if key not in row]
        if missing:
            raise UserError(f"{path}: line {number} lacks {', '.join(missing)}")
    if not steps:
        raise UserError(f"{path}: no steps logged yet")
    return steps


def read_test_loss(run_dir):
    path = run_dir / TEST_LOSS_FILE
    if not path.is_file():
        return None
    result = load_json(path)
    if not isinstance(result, dict) or not isinstance(result.get("loss"), (int, float)):
        raise UserError(f"{path}: expected a JSON object with a numeric 'loss'")
    return float(result["loss"])


def read_run(run):
    loaded = load_run(run)
    run_data = RunData(
        label=loaded.name,
        config={**loaded.model.to_dict(), **dataclasses.asdict(loaded.train)},
        steps=read_steps(loaded.run_dir),
        test_loss=read_test_loss(loaded.run_dir),
    )
    if not run_data.loss_rows:
        raise UserError(f"{loaded.run_dir / METRICS_FILE}: no step has a finite loss")
    return run_data


# ---------------------------------------------------------------- numbers

def ema(values, weight):
    """Exponential moving average, started at the first value so early steps aren't pulled to 0."""
    smoothed, current = [], values[0]
    for value in values:
        current = weight * current + (1 - weight) * value
        smoothed.append(current)
    return smoothed


def validation_rows(run):
    return [row for row in run.steps if row.get("val_loss") is not None]


def summarize(run, smooth, final_steps):
    losses = [row["loss"] for row in run.loss_rows]
    val_losses = [row["val_loss"] for row in validation_rows(run)]
    return {
        "run": run.label,
        "tokens": run.steps[-1]["tokens"],
        "final_loss": statistics.fmean(losses[-final_steps:]),
        "best_smoothed_loss": min(ema(losses, smooth)),
        "final_val_loss": val_losses[-1] if val_losses else None,
        "test_loss": run.test_loss,
        "mean_tokens_per_sec": statistics.fmean(row["tokens_per_sec"] for row in run.steps),
        "wall_time_s": run.steps[-1]["elapsed_s"],
    }


def differing_config_keys(runs):
    """Config keys whose values are not the same in every run, in config-file order."""
    return [key for key in runs[0].config if len({run.config[key] for run in runs}) > 1]


# ---------------------------------------------------------------- output

def format_tokens(count):
    for divisor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if count >= divisor:
            return f"{count / divisor:.3g}{suffix}"
    return f"{count:g}"


def format_loss(value):
    return f"{value:.4f}"


def format_duration(seconds):
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def format_config_value(value):
    # Strings as written; numbers, booleans and null as in the JSON files.
    return value if isinstance(value, str) else json.dumps(value)


# (summary key, markdown header, markdown formatter); the CSV uses the keys and raw numbers.
TABLE_COLUMNS = (
    ("run", "run", str),
    ("tokens", "tokens", format_tokens),
    ("final_loss", "final loss", format_loss),
    ("best_smoothed_loss", "best smoothed loss", format_loss),
    ("final_val_loss", "final val loss", format_loss),
    ("test_loss", "test loss", format_loss),
    ("mean_tokens_per_sec", "tokens/s", "{:,.0f}".format),
    ("wall_time_s", "wall time", format_duration),
)


def markdown_table(runs, summaries, config_keys, smooth, final_steps):
    header = [title for _, title, _ in TABLE_COLUMNS] + ["config differences"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run, summary in zip(runs, summaries):
        cells = ["" if summary[key] is None else fmt(summary[key]) for key, _, fmt in TABLE_COLUMNS]
        cells.append(", ".join(f"{key}={format_config_value(run.config[key])}" for key in config_keys))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"final loss: mean training loss of the last {final_steps} steps; "
                  f"best smoothed loss: minimum of its moving average (EMA weight {smooth}); "
                  "tokens/s: mean of the logged tokens_per_sec; wall time: h:mm:ss including resumes."]
    return "\n".join(lines) + "\n"


def write_csv(path, runs, summaries, config_keys):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([key for key, _, _ in TABLE_COLUMNS] + config_keys)
        for run, summary in zip(runs, summaries):
            writer.writerow([summary[key] for key, _, _ in TABLE_COLUMNS]
                            + [format_config_value(run.config[key]) for key in config_keys])


def plot(runs, smooth, path):
    # Figures take their style when created, so create and save inside the style block.
    with chart_style():
        fig, (loss_ax, lr_ax) = plt.subplots(2, 1, sharex=True, figsize=(11, 8), height_ratios=(3, 1))
        for index, run in enumerate(runs):
            color = f"C{index}"
            tokens = [row["tokens"] for row in run.loss_rows]
            losses = [row["loss"] for row in run.loss_rows]
            loss_ax.plot(tokens, losses, color=color, alpha=0.15, linewidth=0.8)
            loss_ax.plot(tokens, ema(losses, smooth), color=color, label=run.label)
            val_rows = validation_rows(run)
            if val_rows:
                loss_ax.plot([row["tokens"] for row in val_rows], [row["val_loss"] for row in val_rows],
                             color=color, marker="o", linestyle="--", label=f"{run.label} (validation)")
            lr_ax.plot([row["tokens"] for row in run.steps], [row["lr"] for row in run.steps], color=color)
        loss_ax.set_ylabel(f"loss (EMA {smooth})")
        loss_ax.legend()
        lr_ax.set_ylabel("learning rate")
        lr_ax.set_xlabel("tokens seen")
        lr_ax.xaxis.set_major_formatter(FuncFormatter(lambda tokens, _: format_tokens(tokens)))
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


@click.command(epilog="""\b
Example:
  uv run compare_runs.py my-run my-other-run --out comparison""")
@click.argument("runs", nargs=-1, required=True)
@click.option("--smooth", type=click.FloatRange(0, 1, max_open=True), default=0.9, show_default=True,
              help="EMA weight for the loss curves and the best loss (0 = unsmoothed).")
@click.option("--final-steps", type=click.IntRange(min=1), default=50, show_default=True,
              help="Final loss = mean training loss over this many last steps.")
@click.option("--out", "prefix", default="comparison", show_default=True,
              help="Output path prefix: writes PREFIX.png, PREFIX.md and PREFIX.csv.")
@report_user_errors
def main(runs, smooth, final_steps, prefix):
    """Overlay the loss and learning-rate curves of RUN... and tabulate their results."""
    run_data = [read_run(run) for run in runs]
    summaries = [summarize(run, smooth, final_steps) for run in run_data]
    config_keys = differing_config_keys(run_data)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    table = markdown_table(run_data, summaries, config_keys, smooth, final_steps)
    Path(f"{prefix}.md").write_text(table)
    write_csv(f"{prefix}.csv", run_data, summaries, config_keys)
    plot(run_data, smooth, f"{prefix}.png")
    click.echo(table, nl=False)
    click.echo(f"wrote {prefix}.png, {prefix}.md, {prefix}.csv", err=True)


if __name__ == "__main__":
    main()
