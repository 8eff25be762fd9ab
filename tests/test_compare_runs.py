"""compare_runs.py on fake run directories with known metrics, and chart_style."""

import csv
import json
import statistics
import struct
import sys
from pathlib import Path

import matplotlib
import pytest
from matplotlib import font_manager

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))
import chart_style  # noqa: E402
from evalkit import run_cli  # noqa: E402

SCRIPT = PROJECT_DIR / "compare_runs.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMOOTH = 0.5
FINAL_STEPS = 10
METRIC_COLUMNS = ["run", "tokens", "final_loss", "best_smoothed_loss", "final_val_loss", "test_loss",
                  "mean_tokens_per_sec", "wall_time_s"]

MODEL = {"vocab_size": 257, "context_length": 64, "emb_dim": 32, "n_heads": 4, "n_layers": 2}
TRAIN = {"dataset": "demo", "microbatch_size": 4}

# Known per-step series.
BASE_LOSSES = [6.0 - 0.03 * step + 0.1 * (step % 3) for step in range(100)]
BASE_VAL = {49: 4.75, 99: 3.5}
WIDE_LOSSES = [5.5 - 0.02 * step + 0.2 * (step % 2) for step in range(60)]


def metrics_row(step, loss, tokens_per_step, val_loss=None):
    row = {"step": step, "loss": loss, "lr": 1e-4 * (step + 1), "grad_norm": 1.0, "clipped": False,
           "tokens": tokens_per_step * (step + 1), "tokens_per_sec": 1000.0 + 10 * step,
           "elapsed_s": 2.0 * (step + 1), "mfu": 0.3}  # mfu: a key the script must ignore
    if val_loss is not None:
        row["val_loss"] = val_loss
    return row


def write_run(root, name, model, train, metrics_lines=None, test_loss=None):
    run_dir = root / name
    run_dir.mkdir()
    (run_dir / "model.json").write_text(json.dumps(model))
    (run_dir / "train.json").write_text(json.dumps(train))
    if metrics_lines is not None:
        (run_dir / "metrics.jsonl").write_text("\n".join(metrics_lines) + "\n")
    if test_loss is not None:
        (run_dir / "test_loss.json").write_text(json.dumps({"loss": test_loss, "tokens": 12345}))
    return run_dir


def make_runs(root):
    base_lines = [json.dumps(metrics_row(step, BASE_LOSSES[step], 1024, BASE_VAL.get(step)))
                  for step in range(100)]
    write_run(root, "base", MODEL, TRAIN, base_lines, test_loss=3.25)

    wide_lines = [json.dumps(metrics_row(step, loss, 2048)) for step, loss in enumerate(WIDE_LOSSES)]
    wide_lines.append(json.dumps({**metrics_row(60, None, 2048), "skipped": True}))  # a non-finite step
    wide_lines.append('{"step": 61, "loss": 3.')  # killed mid-write
    write_run(root, "wide", {**MODEL, "emb_dim": 64}, {**TRAIN, "learning_rate": 0.001}, wide_lines)

    # Spells out two defaults: not a config difference from "base".
    same_as_base = [json.dumps(metrics_row(step, loss, 1024)) for step, loss in enumerate(BASE_LOSSES)]
    write_run(root, "explicit", {**MODEL, "drop_rate": 0.1}, {**TRAIN, "weight_decay": 0.1}, same_as_base)
    return [root / name for name in ("base", "wide", "explicit")]


def best_smoothed(losses, weight):
    """Minimum of the EMA started at the first value, from its closed form."""
    def smoothed_at(t):
        return weight ** t * losses[0] + (1 - weight) * sum(
            weight ** (t - k) * losses[k] for k in range(1, t + 1))
    return min(smoothed_at(t) for t in range(len(losses)))


def run_script(args, cwd):
    return run_cli(SCRIPT, args, cwd)


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    run_dirs = make_runs(root)
    result = run_script([*map(str, run_dirs), "--smooth", str(SMOOTH), "--final-steps", str(FINAL_STEPS)],
                        cwd=root)
    assert result.returncode == 0, result.stderr
    return root, result


def read_csv_rows(path):
    with open(path, newline="") as f:
        return {row["run"]: row for row in csv.DictReader(f)}


