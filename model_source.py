"""How every script that reads weights names a model, and loading it.

    RUN [CHECKPOINT]      RUN: a run name under runs/ or a run directory. CHECKPOINT: `latest`,
                          `best`, a checkpoint directory name in RUN/checkpoints/, or a path to a
                          checkpoint directory (or its model.safetensors). Default: `best` when the
                          run has one, else `latest`.
    CHECKPOINT_DIR        a checkpoint directory, or its model.safetensors
    MODEL_JSON WEIGHTS    a model.json and a model.safetensors (the older form)

A checkpoint's model config is its meta.json's `model_config`; a checkpoint without one
(the reference harness's) takes model.json from its own directory (convert_gpt2.py
from-hf writes one there), else from its run directory. The run (RUN, or the run
directory a checkpoint or model.json is in) gives the dataset, from its train.json.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import click
from safetensors import SafetensorError, safe_open

from checkpointing import SHARDED_DIR, clean_state_dict, load_model_weights, read_checkpoint_meta, resolve_checkpoint
from config import ModelConfig, load_json, load_model_config, resolve_run_dir
from errors import UserError
from gpt import GPTModel

WEIGHTS_FILE = "model.safetensors"
METAVAR = "RUN [CHECKPOINT]"
GRAMMAR = """\b
The model, in any of these forms:
  RUN [CHECKPOINT]    RUN: a run name under runs/ or a run directory;
                      CHECKPOINT: latest, best, or a checkpoint directory
                      name (default: best when the run has one, else latest)
  CHECKPOINT_DIR      a checkpoint directory (or its model.safetensors)
  MODEL_JSON WEIGHTS  a model.json and a model.safetensors
The model config comes from the checkpoint's meta.json."""
SHOWN_MISMATCHES = 3


@dataclass(frozen=True)
class ModelSource:
    """A model named on the command line: its config, its weights and where they came from."""
    config: ModelConfig
    config_source: str  # where the config was read, for messages
    weights: Path
    checkpoint_dir: Path | None  # the checkpoint the weights are in, if they are in one
    run_dir: Path | None  # the run whose train.json names the dataset, when known
    meta: dict  # the checkpoint's meta.json; {} without one

    @property
    def train_json(self):
        return self.run_dir / "train.json" if self.run_dir else None

    @property
    def datasets(self):
        """The datasets the run's train.json names: its `dataset`, or each source of a mixture."""
        if self.train_json is None or not self.train_json.is_file():
            return []
        raw = load_json(self.train_json)
        dataset = raw.get("dataset") if isinstance(raw, dict) else None
        if isinstance(dataset, str):
            return [dataset]
        entries = dataset if isinstance(dataset, list) else []
        return [entry["dataset"] for entry in entries if isinstance(entry, dict) and isinstance(entry.get("dataset"), str)]

    @property
    def dataset(self):
        """The run's one dataset (train.json's `dataset` when it is not a mixture), or None."""
        datasets = self.datasets
        return datasets[0] if len(datasets) == 1 else None

    @property
    def name(self):
        """The run's name, else the weights' directory's."""
        return (self.run_dir or self.weights.resolve().parent).name


def model_arguments(command):
    """The model's positional arguments (`RUN [CHECKPOINT]` and the other forms), as `model_args`."""
    return click.argument("model_args", nargs=-1, required=True, metavar=METAVAR)(command)


def resolve_model(arguments):
    """The ModelSource that a script's model arguments (one or two strings) name."""
    arguments = [str(argument) for argument in arguments]
    if len(arguments) == 2 and arguments[0].endswith(".json"):
        return from_model_json(Path(arguments[0]), Path(arguments[1]))
    if len(arguments) == 1 and arguments[0].endswith(".json"):
        raise UserError(f"{arguments[0]}: a model.json needs its weights after it (MODEL_JSON WEIGHTS)")
    if len(arguments) == 1 and is_checkpoint(Path(arguments[0])):
        return from_checkpoint(Path(arguments[0]))
    if len(arguments) in (1, 2):
        return from_run(*arguments)
    raise UserError(f"expected the model as {METAVAR}, CHECKPOINT_DIR or MODEL_JSON WEIGHTS, "
                    f"got {len(arguments)} arguments: {' '.join(arguments)}")


def is_checkpoint(path):
    """Whether `path` is a checkpoint directory (or its weights) rather than a run."""
    return path.is_file() or (path / "meta.json").is_file() or (path / WEIGHTS_FILE).is_file()


