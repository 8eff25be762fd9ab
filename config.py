"""Run configuration: `runs/<name>/model.json` and `train.json`, parsed and validated here.

Every key either file accepts is a field below, with its type and default. The
keys and meanings are those of the reference harness gpjt/ddp-base-model-from-scratch,
so its run directories work unchanged; the few keys added here are marked.
"""

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import click

from errors import UserError

PROJECT_DIR = Path(__file__).resolve().parent
RUNS_DIR = PROJECT_DIR / "runs"

# torch seeds take 64 bits; each rank adds its rank to random_seed.
MAX_RANDOM_SEED = 2**62
MAX_DIST_TIMEOUT_MINUTES = 7 * 24 * 60
PARALLELISMS = ("ddp", "fsdp", "hsdp")
OPTIMIZERS = ("adamw", "muon")
# torch.optim.Muon's adjust_lr_fn choices offered here (docs/recipe.md says what each does).
MUON_ADJUST_LR = ("original", "match_rms_adamw")
# The dtype of Muon's Newton-Schulz iterations: torch.optim.Muon's own bfloat16, or float32 (training.Float32Muon).
MUON_NEWTON_SCHULZ_DTYPES = ("bfloat16", "float32")
# What evaluations read when train.json (or a script's option) names nothing else: HellaSwag's
# public files (the {} is "val" or "train") and nanochat's CORE bundle.
HELLASWAG_DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{}.jsonl"
CORE_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
# Old reference configs spelled microbatch_size this way.
LEGACY_ALIASES = {"minibatch_size": "microbatch_size"}
# train.json's ways of saying how long to train; min_train_tokens -1 (its default) says none of them.
TOKEN_BUDGET_KEYS = ("min_train_tokens", "train_tokens_per_parameter", "train_flops")


def load_json(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}")


def _type_name(annotation):
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}
    return names.get(annotation, str(annotation))


def _check_type(source, key, value, annotation):
    """Return `value` if it fits `annotation` (int, float, bool, str or `X | None`)."""
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        # bool is a subclass of int in Python; a JSON `true` is never a size.
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            # JSON's 1e309 parses as inf, and Python's json also reads NaN and Infinity.
            if not math.isfinite(float(value)):
                raise UserError(f"{source}: key '{key}' must be a finite number, got {value}")
            return float(value)
        if kind is str and isinstance(value, str):
            return value
        if kind is list and isinstance(value, list):
            return value  # its items are checked by the config's validate
    expected = " or ".join(_type_name(k) if k is not type(None) else "null" for k in allowed)
    raise UserError(f"{source}: key '{key}' must be {expected}, got {json.dumps(value)}")


def closest_or_all(name, valid, kind):
    """The end of an error about an unknown `name`: the closest of `valid` when one is close
    (a typo), otherwise all of them, called `kind`."""
    close = difflib.get_close_matches(name, valid, n=1)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f"; {kind}: {', '.join(valid) or 'none'}"


def _check_key(cls, key, source):
    known = [f.name for f in dataclasses.fields(cls)]
    if key not in known:
        raise UserError(f"{source}: unknown key '{key}'{closest_or_all(key, known, 'valid keys')}")


def _parse(cls, raw, source):
    """Build dataclass `cls` from a JSON object, checking keys and types."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    raw = {LEGACY_ALIASES.get(k, k): v for k, v in raw.items()}
    hints = typing.get_type_hints(cls)
    for key in raw:
        _check_key(cls, key, source)
    values = {}
    for field in dataclasses.fields(cls):
        if field.name in raw:
            values[field.name] = _check_type(source, field.name, raw[field.name], hints[field.name])
        elif field.default is dataclasses.MISSING:
            raise UserError(f"{source}: missing required key '{field.name}'")
    config = cls(**values)
    config.validate(source)
    return config


@dataclass(frozen=True)
class DatasetSource:
    """One source of train.json's `dataset`: a single string is one source of weight 1."""
    name: str  # for val_loss/<name> and messages: the entry's "name", else the last part of its dataset
    dataset: str  # anything `dataset` accepts as a string: a local directory, a Hub repo id, "demo"
    weight: float


