"""The CORE metric (DCLM, arXiv:2406.11794) as nanochat's core_eval.py and
scripts/base_eval.py compute it: the eval bundle, few-shot prompts, scoring,
centering and a standard error. eval_core.py is its command line; ddp_train.py
scores a share of it on every rank during training (train.json `core_interval`).

The bundle (eval_bundle.zip) holds core.yaml (per task: label, icl_task_type,
dataset_uri, num_fewshot as a one-element list, continuation_delimiter),
eval_meta_data.csv ("Eval Task", "Random baseline" in percent) and
eval_data/<dataset_uri> JSONL files. A task's items are shuffled with
random.Random(1337) and then cut to the first `limit`.

Item i's few-shot examples are random.Random(1234 + i).sample of the other
items' indices; each is rendered as its prompt with its right answer, followed
by a blank line ("\\n\\n"), and the item's own prompt follows:

- multiple_choice (query, choices, gold): one row per choice,
  query + delimiter + choice. The rows share the context, so the continuation
  starts after their common token prefix.
- schema (context_options, continuation, gold): one row per context option,
  option + delimiter + continuation. The rows share the continuation: their
  common token suffix.
- language_modeling (context, continuation): one row,
  context.strip() + delimiter + continuation; the continuation starts where the
  tokens of the prompt without it (stripped) end.

Every row starts with the tokenizer's end-of-text token (nanochat's BOS). A
row longer than the model's context keeps its last context_length tokens.
multiple_choice and schema pick the row with the lowest mean cross-entropy
over the continuation's tokens (the first, on a tie); language_modeling is
right when every continuation token is the model's argmax.

Accuracy is centered against the task's random baseline b (percent):
(acc - b/100) / (1 - b/100); CORE is the mean of the centered accuracies.
Each accuracy's binomial standard error sqrt(p(1-p)/n), divided by
(1 - b/100), is the centered one's; CORE's is sqrt(sum of their squares)
divided by the number of tasks (the tasks' items are independent).
"""

import csv
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from distributed import run_and_share_errors
from downloads import cached_download
from errors import UserError
from token_data import get_tokenizer

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234
FEWSHOT_SEPARATOR = "\n\n"
PROTOCOL = ("CORE as nanochat's core_eval.py: items shuffled with seed 1337, few-shot examples "
            "random.Random(1234 + index).sample of the others, separated by a blank line; BOS-prefixed rows "
            "cut to their last context_length tokens; multiple_choice/schema: lowest mean continuation "
            "cross-entropy; language_modeling: every continuation token the argmax; centered "
            "(acc - b/100)/(1 - b/100), CORE their mean")


# ---------------------------------------------------------------- the bundle

def is_url(source):
    return source.startswith(("http://", "https://"))


def require_zip(path, url):
    if not zipfile.is_zipfile(path):
        raise UserError(f"{url}: not a zip file")


def cached_zip(url, cache_dir):
    """The copy of the zip at `url` in `cache_dir`, downloaded on first use."""
    return cached_download(url, cache_dir, "--bundle, or train.json's core_bundle",
                           lambda path: require_zip(path, url))


def bundle_root(directory, source):
    """The directory holding core.yaml: `directory` or its eval_bundle/ (the zip's layout)."""
    for candidate in (Path(directory), Path(directory) / "eval_bundle"):
        if (candidate / "core.yaml").is_file():
            return candidate
    raise UserError(f"{source}: not a CORE eval bundle (no core.yaml, nor eval_bundle/core.yaml)")


def extracted(zip_path, cache_dir, source):
    """`zip_path` extracted once into `cache_dir` (keyed by its path, size and mtime), through
    a temporary directory renamed into place, so a half-extracted bundle is never used."""
    stat = Path(zip_path).stat()
    key = hashlib.sha256(f"{Path(zip_path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = Path(cache_dir) / f"{key}-{Path(zip_path).stem}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".", suffix=".partial"))
        try:
            with zipfile.ZipFile(zip_path) as archive:
                archive.extractall(staging)
            os.replace(staging, target)
        except zipfile.BadZipFile as e:
            raise UserError(f"{source}: not a valid zip file ({e})")
        except OSError:
            if not target.is_dir():  # another process renamed its copy into place first: use that one
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return bundle_root(target, source)


