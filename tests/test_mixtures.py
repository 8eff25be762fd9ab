"""Data mixtures: train.json `dataset` as a list of weighted sources. The schedule against
exact arithmetic and a plain step-by-step reference; a mixture run resumes exactly; validation
per source and overall; masked and unmasked sources mixed (the loss by hand); bad weights and
a source too small for its share are one error line."""

import json
import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from batching import MixtureSchedule
from config import TrainConfig
from conftest import (MICROBATCH_SIZE, SHARED_DATA, TINY_MODEL, make_run, read_rows, rewind_to_checkpoint,
                      run_training, write_byte_dataset)
from errors import UserError
from test_masked_loss import hand_first_step_over, write_masked_dataset

MICROBATCH_TOKENS = MICROBATCH_SIZE * TINY_MODEL["context_length"]


def reference_schedule(weights, length, seed):
    """The schedule's rule, one slot at a time: the next slot goes to the source whose next
    microbatch is due first, source i's k-th being due at (k + offset_i) / weight_i."""
    offsets = np.random.default_rng(seed).random(len(weights))
    total = sum(weights)
    counts, sources = [0] * len(weights), []
    for _ in range(length):
        due = [(counts[i] + offsets[i]) / (w / total) if w else math.inf for i, w in enumerate(weights)]
        source = min(range(len(weights)), key=lambda i: (due[i], i))
        sources.append(source)
        counts[source] += 1
    return sources


@pytest.mark.parametrize("weights", [[7, 3], [1, 2, 3], [0.5, 0, 0.5], [1], [0.01, 0.99]])
def test_schedule_keeps_every_prefix_within_one_microbatch_of_the_weights(weights):
    length = 600
    schedule = MixtureSchedule(weights, length, seed=42)
    assert list(schedule.source) == reference_schedule(weights, length, 42)
    total = sum(Fraction(repr(w)) for w in weights)
    for source, weight in enumerate(weights):
        mine = np.flatnonzero(schedule.source == source)
        # Each source is read in order, from its first microbatch, none twice.
        assert list(schedule.cursor[mine]) == list(range(len(mine)))
        counts = np.cumsum(schedule.source == source)
        share = Fraction(repr(weight)) / total
        assert all(abs(int(counts[n - 1]) - n * share) < 1 for n in range(1, length + 1))


def test_schedule_is_a_function_of_the_seed_and_a_longer_run_keeps_its_start():
    assert np.array_equal(MixtureSchedule([1, 1], 100, 5).source, MixtureSchedule([1, 1], 100, 5).source)
    assert not np.array_equal(MixtureSchedule([1, 1], 100, 5).source, MixtureSchedule([1, 1], 100, 6).source)
    assert np.array_equal(MixtureSchedule([2, 5, 1], 300, 5).source, MixtureSchedule([2, 5, 1], 700, 5).source[:300])


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    datasets = tmp_path_factory.mktemp("datasets")
    verdict = write_byte_dataset(datasets / "verdict", (SHARED_DATA / "the-verdict.txt").read_text())
    instructions = write_byte_dataset(datasets / "instructions",
                                      (SHARED_DATA / "instruction-data.json").read_text()[:60_000])
    return verdict, instructions


def mixture(verdict, instructions, verdict_weight=3, instructions_weight=1):
    return [{"dataset": str(verdict), "weight": verdict_weight},
            {"dataset": str(instructions), "weight": instructions_weight, "name": "alpaca"}]


def test_mixture_resumes_exactly_and_validates_per_source(tmp_path, two_sources):
    """Six steps straight, and the same run stopped after its step-3 checkpoint and resumed:
    the same losses, per-source validation losses and final weights; val_loss is the
    weight-weighted mean of the sources'; the start-up line gives each source's tokens."""
    steps, accumulation = 6, 2
    run_dir = make_run(tmp_path / "full", None, dataset=mixture(*two_sources),
                       min_train_tokens=steps * accumulation * MICROBATCH_TOKENS,
                       gradient_accumulation_steps=accumulation, validation_interval=3, validation_batches=2)
    result = run_training([run_dir, tmp_path / "datasets"])
    line = next(line for line in result.stdout.splitlines() if line.startswith("mixture: "))
    read = [int(n.replace(",", "")) for n in re.findall(r": ([\d,]+) of its", line)]
    assert sum(read) == steps * accumulation * MICROBATCH_TOKENS and read == [9 * MICROBATCH_TOKENS,
                                                                                3 * MICROBATCH_TOKENS]
    full_rows = read_rows(run_dir)
    validated = [row for row in full_rows if "val_loss" in row]
    assert [row["step"] for row in validated] == [0, 3, 5]
    for row in validated:
        assert row["val_loss"] == pytest.approx((3 * row["val_loss/verdict"] + row["val_loss/alpaca"]) / 4)

    resumed = rewind_to_checkpoint(run_dir, 3, tmp_path / "resumed")
    run_training([resumed, tmp_path / "datasets", "latest"])
    resumed_rows = read_rows(resumed)
    assert [r["step"] for r in resumed_rows] == list(range(steps))
    keys = ("loss", "grad_norm", "val_loss", "val_loss/verdict", "val_loss/alpaca")
    assert [[r.get(k) for k in keys] for r in resumed_rows[4:]] == [[r.get(k) for k in keys] for r in full_rows[4:]]
    final = [load_file(d / "checkpoints" / "latest" / "model.safetensors") for d in (run_dir, resumed)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])

    # Resumed with other weights, the run says that its data now differs from an uninterrupted run's.
    reweighted = rewind_to_checkpoint(run_dir, 3, tmp_path / "reweighted")
    train = json.loads((reweighted / "train.json").read_text())
    (reweighted / "train.json").write_text(json.dumps({**train, "dataset": mixture(*two_sources, 1, 1)}))
    result = run_training([reweighted, tmp_path / "datasets", "latest"])
    assert "from step 4 on the data follows this run's mixture, not the one an uninterrupted run" in result.stdout