MIXTURE_ENTRY_KEYS = ("dataset", "weight", "name")


def parse_dataset_sources(value, source):
    """train.json's `dataset` as DatasetSources, checking a list's entries (one error line naming the key)."""
    if isinstance(value, str):
        _require(value != "", source, "dataset", "must be a non-empty string or a list of sources")
        return (DatasetSource(Path(value).name or value, value, 1.0),)
    _require(len(value) > 0, source, "dataset",
             'must be a string or a non-empty list of {"dataset": ..., "weight": ...}, got []')
    sources = []
    for index, entry in enumerate(value):
        key = f"dataset[{index}]"
        if not isinstance(entry, dict):
            raise UserError(f'{source}: key \'{key}\' must be an object {{"dataset": ..., "weight": ...}}, '
                            f"got {json.dumps(entry)}")
        unknown = sorted(set(entry) - set(MIXTURE_ENTRY_KEYS))
        _require(not unknown, source, key, f"has unknown key '{unknown[0] if unknown else ''}'; valid keys: "
                 f"{', '.join(MIXTURE_ENTRY_KEYS)}")
        for required in ("dataset", "weight"):
            _require(required in entry, source, f"{key}.{required}", "is missing")
        spec, weight, name = entry["dataset"], entry["weight"], entry.get("name")
        _require(isinstance(spec, str) and spec != "", source, f"{key}.dataset",
                 f"must be a non-empty string, got {json.dumps(spec)}")
        _require(isinstance(weight, (int, float)) and not isinstance(weight, bool), source, f"{key}.weight",
                 f"must be a number, got {json.dumps(weight)}")
        _require(math.isfinite(weight) and weight >= 0, source, f"{key}.weight",
                 f"must be a finite number >= 0, got {weight}")
        _require(name is None or (isinstance(name, str) and name != "" and "/" not in name), source,
                 f"{key}.name", f"must be a non-empty string without '/', got {json.dumps(name)}")
        sources.append(DatasetSource(name or Path(spec).name or spec, spec, float(weight)))
    _require(sum(s.weight for s in sources) > 0, source, "dataset",
             "weights are all zero; give at least one source a positive weight")
    names = [s.name for s in sources]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    _require(duplicate is None, source, "dataset",
             f"has two sources named '{duplicate}'; give them distinct \"name\" keys")
    return tuple(sources)


def _require(condition, source, key, message):
    if not condition:
        raise UserError(f"{source}: key '{key}' {message}")


