"""bench_recipe.py: the measurement's arithmetic against exact values, the per-seed datasets
against the base split, and one tiny benchmark through the command line."""

import json
import math
import os

import numpy as np
import pytest

import bench_recipe
from bench_recipe import Crossing, best_learning_rate, crossing, ranges_overlap
from errors import UserError
from config import ModelConfig, TrainConfig
from conftest import PROJECT_DIR, TINY_MODEL, cli_in_process, write_byte_dataset
from token_data import open_split


def test_crossing_interpolates_in_log_tokens():
    # Losses 3.0, 2.0, 1.0 at 100, 200, 400 tokens: 1.5 is halfway from 200 to 400 in
    # log(tokens), i.e. at sqrt(200 x 400) tokens.
    found = crossing([100, 200, 400], [3.0, 2.0, 1.0], 1.5)
    assert found.kind == "crossed"
    assert found.tokens == pytest.approx(math.sqrt(200 * 400))
    # A quarter of the way from 100 to 200: 100 x 2**0.25.
    assert crossing([100, 200, 400], [3.0, 2.0, 1.0], 2.75).tokens == pytest.approx(100 * 2 ** 0.25)
    # Exactly at a measurement: that budget.
    assert crossing([100, 200, 400], [3.0, 2.0, 1.0], 2.0).tokens == pytest.approx(200)
    assert found.ratio(400) == pytest.approx(400 / math.sqrt(80000))


def test_crossing_below_at_the_smallest_budget_is_a_bound_and_never_extrapolated():
    found = crossing([100, 200, 400], [1.0, 0.9, 0.8], 1.5)
    assert found == Crossing("below at smallest", 100)
    assert found.describe(400) == ">= 4.00x"


def test_crossing_not_reached():
    found = crossing([100, 200, 400], [3.0, 2.5, 2.1], 2.0)
    assert found == Crossing("not reached")
    assert found.ratio(400) is None and found.describe(400) == "not reached"


def test_no_difference_when_the_seed_ranges_overlap():
    assert ranges_overlap([2.0, 2.2], [2.1, 2.5])
    assert ranges_overlap([2.0, 2.1], [2.1, 2.5])  # touching ends
    assert not ranges_overlap([2.0, 2.09], [2.1, 2.5])
    assert not ranges_overlap([2.6, 2.7], [2.1, 2.5])


def test_best_learning_rate_has_the_lowest_mean():
    # 3e-3 has the lowest single loss (1.0) but 6e-3 the lowest mean (1.9 vs 2.0).
    assert best_learning_rate({1.5e-3: [2.5, 2.5], 3e-3: [1.0, 3.0], 6e-3: [1.9, 1.9]}) == 6e-3


