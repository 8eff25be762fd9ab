"""Turn raw text corpora into the token datasets that ddp_train.py reads.

    uv run prepare_datasets.py datasets/fineweb-10BT HuggingFaceFW/fineweb --hub-pattern 'sample/10BT/*.parquet'
    uv run prepare_datasets.py datasets/mine corpus/ extra.jsonl --max-tokens 2000000000
    uv run prepare_datasets.py datasets/fineweb-10BT ... --push-to-hub you/fineweb-10BT-gpt2

Each SOURCE is a local file or directory, or a Hugging Face dataset repo id whose files
matching --hub-pattern are downloaded (huggingface_hub.snapshot_download; --download-dir,
default the Hugging Face cache). Files are read according to their extension:

    .parquet   one document per row of the --text-field column, one record batch at a time
    .jsonl     one document per line: the line's --text-field value
    .txt       the whole file is one document

Directories are searched recursively for such files (hidden ones skipped) in sorted order.
A null text is skipped, not counted as a document. Text is read as UTF-8: invalid bytes
become U+FFFD, and how many were replaced (bytes, per file) is in the summary and, in
total, in meta.json as `replaced_invalid_utf8_bytes`.

OUT_DIR receives train.safetensors and validation.safetensors (one 1-D tensor `tokens`:
every document's tokens followed by end-of-text; uint16, or uint32 when the tokenizer has
more than 65,536 ids, as cl100k_base and o200k_base do), meta.json and a dataset card
README.md. Each document goes to validation or train by a hash of its position in the
input (token_data.is_validation_document), so the files are byte-identical whatever
--workers and --batch-size. --max-tokens caps each split (the last document is cut to
fit) and ends the run once train is full.

With --conversations, SOURCEs are JSONL files of {"messages": [{"role", "content"}, ...]}:
each conversation is rendered with the chat tokens (tokenizer gpt2-chat-v1, chat_tokens.py) and
the split files also hold a uint8 `loss_mask`, 1 on the assistant's replies; conversations
longer than --context-length are counted in the summary and meta.json (docs/stages.md).

Memory stays bounded whatever the corpus size: batches of documents are read lazily,
tokenized in worker processes with a few batches in flight, and the tokens appended to
the files as results arrive, in input order. The directory is built as OUT_DIR.partial
and renamed when complete, so an interrupted run leaves nothing that looks finished.
A finished OUT_DIR is left alone unless --overwrite is given (with --push-to-hub it is
uploaded as it is).
"""

import collections
import itertools
import json
import math
import multiprocessing
import os
import signal
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import DatasetCard, DatasetCardData, HfApi, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, LocalTokenNotFoundError
from huggingface_hub.utils import filter_repo_objects
from tqdm import tqdm

import chat_tokens
import token_data
from errors import UserError, report_user_errors
from token_data import SPLITS, TokenFileWriter

DOCUMENT_SUFFIXES = (".parquet", ".jsonl", ".txt")
MESSAGES_FIELD = "messages"  # of a conversation JSONL line (--conversations)
DATASET_FILES = ("train.safetensors", "validation.safetensors", "meta.json", "README.md")
# Two batches per worker: one being tokenized and one waiting, so no worker idles
# while the parent reads or writes.
BATCHES_IN_FLIGHT_PER_WORKER = 2
# pyarrow's default record batch is 65,536 rows: a few hundred MB of web pages in memory.
PARQUET_ROWS_PER_READ = 1024
# A validation loss over fewer documents than this mostly measures which few documents
# the split happened to pick.
MIN_VALIDATION_DOCUMENTS = 10


# ---------------------------------------------------------------- reading documents

