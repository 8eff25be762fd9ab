"""HellaSwag, zero-shot, completion style, as llm.c and build-nanogpt evaluate it:
the items, their download, encoding, scoring and tally, and each rank's share during
training. eval_hellaswag.py is its command line; ddp_train.py scores the model this way
during training (train.json `hellaswag_interval`), every rank its share: `training_share`
and `distributed_scores`.

Each item has a context `ctx`, four `endings` and the `label` of the right one.
The context and each ending, prefixed with a space, are tokenized, and each
ending is scored as the continuation of the context: tokens = ctx_tokens +
ending_tokens, and only the ending's tokens are scored, each given everything
before it.

- acc: the ending with the highest sum of log-probabilities wins.
- acc_norm (llm.c's sense): the ending with the lowest mean per-token
  cross-entropy wins, which does not favour short endings.

Ties go to the first ending. A context and ending longer than the model's
context length keep their rightmost context_length + 1 tokens (the model reads
context_length of them and predicts the last one), so the beginning of the
context is cut; an ending longer than that is scored on its tokens inside the
window. The count of items cut so is reported.

lm-evaluation-harness's HellaSwag (multiple-choice style, with its own text
preprocessing and normalization by length in characters) reports different numbers.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from distributed import run_and_share_errors
from downloads import cache_path, cached_download
from errors import UserError, one_line
from token_data import get_tokenizer

# The test split's labels are not public, so it cannot be scored here.
SPLIT_FILES = {"validation": "val", "train": "train"}
ENDINGS = 4
PROTOCOL = ("completion style (llm.c / build-nanogpt): tokens = ctx + ' ' + ending; acc: highest sum of "
            "ending-token log-probabilities; acc_norm: lowest mean ending-token cross-entropy; contexts "
            "longer than the model's context keep their rightmost tokens")


# ---------------------------------------------------------------- the data

@dataclass(frozen=True)
class Item:
    ctx: str
    endings: tuple
    label: int


def parse_item(line, where):
    """One JSONL line as an Item; UserError naming `where` (file and line) if it is not one."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: malformed JSON at column {e.colno}: {e.msg}")
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a JSON object")
    ctx, endings, label = raw.get("ctx"), raw.get("endings"), raw.get("label")
    if not isinstance(ctx, str) or not ctx:
        raise UserError(f"{where}: 'ctx' must be a non-empty string")
    if not (isinstance(endings, list) and len(endings) == ENDINGS and all(isinstance(e, str) for e in endings)):
        raise UserError(f"{where}: 'endings' must be a list of {ENDINGS} strings")
    if not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label < ENDINGS):
        raise UserError(f"{where}: 'label' must be an integer from 0 to {ENDINGS - 1}, got {json.dumps(label)}")
    return Item(ctx, tuple(endings), label)


def read_items(path, source, limit=None):
    """The first `limit` (default all) items of a HellaSwag JSONL file; errors name `source`."""
    items = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if len(items) == limit:
                    break
                if line.strip():
                    items.append(parse_item(line, f"{source} line {line_number}"))
    except FileNotFoundError:
        raise UserError(f"{source}: HellaSwag file not found")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{source}: cannot read it ({one_line(e)})")
    if not items:
        raise UserError(f"{source}: no items")
    return items


def fetch(url, cache_dir):
    """The local copy of `url` in `cache_dir`, downloaded on first use and kept only if it
    holds valid items."""
    return cached_download(url, cache_dir, "--data, or train.json's hellaswag_data",
                           lambda path: read_items(path, url))


# ---------------------------------------------------------------- scoring

@dataclass(frozen=True)
class EncodedItem:
    rows: list  # per ending: the token ids the model reads, and then the one it predicts last
    scored: list  # per ending: how many of its row's last tokens are the ending's (the scored ones)
    label: int
    truncated: bool  # the context did not fit, and lost its first tokens


def encode_item(item, tokenizer, context_length):
    ctx_tokens = tokenizer.encode(item.ctx)
    rows, scored, truncated = [], [], False
    for ending in item.endings:
        # The space belongs to the ending: GPT-2's BPE tokens carry a word's leading space.
        ending_tokens = tokenizer.encode(" " + ending)
        tokens = ctx_tokens + ending_tokens
        row = tokens[-(context_length + 1):]
        rows.append(row)
        scored.append(min(len(ending_tokens), len(row) - 1))
        truncated |= len(row) < len(tokens)
    return EncodedItem(rows, scored, item.label, truncated)


def score_batch(model, items, autocast_dtype):
    """(sum of log-probabilities, mean cross-entropy) of each ending's tokens, as
    [len(items), 4] tensors: all endings of all items in one forward pass, padded
    on the right (which a causal model never sees from earlier positions)."""
    rows = [row for item in items for row in item.rows]
    scored = [n for item in items for n in item.scored]
    width = max(len(row) for row in rows) - 1
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, (row, n) in enumerate(zip(rows, scored)):
        length = len(row) - 1
        inputs[r, :length] = torch.tensor(row[:-1])
        targets[r, :length] = torch.tensor(row[1:])
        mask[r, length - n:length] = True
    device = next(model.parameters()).device
    inputs, targets, mask = inputs.to(device), targets.to(device), mask.to(device)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logits = model(inputs)
    # Only the ending positions' logits, in float32: a fraction of the rows' [T, vocab].
    losses = torch.zeros(mask.shape, device=device)
    losses[mask] = F.cross_entropy(logits[mask].float(), targets[mask], reduction="none")
    total = losses.sum(dim=1)
    return (-total).view(-1, ENDINGS), (total / mask.sum(dim=1)).view(-1, ENDINGS)