@dataclass(frozen=True)
class ModelConfig:
    FILE_NAME: typing.ClassVar[str] = "model.json"
    vocab_size: int
    context_length: int
    emb_dim: int
    n_heads: int
    n_layers: int
    drop_rate: float = 0.1
    qkv_bias: bool = False
    tie_weights: bool = False
    # Added here: architecture options beyond GPT-2 (Llama-style models). Their
    # defaults are the GPT-2 model, and to_dict() leaves them out at those defaults.
    pos_emb: str = "learned"  # "learned" (a position embedding table) or "rope"
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # or "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # or "swiglu", or "relu2" (ReLU squared)
    mlp_hidden_dim: int | None = None  # default 4 x emb_dim
    n_kv_heads: int | None = None  # grouped-query attention; default n_heads
    bias: bool = True  # biases of the output projection and feed-forward, and LayerNorm's shift
    init_std: float | None = None  # weights ~ N(0, init_std), biases 0 (GPT-2, Llama: 0.02); default PyTorch's
    # Interventions from the modded-nanogpt speedruns (docs/architecture-options.md), all off by default.
    qk_norm: bool = False  # parameter-free RMSNorm of each query and key head, before RoPE
    zero_init_projections: bool = False  # attention's and the feed-forward's output projections start at zero
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap), in the loss and in generation
    unet_skips: bool = False  # layer i's output joins the input of layer n_layers - 1 - i, by a learnable scalar

    @classmethod
    def from_dict(cls, raw, source="model.json"):
        return _parse(cls, raw, source)

    def validate(self, source):
        for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            _require(getattr(self, key) > 0, source, key, f"must be positive, got {getattr(self, key)}")
        _require(self.emb_dim % self.n_heads == 0, source, "emb_dim",
                 f"({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        _require(0.0 <= self.drop_rate < 1.0, source, "drop_rate",
                 f"must be in [0, 1), got {self.drop_rate}")
        for key, choices in ARCHITECTURE_CHOICES.items():
            value = getattr(self, key)
            _require(value in choices, source, key,
                     f"must be one of {', '.join(json.dumps(c) for c in choices)}, got {json.dumps(value)}")
        for key in ("rope_theta", "norm_eps", "mlp_hidden_dim", "n_kv_heads", "init_std", "logit_softcap"):
            value = getattr(self, key)
            _require(value is None or value > 0, source, key, f"must be positive, got {value}")
        _require(self.n_heads % self.kv_heads == 0, source, "n_kv_heads",
                 f"({self.kv_heads}) must divide n_heads ({self.n_heads})")
        _require(self.pos_emb != "rope" or self.head_dim % 2 == 0, source, "pos_emb",
                 f"\"rope\" rotates pairs of dimensions: emb_dim / n_heads ({self.head_dim}) must be even")
        _require(not self.unet_skips or self.n_layers >= 2, source, "unet_skips",
                 f"joins the first half of the layers to the second: needs n_layers >= 2, got {self.n_layers}")

    @property
    def head_dim(self):
        return self.emb_dim // self.n_heads

    @property
    def kv_heads(self):
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ff_hidden_dim(self):
        return 4 * self.emb_dim if self.mlp_hidden_dim is None else self.mlp_hidden_dim

    def to_dict(self):
        """model.json's keys: the reference harness's always, ours where they differ from
        their defaults, so a GPT-2 model's config reads exactly as the reference's."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in ARCHITECTURE_KEYS}
        return {key: value for key, value in dataclasses.asdict(self).items()
                if key not in defaults or value != defaults[key]}


ARCHITECTURE_CHOICES = {"pos_emb": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"),
                        "mlp": ("gelu", "swiglu", "relu2")}
ARCHITECTURE_KEYS = ("pos_emb", "rope_theta", "norm", "norm_eps", "mlp", "mlp_hidden_dim", "n_kv_heads", "bias",
                     "init_std", "qk_norm", "zero_init_projections", "logit_softcap", "unet_skips")


@dataclass(frozen=True)
class TrainConfig:
    FILE_NAME: typing.ClassVar[str] = "train.json"
    # A dataset (a local directory, a Hub repo id or "demo"), or, added here, a mixture: a list of
    # {"dataset": ..., "weight": ..., "name" (optional)} (batching.MixtureSchedule; docs/stages.md).
    dataset: str | list
    microbatch_size: int
    # 1 when absent, unless global_batch_tokens is given (see __post_init__).
    gradient_accumulation_steps: int | None = None
    # Defaults to validation_interval when that is set (old reference configs
    # used validation_interval for "validate and checkpoint"), else 1000.
    checkpoint_interval: int | None = None
    min_train_tokens: int = -1
    start_train_token: int = 0
    start_val_token: int = 0
    validation_interval: int | None = None
    validation_batches: int = 100
    clipping_max_norm: float | None = None
    weight_decay: float = 0.1
    learning_rate: float = 0.0004
    schedule_learning_rate: bool = False
    warmup_period_percent: float = 0.0
    use_amp: bool = True
    random_seed: int = 42
    # Added here (not in the reference harness):
    min_lr: float | None = None  # end of the cosine decay; default learning_rate / 10
    amp_dtype: str | None = None  # "bfloat16" or "float16"; default bfloat16 where supported
    dist_timeout_minutes: float = 60.0
    keep_last_checkpoints: int | None = None  # prune older ones (never `best`/`latest`); null keeps all
    max_skipped_steps: int = 10  # stop after this many non-finite steps in a row
    shared_filesystem: bool = False  # DATASETS_DIR is shared by all nodes: download once, not once per node
    tensorboard: bool = False  # also write scalars to runs/<run>/tb/ (needs the tensorboard extra)
    log_interval: int | None = None  # steps between reads of the metrics from the device; default 1 on CPU, 10 on GPU
    compile: bool = False  # torch.compile the model (off until proven on your GPU)
    peak_tflops: float | None = None  # the device's peak for MFU, when it is not in perf.py's table
    pad_vocab_to_multiple_of: int = 1  # pad the output layer's vocabulary (64 suits GPUs); checkpoints unpadded
    # Instead of gradient_accumulation_steps: tokens per optimizer step, the same on any world size
    # (the accumulation is derived at start-up: batching.gradient_accumulation_for).
    global_batch_tokens: int | None = None
    # Instead of min_train_tokens: a budget per parameter (Chinchilla: 20) or in training FLOPs
    # (batching.token_budget turns either into tokens).
    train_tokens_per_parameter: float | None = None
    train_flops: float | None = None
    parallelism: str = "ddp"  # or "fsdp" / "hsdp": shard weights, gradients and AdamW state (parallelism.py)
    fsdp_reshard_after_forward: bool = True  # free each block's gathered weights after its forward (less memory)
    consolidated_weights: bool = True  # fsdp/hsdp checkpoints also get a full model.safetensors (gathered on rank 0)
    init_from: str | None = None  # start from these weights: a checkpoint directory or a HF model (initial_weights.py)
    extend_positions: bool = False  # with init_from: allow a longer context than the source's learned positions
    activation_checkpointing: bool = False  # recompute each block in the backward pass: less memory, ~1/3 more compute
    loss_chunk_tokens: int | None = None  # compute the loss over this many tokens' logits at a time
    # HellaSwag during training (hellaswag_scoring.training_share): every hellaswag_interval steps and
    # the last, on the first hellaswag_items items (null: all) of hellaswag_data (null: the public validation file).
    hellaswag_interval: int | None = None
    hellaswag_items: int | None = None
    hellaswag_data: str | None = None  # a local JSONL file or a URL (downloaded into DATASETS_DIR/hellaswag/)
    # CORE during training (core_scoring.training_share): every core_interval steps and the last, on each
    # task's first core_items items (null: all) of core_tasks (comma-separated labels; null: all) of core_bundle.
    core_interval: int | None = None
    core_items: int | None = None
    core_tasks: str | None = None
    core_bundle: str | None = None  # a local directory or zip, or a URL (null: nanochat's eval_bundle.zip)
    # Log every metrics row and the config to this Weights & Biases project (rank 0; needs the wandb extra).
    wandb_project: str | None = None
    wandb_entity: str | None = None  # default: the W&B account's default entity
    wandb_run_name: str | None = None  # default: the run directory's name
    # "muon": torch.optim.Muon for the transformer blocks' weight matrices, AdamW (learning_rate,
    # weight_decay) for the rest (training.make_optimizer; docs/recipe.md).
    optimizer: str = "adamw"
    muon_learning_rate: float = 0.02
    muon_momentum: float = 0.95  # Nesterov momentum
    muon_weight_decay: float = 0.0  # Muon multiplies the matrices by 1 - muon_learning_rate x this each step
    muon_adjust_lr: str = "original"  # how the update's size depends on the matrix's shape
    # "float32" for CPUs without bfloat16 matrix units, where bfloat16 matmuls are ~30x slower (docs/recipe.md).
    muon_newton_schulz_dtype: str = "bfloat16"
    # Log, per group of parameters, the gradient norm and ||update|| / ||weight|| (training.Diagnostics):
    # off by default, as it keeps a copy of the weights during each step.
    diagnostics: bool = False

    def __post_init__(self):
        # With global_batch_tokens the accumulation depends on the world size, so it stays None
        # here: nothing can read a fixed accumulation by mistake.
        if self.gradient_accumulation_steps is None and self.global_batch_tokens is None:
            object.__setattr__(self, "gradient_accumulation_steps", 1)  # the dataclass is frozen

    @classmethod
    def from_dict(cls, raw, source="train.json"):
        return _parse(cls, raw, source)

    def validate(self, source):
        parse_dataset_sources(self.dataset, source)
        if self.is_mixture:
            for key in ("start_train_token", "start_val_token"):
                _require(getattr(self, key) == 0, source, key, "applies to a single dataset; with a list of "
                         "sources each is read from its start")
            _require(any(getattr(self, key) not in (None, -1) for key in TOKEN_BUDGET_KEYS), source, "dataset",
                     f"is a mixture: give the run's length with one of {', '.join(TOKEN_BUDGET_KEYS)}")
        for key in ("microbatch_size", "validation_batches"):
            _require(getattr(self, key) > 0, source, key, f"must be positive, got {getattr(self, key)}")
        for key in ("checkpoint_interval", "validation_interval"):
            value = getattr(self, key)
            _require(value is None or value > 0, source, key, f"must be positive or null, got {value}")
        _require(self.min_train_tokens == -1 or self.min_train_tokens > 0, source, "min_train_tokens",
                 f"must be positive, or -1 for every whole global batch, got {self.min_train_tokens}")
        for key in ("start_train_token", "start_val_token"):
            _require(getattr(self, key) >= 0, source, key, f"must be >= 0, got {getattr(self, key)}")
        _require(self.clipping_max_norm is None or self.clipping_max_norm > 0, source,
                 "clipping_max_norm", f"must be positive or null, got {self.clipping_max_norm}")
        _require(self.learning_rate > 0, source, "learning_rate", f"must be positive, got {self.learning_rate}")
        _require(self.min_lr is None or 0 <= self.min_lr <= self.learning_rate, source, "min_lr",
                 f"must be between 0 and learning_rate ({self.learning_rate}), got {self.min_lr}")
        _require(self.weight_decay >= 0, source, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        # AdamW multiplies every weight by 1 - learning_rate x weight_decay each step.
        _require(self.learning_rate * self.weight_decay < 1, source, "weight_decay",
                 f"times learning_rate must be below 1 (AdamW scales the weights by 1 - lr x weight_decay "
                 f"each step), got {self.weight_decay} x {self.learning_rate}")
        _require(0 <= self.random_seed < MAX_RANDOM_SEED, source, "random_seed",
                 f"must be between 0 and 2**62 - 1 (each rank seeds with random_seed + rank), got {self.random_seed}")
        _require(0 <= self.warmup_period_percent <= 100, source, "warmup_period_percent",
                 f"must be between 0 and 100, got {self.warmup_period_percent}")
        _require(self.parallelism in PARALLELISMS, source, "parallelism",
                 f"must be one of {', '.join(json.dumps(p) for p in PARALLELISMS)}, got {json.dumps(self.parallelism)}")
        for key, choices in (("optimizer", OPTIMIZERS), ("muon_adjust_lr", MUON_ADJUST_LR),
                             ("muon_newton_schulz_dtype", MUON_NEWTON_SCHULZ_DTYPES)):
            _require(getattr(self, key) in choices, source, key, f"must be one of "
                     f"{', '.join(json.dumps(c) for c in choices)}, got {json.dumps(getattr(self, key))}")
        _require(self.muon_learning_rate > 0, source, "muon_learning_rate",
                 f"must be positive, got {self.muon_learning_rate}")
        _require(0 <= self.muon_momentum < 1, source, "muon_momentum", f"must be in [0, 1), got {self.muon_momentum}")
        _require(self.muon_weight_decay >= 0 and self.muon_learning_rate * self.muon_weight_decay < 1, source,
                 "muon_weight_decay", f"must be >= 0 and, times muon_learning_rate, below 1 (Muon scales the "
                 f"matrices by 1 - muon_learning_rate x muon_weight_decay each step), got {self.muon_weight_decay} "
                 f"x {self.muon_learning_rate}")
        _require(self.amp_dtype in (None, "bfloat16", "float16"), source, "amp_dtype",
                 f"must be \"bfloat16\" or \"float16\", got {json.dumps(self.amp_dtype)}")
        for key in ("gradient_accumulation_steps", "keep_last_checkpoints", "max_skipped_steps", "log_interval",
                    "peak_tflops", "pad_vocab_to_multiple_of", "global_batch_tokens", "train_tokens_per_parameter",
                    "train_flops", "loss_chunk_tokens", "hellaswag_interval", "hellaswag_items", "core_interval",
                    "core_items"):
            value = getattr(self, key)
            _require(value is None or value > 0, source, key, f"must be positive, got {value}")
        for key in ("hellaswag_data", "core_tasks", "core_bundle", "wandb_project", "wandb_entity", "wandb_run_name"):
            _require(getattr(self, key) != "", source, key, "must be a non-empty string or null, got \"\"")
        _require(self.core_tasks is None or all(label.strip() for label in self.core_tasks.split(",")), source,
                 "core_tasks", f"must be comma-separated task labels (core.yaml's), got {json.dumps(self.core_tasks)}")
        if self.gradient_accumulation_steps is not None and self.global_batch_tokens is not None:
            raise UserError(f"{source}: keys 'gradient_accumulation_steps' and 'global_batch_tokens' are alternatives "
                            "(global_batch_tokens derives the accumulation from the world size); give one of them")
        budgets = [key for key in TOKEN_BUDGET_KEYS if getattr(self, key) not in (None, -1)]
        if len(budgets) > 1:
            raise UserError(f"{source}: keys '{budgets[0]}' and '{budgets[1]}' are alternatives; give at most one of "
                            f"{', '.join(TOKEN_BUDGET_KEYS)}")
        _require(0 < self.dist_timeout_minutes <= MAX_DIST_TIMEOUT_MINUTES, source, "dist_timeout_minutes",
                 f"must be between 0 and {MAX_DIST_TIMEOUT_MINUTES} (one week), got {self.dist_timeout_minutes}")

    @property
    def hellaswag_source(self):
        """hellaswag_data, or HellaSwag's public validation file."""
        return self.hellaswag_data or HELLASWAG_DATA_URL.format("val")

    @property
    def core_source(self):
        """core_bundle, or nanochat's CORE bundle."""
        return self.core_bundle or CORE_BUNDLE_URL

    @property
    def is_mixture(self):
        return isinstance(self.dataset, list)

    @property
    def dataset_sources(self):
        """`dataset` as DatasetSources (one, of weight 1, for a single dataset)."""
        return parse_dataset_sources(self.dataset, "train.json")

    @property
    def effective_checkpoint_interval(self):
        return self.checkpoint_interval or self.validation_interval or 1000

    @property
    def effective_min_lr(self):
        return self.learning_rate / 10 if self.min_lr is None else self.min_lr

    @property
    def gradient_clip_norm(self):
        """clipping_max_norm, or infinity (the norm is still measured) without clipping."""
        return float("inf") if self.clipping_max_norm is None else self.clipping_max_norm

    def log_interval_on(self, device):
        """log_interval, or by default 10 on a GPU (each read waits for the device) and 1 on CPU."""
        if self.log_interval is not None:
            return self.log_interval
        return 10 if device.type == "cuda" else 1