def test_writes_a_png_chart(comparison):
    root, _ = comparison
    data = (root / "comparison.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    width, height = struct.unpack(">II", data[16:24])  # IHDR: the first chunk after the signature
    assert width > 0 and height > 0


def test_table_numbers_match_the_metrics(comparison):
    root, _ = comparison
    rows = read_csv_rows(root / "comparison.csv")
    assert list(rows) == ["base", "wide", "explicit"]

    base = rows["base"]
    assert float(base["final_loss"]) == pytest.approx(statistics.fmean(BASE_LOSSES[-FINAL_STEPS:]))
    assert float(base["best_smoothed_loss"]) == pytest.approx(best_smoothed(BASE_LOSSES, SMOOTH))
    assert float(base["final_val_loss"]) == pytest.approx(BASE_VAL[99])
    assert float(base["test_loss"]) == pytest.approx(3.25)
    assert float(base["mean_tokens_per_sec"]) == pytest.approx(1000 + 10 * statistics.fmean(range(100)))
    assert float(base["wall_time_s"]) == pytest.approx(200.0)
    assert int(base["tokens"]) == 100 * 1024

    wide = rows["wide"]
    assert float(wide["final_loss"]) == pytest.approx(statistics.fmean(WIDE_LOSSES[-FINAL_STEPS:]))
    assert float(wide["best_smoothed_loss"]) == pytest.approx(best_smoothed(WIDE_LOSSES, SMOOTH))
    assert wide["final_val_loss"] == "" and wide["test_loss"] == ""
    # The skipped step 60 counts for speed, time and tokens, not for the loss.
    assert float(wide["mean_tokens_per_sec"]) == pytest.approx(1000 + 10 * statistics.fmean(range(61)))
    assert float(wide["wall_time_s"]) == pytest.approx(122.0)
    assert int(wide["tokens"]) == 61 * 2048


def test_config_differences_list_only_the_differing_keys(comparison):
    root, _ = comparison
    with open(root / "comparison.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == [*METRIC_COLUMNS, "emb_dim", "learning_rate"]
    rows = read_csv_rows(root / "comparison.csv")
    assert [(row["emb_dim"], row["learning_rate"]) for row in rows.values()] == [
        ("32", "0.0004"), ("64", "0.001"), ("32", "0.0004")]


def test_markdown_is_printed_and_written(comparison):
    root, result = comparison
    markdown = (root / "comparison.md").read_text()
    assert result.stdout == markdown
    table_rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table_rows[0].startswith("| run | tokens | final loss |")
    assert table_rows[1].startswith("| base | 102k | ")
    assert table_rows[1].endswith("| 0:03:20 | emb_dim=32, learning_rate=0.0004 |")
    assert table_rows[2].endswith("| 0:02:02 | emb_dim=64, learning_rate=0.001 |")
    assert f"| {statistics.fmean(BASE_LOSSES[-FINAL_STEPS:]):.4f} |" in table_rows[1]


@pytest.mark.e2e
@pytest.mark.parametrize("problem", ["missing run directory", "no metrics.jsonl"])
def test_bad_run_is_one_error_line(tmp_path, problem):
    if problem == "missing run directory":
        run, expected = tmp_path / "nope", "nope"
    else:
        run = write_run(tmp_path, "fresh", MODEL, TRAIN)
        expected = "metrics.jsonl"
    result = run_script([str(run)], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "comparison.png").exists()


def test_chart_style_is_plain_without_the_xkcd_font(monkeypatch):
    monkeypatch.setattr(chart_style, "xkcd_font_installed", lambda: False)
    with chart_style.chart_style():
        assert matplotlib.rcParams["path.sketch"] is None


def test_chart_style_is_xkcd_with_the_font_and_restored_after(monkeypatch):
    fake_font = font_manager.FontEntry(fname="xkcd-script.ttf", name="xkcd Script")
    monkeypatch.setattr(font_manager.fontManager, "ttflist", [*font_manager.fontManager.ttflist, fake_font])
    assert chart_style.xkcd_font_installed()
    with chart_style.chart_style():
        assert matplotlib.rcParams["path.sketch"] is not None
    assert matplotlib.rcParams["path.sketch"] is None
