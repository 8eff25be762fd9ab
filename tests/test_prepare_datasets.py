"""prepare_datasets.py: sources, tokenization, the split, atomic output and the Hub calls.

Expected tokens always come from tiktoken (or the raw UTF-8 bytes) directly, never
from the pipeline's own output. Most runs are in-process through click's CliRunner;
the interruption and bad-input tests run the script as a real subprocess.
"""

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
from click.testing import CliRunner
from safetensors import safe_open

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
import prepare_datasets  # noqa: E402
import token_data  # noqa: E402

SCRIPT = PROJECT / "prepare_datasets.py"
VERDICT = PROJECT.parent / "shared" / "data" / "the-verdict.txt"
GPT2_EOT = 50256
TIKTOKEN_PLUGIN_DIR = Path(__file__).resolve().parent / "tiktoken_plugin"


@pytest.fixture(scope="module")
def gpt2():
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def paragraphs():
    """The 83 paragraphs of a real short story, one document each."""
    return [p for p in VERDICT.read_text().split("\n\n") if p.strip()]


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: text, "id": i}) + "\n" for i, text in enumerate(texts)))
    return path


def prepare(*args):
    result = CliRunner().invoke(prepare_datasets.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env=os.environ, timeout=120)


def split_tokens(out_dir, split):
    return token_data.open_split(out_dir, split).tolist()


def expected_streams(documents, fraction, encode, eot_id):
    """Each split's token stream by the split rule, from an independent encoder."""
    streams = {split: [] for split in token_data.SPLITS}
    for index, text in enumerate(documents):
        split = "validation" if token_data.is_validation_document(index, fraction) else "train"
        streams[split] += encode(text) + [eot_id]
    return streams


def meta(out_dir):
    return json.loads((out_dir / "meta.json").read_text())


# ---------------------------------------------------------------- tokenization and the split

def test_gpt2_jsonl_round_trip_with_end_of_text_after_every_document(tmp_path, gpt2, paragraphs):
    source = write_jsonl(tmp_path / "story.jsonl", paragraphs)
    prepare(tmp_path / "out", source, "--validation-fraction", 0.3, "--workers", 2, "--batch-size", 10)
    expected = expected_streams(paragraphs, 0.3, gpt2.encode_ordinary, GPT2_EOT)
    assert expected["validation"], "the fraction should put some paragraphs in validation"
    for split in token_data.SPLITS:
        tokens = split_tokens(tmp_path / "out", split)
        assert tokens == expected[split]
        documents = gpt2.decode(tokens).split("<|endoftext|>")
        assert documents[-1] == "" and set(documents[:-1]) <= set(paragraphs)
    facts = meta(tmp_path / "out")
    assert facts["tokenizer"] == "gpt2" and facts["vocab_size"] == 50257 and facts["eot_id"] == GPT2_EOT
    assert facts["token_dtype"] == "uint16"
    assert facts["tokens"] == {split: len(expected[split]) for split in token_data.SPLITS}
    assert facts["documents"]["train"] + facts["documents"]["validation"] == len(paragraphs)
    assert facts["validation_fraction"] == 0.3 and str(source) in facts["source"]
    assert facts["tool"].startswith("prepare_datasets.py ")


def test_literal_end_of_text_in_a_document_is_ordinary_text(tmp_path, gpt2):
    text = "The page said <|endoftext|> in the middle."
    prepare(tmp_path / "out", write_jsonl(tmp_path / "d.jsonl", [text]), "--validation-fraction", 0)
    tokens = split_tokens(tmp_path / "out", "train")
    assert tokens == gpt2.encode_ordinary(text) + [GPT2_EOT]
    assert tokens.count(GPT2_EOT) == 1


def test_byte_tokenizer_on_a_directory_of_text_files(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    shutil.copy(VERDICT, corpus / "b_verdict.txt")
    (corpus / "sub" / "c.txt").write_text("naïve café")
    (corpus / "a.txt").write_text("first")
    (corpus / ".hidden.txt").write_text("skipped")
    (corpus / "notes.md").write_text("skipped too")
    prepare(tmp_path / "out", corpus, "--tokenizer", "bytes", "--validation-fraction", 0)
    texts = ["first", VERDICT.read_text(), "naïve café"]  # sorted by path: a.txt, b_verdict.txt, sub/c.txt
    assert split_tokens(tmp_path / "out", "train") == [t for text in texts for t in [*text.encode(), 256]]
    assert meta(tmp_path / "out")["tokenizer"] == "bytes" and meta(tmp_path / "out")["eot_id"] == 256


def test_parquet_source_with_a_named_column_read_in_record_batches(tmp_path, gpt2, paragraphs):
    texts = paragraphs[:40] + [None] + paragraphs[40:]  # a null text is not a document
    table = pa.table({"id": list(range(len(texts))), "content": texts})
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=16)
    prepare(tmp_path / "out", tmp_path / "part.parquet", "--text-field", "content", "--validation-fraction", 0.2)
    expected = expected_streams(paragraphs, 0.2, gpt2.encode_ordinary, GPT2_EOT)
    assert {split: split_tokens(tmp_path / "out", split) for split in token_data.SPLITS} == expected


