"""The built-in demo corpus: pieces of whole lines, a validation split no file dominates,
the corpus version in meta.json, and the same bytes on every build."""

import collections
import json
import shutil
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
import token_data  # noqa: E402
from token_data import ByteTokenizer  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
DEMO_RUN = PROJECT / "runs" / "demo"
# "No file more than a few percent of validation".
MAX_VALIDATION_SHARE_OF_ONE_FILE = 0.04


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory):
    dataset_dir = tmp_path_factory.mktemp("datasets") / token_data.DEMO_DATASET_DIRNAME
    token_data.build_demo_dataset(dataset_dir)
    return dataset_dir


@pytest.fixture(scope="module")
def pieces_by_file():
    return {name: token_data.split_into_pieces(data, token_data.DEMO_PIECE_BYTES)
            for name, data in token_data.demo_source_files()}


def pieces_in(dataset_dir, split):
    """The byte strings between end-of-text tokens of a split's token file."""
    tokens = np.asarray(token_data.open_split(dataset_dir, split))
    assert tokens[-1] == ByteTokenizer.eot_id
    ends = np.flatnonzero(tokens == ByteTokenizer.eot_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[start:end].astype(np.uint8).tobytes() for start, end in zip(starts, ends)]


def test_split_into_pieces_cuts_after_newlines_and_only_overlong_lines_inside():
    lines = [b"a" * 5 + b"\n", b"b" * 3 + b"\n", b"c" * 12 + b"\n", b"\xc3\xa9\n", b"tail"]
    assert token_data.split_into_pieces(b"".join(lines), 10) == [
        lines[0] + lines[1], b"c" * 10, b"cc\n" + lines[3] + lines[4]]
    assert token_data.split_into_pieces(b"", 10) == []


def test_every_source_file_is_pieces_of_whole_lines_within_the_limit(pieces_by_file):
    assert len(pieces_by_file) > 500
    for name, pieces in pieces_by_file.items():
        assert b"".join(pieces) == (STDLIB / name).read_bytes().decode("utf-8", "replace").encode(), name
        assert all(0 < len(piece) <= token_data.DEMO_PIECE_BYTES for piece in pieces), name
        for piece, following in zip(pieces, pieces[1:]):
            assert piece.endswith(b"\n"), name
            # As many whole lines as fit: the next one would not have.
            assert len(piece) + len(following.split(b"\n")[0]) + 1 > token_data.DEMO_PIECE_BYTES, name


def test_the_generated_tables_are_left_out_and_every_other_source_file_is_in(pieces_by_file):
    sources = {path.relative_to(STDLIB).as_posix() for path in STDLIB.rglob("*.py")
               if not {"test", "tests", "idle_test", "site-packages", "dist-packages"} & set(path.relative_to(STDLIB).parts)}
    left_out = sources - set(pieces_by_file)
    assert "pydoc_data/topics.py" in left_out and "encodings/cp437.py" in left_out
    assert "encodings/utf_8.py" in pieces_by_file and "inspect.py" in pieces_by_file
    assert all(path == "pydoc_data/topics.py" or path.startswith(("encodings/", "_sysconfigdata_"))
               or path in ("html/entities.py", "stringprep.py", "re/_casefix.py")
               for path in left_out), sorted(left_out)


def test_the_dataset_holds_every_piece_once_and_no_file_dominates_validation(demo_dataset, pieces_by_file):
    train, validation = pieces_in(demo_dataset, "train"), pieces_in(demo_dataset, "validation")
    expected = collections.Counter(piece for pieces in pieces_by_file.values() for piece in pieces)
    assert collections.Counter(train + validation) == expected
    # Each validation piece's file, from the pieces' bytes; a piece found in several files counts for each.
    files_of = collections.defaultdict(set)
    for name, pieces in pieces_by_file.items():
        for piece in pieces:
            files_of[piece].add(name)
    validation_tokens = sum(len(piece) + 1 for piece in validation)
    tokens_of_file = collections.Counter()
    for piece in validation:
        for name in files_of[piece]:
            tokens_of_file[name] += len(piece) + 1
    assert len(tokens_of_file) >= 30
    assert max(tokens_of_file.values()) / validation_tokens <= MAX_VALIDATION_SHARE_OF_ONE_FILE
    # The demo run scores the whole split: its validation window fits, and leaves little out.
    model, train_cfg = (json.loads((DEMO_RUN / name).read_text()) for name in ("model.json", "train.json"))
    window = train_cfg["validation_batches"] * train_cfg["microbatch_size"] * model["context_length"] + 1
    assert window <= validation_tokens <= window + token_data.DEMO_PIECE_BYTES
    meta = json.loads((demo_dataset / "meta.json").read_text())
    assert meta["corpus_version"] == token_data.DEMO_CORPUS_VERSION
    assert meta["tokens"] == {"train": sum(len(p) + 1 for p in train), "validation": validation_tokens}


