"""Generation speed of gpt.py's `generate` on this device: tokens/s with the KV cache and
without it (every step recomputing every position).

    uv run bench_generate.py runs/demo/model.json --new-tokens 200 --threads 1
    uv run bench_generate.py 8xh100m80 --new-tokens 200 --threads 1

RUN_OR_MODEL_JSON is a run name under runs/, a run directory, or a model.json. The model
has random weights (speed does not depend on their values) and runs as test_smoke.py's
does: eval mode, fp32. Each repeat generates --new-tokens tokens greedily after a random
prompt of --prompt-tokens tokens (--batch rows), once with the cache and once without,
taking turns so that a change in load on a shared machine hits both alike. tokens/s is
the new tokens of all rows over the median wall time of a call, the prompt's pass
included. The outputs of the two are compared token for token.

Once prompt and new tokens outgrow context_length the window slides, and from then on
the cached path refills its cache from the cropped window at every step, as slow as
recomputing (gpt.py, _next_logits_with_cache); the report says where that starts.
"""

import statistics
import time

import click
import torch

from config import load_model_config
from devices import machine_description, synchronize
from errors import UserError, report_user_errors
from gpt import GPTModel, generate

PATHS = {"KV cache": True, "no cache": False}  # report name: generate's use_cache


def time_generation(model, prompt, new_tokens, use_cache, device):
    """(wall seconds, output) of one generate call."""
    synchronize(device)
    start = time.perf_counter()
    out = generate(model, prompt, new_tokens, use_cache=use_cache)
    synchronize(device)
    return time.perf_counter() - start, out


def measure(model, prompt, new_tokens, repeats, device):
    """({path name: [seconds per call]}, {path name: last output}), the paths taking turns."""
    for use_cache in PATHS.values():  # untimed: allocation, kernel selection
        generate(model, prompt, 2, use_cache=use_cache)
    times, outputs = {name: [] for name in PATHS}, {}
    for _ in range(repeats):
        for name, use_cache in PATHS.items():
            seconds, outputs[name] = time_generation(model, prompt, new_tokens, use_cache, device)
            times[name].append(seconds)
    return times, outputs


def print_report(cfg, device, batch, prompt_tokens, new_tokens, repeats, times, outputs):
    print(f"machine: {machine_description(device)}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"model: {', '.join(f'{key}={value}' for key, value in cfg.to_dict().items())}")
    print(f"generate: batch {batch}, prompt {prompt_tokens} tokens, {new_tokens} new tokens, greedy, "
          f"fp32, eval mode; {repeats} timed calls per path after a warm-up")
    if prompt_tokens + new_tokens > cfg.context_length:
        print(f"the window slides from new token {cfg.context_length - prompt_tokens + 2} on: "
              f"from there the cache is refilled at every step")
    print(f"{'path':<10} {'tokens/s':>10} {'call p50 s':>11} {'call mean s':>12}")
    tokens_per_sec = {}
    for name, seconds in times.items():
        tokens_per_sec[name] = batch * new_tokens / statistics.median(seconds)
        print(f"{name:<10} {tokens_per_sec[name]:>10,.1f} {statistics.median(seconds):>11.3f} "
              f"{statistics.fmean(seconds):>12.3f}")
    identical = torch.equal(outputs["KV cache"], outputs["no cache"])
    print(f"KV cache / no cache tokens/s = {tokens_per_sec['KV cache'] / tokens_per_sec['no cache']:.2f}x; "
          f"outputs identical token for token: {'yes' if identical else 'NO'}")


@click.command(epilog="""\b
Example:
  uv run bench_generate.py runs/demo/model.json --new-tokens 200 --threads 1""")
@click.argument("run_or_model_json")
@click.option("--prompt-tokens", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--new-tokens", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1), help="Prompts per call.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1),
              help="Timed calls per path.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch (default: torch's, one per core). On a machine shared with "
                   "other work, 1 avoids stalls while a descheduled thread holds up the others.")
@report_user_errors
def main(run_or_model_json, prompt_tokens, new_tokens, batch, repeats, threads):
    """Tokens/s of generate with and without the KV cache, for RUN_OR_MODEL_JSON (a run name
    under runs/, a run directory, or a model.json) with random weights."""
    cfg = load_model_config(run_or_model_json)
    if prompt_tokens > cfg.context_length:
        raise UserError(f"--prompt-tokens {prompt_tokens} exceeds context_length {cfg.context_length}")
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = GPTModel(cfg).to(device).eval()
    prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_tokens), device=device)
    times, outputs = measure(model, prompt, new_tokens, repeats, device)
    print_report(cfg, device, batch, prompt_tokens, new_tokens, repeats, times, outputs)


if __name__ == "__main__":
    main()
