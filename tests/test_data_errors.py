"""Problems in the data or with the dataset configuration, through the real trainer:
one `error:` line naming the file, the key and what would be valid, exit status 2."""

import numpy as np
import pytest
from click.testing import CliRunner

import ddp_train
from conftest import SHARED_DATA, make_run, run_training, write_byte_dataset
from token_data import ByteTokenizer, TokenFileWriter, write_meta


def write_tokens(dataset_dir, split, tokens):
    with TokenFileWriter(dataset_dir / f"{split}.safetensors") as writer:
        writer.write(tokens)
        writer.commit()


def assert_one_error_line(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    # The progress bar may have drawn on stderr before the error: the error is its last line, and the only one.
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error")] == lines[-1:], result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


@pytest.mark.e2e
def test_a_token_id_beyond_the_models_vocabulary_is_one_error_line_not_a_crash(tmp_path):
    # Without the check this is a raw IndexError from the embedding on CPU (a device-side assert on a GPU).
    dataset_dir = tmp_path / "bytes"
    dataset_dir.mkdir()
    train = np.frombuffer((SHARED_DATA / "the-verdict.txt").read_bytes(), dtype=np.uint8).astype(np.uint16)
    train[300] = 4_000
    write_tokens(dataset_dir, "train", train)
    write_tokens(dataset_dir, "validation", train[:1_000])
    write_meta(dataset_dir, ByteTokenizer())
    run_dir = make_run(tmp_path / "run", dataset_dir, min_train_tokens=1_024)
    result = run_training([run_dir, tmp_path / "datasets"], check=False)
    assert_one_error_line(result, f"{dataset_dir / 'train.safetensors'}: token 300 is id 4000, but the model's "
                                  "vocab_size is 257 (model.json key 'vocab_size'")


def test_a_relative_dataset_path_is_found_in_the_run_directory_and_named_in_errors(tmp_path):
    # An in-process run that stops at the data checks: the error names the dataset found in the run
    # directory (not the current one, not a Hub repo) and train.json's key with the value that fits.
    run_dir = make_run(tmp_path / "run", "verdict", start_train_token=10**8)
    write_byte_dataset(run_dir / "verdict", (SHARED_DATA / "the-verdict.txt").read_text())
    result = CliRunner().invoke(ddp_train.main, [str(run_dir), str(tmp_path / "datasets")])
    assert result.exit_code == 2, result.output
    # 17,479 tokens: the story's bytes less 3,000 for validation; 17350 leaves one global batch (128) and 1.
    assert result.stderr.strip() == (
        f"error: {run_dir / 'verdict' / 'train.safetensors'}: start token 100,000,000 is past the end of the file "
        f"(17,479 tokens); in {run_dir / 'train.json'} set start_train_token to at most 17350")


def test_an_empty_validation_split_says_which_dataset_to_rebuild_and_how(tmp_path):
    dataset_dir = write_byte_dataset(tmp_path / "one-document", (SHARED_DATA / "the-verdict.txt").read_text())
    write_tokens(dataset_dir, "validation", [])  # what prepare_datasets.py wrote for a single text file
    run_dir = make_run(tmp_path / "run", dataset_dir, validation_interval=10)
    result = CliRunner().invoke(ddp_train.main, [str(run_dir), str(tmp_path / "datasets")])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        f"error: {dataset_dir / 'validation.safetensors'}: too short: validation_batches 100 x microbatch_size 4 x "
        f"context_length 32 from start_val_token 0 need 12,801 tokens but the file has 0; in {run_dir / 'train.json'} "
        f"set validation_interval to null to train without validation; or rebuild {dataset_dir} with "
        "prepare_datasets.py from more documents or with a larger --validation-fraction")
