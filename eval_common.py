"""What the evaluation scripts (test_smoke.py, test_loss.py, test_ift.py,
eval_hellaswag.py) and convert_gpt2.py share besides model_source.py's model: the
device, the CPU thread count, and the model's tokenizer."""

import datetime
import sys
from pathlib import Path

import click
import torch

import chat_tokens
from errors import UserError
from token_data import dataset_location, get_tokenizer, read_meta

DEFAULT_TOKENIZER = "gpt2"
TOKENIZER_CHOICES = ("gpt2", "bytes", chat_tokens.ENCODING_NAME)


def pick_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_for(name):
    """An evaluation script's --device NAME as a torch.device (None: CUDA if there is one)."""
    if name is None:
        return pick_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a torch device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available")
    return device


def tokenizer_name_for(source, datasets_dir):
    """(tokenizer name, where it came from) for a model_source.ModelSource.

    A model of a run whose train.json names datasets present locally with a meta.json uses
    their tokenizer (of a mixture, the one with the most tokens: mixed sources share a base
    encoding, and a chat source adds its special tokens); every other model (converted
    ones, reference-harness runs) is GPT-2.
    """
    if not source.datasets:
        return DEFAULT_TOKENIZER, "default: no train.json naming a dataset beside the model config"
    found, missing = [], []
    for spec in source.datasets:
        try:
            _, dataset_dir = dataset_location(spec, datasets_dir, source.run_dir)
        except UserError:
            missing.append(f"dataset '{spec}' not found")
            continue
        meta = Path(dataset_dir) / "meta.json"
        if meta.is_file():
            found.append((read_meta(dataset_dir), meta))
        else:
            missing.append(f"no {meta}")
    if not found:
        return DEFAULT_TOKENIZER, f"default: {'; '.join(missing)}"
    dataset_meta, meta = max(found, key=lambda pair: pair[0].vocab_size)
    return dataset_meta.tokenizer, f"from {meta}"


def load_tokenizer(source, name, datasets_dir):
    """The tokenizer called `name`, or (name None) the one tokenizer_name_for picks,
    checked against the model's vocabulary."""
    if name is None:
        name, reason = tokenizer_name_for(source, datasets_dir)
        print(f"tokenizer: {name} ({reason})", file=sys.stderr)
    tokenizer = get_tokenizer(name)
    if tokenizer.vocab_size > source.config.vocab_size:
        raise UserError(f"tokenizer '{name}' has {tokenizer.vocab_size} tokens but the model's "
                        f"vocab_size is {source.config.vocab_size}; pass the model's tokenizer with --tokenizer")
    return tokenizer


def tokenizer_options(command):
    """--tokenizer and --datasets-dir, for scripts that pick a model's tokenizer."""
    command = click.option("--datasets-dir", default="datasets", show_default=True,
                           help="Where datasets live (the run's gives the tokenizer).")(command)
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


def evaluation_record(source, model, tokenizer, device, autocast_dtype, batch_size):
    """What an evaluation's --json says about the model and how it was run."""
    return {
        "model_config": source.config_source,
        "weights": str(source.weights.resolve()),
        "parameters": model.num_parameters(),
        "tokenizer": tokenizer.name,
        "context_length": model.cfg.context_length,
        "device": str(device),
        "autocast_dtype": None if autocast_dtype is None else str(autocast_dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