def fetch_bundle(source, cache_dir):
    """The bundle directory for `source`: a URL (downloaded and extracted once into
    `cache_dir`), a local zip (extracted once into `cache_dir`) or a local directory."""
    if is_url(source):
        return extracted(cached_zip(source, cache_dir), cache_dir, source)
    path = Path(source)
    if path.is_dir():
        return bundle_root(path, source)
    if path.is_file():
        return extracted(path, cache_dir, source)
    raise UserError(f"{source}: no such bundle (a directory, a .zip file or a URL)")


# ---------------------------------------------------------------- tasks and items

@dataclass(frozen=True)
class Task:
    label: str
    task_type: str
    dataset_uri: str
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float  # percent, as eval_meta_data.csv gives it


def read_baselines(path):
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    except FileNotFoundError:
        raise UserError(f"{path}: not found (the bundle's random baselines)")
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: needs columns 'Eval Task' and 'Random baseline' (numbers) ({e})")


def parse_task(entry, baselines, source):
    if not isinstance(entry, dict) or not isinstance(entry.get("label"), str):
        raise UserError(f"{source}: every icl_tasks entry needs a 'label'")
    label = entry["label"]
    where = f"{source} task '{label}'"
    task_type, shots = entry.get("icl_task_type"), entry.get("num_fewshot")
    if task_type not in TASK_TYPES:
        raise UserError(f"{where}: icl_task_type must be one of {', '.join(TASK_TYPES)}, got {task_type!r}")
    if not (isinstance(shots, list) and shots and isinstance(shots[0], int) and shots[0] >= 0):
        raise UserError(f"{where}: num_fewshot must be a list whose first entry is a count, got {shots!r}")
    if not isinstance(entry.get("dataset_uri"), str):
        raise UserError(f"{where}: needs a dataset_uri")
    if label not in baselines:
        raise UserError(f"{where}: no 'Random baseline' row for it in eval_meta_data.csv")
    return Task(label, task_type, entry["dataset_uri"], shots[0], str(entry.get("continuation_delimiter", " ")),
                baselines[label])


def task_labels(comma_separated):
    """"piqa, arc_easy" as ["piqa", "arc_easy"]; None (all tasks) for None."""
    return None if comma_separated is None else [label.strip() for label in comma_separated.split(",")]


def read_tasks(bundle_dir, labels=None):
    """The bundle's tasks in core.yaml's order; `labels` (a list) picks some, in that order."""
    source = Path(bundle_dir) / "core.yaml"
    try:
        config = yaml.safe_load(source.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"{source}: not valid YAML ({' '.join(str(e).split())})")
    if not (isinstance(config, dict) and isinstance(config.get("icl_tasks"), list)):
        raise UserError(f"{source}: expected an 'icl_tasks' list")
    baselines = read_baselines(Path(bundle_dir) / "eval_meta_data.csv")
    tasks = {task.label: task for task in (parse_task(e, baselines, source) for e in config["icl_tasks"])}
    if labels is None:
        return list(tasks.values())
    unknown = [label for label in labels if label not in tasks]
    if unknown:
        raise UserError(f"unknown CORE task {', '.join(unknown)}; the bundle's tasks: {', '.join(tasks)}")
    return [tasks[label] for label in labels]


def check_item(item, task_type, where):
    """UserError naming `where` unless `item` has the fields of its task type."""
    def text(key):
        return isinstance(item.get(key), str)

    def texts(key):
        return isinstance(item.get(key), list) and len(item[key]) > 1 and all(isinstance(t, str) for t in item[key])

    if not isinstance(item, dict):
        raise UserError(f"{where}: expected a JSON object")
    if task_type == "multiple_choice":
        ok, expected = text("query") and texts("choices"), "'query' (a string) and 'choices' (strings)"
        options = "choices"
    elif task_type == "schema":
        ok, expected = text("continuation") and texts("context_options"), \
            "'context_options' (strings) and 'continuation' (a string)"
        options = "context_options"
    else:
        ok, expected, options = text("context") and text("continuation"), "'context' and 'continuation' strings", None
    if not ok:
        raise UserError(f"{where}: a {task_type} item needs {expected}")
    gold = item.get("gold")
    if options and not (isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(item[options])):
        raise UserError(f"{where}: 'gold' must be an index into '{options}', got {json.dumps(gold)}")


