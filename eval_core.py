"""The CORE metric (DCLM's 22 in-context-learning tasks, centered and averaged) of a model,
as nanochat evaluates it; the protocol is in core_scoring.py and docs/evaluation.md.

    uv run eval_core.py my-run                       # its best checkpoint, else its latest
    uv run eval_core.py converted/gpt2 --json gpt2-core.json
    uv run eval_core.py my-run latest --bundle eval_bundle.zip --tasks piqa,lambada_openai --limit 100

The eval bundle is downloaded once into --cache-dir; --bundle takes a local
directory or zip, or another URL.
"""

import time
from pathlib import Path

import click
import torch
from tqdm import tqdm

import core_scoring
from config import CORE_BUNDLE_URL
from errors import report_user_errors
from eval_common import device_for, evaluation_record, load_tokenizer, threads_option, tokenizer_options
from jsonfiles import write_json_result
from model_source import GRAMMAR, load_model, model_arguments, resolve_model


def evaluate(model, tokenizer, bundle_dir, tasks, limit, batch_size, autocast_dtype):
    """(TaskResults, items scored, items truncated, seconds spent scoring) for `tasks`:
    all their rows are scored together, longest first, `batch_size` per forward pass."""
    items = [item for task in tasks for item in core_scoring.encode_task(
        task, core_scoring.read_items(bundle_dir, task, limit), tokenizer, model.cfg.context_length)]
    rows = [row for item in items for row in item.rows]
    started = time.perf_counter()
    with torch.inference_mode(), tqdm(total=len(rows), desc="CORE", unit="row") as bar:
        results = core_scoring.score_rows(model, rows, batch_size, autocast_dtype, bar)
    seconds = time.perf_counter() - started
    counts = core_scoring.tally(items, core_scoring.correct_per_item(items, results))
    task_results = [core_scoring.TaskResult(task, *counts[task.label]) for task in tasks]
    return task_results, len(items), sum(item.truncated for item in items), seconds


def print_results(results):
    print(f"{'task':<36} {'type':<18} {'shots':>5} {'items':>6}  {'accuracy':>15}  {'centered':>16}")
    for r in results:
        print(f"{r.task.label:<36} {r.task.task_type:<18} {r.task.num_fewshot:>5} {r.items:>6}  "
              f"{r.accuracy:.4f} ± {r.accuracy_se:.4f}  {r.centered:>7.4f} ± {r.centered_se:.4f}")
    core, core_se = core_scoring.core_metric(results)
    print(f"CORE: {core:.4f} ± {core_se:.4f} (standard error) over {len(results)} tasks")


@click.command(epilog=f"""{GRAMMAR}

\b
Example:
  uv run eval_core.py my-run --limit 100 --json my-run-core.json""")
@model_arguments
@click.option("--bundle", default=CORE_BUNDLE_URL, show_default=True,
              help="The eval bundle: a URL (downloaded once into --cache-dir), a local zip or directory.")
@click.option("--cache-dir", default=None,
              help="Where the downloaded and extracted bundle is kept. Default: DATASETS_DIR/core, as in training.")
@click.option("--tasks", "task_labels", default=None,
              help="Comma-separated task labels (core.yaml's). Default: all, in core.yaml's order.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Score only each task's first N items (after the seed-1337 shuffle, as nanochat's max_per_task).")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Rows (sequences of at most the model's context) per forward pass.")
@click.option("--json", "json_path", default=None, help="Also write the result as JSON to this path.")
@click.option("--device", "device_name", default=None, help="Default: cuda when available, else cpu.")
@click.option("--amp/--no-amp", default=True, show_default=True,
              help="On CUDA, run the model under bfloat16 autocast. The CPU always runs float32.")
@tokenizer_options
@threads_option
@report_user_errors
def main(model_args, bundle, cache_dir, task_labels, limit, batch_size, json_path, device_name,
         amp, tokenizer_name, datasets_dir):
    """The CORE metric of a model: each task's accuracy and centered accuracy with standard errors, and
    their mean."""
    source = resolve_model(model_args)
    bundle_dir = core_scoring.fetch_bundle(bundle, cache_dir or Path(datasets_dir) / "core")
    tasks = core_scoring.read_tasks(bundle_dir, core_scoring.task_labels(task_labels))

    device = device_for(device_name)
    model = load_model(source, device)
    tokenizer = load_tokenizer(source, tokenizer_name, datasets_dir)
    autocast_dtype = torch.bfloat16 if amp and device.type == "cuda" else None
    results, items, truncated, seconds = evaluate(model, tokenizer, bundle_dir, tasks, limit, batch_size,
                                                  autocast_dtype)

    print_results(results)
    print(f"{items} items in {seconds:.1f} s ({items / seconds:.1f} items/s on {device})")
    if truncated:
        print(f"note: {truncated} of {items} items had a row longer than the model's context of "
              f"{model.cfg.context_length} tokens and lost its first tokens")
    if json_path:
        result = {
            **core_scoring.results_dict(results),
            "items": items,
            "truncated_items": truncated,
            "items_per_second": items / seconds,
            "protocol": core_scoring.PROTOCOL,
            "bundle": bundle,
            "bundle_dir": str(Path(bundle_dir).resolve()),
            "limit": limit,
            **evaluation_record(source, model, tokenizer, device, autocast_dtype, batch_size),
        }
        write_json_result(json_path, result)


if __name__ == "__main__":
    main()
