"""Token datasets on disk: reading, writing, tokenizers and the built-in demo corpus.

A dataset directory holds `train.safetensors` and `validation.safetensors`, each
one 1-D tensor named `tokens`, uint16 (safetensors `U16`) when the tokenizer's ids
fit, else uint32 (`U32`), and optionally `meta.json` (tokenizer name, vocab size,
end-of-text id). Without meta.json it is GPT-2 (tiktoken `gpt2`, end-of-text 50256),
which is what the reference harness's published datasets are.

Token files are memory-mapped, never read whole: on an 8-GPU machine eight
processes share one page-cached copy of a 20 GB file.

`uv run token_data.py DATASET_DIR` checks a dataset's files and says what it holds.
"""

import contextlib
import json
import os
import random
import re
import shutil
import struct
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

import chat_tokens
from errors import UserError, report_user_errors

SPLITS = ("train", "validation")
TOKENS_KEY = "tokens"
# Conversation datasets (chat_tokens.py) also hold a uint8 `loss_mask` as long as `tokens`: 1 where
# the token is one the loss is taken on (as a target), 0 where it is only context.
LOSS_MASK_KEY = "loss_mask"
MASK_DTYPES = {"U8": np.dtype("u1")}
DEMO_DATASET = "demo"
DEMO_DATASET_DIRNAME = "demo-python-stdlib-bytes"
HUB_DOWNLOAD_COMPLETE = ".download-complete"
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The dtypes token ids are stored as, by their safetensors names (safetensors data is little-endian).
TOKEN_DTYPES = {"U16": np.dtype("<u2"), "U32": np.dtype("<u4")}
SAFETENSORS_DTYPE_NAMES = {dtype: name for name, dtype in {**TOKEN_DTYPES, **MASK_DTYPES}.items()}
# Room for the JSON header of a file of up to 10^15 tokens, padded with spaces
# (which the safetensors format allows) to keep the data 8-byte aligned.
RESERVED_HEADER_BYTES = 120
MASKED_HEADER_BYTES = 248  # the same with a `loss_mask` entry too


# ---------------------------------------------------------------- tokenizers

def token_dtype_for(vocab_size):
    """uint16 when ids 0..vocab_size-1 fit it (GPT-2's do): half the bytes of uint32, and the
    reference harness's format. Else uint32, which holds any tiktoken id (its ranks are 32-bit)."""
    return TOKEN_DTYPES["U16"] if vocab_size <= 2**16 else TOKEN_DTYPES["U32"]


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, end-of-text 256."""

    name = "bytes"
    vocab_size = 257
    eot_id = 256
    token_dtype = token_dtype_for(vocab_size)

    def encode(self, text):
        return list(text.encode("utf-8"))

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def encode_to_array(self, text):
        """`encode` as a `token_dtype` array, without building a list of Python ints."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(self.token_dtype)

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class TiktokenTokenizer:
    """A tiktoken encoding. Special-token text inside a document is encoded as
    ordinary text: a literal "<|endoftext|>" in a web page never ends a document."""

    def __init__(self, name):
        import tiktoken

        try:
            is_chat = name == chat_tokens.ENCODING_NAME
            self._encoding = chat_tokens.encoding() if is_chat else tiktoken.get_encoding(name)
        except ValueError:
            raise UserError(f"unknown tokenizer '{name}'; valid: bytes, {', '.join(tiktoken.list_encoding_names())}, "
                            f"{chat_tokens.ENCODING_NAME}")
        except OSError as e:  # tiktoken downloads the BPE files on first use
            raise UserError(f"tokenizer '{name}': cannot fetch its BPE files ({type(e).__name__}); "
                            "point TIKTOKEN_CACHE_DIR at a directory that holds them")
        self.name = name
        self.vocab_size = self._encoding.n_vocab
        self.eot_id = self._encoding.eot_token
        self.token_dtype = token_dtype_for(self.vocab_size)

    def encode(self, text):
        return self._encoding.encode_ordinary(text)

    def encode_batch(self, texts):
        return self._encoding.encode_ordinary_batch(texts)

    def encode_to_array(self, text):
        """`encode` as a `token_dtype` array."""
        # An empty allowed-special set with nothing disallowed is exactly encode_ordinary,
        # but the ids come back in a buffer instead of a list of Python ints (a uint32 one,
        # which astype does not copy when token_dtype is uint32).
        ids = self._encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        return ids.astype(self.token_dtype, copy=False)

    def decode(self, ids):
        return self._encoding.decode(list(ids))