class Utf8Decoder:
    """Decodes .txt files and JSONL lines as UTF-8, each invalid sequence replaced by
    U+FFFD as `errors="replace"` does, and counts the bytes replaced in each file: a
    corpus in another encoding shows in the summary and meta.json, not only as U+FFFDs."""

    def __init__(self):
        self.replaced_bytes = collections.Counter()  # file -> invalid bytes replaced

    def decode(self, data, path):
        text = data.decode("utf-8", errors="replace")
        if "\ufffd" in text:
            # Each invalid sequence became one U+FFFD, 3 bytes in UTF-8; U+FFFDs already in the data are
            # valid UTF-8 and stay as they were.
            replacements = text.count("\ufffd") - data.count("\ufffd".encode())
            self.replaced_bytes[path] += len(data) - len(text.encode("utf-8")) + 3 * replacements
        return text

    @property
    def total(self):
        return self.replaced_bytes.total()


def parquet_documents(path, text_field):
    for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_ROWS_PER_READ, columns=[text_field]):
        yield from batch.column(0).drop_null().to_pylist()


def jsonl_texts(path, text_field, decoder):
    """(line number, text or None) for each non-blank line of a JSONL file."""
    for line_number, record in jsonl_records(path, text_field, decoder):
        text = record[text_field]
        if not isinstance(text, (str, type(None))):
            raise UserError(f"{path}:{line_number}: field '{text_field}' is not text")
        yield line_number, text


def jsonl_conversations(path, decoder):
    """The messages of each line of a conversation JSONL file ({"messages": [{"role", "content"}, ...]}),
    checked (chat_tokens.check_messages)."""
    for line_number, record in jsonl_records(path, MESSAGES_FIELD, decoder):
        chat_tokens.check_messages(record[MESSAGES_FIELD], f"{path}:{line_number}")
        yield record[MESSAGES_FIELD]


def jsonl_records(path, field, decoder):
    """(line number, record) for each non-blank line of a JSONL file, each an object with `field`."""
    with open(path, "rb") as lines:
        for line_number, line in enumerate(lines, 1):
            line = decoder.decode(line, path)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_number}: not JSON ({e.msg})")
            if not isinstance(record, dict) or field not in record:
                fields = ", ".join(record) if isinstance(record, dict) else "none"
                choose = "choose one with --text-field" if field != MESSAGES_FIELD else "conversations need it"
                raise UserError(f"{path}:{line_number}: no field '{field}' (fields: {fields}); {choose}")
            yield line_number, record


def jsonl_documents(path, text_field, decoder):
    return (text for _, text in jsonl_texts(path, text_field, decoder) if text is not None)


def file_documents(path, text_field, decoder, conversations=False):
    if conversations:
        yield from jsonl_conversations(path, decoder)
    elif path.suffix == ".parquet":
        yield from parquet_documents(path, text_field)
    elif path.suffix == ".jsonl":
        yield from jsonl_documents(path, text_field, decoder)
    else:
        yield decoder.decode(path.read_bytes(), path)


def document_batches(files, text_field, batch_size, decoder, conversations=False):
    """(index of the batch's first document in the whole input, its texts or conversations), lazily."""
    documents = itertools.chain.from_iterable(file_documents(path, text_field, decoder, conversations)
                                              for path in files)
    first_index = 0
    while batch := list(itertools.islice(documents, batch_size)):
        yield first_index, batch
        first_index += len(batch)


# ---------------------------------------------------------------- finding the input files

def checked_file(path, text_field, conversations=False):
    """`path`, once sure it can be read: checking each file's text column (parquet
    schema, first JSONL record) now reports a wrong --text-field or file at once,
    not after hours of work."""
    suffixes = (".jsonl",) if conversations else DOCUMENT_SUFFIXES
    if path.suffix not in suffixes:
        raise UserError(f"{path}: cannot read '{path.suffix}' files; expected {', '.join(suffixes)}"
                        + (" (--conversations)" if conversations else ""))
    if conversations:
        next(jsonl_conversations(path, Utf8Decoder()), None)
    elif path.suffix == ".parquet":
        check_parquet_text_column(path, text_field)
    elif path.suffix == ".jsonl":
        # Replaced bytes are counted when the file is read for real.
        next(jsonl_texts(path, text_field, Utf8Decoder()), None)
    return path


