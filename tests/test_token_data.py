"""The reading side of token datasets: tokenizers, token files, meta.json (the demo corpus: test_demo_corpus.py)."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch
from safetensors.numpy import load_file, save_file

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
import token_data  # noqa: E402
from batching import Microbatches  # noqa: E402
from errors import RankLocalUserError, UserError  # noqa: E402
from token_data import ByteTokenizer, TokenFileWriter, get_tokenizer, open_tokens  # noqa: E402

VERDICT = PROJECT.parent / "shared" / "data" / "the-verdict.txt"


def token_file(path, header, data=b""):
    """A safetensors file written by hand, so the reader is checked against the format, not our writer."""
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)
    return path


def tokens_header(num_tokens, dtype="U16", name="tokens"):
    return {name: {"dtype": dtype, "shape": [num_tokens], "data_offsets": [0, 2 * num_tokens]}}


def resident_bytes():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# ---------------------------------------------------------------- tokenizers

def test_gpt2_encodes_like_tiktoken_with_special_token_text_as_ordinary_text():
    text = VERDICT.read_text() + " and then <|endoftext|> appears in the text"
    expected = tiktoken.get_encoding("gpt2").encode_ordinary(text)
    tokenizer = get_tokenizer("gpt2")
    assert tokenizer.encode(text) == expected
    assert tokenizer.encode_to_array(text).dtype == np.uint16
    assert tokenizer.encode_to_array(text).tolist() == expected
    assert tokenizer.eot_id not in expected
    assert tokenizer.decode(expected) == text


def test_byte_tokenizer_round_trip():
    text = "naïve café ☕"
    tokenizer = ByteTokenizer()
    assert tokenizer.encode_to_array(text).tolist() == list(text.encode("utf-8"))
    assert tokenizer.decode(tokenizer.encode_to_array(text).tolist() + [tokenizer.eot_id]) == text


def test_a_tokenizer_stores_uint16_when_its_ids_fit_and_uint32_beyond(monkeypatch):
    assert get_tokenizer("gpt2").token_dtype == np.uint16 and ByteTokenizer.token_dtype == np.uint16
    # A real tiktoken encoding whose end-of-text id is 70,000: its ids do not fit uint16.
    big = tiktoken.Encoding(name="big", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={"<|endoftext|>": 70_000})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: big)
    tokenizer = get_tokenizer("big")
    assert tokenizer.vocab_size == 70_001 and tokenizer.token_dtype == np.uint32
    assert tokenizer.encode_to_array("ab c").dtype == np.uint32
    assert tokenizer.encode_to_array("ab c").tolist() == big.encode_ordinary("ab c")


def test_unknown_tokenizer_is_refused():
    with pytest.raises(UserError, match="unknown tokenizer 'no-such-encoding'"):
        get_tokenizer("no-such-encoding")


# ---------------------------------------------------------------- writing and reading token files

def test_writer_output_reads_back_with_safetensors_and_our_reader(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "train.safetensors"
    with TokenFileWriter(path) as writer:
        writer.write(np.arange(1000, dtype=np.uint16))
        writer.write([65535, 0])
        writer.commit()
    expected = list(range(1000)) + [65535, 0]
    assert open_tokens(path).tolist() == expected
    with safe_open(str(path), framework="np") as f:
        assert f.keys() == ["tokens"]
        assert f.get_tensor("tokens").dtype == np.uint16
        assert f.get_tensor("tokens").tolist() == expected


@pytest.mark.parametrize("dtype, bad_id", [(np.uint16, 65536), (np.uint16, -1), (np.uint32, 2**32), (np.uint32, -1)])
def test_writer_refuses_ids_that_do_not_fit_its_dtype(tmp_path, dtype, bad_id):
    with TokenFileWriter(tmp_path / "t.safetensors", dtype) as writer:
        with pytest.raises(UserError, match=f"{bad_id} does not fit in {np.dtype(dtype).name}"):
            writer.write([1, bad_id])


def test_writer_left_without_commit_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError), TokenFileWriter(tmp_path / "t.safetensors") as writer:
        writer.write([1, 2, 3])
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make_file, message", [
    (lambda p: p, "token file not found"),
    (lambda p: p.write_bytes(b"\x01\x02") and p, "only 2 bytes"),
    (lambda p: p.write_bytes(b"this is plain text, not a token file") and p, "bad header length"),
    (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"{{{{") and p, "header is not JSON"),
    (lambda p: token_file(p, tokens_header(100), b"\0" * 50), "truncated or corrupt"),
    (lambda p: token_file(p, tokens_header(4, dtype="I32"), b"\0" * 16), "dtype I32, expected U16"),
    (lambda p: token_file(p, tokens_header(4, name="ids"), b"\0" * 8), "no tensor named 'tokens' \\(found: ids\\)"),
    (lambda p: token_file(p, {"tokens": {"dtype": "U16", "shape": [2, 2], "data_offsets": [0, 8]}}, b"\0" * 8),
     "expected one dimension"),
    (lambda p: token_file(p, {"tokens": {"dtype": "U16", "shape": [4]}}, b"\0" * 8), "data_offsets None"),
], ids=["missing", "tiny", "not-safetensors", "header-not-json", "truncated", "wrong-dtype", "wrong-tensor-name",
        "two-dimensions", "no-data-offsets"])
def test_bad_token_files_give_one_clear_error(tmp_path, make_file, message):
    path = tmp_path / "train.safetensors"
    make_file(path)
    with pytest.raises(UserError, match=message):
        open_tokens(path)


def test_reads_the_end_of_a_multi_gigabyte_file_without_loading_it(tmp_path):
    num_tokens = 3 * 2**30  # 6 GiB of token data: a sparse hole, so the test writes almost nothing
    path = token_file(tmp_path / "big.safetensors", tokens_header(num_tokens))
    data_start = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(data_start + 2 * num_tokens)
        f.seek(data_start + 2 * (num_tokens - 3))
        f.write(np.array([7, 8, 9], dtype="<u2").tobytes())
    assert path.stat().st_blocks * 512 < 2**20, "the file system wrote the hole out"
    rss_before = resident_bytes()
    tokens = open_tokens(path)
    assert len(tokens) == num_tokens
    assert tokens[-4:].tolist() == [0, 7, 8, 9]
    assert tokens[num_tokens // 2:num_tokens // 2 + 1000].sum() == 0
    assert resident_bytes() - rss_before < 50 * 2**20


# ---------------------------------------------------------------- uint32 token files, and uint16 ones unchanged

def test_a_u32_file_written_by_safetensors_reads_back_memory_mapped_and_through_microbatches(tmp_path):
    # Ids a uint16 reader would wrap around, the largest uint32 among them.
    expected = np.random.default_rng(0).integers(65_536, 200_000, size=200, dtype=np.uint32)
    expected[30] = 2**32 - 1
    path = tmp_path / "train.safetensors"
    save_file({"tokens": expected}, str(path))
    tokens = open_tokens(path)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint32
    assert np.array_equal(tokens, expected)

    microbatches = Microbatches(tokens, 5, 3, 2, 8, vocab_size=2**32, path=path)
    for index in range(len(microbatches)):
        inputs, targets = microbatches[index]
        window = expected[5 + 16 * index:5 + 16 * index + 17].astype(np.int64)
        assert inputs.dtype == targets.dtype == torch.int64
        assert np.array_equal(inputs.numpy(), window[:-1].reshape(2, 8))
        assert np.array_equal(targets.numpy(), window[1:].reshape(2, 8))
    # The host-side id check sees the whole 32-bit id.
    with pytest.raises(RankLocalUserError, match=f"token 30 is id {2**32 - 1}, but the model's vocab_size is 200000"):
        Microbatches(tokens, 5, 3, 2, 8, vocab_size=200_000, path=path)[1]


def test_writer_uint32_output_loads_with_safetensors(tmp_path):
    expected = np.array([0, 65_535, 65_536, 150_256, 2**32 - 1], dtype=np.uint32)
    path = tmp_path / "train.safetensors"
    with TokenFileWriter(path, np.uint32) as writer:
        writer.write(expected[:2].astype(np.uint16))
        writer.write(expected[2:].tolist())
        writer.commit()
    loaded = load_file(str(path))
    assert list(loaded) == ["tokens"] and loaded["tokens"].dtype == np.uint32
    assert np.array_equal(loaded["tokens"], expected)
    assert np.array_equal(open_tokens(path), expected)


def test_uint16_files_are_what_they_were(tmp_path):
    """Byte for byte the files written before uint32 existed: safetensors' own layout but for the
    header's padding (ours reserves 120 bytes, to write the header once the tokens are counted)."""
    tokens = np.arange(1002, dtype=np.uint16) * 65
    with TokenFileWriter(tmp_path / "ours.safetensors") as writer:
        writer.write(tokens)
        writer.commit()
    save_file({"tokens": tokens}, str(tmp_path / "theirs.safetensors"))
    ours, theirs = (tmp_path / "ours.safetensors").read_bytes(), (tmp_path / "theirs.safetensors").read_bytes()
    header = b'{"tokens":{"dtype":"U16","shape":[1002],"data_offsets":[0,2004]}}'
    assert ours == struct.pack("<Q", 120) + header.ljust(120) + tokens.astype("<u2").tobytes()
    (their_header_length,) = struct.unpack("<Q", theirs[:8])
    assert theirs[8:8 + their_header_length].rstrip() == header and theirs[8 + their_header_length:] == ours[128:]


