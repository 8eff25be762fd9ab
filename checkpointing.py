"""Checkpoints: `runs/<run>/checkpoints/<UTC %Y%m%dZ%H%M%S>-iteration-<step>/`.

Each holds `model.safetensors` (reference-harness key names), `optimizer.pt`,
`scaler.pt`, `scheduler.pt`, `training_state.pt` (every rank's RNG states) and
`meta.json`. `latest` and `best` are relative symlinks beside them.

A sharded (FSDP) run's checkpoint holds, instead of `optimizer.pt`, `sharded/`: the
weights and AdamW state as torch.distributed.checkpoint files, one per rank, written
by every rank at once and readable by any number of ranks (DCP reshards on load).
Its `model.safetensors` is the full model gathered on rank 0, so every script that
reads weights reads it as a DDP checkpoint's (train.json's consolidated_weights).

A checkpoint directory is complete or absent: it is written under a hidden
`.partial-*` name and renamed into place, and the links move after it.

This module is how to save and restore; whether to save, and what is `best`, is the
training loop's (ddp_train.py). `save_and_prune` is a save on every rank (the RNG
states gathered, shards written, rank 0 writing the rest); `load_training_state` and
`set_rank_rng` put a run back where a checkpoint left it.
"""

import datetime
import errno
import json
import os
import random
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from config import ModelConfig
from distributed import run_and_share_errors, share_from_main
from errors import UserError, debug_details, debug_enabled
from gpt import GPTModel
from jsonfiles import strict_json
from parallelism import is_sharded

# Prefixes added by DDP and torch.compile wrappers; never part of a saved key.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
LINKS = ("latest", "best")
# The two names of a tied output head; the reference harness saves only one of them.
TIED_KEYS = ("tok_emb.weight", "out_head.weight")
# meta.json, the RNG states and the links, beyond the tensors' own bytes.
SMALL_FILES_BYTES = 1 << 20
SHARDED_DIR = "sharded"


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


def fill_tied_key(state_dict, model):
    """The reference harness saves a tied model with safetensors' save_model, which keeps
    only one of the two tied tensors: give the other name the same tensor."""
    present = [key for key in TIED_KEYS if key in state_dict]
    if getattr(model, "cfg", None) is not None and model.cfg.tie_weights and len(present) == 1:
        other = TIED_KEYS[1 - TIED_KEYS.index(present[0])]
        state_dict[other] = state_dict[present[0]]
    return state_dict


