"""Test loss: the model's mean cross-entropy on a fixed slice of a token dataset.

    uv run test_loss.py datasets runs/my-run/model.json runs/my-run/checkpoints/best/model.safetensors

The defaults reproduce the reference harness's test set exactly: 3,200 batches
of 6 sequences of the model's context length (19,660,800 tokens for a 1,024-token
context) from the validation split of gpjt/fineweb-gpt2-tokens, starting at
token 50,000,000. Batch i's inputs are the batch_size * context_length tokens
from start + i * batch_size * context_length, its targets the same shifted by
one; the result is the mean of the per-batch losses.

With --json the result is also written as JSON: to `<run>/test_loss.json` when
the weights are in a run's checkpoint directory
(`runs/<run>/checkpoints/<checkpoint>/model.safetensors`), otherwise to
`test_loss.json` beside the weights; --json-path overrides both.
"""

import datetime
from pathlib import Path

import click
import torch
from tqdm import tqdm

from batching import Microbatches
from errors import UserError, report_user_errors
from eval_common import load_model, pick_device, threads_option
from jsonfiles import strict_json
from token_data import SPLITS, fetch_dataset, open_split, read_meta
from training import compute_loss

TEST_LOSS_JSON = "test_loss.json"


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


def run_checkpoint(weights):
    """(run directory, checkpoint name) for weights inside
    runs/<run>/checkpoints/<checkpoint>/ (`latest` and `best` resolved), else None."""
    checkpoint_dir = Path(weights).resolve().parent
    if checkpoint_dir.parent.name == "checkpoints":
        return checkpoint_dir.parent.parent, checkpoint_dir.name
    return None


@click.command()
@click.argument("datasets_dir")
@click.argument("model_json")
@click.argument("model_safetensors")
@click.option("--dataset", default="gpjt/fineweb-gpt2-tokens", show_default=True,
              help="Hugging Face dataset repo id (downloaded into DATASETS_DIR), a local "
                   "dataset directory, or 'demo'.")
@click.option("--split", default="validation", show_default=True, type=click.Choice(SPLITS))
@click.option("--start-token", default=50_000_000, show_default=True, type=click.IntRange(min=0))
@click.option("--batches", default=3200, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=6, show_default=True, type=click.IntRange(min=1))
@click.option("--amp/--no-amp", default=True, show_default=True,
              help="On CUDA, run the model under float16 autocast as the reference harness "
                   "does. The CPU always runs float32.")
@click.option("--json", "write_json", is_flag=True,
              help="Also write the result as JSON (see --json-path).")
@click.option("--json-path", default=None,
              help="Where --json writes (implies --json). Default: <run>/test_loss.json for "
                   "weights in a run's checkpoint directory, else test_loss.json beside them.")
@threads_option
@report_user_errors
def main(datasets_dir, model_json, model_safetensors, dataset, split, start_token, batches,
         batch_size, amp, write_json, json_path):
    device = pick_device()
    model = load_model(model_json, model_safetensors, device)
    dataset_dir = fetch_dataset(dataset, datasets_dir)
    meta = read_meta(dataset_dir)
    if meta.vocab_size > model.cfg.vocab_size:
        raise UserError(f"dataset '{dataset}' has token ids up to {meta.vocab_size - 1} but the "
                        f"model's vocab_size is {model.cfg.vocab_size}")
    tokens = open_split(dataset_dir, split)
    autocast_dtype = torch.float16 if amp and device.type == "cuda" else None
    loss = mean_batch_loss(model, tokens, start_token, batches, batch_size, autocast_dtype)
    print(f"Loss against our test dataset: {loss:.6f}")

    if write_json or json_path:
        in_run = run_checkpoint(model_safetensors)
        default_path = in_run[0] / TEST_LOSS_JSON if in_run else Path(model_safetensors).parent / TEST_LOSS_JSON
        path = Path(json_path) if json_path else default_path
        result = {
            "loss": loss,
            "tokens": batches * batch_size * model.cfg.context_length,
            "parameters": model.num_parameters(),
            "weights": str(Path(model_safetensors).resolve()),
            "checkpoint": in_run[1] if in_run else None,
            "model_json": str(Path(model_json).resolve()),
            "dataset": dataset,
            "split": split,
            "start_token": start_token,
            "batches": batches,
            "batch_size": batch_size,
            "context_length": model.cfg.context_length,
            "autocast_dtype": None if autocast_dtype is None else "float16",
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(strict_json(result, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