@dataclass(frozen=True)
class ItemScores:
    label: int
    sum_logprobs: list  # per ending
    mean_losses: list  # per ending

    @property
    def choice(self):
        """acc's pick: the highest sum of log-probabilities (the first, on a tie)."""
        return max(range(ENDINGS), key=self.sum_logprobs.__getitem__)

    @property
    def choice_norm(self):
        """acc_norm's pick: the lowest mean cross-entropy (the first, on a tie)."""
        return min(range(ENDINGS), key=self.mean_losses.__getitem__)


def scores_in_batches(model, items, batch_size, autocast_dtype):
    """ItemScores for each EncodedItem, a list per forward pass of `model` on its device,
    `batch_size` items (4 x batch_size rows) at a time."""
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        sum_logprobs, mean_losses = score_batch(model, batch, autocast_dtype)
        yield [ItemScores(item.label, s, m) for item, s, m in zip(batch, sum_logprobs.tolist(), mean_losses.tolist())]


def score_items(model, items, batch_size, autocast_dtype=None):
    """ItemScores for each EncodedItem, `batch_size` items per forward pass of `model` (in eval mode)."""
    scores = []
    with torch.inference_mode(), tqdm(total=len(items), desc="hellaswag", unit="item") as bar:
        for batch_scores in scores_in_batches(model, items, batch_size, autocast_dtype):
            scores += batch_scores
            bar.update(len(batch_scores))
    return scores


def tally(scores):
    """(correct by acc, correct by acc_norm, items): counts that add up across ranks,
    so each rank of a distributed evaluation can score its share and all-reduce them."""
    return (sum(s.choice == s.label for s in scores), sum(s.choice_norm == s.label for s in scores), len(scores))


# ---------------------------------------------------------------- during training (ddp_train.py)

@dataclass(frozen=True)
class RankShare:
    """One rank's part of the HellaSwag evaluations during training."""
    items: list  # EncodedItems, as many on every rank
    counted: int  # how many of them, from the first, count: the rest repeat an item to keep the ranks in step
    batch_size: int  # items per forward pass


def rank_share(items, rank, world_size):
    """(this rank's items, how many of them count): items rank, rank + world_size, ...

    Every rank gets ceil(len(items) / world_size) of them, because a sharded model's
    forward passes are collective (each one all-gathers weights): a rank past the end
    repeats the last item and does not count it, as ddp_train.evaluate does."""
    per_rank = math.ceil(len(items) / world_size)
    indices = range(rank, per_rank * world_size, world_size)
    return [items[min(index, len(items) - 1)] for index in indices], sum(index < len(items) for index in indices)


def training_share(run, ctx, datasets_dir, tokenizer_name):
    """At start-up: this rank's share of train.json's HellaSwag items, encoded with the
    run's tokenizer (the dataset's). A URL is downloaded once per node, or once in all
    with shared_filesystem, into DATASETS_DIR/hellaswag/, as the datasets are."""
    train_cfg = run.train
    data = train_cfg.hellaswag_source
    source = f"{run.run_dir / 'train.json'} key 'hellaswag_data' ({data})"
    path = Path(data)
    if data.startswith(("http://", "https://")):
        cache_dir = Path(datasets_dir) / "hellaswag"
        fetches = ctx.is_main if train_cfg.shared_filesystem else ctx.is_local_main
        run_and_share_errors(fetches, lambda: fetch(data, cache_dir))
        path = cache_path(data, cache_dir)
    all_items = read_items(path, source, train_cfg.hellaswag_items)
    if ctx.is_main:
        print(items_used_note(len(all_items), train_cfg.hellaswag_items, ctx.world_size, path))
    items, counted = rank_share(all_items, ctx.rank, ctx.world_size)
    tokenizer = get_tokenizer(tokenizer_name)
    # Rows of at most context_length tokens, four per item: a forward pass of no more tokens than a microbatch.
    batch_size = max(1, train_cfg.microbatch_size // ENDINGS)
    return RankShare([encode_item(item, tokenizer, run.model.context_length) for item in items], counted, batch_size)


def items_used_note(used, asked, world_size, path):
    """The start-up line saying how many items every HellaSwag score is over (a file shorter
    than hellaswag_items is scored whole, with a note; so is one with fewer items than ranks,
    whose extra ranks score a repeated item that is not counted)."""
    line = f"HellaSwag: {used} item{'' if used == 1 else 's'} of {path}"
    if asked is not None and used < asked:
        line = f"note: hellaswag_items is {asked} but {path} has {used}; HellaSwag scores those {used}"
    if used < world_size:
        line += f" (fewer than the {world_size} ranks: ranks {used} to {world_size - 1} score no item of their own)"
    return line


@torch.no_grad()
def distributed_scores(model, share, autocast_dtype):
    """hellaswag_acc and hellaswag_acc_norm of the training `model` over all ranks' shares:
    each rank scores its share in eval mode, in as many forward passes of as many items
    as every other rank, then one all-reduce adds up the counts."""
    model.eval()
    scores = [score for batch in scores_in_batches(model, share.items, share.batch_size, autocast_dtype)
              for score in batch]
    model.train()
    counts = torch.tensor(tally(scores[:share.counted]), device=next(model.parameters()).device)
    dist.all_reduce(counts)
    correct, correct_norm, count = counts.tolist()
    return {"hellaswag_acc": correct / count, "hellaswag_acc_norm": correct_norm / count}
