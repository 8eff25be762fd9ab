"""The charts draw from metrics rows, skipped (null) steps included, in plain style
when no xkcd font is installed."""

import numpy as np
from PIL import Image

import charts


def rows(count):
    return [{"step": s, "loss": None if s == 7 else 5.0 - s / count, "lr": 1e-3,
             "grad_norm": None if s == 7 else 0.5 + s / count, "val_loss": 4.0 if s % 100 == 99 else None}
            for s in range(count)]


def test_charts_are_written_for_short_and_long_runs(tmp_path):
    for count in (3, 1000):
        charts.write_charts(tmp_path, rows(count), best_step=count - 1, clip_norm=1.0)
        for name in ("loss-chart.png", "grad-norm-chart.png", "learning-rate-chart.png"):
            with Image.open(tmp_path / name) as image:
                assert image.format == "PNG" and image.size == (800, 500)


def test_binning_keeps_min_mean_max_per_bin():
    steps, low, mean, high = charts._binned(list(range(400)), [float(s % 2) for s in range(400)])
    assert len(steps) == charts.BINS and steps[0] == 0.5
    assert set(low) == {0.0} and set(high) == {1.0} and set(mean) == {0.5}


def test_loss_chart_shows_hellaswag_when_the_rows_have_it(tmp_path):
    plain, with_hellaswag = tmp_path / "plain.png", tmp_path / "hellaswag.png"
    charts.plot_loss(rows(50), plain)
    charts.plot_loss([{**row, "hellaswag_acc_norm": 0.25 + row["step"] / 500} if row["step"] % 10 == 0 else row
                      for row in rows(50)], with_hellaswag)
    with Image.open(plain) as a, Image.open(with_hellaswag) as b:
        assert a.size == b.size and not np.array_equal(np.asarray(a), np.asarray(b))
