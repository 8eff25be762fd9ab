"""The README.md (model card) that `convert_gpt2.py to-hf` writes for the Hub: metadata
from the checkpoint's meta.json (tokens trained, final losses, the parallelism used,
the base model when the run started from one) and a usage snippet that works for the
model's own tokenizer."""

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from config import load_json
from errors import UserError
from token_data import ByteTokenizer, dataset_location

PROMPT = "Every effort moves you"
NEW_TOKENS = 20
# meta.json key -> card metadata key, for what training recorded.
TRAINING_FIELDS = {"tokens_seen": "tokens_trained", "global_step": "global_step",
                   "avg_train_loss": "final_train_loss", "val_loss": "final_val_loss",
                   "parallelism": "parallelism", "world_size": "world_size"}


def card_data(source, family, license_id, datasets_dir):
    return ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=[family.model_type],
                         license=license_id, datasets=hub_datasets(source, datasets_dir),
                         base_model=hub_base_model(source.meta.get("init_from")), **training_facts(source.meta))


def hub_datasets(source, datasets_dir):
    """The run's dataset as the Hub names datasets (a repo id), or None for a local or demo one."""
    if source.dataset is None:
        return None
    try:
        kind, _ = dataset_location(source.dataset, datasets_dir, source.run_dir)
    except UserError:
        return None
    return [source.dataset] if kind == "hub" else None


def hub_base_model(init_from):
    """meta.json's init_from as the Hub names models: a repo id, not a local directory."""
    if not init_from or init_from.get("kind") != "huggingface" or Path(init_from["source"]).is_dir():
        return None
    return init_from["source"]


def quoted(text):
    """A Python string literal in double quotes."""
    return json.dumps(text)


def usage_snippet(family, location, tokenizer_name, tokenizer_location):
    """Python that loads the converted model and prints its greedy continuation of PROMPT,
    tokenized as the model was trained."""
    load = [f"model = {family.hf_class}.from_pretrained({quoted(location)})"]
    generate = f"model.generate(ids, max_new_tokens={NEW_TOKENS}, do_sample=False)[0].tolist()"
    if tokenizer_name == ByteTokenizer.name:
        return ["import torch", f"from transformers import {family.hf_class}", "", *load,
                f"# A byte-level model: ids 0-255 are UTF-8 bytes, {ByteTokenizer.eot_id} ends a text.",
                f'ids = torch.tensor([list({quoted(PROMPT)}.encode("utf-8"))])',
                f"out = {generate}",
                f'print(bytes(i for i in out if i < 256).decode("utf-8", errors="replace"))']
    if tokenizer_location is not None:
        return [f"from transformers import AutoTokenizer, {family.hf_class}", "", *load,
                f"tokenizer = AutoTokenizer.from_pretrained({quoted(tokenizer_location)})",
                f'ids = tokenizer({quoted(PROMPT)}, return_tensors="pt").input_ids',
                f"print(tokenizer.decode({generate}))"]
    return ["import tiktoken", "import torch", f"from transformers import {family.hf_class}", "", *load,
            f"encoding = tiktoken.get_encoding({quoted(tokenizer_name)})",
            f"ids = torch.tensor([encoding.encode_ordinary({quoted(PROMPT)})])",
            f"print(encoding.decode({generate}))"]


def config_table(title, config):
    return ["", f"## {title}", "", "| key | value |", "| --- | --- |",
            *(f"| {key} | {json.dumps(value)} |" for key, value in config.items())]


def training_facts(meta):
    """What meta.json says about the training, as the card's metadata keys."""
    return {card_key: meta[key] for key, card_key in TRAINING_FIELDS.items() if meta.get(key) is not None}


def training_lines(meta):
    if not meta:
        return ["", "These weights came without a checkpoint's meta.json: how they were trained is not recorded."]
    lines = ["", "## Training", "", "From the checkpoint's meta.json (the train loss is the mean over the steps "
             "since the checkpoint before):", "", *(f"- {key}: {value}" for key, value in training_facts(meta).items())]
    if meta.get("init_from"):
        lines += [f"- started from the weights of `{meta['init_from']['source']}` ({meta['init_from'].get('kind')})"]
    return lines


def model_card(source, family, title, location, tokenizer_name, tokenizer_location, license_id, datasets_dir):
    """The card for `source` (a model_source.ModelSource) converted to `family`'s class, as it
    will be loaded from `location`; `tokenizer_location` is where AutoTokenizer finds its
    tokenizer, None when transformers has none for it."""
    body = [f"# {title}", "",
            f"A {family.name}-architecture base model pre-trained from scratch with PyTorch "
            "(in the manner of gpjt/ddp-base-model-from-scratch), converted to transformers' "
            f"`{family.hf_class}` format by `convert_gpt2.py to-hf`.", "", f"Tokenizer: `{tokenizer_name}`.",
            *training_lines(source.meta),
            "", "## Usage", "", "```python", *usage_snippet(family, location, tokenizer_name, tokenizer_location),
            "```",
            *config_table("Model config", source.config.to_dict())]
    if source.train_json is not None and source.train_json.is_file():
        raw = load_json(source.train_json)
        if isinstance(raw, dict):
            body += config_table("Training config (train.json)", raw)
    data = card_data(source, family, license_id, datasets_dir)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")