def check_parquet_text_column(path, text_field):
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable parquet file ({e})")
    if text_field not in schema.names:
        raise UserError(f"{path}: no column '{text_field}' (columns: {', '.join(schema.names)}); "
                        "choose one with --text-field")
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise UserError(f"{path}: column '{text_field}' holds {column_type}, not text")


def files_in_directory(directory, text_field, conversations=False):
    files = sorted(path for path in directory.rglob("*")
                   if path.suffix in DOCUMENT_SUFFIXES and path.is_file()
                   and not any(part.startswith(".") for part in path.relative_to(directory).parts))
    if not files:
        raise UserError(f"{directory}: no {', '.join(DOCUMENT_SUFFIXES)} files in it")
    return [checked_file(path, text_field, conversations) for path in files]


def download_hub_files(repo_id, pattern, download_dir, text_field, conversations=False):
    try:
        snapshot = Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=pattern,
                                          cache_dir=download_dir))
    except (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError) as e:
        raise UserError(f"Hugging Face dataset {repo_id}: download failed: {str(e).splitlines()[0]}")
    # The snapshot may also hold files fetched earlier with another pattern.
    names = sorted(path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if path.is_file())
    matching = list(filter_repo_objects(names, allow_patterns=pattern))
    if not matching:
        raise UserError(f"Hugging Face dataset {repo_id}: no files match --hub-pattern '{pattern}'")
    return [checked_file(snapshot / name, text_field, conversations) for name in matching]


def input_files(sources, hub_pattern, download_dir, text_field, conversations=False):
    """The files to read, in order, and a description of where they came from."""
    files, descriptions = [], []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files += files_in_directory(path, text_field, conversations)
            descriptions.append(source)
        elif path.exists():
            files.append(checked_file(path, text_field, conversations))
            descriptions.append(source)
        elif token_data.HUB_REPO_ID.match(source) and hub_pattern:
            files += download_hub_files(source, hub_pattern, download_dir, text_field, conversations)
            descriptions.append(f"Hugging Face dataset {source} ({hub_pattern})")
        else:
            hint = (f" (to read the Hugging Face dataset {source}, give --hub-pattern, e.g. 'sample/10BT/*.parquet')"
                    if token_data.HUB_REPO_ID.match(source) else "")
            raise UserError(f"{source}: no such file or directory{hint}")
    return files, "; ".join(descriptions)


# ---------------------------------------------------------------- tokenizing in worker processes

@dataclass
class Tokenized:
    """Consecutive documents of one split."""
    tokens: np.ndarray  # the tokenizer's token_dtype: each document's tokens, then end-of-text
    document_ends: np.ndarray  # offset in `tokens` just past each document's end-of-text
    loss_mask: np.ndarray | None = None  # conversations: uint8, 1 on the assistant's tokens (chat_tokens)
    long_documents: int = 0  # conversations longer than the context (split across training windows)


worker_tokenizer = None
worker_validation_fraction = None
worker_context_length = None  # set for conversations
worker_start_error = None


def start_worker(tokenizer_name, validation_fraction, context_length=None):
    global worker_tokenizer, worker_validation_fraction, worker_context_length, worker_start_error
    # Ctrl-C reaches the whole process group; the parent handles it by stopping the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker_validation_fraction = validation_fraction
    worker_context_length = context_length
    try:
        worker_tokenizer = token_data.get_tokenizer(tokenizer_name)
    except Exception as e:  # noqa: BLE001 - raised here, the pool would restart the worker forever
        worker_start_error = e


