"""Instruction fine-tuning test, as in chapter 7 of "Build a Large Language Model
(from Scratch)" and the reference harness gpjt/ddp-base-model-from-scratch.

    uv run test_ift.py generate my-run my-run       # NAME, then the model: RUN [CHECKPOINT]
    uv run test_ift.py judge my-run-ift-test-results.json gpt2-ift-test-results.json

`generate` fine-tunes the model on Alpaca-style instruction data (by default the
book's 1,100 items), has it answer every test item greedily and writes
NAME-ift-test-results.json. `judge` shows the responses of several such files,
item by item and in shuffled order, to an LLM judge over an OpenAI-compatible
chat-completions endpoint and ranks the models by their mean score. It saves
each judgement as it arrives in the files' -judged.json copies, so a rerun of a
stopped `judge` command continues where it stopped.
"""

import datetime
import email.utils
import hashlib
import http.client
import json
import os
import random
import re
import statistics
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from tqdm import tqdm

from config import load_json
from errors import UserError, one_line, report_user_errors
from eval_common import load_tokenizer, pick_device, threads_option, tokenizer_options
from gpt import generate
from jsonfiles import strict_json
from model_source import GRAMMAR, load_model, model_arguments, resolve_model

BOOK_DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
                 "ch07/01_main-chapter-code/instruction-data.json")
RESULTS_SUFFIX = "-ift-test-results.json"
# The book's (and the reference harness's) fine-tuning settings.
BATCH_SIZE = 8
LEARNING_RATE = 5e-5
WEIGHT_DECAY = 0.1
MAX_NEW_TOKENS = 256
IGNORE_INDEX = -100  # F.cross_entropy skips targets with this value
# Without --epochs, a backstop for a validation loss that never rises.
MAX_EPOCHS = 100
# --dropout: "model" trains with the model config's drop_rate, "on" with GPT-2's rate
# (the one the reference harness's runs with dropout use), "off" without dropout.
DROPOUT_CHOICES = ("model", "on", "off")
GPT2_DROP_RATE = 0.1


# ---------------------------------------------------------------- the data

def default_cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddp-gpt-trainer"


def parse_instruction_data(text, source):
    """The items of an Alpaca-format JSON list (instruction, optional input, output)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{source}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}")
    if not isinstance(data, list) or not data:
        raise UserError(f"{source}: expected a non-empty JSON list of instruction items")
    for index, item in enumerate(data):
        if not (isinstance(item, dict) and isinstance(item.get("instruction"), str)
                and isinstance(item.get("input", ""), str) and isinstance(item.get("output"), str)):
            raise UserError(f"{source}: item {index} needs string fields 'instruction' and "
                            "'output' (and 'input', which may be empty)")
    return data


def load_instruction_data(source, cache_dir):
    """Items from a local file, or from a URL downloaded once into `cache_dir`."""
    if not source.startswith(("http://", "https://")):
        path = Path(source)
        if not path.is_file():
            raise UserError(f"{source}: instruction data file not found")
        return parse_instruction_data(path.read_text(encoding="utf-8"), source)
    url_hash = hashlib.sha256(source.encode()).hexdigest()[:12]
    cached = Path(cache_dir) / f"{url_hash}-{Path(urllib.parse.urlparse(source).path).name}"
    if cached.is_file():
        return parse_instruction_data(cached.read_text(encoding="utf-8"), cached)
    print(f"downloading {source}", file=sys.stderr)
    try:
        with urllib.request.urlopen(source, timeout=60) as response:
            text = response.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:  # urllib's errors are OSErrors
        raise UserError(f"could not download {source} ({one_line(e)}); pass --data with a local copy")
    data = parse_instruction_data(text, source)  # before caching, so junk is never cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(cached.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, cached)
    return data


def split_data(data):
    """(train, test, validation) in file order: 85%, 10% and the remaining 5%, as the book."""
    train_end = int(len(data) * 0.85)
    test_end = train_end + int(len(data) * 0.1)
    return data[:train_end], data[train_end:test_end], data[test_end:]


def format_input(entry):
    """The book's Alpaca prompt, up to (not including) the response header."""
    text = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request."
            f"\n\n### Instruction:\n{entry['instruction']}")
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text