def test_split_is_byte_identical_for_any_workers_and_batch_size(tmp_path, paragraphs):
    source = write_jsonl(tmp_path / "story.jsonl", paragraphs * 3)
    runs = [(1, 256), (2, 1), (2, 7)]
    for workers, batch_size in runs:
        prepare(tmp_path / f"out-{workers}-{batch_size}", source, "--validation-fraction", 0.1,
                "--workers", workers, "--batch-size", batch_size)
    for name in ("train.safetensors", "validation.safetensors", "meta.json"):
        contents = {(tmp_path / f"out-{w}-{b}" / name).read_bytes() for w, b in runs}
        assert len(contents) == 1, f"{name} differs between runs"


def test_max_tokens_caps_each_split_and_stops(tmp_path, gpt2, paragraphs):
    source = write_jsonl(tmp_path / "story.jsonl", paragraphs)
    prepare(tmp_path / "out", source, "--validation-fraction", 0.3, "--max-tokens", 1000, "--batch-size", 4)
    expected = expected_streams(paragraphs, 0.3, gpt2.encode_ordinary, GPT2_EOT)
    train = split_tokens(tmp_path / "out", "train")
    validation = split_tokens(tmp_path / "out", "validation")
    assert train == expected["train"][:1000]
    assert 0 < len(validation) < len(expected["validation"])  # the run stopped once train was full
    assert validation == expected["validation"][:len(validation)]
    assert meta(tmp_path / "out")["documents"]["train"] == train.count(GPT2_EOT) + (train[-1] != GPT2_EOT)


def test_output_opens_with_safetensors_and_token_data(tmp_path, paragraphs):
    prepare(tmp_path / "out", write_jsonl(tmp_path / "s.jsonl", paragraphs), "--validation-fraction", 0.2)
    for split in token_data.SPLITS:
        with safe_open(str(tmp_path / "out" / f"{split}.safetensors"), framework="np") as f:
            assert f.keys() == ["tokens"]
            tokens = f.get_tensor("tokens")
        assert tokens.dtype == np.uint16 and tokens.ndim == 1
        assert np.array_equal(tokens, token_data.open_split(tmp_path / "out", split))
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\n") and "| train |" in card