def load_model_weights(model, path):
    """Load a `model.safetensors` (ours, the reference harness's, or converted) into `model`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: model weights not found")
    try:
        state_dict = fill_tied_key(clean_state_dict(load_file(path)), model)
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


def save_safetensors(tensors, path, metadata=None):
    """safetensors' save_file, with the file mode every other file gets (it writes 0600)."""
    save_file(tensors, path, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# ---------------------------------------------------------------- training checkpoints

@dataclass
class TrainingState:
    """Everything a checkpoint restores, one file each (the reference harness's names)."""
    model: torch.nn.Module  # the bare or sharded model, not its DDP or compiled wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: torch.optim.lr_scheduler.LRScheduler

    @property
    def sharded(self):
        return is_sharded(self.model)

    def state_files(self):
        """{file name: state} for the files rank 0 writes with torch.save (a sharded
        optimizer goes into SHARDED_DIR instead)."""
        files = {} if self.sharded else {"optimizer.pt": self.optimizer.state_dict()}
        return {**files, "scaler.pt": self.scaler.state_dict(), "scheduler.pt": self.scheduler.state_dict()}

    def size_estimate(self, full_weights_too=False):
        """Bytes a checkpoint of this state takes: the weights and the optimizer's tensors
        (of the whole model, sharded or not), and the weights again when a sharded
        checkpoint also gets a full model.safetensors."""
        weights = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        optimizer = sum(value.numel() * value.element_size() for state in self.optimizer.state.values()
                        for value in state.values() if torch.is_tensor(value))
        return weights * (2 if full_weights_too else 1) + optimizer + SMALL_FILES_BYTES


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


def has_checkpoint_entries(checkpoints_dir):
    """Whether anything but hidden leftovers is there: complete, damaged or linked checkpoints."""
    checkpoints_dir = Path(checkpoints_dir)
    return checkpoints_dir.is_dir() and any(not p.name.startswith(".") for p in checkpoints_dir.iterdir())


def resolve_checkpoint(checkpoints_dir, name):
    """A checkpoint directory by name, or `latest` / `best`."""
    checkpoints_dir = Path(checkpoints_dir)
    path = checkpoints_dir / name
    if path.is_symlink() and not path.exists():
        raise UserError(f"checkpoint '{name}' in {checkpoints_dir} is a link to {os.readlink(path)}, "
                        "which does not exist")
    if path.is_dir() and not (path / "meta.json").is_file():
        raise UserError(f"checkpoint '{name}': {path.resolve() / 'meta.json'} is missing (an incomplete or "
                        "damaged checkpoint)")
    if not path.is_dir():
        available = [p.name for p in list_checkpoints(checkpoints_dir)]
        links = [link for link in LINKS if (checkpoints_dir / link).exists()]
        raise UserError(f"checkpoint '{name}' not found in {checkpoints_dir} "
                        f"(available: {', '.join(links + available) or 'none'})")
    return path.resolve()


def newest_complete_checkpoint(checkpoints_dir):
    """The checkpoint with the highest step whose files all match its manifest, or None."""
    for checkpoint_dir in reversed(list_checkpoints(checkpoints_dir)):
        try:
            verify_checkpoint(checkpoint_dir)
        except UserError:
            continue
        return checkpoint_dir
    return None


def read_checkpoint_meta(checkpoint_dir):
    path = Path(checkpoint_dir) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing (an incomplete or damaged checkpoint)")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})")


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


def size_text(size_bytes):
    return f"{size_bytes / 2**30:,.2f} GiB" if size_bytes >= 2**30 else f"{size_bytes / 2**20:,.1f} MiB"


def check_free_space(checkpoints_dir, needed_bytes):
    free = shutil.disk_usage(checkpoints_dir).free
    if free < needed_bytes:
        raise UserError(f"{checkpoints_dir}: not enough free disk space for a checkpoint: it needs about "
                        f"{size_text(needed_bytes)} and {size_text(free)} are free; free some space "
                        "(keep_last_checkpoints in train.json prunes old checkpoints) and resume")


def save_and_prune(checkpoints_dir, train_cfg, ctx, state, meta, is_best):
    """Every rank: save a checkpoint into `checkpoints_dir` and prune old ones (train.json
    keep_last_checkpoints); rank 0 gets the checkpoint directory back, the others None.
    A failure on any rank reaches every rank (no one waits forever)."""
    write = write_checkpoint(checkpoints_dir, train_cfg, ctx, state, meta, is_best)

    def write_and_prune():
        saved = write()
        if train_cfg.keep_last_checkpoints:
            prune_checkpoints(checkpoints_dir, train_cfg.keep_last_checkpoints)
        return saved

    return run_and_share_errors(ctx.is_main, write_and_prune)


def write_checkpoint(checkpoints_dir, train_cfg, ctx, state, meta, is_best):
    """The collective part of a save, on every rank: every rank sends its RNG state to rank
    0, and under fsdp/hsdp writes its shards (the full weights gathered on rank 0). Returns
    rank 0's remaining work, which writes the rest and returns the checkpoint directory."""
    rng_states = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(capture_rng_state(ctx.device), rng_states, dst=0)
    if not state.sharded:
        return lambda: write_unsharded_checkpoint(checkpoints_dir, state, rng_states, meta, is_best)
    consolidated = train_cfg.consolidated_weights
    partial = share_from_main(run_and_share_errors(ctx.is_main, lambda: begin_checkpoint(
        checkpoints_dir, meta["global_step"], state.size_estimate(full_weights_too=consolidated))))
    write_sharded_state(partial, state)
    weights = gather_full_weights(state.model) if consolidated else None
    return lambda: finish_checkpoint(partial, state, rng_states, meta, is_best, weights)


