"""Smoke test: print a prompt and the model's continuation of it.

    uv run test_smoke.py my-run                      # its best checkpoint, else its latest
    uv run test_smoke.py my-run latest --temperature 0 --max-new-tokens 50

The defaults (prompt "Every effort moves you", 20 tokens, temperature 1.4,
top-k 25) are the reference harness's. Temperature 0 is greedy decoding;
--seed makes sampling repeatable.
"""

import click
import torch

from errors import UserError, report_user_errors
from eval_common import load_tokenizer, pick_device, threads_option, tokenizer_options
from gpt import generate
from model_source import GRAMMAR, load_model, model_arguments, resolve_model


def continue_prompt(model, tokenizer, prompt, max_new_tokens, temperature, top_k, seed):
    """The prompt plus up to `max_new_tokens` generated tokens, as text."""
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise UserError("the prompt is empty")
    device = next(model.parameters()).device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([prompt_ids], device=device)
    out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                   generator=generator)
    return tokenizer.decode(out[0].tolist())


@click.command(epilog=f"""{GRAMMAR}

\b
Example:
  uv run test_smoke.py demo --prompt "def main(" --temperature 0 --max-new-tokens 100""")
@model_arguments
@click.option("--prompt", default="Every effort moves you", show_default=True)
@click.option("--max-new-tokens", default=20, show_default=True, type=click.IntRange(min=0))
@click.option("--temperature", default=1.4, show_default=True, type=click.FloatRange(min=0.0),
              help="0 is greedy decoding.")
@click.option("--top-k", default=25, show_default=True, type=click.IntRange(min=0),
              help="Sample from the k most likely tokens; 0 for all of them.")
@click.option("--seed", type=int, default=None, help="Seed for sampling: same seed, same output.")
@tokenizer_options
@threads_option
@report_user_errors
def main(model_args, prompt, max_new_tokens, temperature, top_k, seed, tokenizer_name, datasets_dir):
    """Print PROMPT and the model's continuation of it."""
    source = resolve_model(model_args)
    model = load_model(source, pick_device())
    tokenizer = load_tokenizer(source, tokenizer_name, datasets_dir)
    print(continue_prompt(model, tokenizer, prompt, max_new_tokens, temperature, top_k or None, seed))


if __name__ == "__main__":
    main()
