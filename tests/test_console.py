"""What a training run prints: with output that is not a terminal (as here, and under
SLURM), plain lines every log_interval steps and no progress bar; a line for each
validation, checkpoint and skipped step; the summary with where things are and how to
sample; --quiet; and the charts' headings and status. The numbers printed are compared
with the metrics.jsonl rows of the same run."""

import re

import pytest
from PIL import Image

import charts
import training
from conftest import make_run, read_rows, run_training, tokens_for
from console import unused_gpus_warning

STEPS = 6
POISONED_STEP = 2


@pytest.fixture(scope="module")
def printed_run(tmp_path_factory, verdict_dataset):
    """Six steps, a line every 2, validation every 2, checkpoints at 0, 3 and 5, and the
    training loss of step 2 made NaN (a stand-in for a diverging step), so it is skipped."""
    run_dir = make_run(tmp_path_factory.mktemp("console") / "run", verdict_dataset,
                       min_train_tokens=tokens_for(STEPS, 1), log_interval=2, validation_interval=2,
                       validation_batches=2, checkpoint_interval=3)
    calls = iter(range(10**6))
    real_compute_loss = training.compute_loss

    def compute_loss(model, *args):
        loss = real_compute_loss(model, *args)
        return loss * float("nan") if model.training and next(calls) == POISONED_STEP else loss

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "compute_loss", compute_loss)
        result = run_training([run_dir, "datasets"])
    return run_dir, result, read_rows(run_dir)


def test_output_that_is_not_a_terminal_gets_no_progress_bar(printed_run):
    _, result, _ = printed_run
    assert "\r" not in result.stdout + result.stderr
    assert "step/s" not in result.stderr and "it/s" not in result.stderr  # tqdm's rate, in any bar


def test_a_plain_line_every_log_interval_steps_matches_metrics_jsonl(printed_run):
    _, result, rows = printed_run
    lines = re.findall(r"^step (\d+)/(\d+) \| loss (\S+) \| lr (\S+) \| ([\d,]+) tokens/s \| ETA (\S+)$",
                       result.stdout, flags=re.MULTILINE)
    assert [int(step) for step, *_ in lines] == [1, 3, 5]  # (step + 1) % log_interval == 0
    for step, last, loss, lr, tokens_per_sec, eta in lines:
        row = rows[int(step)]
        assert int(last) == STEPS - 1
        assert float(loss) == pytest.approx(row["loss"], abs=5e-5)
        assert float(lr) == pytest.approx(row["lr"], rel=1e-3)
        assert int(tokens_per_sec.replace(",", "")) == round(row["tokens_per_sec"])
        hours, minutes, seconds = map(int, eta.split(":"))
        assert hours * 3600 + minutes * 60 + seconds == round(row["eta_s"])


def test_each_validation_prints_its_loss_and_the_best_so_far(printed_run):
    _, result, rows = printed_run
    printed = re.findall(r"^step (\d+): validation loss (\S+) \(best so far (\S+)\)$", result.stdout, re.MULTILINE)
    validated = [row for row in rows if "val_loss" in row]
    assert [int(step) for step, _, _ in printed] == [row["step"] for row in validated] == [0, 2, 3, 4, 5]
    best = float("inf")
    for (_, loss, best_printed), row in zip(printed, validated):
        best = min(best, row["val_loss"])
        assert float(loss) == pytest.approx(row["val_loss"], abs=5e-5)
        assert float(best_printed) == pytest.approx(best, abs=5e-5)


def test_each_saved_checkpoint_and_skipped_step_gets_a_line(printed_run):
    run_dir, result, rows = printed_run
    saved = re.findall(r"^step (\d+): saved checkpoint (\S+)", result.stdout, re.MULTILINE)
    assert [int(step) for step, _ in saved] == [0, 3, 5]
    for step, path in saved:
        assert path.startswith(str(run_dir / "checkpoints")) and path.endswith(f"-iteration-{step}")
    skipped = re.findall(r"^step (\d+): skipped \(non-finite loss or gradient\), (\d+) in a row; the run stops at 10",
                         result.stdout, re.MULTILINE)
    assert skipped == [(str(POISONED_STEP), "1")]
    assert [row["step"] for row in rows if row["skipped"]] == [POISONED_STEP]