def read_items(bundle_dir, task, limit=None):
    """The task's items shuffled with random.Random(1337), then its first `limit` (all: None)."""
    path = Path(bundle_dir) / "eval_data" / task.dataset_uri
    items = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path} line {line_number}"
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: malformed JSON at column {e.colno}: {e.msg}")
                check_item(item, task.task_type, where)
                items.append(item)
    except FileNotFoundError:
        raise UserError(f"{path}: not found (task '{task.label}')")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({' '.join(str(e).split())})")
    random.Random(SHUFFLE_SEED).shuffle(items)
    items = items[:limit]
    if len(items) <= task.num_fewshot:
        raise UserError(f"task '{task.label}' is {task.num_fewshot}-shot: it needs more than {task.num_fewshot} "
                        f"items, and has {len(items)}" + (f" (limit {limit})" if limit else ""))
    return items


# ---------------------------------------------------------------- prompts and tokens

def fewshot_examples(items, index, num_fewshot):
    """The reference's choice: random.Random(1234 + index).sample of the other items."""
    if num_fewshot == 0:
        return []
    others = [i for i in range(len(items)) if i != index]
    return [items[i] for i in random.Random(FEWSHOT_SEED + index).sample(others, num_fewshot)]


def render_prompts(task, items, index):
    """The item's prompts: one per choice (multiple_choice) or context option (schema);
    for language_modeling, the prompt without its continuation and the one with it."""
    item, delimiter = items[index], task.continuation_delimiter
    examples = fewshot_examples(items, index, task.num_fewshot)
    if task.task_type == "multiple_choice":
        shots = "".join(e["query"] + delimiter + e["choices"][e["gold"]] + FEWSHOT_SEPARATOR for e in examples)
        return [shots + item["query"] + delimiter + choice for choice in item["choices"]]
    if task.task_type == "schema":
        shots = "".join(e["context_options"][e["gold"]] + delimiter + e["continuation"] + FEWSHOT_SEPARATOR
                        for e in examples)
        return [shots + option + delimiter + item["continuation"] for option in item["context_options"]]
    shots = "".join(e["context"].strip() + delimiter + e["continuation"] + FEWSHOT_SEPARATOR for e in examples)
    prompt = shots + item["context"].strip() + delimiter
    # Stripped: a trailing space would merge into the continuation's first token.
    return [prompt.strip(), prompt + item["continuation"]]


def common_length(sequences, from_end=False):
    """How many tokens all `sequences` share at their start (or end)."""
    if from_end:
        sequences = [s[::-1] for s in sequences]
    shared = 0
    for tokens in zip(*sequences):
        if any(t != tokens[0] for t in tokens):
            break
        shared += 1
    return shared


@dataclass(frozen=True)
class Row:
    """One sequence the model reads; tokens[start:end] is the scored continuation."""
    tokens: list
    start: int
    end: int


@dataclass(frozen=True)
class EncodedItem:
    task: str  # the task's label
    task_type: str
    rows: list  # Rows: one per choice or context option; one for language_modeling
    gold: int | None  # the right row (None for language_modeling)
    truncated: bool  # a row was longer than the model's context and lost its first tokens


def fit_row(tokens, start, context_length):
    """A Row of the last `context_length` tokens. The continuation keeps at least one
    token and at least one token before it, where the reference would score nothing
    (a choice that is a prefix of another) or fail (a continuation longer than the window)."""
    cut = max(0, len(tokens) - context_length)
    tokens, end = tokens[cut:], len(tokens) - cut
    return Row(tokens, min(max(start - cut, 1), end - 1), end)