@pytest.mark.parametrize("dtype, found", [(np.int32, "I32"), (np.float32, "F32"), (np.uint64, "U64")])
def test_a_token_file_of_another_dtype_is_one_error_line_naming_the_valid_ones(tmp_path, dtype, found):
    path = tmp_path / "train.safetensors"
    save_file({"tokens": np.arange(4, dtype=dtype)}, str(path))
    with pytest.raises(UserError) as error:
        open_tokens(path)
    assert str(error.value) == f"{path}: tensor 'tokens' has dtype {found}, expected U16 (uint16) or U32 (uint32)"


# ---------------------------------------------------------------- meta.json, staging

def test_meta_defaults_to_gpt2_and_rejects_a_broken_file(tmp_path):
    assert token_data.read_meta(tmp_path) == token_data.DatasetMeta("gpt2", 50257, 50256)
    # As written before meta.json recorded the token dtype.
    (tmp_path / "meta.json").write_text('{"tokenizer": "bytes", "vocab_size": 257, "eot_id": 256}')
    assert token_data.read_meta(tmp_path) == token_data.DatasetMeta("bytes", 257, 256)
    (tmp_path / "meta.json").write_text('{"tokenizer": "bytes"}')
    with pytest.raises(UserError, match="not a valid dataset meta.json"):
        token_data.read_meta(tmp_path)


