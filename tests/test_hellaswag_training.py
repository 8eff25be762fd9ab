"""HellaSwag during training (train.json hellaswag_interval): the accuracy ddp_train.py logs
is what eval_hellaswag.py gives for the checkpoint of the same step; bad keys are one
error line."""

import json

import pytest

from conftest import make_run, read_rows, run_training, tokens_for
from evalkit import assert_one_error_line, run_script, write_items
from hellaswag_scoring import rank_share

STEPS = 4
ITEMS_SCORED = 5  # of evalkit's 7


@pytest.fixture(scope="module")
def hellaswag_run(tmp_path_factory, verdict_dataset):
    """4 steps checkpointed at 0, 2 and 3, HellaSwag every 2 steps (and the last) on 5 items."""
    root = tmp_path_factory.mktemp("hellaswag-training")
    items = write_items(root / "hellaswag_val.jsonl")
    run_dir = make_run(root / "run", verdict_dataset, min_train_tokens=tokens_for(STEPS, 1), checkpoint_interval=2,
                       hellaswag_interval=2, hellaswag_items=ITEMS_SCORED, hellaswag_data=str(items),
                       tensorboard=True)
    run_training([run_dir, "datasets"])
    return run_dir, items


def script_result(run_dir, items, step, out):
    """eval_hellaswag.py on the checkpoint of `step`, as a user runs it on a run: the tokenizer
    comes from the run's dataset (bytes), as it does for the trainer."""
    [checkpoint] = (run_dir / "checkpoints").glob(f"*-iteration-{step}")
    result = run_script("eval_hellaswag.py", run_dir, checkpoint / "model.safetensors", "--data", items,
                        "--limit", ITEMS_SCORED, "--json", out)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


@pytest.mark.e2e
def test_logged_accuracy_is_the_scripts_on_the_checkpoint_of_that_step(hellaswag_run, tmp_path):
    run_dir, items = hellaswag_run
    evaluated = {row["step"]: row for row in read_rows(run_dir) if "hellaswag_acc" in row}
    assert sorted(evaluated) == [0, 2, 3]  # every hellaswag_interval steps, and the last
    for step in (2, 3):  # a checkpoint holds the weights after its step, the ones that step scored
        written = script_result(run_dir, items, step, tmp_path / f"step-{step}.json")
        assert written["items"] == ITEMS_SCORED and written["tokenizer"] == "bytes"
        assert (evaluated[step]["hellaswag_acc"], evaluated[step]["hellaswag_acc_norm"]) == \
            (written["acc"], written["acc_norm"])


@pytest.mark.e2e
def test_tensorboard_has_the_hellaswag_scalars(hellaswag_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = hellaswag_run
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    evaluated = [row for row in read_rows(run_dir) if "hellaswag_acc" in row]
    for key, tag in (("hellaswag_acc", "hellaswag/acc"), ("hellaswag_acc_norm", "hellaswag/acc_norm")):
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [row["step"] for row in evaluated]
        assert [e.value for e in logged] == pytest.approx([row[key] for row in evaluated])


@pytest.mark.parametrize("key, value, fragment", [
    ("hellaswag_interval", 0, "key 'hellaswag_interval' must be positive, got 0"),
    ("hellaswag_items", -5, "key 'hellaswag_items' must be positive, got -5"),
    ("hellaswag_data", "", "key 'hellaswag_data' must be a non-empty string or null"),
])
def test_bad_hellaswag_keys_are_one_error_line(tmp_path, verdict_dataset, key, value, fragment):
    run_dir = make_run(tmp_path / "run", verdict_dataset, **{"hellaswag_interval": 2, key: value})
    assert_one_error_line(run_training([run_dir, "datasets"], check=False), "train.json", fragment)


def test_missing_hellaswag_file_is_one_error_line_naming_the_key(tmp_path, verdict_dataset):
    missing = tmp_path / "nowhere.jsonl"
    run_dir = make_run(tmp_path / "run", verdict_dataset, hellaswag_interval=2, hellaswag_data=str(missing))
    result = run_training([run_dir, "datasets"], check=False)
    assert_one_error_line(result, "train.json key 'hellaswag_data'", str(missing), "not found")
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("world_size, shares", [
    (2, [([0, 2, 4, 6], 4), ([1, 3, 5, 6], 3)]),  # the odd item out is repeated, uncounted
    (3, [([0, 3, 6], 3), ([1, 4, 6], 2), ([2, 5, 6], 2)]),
    (9, [([index], 1) for index in range(7)] + [([6], 0)] * 2),  # more ranks than items
])
def test_every_rank_scores_as_many_items_and_each_item_counts_once(world_size, shares):
    items = list(range(7))
    assert [rank_share(items, rank, world_size) for rank in range(world_size)] == shares