def test_a_rebuild_gives_the_same_bytes(demo_dataset, tmp_path):
    again = tmp_path / "again"
    token_data.build_demo_dataset(again)
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in demo_dataset.iterdir())
    for path in demo_dataset.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name


def old_demo_dataset(demo_dataset, datasets_dir, corpus_version):
    """A copy of the demo dataset whose meta.json records `corpus_version` (None: no version, as
    datasets built before versions were recorded)."""
    dataset_dir = datasets_dir / token_data.DEMO_DATASET_DIRNAME
    shutil.copytree(demo_dataset, dataset_dir)
    meta = json.loads((dataset_dir / "meta.json").read_text())
    del meta["corpus_version"]
    if corpus_version is not None:
        meta["corpus_version"] = corpus_version
    (dataset_dir / "meta.json").write_text(json.dumps(meta))
    (dataset_dir / "train.safetensors").write_bytes((dataset_dir / "validation.safetensors").read_bytes())
    return dataset_dir


@pytest.mark.parametrize("corpus_version, recorded", [(None, "no corpus version"), (1, "corpus version 1")])
def test_a_demo_dataset_of_another_version_is_rebuilt_with_a_note(demo_dataset, tmp_path, capsys,
                                                                  corpus_version, recorded):
    datasets_dir = tmp_path / "datasets"
    dataset_dir = old_demo_dataset(demo_dataset, datasets_dir, corpus_version)
    neighbour = datasets_dir / "mine"
    neighbour.mkdir()
    (neighbour / "train.safetensors").write_bytes(b"someone else's")
    assert token_data.fetch_dataset("demo", datasets_dir) == dataset_dir
    assert capsys.readouterr().err == (f"note: rebuilding the demo corpus in {dataset_dir}: its meta.json records "
                                       f"{recorded}, this code builds version {token_data.DEMO_CORPUS_VERSION}\n")
    for path in demo_dataset.iterdir():
        assert (dataset_dir / path.name).read_bytes() == path.read_bytes(), path.name
    assert sorted(p.name for p in datasets_dir.iterdir()) == ["demo-python-stdlib-bytes", "mine"]
    assert (neighbour / "train.safetensors").read_bytes() == b"someone else's"
    # This version's dataset is used as it is.
    token_data.fetch_dataset("demo", datasets_dir)
    assert capsys.readouterr().err == ""


def test_a_rebuild_that_fails_leaves_the_old_dataset_whole(demo_dataset, tmp_path, monkeypatch):
    datasets_dir = tmp_path / "datasets"
    dataset_dir = old_demo_dataset(demo_dataset, datasets_dir, 1)
    before = {path.name: path.read_bytes() for path in dataset_dir.iterdir()}
    writes = []

    def write_then_fail(self, tokens):
        writes.append(len(tokens))
        if len(writes) == 100:
            raise OSError(28, "No space left on device")
        original_write(self, tokens)

    original_write = token_data.TokenFileWriter.write
    monkeypatch.setattr(token_data.TokenFileWriter, "write", write_then_fail)
    with pytest.raises(OSError):
        token_data.fetch_dataset("demo", datasets_dir)
    assert {path.name: path.read_bytes() for path in dataset_dir.iterdir()} == before
    assert [p.name for p in datasets_dir.iterdir()] == [token_data.DEMO_DATASET_DIRNAME]