def get_tokenizer(name):
    return ByteTokenizer() if name == ByteTokenizer.name else TiktokenTokenizer(name)


def base_tokenizer(name):
    """The tokenizer `name` extends with special tokens (itself when none): datasets whose
    tokenizers share a base encode text alike and can be mixed."""
    return chat_tokens.BASE_ENCODING if name == chat_tokens.ENCODING_NAME else name


# ---------------------------------------------------------------- meta.json

@dataclass(frozen=True)
class DatasetMeta:
    tokenizer: str = "gpt2"
    vocab_size: int = 50257
    eot_id: int = 50256


def read_meta(dataset_dir):
    """meta.json's tokenizer fields; GPT-2 when there is no meta.json."""
    path = Path(dataset_dir) / "meta.json"
    if not path.exists():
        return DatasetMeta()
    try:
        raw = json.loads(path.read_text())
        return DatasetMeta(tokenizer=str(raw["tokenizer"]), vocab_size=int(raw["vocab_size"]),
                           eot_id=int(raw["eot_id"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not a valid dataset meta.json ({type(e).__name__}: {e}); "
                        "it needs tokenizer, vocab_size and eot_id")


# ---------------------------------------------------------------- reading

def open_tokens(path):
    """Memory-map the uint16 or uint32 `tokens` tensor of a safetensors file, checking its header."""
    path = Path(path)
    header, data_start, file_size = read_header(path)
    entry = header.get(TOKENS_KEY) if isinstance(header, dict) else None
    if not isinstance(entry, dict):
        names = [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []
        raise UserError(f"{path}: no tensor named '{TOKENS_KEY}' (found: {', '.join(names) or 'none'})")
    return map_tensor(path, TOKENS_KEY, entry, TOKEN_DTYPES, data_start, file_size)


def open_loss_mask(path, num_tokens):
    """Memory-map the uint8 `loss_mask` tensor of a token file (1: the target counts in the loss),
    or None when the file has none; it must be as long as the file's `num_tokens` tokens."""
    path = Path(path)
    header, data_start, file_size = read_header(path)
    entry = header.get(LOSS_MASK_KEY) if isinstance(header, dict) else None
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise UserError(f"{path}: not a safetensors file (entry '{LOSS_MASK_KEY}' is not a tensor)")
    mask = map_tensor(path, LOSS_MASK_KEY, entry, MASK_DTYPES, data_start, file_size)
    if len(mask) != num_tokens:
        raise UserError(f"{path}: tensor '{LOSS_MASK_KEY}' has {len(mask):,} entries but '{TOKENS_KEY}' has "
                        f"{num_tokens:,}; they must match")
    return mask


def read_header(path):
    """(header, offset of the data, file size) of a safetensors file."""
    if not path.is_file():
        raise UserError(f"{path}: token file not found")
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise UserError(f"{path}: not a safetensors file (only {file_size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(file_size - 8, 100_000_000):
            raise UserError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(header_len))
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
            raise UserError(f"{path}: not a safetensors file (header is not JSON)")
    return header, 8 + header_len, file_size


def map_tensor(path, key, entry, dtypes, data_start, file_size):
    """Memory-map the 1-D tensor `key` (header `entry`) of a safetensors file, of one of `dtypes`."""
    dtype = dtypes.get(entry.get("dtype"))
    if dtype is None:
        valid = " or ".join(f"{name} ({numpy_dtype.name})" for name, numpy_dtype in dtypes.items())
        raise UserError(f"{path}: tensor '{key}' has dtype {entry.get('dtype')}, expected {valid}")
    shape = entry.get("shape")
    if not (isinstance(shape, list) and len(shape) == 1 and is_count(shape[0])):
        raise UserError(f"{path}: tensor '{key}' has shape {shape}, expected one dimension")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_count, offsets))):
        raise UserError(f"{path}: not a safetensors file (tensor '{key}' has data_offsets {offsets})")
    begin, end = offsets
    if end - begin != dtype.itemsize * shape[0] or data_start + end > file_size:
        raise UserError(f"{path}: truncated or corrupt: header promises {shape[0]:,} tokens "
                        f"but the file has {file_size:,} bytes")
    if shape[0] == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=(shape[0],))