def format_example(entry):
    return format_input(entry) + f"\n\n### Response:\n{entry['output']}"


# ---------------------------------------------------------------- batches and losses

def collate(batch, pad_id, max_length):
    """(inputs, targets) for lists of token ids, as the book's collate function.

    Each sequence is followed by one end-of-text (`pad_id`) target so the model
    learns to stop; the padding after it is masked with IGNORE_INDEX. Both
    tensors are cropped to `max_length` (the context length).
    """
    width = max(len(item) for item in batch)
    inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(batch):
        inputs[row, :len(item)] = torch.as_tensor(item, dtype=torch.long)
        targets[row, :len(item) - 1] = torch.as_tensor(item[1:], dtype=torch.long)
        targets[row, len(item) - 1] = pad_id
    return inputs[:, :max_length], targets[:, :max_length]


def make_batches(encoded, pad_id, max_length, generator=None):
    """Collated batches of BATCH_SIZE. With a generator: shuffled, dropping a last
    partial batch (training, as the book); without: in order, every item kept."""
    if generator is None:
        order, usable = list(range(len(encoded))), len(encoded)
    else:
        order = torch.randperm(len(encoded), generator=generator).tolist()
        usable = len(encoded) - len(encoded) % BATCH_SIZE
    return [collate([encoded[i] for i in order[start:start + BATCH_SIZE]], pad_id, max_length)
            for start in range(0, usable, BATCH_SIZE)]


def batch_loss(model, inputs, targets):
    device = next(model.parameters()).device
    logits = model(inputs.to(device))
    return F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(),
                           ignore_index=IGNORE_INDEX)


def mean_loss(model, batches):
    """Mean of the per-batch losses (the book's calc_loss_loader over every batch)."""
    model.eval()
    with torch.no_grad():
        return sum(batch_loss(model, x, y).item() for x, y in batches) / len(batches)