def write_unsharded_checkpoint(checkpoints_dir, state, rank_rng_states, meta, is_best):
    """Write an unsharded checkpoint (rank 0 alone): begin_checkpoint, then finish_checkpoint."""
    partial = begin_checkpoint(checkpoints_dir, meta["global_step"], state.size_estimate())
    return finish_checkpoint(partial, state, rank_rng_states, meta, is_best, full_weights(state.model))


def begin_checkpoint(checkpoints_dir, global_step, size_estimate):
    """Rank 0: the empty hidden `.partial-*` directory a checkpoint is written into,
    after removing leftovers of saves that were killed and checking the free space."""
    checkpoints_dir = Path(checkpoints_dir)
    partial = checkpoints_dir / f".partial-{checkpoint_name(global_step)}"
    with _write_errors_reported(partial, size_estimate):
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        for leftover in checkpoints_dir.glob(".partial-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        check_free_space(checkpoints_dir, size_estimate)
        partial.mkdir()
    return partial


def finish_checkpoint(partial, state, rank_rng_states, meta, is_best, weights):
    """Rank 0: write the rest of the checkpoint (`weights`, a full state dict on the CPU,
    as model.safetensors unless None), flush it, rename it into place, and only then
    re-point `latest` (and `best`), so a crash never leaves a link to a half-written
    checkpoint. A write that fails (a full disk) removes the partial directory and
    leaves every earlier checkpoint and link as it was. Returns the checkpoint directory."""
    checkpoints_dir, name = partial.parent, partial.name.removeprefix(".partial-")
    with _write_errors_reported(partial, state.size_estimate()):
        _write_checkpoint_files(partial, state, rank_rng_states, {**meta, "is_best": is_best}, weights)
        final = checkpoints_dir / name
        os.replace(partial, final)
        _fsync_dir(checkpoints_dir)
        if is_best:
            _point_link(checkpoints_dir, "best", name)
        _point_link(checkpoints_dir, "latest", name)
        _fsync_dir(checkpoints_dir)
    return final


@contextmanager
def _write_errors_reported(partial, size_estimate):
    """An OSError while writing `partial` (a full disk) as one UserError, the partial directory removed."""
    try:
        yield
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        name = partial.name.removeprefix(".partial-")
        needed = f" (a checkpoint needs about {size_text(size_estimate)})" if e.errno == errno.ENOSPC else ""
        raise UserError(f"could not write checkpoint {name} in {partial.parent}: "
                        f"{e.strerror or e}{needed}; earlier checkpoints are untouched")


def full_weights(model):
    """An unsharded model's state dict, copied straight to host memory: a copy on the GPU
    could run a full one out of memory. Separate copies also keep safetensors from
    refusing a tied output head (tensors that share memory), so both keys are saved
    and every loader finds them."""
    return {key: tensor.detach().to("cpu", copy=True).contiguous() for key, tensor in model.state_dict().items()}


def gather_full_weights(model):
    """Every rank: a sharded model's full state dict, gathered on rank 0's CPU (empty elsewhere)."""
    gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {key: tensor.detach().clone().contiguous() for key, tensor in gathered.items()}


def write_sharded_state(partial, state):
    """Every rank: its shards of the weights and AdamW state into `partial`/sharded/.
    torch.distributed.checkpoint collects the ranks' results, so a write that fails on
    one rank raises on all of them; rank 0 then removes the partial directory."""
    model_state, optimizer_state = get_state_dict(state.model, state.optimizer)
    try:
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=partial / SHARDED_DIR)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - CheckpointException is a BaseException
        shutil.rmtree(partial, ignore_errors=True)  # on every rank: any that sees it first removes it
        name = partial.name.removeprefix(".partial-")
        raise UserError(f"could not write checkpoint {name} in {partial.parent}: {checkpoint_error_text(e)}; "
                        "earlier checkpoints are untouched")


def checkpoint_error_text(error):
    """One line for a torch.distributed.checkpoint failure: each failing rank's own error."""
    if isinstance(error, CheckpointException):
        return "; ".join(f"rank {rank}: {one_line(f'{type(e).__name__}: {e}')}"
                         for rank, (e, _) in sorted(error.failures.items()))
    return one_line(f"{type(error).__name__}: {error}")