def test_seed_datasets_permute_whole_blocks_and_keep_validation(tmp_path):
    base = write_byte_dataset(tmp_path / "base", "".join(chr(97 + i % 26) * (i % 7 + 1) for i in range(900)))
    train = np.asarray(open_split(base, "train"))
    block = 16
    whole = len(train) // block * block
    datasets = [bench_recipe.write_seed_dataset(base, tmp_path / f"seed{s}", block, s) for s in (0, 1)]
    orders = []
    for seed, directory in zip((0, 1), datasets):
        permuted = np.asarray(open_split(directory, "train"))
        assert len(permuted) == whole  # the ragged tail dropped
        # The permutation numpy's default_rng(seed) gives, applied to the base's blocks.
        expected = train[:whole].reshape(-1, block)[np.random.default_rng(seed).permutation(whole // block)]
        np.testing.assert_array_equal(permuted.reshape(-1, block), expected)
        assert sorted(map(bytes, permuted.reshape(-1, block))) == sorted(map(bytes, train[:whole].reshape(-1, block)))
        np.testing.assert_array_equal(open_split(directory, "validation"), open_split(base, "validation"))
        assert json.loads((directory / "meta.json").read_text())["tokenizer"] == "bytes"
        orders.append(permuted)
    assert not np.array_equal(orders[0], orders[1])


@pytest.mark.parametrize("name", list(bench_recipe.CONFIGS))
def test_every_built_in_configuration_is_a_valid_demo_run(name):
    demo = PROJECT_DIR / "runs" / "demo"
    configs = [json.loads((demo / name).read_text()) for name in ("model.json", "train.json")]
    base = bench_recipe.Base(*configs, dataset_dir=demo, tokens_per_step=4096, microbatch_tokens=4096)
    model, train = bench_recipe.run_configs(base, name, bench_recipe.CONFIGS[name], learning_rate=1.5e-3,
                                            seed_dataset=demo, seed=2, steps=64, validation_interval=8)
    model_cfg, train_cfg = ModelConfig.from_dict(model), TrainConfig.from_dict(train)
    assert (train_cfg.min_train_tokens, train_cfg.random_seed, train_cfg.learning_rate) == (64 * 4096, 2, 1.5e-3)
    assert (train_cfg.validation_interval, train_cfg.checkpoint_interval) == (8, 64)
    switched = name.endswith("switches")
    assert (model_cfg.qk_norm, model_cfg.mlp, model_cfg.logit_softcap) == \
        ((True, "relu2", 30.0) if switched else (False, "gelu", None))
    assert train_cfg.optimizer == ("muon" if name.startswith("muon") else "adamw")


def record(config, tokens, seed, final, lr=3e-3):
    return {"config": config, "learning_rate": lr, "seed": seed, "tokens": tokens, "final_val_loss": final,
            "curve": [(tokens // 2, final + 1.0), (tokens, final)]}


def test_summary_crossings_against_hand_arithmetic():
    # Baseline finals 2.0 and 2.2 at B = 400 (mean 2.1). X's final losses at 100/200/400 tokens:
    # seed 0: 3.0, 2.0, 1.0; seed 1: 3.2, 2.2, 1.2; mean 3.1, 2.1, 1.1, so 2.1 is met at 200 exactly.
    finals = {0: (3.0, 2.0, 1.0), 1: (3.2, 2.2, 1.2)}
    records = [record("baseline", 400, 0, 2.0), record("baseline", 400, 1, 2.2),
               record("baseline", 400, 0, 1.0, lr=1e-3)]  # another learning rate of the sweep: not the baseline
    records += [record("X", tokens, seed, finals[seed][i]) for i, tokens in enumerate((100, 200, 400))
                for seed in (0, 1)]
    entry = bench_recipe.summarise(records, 3e-3, 400)["X"]
    assert entry["crossing"] == {"kind": "crossed", "tokens": pytest.approx(200)}
    assert entry["ratio"] == pytest.approx(2.0)
    # Seed 0 meets 2.1 nine tenths of the way from 100 (3.0) to 200 (2.0) in log(tokens); seed 1
    # a tenth of the way from 200 (2.2) to 400 (1.2).
    assert entry["seed_ratios"] == pytest.approx([400 / (100 * 2 ** 0.9), 400 / (200 * 2 ** 0.1)])
    assert entry["no_difference"] is False  # 1.0-1.2 against 2.0-2.2
    assert entry["gap_at_full_budget"] == pytest.approx(1.1 - 2.1)
    # The mean budget-B curve (record's: final + 1 at half the tokens) is 2.1 at 200 tokens, its
    # first point, already the baseline's: a bound.
    assert entry["curve_crossing"] == {"kind": "below at smallest", "tokens": 200}
    seed_range = f"{400 / (200 * 2 ** 0.1):.2f}-{400 / (100 * 2 ** 0.9):.2f}"
    assert bench_recipe.ratio_cell(entry, 400) == f"2.00x, seeds {seed_range}"


def test_summary_says_no_difference_inside_the_seed_spread():
    records = [record("baseline", 400, 0, 2.0), record("baseline", 400, 1, 2.2)]
    records += [record("X", tokens, seed, loss) for tokens, losses in ((200, (2.3, 2.5)), (400, (1.9, 2.05)))
                for seed, loss in zip((0, 1), losses)]
    entry = bench_recipe.summarise(records, 3e-3, 400)["X"]
    assert entry["no_difference"] is True  # 1.9-2.05 overlaps 2.0-2.2
    assert bench_recipe.ratio_cell(entry, 400).startswith("no difference (")


@pytest.fixture
def tiny_base_run(tmp_path, verdict_dataset):
    run_dir = tmp_path / "base"
    run_dir.mkdir()
    (run_dir / "model.json").write_text(json.dumps(TINY_MODEL))
    (run_dir / "train.json").write_text(json.dumps({
        "dataset": str(verdict_dataset), "microbatch_size": 4, "use_amp": False, "learning_rate": 3e-3,
        "schedule_learning_rate": True, "warmup_period_percent": 10, "validation_batches": 4}))
    return run_dir


@pytest.mark.e2e
def test_tiny_benchmark_reports_what_the_trainer_logged(tmp_path, tiny_base_run):
    out = tmp_path / "out"
    out.mkdir()
    args = [tmp_path / "datasets", "--run", tiny_base_run, "--configs", "baseline,muon-switches",
            "--budget", 1024, "--budget-fractions", "0.5,1", "--seeds", 2,
            "--baseline-learning-rates", "1e-3,3e-3", "--work-dir", tmp_path / "work",
            "--json", out / "bench.json", "--markdown", out / "bench.md", "--chart", out / "bench.png"]
    result = cli_in_process(bench_recipe.main, args)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "bench.json").read_text())
    # 2 learning rates x 2 seeds for the baseline at B = 8 steps of 4 x 32 tokens; 2 configurations
    # x 2 budgets (4 and 8 steps) x 2 seeds.
    runs = report["runs"]
    assert len(runs) == 4 + 2 * 2
    assert sorted((r["config"], r["tokens"], r["seed"]) for r in runs if r["config"] != "baseline") == sorted(
        ("muon-switches", t, s) for t in (512, 1024) for s in (0, 1))
    for run in runs:
        rows = [json.loads(line) for line in open(f"{run['run_dir']}/metrics.jsonl")]
        assert rows[-1]["tokens"] == run["tokens"]
        assert run["final_val_loss"] == [row["val_loss"] for row in rows if "val_loss" in row][-1]
        train = json.loads(open(f"{run['run_dir']}/train.json").read())
        assert train["random_seed"] == run["seed"]
    # The baseline is the sweep's learning rate of the lowest mean final loss, and muon-switches' AdamW uses it.
    means = {lr: np.mean([r["final_val_loss"] for r in runs if r["config"] == "baseline" and r["learning_rate"] == lr])
             for lr in (1e-3, 3e-3)}
    assert report["baseline_learning_rate"] == min(means, key=means.get)
    assert {r["learning_rate"] for r in runs if r["config"] == "muon-switches"} == {min(means, key=means.get)}
    assert "| muon-switches |" in result.stdout
    assert (out / "bench.md").read_text().count("| muon-switches |") == 1
    assert (out / "bench.png").stat().st_size > 0
    # Again in the same work directory: every run is found finished, none trains again.
    logged = {run["run_dir"]: os.stat(f"{run['run_dir']}/metrics.jsonl").st_mtime_ns for run in runs}
    again = cli_in_process(bench_recipe.main, args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert {run_dir: os.stat(f"{run_dir}/metrics.jsonl").st_mtime_ns for run_dir in logged} == logged
    assert json.loads((out / "bench.json").read_text())["runs"] == runs


def test_define_reads_model_and_train_keys_as_their_files_do():
    name, overrides = bench_recipe.parse_define("mine:qk_norm=true,mlp=relu2,learning_rate=1e-3,logit_softcap=30")
    assert name == "mine"
    assert overrides == {"qk_norm": True, "mlp": "relu2", "learning_rate": 0.001, "logit_softcap": 30.0}
    assert isinstance(overrides["logit_softcap"], float)


def test_a_define_of_a_bench_key_or_a_bad_value_is_refused():
    with pytest.raises(UserError, match="'min_train_tokens' is set by the bench"):
        bench_recipe.parse_define("mine:min_train_tokens=5")
    with pytest.raises(UserError, match="'qk_norm' must be true or false"):
        bench_recipe.parse_define("mine:qk_norm=3")


def test_an_unknown_define_key_is_one_error_line(tmp_path, tiny_base_run):
    result = cli_in_process(bench_recipe.main, [tmp_path / "datasets", "--run", tiny_base_run,
                                                "--define", "mine:qk_nrom=true"])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "qk_nrom" in result.stderr and "did you mean 'qk_norm'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_define_may_not_take_a_built_in_name():
    with pytest.raises(UserError, match="'baseline' is a built-in configuration"):
        bench_recipe.parse_define("baseline:learning_rate=1e-3")