def fine_tune(model, optimizer, train_encoded, val_batches, pad_id, epochs, generator,
              on_epoch_end=None):
    """Train for `epochs` epochs or, with epochs None, until the validation loss
    stops falling, then put back the weights of the epoch before that.

    Returns the per-epoch losses and the epoch whose weights the model ends
    with. `on_epoch_end(epoch, model)` runs after each epoch's validation
    (tests use it to copy the weights).
    """
    history, previous_weights = [], None
    for epoch in range(1, (epochs or MAX_EPOCHS) + 1):
        model.train()
        train_losses = []
        batches = make_batches(train_encoded, pad_id, model.cfg.context_length, generator)
        for inputs, targets in tqdm(batches, desc=f"epoch {epoch}", leave=False):
            optimizer.zero_grad()
            loss = batch_loss(model, inputs, targets)
            loss.backward()
            optimizer.step()
            train_losses.append(loss.item())
        val_loss = mean_loss(model, val_batches)
        history.append({"epoch": epoch, "train_loss": sum(train_losses) / len(train_losses),
                        "val_loss": val_loss})
        print(f"epoch {epoch}: train loss {history[-1]['train_loss']:.6f}, "
              f"validation loss {val_loss:.6f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, model)
        if epochs is None:
            # `not <` so that a NaN validation loss also stops training.
            if len(history) > 1 and not val_loss < history[-2]["val_loss"]:
                print(f"validation loss rose: keeping the weights from epoch {epoch - 1}")
                model.load_state_dict(previous_weights)
                return history, epoch - 1
            # A real copy (on the CPU, to spare GPU memory): the live tensors
            # keep changing in the next epoch.
            previous_weights = {key: value.detach().to("cpu", copy=True)
                                for key, value in model.state_dict().items()}
    return history, len(history)


def fine_tuning_drop_rate(dropout, model_config):
    """The dropout rate fine-tuning trains with for a --dropout choice."""
    if dropout == "model":
        return model_config.drop_rate
    return GPT2_DROP_RATE if dropout == "on" else 0.0


def respond(model, tokenizer, entry):
    """The model's greedy response to an item's prompt, up to end-of-text, as the book
    extracts it."""
    prompt_ids = tokenizer.encode(format_input(entry))
    idx = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    new_ids = generate(model, idx, MAX_NEW_TOKENS, eos_id=tokenizer.eot_id)[0, len(prompt_ids):].tolist()
    if tokenizer.eot_id in new_ids:
        new_ids = new_ids[:new_ids.index(tokenizer.eot_id)]
    return tokenizer.decode(new_ids).replace("### Response:", "").strip()


# ---------------------------------------------------------------- the judge

JUDGE_PROMPT = """You are judging how well several language models follow instructions.
Each was fine-tuned to follow instructions and was given the same prompt:

```
{prompt}
```

A correct output would be:

```
{reference}
```

Score each model's response from 0 (useless) to 100 (as good as the correct output),
with a short comment. Reply with only a JSON object with exactly these keys, each
score a number (the 50s below only show the format):

{example}

Here are the models' responses:

"""
# Seconds before the first retry of a failed request; the wait doubles with each
# retry, up to --max-backoff.
FIRST_BACKOFF = 1.0
# An endpoint still failing after every retry for this many items in a row is
# down, not flaky: stop instead of spending the retries on every remaining item.
MAX_UNAVAILABLE_IN_A_ROW = 3
# What a -judged.json adds to each item of its results file.
JUDGE_ITEM_FIELDS = ("judge_scores", "judge_comments")
# The judging an earlier run's -judged.json must come from for a rerun to keep its scores.
RESUME_SETTINGS = ("judge_model", "seed", "results_files")


class MalformedJudgement(Exception):
    """The judge kept replying with something that is not the JSON asked for."""


class EndpointUnavailable(Exception):
    """The endpoint kept failing transiently (no connection, a reset or truncated
    response, a time-out, HTTP 408, 429 or 5xx) through every retry."""


class RequestRejected(Exception):
    """The endpoint refused the request itself (any other HTTP error): retrying the
    same request cannot help."""

    def __init__(self, code, detail):
        super().__init__(f"HTTP {code}: {detail}")
        self.code = code
        self.detail = detail


def judge_prompt(entry, responses):
    example = json.dumps({f"Model {j + 1}": {"score": 50, "comment": "<one sentence>"}
                          for j in range(len(responses))}, indent=2)
    prompt = JUDGE_PROMPT.format(prompt=format_input(entry), reference=entry["output"],
                                 example=example)
    for j, response in enumerate(responses):
        prompt += f"# Model {j + 1}\n\n```\n{response}\n```\n\n"
    return prompt


def as_score(value):
    """A judge's score as a float from 0 to 100, from a number or a numeric string
    such as "72" (judges often quote numbers); None for anything else."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        return None
    return float(value)


def parse_judgement(text, count):
    """[(score, comment)] for Model 1..count from the judge's reply; a ValueError says
    what is wrong with it."""
    # Judges often wrap the object in a Markdown fence or a sentence.
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError(f"no JSON object in the reply {text[:200]!r}")
    try:
        verdict = json.loads(text[start:end + 1])
    except json.JSONDecodeError as e:
        raise ValueError(f"the reply is not valid JSON ({e.msg}): {text[:200]!r}")
    labels = [f"Model {j + 1}" for j in range(count)]
    if not isinstance(verdict, dict) or sorted(verdict) != sorted(labels):
        found = sorted(verdict) if isinstance(verdict, dict) else type(verdict).__name__
        raise ValueError(f"expected the keys {labels}, got {found}")
    scores = []
    for label in labels:
        entry = verdict[label]
        raw_score = entry.get("score") if isinstance(entry, dict) else None
        score = as_score(raw_score)
        if score is None:
            raise ValueError(f"{label}: score must be a number from 0 to 100, got {json.dumps(raw_score)}")
        scores.append((score, str(entry.get("comment", entry.get("comments", "")))))
    return scores


def is_transient(status):
    """HTTP statuses a server may get over: time-outs, rate limits, server errors."""
    return status in (408, 429) or status >= 500


def retry_after_seconds(header):
    """The wait a Retry-After header asks for (delta-seconds or an HTTP date), or
    None without a usable one."""
    if header is None:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # HTTP dates are GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


def backoff_delay(retry, max_backoff, retry_after=None):
    """Seconds to wait before retry number `retry` (from 0): FIRST_BACKOFF doubling
    each time, capped at `max_backoff`, and jittered (between half and all of it)
    so that clients that failed together do not retry together; never less than
    the server's Retry-After."""
    ceiling = min(max_backoff, FIRST_BACKOFF * 2 ** retry)
    return max(random.uniform(ceiling / 2, ceiling), retry_after or 0.0)


def error_body(error):
    """An HTTP error's body as one line, for the error message (the body may itself
    fail to arrive)."""
    try:
        return one_line(error.read().decode("utf-8", errors="replace"))[:300]
    except (OSError, http.client.HTTPException) as e:
        return f"(body unreadable: {one_line(e) or type(e).__name__})"


class JudgeClient:
    """A chat-completions endpoint (OpenAI, vLLM, llama.cpp, Ollama, ...) over urllib."""

    def __init__(self, base_url, api_key, model, attempts, retries, timeout, max_backoff, seed):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.model = model
        self.attempts = attempts
        self.retries = retries
        self.timeout = timeout
        self.max_backoff = max_backoff
        # JSON output and the least random judgements, where the server takes
        # them: one a server rejects is left out from then on.
        self.optional_fields = {"response_format": {"type": "json_object"}, "temperature": 0,
                                "seed": seed}

    def _post(self, payload):
        """The response body; retries transient failures with back-off and raises
        EndpointUnavailable when they last, RequestRejected for other HTTP errors."""
        request = urllib.request.Request(self.url, data=json.dumps(payload).encode(),
                                         headers=self.headers, method="POST")
        for retry in range(self.retries + 1):
            retry_after = None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as e:
                if not is_transient(e.code):
                    raise RequestRejected(e.code, error_body(e))
                problem, retry_after = f"HTTP {e.code}", retry_after_seconds(e.headers.get("Retry-After"))
            # OSError: no connection, a reset, a time-out (URLError is one too);
            # HTTPException: a truncated (IncompleteRead) or garbled response.
            except (OSError, http.client.HTTPException) as e:
                problem = one_line(getattr(e, "reason", e)) or type(e).__name__
            if retry == self.retries:
                raise EndpointUnavailable(f"{self.url} failed {retry + 1} times; last: {problem}")
            delay = backoff_delay(retry, self.max_backoff, retry_after)
            tqdm.write(f"judge endpoint: {problem}; retrying in {delay:.1f} s", file=sys.stderr)
            time.sleep(delay)

    def _chat(self, prompt):
        """The response body for `prompt`, asking again without an optional field
        that the server rejects."""
        while True:
            payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                       **self.optional_fields}
            try:
                return self._post(payload)
            except RequestRejected as e:
                # Servers answer an unsupported field with 400 (422 from FastAPI-based
                # ones) naming it: ask again without it.
                rejected = [field for field in self.optional_fields
                            if e.code in (400, 422) and re.search(rf"\b{field}\b", e.detail)]
                if not rejected:
                    raise UserError(f"judge endpoint {self.url} answered {e}")
                tqdm.write(f"warning: the judge endpoint rejects '{rejected[0]}' ({e.detail}); "
                           "asking without it from now on", file=sys.stderr)
                del self.optional_fields[rejected[0]]

    def complete(self, prompt):
        """The judge's reply text; ValueError when the response is not a chat completion."""
        body = self._chat(prompt)
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError) as e:
            raise ValueError(f"not a chat completion ({type(e).__name__}): {body[:200]!r}")
        if not isinstance(content, str):
            raise ValueError(f"the completion has no text content: {body[:200]!r}")
        return content

    def judge(self, prompt, count):
        """[(score, comment)] per model, asking again while the reply is malformed."""
        problems = []
        for _ in range(self.attempts):
            try:
                return parse_judgement(self.complete(prompt), count)
            except ValueError as e:
                problems.append(str(e))
        raise MalformedJudgement(f"{len(problems)} malformed replies; last: {problems[-1]}")


