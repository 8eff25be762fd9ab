"""Chat with a model in the terminal; the reply streams as it is generated.

    uv run chat.py my-run                     # its best checkpoint, else its latest
    uv run chat.py my-run latest --temperature 0 --max-new-tokens 100

The conversation is kept, and each reply sees it all, until `/reset`; `/quit` (or
Ctrl-D) ends. The prompt format is chat_format.py's (plain "User: ...\\nAssistant: "
text until the model's encoding has chat tokens); when the conversation outgrows the
model's context, its oldest turns are left out of the prompt.
"""

import sys

import click

from chat_format import render_chat
from errors import report_user_errors
from eval_common import load_tokenizer, pick_device, threads_option, tokenizer_options
from generation import Sampling, TextStream
from model_source import GRAMMAR, load_model, model_arguments, resolve_model

COMMANDS = "/reset starts a new conversation, /quit (or Ctrl-D) ends"


def sampling_options(command):
    """--temperature, --top-k, --top-p, --seed and --max-new-tokens, as `sampling` and `max_new_tokens`."""
    options = [
        click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1),
                     help="The most tokens a reply may have."),
        click.option("--temperature", default=0.8, show_default=True, type=click.FloatRange(min=0.0),
                     help="0 is greedy decoding."),
        click.option("--top-k", default=50, show_default=True, type=click.IntRange(min=0),
                     help="Sample from the k most likely tokens; 0 for all of them."),
        click.option("--top-p", default=0.95, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True),
                     help="Then from the fewest tokens whose probabilities sum to p; 1 for all of them."),
        click.option("--seed", type=int, default=None, help="Seed for sampling: same seed, same replies."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def fit_to_context(messages, tokenizer, context_length):
    """(the prompt for `messages` with the fewest oldest messages left out that makes it fit
    with room for at least one token, how many were left out); None when even the last
    message alone does not fit."""
    for first in range(len(messages)):
        prompt = render_chat(messages[first:], tokenizer)
        if len(prompt.token_ids) < context_length:
            return prompt, first
    return None, len(messages)


def reply(model, tokenizer, messages, max_new_tokens, sampling):
    """Stream the assistant's reply to `messages` to stdout; return it, or None when the
    last message does not fit the context."""
    prompt, left_out = fit_to_context(messages, tokenizer, model.cfg.context_length)
    if prompt is None:
        print(f"(that message is too long for the model's context of {model.cfg.context_length} tokens)",
              file=sys.stderr)
        return None
    if left_out:
        print(f"(the oldest {left_out} messages no longer fit the context and are left out)", file=sys.stderr)
    stream = TextStream(model, tokenizer, prompt.token_ids, max_new_tokens, sampling,
                        prompt.stop_ids, prompt.stop_texts)
    for piece in stream:
        print(piece, end="", flush=True)
    print()
    return stream.text


def chat_loop(model, tokenizer, max_new_tokens, sampling):
    """Read the user's messages from stdin until /quit or its end, answering each."""
    messages = []
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if line == "/quit":
            break
        if line == "/reset":
            messages = []
            print("(new conversation)", file=sys.stderr)
        elif line.startswith("/"):
            print(f"(unknown command {line}: {COMMANDS})", file=sys.stderr)
        elif line:
            messages.append({"role": "user", "content": line})
            answer = reply(model, tokenizer, messages, max_new_tokens, sampling)
            if answer is None:
                messages.pop()
            else:
                messages.append({"role": "assistant", "content": answer})


@click.command(epilog=f"""{GRAMMAR}

\b
Example:
  uv run chat.py demo --temperature 0.7 --max-new-tokens 200""")
@model_arguments
@sampling_options
@tokenizer_options
@threads_option
@report_user_errors
def main(model_args, max_new_tokens, temperature, top_k, top_p, seed, tokenizer_name, datasets_dir):
    """Chat with a model in the terminal."""
    source = resolve_model(model_args)
    model = load_model(source, pick_device())
    tokenizer = load_tokenizer(source, tokenizer_name, datasets_dir)
    print(f"chatting with {source.name}: {COMMANDS}", file=sys.stderr)
    sampling = Sampling(temperature, top_k or None, top_p, seed)
    chat_loop(model, tokenizer, max_new_tokens, sampling)


if __name__ == "__main__":
    main()