def from_run(run, checkpoint=None):
    run_dir = resolve_run_dir(run)
    checkpoints_dir = run_dir / "checkpoints"
    if checkpoint is not None and is_checkpoint(Path(checkpoint)):
        return from_checkpoint(Path(checkpoint), run_dir)
    if checkpoint is None:
        checkpoint = "best" if (checkpoints_dir / "best").exists() else "latest"
    return from_checkpoint(resolve_checkpoint(checkpoints_dir, checkpoint), run_dir)


def run_dir_of(checkpoint_dir):
    """The run directory a checkpoint directory is in (RUN/checkpoints/NAME), or None."""
    run_dir = checkpoint_dir.parent.parent
    if checkpoint_dir.parent.name == "checkpoints" and (run_dir / "model.json").is_file():
        return run_dir
    return None


def from_checkpoint(path, run_dir=None):
    """A checkpoint directory, or its weights file."""
    weights = path if path.is_file() else path / WEIGHTS_FILE
    checkpoint_dir = weights.parent.resolve()
    run_dir = run_dir or run_dir_of(checkpoint_dir)
    meta = read_checkpoint_meta(checkpoint_dir) if (checkpoint_dir / "meta.json").exists() else {}
    candidates = [checkpoint_dir / "model.json"] + ([run_dir / "model.json"] if run_dir else [])
    if isinstance(meta.get("model_config"), dict):
        config_source = f"{checkpoint_dir / 'meta.json'} model_config"
        config = ModelConfig.from_dict(meta["model_config"], source=config_source)
    elif model_json := next((candidate for candidate in candidates if candidate.is_file()), None):
        config_source, config = str(model_json), load_model_config(model_json)
    else:
        raise UserError(f"{checkpoint_dir}: no model config: no model_config in a meta.json, and no "
                        f"{' or '.join(map(str, candidates))}; name it as MODEL_JSON WEIGHTS")
    return ModelSource(config, config_source, weights, checkpoint_dir, run_dir, meta)


def from_model_json(model_json, weights):
    """The older form: the config is model.json's, whatever a checkpoint's meta.json says."""
    checkpoint_dir = weights.resolve().parent
    meta = read_checkpoint_meta(checkpoint_dir) if (checkpoint_dir / "meta.json").is_file() else {}
    run_dir = model_json.parent if (model_json.parent / "train.json").is_file() else None
    return ModelSource(load_model_config(model_json), str(model_json), weights,
                       checkpoint_dir if meta else None, run_dir, meta)


# ---------------------------------------------------------------- loading

def load_model(source, device, drop_rate=0.0):
    """A GPTModel of `source`'s config with its weights, on `device`, in eval mode.

    `drop_rate` replaces the config's: it is the dropout the model applies whenever a
    caller switches it to train mode. The default 0 keeps dropout off for evaluation;
    test_ift.py passes the rate its --dropout chooses for fine-tuning.
    """
    require_weights(source)
    model = GPTModel(dataclasses.replace(source.config, drop_rate=drop_rate))
    check_shapes(source, model)
    load_model_weights(model, source.weights)
    return model.to(device).eval()


def require_weights(source):
    if source.weights.is_file():
        return
    if source.checkpoint_dir is not None and (source.checkpoint_dir / SHARDED_DIR).is_dir():
        raise UserError(f"{source.checkpoint_dir}: a sharded checkpoint without {WEIGHTS_FILE} (train.json "
                        f"consolidated_weights false); write it first: uv run consolidate_checkpoint.py "
                        f"{source.checkpoint_dir}")
    raise UserError(f"{source.weights}: model weights not found")


def check_shapes(source, model):
    """UserError naming the first tensors whose shape the config does not give (read from
    the file's header, before any tensor is loaded)."""
    try:
        with safe_open(source.weights, framework="pt") as f:
            shapes = clean_state_dict({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    except (SafetensorError, OSError) as e:
        raise UserError(f"{source.weights}: not a readable safetensors file ({e})")
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    wrong = [f"{key} is {list(shapes[key])}, the config gives {list(shape)}"
             for key, shape in expected.items() if key in shapes and shapes[key] != shape]
    if wrong:
        more = f" (and {len(wrong) - SHOWN_MISMATCHES} more)" if len(wrong) > SHOWN_MISMATCHES else ""
        raise UserError(f"{source.weights}: its tensors do not fit the model config of {source.config_source}: "
                        f"{'; '.join(wrong[:SHOWN_MISMATCHES])}{more}")