def is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def open_split(dataset_dir, split):
    return open_tokens(Path(dataset_dir) / f"{split}.safetensors")


def open_split_mask(dataset_dir, split, num_tokens):
    return open_loss_mask(Path(dataset_dir) / f"{split}.safetensors", num_tokens)


def describe_dataset(dataset_dir):
    """A few lines saying what a dataset directory holds; opening the splits checks their headers."""
    meta = read_meta(dataset_dir)
    lines = [f"{dataset_dir}: tokenizer {meta.tokenizer} (vocab {meta.vocab_size:,}, end-of-text {meta.eot_id})"]
    for split in SPLITS:
        tokens = open_split(dataset_dir, split)
        lines.append(f"  {split}: {len(tokens):,} tokens ({tokens.dtype.name})")
    return "\n".join(lines)


# ---------------------------------------------------------------- writing

@contextlib.contextmanager
def write_errors_reported(path, doing=None):
    """An OSError in the block (read-only or full file system, ...) becomes a one-line
    UserError naming `path`, the cause and what was being done: an error from writing
    to an open file carries no file name of its own."""
    try:
        yield
    except OSError as e:
        raise UserError(f"{path}: {e.strerror or e}" + (f" ({doing})" if doing else "")) from e


class TokenFileWriter:
    """Streams tokens of `dtype` (uint16 or uint32) into a safetensors file without holding them in memory.

    The data goes into `<path>.partial` behind a reserved, space-padded header;
    `commit()` fills in the header, fsyncs and renames, so a file at `path`
    is always complete. Leaving the `with` block without committing (an
    exception) deletes the partial file. A failed write is a UserError naming
    the file, the cause and how much was being written.

    With `loss_mask`, each write also takes the tokens' mask (0/1), streamed to
    `<path>.mask.partial` and appended after the tokens as a uint8 tensor `loss_mask`
    on commit (the header then has room for two entries).
    """

    def __init__(self, path, dtype=np.uint16, loss_mask=False):
        self.path = Path(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.dtype_name = SAFETENSORS_DTYPE_NAMES[self.dtype]
        self.partial_path = self.path.with_name(self.path.name + ".partial")
        self.mask_path = self.path.with_name(self.path.name + ".mask.partial") if loss_mask else None
        self.header_bytes = MASKED_HEADER_BYTES if loss_mask else RESERVED_HEADER_BYTES
        self.num_tokens = 0
        self._mask_file = None
        with write_errors_reported(self.partial_path, "creating the file"):
            self._file = open(self.partial_path, "wb")
            if loss_mask:
                self._mask_file = open(self.mask_path, "w+b")
        self._file.write(b"\0" * (8 + self.header_bytes))  # buffered: reaches the disk with the tokens

    def write(self, tokens, loss_mask=None):
        if (loss_mask is None) != (self._mask_file is None):
            raise ValueError("a TokenFileWriter made with loss_mask takes a mask with every write, else none")
        if loss_mask is not None:
            mask = np.asarray(loss_mask, dtype=np.uint8)
            assert mask.shape == np.shape(tokens)
            with write_errors_reported(self.mask_path, f"writing {mask.size:,} bytes of loss mask"):
                self._mask_file.write(mask.tobytes())
        array = np.asarray(tokens)
        if array.dtype != self.dtype and array.size and (array.min() < 0 or array.max() > np.iinfo(self.dtype).max):
            bad = array.min() if array.min() < 0 else array.max()
            raise UserError(f"{self.path}: token id {int(bad)} does not fit in {self.dtype.name}")
        data = array.astype(self.dtype, copy=False).tobytes()
        with write_errors_reported(self.partial_path,
                                   f"writing {len(data):,} bytes of tokens after {self.data_bytes:,}"):
            self._file.write(data)
        self.num_tokens += array.size

    @property
    def data_bytes(self):
        return self.dtype.itemsize * self.num_tokens

    def commit(self):
        entries = {TOKENS_KEY: {"dtype": self.dtype_name, "shape": [self.num_tokens],
                                "data_offsets": [0, self.data_bytes]}}
        if self._mask_file is not None:
            entries[LOSS_MASK_KEY] = {"dtype": "U8", "shape": [self.num_tokens],
                                      "data_offsets": [self.data_bytes, self.data_bytes + self.num_tokens]}
            with write_errors_reported(self.partial_path, f"appending {self.num_tokens:,} bytes of loss mask"):
                self._mask_file.seek(0)
                shutil.copyfileobj(self._mask_file, self._file)
        header = json.dumps(entries, separators=(",", ":")).encode()
        assert len(header) <= self.header_bytes
        with write_errors_reported(self.partial_path, f"finishing {self.data_bytes:,} bytes of tokens"):
            self._file.seek(0)
            self._file.write(struct.pack("<Q", self.header_bytes) + header.ljust(self.header_bytes, b" "))
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.partial_path, self.path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        for file in (self._file, self._mask_file):
            if file is not None and not file.closed:
                with contextlib.suppress(OSError):  # on a full disk, closing fails to write the buffer out too
                    file.close()
        self.partial_path.unlink(missing_ok=True)  # gone already once committed
        if self.mask_path is not None:
            self.mask_path.unlink(missing_ok=True)


def is_validation_document(index, validation_fraction):
    """The split rule: document `index` (0-based, input order) goes to validation
    when a hash of its index falls under the fraction. It depends on nothing
    else, so any number of workers or batch size gives the same split."""
    return zlib.crc32(index.to_bytes(8, "little")) < validation_fraction * 2**32


@contextlib.contextmanager
def staged_directory(final_dir):
    """Build a directory out of sight and move it into place only when complete.

    Yields an empty sibling `<final_dir>.partial`. When the block finishes, it
    replaces `final_dir` (whatever was there); when the block fails, it is
    deleted. A killed process leaves only the `.partial` directory, which the
    next run clears: `final_dir` never holds half a dataset.
    """
    final_dir = Path(final_dir)
    staging = final_dir.with_name(final_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with write_errors_reported(staging, "creating the directory"):
        staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    with write_errors_reported(final_dir, f"replacing it with {staging}"):
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(staging, final_dir)


def write_meta(dataset_dir, tokenizer, **extra):
    """meta.json: the tokenizer fields read_meta reads, the dtype of the token files (for people and
    the dataset card: the files' own headers are what readers go by) and `extra`."""
    meta = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
            "token_dtype": tokenizer.token_dtype.name, **extra}
    partial = Path(dataset_dir) / "meta.json.partial"
    with write_errors_reported(partial):
        partial.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(partial, Path(dataset_dir) / "meta.json")


# ---------------------------------------------------------------- the demo corpus

# Bump when the demo corpus's content or layout changes: a demo dataset of another version
# (or none: one built before versions were recorded) is rebuilt, not reused.
DEMO_CORPUS_VERSION = 2
DEMO_PIECE_BYTES = 8 * 1024
# Validation takes whole pieces, at most one per file, until it holds more than this many
# tokens (runs/demo/train.json's validation_batches x microbatch_size x context_length),
# so no file is more than DEMO_PIECE_BYTES / DEMO_VALIDATION_TOKENS (3%) of it.
DEMO_VALIDATION_TOKENS = 2**18
DEMO_SHUFFLE_SEED = 0
# Machine-generated tables, not Python that people write (docs/demo.md has the measurements):
# English help text (pydoc_data/topics.py is 6% of the stdlib's bytes), build variables, and
# Unicode tables; plus the encodings/ charmap codecs, whose headers name gencodec.py.
DEMO_GENERATED_TABLES = ("pydoc_data/topics.py", "_sysconfigdata_*.py", "html/entities.py", "stringprep.py",
                         "re/_casefix.py")
CHARMAP_CODEC_MARK = b"gencodec.py"


def demo_source_files():
    """(path relative to the stdlib, UTF-8 bytes) of the running Python's standard-library
    sources in sorted order, tests and machine-generated tables left out."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    paths = []
    for directory, subdirectories, files in os.walk(stdlib):
        subdirectories[:] = [name for name in subdirectories if name not in skip]
        paths += [Path(directory, name).relative_to(stdlib) for name in files if name.endswith(".py")]
    for relative in sorted(paths):
        data = (stdlib / relative).read_bytes()
        if not is_generated_table(relative, data):
            yield relative.as_posix(), data.decode("utf-8", errors="replace").encode("utf-8")


def is_generated_table(relative_path, data):
    return (any(relative_path.match(pattern) for pattern in DEMO_GENERATED_TABLES)
            or relative_path.parts[0] == "encodings" and CHARMAP_CODEC_MARK in data[:1000])


def split_into_pieces(data, max_bytes):
    """`data` cut after newlines into consecutive pieces of at most `max_bytes` bytes,
    each as many whole lines as fit; a line longer than that is cut into `max_bytes` chunks."""
    pieces, piece = [], b""
    for line in re.split(rb"(?<=\n)", data):
        if len(piece) + len(line) > max_bytes and piece:
            pieces.append(piece)
            piece = b""
        while len(line) > max_bytes:
            pieces.append(line[:max_bytes])
            line = line[max_bytes:]
        piece += line
    return pieces + [piece] if piece else pieces


def demo_pieces():
    """[(source file, piece)] of every source file's pieces, in a seeded shuffled order: whole
    files in any order leave long stretches of one file (the biggest is ~230k tokens) that
    the loss rises and falls with."""
    pieces = [(name, piece) for name, data in demo_source_files()
              for piece in split_into_pieces(data, DEMO_PIECE_BYTES)]
    random.Random(DEMO_SHUFFLE_SEED).shuffle(pieces)
    return pieces


def demo_validation_pieces(pieces):
    """Indices into `pieces` (shuffled) of the validation split: the first piece of each file
    in shuffled order until the split holds more than DEMO_VALIDATION_TOKENS tokens."""
    chosen, files, tokens = [], set(), 0
    for index, (name, piece) in enumerate(pieces):
        if tokens > DEMO_VALIDATION_TOKENS:
            break
        if name not in files:
            chosen.append(index)
            files.add(name)
            tokens += len(piece) + 1  # and its end-of-text
    return set(chosen)


def build_demo_dataset(dataset_dir):
    """Byte-level tokens of the stdlib sources' pieces, each followed by end-of-text, in the
    standard dataset layout; the same bytes every time with the same Python."""
    tokenizer = ByteTokenizer()
    pieces = demo_pieces()
    validation_pieces = demo_validation_pieces(pieces)
    with staged_directory(dataset_dir) as staging, \
            TokenFileWriter(staging / "train.safetensors", tokenizer.token_dtype) as train, \
            TokenFileWriter(staging / "validation.safetensors", tokenizer.token_dtype) as validation:
        for index, (_, piece) in enumerate(pieces):
            writer = validation if index in validation_pieces else train
            writer.write(np.frombuffer(piece, dtype=np.uint8))  # byte-level: a token per byte
            writer.write([tokenizer.eot_id])
        train.commit()
        validation.commit()
        write_meta(staging, tokenizer, source=f"Python {sys.version.split()[0]} standard library sources",
                   corpus_version=DEMO_CORPUS_VERSION, piece_bytes=DEMO_PIECE_BYTES,
                   pieces={"train": len(pieces) - len(validation_pieces), "validation": len(validation_pieces)},
                   files=len({name for name, _ in pieces}),
                   tokens={"train": train.num_tokens, "validation": validation.num_tokens})


def demo_corpus_version(dataset_dir):
    """The demo corpus version meta.json records; None when it records none or there is none."""
    path = Path(dataset_dir) / "meta.json"
    try:
        return json.loads(path.read_text()).get("corpus_version")
    except (OSError, ValueError, AttributeError):
        return None


def ensure_demo_dataset(dataset_dir):
    """Build the demo dataset unless one of this code's version is there; say why when replacing one."""
    complete, found = is_complete(dataset_dir), demo_corpus_version(dataset_dir)
    if complete and found == DEMO_CORPUS_VERSION:
        return
    if complete:
        recorded = "no corpus version" if found is None else f"corpus version {found}"
        print(f"note: rebuilding the demo corpus in {dataset_dir}: its meta.json records {recorded}, "
              f"this code builds version {DEMO_CORPUS_VERSION}", file=sys.stderr)
    build_demo_dataset(dataset_dir)


# ---------------------------------------------------------------- locating a dataset

def is_complete(dataset_dir):
    return all((Path(dataset_dir) / f"{split}.safetensors").is_file() for split in SPLITS)


def dataset_location(spec, datasets_dir, run_dir=None):
    """Where `spec` (train.json `dataset`) lives: ("local" | "demo" | "hub", directory).

    A relative path is looked for in `run_dir` (the run directory whose train.json
    names it) first, then in the current directory. Only a spec that is in neither
    and has the form of a Hub repo id is taken for one.
    """
    if spec == DEMO_DATASET:
        return "demo", Path(datasets_dir) / DEMO_DATASET_DIRNAME
    candidates = candidate_directories(spec, run_dir)
    found = next((path for path in candidates if path.is_dir()), None)
    if found is not None:
        return "local", found.resolve()
    if HUB_REPO_ID.match(spec):
        return "hub", Path(datasets_dir) / spec
    raise UserError(f"dataset '{spec}': not a directory (looked for {' and '.join(map(str, candidates))}), "
                    f"not '{DEMO_DATASET}', and not a Hugging Face repo id like 'gpjt/fineweb-gpt2-tokens'")


def candidate_directories(spec, run_dir):
    """Where a dataset path may be, in the order looked: an absolute one as it is."""
    path = Path(spec)
    if path.is_absolute():
        return [path]
    candidates = ([Path(run_dir) / path] if run_dir is not None else []) + [Path.cwd() / path]
    return list(dict.fromkeys(candidates))  # once, when the run directory is the current one


def fetch_dataset(spec, datasets_dir, run_dir=None):
    """Make the dataset available locally (build the demo corpus or download from
    the Hub). Run by one process per node; returns the dataset directory."""
    kind, dataset_dir = dataset_location(spec, datasets_dir, run_dir)
    if kind == "demo":
        ensure_demo_dataset(dataset_dir)
    elif kind == "hub" and not (dataset_dir / HUB_DOWNLOAD_COMPLETE).exists():
        download_hub_dataset(spec, datasets_dir, dataset_dir, looked_for=candidate_directories(spec, run_dir))
    if not is_complete(dataset_dir):
        raise UserError(f"dataset '{spec}': {dataset_dir} lacks train.safetensors and validation.safetensors")
    return dataset_dir


def download_hub_dataset(repo_id, datasets_dir, dataset_dir, looked_for):
    """snapshot_download into DATASETS_DIR/<repo id>, then a marker file, so later runs
    (and runs with no network) use the local copy without asking the Hub again.
    `looked_for` are the local directories the repo id was not found as, for the error."""
    from huggingface_hub import snapshot_download

    Path(datasets_dir).mkdir(parents=True, exist_ok=True)
    try:
        snapshot_download(repo_id, repo_type="dataset", local_dir=dataset_dir)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, no access, disk full...
        if not is_complete(dataset_dir):
            raise UserError(f"dataset '{repo_id}': no such directory (looked for "
                            f"{' and '.join(map(str, looked_for))}); as a Hugging Face Hub dataset repo id it failed: "
                            f"{hub_failure_reason(e)}. To build a dataset from text files: uv run prepare_datasets.py "
                            f"{repo_id} FILE_OR_DIR...") from e
        # Files from an earlier download (e.g. by the reference harness): use them.
        print(f"warning: could not check '{repo_id}' on the Hub ({type(e).__name__}); using the local copy "
              f"in {dataset_dir}", file=sys.stderr)
        return
    (dataset_dir / HUB_DOWNLOAD_COMPLETE).touch()


def hub_failure_reason(error, repo_type="dataset"):
    """Why snapshot_download failed, in the user's terms (exception text only when no
    known case fits)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    if isinstance(error, GatedRepoError):
        return "the repo is gated (accept its terms on the Hub, then log in with `hf auth login`)"
    if isinstance(error, RepositoryNotFoundError):
        return f"the Hub has no {repo_type} repo of that name (or it is private and you are not logged in)"
    if isinstance(error, LocalEntryNotFoundError):
        why = "offline mode (HF_HUB_OFFLINE) is on" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        return f"{why}, and it was never downloaded before"
    return " ".join(f"{type(error).__name__}: {error}".split())


# ---------------------------------------------------------------- command line

@click.command()
@click.argument("dataset_dir", type=click.Path(path_type=Path))
@report_user_errors
def main(dataset_dir):
    """Check DATASET_DIR's token files and meta.json and say what it holds."""
    click.echo(describe_dataset(dataset_dir))


if __name__ == "__main__":
    main()
