"""train.json's `init_from`: a fresh run that starts from existing weights instead of
random ones (multi-stage training: pre-training, then mid-training on another mix, then
fine-tuning; or OpenAI's GPT-2 weights).

`init_from` is a checkpoint directory of another run (ours or the reference harness's;
a sharded one saved without model.safetensors is read from its shards), or a Hugging
Face GPT-2 / Llama model: a directory from `save_pretrained` or a Hub repo id, read
through convert_gpt2.py's code path. A value that looks like a path but is not there is
an error, never a Hub request. Only the weights are taken: the optimizer, the
learning-rate schedule and the data position start fresh, from train.json. They are
checked before any step: the tensors must be those the source's config describes, and
finite.

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
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError
from safetensors.torch import load_file

from checkpointing import (SHARDED_DIR, TIED_KEYS, clean_state_dict, fill_tied_key, read_checkpoint_meta,
                           read_sharded_weights)
from config import RUNS_DIR, ModelConfig, load_json
from errors import UserError
from gpt import GPTModel
from hf_convert import load_hf_checkpoint

# Keys a run may change from its source: they do not describe the weights.
FREE_KEYS = ("drop_rate", "init_std", "zero_init_projections", "context_length")
# How many differing tensors an error names.
NAMED_TENSORS = 3


@dataclass(frozen=True)
class InitialWeights:
    weights: dict  # a full state dict on the CPU, in this project's key names
    source_config: ModelConfig
    origin: dict  # where they came from, for every checkpoint's meta.json


def load_initial_weights(train_cfg, model_cfg, train_json):
    """The weights `init_from` names, checked against this run's model config."""
    source = train_cfg.init_from
    where = f"{train_json}: init_from '{source}'"
    if is_checkpoint(Path(source)):
        initial = from_checkpoint(Path(source), where)
    elif Path(source).is_dir():  # a directory from transformers' save_pretrained
        initial = from_huggingface(source)
    elif looks_like_a_path(source):
        raise UserError(f"{where}: no such directory ({Path(source).absolute()}); init_from takes a checkpoint "
                        "directory (runs/<run>/checkpoints/<name>, latest or best) or a Hugging Face model id")
    else:
        try:
            validate_repo_id(source)
        except HFValidationError as e:
            # (without its advice on repo_type, an argument init_from has no say in)
            reason = str(e).split(" Use `repo_type`")[0]
            raise UserError(f"{where}: not a directory, nor a valid Hugging Face repo id ({reason})")
        initial = from_huggingface(source)
    check_finite(initial.weights, where)
    check_same_network(initial.source_config, model_cfg, train_cfg, train_json)
    return initial


def is_checkpoint(path):
    """A checkpoint has a meta.json (the reference harness's too), or at least a
    model.safetensors without the config.json a transformers directory has beside it."""
    return (path / "meta.json").is_file() or ((path / "model.safetensors").is_file()
                                              and not (path / "config.json").is_file())


def looks_like_a_path(source):
    """A Hub id is `name` or `namespace/name`: more slashes, a leading `.`, `/` or `~`, or a
    first part that is a directory here or a run under runs/, say the user meant a path."""
    first = source.split("/", 1)[0]
    return (source.startswith((".", "/", "~")) or source.count("/") > 1
            or "/" in source and (Path(first).is_dir() or (RUNS_DIR / first).is_dir()))


def from_huggingface(source):
    source_config, weights = load_hf_checkpoint(source)
    return InitialWeights(weights, source_config, {"kind": "huggingface", "source": source})


def from_checkpoint(checkpoint_dir, where):
    """A checkpoint's weights and model config: its meta.json's, or (the reference harness
    records none) the model.json of the run directory it sits in. A sharded checkpoint
    saved without model.safetensors (consolidated_weights false) is read from its shards."""
    meta = read_checkpoint_meta(checkpoint_dir) if (checkpoint_dir / "meta.json").is_file() else {}
    if "model_config" in meta:
        config_file = checkpoint_dir / "meta.json"
        source_config = ModelConfig.from_dict(meta["model_config"], source=str(config_file))
    else:
        config_file = checkpoint_dir.resolve().parent.parent / "model.json"
        if not config_file.is_file():
            raise UserError(f"init_from {checkpoint_dir}: its meta.json has no model_config and there is no "
                            f"{config_file} to say what model it holds")
        source_config = ModelConfig.from_dict(load_json(config_file), source=str(config_file))
    weights_path = checkpoint_dir / "model.safetensors"
    if not weights_path.is_file() and (checkpoint_dir / SHARDED_DIR).is_dir() and "model_config" in meta:
        weights = read_sharded_weights(checkpoint_dir, meta)
    else:
        try:
            weights = clean_state_dict(load_file(weights_path))
        except FileNotFoundError:
            raise UserError(f"{where}: {weights_path} is missing (an incomplete checkpoint)")
        except SafetensorError as e:
            raise UserError(f"{weights_path}: not a readable safetensors file ({e})")
        check_weights_fit(weights, source_config, f"{where}: {weights_path}", config_file)
    origin = {"kind": "checkpoint", "source": str(checkpoint_dir.resolve()), "global_step": meta.get("global_step")}
    return InitialWeights(weights, source_config, origin)


def check_weights_fit(weights, source_config, what, config_file):
    """UserError naming the first differing tensors unless `weights` has exactly the tensors,
    with their shapes, of the model `source_config` describes (one of two tied names may be
    missing: the reference harness saves only one)."""
    with torch.device("meta"):
        expected = {key: tuple(t.shape) for key, t in GPTModel(source_config).state_dict().items()}
    if source_config.tie_weights and len([key for key in TIED_KEYS if key in weights]) == 1:
        expected = {key: shape for key, shape in expected.items() if key not in TIED_KEYS or key in weights}
    differences = [f"{key} is {tuple(weights[key].shape)}, expected {shape}"
                   for key, shape in expected.items() if key in weights and tuple(weights[key].shape) != shape]
    differences += [f"{key} is missing" for key in expected if key not in weights]
    differences += [f"{key} is not in the model" for key in weights if key not in expected]
    if differences:
        more = f" (and {len(differences) - NAMED_TENSORS} more)" if len(differences) > NAMED_TENSORS else ""
        raise UserError(f"{what} does not hold the model {config_file} describes: "
                        f"{'; '.join(differences[:NAMED_TENSORS])}{more}")


def check_finite(weights, where):
    """Non-finite initial weights would only show as a diverged run, blamed on the learning rate."""
    nonfinite = [key for key, tensor in weights.items()
                 if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if nonfinite:
        more = f" (and {len(nonfinite) - NAMED_TENSORS} more)" if len(nonfinite) > NAMED_TENSORS else ""
        raise UserError(f"{where}: the weights hold non-finite values (NaN or infinity) in "
                        f"{', '.join(nonfinite[:NAMED_TENSORS])}{more}; training cannot start from them")


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