def tokenize_batch(batch):
    """{split: Tokenized} for one batch from document_batches (texts, or conversations when the
    worker was started with a context length)."""
    if worker_start_error is not None:
        raise worker_start_error  # reaches the parent through the task's result
    first_index, documents = batch
    tokenized = {split: [] for split in SPLITS}
    for index, document in enumerate(documents, first_index):
        split = "validation" if token_data.is_validation_document(index, worker_validation_fraction) else "train"
        if worker_context_length is None:
            tokenized[split].append((worker_tokenizer.encode_to_array(document), None))
        else:
            ids, mask = chat_tokens.render_conversation(document)
            tokenized[split].append((np.array(ids, dtype=worker_tokenizer.token_dtype), np.array(mask, np.uint8)))
    return {split: joined(split_documents, worker_tokenizer.eot_id, worker_tokenizer.token_dtype,
                          worker_context_length)
            for split, split_documents in tokenized.items()}


def joined(documents, eot_id, dtype, context_length=None):
    """Tokenized for `documents` ((array of ids, its loss mask or None)), each followed by
    end-of-text (mask 0), as `dtype`; with masks, counting those longer than `context_length`."""
    document_ends = np.cumsum([len(ids) + 1 for ids, _ in documents], dtype=np.int64)
    tokens = np.full(document_ends[-1] if documents else 0, eot_id, dtype=dtype)
    for (ids, _), end in zip(documents, document_ends, strict=True):
        tokens[end - 1 - len(ids):end - 1] = ids
    if context_length is None:
        return Tokenized(tokens, document_ends)
    loss_mask = np.zeros(len(tokens), dtype=np.uint8)
    for (ids, mask), end in zip(documents, document_ends, strict=True):
        loss_mask[end - 1 - len(ids):end - 1] = mask
    return Tokenized(tokens, document_ends, loss_mask, sum(len(ids) > context_length for ids, _ in documents))


def ordered_results(pool, function, tasks, max_in_flight):
    """`function` over `tasks` in the pool, yielded in task order, with at most
    `max_in_flight` tasks submitted but not yet consumed.

    Not Pool.imap: it keeps handing tasks to free workers however far the consumer
    lags (one slow batch lets the others run ahead), and the finished results pile
    up in memory.
    """
    pending = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(function, (task,)))
        if len(pending) == max_in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# ---------------------------------------------------------------- writing

class SplitWriter:
    """Appends one split's documents to its token file, up to a token budget."""

    def __init__(self, file, max_tokens):
        self.file = file
        self.max_tokens = math.inf if max_tokens is None else max_tokens
        self.documents = 0
        self.long_documents = 0

    @property
    def is_full(self):
        return self.file.num_tokens >= self.max_tokens

    def add(self, tokenized):
        room = self.max_tokens - self.file.num_tokens
        self.long_documents += tokenized.long_documents
        if len(tokenized.tokens) <= room:
            self.file.write(tokenized.tokens, tokenized.loss_mask)
            self.documents += len(tokenized.document_ends)
        elif room > 0:
            mask = None if tokenized.loss_mask is None else tokenized.loss_mask[:room]
            self.file.write(tokenized.tokens[:room], mask)
            # Documents that start before the cut, the last one truncated.
            self.documents += int(np.searchsorted(tokenized.document_ends, room)) + 1


