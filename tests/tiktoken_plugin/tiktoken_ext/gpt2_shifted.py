"""A tiktoken plugin (tiktoken finds encodings in `tiktoken_ext.*` modules on sys.path) for
`gpt2_shifted`: GPT-2's BPE with every id, end-of-text included, plus SHIFT. It stands in
for cl100k_base and o200k_base, whose BPE files cannot be downloaded here: a real encoding
with ids above 65,535. A constant shift keeps the order of the merge ranks, so BPE merges
exactly as GPT-2's does and each id is GPT-2's plus SHIFT."""

from tiktoken_ext.openai_public import gpt2

SHIFT = 100_000


def gpt2_shifted():
    spec = gpt2()
    return {"name": "gpt2_shifted", "pat_str": spec["pat_str"],
            "mergeable_ranks": {token: rank + SHIFT for token, rank in spec["mergeable_ranks"].items()},
            "special_tokens": {token: rank + SHIFT for token, rank in spec["special_tokens"].items()}}


ENCODING_CONSTRUCTORS = {"gpt2_shifted": gpt2_shifted}
