"""What the evaluation scripts (test_smoke.py, test_loss.py, test_ift.py,
eval_hellaswag.py) and convert_gpt2.py share: the device, the CPU thread count,
loading a model for evaluation, and its tokenizer."""

import dataclasses
import sys
from pathlib import Path

import click
import torch

from checkpointing import load_model_weights
from config import ModelConfig, load_json
from errors import UserError
from gpt import GPTModel
from token_data import dataset_location, get_tokenizer, read_meta

DEFAULT_TOKENIZER = "gpt2"
TOKENIZER_CHOICES = ("gpt2", "bytes")


def one_line(text):
    """A library's error message as one line: `error: ...` output is a single line."""
    return " ".join(str(text).split())


def pick_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model_config(model_json):
    return ModelConfig.from_dict(load_json(model_json), source=str(model_json))


def load_model(model_json, weights, device, drop_rate=0.0):
    """A GPTModel from model.json and a model.safetensors (ours, the reference
    harness's, or converted), on `device`, in eval mode.

    `drop_rate` replaces model.json's: it is the dropout the model applies
    whenever a caller switches it to train mode. The default 0 keeps dropout
    off for evaluation; test_ift.py passes the rate its --dropout chooses for
    fine-tuning.
    """
    config = dataclasses.replace(load_model_config(model_json), drop_rate=drop_rate)
    model = GPTModel(config)
    load_model_weights(model, weights)
    return model.to(device).eval()


def tokenizer_name_for(model_json, datasets_dir):
    """(tokenizer name, where it came from) for a model.json.

    A model.json inside a run directory whose train.json names a dataset that
    is present locally with a meta.json uses that dataset's tokenizer; every
    other model (converted ones, reference-harness runs) is GPT-2.
    """
    train_json = Path(model_json).parent / "train.json"
    if not train_json.is_file():
        return DEFAULT_TOKENIZER, "default: no train.json beside the model config"
    raw = load_json(train_json)
    spec = raw.get("dataset") if isinstance(raw, dict) else None
    if not isinstance(spec, str):
        return DEFAULT_TOKENIZER, f"default: {train_json} names no dataset"
    try:
        _, dataset_dir = dataset_location(spec, datasets_dir)
    except UserError:
        return DEFAULT_TOKENIZER, f"default: dataset '{spec}' not found"
    meta = Path(dataset_dir) / "meta.json"
    if not meta.is_file():
        return DEFAULT_TOKENIZER, f"default: no {meta}"
    return read_meta(dataset_dir).tokenizer, f"from {meta}"


def load_tokenizer(model_json, name, datasets_dir, vocab_size):
    """The tokenizer called `name`, or (name None) the one tokenizer_name_for picks,
    checked against the model's vocabulary."""
    if name is None:
        name, source = tokenizer_name_for(model_json, datasets_dir)
        print(f"tokenizer: {name} ({source})", file=sys.stderr)
    tokenizer = get_tokenizer(name)
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"tokenizer '{name}' has {tokenizer.vocab_size} tokens but the model's "
                        f"vocab_size is {vocab_size}; pass the model's tokenizer with --tokenizer")
    return tokenizer


def tokenizer_options(command):
    """--tokenizer and --datasets-dir, for scripts that pick a model's tokenizer."""
    command = click.option("--datasets-dir", default="datasets", show_default=True,
                           help="Where the run's dataset is looked for when picking the tokenizer.")(command)
    return click.option("--tokenizer", "tokenizer_name", type=click.Choice(TOKENIZER_CHOICES), default=None,
                        help="Default: the training dataset's (from the run's train.json), else gpt2.")(command)


def set_torch_threads(context, parameter, threads):
    """--threads' click callback: it runs while the command line is parsed, so before any work."""
    if threads is not None:
        torch.set_num_threads(threads)


def threads_option(command):
    """--threads, for scripts that compute with torch on the CPU."""
    return click.option("--threads", type=click.IntRange(min=1), default=None, expose_value=False,
                        callback=set_torch_threads,
                        help="CPU threads torch uses (torch.set_num_threads). Default: torch's choice.")(command)
