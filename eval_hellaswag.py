"""Zero-shot HellaSwag accuracy of a model on the command line; the scoring is
hellaswag_scoring.py's (completion style, as llm.c and build-nanogpt evaluate it: see there).

    uv run eval_hellaswag.py my-run                  # its best checkpoint, else its latest
    uv run eval_hellaswag.py converted/gpt2 --json gpt2-hellaswag.json
"""

from pathlib import Path

import click
import torch

from config import HELLASWAG_DATA_URL
from errors import UserError, report_user_errors
from eval_common import device_for, evaluation_record, load_tokenizer, threads_option, tokenizer_options
from hellaswag_scoring import PROTOCOL, SPLIT_FILES, encode_item, fetch, read_items, score_items, tally
from jsonfiles import write_json_result
from model_source import GRAMMAR, load_model, model_arguments, resolve_model


@click.command(epilog=f"""{GRAMMAR}

\b
Example:
  uv run eval_hellaswag.py my-run --limit 500 --json my-run-hellaswag.json""")
@model_arguments
@click.option("--data", "data_source", default=None,
              help="A HellaSwag JSONL file, or a URL downloaded once into --cache-dir. "
                   "Default: the public file of --split.")
@click.option("--split", default="validation", show_default=True, type=click.Choice(list(SPLIT_FILES)),
              help="Which public file is the default --data (the test split's labels are not public).")
@click.option("--cache-dir", default=None, help="Where downloads are kept. Default: DATASETS_DIR/hellaswag, as in "
                                                "training.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score only the first N items.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Items per forward pass (4 rows each).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the result as JSON to this path.")
@click.option("--device", "device_name", default=None, help="Default: cuda when available, else cpu.")
@click.option("--amp/--no-amp", default=True, show_default=True,
              help="On CUDA, run the model under bfloat16 autocast. The CPU always runs float32.")
@tokenizer_options
@threads_option
@report_user_errors
def main(model_args, data_source, split, cache_dir, limit, batch_size, json_path, device_name, amp, tokenizer_name,
         datasets_dir):
    """Zero-shot HellaSwag accuracy (acc, acc_norm) of the model."""
    source = resolve_model(model_args)
    data_source = data_source or HELLASWAG_DATA_URL.format(SPLIT_FILES[split])
    is_url = data_source.startswith(("http://", "https://"))
    data_file = fetch(data_source, cache_dir or Path(datasets_dir) / "hellaswag") if is_url else Path(data_source)
    items = read_items(data_file, data_source, limit)

    device = device_for(device_name)
    model = load_model(source, device)
    tokenizer = load_tokenizer(source, tokenizer_name, datasets_dir)
    encoded = [encode_item(item, tokenizer, model.cfg.context_length) for item in items]
    truncated = sum(item.truncated for item in encoded)
    autocast_dtype = torch.bfloat16 if amp and device.type == "cuda" else None
    correct, correct_norm, count = tally(score_items(model, encoded, batch_size, autocast_dtype))

    print(f"HellaSwag: {count} items  acc {correct / count:.4f} ({correct}/{count})  "
          f"acc_norm {correct_norm / count:.4f} ({correct_norm}/{count})")
    if truncated:
        print(f"note: {truncated} of {count} items were longer than the model's context of "
              f"{model.cfg.context_length} tokens and lost the beginning of their context")
    if json_path:
        result = {
            "acc": correct / count,
            "acc_norm": correct_norm / count,
            "correct": correct,
            "correct_norm": correct_norm,
            "items": count,
            "truncated_items": truncated,
            "protocol": PROTOCOL,
            "data": data_source,
            "data_file": str(Path(data_file).resolve()),
            "limit": limit,
            **evaluation_record(source, model, tokenizer, device, autocast_dtype, batch_size),
        }
        write_json_result(json_path, result)


if __name__ == "__main__":
    main()
