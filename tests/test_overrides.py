"""`--set KEY=VALUE` on ddp_train.py and preflight.py: the same training as the key in
train.json, validated by the same code with errors naming `--set KEY`, recorded in each
checkpoint's meta.json and TensorBoard, and refused on resume where it would change what
the checkpoint was trained on."""

import json
import shutil

import pytest

import preflight
from conftest import cli_in_process, make_run, read_rows, run_training, tokens_for
from evalkit import assert_one_error_line

STEPS = 4


def checkpoints(run_dir):
    return sorted((run_dir / "checkpoints").glob("*-iteration-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, verdict_dataset):
    """The same run twice: learning_rate and microbatch_size in train.json, and in --set
    over a train.json that says otherwise (with TensorBoard switched on by --set too)."""
    tmp_path = tmp_path_factory.mktemp("overrides")
    budget = tokens_for(STEPS, 1, microbatch=2)
    in_file = make_run(tmp_path / "in-file", verdict_dataset, min_train_tokens=budget, learning_rate=0.001,
                       microbatch_size=2, checkpoint_interval=2)
    by_set = make_run(tmp_path / "by-set", verdict_dataset, min_train_tokens=budget, learning_rate=0.003,
                      microbatch_size=4, checkpoint_interval=2)
    run_training([in_file, "datasets"])
    result = run_training([by_set, "datasets", "--set", "learning_rate=1e-3", "--set", "microbatch_size=2",
                           "--set", "tensorboard=true"])
    return in_file, by_set, result


def test_a_set_value_trains_exactly_as_the_same_key_in_train_json(runs):
    in_file, by_set, _ = runs
    expected, got = read_rows(in_file), read_rows(by_set)
    assert len(got) == STEPS
    assert [row["loss"] for row in got] == [row["loss"] for row in expected]
    assert [row["lr"] for row in got] == [row["lr"] for row in expected] == [0.001] * STEPS


def test_each_checkpoint_records_the_effective_config_and_the_overrides(runs):
    in_file, by_set, _ = runs
    for checkpoint in checkpoints(by_set):
        meta = json.loads((checkpoint / "meta.json").read_text())
        assert meta["overrides"] == {"learning_rate": 0.001, "microbatch_size": 2, "tensorboard": True}
        assert (meta["train_config"]["learning_rate"], meta["train_config"]["microbatch_size"]) == (0.001, 2)
        # what train.json itself says is untouched
        assert json.loads((by_set / "train.json").read_text())["learning_rate"] == 0.003
    plain = json.loads((checkpoints(in_file)[-1] / "meta.json").read_text())
    assert plain["overrides"] == {} and plain["train_config"]["learning_rate"] == 0.001


def test_tensorboard_gets_the_effective_config_as_hparams_and_text(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, by_set, _ = runs
    events = EventAccumulator(str(by_set / "tb"))
    events.Reload()
    hparams = {}
    for content in events.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        hparams |= {key: value for key, value in data.session_start_info.hparams.items()}
    assert hparams["train/learning_rate"].number_value == 0.001
    assert hparams["train/microbatch_size"].number_value == 2
    assert hparams["model/emb_dim"].number_value == 32
    assert hparams["train/dataset"].string_value == json.loads((by_set / "train.json").read_text())["dataset"]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    config = json.loads(text.split("```json\n", 1)[1].rsplit("\n```", 1)[0])
    assert config["overrides"] == {"learning_rate": 0.001, "microbatch_size": 2, "tensorboard": True}
    assert config["train"]["learning_rate"] == 0.001 and config["model"]["n_layers"] == 2


@pytest.mark.parametrize("setting, fragments", [
    ("learning_rate=abc", ["--set learning_rate", "must be a number", '"abc"']),
    ("lerning_rate=1e-3", ["--set lerning_rate", "unknown key", "did you mean 'learning_rate'"]),
    ("learning_rate", ["--set learning_rate", "expected KEY=VALUE"]),
    ("learning_rate=-1", ["with --set learning_rate", "key 'learning_rate' must be positive"]),
    ("microbatch_size=2.5", ["--set microbatch_size", "must be an integer"]),
])
def test_a_bad_set_is_one_error_line(tmp_path, verdict_dataset, setting, fragments):
    run_dir = make_run(tmp_path / "run", verdict_dataset)
    for command in ("ddp_train", "preflight"):
        if command == "ddp_train":
            result = run_training([run_dir, "datasets", "--set", setting], check=False)
        else:
            result = cli_in_process(preflight.main, [run_dir, "datasets", "--set", setting])
        assert_one_error_line(result, *fragments)
    assert not (run_dir / "checkpoints").exists()


def test_resuming_with_a_set_that_changes_the_data_is_refused(runs, tmp_path, verdict_dataset):
    in_file, _, _ = runs
    run_dir = shutil.copytree(in_file, tmp_path / "run", symlinks=True)
    other_dataset = shutil.copytree(verdict_dataset, tmp_path / "other-dataset")
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    for setting in (f"dataset={other_dataset}", "start_train_token=64", "pad_vocab_to_multiple_of=64"):
        result = run_training([run_dir, "datasets", "latest", "--set", setting], check=False)
        key = setting.split("=")[0]
        assert_one_error_line(result, f"--set {key}=", "was trained with", f"cannot change {key}")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_resuming_with_a_new_learning_rate_says_so(runs, tmp_path):
    in_file, _, _ = runs
    run_dir = shutil.copytree(in_file, tmp_path / "run", symlinks=True)
    # the checkpoint of step 2 was written with learning_rate 0.001
    step_2 = checkpoints(run_dir)[1]
    assert step_2.name.endswith("-iteration-2")
    result = run_training([run_dir, "datasets", step_2.name, "--set", "learning_rate=0.0005"])
    assert f"note: resuming with --set learning_rate=0.0005 (checkpoint {step_2.name}: 0.001)" in result.stdout
    rows = read_rows(run_dir)
    assert [row["lr"] for row in rows] == [0.001] * 3 + [0.0005]  # steps 0-2 kept, step 3 trained again