def test_masked_and_unmasked_sources_mix_with_the_loss_by_hand(tmp_path, two_sources):
    """A conversation-like masked source mixed with plain text (the mid-training case): step 0's
    loss and gradient norm are the mean over the global batch's masked-in targets, the plain
    source's targets all counting, computed by hand in the schedule's order."""
    masked_dir, tokens, mask, _ = write_masked_dataset(tmp_path / "masked")
    verdict = two_sources[0]
    accumulation = 4
    run_dir = make_run(tmp_path / "run", None, dataset=[{"dataset": str(masked_dir), "weight": 1},
                                                         {"dataset": str(verdict), "weight": 1}],
                       min_train_tokens=accumulation * MICROBATCH_TOKENS, gradient_accumulation_steps=accumulation)
    run_training([run_dir, tmp_path / "datasets"])
    verdict_tokens = torch.tensor(list((SHARED_DATA / "the-verdict.txt").read_text().encode("utf-8")))
    streams = [(tokens, mask), (verdict_tokens, torch.ones(len(verdict_tokens)))]
    order = MixtureSchedule([1, 1], accumulation, seed=42)
    batch = [(streams[source], int(cursor)) for source, cursor in zip(order.source, order.cursor)]
    assert {source for source in order.source} == {0, 1}
    loss, grad_norm, _ = hand_first_step_over(batch)
    (row,) = read_rows(run_dir)
    assert row["loss"] == pytest.approx(loss, rel=1e-5)
    assert row["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)


@pytest.mark.parametrize("entry, key, says", [
    ({"dataset": "a", "weight": -1}, "dataset[1].weight", "finite number >= 0, got -1"),
    ({"dataset": "a", "weight": float("nan")}, "dataset[1].weight", "finite number >= 0, got nan"),
    ({"dataset": "a", "weight": float("inf")}, "dataset[1].weight", "finite number >= 0, got inf"),
    ({"dataset": "a", "weight": "1"}, "dataset[1].weight", 'must be a number, got "1"'),
    ({"dataset": "a"}, "dataset[1].weight", "is missing"),
    ({"weight": 1}, "dataset[1].dataset", "is missing"),
    ({"dataset": "a", "weight": 1, "wieght": 2}, "dataset[1]", "unknown key 'wieght'"),
    ({"dataset": "b", "weight": 1, "name": "first"}, "dataset", "two sources named 'first'"),
])
def test_bad_mixture_entries_name_the_key(entry, key, says):
    raw = {"dataset": [{"dataset": "b", "weight": 1, "name": "first"}, entry], "microbatch_size": 1,
           "min_train_tokens": 100}
    with pytest.raises(UserError) as error:
        TrainConfig.from_dict(raw, source="train.json")
    assert f"train.json: key '{key}'" in str(error.value) and says in str(error.value)


def test_all_zero_weights_and_a_mixture_without_a_budget_are_refused():
    zero = {"dataset": [{"dataset": "a", "weight": 0}, {"dataset": "b", "weight": 0.0}], "microbatch_size": 1,
            "min_train_tokens": 100}
    with pytest.raises(UserError, match="key 'dataset' weights are all zero"):
        TrainConfig.from_dict(zero, source="train.json")
    with pytest.raises(UserError, match="key 'dataset' is a mixture: give the run's length"):
        TrainConfig.from_dict({**zero, "dataset": [{"dataset": "a", "weight": 1}], "min_train_tokens": -1},
                              source="train.json")


def test_bad_weight_and_too_small_source_are_one_error_line(tmp_path, two_sources):
    verdict, instructions = two_sources
    bad = make_run(tmp_path / "bad", None, dataset=[{"dataset": str(verdict), "weight": -0.5}], min_train_tokens=1)
    result = run_training([bad, tmp_path / "datasets"], check=False)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "train.json: key 'dataset[0].weight' must be a finite number >= 0, got -0.5" in result.stderr

    # The verdict's ~16k train bytes hold 130 microbatches; 95% of 160 is more than that.
    greedy = make_run(tmp_path / "greedy", None, dataset=mixture(verdict, instructions, 19, 1),
                      min_train_tokens=160 * MICROBATCH_TOKENS)
    result = run_training([greedy, tmp_path / "datasets"], check=False)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert re.search(r"verdict/train.safetensors: too short for its share of the run: source 'verdict' "
                     r"\(weight 19\) gets 152 microbatches", result.stderr)
    assert json.loads((greedy / "train.json").read_text())["dataset"][0]["weight"] == 19  # untouched