# train.json keys a resumed run cannot change with --set: they choose the data a checkpoint
# was trained on, or the shapes of its saved state. (Other keys, such as learning_rate, may
# change on resume; a changed model.json is refused whatever the way.)
RUN_IDENTITY_KEYS = ("dataset", "start_train_token", "pad_vocab_to_multiple_of")


def parse_key_values(items, cls, option):
    """`option KEY=VALUE` items as {key: value} for dataclass `cls` (TrainConfig or ModelConfig):
    VALUE is read as JSON (3e-4, 8, true, null, "text"), else taken as a string (so
    `dataset=fineweb` needs no quotes). Keys and types are checked here; the values as a
    whole by the config's validate."""
    overrides = {}
    hints = typing.get_type_hints(cls)
    for item in items:
        key, separator, text = item.partition("=")
        key = LEGACY_ALIASES.get(key.strip(), key.strip())
        source = f"{option} {key or item}"
        if not separator or not key:
            raise UserError(f"{option} {item}: expected KEY=VALUE, a {cls.FILE_NAME} key and its value")
        _check_key(cls, key, source)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        overrides[key] = _check_type(source, key, value, hints[key])
    return overrides


def parse_overrides(items):
    """`--set KEY=VALUE` options as {train.json key: value} (parse_key_values)."""
    return parse_key_values(items, TrainConfig, "--set")