def test_staged_directory_appears_only_when_complete(tmp_path):
    final = tmp_path / "dataset"
    with pytest.raises(RuntimeError), token_data.staged_directory(final) as staging:
        (staging / "train.safetensors").write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    final.mkdir()
    (final / "old.txt").write_text("old")
    with token_data.staged_directory(final) as staging:
        (staging / "new.txt").write_text("new")
        assert not (final / "new.txt").exists()
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["dataset"]


# ---------------------------------------------------------------- the command line

@pytest.mark.e2e
@pytest.mark.parametrize("write_train, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-10]), "truncated or corrupt"),
    (lambda p: save_file({"tokens": np.arange(8, dtype=np.int32)}, str(p)), "dtype I32, expected U16"),
    (lambda p: save_file({"input_ids": np.arange(8, dtype=np.uint16)}, str(p)), "no tensor named 'tokens'"),
], ids=["truncated", "wrong-dtype", "wrong-tensor-name"])
def test_cli_reports_a_bad_token_file_in_one_line(tmp_path, write_train, message):
    for split in token_data.SPLITS:
        with TokenFileWriter(tmp_path / f"{split}.safetensors") as writer:
            writer.write(np.arange(100, dtype=np.uint16))
            writer.commit()
    write_train(tmp_path / "train.safetensors")
    result = subprocess.run([sys.executable, str(PROJECT / "token_data.py"), str(tmp_path)],
                            capture_output=True, text=True, env=os.environ, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message.split("'")[0] in result.stderr and "Traceback" not in result.stderr


@pytest.mark.e2e
def test_cli_describes_a_good_dataset(tmp_path):
    for split, count in (("train", 100), ("validation", 10)):
        with TokenFileWriter(tmp_path / f"{split}.safetensors") as writer:
            writer.write(np.arange(count, dtype=np.uint16))
            writer.commit()
    result = subprocess.run([sys.executable, str(PROJECT / "token_data.py"), str(tmp_path)],
                            capture_output=True, text=True, env=os.environ, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "tokenizer gpt2" in result.stdout and "train: 100 tokens" in result.stdout
    assert "validation: 10 tokens" in result.stdout


def write_downloaded_copy(dataset_dir):
    dataset_dir.mkdir(parents=True)
    for split in token_data.SPLITS:
        with token_data.TokenFileWriter(dataset_dir / f"{split}.safetensors") as writer:
            writer.write(np.arange(100, dtype=np.uint16))
            writer.commit()


def test_hub_datasets_offline_use_a_local_copy_and_fail_clearly_without_one(tmp_path, monkeypatch):
    """The real snapshot_download in offline mode: it returns a copy already on disk (as the
    reference harness downloaded it); with none, one clear error line."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    dataset_dir = tmp_path / "datasets" / "gpjt" / "fineweb-gpt2-tokens"
    write_downloaded_copy(dataset_dir)
    assert token_data.fetch_dataset("gpjt/fineweb-gpt2-tokens", tmp_path / "datasets") == dataset_dir
    with pytest.raises(UserError, match="'gpjt/not-downloaded': no such directory .*; as a Hugging Face Hub dataset "
                                        "repo id it failed: "):
        token_data.fetch_dataset("gpjt/not-downloaded", tmp_path / "datasets")


def test_a_failing_hub_falls_back_to_the_local_copy_and_is_asked_once_per_dataset(tmp_path, monkeypatch, capsys):
    """The Hub cannot be reached from tests, so snapshot_download is replaced: first by one
    that fails (an outage), then by one that records calls (a later, successful download)."""
    import huggingface_hub

    dataset_dir = tmp_path / "datasets" / "gpjt" / "fineweb-gpt2-tokens"
    write_downloaded_copy(dataset_dir)

    def outage(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", outage)
    assert token_data.fetch_dataset("gpjt/fineweb-gpt2-tokens", tmp_path / "datasets") == dataset_dir
    assert "could not check 'gpjt/fineweb-gpt2-tokens' on the Hub (ConnectionError); using the local copy" \
        in capsys.readouterr().err

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append((a, k)))
    for _ in range(2):
        token_data.fetch_dataset("gpjt/fineweb-gpt2-tokens", tmp_path / "datasets")
    assert calls == [(("gpjt/fineweb-gpt2-tokens",), {"repo_type": "dataset", "local_dir": dataset_dir})]


# ---------------------------------------------------------------- where train.json's `dataset` is looked for

@pytest.fixture()
def run_and_cwd(tmp_path, monkeypatch):
    """A run directory and a different current directory."""
    run_dir, cwd = tmp_path / "run", tmp_path / "cwd"
    run_dir.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return run_dir, cwd


def test_a_relative_dataset_path_is_looked_for_in_the_run_directory_then_the_current_one(tmp_path, run_and_cwd):
    run_dir, cwd = run_and_cwd
    (cwd / "data" / "mine").mkdir(parents=True)
    # "data/mine" has the form of a Hub repo id too: a directory of that name wins.
    assert token_data.dataset_location("data/mine", tmp_path / "datasets", run_dir) == ("local", cwd / "data" / "mine")
    (run_dir / "data" / "mine").mkdir(parents=True)
    assert token_data.dataset_location("data/mine", tmp_path / "datasets", run_dir) == \
        ("local", run_dir / "data" / "mine")
    assert token_data.dataset_location("data/other", tmp_path / "datasets", run_dir) == \
        ("hub", tmp_path / "datasets" / "data" / "other")


def test_a_dataset_found_nowhere_says_where_it_was_looked_for(tmp_path, run_and_cwd, monkeypatch):
    run_dir, cwd = run_and_cwd
    with pytest.raises(UserError) as error:
        token_data.dataset_location("./mine", tmp_path / "datasets", run_dir)
    assert str(error.value) == (f"dataset './mine': not a directory (looked for {run_dir / 'mine'} and "
                                f"{cwd / 'mine'}), not 'demo', and not a Hugging Face repo id like "
                                "'gpjt/fineweb-gpt2-tokens'")

    import huggingface_hub

    def unknown_repo(*args, **kwargs):  # the Hub cannot be reached from tests
        raise FileNotFoundError("no such repo")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unknown_repo)
    with pytest.raises(UserError) as error:
        token_data.fetch_dataset("data/mine", tmp_path / "datasets", run_dir)
    assert str(error.value).startswith(f"dataset 'data/mine': no such directory (looked for "
                                       f"{run_dir / 'data' / 'mine'} and {cwd / 'data' / 'mine'}); as a Hugging "
                                       "Face Hub dataset repo id it failed: FileNotFoundError: no such repo. ")