def consolidate_weights(checkpoint_dir):
    """Write a sharded checkpoint's model.safetensors afterwards, offline and on the CPU
    (for runs with consolidated_weights false): the full model is read from sharded/
    without a process group, and meta.json's manifest gains the file. Returns its path."""
    checkpoint_dir = Path(checkpoint_dir)
    meta = verify_checkpoint(checkpoint_dir)
    if not (checkpoint_dir / SHARDED_DIR).is_dir():
        raise UserError(f"{checkpoint_dir}: not a sharded checkpoint (no {SHARDED_DIR}/); its model.safetensors "
                        "is already the full model")
    weights = read_sharded_weights(checkpoint_dir, meta)
    weights_path = checkpoint_dir / "model.safetensors"
    partial = checkpoint_dir / ".model.safetensors.partial"
    save_safetensors(weights, partial)
    os.replace(partial, weights_path)
    manifest = {**meta["files"], weights_path.name: weights_path.stat().st_size}
    text = strict_json({**meta, "files": manifest}, indent=2) + "\n"
    _write_file(checkpoint_dir / ".meta.json.partial", lambda f: f.write(text.encode()))
    os.replace(checkpoint_dir / ".meta.json.partial", checkpoint_dir / "meta.json")
    return weights_path


def read_sharded_weights(checkpoint_dir, meta):
    """A sharded checkpoint's full model weights, read on the CPU by this process alone
    (no collective: every rank that calls it reads everything), as a state dict."""
    model = GPTModel(ModelConfig.from_dict(meta["model_config"], source=f"{checkpoint_dir / 'meta.json'}"))
    loaded = {"model": model.state_dict()}
    try:
        with warnings.catch_warnings():
            # DCP's note that, with no process group, it reads in this one process: meant here.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(loaded, checkpoint_id=checkpoint_dir / SHARDED_DIR, no_dist=True)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - damaged files fail in many ways
        raise UserError(f"{checkpoint_dir / SHARDED_DIR}: not readable for this model ({checkpoint_error_text(e)})")
    model.load_state_dict(loaded["model"])
    return full_weights(model)


def one_line(error):
    return " ".join(str(error).split())[:500]


def _write_checkpoint_files(directory, state, rank_rng_states, meta, weights):
    if weights is not None:
        save_safetensors(weights, directory / "model.safetensors")
    files = {**state.state_files(), "training_state.pt": {"rng_states": rank_rng_states}}
    for filename, file_state in files.items():
        _write_file(directory / filename, lambda f, file_state=file_state: torch.save(file_state, f))
    manifest = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    text = strict_json({**meta, "files": manifest}, indent=2) + "\n"
    _write_file(directory / "meta.json", lambda f: f.write(text.encode()))


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
        if not path.is_file():
            raise UserError(f"checkpoint {checkpoint_dir} is incomplete or damaged: {filename} is missing")
        if path.stat().st_size != size:
            raise UserError(f"checkpoint {checkpoint_dir} is incomplete or damaged: {filename} has "
                            f"{path.stat().st_size} bytes, expected {size}")
    if (Path(checkpoint_dir) / SHARDED_DIR).is_dir():
        check_sharded_metadata(Path(checkpoint_dir))
    return meta


def check_sharded_metadata(checkpoint_dir):
    """A sharded checkpoint's index of its shards, sharded/.metadata, must be there and
    readable: damaged, with its size intact, it passes the manifest's check."""
    metadata = Path(SHARDED_DIR) / ".metadata"
    if not (checkpoint_dir / metadata).is_file():
        raise UserError(f"checkpoint {checkpoint_dir} is incomplete or damaged: {metadata} is missing")
    try:
        dcp.FileSystemReader(checkpoint_dir / SHARDED_DIR).read_metadata()
    except Exception as e:  # noqa: BLE001 - a damaged pickle fails in many ways
        raise UserError(f"checkpoint {checkpoint_dir} is incomplete or damaged: {metadata} is not readable"
                        f"{debug_details(e)}") from e