def encode_item(task, items, index, tokenizer, context_length):
    prompts = render_prompts(task, items, index)
    sequences = [[tokenizer.eot_id] + tokenizer.encode(prompt) for prompt in prompts]
    if task.task_type == "multiple_choice":
        starts = [common_length(sequences)] * len(sequences)
    elif task.task_type == "schema":
        shared = common_length(sequences, from_end=True)
        starts = [len(s) - shared for s in sequences]
    else:
        # The prompt without the continuation is a prefix of the one with it (the
        # reference asserts so); the common prefix is that prefix whenever it is.
        sequences, starts = sequences[1:], [common_length(sequences)]
    rows = [fit_row(tokens, start, context_length) for tokens, start in zip(sequences, starts)]
    truncated = any(len(s) > context_length for s in sequences)
    return EncodedItem(task.label, task.task_type, rows, items[index].get("gold"), truncated)


def encode_task(task, items, tokenizer, context_length):
    return [encode_item(task, items, index, tokenizer, context_length) for index in range(len(items))]


# ---------------------------------------------------------------- scoring

def score_batch(model, rows, autocast_dtype):
    """(mean cross-entropy, every token the argmax) of each row's continuation: one
    forward pass, rows padded on the right (which a causal model never sees from
    earlier positions)."""
    width = max(len(row.tokens) for row in rows)
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        inputs[r, :len(row.tokens)] = torch.tensor(row.tokens)
        targets[r, :len(row.tokens) - 1] = torch.tensor(row.tokens[1:])
        mask[r, row.start - 1:row.end - 1] = True  # position p predicts token p + 1
    device = next(model.parameters()).device
    inputs, targets, mask = inputs.to(device), targets.to(device), mask.to(device)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logits = model(inputs)
    # Only the continuations' logits, in float32.
    scored_logits = logits[mask].float()
    losses = torch.zeros(mask.shape, device=device)
    losses[mask] = F.cross_entropy(scored_logits, targets[mask], reduction="none")
    misses = torch.zeros(mask.shape, dtype=torch.long, device=device)
    misses[mask] = (scored_logits.argmax(dim=-1) != targets[mask]).long()
    return losses.sum(dim=1) / mask.sum(dim=1), misses.sum(dim=1) == 0


def length_order(rows):
    """Row indices longest first: batches of similar lengths waste little padding."""
    return sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))


def score_rows(model, rows, batch_size, autocast_dtype=None, bar=None):
    """A [len(rows), 2] float tensor on the model's device: each row's mean continuation
    cross-entropy and 1.0 if every continuation token is the argmax, `batch_size` rows
    of similar length per forward pass of `model` (in eval mode)."""
    device = next(model.parameters()).device
    results = torch.zeros(len(rows), 2, device=device)
    order = length_order(rows)
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        mean_losses, all_argmax = score_batch(model, [rows[i] for i in indices], autocast_dtype)
        results[indices] = torch.stack([mean_losses, all_argmax.float()], dim=1)
        if bar is not None:
            bar.update(len(indices))
    return results


def item_correct(item, row_results):
    """Whether the model got `item` right, from its rows' results (a list of [mean loss, all argmax])."""
    if item.task_type == "language_modeling":
        return row_results[0][1] == 1.0
    mean_losses = [mean_loss for mean_loss, _ in row_results]
    return mean_losses.index(min(mean_losses)) == item.gold


def correct_per_item(items, results):
    """Each EncodedItem's correctness, given score_rows' results for all their rows in order."""
    results = results.tolist()
    correct, offset = [], 0
    for item in items:
        correct.append(item_correct(item, results[offset:offset + len(item.rows)]))
        offset += len(item.rows)
    return correct


# ---------------------------------------------------------------- accuracy, centering, CORE

@dataclass(frozen=True)
class TaskResult:
    task: Task
    correct: int
    items: int

    @property
    def accuracy(self):
        return self.correct / self.items

    @property
    def accuracy_se(self):
        """The binomial standard error of the accuracy."""
        return math.sqrt(self.accuracy * (1 - self.accuracy) / self.items)

    @property
    def centered(self):
        chance = 0.01 * self.task.random_baseline
        return (self.accuracy - chance) / (1 - chance)

    @property
    def centered_se(self):
        return self.accuracy_se / (1 - 0.01 * self.task.random_baseline)


def core_metric(results):
    """(CORE, its standard error): the mean of the centered accuracies, and
    sqrt(sum of their squared standard errors) / number of tasks."""
    core = sum(r.centered for r in results) / len(results)
    return core, math.sqrt(sum(r.centered_se ** 2 for r in results)) / len(results)


