"""Checkpoints: `runs/<run>/checkpoints/<UTC %Y%m%dZ%H%M%S>-iteration-<step>/`.

Each holds `model.safetensors` (reference-harness key names), `optimizer.pt`,
`scaler.pt`, `scheduler.pt`, `training_state.pt` (every rank's RNG states) and
`meta.json`. `latest` and `best` are relative symlinks beside them.
"""

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from errors import UserError

# Prefixes added by DDP and torch.compile wrappers; never part of a saved key.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def clean_state_dict(state_dict):
    """Strip wrapper prefixes and drop the reference harness's legacy causal-mask buffers."""
    cleaned = {}
    for key, tensor in state_dict.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        if key.endswith(".att.mask"):
            continue
        cleaned[key] = tensor
    return cleaned


def load_model_weights(model, path):
    """Load a `model.safetensors` (ours, the reference harness's, or converted) into `model`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: model weights not found")
    try:
        state_dict = clean_state_dict(load_file(path))
    except SafetensorError as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})")
    missing, unexpected = [], []
    try:
        result = model.load_state_dict(state_dict, strict=False)
        missing, unexpected = result.missing_keys, result.unexpected_keys
    except RuntimeError as e:
        first_line = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"{path}: does not fit this model config: {first_line}")
    if missing or unexpected:
        raise UserError(f"{path}: does not fit this model config "
                        f"(missing keys: {missing[:3]}, unexpected keys: {unexpected[:3]})")
    return model
