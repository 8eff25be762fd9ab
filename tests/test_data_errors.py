"""Problems in the data or with the dataset configuration, through the real trainer:
one `error:` line naming the file, the key and what would be valid, exit status 2."""

import numpy as np

from conftest import SHARED_DATA, make_run, run_training
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
