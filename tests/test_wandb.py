"""Weights & Biases (train.json wandb_project), offline: rank 0 logs every metrics.jsonl row
at its step and the config, each checkpoint's meta.json holds the W&B run id, and a resumed
run continues the same W&B run; without the wandb package, one error line at start-up."""

import dataclasses
import json
import struct
import sys

import pytest

from config import load_run
from conftest import make_run, read_rows, rewind_to_checkpoint, run_training, tokens_for
from evalkit import assert_one_error_line

STEPS = 4
# A .wandb file is W&B's transaction log: a 7-byte header (":W&B", magic, version), then
# LevelDB's log format: 32 KiB blocks of chunks, each with a 7-byte header (checksum,
# length, type) and a block's last < 7 bytes left as padding; a record is a FULL chunk or
# FIRST, MIDDLE..., LAST. wandb 0.31 has no Python reader of its own any more.
WANDB_HEADER, LOG_BLOCK, CHUNK_HEADER, FULL, LAST = b":W&B", 32768, 7, 1, 4


def wandb_records(path):
    """The records of a .wandb file, as wandb's own protobuf Records."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data.startswith(WANDB_HEADER)
    position, record, records = len(WANDB_HEADER) + 3, b"", []
    while position + CHUNK_HEADER <= len(data):
        if LOG_BLOCK - position % LOG_BLOCK < CHUNK_HEADER:
            position += LOG_BLOCK - position % LOG_BLOCK
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + CHUNK_HEADER])
        record += data[position + CHUNK_HEADER:position + CHUNK_HEADER + length]
        position += CHUNK_HEADER + length
        if kind in (FULL, LAST):
            records.append(Record.FromString(record))
            record = b""
    return records


@dataclasses.dataclass
class OfflineRun:
    run_id: str
    name: str
    project: str
    config: dict
    history: dict  # step: the values logged at it


def read_offline_run(run_dir):
    """What an offline W&B run directory holds: its run record and every logged step."""
    [log_file] = run_dir.glob("run-*.wandb")
    run, history = None, {}
    for record in wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            values = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                      for item in record.history.item}
            # Without W&B's own _step, _runtime and _timestamp.
            history[record.history.step.num] = {key: value for key, value in values.items() if not key.startswith("_")}
    config = {item.key: json.loads(item.value_json) for item in run.config.update if item.key != "_wandb"}
    return OfflineRun(run.run_id, run.display_name, run.project, config, history)


def logged_row(row):
    """A metrics.jsonl row as W&B gets it: at its step, without the nulls."""
    return {key: value for key, value in row.items() if key != "step" and value is not None}


def checkpoint_run_ids(run_dir):
    return {json.loads(meta.read_text())["global_step"]: json.loads(meta.read_text()).get("wandb_run_id")
            for meta in (run_dir / "checkpoints").glob("*-iteration-*/meta.json")}


@pytest.fixture
def wandb_session():
    """A W&B session of the test's own: wandb reads its environment variables once per session."""
    import wandb

    wandb.teardown()
    yield
    wandb.teardown()


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch, wandb_session):
    """W&B offline (no network, no account), its files in a directory of the test's."""
    directory = tmp_path / "wandb-files"
    directory.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(directory))
    return directory / "wandb"


@pytest.mark.e2e
def test_offline_run_logs_every_row_and_the_config_and_a_resume_continues_it(tmp_path, verdict_dataset, wandb_dir):
    run_dir = make_run(tmp_path / "run", verdict_dataset, min_train_tokens=tokens_for(STEPS, 1), checkpoint_interval=2,
                       validation_interval=2, validation_batches=2, wandb_project="ddp-gpt-tests")
    run_training([run_dir, "datasets"])
    [offline_dir] = wandb_dir.glob("offline-run-*")
    logged = read_offline_run(offline_dir)
    rows = read_rows(run_dir)
    assert logged.history == {row["step"]: logged_row(row) for row in rows}
    assert "val_loss" in logged.history[STEPS - 1]
    run = load_run(run_dir)
    assert logged.config == {"model": dataclasses.asdict(run.model), "train": dataclasses.asdict(run.train)}
    assert (logged.project, logged.name) == ("ddp-gpt-tests", "run")  # by default the run directory's name
    assert offline_dir.name.endswith(f"-{logged.run_id}")
    assert checkpoint_run_ids(run_dir) == {0: logged.run_id, 2: logged.run_id, 3: logged.run_id}

    resumed = rewind_to_checkpoint(run_dir, 2, tmp_path / "resumed")
    run_training([resumed, "datasets", "latest"])
    [continued] = [path for path in wandb_dir.glob("offline-run-*") if path != offline_dir]
    continued_log = read_offline_run(continued)
    assert continued_log.run_id == logged.run_id
    assert continued_log.history == {STEPS - 1: logged_row(read_rows(resumed)[-1])}
    assert checkpoint_run_ids(resumed)[3] == logged.run_id


def test_bad_wandb_key_is_one_error_line(tmp_path, verdict_dataset):
    run_dir = make_run(tmp_path / "run", verdict_dataset, wandb_project="")
    assert_one_error_line(run_training([run_dir, "datasets"], check=False),
                          "train.json: key 'wandb_project' must be a non-empty string or null")


def test_missing_wandb_package_is_one_error_line_before_training(tmp_path, verdict_dataset, monkeypatch):
    # Mocks only the package's absence: with None in sys.modules, `import wandb` raises the
    # ImportError an environment without wandb raises.
    monkeypatch.setitem(sys.modules, "wandb", None)
    run_dir = make_run(tmp_path / "run", verdict_dataset, wandb_project="ddp-gpt-tests")
    result = run_training([run_dir, "datasets"], check=False)
    assert_one_error_line(result, "key 'wandb_project'", "wandb package is not installed", "uv sync --extra wandb")
    assert sorted(path.name for path in run_dir.iterdir()) == ["model.json", "train.json"]  # not even the lock


def test_a_wandb_run_that_cannot_start_is_one_error_line(tmp_path, verdict_dataset, monkeypatch, wandb_session):
    """Online without an API key (W&B refuses before any network access)."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run_dir = make_run(tmp_path / "run", verdict_dataset, wandb_project="ddp-gpt-tests")
    result = run_training([run_dir, "datasets"], check=False)
    assert_one_error_line(result, "could not start the W&B run", "No API key configured", "WANDB_MODE=offline")
    assert not (run_dir / "checkpoints").exists()