def load_results(path):
    """(the file's JSON, its items). Accepts ours (an object with "items") and the
    reference harness's (a bare list of items)."""
    raw = load_json(path)
    items = raw.get("items") if isinstance(raw, dict) else raw
    if not isinstance(items, list) or not items:
        raise UserError(f"{path}: not an IFT results file (expected a list of items, or an "
                        "object with a non-empty 'items' list)")
    for index, item in enumerate(items):
        if not (isinstance(item, dict)
                and all(isinstance(item.get(k), str) for k in ("instruction", "output", "model_response"))):
            raise UserError(f"{path}: item {index} needs string fields 'instruction', 'output' "
                            "and 'model_response'")
    return raw, items


def check_same_items(results):
    """Every file must hold the same test items in the same order."""
    (first_path, (_, first_items)), *others = results.items()
    for path, (_, items) in others:
        if len(items) != len(first_items):
            raise UserError(f"{path} has {len(items)} items but {first_path} has {len(first_items)}")
        for index, (a, b) in enumerate(zip(first_items, items)):
            for key in ("instruction", "input", "output"):
                if a.get(key, "") != b.get(key, ""):
                    raise UserError(f"{path} item {index} has a different '{key}' from {first_path}: "
                                    "the files must hold the same items in the same order")


def judge_all(client, responses, items, scores, comments, rng, save):
    """Judge every item, in every repeat, that `scores` has no score for yet.

    `responses[path]` holds that file's responses in item order; `scores` and
    `comments` are {path: [repeat][item]} with None where not judged, and get
    filled in. `save(failures)` runs after every judgement, so that a run that
    stops early loses nothing. Returns the judgements that failed.
    """
    paths = list(responses)
    table = scores[paths[0]]  # a judgement scores every model at once
    failures, unavailable_in_a_row = [], 0
    with tqdm(total=sum(score is None for repeat in table for score in repeat), desc="judging") as progress:
        for repeat in range(len(table)):
            for index, entry in enumerate(items):
                # A fresh order every time, so no model benefits from a position bias;
                # drawn for judged items too, so a rerun shows the orders a run that
                # never stopped would have.
                order = rng.sample(paths, len(paths))
                if table[repeat][index] is not None:
                    continue
                prompt = judge_prompt(entry, [responses[path][index] for path in order])
                try:
                    verdict = client.judge(prompt, len(order))
                except (MalformedJudgement, EndpointUnavailable) as e:
                    failures.append({"repeat": repeat + 1, "item": index, "error": str(e)})
                    unavailable_in_a_row = unavailable_in_a_row + 1 if isinstance(e, EndpointUnavailable) else 0
                    tqdm.write(f"warning: item {index} (repeat {repeat + 1}) not judged: {e}",
                               file=sys.stderr)
                else:
                    unavailable_in_a_row = 0
                    for path, (score, comment) in zip(order, verdict):
                        scores[path][repeat][index] = score
                        comments[path][repeat][index] = comment
                save(failures)
                progress.update()
                if unavailable_in_a_row == MAX_UNAVAILABLE_IN_A_ROW:
                    raise UserError(f"the judge endpoint failed on {unavailable_in_a_row} items in a row "
                                    f"(last: {failures[-1]['error']}); the judgements so far are saved: "
                                    "rerun the same command to continue")
    return failures