def tokenize_into(dataset_dir, files, text_field, tokenizer, decoder, *, validation_fraction, workers, batch_size,
                  max_tokens, context_length=None):
    """Write the two split files into `dataset_dir`; returns {split: (tokens, documents)} and, for
    conversations (given a `context_length`), {split: conversations longer than the context}."""
    conversations = context_length is not None
    batches = document_batches(files, text_field, batch_size, decoder, conversations)
    start = time.perf_counter()
    worker_settings = (tokenizer.name, validation_fraction, context_length)
    # forkserver, not fork: forking a process whose threads (torch's, tiktoken's) may hold locks
    # can leave the workers deadlocked, e.g. when this runs inside a larger program or test run.
    context = multiprocessing.get_context("forkserver")
    with context.Pool(workers, initializer=start_worker, initargs=worker_settings) as pool, \
            TokenFileWriter(dataset_dir / "train.safetensors", tokenizer.token_dtype, conversations) as train_file, \
            TokenFileWriter(dataset_dir / "validation.safetensors", tokenizer.token_dtype,
                            conversations) as validation_file, \
            tqdm(desc="tokenizing", unit=" docs") as progress:
        splits = {"train": SplitWriter(train_file, max_tokens), "validation": SplitWriter(validation_file, max_tokens)}
        results = ordered_results(pool, tokenize_batch, batches, workers * BATCHES_IN_FLIGHT_PER_WORKER)
        for result in results:
            for split, tokenized in result.items():
                splits[split].add(tokenized)
            tokens = train_file.num_tokens + validation_file.num_tokens
            progress.set_postfix_str(f"{tokens:,} tokens, {tokens / (time.perf_counter() - start):,.0f} tokens/s",
                                     refresh=False)
            progress.update(sum(len(tokenized.document_ends) for tokenized in result.values()))
            if splits["train"].is_full:
                break
        train_file.commit()
        validation_file.commit()
    return ({split: (writer.file.num_tokens, writer.documents) for split, writer in splits.items()},
            {split: writer.long_documents for split, writer in splits.items()})


def tool_version():
    pyproject = tomllib.loads((Path(__file__).parent / "pyproject.toml").read_text())
    return f"prepare_datasets.py {pyproject['project']['version']}"


def write_meta_and_card(staging, name, tokenizer, counts, **facts):
    token_data.write_meta(staging, tokenizer, tokens={split: n for split, (n, _) in counts.items()},
                          documents={split: n for split, (_, n) in counts.items()}, tool=tool_version(), **facts)
    card = dataset_card(name, json.loads((staging / "meta.json").read_text()))
    with token_data.write_errors_reported(staging / "README.md"):
        card.save(staging / "README.md")


def dataset_card(name, meta):
    """A Hub dataset card saying what meta.json says, for people."""
    tokens, documents = meta["tokens"], meta["documents"]
    card_data = DatasetCardData(pretty_name=name, tags=["tokenized", "safetensors", meta["tokenizer"]])
    body = f"""
# {name}

Pre-tokenized text for GPT-2-class pre-training, made by {meta['tool']} from: {meta['source']}.

| split | tokens | documents |
| --- | ---: | ---: |
| train | {tokens['train']:,} | {documents['train']:,} |
| validation | {tokens['validation']:,} | {documents['validation']:,} |

- `train.safetensors`, `validation.safetensors`: one 1-D {meta['token_dtype']} tensor `tokens`, every
  document's tokens followed by end-of-text (id {meta['eot_id']}).
- Tokenizer: `{meta['tokenizer']}` (vocabulary {meta['vocab_size']:,}); text that looks like a special
  token is tokenized as ordinary text.
- Validation: {meta['validation_fraction']:.2%} of the documents, chosen by a hash of each document's
  position in the input.
- `meta.json` holds the same facts, machine-readable.

Read a slice without loading the file:

```python
from safetensors import safe_open

with safe_open("train.safetensors", framework="np") as f:
    first_tokens = f.get_slice("tokens")[:1024]
```
"""
    return DatasetCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


# ---------------------------------------------------------------- the output directory