# The option ddp_train.py and preflight.py take; main() gets `overrides` for parse_overrides.
override_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a train.json key for this launch (repeatable; VALUE read as JSON, else as a string), "
         "validated as train.json is and recorded in each checkpoint's meta.json. "
         "Example: --set learning_rate=3e-4 --set microbatch_size=8")


@dataclass(frozen=True)
class Run:
    name: str
    run_dir: Path
    model: ModelConfig
    train: TrainConfig  # train.json with the overrides applied: the effective config
    overrides: dict = dataclasses.field(default_factory=dict)  # --set KEY=VALUE, parsed

    @property
    def checkpoints_dir(self):
        return self.run_dir / "checkpoints"

    @property
    def wandb_run_name(self):
        return self.train.wandb_run_name or self.name


def resolve_run_dir(run):
    """RUN is a directory path, or the name of a directory under runs/."""
    as_path = Path(run)
    if as_path.is_dir():
        return as_path.resolve()
    named = RUNS_DIR / run
    if named.is_dir():
        return named
    available = sorted(p.name for p in RUNS_DIR.iterdir() if p.is_dir()) if RUNS_DIR.is_dir() else []
    raise UserError(f"run '{run}': no such directory, nor a run under {RUNS_DIR}"
                    f"{closest_or_all(str(run), available, 'runs available')}")


def load_model_config(run_or_model_json):
    """The ModelConfig of a model.json file, or of a run (a name under runs/ or a run directory)."""
    path = Path(run_or_model_json)
    model_json = path if path.suffix == ".json" else resolve_run_dir(run_or_model_json) / "model.json"
    return ModelConfig.from_dict(load_json(model_json), source=str(model_json))


def load_run(run, overrides=None):
    """The run directory RUN's configs; `overrides` ({key: value}, parse_overrides') replace
    train.json's values, and the result is validated exactly as train.json is."""
    run_dir = resolve_run_dir(run)
    model_json, train_json = run_dir / "model.json", run_dir / "train.json"
    train_raw = load_json(train_json)
    source = str(train_json)
    if overrides:
        if isinstance(train_raw, dict):
            train_raw = {LEGACY_ALIASES.get(k, k): v for k, v in train_raw.items()} | overrides
        source += " with " + ", ".join(f"--set {key}" for key in overrides)
    return Run(
        name=run_dir.name,
        run_dir=run_dir,
        model=ModelConfig.from_dict(load_json(model_json), source=str(model_json)),
        train=TrainConfig.from_dict(train_raw, source=source),
        overrides=dict(overrides or {}),
    )
