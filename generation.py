"""A model's continuation of a prompt as text, streamed piece by piece as its tokens are
sampled (gpt.generate_tokens, with the KV cache): what chat.py prints and serve.py sends."""

from dataclasses import dataclass

import torch

from gpt import generate_tokens

REPLACEMENT_CHARACTER = "\ufffd"  # what decoding shows for a character whose bytes are not all there yet


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy decoding; top_k and top_p None keep every token."""
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def generator(self, device):
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)


class TextStream:
    """Iterating yields the continuation's text in pieces, as soon as each is certain: text
    that could be the start of a stop text, or a character with only some of its bytes, waits.

    Generation ends at a token in `stop_ids` or a text in `stop_texts` (neither is part of the
    text: finish_reason "stop"), or after `max_new_tokens` tokens or at the end of the
    model's context (finish_reason "length"): the window never slides, so a reply always
    sees its whole prompt. Afterwards `completion_tokens` counts the tokens generated
    (a stop token included) and `text` is the whole reply."""

    def __init__(self, model, tokenizer, prompt_ids, max_new_tokens, sampling, stop_ids=(), stop_texts=()):
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.prompt_ids = list(prompt_ids)
        self.max_new_tokens = min(max_new_tokens, model.cfg.context_length - len(self.prompt_ids))
        self.stop_ids, self.stop_texts = set(stop_ids), tuple(stop_texts)
        self.completion_tokens = 0
        self.finish_reason = None
        self.text = ""

    def __iter__(self):
        device = next(self.model.parameters()).device
        idx = torch.tensor([self.prompt_ids], device=device)
        sampling = self.sampling
        new_ids, sent = [], 0
        self.finish_reason = "length"
        for next_id in generate_tokens(self.model, idx, self.max_new_tokens, sampling.temperature,
                                       sampling.top_k, sampling.top_p, sampling.generator(device)):
            self.completion_tokens += 1
            token = next_id.item()
            if token in self.stop_ids:
                self.finish_reason = "stop"
                break
            new_ids.append(token)
            self.text = self.tokenizer.decode(new_ids)
            stop_at = self._stop_text_position()
            if stop_at is not None:
                self.text, self.finish_reason = self.text[:stop_at], "stop"
                break
            certain = len(self.text) - self._uncertain_suffix_length()
            if certain > sent:
                yield self.text[sent:certain]
                sent = certain
        if len(self.text) > sent:
            yield self.text[sent:]

    def _stop_text_position(self):
        positions = [self.text.find(stop) for stop in self.stop_texts if stop in self.text]
        return min(positions, default=None)

    def _uncertain_suffix_length(self):
        """How many characters at the end of `text` may yet change or turn out to start a stop text."""
        if self.text.endswith(REPLACEMENT_CHARACTER):
            return len(self.text) - len(self.text.rstrip(REPLACEMENT_CHARACTER))
        return max((length for stop in self.stop_texts for length in range(len(stop), 0, -1)
                    if self.text.endswith(stop[:length])), default=0)