def test_the_summary_says_where_the_checkpoints_and_charts_are_and_how_to_sample(printed_run):
    run_dir, result, rows = printed_run
    newest = sorted((run_dir / "checkpoints").glob("*-iteration-5"))[0].name
    assert f"final train loss {rows[-1]['loss']:.4f}; final validation loss {rows[-1]['val_loss']:.4f}" in result.stdout
    assert f"\ncheckpoints: {run_dir / 'checkpoints'} (newest: {newest})\n" in result.stdout
    assert f"\ncharts: {run_dir / 'charts.html'}\n" in result.stdout
    assert result.stdout.endswith(f"\nsample from it: uv run test_smoke.py {run_dir}\n")


def test_every_chart_and_the_chart_page_name_the_run_and_its_steps(printed_run):
    run_dir, _, rows = printed_run
    for name in charts.CHART_FILES:
        with Image.open(run_dir / name) as image:
            assert image.text["Title"] == f"run: {STEPS} steps planned"
    page = (run_dir / "charts.html").read_text()
    finished = f"run: finished, {STEPS} steps, final loss {rows[-1]['loss']:.4f}"
    assert f'<h1 id="status">{finished}</h1>' in page and "<title>run: training charts</title>" in page
    assert f'"{finished}"' in (run_dir / charts.STATUS_FILE).read_text()


def test_the_chart_status_of_a_run_under_way():
    rows = [{"step": 3, "loss": 1.23456, "eta_s": 65.4}]
    assert charts.status_text(rows, charts.Heading("demo", 10)) == "demo: step 3 of 9, loss 1.2346, ETA 0:01:05"


def test_quiet_prints_only_the_summary(tmp_path, verdict_dataset):
    run_dir = make_run(tmp_path / "run", verdict_dataset, min_train_tokens=tokens_for(2, 1), validation_interval=1,
                       validation_batches=1, log_interval=1)
    result = run_training([run_dir, "datasets", "--quiet"])
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Training complete in ") and len(lines) == 4, result.stdout
    assert result.stderr == ""


def test_more_gpus_than_processes_is_a_warning():
    assert unused_gpus_warning("cuda", 8, 2) == (
        "warning: 8 GPUs are visible but 2 process(es) were started on this node, so 6 GPU(s) stay idle; "
        "launch with `torchrun --nproc_per_node=8` to use them all")
    assert unused_gpus_warning("cuda", 2, 2) is None
    assert unused_gpus_warning("cpu", 0, 1) is None


def test_on_a_terminal_the_bar_moves_and_event_lines_still_print(capsys):
    from console import Console

    console = Console(shown=True, total_steps=4, start_step=0, log_interval=1, terminal=True)
    rows = [{"step": step, "loss": 2.0, "lr": 1e-3, "tokens_per_sec": 100.0, "tokens_per_sec_per_device": 100.0,
             "mfu": None, "eta_s": 1.0} for step in range(2)]
    console.rows(rows)
    console.validation(1, 1.5, 1.5)
    assert console.bar.n == 2
    console.close()
    out, err = capsys.readouterr()
    assert out == "step 1: validation loss 1.5000 (best so far 1.5000)\n"  # no plain progress lines
    assert "2/4" in err  # the bar


def test_other_ranks_print_nothing(capsys):
    from console import Console

    console = Console(shown=False, total_steps=4, start_step=0, log_interval=1, terminal=False)
    console.rows([{"step": 0, "loss": 2.0, "lr": 1e-3, "tokens_per_sec": 100.0, "eta_s": 1.0}])
    console.validation(0, 1.5, 1.5)
    console.saved(0, "somewhere", True)
    console.close()
    assert capsys.readouterr() == ("", "")
