"""Checkpoints: `runs/<run>/checkpoints/<UTC %Y%m%dZ%H%M%S>-iteration-<step>/`.

Each holds `model.safetensors` (reference-harness key names), `optimizer.pt`,
`scaler.pt`, `scheduler.pt`, `training_state.pt` (every rank's RNG states) and
`meta.json`. `latest` and `best` are relative symlinks beside them.
"""

import datetime
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from errors import UserError

# Prefixes added by DDP and torch.compile wrappers; never part of a saved key.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
LINKS = ("latest", "best")
# Test hook: widens the window in which a kill lands in the middle of a save.
SAVE_DELAY_FOR_TESTS_S = float(os.environ.get("DDP_TRAIN_TEST_SAVE_DELAY_S", "0"))


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


# ---------------------------------------------------------------- training checkpoints

def checkpoint_name(global_step, now=None):
    now = now or datetime.datetime.now(datetime.UTC)
    return f"{now:%Y%m%dZ%H%M%S}-iteration-{global_step}"


def list_checkpoints(checkpoints_dir):
    """Complete checkpoint directories, oldest first by global step."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir()
             if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
             and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: json.loads((p / "meta.json").read_text())["global_step"])


def resolve_checkpoint(checkpoints_dir, name):
    """A checkpoint directory by name, or `latest` / `best`."""
    path = Path(checkpoints_dir) / name
    if not (path / "meta.json").is_file():
        available = [p.name for p in list_checkpoints(checkpoints_dir)]
        links = [link for link in LINKS if (Path(checkpoints_dir) / link).exists()]
        raise UserError(f"checkpoint '{name}' not found in {checkpoints_dir} "
                        f"(available: {', '.join(links + available) or 'none'})")
    return path.resolve()


def read_checkpoint_meta(checkpoint_dir):
    return json.loads((Path(checkpoint_dir) / "meta.json").read_text())


def _write_file(path, write):
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _point_link(checkpoints_dir, link, target_name):
    """Re-point a relative symlink atomically: make it under a temporary name, then rename."""
    temporary = checkpoints_dir / f".{link}.new"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target_name, target_is_directory=True)
    os.replace(temporary, checkpoints_dir / link)


def save_checkpoint(checkpoints_dir, model, optimizer, scaler, scheduler, rank_rng_states, meta, is_best):
    """Write a checkpoint into a temporary directory, flush it, rename it into place,
    and only then re-point `latest` (and `best`), so a crash never leaves a link
    to a half-written checkpoint. Returns the checkpoint directory."""
    checkpoints_dir = Path(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(meta["global_step"])
    for leftover in checkpoints_dir.glob(".partial-*"):  # from a save that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    partial = checkpoints_dir / f".partial-{name}"
    partial.mkdir()

    # Copied straight to host memory: a copy on the GPU could run a full one out of
    # memory. Separate copies also keep safetensors from refusing a tied output head
    # (tensors that share memory), so both keys are saved and every loader finds them.
    state_dict = {key: tensor.detach().to("cpu", copy=True).contiguous()
                  for key, tensor in model.state_dict().items()}
    save_file(state_dict, partial / "model.safetensors")
    time.sleep(SAVE_DELAY_FOR_TESTS_S)
    for filename, state in (("optimizer.pt", optimizer.state_dict()), ("scaler.pt", scaler.state_dict()),
                            ("scheduler.pt", scheduler.state_dict()),
                            ("training_state.pt", {"rng_states": rank_rng_states})):
        _write_file(partial / filename, lambda f, state=state: torch.save(state, f))
    manifest = {p.name: p.stat().st_size for p in partial.iterdir()}
    meta = {**meta, "is_best": is_best, "files": manifest}
    _write_file(partial / "meta.json", lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))

    final = checkpoints_dir / name
    os.replace(partial, final)
    _fsync_dir(checkpoints_dir)
    if is_best:
        _point_link(checkpoints_dir, "best", name)
    _point_link(checkpoints_dir, "latest", name)
    _fsync_dir(checkpoints_dir)
    return final


def prune_checkpoints(checkpoints_dir, keep_last):
    """Delete all but the newest `keep_last` checkpoints, never those `best` or `latest` point at."""
    protected = {(Path(checkpoints_dir) / link).resolve() for link in LINKS}
    candidates = list_checkpoints(checkpoints_dir)[:-keep_last]
    for checkpoint_dir in candidates:
        if checkpoint_dir.resolve() not in protected:
            shutil.rmtree(checkpoint_dir)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_checkpoint(checkpoint_dir):
    """Check every file the manifest lists is there with its recorded size."""
    meta = read_checkpoint_meta(checkpoint_dir)
    for filename, size in meta.get("files", {}).items():
        path = Path(checkpoint_dir) / filename
        if not path.is_file() or path.stat().st_size != size:
            raise UserError(f"checkpoint {checkpoint_dir} is incomplete or damaged: {filename} "
                            f"{'is missing' if not path.is_file() else f'has {path.stat().st_size} bytes, expected {size}'}")
    return meta


def load_training_state(checkpoint_dir, model, optimizer, scaler, scheduler, device):
    """Restore a checkpoint written by this project or by the reference harness
    (which has no scheduler or RNG state). Returns (meta, rng_states or None)."""
    checkpoint_dir = Path(checkpoint_dir)
    meta = verify_checkpoint(checkpoint_dir)
    load_model_weights(model, checkpoint_dir / "model.safetensors")
    load_optimizer_state(optimizer, torch.load(checkpoint_dir / "optimizer.pt", map_location=device))
    scaler_state = torch.load(checkpoint_dir / "scaler.pt") if (checkpoint_dir / "scaler.pt").is_file() else {}
    if scaler_state:  # empty when saved without fp16 (bf16 or fp32): a scaler now on starts fresh
        scaler.load_state_dict(scaler_state)
    if (checkpoint_dir / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(checkpoint_dir / "scheduler.pt"))
    rng_states = None
    if (checkpoint_dir / "training_state.pt").is_file():
        rng_states = torch.load(checkpoint_dir / "training_state.pt")["rng_states"]
    return meta, rng_states


def load_optimizer_state(optimizer, state_dict):
    """Load optimizer state but keep this optimizer's `fused` setting: a checkpoint's param
    groups carry their own (the reference harness's is off), and fused kernels want their
    step counters as float32 tensors on the parameters' device."""
    fused_settings = [group.get("fused") for group in optimizer.param_groups]
    optimizer.load_state_dict(state_dict)
    for group, fused in zip(optimizer.param_groups, fused_settings):
        group["fused"] = fused
        for param in group["params"] if fused else []:
            state = optimizer.state.get(param, {})
            if "step" in state:
                state["step"] = state["step"].to(device=param.device, dtype=torch.float32)