def test_invalid_utf8_is_replaced_and_the_replaced_bytes_counted_in_the_summary_and_meta(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    # Invalid: a lone start byte (1 byte), two bytes that never start a character (2), a 3-byte character
    # cut after 2 bytes (2, one U+FFFD); a U+FFFD that was in the data already is valid UTF-8.
    latin1 = "café ok ".encode("latin-1") + b"\xff\xfe end \xe2\x82x " + "\ufffd".encode()
    (corpus / "a.txt").write_bytes(latin1)
    (corpus / "b.jsonl").write_bytes(b'{"text": "one \x80 byte"}\n')
    (corpus / "c.txt").write_text("clean")
    result = prepare(tmp_path / "out", corpus, "--tokenizer", "bytes", "--validation-fraction", 0, "--workers", 1)
    texts = [latin1.decode("utf-8", errors="replace"), "one \ufffd byte", "clean"]
    assert split_tokens(tmp_path / "out", "train") == [t for text in texts for t in [*text.encode(), 256]]
    assert meta(tmp_path / "out")["replaced_invalid_utf8_bytes"] == 6
    assert (f"  replaced 6 bytes of invalid UTF-8 with U+FFFD in 2 files ({corpus / 'a.txt'}: 5, "
            f"{corpus / 'b.jsonl'}: 1)") in result.stdout.splitlines()


# ---------------------------------------------------------------- a corpus too small for the split

@pytest.mark.parametrize("source, fraction, split", [
    ("one-file", 0.01, "empty"),
    ("83-documents", 0.01, "empty"),
    ("83-documents", 0.05, "small"),
])
def test_a_validation_split_that_is_empty_or_tiny_is_a_warning_with_the_numbers(tmp_path, gpt2, paragraphs,
                                                                                 source, fraction, split):
    documents = [VERDICT.read_text()] if source == "one-file" else paragraphs
    path = VERDICT if source == "one-file" else write_jsonl(tmp_path / "s.jsonl", paragraphs)
    result = prepare(tmp_path / "out", path, "--validation-fraction", fraction, "--workers", 1)
    expected = expected_streams(documents, fraction, gpt2.encode_ordinary, GPT2_EOT)
    in_validation = sum(token_data.is_validation_document(i, fraction) for i in range(len(documents)))
    numbers = (f"--validation-fraction {fraction} of {len(documents)} document{'s' * (len(documents) > 1)} put "
               f"{in_validation} in validation (train: {len(expected['train']):,} tokens, validation: "
               f"{len(expected['validation']):,} tokens)")
    advice = {"empty": "; ddp_train.py refuses it when train.json sets validation_interval: give more documents "
                       "(a .txt file is one document) or a larger --validation-fraction, or train with "
                       "validation_interval null",
              "small": "; its loss will be noisy: give more documents (a .txt file is one document) or a larger "
                       "--validation-fraction"}[split]
    assert result.stderr.strip().splitlines()[-1] == f"warning: the validation split is {split}: {numbers}{advice}"
    assert token_data.is_complete(tmp_path / "out")


# ---------------------------------------------------------------- atomic output

@pytest.mark.e2e
def test_killed_run_leaves_nothing_that_looks_finished(tmp_path, paragraphs):
    # The second source is a FIFO that the test holds open without writing to it: once
    # the run has tokenized the first source it waits there, certainly mid-run with
    # tokens on disk, and the test SIGKILLs it and its workers.
    story = write_jsonl(tmp_path / "story.jsonl", paragraphs * 3)
    fifo = tmp_path / "stream.txt"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    partial_tokens = tmp_path / "out.partial" / "train.safetensors.partial"
    with open(tmp_path / "output", "w") as output:
        process = subprocess.Popen([sys.executable, str(SCRIPT), str(out), str(story), str(fifo), "--workers", "1",
                                    "--batch-size", "4"], stdout=output, stderr=output, env=os.environ,
                                   start_new_session=True)
    writer = None
    try:
        deadline = time.monotonic() + 60
        while writer is None or not (partial_tokens.exists() and partial_tokens.stat().st_size > 10_000):
            assert process.poll() is None, (tmp_path / "output").read_text()
            assert time.monotonic() < deadline, "the run never got to the FIFO with tokens written"
            if writer is None:
                with contextlib.suppress(OSError):  # ENXIO until the run opens the FIFO for reading
                    writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        if writer is not None:
            os.close(writer)
    assert process.returncode == -signal.SIGKILL
    assert not (out / "train.safetensors").exists() and not (out / "meta.json").exists()
    assert not token_data.is_complete(out)
    # The next run clears the leftovers and finishes.
    prepare(out, story)
    assert token_data.is_complete(out) and not (tmp_path / "out.partial").exists()


def test_failure_mid_run_leaves_nothing(tmp_path, paragraphs):
    source = tmp_path / "s.jsonl"
    write_jsonl(source, paragraphs * 5)
    source.write_text(source.read_text() + "{not json\n")
    result = CliRunner().invoke(prepare_datasets.main, [str(tmp_path / "out"), str(source), "--batch-size", "8"])
    assert result.exit_code == 2 and f"{source}:{len(paragraphs) * 5 + 1}: not JSON" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl"]


def test_rerun_on_a_finished_dataset_is_refused_and_leaves_it_untouched(tmp_path, paragraphs):
    out = tmp_path / "out"
    prepare(out, write_jsonl(tmp_path / "a.jsonl", paragraphs))
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    result = CliRunner().invoke(prepare_datasets.main, [str(out), str(write_jsonl(tmp_path / "b.jsonl", ["other"]))])
    assert result.exit_code == 2
    assert "already holds a finished dataset; pass --overwrite" in result.stderr
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    prepare(out, tmp_path / "b.jsonl", "--overwrite", "--validation-fraction", 0)
    assert split_tokens(out, "train") == tiktoken.get_encoding("gpt2").encode_ordinary("other") + [GPT2_EOT]


def test_directory_with_other_files_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    result = CliRunner().invoke(prepare_datasets.main, [str(out), str(VERDICT), "--overwrite"])
    assert result.exit_code == 2 and "not part of a dataset (thesis.tex)" in result.stderr
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


class DiskWithRoomFor:
    """`open` on a disk with `free` bytes left: writing past them fails with ENOSPC, as on a
    full disk. Mocked because a full file system cannot be made here (no mount, no loop device)."""

    def __init__(self, free):
        self.free = free

    def open(self, path, mode="r", **kwargs):
        file = open(path, mode, **kwargs)
        return FileOnDisk(file, self) if "w" in mode else file


class FileOnDisk:
    def __init__(self, file, disk):
        self.file, self.disk = file, disk

    def write(self, data):
        if len(data) > self.disk.free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.disk.free -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_a_full_disk_is_one_error_line_and_leaves_the_earlier_dataset_as_it_was(tmp_path, monkeypatch, paragraphs):
    out = tmp_path / "out"
    source = write_jsonl(tmp_path / "s.jsonl", paragraphs * 5)
    prepare(out, source, "--validation-fraction", 0, "--workers", 1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(token_data, "open", DiskWithRoomFor(20_000).open, raising=False)
    result = CliRunner().invoke(prepare_datasets.main, [str(out), str(source), "--overwrite", "--validation-fraction",
                                                        "0", "--workers", "1", "--batch-size", "8"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and re.fullmatch(
        rf"error: {re.escape(str(out))}\.partial/train\.safetensors\.partial: No space left on device "
        r"\(writing [\d,]+ bytes of tokens after [\d,]+\)", errors[0]), result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "s.jsonl"]


def test_an_output_directory_that_cannot_be_made_is_one_error_line(tmp_path):
    # A read-only directory cannot be made here: the tests run as root, whom chmod does not stop.
    # A parent that is a file refuses the output at the same first write, with its own cause.
    (tmp_path / "a-file").write_text("precious")
    result = CliRunner().invoke(prepare_datasets.main, [str(tmp_path / "a-file" / "out"), str(VERDICT)])
    assert result.exit_code == 2
    assert result.stderr == f"error: {tmp_path / 'a-file' / 'out.partial'}: Not a directory (creating the directory)\n"
    assert (tmp_path / "a-file").read_text() == "precious"


# ---------------------------------------------------------------- a vocabulary beyond uint16

@pytest.fixture()
def gpt2_shifted(monkeypatch):
    """The tiktoken encoding `gpt2_shifted` (tests/tiktoken_plugin: GPT-2's ids plus 100,000), known to
    this process and to the worker processes. It mocks only what cannot exist offline: an encoding
    with over 65,536 ids, such as cl100k_base, whose BPE files would have to be downloaded."""
    tiktoken.list_encoding_names()  # this process's plugin discovery, done before the plugin is on sys.path
    # Workers are fresh processes started with this sys.path: their discovery finds the plugin.
    monkeypatch.syspath_prepend(TIKTOKEN_PLUGIN_DIR)
    from tiktoken_ext.gpt2_shifted import ENCODING_CONSTRUCTORS, SHIFT

    monkeypatch.setitem(tiktoken.registry.ENCODING_CONSTRUCTORS, "gpt2_shifted", ENCODING_CONSTRUCTORS["gpt2_shifted"])
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", dict(tiktoken.registry.ENCODINGS))
    return SHIFT


def test_a_worker_that_cannot_start_fails_its_tasks_instead_of_restarting_forever():
    """A pool whose initializer raises starts a new worker in its place, again and again,
    and the run would wait forever; the worker's error must come back with its first task."""
    import multiprocessing

    from errors import UserError

    context = multiprocessing.get_context("forkserver")
    with context.Pool(1, initializer=prepare_datasets.start_worker, initargs=("no-such-encoding", 0.1)) as pool:
        task = pool.apply_async(prepare_datasets.tokenize_batch, ((0, ["a document"]),))
        with pytest.raises(UserError, match="unknown tokenizer 'no-such-encoding'"):
            task.get(timeout=60)


def test_a_vocabulary_beyond_uint16_is_stored_as_uint32(tmp_path, gpt2, paragraphs, gpt2_shifted):
    out = tmp_path / "out"
    prepare(out, write_jsonl(tmp_path / "s.jsonl", paragraphs), "--tokenizer", "gpt2_shifted",
            "--validation-fraction", 0.3, "--workers", 1)
    expected = expected_streams(paragraphs, 0.3, gpt2.encode_ordinary, GPT2_EOT)
    for split in token_data.SPLITS:
        tokens = token_data.open_split(out, split)
        assert tokens.dtype == np.uint32 and tokens.max() > 65_535
        assert (tokens - gpt2_shifted).tolist() == expected[split]
    facts = meta(out)
    assert (facts["vocab_size"], facts["eot_id"], facts["token_dtype"]) == (150_257, 150_256, "uint32")
    assert "one 1-D uint32 tensor `tokens`" in (out / "README.md").read_text()
    assert f"train: {len(expected['train']):,} tokens (uint32)" in token_data.describe_dataset(out)


# ---------------------------------------------------------------- refusing bad input


def write_parquet_with_column(path, column):
    pq.write_table(pa.table({column: ["a document"]}), path)
    return path


@pytest.mark.e2e
@pytest.mark.parametrize("make_args, message", [
    (lambda tmp: [tmp / "no-such-file.jsonl"], "no-such-file.jsonl: no such file or directory"),
    (lambda tmp: [write_parquet_with_column(tmp / "p.parquet", "body")], "no column 'text' (columns: body)"),
    (lambda tmp: [write_jsonl(tmp / "j.jsonl", ["x"], field="body")], "j.jsonl:1: no field 'text' (fields: body, id)"),
    (lambda tmp: [(tmp / "f.csv").write_text("a,b") and tmp / "f.csv"], "cannot read '.csv' files"),
    (lambda tmp: ["HuggingFaceFW/fineweb"], "give --hub-pattern"),
    (lambda tmp: [VERDICT, "--validation-fraction", "1.5"], "Invalid value for '--validation-fraction'"),
], ids=["missing-file", "wrong-parquet-column", "wrong-jsonl-field", "unknown-file-type", "hub-id-without-pattern",
        "bad-option-value"])
def test_bad_input_gives_one_error_line_and_exit_code_2(tmp_path, make_args, message):
    result = run_script(tmp_path / "out", *make_args(tmp_path))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    if not message.startswith("Invalid value"):  # click's own usage errors have their own format
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the Hub

def test_hub_source_is_downloaded_with_the_pattern_and_filtered(tmp_path, monkeypatch, gpt2, paragraphs):
    # No Hub is reachable in tests: the real snapshot_download call is replaced by a copy of a
    # local directory laid out like the repo, after checking what it was asked for. The copy
    # includes files outside the pattern, as a snapshot with earlier downloads would.
    repo = tmp_path / "repo"
    (repo / "sample" / "10BT").mkdir(parents=True)
    (repo / "data").mkdir()
    for name, texts in (("001.parquet", paragraphs[40:]), ("000.parquet", paragraphs[:40])):
        pq.write_table(pa.table({"text": texts}), repo / "sample" / "10BT" / name)
    pq.write_table(pa.table({"text": ["not in the sample"]}), repo / "data" / "other.parquet")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        snapshot = tmp_path / "cache" / "snapshot"
        shutil.copytree(repo, snapshot)
        return str(snapshot)

    monkeypatch.setattr(prepare_datasets, "snapshot_download", fake_snapshot_download)
    prepare(tmp_path / "out", "HuggingFaceFW/fineweb", "--hub-pattern", "sample/10BT/*.parquet",
            "--download-dir", tmp_path / "cache", "--validation-fraction", 0)
    assert calls == [("HuggingFaceFW/fineweb", {"repo_type": "dataset", "allow_patterns": "sample/10BT/*.parquet",
                                                 "cache_dir": tmp_path / "cache"})]
    expected = [t for paragraph in paragraphs for t in gpt2.encode_ordinary(paragraph) + [GPT2_EOT]]
    assert split_tokens(tmp_path / "out", "train") == expected
    assert meta(tmp_path / "out")["source"] == "Hugging Face dataset HuggingFaceFW/fineweb (sample/10BT/*.parquet)"


def test_push_to_hub_uploads_the_dataset_folder(tmp_path, monkeypatch, paragraphs):
    # No Hub is reachable in tests: the HfApi methods are replaced by recorders and the
    # test checks what they were asked to do.
    calls = []
    monkeypatch.setattr(prepare_datasets.HfApi, "create_repo",
                        lambda self, repo_id, **kwargs: calls.append(("create_repo", repo_id, kwargs)))
    monkeypatch.setattr(prepare_datasets.HfApi, "upload_folder",
                        lambda self, **kwargs: calls.append(("upload_folder", kwargs)))
    out = tmp_path / "out"
    prepare(out, write_jsonl(tmp_path / "s.jsonl", paragraphs), "--push-to-hub", "me/verdict-gpt2")
    # Re-running on the finished dataset uploads it again without rebuilding (retrying a failed upload).
    prepare(out, tmp_path / "s.jsonl", "--push-to-hub", "me/verdict-gpt2")
    create = ("create_repo", "me/verdict-gpt2", {"repo_type": "dataset", "exist_ok": True})
    upload = ("upload_folder", {"repo_id": "me/verdict-gpt2", "repo_type": "dataset", "folder_path": out,
                                "allow_patterns": list(prepare_datasets.DATASET_FILES),
                                "commit_message": "Upload out"})
    assert calls == [create, upload, create, upload]
    assert sorted(p.name for p in out.iterdir()) == sorted(prepare_datasets.DATASET_FILES)