def summarize(repeat_scores):
    """(mean, standard deviation, per-repeat means) of a model's scores: each repeat's
    mean over its judged items, then the mean and spread of those over repeats. The
    spread measures how much the judge disagrees with itself."""
    repeat_means = [statistics.fmean(judged) for judged in
                    ([score for score in repeat if score is not None] for repeat in repeat_scores) if judged]
    if not repeat_means:
        return None, None, repeat_means
    std = statistics.stdev(repeat_means) if len(repeat_means) > 1 else 0.0
    return statistics.fmean(repeat_means), std, repeat_means


def judged_path(path):
    path = Path(path)
    return path.with_name(path.name.removesuffix(".json") + "-judged.json")


def saved_judgements(path, items, settings):
    """{(repeat, item index): (score, comment)} from the -judged.json of `path` that an
    earlier run of the same judging (RESUME_SETTINGS) left, for the items whose
    instruction, reference and response are still those of `path`."""
    judged_file = judged_path(path)
    if not judged_file.is_file():
        return {}
    saved = load_json(judged_file)
    judge = saved.get("judge") if isinstance(saved, dict) else None
    if not isinstance(judge, dict) or any(judge.get(key) != settings[key] for key in RESUME_SETTINGS):
        print(f"{judged_file}: judged with other settings; judging afresh", file=sys.stderr)
        return {}
    judgements = {}
    for index, (item, saved_item) in enumerate(zip(items, saved.get("items") or [])):
        if not isinstance(saved_item, dict) or item != {
                key: value for key, value in saved_item.items() if key not in JUDGE_ITEM_FIELDS}:
            continue  # a response (or the item) changed since: judge it again
        for repeat, (score, comment) in enumerate(zip(saved_item.get("judge_scores") or [],
                                                      saved_item.get("judge_comments") or [])):
            if score is not None:
                judgements[repeat, index] = (score, comment)
    return judgements


