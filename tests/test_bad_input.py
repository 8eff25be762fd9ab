"""Every kind of bad input ends in one `error:` line naming the file and key or value,
exit status 2, no traceback, and an untouched run directory."""

import json
import struct

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import ddp_train
from run_lock import LOCK_FILE
from conftest import make_run, run_training, write_byte_dataset, SHARED_DATA


def snapshot(directory):
    """Every file's size and time; the run directory's lock file (run_lock.py) is left out:
    taking the lock is not a change to the run."""
    return {p.relative_to(directory): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.name != LOCK_FILE}


def invoke(args):
    """ddp_train's CLI in this process (a world of one, as without torchrun)."""
    return CliRunner().invoke(ddp_train.main, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture()
def dataset(tmp_path):
    return write_byte_dataset(tmp_path / "dataset", (SHARED_DATA / "the-verdict.txt").read_text())


@pytest.mark.parametrize("file, content, fragments", [
    ("model.json", '{"vocab_size": 257,,}', ["model.json: malformed JSON at line 1 column 20"]),
    ("train.json", {"learning_rat": 0.1}, ["train.json: unknown key 'learning_rat'",
                                           "did you mean 'learning_rate'?"]),
    ("train.json", {"microbatch_size": "4"}, ["train.json: key 'microbatch_size' must be an integer"]),
    ("model.json", {"emb_dim": 33}, ["model.json: key 'emb_dim' (33) must be divisible by n_heads (2)"]),
    ("model.json", {"n_layers": -1}, ["model.json: key 'n_layers' must be positive, got -1"]),
    ("train.json", {"warmup_period_percent": 120}, ["key 'warmup_period_percent' must be between 0 and 100"]),
])
def test_config_errors(tmp_path, dataset, file, content, fragments):
    run_dir = make_run(tmp_path / "run", dataset)
    if isinstance(content, dict):
        current = json.loads((run_dir / file).read_text())
        (run_dir / file).write_text(json.dumps({**current, **content}))
    else:
        (run_dir / file).write_text(content)
    before = snapshot(run_dir)
    assert_one_line_error(invoke([run_dir, tmp_path / "datasets"]), *fragments)
    assert snapshot(run_dir) == before


def write_tokens_header(path, header, data=b""):
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def corrupt_truncate(dataset):
    path = dataset / "train.safetensors"
    path.write_bytes(path.read_bytes()[:5000])


def corrupt_not_safetensors(dataset):
    (dataset / "train.safetensors").write_text("this is not a token file at all, just some text")


def corrupt_dtype(dataset):
    save_file({"tokens": torch.zeros(1000, dtype=torch.float32)}, dataset / "train.safetensors")


def corrupt_name(dataset):
    save_file({"ids": torch.zeros(1000, dtype=torch.uint16)}, dataset / "train.safetensors")


@pytest.mark.parametrize("corrupt, fragments", [
    (corrupt_truncate, ["train.safetensors: truncated or corrupt"]),
    (corrupt_not_safetensors, ["train.safetensors: not a safetensors file"]),
    (corrupt_dtype, ["train.safetensors: tensor 'tokens' has dtype F32, expected U16"]),
    (corrupt_name, ["train.safetensors: no tensor named 'tokens' (found: ids)"]),
])
def test_damaged_token_files(tmp_path, dataset, corrupt, fragments):
    corrupt(dataset)
    run_dir = make_run(tmp_path / "run", dataset, min_train_tokens=256)
    before = snapshot(run_dir), snapshot(dataset)
    assert_one_line_error(invoke([run_dir, tmp_path / "datasets"]), *fragments)
    assert (snapshot(run_dir), snapshot(dataset)) == before


@pytest.mark.parametrize("train, model, fragments", [
    ({"dataset": "/no/such/dir"}, {}, ["dataset '/no/such/dir': not a directory", "Hugging Face repo id"]),
    ({"min_train_tokens": 10**9}, {}, ["train.safetensors: too short: training needs", "the file has 17,"]),
    ({"start_train_token": 10**9}, {}, ["start token 1,000,000,000 is past the end of the file"]),
    ({"validation_interval": 1, "validation_batches": 1000}, {},
     ["validation.safetensors: too short: validation_batches 1000"]),
    ({}, {"vocab_size": 200}, ["model.json: key 'vocab_size' (200) is smaller than the dataset's tokenizer "
                               "vocabulary (bytes: 257)"]),
])
def test_dataset_errors(tmp_path, dataset, train, model, fragments):
    run_dir = make_run(tmp_path / "run", dataset, model=model, **train)
    before = snapshot(run_dir)
    assert_one_line_error(invoke([run_dir, tmp_path / "datasets"]), *fragments)
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("train, message", [
    ({"global_batch_tokens": 1000}, "key 'global_batch_tokens' (1000) is not a multiple of world size 1 x "
     "context_length 32 = 32 tokens, so no microbatch_size splits it into whole sequences on every rank; set "
     "global_batch_tokens to 992 or 1024"),
    ({"global_batch_tokens": 192}, "key 'global_batch_tokens' (192) is not a multiple of world size 1 x "
     "microbatch_size 4 x context_length 32 = 128 tokens, so it gives no whole number of gradient accumulation "
     "steps; set global_batch_tokens to 128 or 256, or microbatch_size to 3 or 6"),
    ({"global_batch_tokens": 256, "gradient_accumulation_steps": 2}, "keys 'gradient_accumulation_steps' and "
     "'global_batch_tokens' are alternatives (global_batch_tokens derives the accumulation from the world size); "
     "give one of them"),
], ids=["not-whole-sequences", "not-whole-microbatches", "both-keys"])
def test_a_global_batch_this_world_size_cannot_split(tmp_path, dataset, train, message):
    run_dir = make_run(tmp_path / "run", dataset, **train)
    before = snapshot(run_dir)
    result = run_training([run_dir, tmp_path / "datasets"], check=False)  # the CLI, in this process
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {run_dir / 'train.json'}: {message}"]
    assert snapshot(run_dir) == before


def test_checkpoint_errors(tmp_path, dataset):
    run_dir = make_run(tmp_path / "run", dataset, min_train_tokens=256)
    assert invoke([run_dir, tmp_path / "datasets"]).exit_code == 0
    before = snapshot(run_dir)
    assert_one_line_error(invoke([run_dir, tmp_path / "datasets", "iteration-99"]),
                          "checkpoint 'iteration-99' not found", "available: latest, best, ")

    model = json.loads((run_dir / "model.json").read_text())
    (run_dir / "model.json").write_text(json.dumps({**model, "n_layers": 3}))
    before = snapshot(run_dir)
    assert_one_line_error(invoke([run_dir, tmp_path / "datasets", "latest"]),
                          "was trained with a different model.json (differs in: n_layers)")
    assert snapshot(run_dir) == before


@pytest.mark.e2e
def test_the_real_cli_prints_one_line_and_debug_shows_the_traceback(tmp_path, dataset, monkeypatch):
    run_dir = make_run(tmp_path / "run", dataset, model={"emb_dim": 33})
    from conftest import train_env
    result = run_training([run_dir, "datasets"], check=False, env=train_env())  # a process of its own
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {run_dir / 'model.json'}: key 'emb_dim' (33) must be divisible by n_heads (2)"]
    monkeypatch.setenv("DEBUG", "1")
    debug = invoke([run_dir, "datasets"])
    assert debug.exit_code == 2 and "Traceback" in debug.stderr and "must be divisible by n_heads" in debug.stderr
