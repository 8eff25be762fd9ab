"""Test loss: the model's mean cross-entropy on a fixed slice of a token dataset.

    uv run test_loss.py my-run --json runs/my-run/test_loss.json
    uv run test_loss.py converted/gpt2 --dataset gpjt/fineweb-gpt2-tokens

The dataset is the run's own (its train.json's `dataset`, under --datasets-dir), or
--dataset; a model with no run (a converted one) defaults to the reference harness's
test set. The other defaults reproduce that test set exactly: 3,200 batches of 6
sequences of the model's context length (19,660,800 tokens for a 1,024-token context)
from the validation split of gpjt/fineweb-gpt2-tokens, starting at token 50,000,000.
Batch i's inputs are the batch_size * context_length tokens from start + i *
batch_size * context_length, its targets the same shifted by one; the result is the
mean of the per-batch losses.

--json PATH also writes the result as JSON (compare_runs.py reads a run's
runs/<run>/test_loss.json). The older `test_loss.py DATASETS_DIR MODEL_JSON WEIGHTS`
still works.
"""

import datetime

import click
import torch
from tqdm import tqdm

from batching import Microbatches
from cli_aliases import command_with_old_spellings
from errors import UserError, report_user_errors
from eval_common import pick_device, threads_option
from jsonfiles import write_json_result
from model_source import GRAMMAR, load_model, model_arguments, resolve_model
from token_data import SPLITS, fetch_dataset, open_split, read_meta
from training import compute_loss

# The reference harness's test set, for a model with no run.
DEFAULT_DATASET = "gpjt/fineweb-gpt2-tokens"


def mean_batch_loss(model, tokens, start_token, batches, batch_size, autocast_dtype=None):
    """Mean over `batches` consecutive batches of the per-batch cross-entropy."""
    device = next(model.parameters()).device
    context_length = model.cfg.context_length
    span = batch_size * context_length
    needed = start_token + batches * span + 1  # one more token for the last target
    if len(tokens) < needed:
        raise UserError(f"the split has {len(tokens):,} tokens, but {batches:,} batches of "
                        f"{batch_size} x {context_length} tokens from token {start_token:,} "
                        f"need {needed:,}; lower --batches or --start-token")
    total = 0.0
    with torch.inference_mode():
        # The trainer's windows and loss: the same slicing, autocast and fp32 cross-entropy.
        for inputs, targets in tqdm(Microbatches(tokens, start_token, batches, batch_size, context_length),
                                    desc="test loss", unit="batch"):
            total += compute_loss(model, inputs.to(device), targets.to(device), autocast_dtype, device).item()
    return total / batches


OLD_ARGUMENTS = 3  # DATASETS_DIR MODEL_JSON WEIGHTS


def split_old_form(model_args, datasets_dir):
    """(model arguments, datasets directory): the older form puts DATASETS_DIR first."""
    if len(model_args) == OLD_ARGUMENTS and model_args[1].endswith(".json"):
        return model_args[1:], model_args[0]
    return model_args, datasets_dir


@click.command(cls=command_with_old_spellings({"--json-path": "--json"}), epilog=f"""{GRAMMAR}

\b
Example:
  uv run test_loss.py my-run best --json runs/my-run/test_loss.json""")
@model_arguments
@click.option("--dataset", default=None,
              help="A Hugging Face dataset repo id (downloaded into --datasets-dir), a local dataset "
                   f"directory, or 'demo'. Default: the run's (train.json), else {DEFAULT_DATASET}.")
@click.option("--datasets-dir", default="datasets", show_default=True,
              help="Where datasets named by repo id (and the demo) live.")
@click.option("--split", default="validation", show_default=True, type=click.Choice(SPLITS))
@click.option("--start-token", default=50_000_000, show_default=True, type=click.IntRange(min=0))
@click.option("--batches", default=3200, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=6, show_default=True, type=click.IntRange(min=1))
@click.option("--amp/--no-amp", default=True, show_default=True,
              help="On CUDA, run the model under float16 autocast as the reference harness "
                   "does. The CPU always runs float32.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the result as JSON to this path.")
@threads_option
@report_user_errors
def main(model_args, dataset, datasets_dir, split, start_token, batches, batch_size, amp, json_path):
    """The model's mean cross-entropy on a fixed slice of a token dataset's split."""
    model_args, datasets_dir = split_old_form(model_args, datasets_dir)
    source = resolve_model(model_args)
    dataset = dataset or source.dataset or DEFAULT_DATASET
    device = pick_device()
    model = load_model(source, device)
    dataset_dir = fetch_dataset(dataset, datasets_dir, source.run_dir)
    meta = read_meta(dataset_dir)
    if meta.vocab_size > model.cfg.vocab_size:
        raise UserError(f"dataset '{dataset}' has token ids up to {meta.vocab_size - 1} but the "
                        f"model's vocab_size is {model.cfg.vocab_size}")
    tokens = open_split(dataset_dir, split)
    autocast_dtype = torch.float16 if amp and device.type == "cuda" else None
    loss = mean_batch_loss(model, tokens, start_token, batches, batch_size, autocast_dtype)
    print(f"Loss against our test dataset: {loss:.6f}")

    if json_path:
        result = {
            "loss": loss,
            "tokens": batches * batch_size * model.cfg.context_length,
            "parameters": model.num_parameters(),
            "weights": str(source.weights.resolve()),
            "run": str(source.run_dir) if source.run_dir else None,
            "checkpoint": source.checkpoint_dir.name if source.checkpoint_dir else None,
            "model_config": source.config_source,
            "dataset": dataset,
            "split": split,
            "start_token": start_token,
            "batches": batches,
            "batch_size": batch_size,
            "context_length": model.cfg.context_length,
            "autocast_dtype": None if autocast_dtype is None else "float16",
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        write_json_result(json_path, result)


if __name__ == "__main__":
    main()
