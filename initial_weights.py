"""train.json's `init_from`: a fresh run that starts from existing weights instead of
random ones (multi-stage training: pre-training, then mid-training on another mix, then
fine-tuning; or OpenAI's GPT-2 weights).

`init_from` is a checkpoint directory of another run (ours or the reference harness's),
or a Hugging Face GPT-2 / Llama model: a directory from `save_pretrained` or a Hub repo
id, read through convert_gpt2.py's code path. Only the weights are taken: the optimizer,
the learning-rate schedule and the data position start fresh, from train.json.

The model.json must describe the same network as the source: every key that gives a
weight its shape or meaning must match (an error names the keys that differ). drop_rate
and init_std may differ (training settings, not weights). context_length may differ
too: a RoPE model has no position table and takes any length; with learned positions a
shorter context keeps the first rows, and a longer one needs `"extend_positions": true`,
which copies the source's rows and leaves the new rows as this run's own
initialisation drew them.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from checkpointing import clean_state_dict, fill_tied_key, read_checkpoint_meta
from config import ModelConfig, load_json
from hf_convert import load_hf_checkpoint
from errors import UserError

# Keys a run may change from its source: they do not describe the weights.
FREE_KEYS = ("drop_rate", "init_std", "zero_init_projections", "context_length")


@dataclass(frozen=True)
class InitialWeights:
    weights: dict  # a full state dict on the CPU, in this project's key names
    source_config: ModelConfig
    origin: dict  # where they came from, for every checkpoint's meta.json


def load_initial_weights(train_cfg, model_cfg, train_json):
    """The weights `init_from` names, checked against this run's model config."""
    source = train_cfg.init_from
    # A transformers directory has a config.json beside its model.safetensors; a checkpoint has none.
    if (Path(source) / "model.safetensors").is_file() and not (Path(source) / "config.json").is_file():
        initial = from_checkpoint(Path(source))
    else:
        source_config, weights = load_hf_checkpoint(source)
        initial = InitialWeights(weights, source_config, {"kind": "huggingface", "source": source})
    check_same_network(initial.source_config, model_cfg, train_cfg, train_json)
    return initial


def from_checkpoint(checkpoint_dir):
    """A checkpoint's weights and model config: its meta.json's, or (the reference harness
    records none) the model.json of the run directory it sits in."""
    meta = read_checkpoint_meta(checkpoint_dir) if (checkpoint_dir / "meta.json").is_file() else {}
    if "model_config" in meta:
        source_config = ModelConfig.from_dict(meta["model_config"], source=f"{checkpoint_dir / 'meta.json'}")
    else:
        model_json = checkpoint_dir.resolve().parent.parent / "model.json"
        if not model_json.is_file():
            raise UserError(f"init_from {checkpoint_dir}: its meta.json has no model_config and there is no "
                            f"{model_json} to say what model it holds")
        source_config = ModelConfig.from_dict(load_json(model_json), source=str(model_json))
    try:
        weights = clean_state_dict(load_file(checkpoint_dir / "model.safetensors"))
    except SafetensorError as e:
        raise UserError(f"{checkpoint_dir / 'model.safetensors'}: not a readable safetensors file ({e})")
    origin = {"kind": "checkpoint", "source": str(checkpoint_dir.resolve()), "global_step": meta.get("global_step")}
    return InitialWeights(weights, source_config, origin)


def check_same_network(source_config, model_cfg, train_cfg, train_json):
    source, run = source_config.to_dict(), model_cfg.to_dict()
    differing = sorted(key for key in source.keys() | run.keys()
                       if key not in FREE_KEYS and source.get(key) != run.get(key))
    if differing:
        details = ", ".join(f"{key} {source.get(key)} -> {run.get(key)}" for key in differing)
        raise UserError(f"{train_json}: init_from {train_cfg.init_from} holds a different model ({details}); "
                        "model.json must match it in every key but drop_rate, init_std, zero_init_projections "
                        "and context_length")
    if (model_cfg.pos_emb == "learned" and model_cfg.context_length > source_config.context_length
            and not train_cfg.extend_positions):
        raise UserError(f"{train_json}: context_length {model_cfg.context_length} is longer than init_from's "
                        f"{source_config.context_length}, whose learned position table has no rows for the rest; "
                        "set \"extend_positions\": true to start those rows from this run's initialisation")


def apply_initial_weights(model, initial):
    """Load `initial` into a freshly initialised, unsharded `model`; returns a note on what
    happened to the position table when the context length changed, or None."""
    weights = dict(initial.weights)
    note = None
    if model.pos_emb is not None:
        own_rows, source_rows = model.cfg.context_length, initial.source_config.context_length
        if own_rows != source_rows:
            table = model.pos_emb.weight.detach().to("cpu", copy=True)
            kept = min(own_rows, source_rows)
            table[:kept] = weights["pos_emb.weight"][:kept]
            weights["pos_emb.weight"] = table
            note = (f"position rows 0-{kept - 1} come from init_from" +
                    (f"; rows {kept}-{own_rows - 1} start from this run's initialisation"
                     if own_rows > source_rows else ""))
    with torch.no_grad():
        model.load_state_dict(fill_tied_key(weights, model))
    return note