def restore_judgements(results, settings, scores, comments):
    """Fill `scores` and `comments` with what an earlier, stopped run of the same
    judging saved, where every file has it (one judgement scores all models); returns
    how many judgements that is."""
    paths = list(results)
    saved = {path: saved_judgements(path, items, settings) for path, (_, items) in results.items()}
    repeats = len(scores[paths[0]])
    restored = [key for key in set.intersection(*(set(judgements) for judgements in saved.values()))
                if key[0] < repeats]
    for path in paths:
        for repeat, index in restored:
            scores[path][repeat][index], comments[path][repeat][index] = saved[path][repeat, index]
    return len(restored)


def annotated_results(raw, items, repeat_scores, repeat_comments, judge):
    """A results file's JSON plus, in each item, its score and comment from every
    repeat (None where not judged, or where the judgement failed) and, under
    "judge", the judging's settings and summary."""
    annotated = dict(raw) if isinstance(raw, dict) else {}
    annotated["items"] = [{**item, "judge_scores": [repeat[i] for repeat in repeat_scores],
                           "judge_comments": [repeat[i] for repeat in repeat_comments]}
                          for i, item in enumerate(items)]
    annotated["judge"] = judge
    return annotated


def write_json_atomically(path, data):
    """Write via a temporary file and os.replace: a run killed at any moment leaves
    the previous file or the new one, never half of one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(strict_json(data, indent=2) + "\n")
    os.replace(partial, path)


# ---------------------------------------------------------------- the CLI

@click.group(epilog="""\b
Example:
  uv run test_ift.py generate my-run my-run
  uv run test_ift.py judge my-run-ift-test-results.json gpt2-ift-test-results.json""")
def cli():
    """Instruction fine-tuning test: generate responses, then judge them."""


@cli.command("generate", epilog=f"""{GRAMMAR}

\b
Example:
  uv run test_ift.py generate my-run my-run     # writes my-run-ift-test-results.json""")
@click.argument("name")
@model_arguments
@click.option("--data", "data_source", default=BOOK_DATA_URL, show_default=True,
              help="Alpaca-format JSON: a local path, or a URL downloaded once into --cache-dir.")