def verify_or_name_another(checkpoint_dir):
    """verify_checkpoint, with an error that also names the checkpoint to resume instead."""
    try:
        return verify_checkpoint(checkpoint_dir)
    except UserError as problem:
        raise UserError(f"{problem}; {another_checkpoint_text(checkpoint_dir)}") from problem.__cause__


def another_checkpoint_text(checkpoint_dir):
    """Where to resume when `checkpoint_dir` cannot be read: `auto`'s choice (the newest
    checkpoint whose files check out) unless that is this one, else the newest before it."""
    checkpoint_dir = Path(checkpoint_dir).resolve()
    others = [p for p in list_checkpoints(checkpoint_dir.parent) if p.resolve() != checkpoint_dir]
    for other in reversed(others):
        try:
            verify_checkpoint(other)
        except UserError:
            continue
        chosen_by_auto = newest_complete_checkpoint(checkpoint_dir.parent) == other
        return (f"`auto` resumes from {other.name} instead" if chosen_by_auto
                else f"the newest other complete checkpoint is {other.name} (name it to resume from it)")
    return "this run has no other complete checkpoint to resume from"


# ---------------------------------------------------------------- RNG state

def capture_rng_state(device):
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
        "torch": torch.get_rng_state(),
        # This rank's GPU only: touching the others would open a CUDA context on each.
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore_rng_state(state, device):
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def set_rank_rng(ctx, random_seed, saved_states=None):
    """Give each rank its own dropout masks: its saved RNG state if `saved_states` has one
    per rank of this world size, otherwise the seed random_seed + rank. Returns whether
    the saved state was restored."""
    if saved_states is not None and len(saved_states) == ctx.world_size:
        restore_rng_state(saved_states[ctx.rank], ctx.device)
        return True
    torch.manual_seed(random_seed + ctx.rank)
    return False


# ---------------------------------------------------------------- loading

def load_training_state(checkpoint_dir, state, device):
    """Restore a checkpoint written by this project or by the reference harness (which
    has no RNG state, and a scheduler.pt of its own kind or none) into `state`, except
    the learning-rate schedule: that is a function of the step, which the caller sets.
    Returns (meta, rng_states or None)."""
    checkpoint_dir = Path(checkpoint_dir)
    meta = verify_or_name_another(checkpoint_dir)
    if (checkpoint_dir / SHARDED_DIR).is_dir():
        read_sharded_state(checkpoint_dir / SHARDED_DIR, state)
    elif state.sharded:
        load_full_state_into_shards(checkpoint_dir, state)
    else:
        load_model_weights(state.model, checkpoint_dir / "model.safetensors")
        load_optimizer_state(state.optimizer, _load(checkpoint_dir / "optimizer.pt", device),
                             checkpoint_dir / "optimizer.pt")
    scaler_state = _load(checkpoint_dir / "scaler.pt") if (checkpoint_dir / "scaler.pt").is_file() else {}
    if scaler_state:  # empty when saved without fp16 (bf16 or fp32): a scaler now on starts fresh
        state.scaler.load_state_dict(scaler_state)
    if (checkpoint_dir / "scheduler.pt").is_file():
        check_scheduler_state(_load(checkpoint_dir / "scheduler.pt"), checkpoint_dir / "scheduler.pt")
    rng_states = None
    if (checkpoint_dir / "training_state.pt").is_file():
        rng_states = _load(checkpoint_dir / "training_state.pt")["rng_states"]
    return meta, rng_states


def read_sharded_state(sharded_dir, state):
    """Every rank: weights and AdamW state from a sharded checkpoint, into a sharded model
    (on any number of ranks: DCP reads each rank's part from whichever files hold it) or
    an unsharded one (each rank reads everything)."""
    model_state, optimizer_state = get_state_dict(state.model, state.optimizer)
    loaded = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(loaded, checkpoint_id=sharded_dir)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - damaged files fail in many ways
        details = f" ({checkpoint_error_text(e)})" if debug_enabled() else ""
        raise UserError(f"checkpoint {sharded_dir.parent}: its {SHARDED_DIR}/ files do not load into this model "
                        f"(a damaged shard file){details}; {another_checkpoint_text(sharded_dir.parent)}") from e
    set_state_dict(state.model, state.optimizer, model_state_dict=loaded["model"],
                   optim_state_dict=loaded["optimizer"])