def tally(items, correct):
    """{task label: (correct, items)} from EncodedItems and their correctness."""
    counts = {}
    for item, right in zip(items, correct):
        hits, count = counts.get(item.task, (0, 0))
        counts[item.task] = (hits + right, count + 1)
    return counts


def results_dict(results):
    """The per-task numbers and CORE, as logged and written to JSON."""
    core, core_se = core_metric(results)
    return {
        "core": core,
        "core_se": core_se,
        "tasks": {r.task.label: {"type": r.task.task_type, "shots": r.task.num_fewshot, "items": r.items,
                                 "correct": r.correct, "accuracy": r.accuracy, "accuracy_se": r.accuracy_se,
                                 "random_baseline": r.task.random_baseline, "centered": r.centered,
                                 "centered_se": r.centered_se} for r in results},
    }


# ---------------------------------------------------------------- during training (ddp_train.py)

@dataclass(frozen=True)
class RankShare:
    """One rank's part of the CORE evaluations during training. Every rank encodes all
    items (cheap) and scores the rows at positions rank, rank + world_size, ... of the
    length order, as many as every other rank."""
    tasks: list  # Tasks
    items: list  # EncodedItems of all tasks, all ranks
    rows: list  # this rank's Rows; the last ones may repeat a row, uncounted, to keep the ranks in step
    row_indices: list  # each of this rank's first len(row_indices) rows' index among all items' rows
    total_rows: int
    batch_size: int  # rows per forward pass


def rank_rows(rows, rank, world_size):
    """(this rank's rows, their indices among `rows`): every world_size-th row of the
    length order, ceil(len(rows) / world_size) of them; a rank past the end repeats
    its last row (not counted), since a sharded model's forward passes are collective."""
    order = length_order(rows)
    mine = order[rank::world_size]
    per_rank = math.ceil(len(rows) / world_size)
    padded = mine + [mine[-1] if mine else order[-1]] * (per_rank - len(mine))
    return [rows[i] for i in padded], mine


def training_share(run, ctx, datasets_dir, tokenizer_name):
    """At start-up: all of train.json's CORE items, encoded with the run's tokenizer, and
    this rank's rows. A URL is downloaded once per node, or once in all with
    shared_filesystem, into DATASETS_DIR/core/, as the datasets are."""
    train_cfg = run.train
    source = train_cfg.core_source
    cache_dir = Path(datasets_dir) / "core"
    fetches = ctx.is_main if train_cfg.shared_filesystem else ctx.is_local_main
    run_and_share_errors(fetches, lambda: fetch_bundle(source, cache_dir))
    bundle_dir = fetch_bundle(source, cache_dir)
    tasks = read_tasks(bundle_dir, task_labels(train_cfg.core_tasks))
    tokenizer = get_tokenizer(tokenizer_name)
    items = [item for task in tasks for item in encode_task(
        task, read_items(bundle_dir, task, train_cfg.core_items), tokenizer, run.model.context_length)]
    all_rows = [row for item in items for row in item.rows]
    rows, row_indices = rank_rows(all_rows, ctx.rank, ctx.world_size)
    return RankShare(tasks, items, rows, row_indices, len(all_rows), train_cfg.microbatch_size)


@torch.no_grad()
def distributed_core(model, share, autocast_dtype):
    """core, core_se and each task's centered accuracy of the training `model`: each rank
    scores its rows in eval mode, in as many forward passes as every other rank, into
    its places of a tensor of all rows' results, and one all-reduce adds them up."""
    model.eval()
    mine = score_rows(model, share.rows, share.batch_size, autocast_dtype)
    model.train()
    results = torch.zeros(share.total_rows, 2, device=mine.device)
    results[share.row_indices] = mine[:len(share.row_indices)]
    dist.all_reduce(results)
    counts = tally(share.items, correct_per_item(share.items, results))
    task_results = [TaskResult(task, *counts[task.label]) for task in share.tasks]
    core, core_se = core_metric(task_results)
    return {"core": core, "core_se": core_se, **{f"core/{r.task.label}": r.centered for r in task_results}}