def check_out_dir(out_dir, overwrite):
    """Refuse to replace anything but a dataset, and a dataset without --overwrite."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    present = sorted(entry.name for entry in out_dir.iterdir()) if out_dir.exists() else []
    foreign = [name for name in present if name not in DATASET_FILES]
    if foreign:
        raise UserError(f"{out_dir}: holds files that are not part of a dataset ({', '.join(foreign)}); "
                        "give a new or empty directory")
    if present and not overwrite:
        state = "a finished dataset" if token_data.is_complete(out_dir) else "part of a dataset"
        raise UserError(f"{out_dir}: already holds {state}; pass --overwrite to rebuild it")


def upload_dataset(dataset_dir, repo_id):
    """Upload the dataset as a Hub dataset repo. upload_folder sends each large file
    in parts through the Hub's large-file storage, not git; in huggingface_hub 2.x it
    is also the resumable, multi-commit path that replaced upload_large_folder."""
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=dataset_dir,
                          allow_patterns=list(DATASET_FILES), commit_message=f"Upload {dataset_dir.name}")
    except (HfHubHTTPError, LocalTokenNotFoundError, HFValidationError) as e:
        raise UserError(f"upload to Hugging Face dataset {repo_id} failed: {str(e).splitlines()[0]} "
                        f"(the dataset in {dataset_dir} is complete; re-run the same command to retry)")
    click.echo(f"uploaded {dataset_dir} to https://huggingface.co/datasets/{repo_id}")


def summary(out_dir, counts, seconds, decoder):
    tokens = sum(split_tokens for split_tokens, _ in counts.values())
    documents = sum(split_documents for _, split_documents in counts.values())
    lines = [f"wrote {out_dir} in {seconds:.1f} s: {documents / seconds:,.0f} documents/s, "
             f"{tokens / seconds:,.0f} tokens/s"]
    lines += [f"  {split}: {split_tokens:,} tokens, {split_documents:,} documents"
              for split, (split_tokens, split_documents) in counts.items()]
    if decoder.total:
        lines.append(replaced_bytes_line(decoder.replaced_bytes))
    return "\n".join(lines)


def conversation_tokenizer(tokenizer_name):
    """Conversations are tokenized with the chat tokenizer (--tokenizer may name it, or its base)."""
    if tokenizer_name not in (chat_tokens.BASE_ENCODING, chat_tokens.ENCODING_NAME):
        raise UserError(f"--tokenizer {tokenizer_name}: --conversations tokenizes with {chat_tokens.ENCODING_NAME} "
                        f"(GPT-2 with chat tokens); give --tokenizer {chat_tokens.ENCODING_NAME} or leave it out")
    return chat_tokens.ENCODING_NAME


def long_conversations_line(long_conversations, context_length):
    """How many conversations are longer than the context: training sees them split across windows."""
    counts = ", ".join(f"{split} {count:,}" for split, count in long_conversations.items())
    return (f"  conversations longer than the context ({context_length:,} tokens), split across training windows, "
            f"not dropped: {counts}")


def replaced_bytes_line(replaced_bytes, files_named=3):
    named = ", ".join(f"{path}: {count:,}" for path, count in replaced_bytes.most_common(files_named))
    others = len(replaced_bytes) - files_named
    more = f", {others:,} more file{'s' * (others > 1)}" if others > 0 else ""
    return (f"  replaced {replaced_bytes.total():,} bytes of invalid UTF-8 with U+FFFD in {len(replaced_bytes):,} "
            f"file{'s' * (len(replaced_bytes) > 1)} ({named}{more})")


def validation_split_warning(counts, validation_fraction):
    """A warning line when the validation split came out empty or too small to measure much, else None.
    With --validation-fraction 0 an empty split is what was asked for."""
    (train_tokens, train_documents), (validation_tokens, validation_documents) = counts["train"], counts["validation"]
    if validation_fraction == 0 or validation_documents >= MIN_VALIDATION_DOCUMENTS:
        return None
    documents = train_documents + validation_documents
    facts = (f"--validation-fraction {validation_fraction} of {documents:,} document{'s' * (documents != 1)} put "
             f"{validation_documents:,} in validation (train: {train_tokens:,} tokens, validation: "
             f"{validation_tokens:,} tokens)")
    more = "give more documents (a .txt file is one document) or a larger --validation-fraction"
    if validation_tokens == 0:
        return (f"warning: the validation split is empty: {facts}; ddp_train.py refuses it when train.json sets "
                f"validation_interval: {more}, or train with validation_interval null")
    return f"warning: the validation split is small: {facts}; its loss will be noisy: {more}"


# ---------------------------------------------------------------- command line

@click.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@click.option("--hub-pattern", metavar="GLOB",
              help="Files to download from Hugging Face dataset sources, e.g. 'sample/10BT/*.parquet'.")
@click.option("--text-field", default="text", show_default=True, help="Text column (parquet) or field (JSONL).")
@click.option("--tokenizer", "tokenizer_name", metavar="NAME", default="gpt2", show_default=True,
              help="'bytes' or a tiktoken encoding; ids are stored as uint16, or uint32 when there are more "
                   "than 65,536 (e.g. cl100k_base, o200k_base).")
@click.option("--validation-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.01, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=os.cpu_count(), show_default="CPU count")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Documents per batch.")
@click.option("--max-tokens", type=click.IntRange(min=1),
              help="Cap each split at this many tokens; stop once train is full.")
@click.option("--conversations", is_flag=True,
              help="SOURCEs are conversation JSONL ({\"messages\": [{\"role\", \"content\"}, ...]}): tokenize them "
                   f"with {chat_tokens.ENCODING_NAME} and write a loss mask (1 on the assistant's replies).")
@click.option("--context-length", type=click.IntRange(min=1), default=1024, show_default=True,
              help="With --conversations: the training context, to count the conversations longer than it.")
@click.option("--overwrite", is_flag=True, help="Rebuild OUT_DIR even if it holds a dataset.")
@click.option("--push-to-hub", metavar="REPO", help="Upload OUT_DIR to this Hugging Face dataset repo.")
@click.option("--download-dir", type=click.Path(path_type=Path),
              help="Cache for Hub downloads (default: the Hugging Face cache).")
@report_user_errors
def main(out_dir, sources, hub_pattern, text_field, tokenizer_name, validation_fraction, workers, batch_size,
         max_tokens, conversations, context_length, overwrite, push_to_hub, download_dir):
    """Tokenize the documents of SOURCE... (files, directories or Hugging Face dataset
    repos) into a token dataset in OUT_DIR. The top of prepare_datasets.py describes
    the file formats, the split and the output."""
    if push_to_hub and token_data.is_complete(out_dir) and not overwrite:
        click.echo(f"{out_dir} already holds a finished dataset; uploading it as it is")
        click.echo(token_data.describe_dataset(out_dir))
        return upload_dataset(out_dir, push_to_hub)
    check_out_dir(out_dir, overwrite)
    if conversations:
        tokenizer_name = conversation_tokenizer(tokenizer_name)
    tokenizer = token_data.get_tokenizer(tokenizer_name)
    files, source = input_files(sources, hub_pattern, download_dir, text_field, conversations)
    start = time.perf_counter()
    decoder = Utf8Decoder()
    with token_data.staged_directory(out_dir) as staging:
        counts, long_conversations = tokenize_into(
            staging, files, text_field, tokenizer, decoder, validation_fraction=validation_fraction, workers=workers,
            batch_size=batch_size, max_tokens=max_tokens, context_length=context_length if conversations else None)
        chat_facts = ({"special_tokens": chat_tokens.special_token_ids(), "loss_mask": True,
                       "context_length": context_length, "conversations_longer_than_context": long_conversations}
                      if conversations else {"text_field": text_field})
        write_meta_and_card(staging, out_dir.name, tokenizer, counts, validation_fraction=validation_fraction,
                            max_tokens=max_tokens, source=source, replaced_invalid_utf8_bytes=decoder.total,
                            **chat_facts)
    click.echo(summary(out_dir, counts, time.perf_counter() - start, decoder))
    if conversations:
        click.echo(long_conversations_line(long_conversations, context_length))
    if warning := validation_split_warning(counts, validation_fraction):
        click.echo(warning, err=True)
    if push_to_hub:
        upload_dataset(out_dir, push_to_hub)


if __name__ == "__main__":
    main()