@click.option("--cache-dir", default=None,
              help="Where downloads are kept. Default: ~/.cache/ddp-gpt-trainer (or under $XDG_CACHE_HOME).")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Train exactly this many epochs. Default: until the validation loss rises, "
                   "then keep the previous epoch's weights.")
@click.option("--dropout", type=click.Choice(DROPOUT_CHOICES), default="model", show_default=True,
              help=f"Dropout while fine-tuning: 'model' is the model config's drop_rate (as the base model "
                   f"was trained, which is what the reference harness does), 'on' is GPT-2's "
                   f"{GPT2_DROP_RATE}, 'off' is none. Responses are always generated without dropout.")
@click.option("--seed", default=42, show_default=True,
              help="Seed for the order of the training batches and the dropout masks.")
@click.option("--out-dir", default=".", show_default=True,
              help=f"Where NAME{RESULTS_SUFFIX} is written.")
@tokenizer_options
@threads_option
@report_user_errors
def generate_command(name, model_args, data_source, cache_dir, epochs, dropout, seed, out_dir, tokenizer_name,
                     datasets_dir):
    """Fine-tune the model on instruction data; answer every test item; write NAME-ift-test-results.json."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise UserError(f"NAME '{name}' must be a plain file-name prefix")
    data = load_instruction_data(data_source, cache_dir or default_cache_dir())
    train, test, validation = split_data(data)
    if len(train) < BATCH_SIZE or not test or not validation:
        raise UserError(f"{data_source}: {len(data)} items give {len(train)} train, {len(test)} "
                        f"test and {len(validation)} validation items; it needs at least "
                        f"{BATCH_SIZE} train items and one of each other (20 items will do)")
    source = resolve_model(model_args)
    drop_rate = fine_tuning_drop_rate(dropout, source.config)
    model = load_model(source, pick_device(), drop_rate)
    tokenizer = load_tokenizer(source, tokenizer_name, datasets_dir)
    pad_id, context_length = tokenizer.eot_id, model.cfg.context_length
    torch.manual_seed(seed)  # the dropout masks come from the global generator

    def encode(entries):
        return [tokenizer.encode(format_example(entry)) for entry in entries]

    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    history, kept_epoch = fine_tune(
        model, optimizer, encode(train), make_batches(encode(validation), pad_id, context_length),
        pad_id, epochs, torch.Generator().manual_seed(seed))
    test_loss = mean_loss(model, make_batches(encode(test), pad_id, context_length))
    print(f"test loss {test_loss:.6f}")

    model.eval()  # greedy answers: no dropout, whatever fine-tuning used

    items = [{"instruction": entry["instruction"], "input": entry.get("input", ""),
              "output": entry["output"], "model_response": respond(model, tokenizer, entry)}
             for entry in tqdm(test, desc="responding")]
    results = {
        "name": name,
        "model_config": source.config_source,
        "weights": str(source.weights.resolve()),
        "data": data_source,
        "tokenizer": tokenizer.name,
        "split_sizes": {"train": len(train), "test": len(test), "validation": len(validation)},
        "seed": seed,
        "dropout": dropout,
        "drop_rate": drop_rate,
        "epochs": history,
        "kept_epoch": kept_epoch,
        "test_loss": test_loss,
        "items": items,
    }
    path = Path(out_dir) / f"{name}{RESULTS_SUFFIX}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(strict_json(results, indent=2) + "\n")
    print(f"wrote {path}")


@cli.command("judge", epilog="""\b
Example:
  OPENAI_API_KEY=sk-... uv run test_ift.py judge my-run-ift-test-results.json gpt2-ift-test-results.json""")
@click.argument("results_files", nargs=-1, required=True)
@click.option("--base-url", envvar="OPENAI_BASE_URL", default="https://api.openai.com/v1",
              show_default=True, help="OpenAI-compatible API root (env OPENAI_BASE_URL), e.g. "
                                      "http://localhost:8000/v1 for vLLM.")
@click.option("--api-key", envvar="OPENAI_API_KEY", default=None,
              help="Bearer token (env OPENAI_API_KEY); local servers usually need none.")
@click.option("--judge-model", envvar="JUDGE_MODEL", default="gpt-5.1", show_default=True,
              help="Model name sent to the endpoint (env JUDGE_MODEL).")
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(min=1),
              help="Judge everything this many times; report each model's mean and standard deviation.")
@click.option("--attempts", default=3, show_default=True, type=click.IntRange(min=1),
              help="Tries per judgement while the judge's reply is not the JSON asked for.")
@click.option("--retries", default=5, show_default=True, type=click.IntRange(min=0),
              help="Retries of a request that failed transiently (no connection, a reset or truncated "
                   "response, a time-out, HTTP 408, 429 or 5xx), with exponential back-off and jitter.")
@click.option("--timeout", default=300.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds one request may take.")
@click.option("--max-backoff", default=60.0, show_default=True, type=click.FloatRange(min=0),
              help="Longest wait between retries, in seconds, unless the server's Retry-After asks for more.")
@click.option("--seed", default=0, show_default=True,
              help="Seed for the order the models are shown in, also sent to the judge.")
@click.option("--restart", is_flag=True,
              help="Judge everything again instead of keeping what an earlier run of the same "
                   "command saved in the -judged.json files.")
@report_user_errors
def judge_command(results_files, base_url, api_key, judge_model, repeats, attempts, retries, timeout,
                  max_backoff, seed, restart):
    """Score the responses in RESULTS_FILES with an LLM judge and rank the models."""
    if len(set(results_files)) != len(results_files):
        raise UserError("a results file is given more than once")
    results = {path: load_results(path) for path in results_files}
    check_same_items(results)
    paths = list(results_files)
    items = results[paths[0]][1]
    responses = {path: [item["model_response"] for item in results[path][1]] for path in paths}
    scores = {path: [[None] * len(items) for _ in range(repeats)] for path in paths}
    comments = {path: [[None] * len(items) for _ in range(repeats)] for path in paths}
    settings = {"judge_model": judge_model, "base_url": base_url, "repeats": repeats, "seed": seed,
                "results_files": paths}
    if not restart:
        restored = restore_judgements(results, settings, scores, comments)
        if restored:
            print(f"continuing: {restored} of {repeats * len(items)} judgements saved by an earlier run "
                  "(--restart judges everything again)", file=sys.stderr)

    def save(failures):
        for path in paths:
            mean, std, repeat_means = summarize(scores[path])
            judge = {**settings, "mean": mean, "std": std, "repeat_means": repeat_means,
                     "compared_with": [p for p in paths if p != path], "failures": failures}
            write_json_atomically(judged_path(path), annotated_results(*results[path], scores[path],
                                                                       comments[path], judge))

    client = JudgeClient(base_url, api_key, judge_model, attempts, retries, timeout, max_backoff, seed)
    failures = judge_all(client, responses, items, scores, comments, random.Random(seed), save)
    judged = sum(score is not None for repeat in scores[paths[0]] for score in repeat)
    if not judged:
        raise UserError(f"every judgement failed; the last: {failures[-1]['error']}")

    rows = sorted(((*summarize(scores[path])[:2], path) for path in paths), key=lambda row: -row[0])
    print(f"\n{'rank':>4}  {'mean':>6}  {'std':>6}  {'judged':>9}  results file")
    for rank, (mean, std, path) in enumerate(rows, 1):
        print(f"{rank:>4}  {mean:6.2f}  {std:6.2f}  {judged:>4}/{repeats * len(items):<4}  {path}")
    if failures:
        print(f"\n{len(failures)} judgement(s) failed and are not counted (details in the -judged.json "
              "files' 'judge.failures'); rerun the same command to try them again")
    print(f"annotated copies: {', '.join(str(judged_path(p)) for p in paths)}")


if __name__ == "__main__":
    cli()
