"""Helpers shared by the tests of chat.py and serve.py (test_chat.py, test_serve.py,
test_serve_browser.py): a model's replies computed independently, by plain loops over
plain_gpt.PlainGPT (the book's implementation: no KV cache, no streaming)."""

import tiktoken
import torch

from evalkit import tiny_config
from plain_gpt import PlainGPT

GPT2 = tiktoken.get_encoding("gpt2")
EOT_ID = GPT2.eot_token
# GPT-2's vocabulary, so replies are words, not random bytes.
CHAT_MODEL = tiny_config(vocab_size=GPT2.n_vocab, context_length=64)


def plain_gpt_of(model):
    plain = PlainGPT(model.cfg).eval()
    plain.load_state_dict(model.state_dict())
    return plain


def plain_reply(model, prompt_text, max_new_tokens, stop_text=None, temperature=0.0, seed=None):
    """(text, tokens generated, finish reason) of `model`'s continuation of `prompt_text`:
    greedy (or sampled at `temperature` from a torch.Generator seeded with `seed`), ending at
    GPT-2's <|endoftext|>, at `stop_text`, after `max_new_tokens` or at the end of the context."""
    plain = plain_gpt_of(model)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    ids = GPT2.encode(prompt_text)
    new_ids = []
    with torch.no_grad():
        while len(new_ids) < max_new_tokens and len(ids) < model.cfg.context_length:
            logits = plain(torch.tensor([ids]))[0, -1]
            if temperature == 0:
                token = int(logits.argmax())
            else:
                token = int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator))
            ids.append(token)
            new_ids.append(token)
            if token == EOT_ID:
                return GPT2.decode(new_ids[:-1]), len(new_ids), "stop"
            text = GPT2.decode(new_ids)
            if stop_text is not None and stop_text in text:
                return text[:text.index(stop_text)], len(new_ids), "stop"
    return GPT2.decode(new_ids), len(new_ids), "length"