def load_full_state_into_shards(checkpoint_dir, state):
    """Every rank: an unsharded checkpoint (DDP's or the reference harness's) into a
    sharded model: each rank reads the files and keeps its shards."""
    weights_path, optimizer_path = checkpoint_dir / "model.safetensors", checkpoint_dir / "optimizer.pt"
    try:
        weights = fill_tied_key(clean_state_dict(load_file(weights_path)), state.model)
    except (FileNotFoundError, SafetensorError) as e:
        raise UserError(f"{weights_path}: not a readable safetensors file ({e})")
    optimizer_state = optimizer_state_by_name(state.model, state.optimizer, _load(optimizer_path), optimizer_path)
    fused_settings = [group.get("fused") for group in state.optimizer.param_groups]
    try:
        set_state_dict(state.model, state.optimizer, model_state_dict=weights, optim_state_dict=optimizer_state,
                       options=StateDictOptions(full_state_dict=True))
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{checkpoint_dir}: does not fit this model ({one_line(e)})")
    keep_fused_settings(state.optimizer, fused_settings)


def optimizer_state_by_name(model, optimizer, optimizer_state, source):
    """A torch optimizer state dict keyed by parameter index (what optimizer.pt holds) keyed
    by parameter name instead, as torch.distributed.checkpoint's state-dict functions want it.
    torch numbers the parameters group by group in `optimizer`'s order (AdamW's one group:
    model.parameters(); Muon's: AdamW's group, then Muon's)."""
    name_of = {param: name for name, param in model.named_parameters()}
    names = [name_of[param] for group in optimizer.param_groups for param in group["params"]]
    try:
        return {"state": {names[index]: value for index, value in optimizer_state["state"].items()},
                "param_groups": [{**group, "params": [names[index] for index in group["params"]]}
                                 for group in optimizer_state["param_groups"]]}
    except (IndexError, KeyError, TypeError) as e:
        raise UserError(f"{source}: does not fit this model's parameters ({type(e).__name__}: {e})")


def _load(path, device="cpu"):
    try:
        return torch.load(path, map_location=device)
    except Exception as e:  # noqa: BLE001 - unpickling fails in many ways; each is a damaged file
        raise UserError(f"{path}: not a readable checkpoint file ({type(e).__name__}: {e})")


def check_scheduler_state(scheduler_state, path):
    """Accept what either harness writes: nothing, this project's LambdaLR state, or the
    reference harness's SequentialLR state. Their step counts are not needed (the
    schedule resumes from the checkpoint's global step), but anything else is a file
    this code does not understand, and resuming from it would be a guess."""
    if scheduler_state is None or scheduler_state == {}:
        return
    if not (isinstance(scheduler_state, dict) and isinstance(scheduler_state.get("last_epoch"), int)):
        kind = type(scheduler_state).__name__
        raise UserError(f"{path}: not a learning-rate scheduler state this trainer understands (a {kind} "
                        "without an integer 'last_epoch'); expected the state of a LambdaLR, a "
                        "SequentialLR or nothing")


def load_optimizer_state(optimizer, state_dict, source):
    """Load optimizer state but keep this optimizer's `fused` setting: a checkpoint's param
    groups carry their own (the reference harness's is off), and fused kernels want their
    step counters as float32 tensors on the parameters' device."""
    fused_settings = [group.get("fused") for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state_dict)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{source}: does not fit this model's parameters ({e})")
    keep_fused_settings(optimizer, fused_settings)


def keep_fused_settings(optimizer, fused_settings):
    for group, fused in zip(optimizer.param_groups, fused_settings):
        if fused is None:
            continue  # a group of an optimizer without the setting (Muon's)
        group["fused"] = fused
        for param in group["params"] if fused else []:
            param_state = optimizer.state.get(param, {})
            if "step" in param_state:
                param_state["step"] = param_state["step"].to(device=param.device, dtype=torch.float32)
