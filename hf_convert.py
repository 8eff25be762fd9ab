"""Conversion between Hugging Face transformers' GPT-2 / Llama checkpoints and this
project's model.json + model.safetensors; convert_gpt2.py is its command line.

`from-hf` turns a `GPT2LMHeadModel` or `LlamaForCausalLM` checkpoint (a directory
or a Hub repo id) into model.json + model.safetensors for gpt.py; `load_hf_checkpoint`
is the same conversion without the files, for other importers. `to-hf` writes a
directory that transformers loads with no custom code: a `LlamaForCausalLM` for a
Llama-shaped model.json (pos_emb "rope", norm "rmsnorm", mlp "swiglu"), a
`GPT2LMHeadModel` for a GPT-2-shaped one (mlp "gelu", or "relu2" as transformers'
activation "relu2"). Both directions give the same logits. Of the modded-nanogpt switches
(docs/architecture-options.md) neither class has qk_norm, logit_softcap or unet_skips:
to-hf refuses them.
transformers itself is not needed: the files are read and written with json and
safetensors.

GPT-2's layout differs from ours in two ways. Hugging Face's GPT-2 uses Conv1D
layers, whose weights are stored [in, out] where nn.Linear's are [out, in]. And it
computes query, key and value with one layer (`c_attn`, outputs concatenated q|k|v).
Llama's maps one to one, with no permutation either: gpt.py's RoPE rotates dimension
i of a head together with i + head_dim / 2, as transformers' `rotate_half` does
(Meta's original checkpoints pair 2i with 2i + 1; transformers' own conversion
script has permuted the query and key weights of every Hub checkpoint already).
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file
from tiktoken.load import read_file_cached

from checkpointing import save_safetensors
from config import ARCHITECTURE_CHOICES, ModelConfig, load_json
from errors import UserError, one_line
from eval_common import tokenizer_name_for
from gpt import GPTModel
from model_card import model_card
from model_source import load_model
from token_data import ByteTokenizer, hub_failure_reason

# gpt.py's GELU is the tanh approximation; these are its names in transformers.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
# GPT2Config's activation_function for model.json's mlp; transformers' "relu2" is relu(x)^2.
GPT2_ACTIVATIONS = {"gelu": "gelu_new", "relu2": "relu2"}
# model.json switches that neither transformers class has a layer for, and what each is.
# zero_init_projections only sets the starting weights: its trained models convert as any other.
UNCONVERTIBLE_SWITCHES = {"qk_norm": "QK-norm", "logit_softcap": "logit soft-capping",
                          "unet_skips": "U-net skip connections"}
SILUS = ("silu", "swish")  # SwiGLU's activation; transformers has both names for it
EOT_IDS = {"gpt2": 50256, "bytes": ByteTokenizer.eot_id}
# Where tiktoken gets the GPT-2 BPE files; they are Hugging Face's vocab.json and
# merges.txt, byte for byte.
GPT2_ENCODER_JSON_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"
GPT2_VOCAB_BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
# The same tokenizer on the Hub, for a card whose directory lacks the files.
GPT2_HUB_TOKENIZER = "openai-community/gpt2"


# ---------------------------------------------------------------- key mapping

BIAS_OF = {"weight": "bias", "scale": "shift"}  # our names: a Linear's, a LayerNorm's


def with_zero_biases(ours, keys):
    """`ours` plus zeros for the bias of each Linear weight (`.weight`) or LayerNorm scale
    (`.scale`) in `keys` that has none: a transformers class with a bias there computes,
    when it is zero, what ours does."""
    zeros = {}
    for key in keys:
        layer, kind = key.rsplit(".", 1)
        zeros[f"{layer}.{BIAS_OF[kind]}"] = ours[key].new_zeros(ours[key].shape[0])
    return {**zeros, **ours}


# ---------------------------------------------------------------- key mapping: GPT-2

# (Hugging Face name, our name) outside the blocks, and inside block i (after `h.{i}.` /
# `trf_blocks.{i}.`) with whether the tensor is a Conv1D weight, stored transposed.
GPT2_TOP_LEVEL_NAMES = [("wte.weight", "tok_emb.weight"), ("wpe.weight", "pos_emb.weight"),
                        ("ln_f.weight", "final_norm.scale"), ("ln_f.bias", "final_norm.shift")]
GPT2_BLOCK_NAMES = [
    ("attn.c_proj.weight", "att.out_proj.weight", True), ("attn.c_proj.bias", "att.out_proj.bias", False),
    ("mlp.c_fc.weight", "ff.layers.0.weight", True), ("mlp.c_fc.bias", "ff.layers.0.bias", False),
    ("mlp.c_proj.weight", "ff.layers.2.weight", True), ("mlp.c_proj.bias", "ff.layers.2.bias", False),
    ("ln_1.weight", "norm1.scale", False), ("ln_1.bias", "norm1.shift", False),
    ("ln_2.weight", "norm2.scale", False), ("ln_2.bias", "norm2.shift", False)]
QKV = ("W_query", "W_key", "W_value")


def gpt2_name_pairs(n_layers):
    """(Hugging Face name without `transformer.`, our name, transposed) for every tensor
    that maps one to one (all but the fused QKV projection and the output head)."""
    pairs = [(hf, ours, False) for hf, ours in GPT2_TOP_LEVEL_NAMES]
    for i in range(n_layers):
        pairs += [(f"h.{i}.{hf}", f"trf_blocks.{i}.{ours}", transposed) for hf, ours, transposed in GPT2_BLOCK_NAMES]
    return pairs


def gpt2_hf_to_ours(hf, cfg):
    """Our state dict from a Hugging Face GPT-2 one (keys without `transformer.`)."""
    ours = {name: hf[hf_name].t() if transposed else hf[hf_name]
            for hf_name, name, transposed in gpt2_name_pairs(cfg.n_layers)}
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        for name, weight, bias in zip(QKV, hf[h + "attn.c_attn.weight"].chunk(3, dim=1),
                                      hf[h + "attn.c_attn.bias"].chunk(3)):
            ours[b + f"att.{name}.weight"] = weight.t()
            ours[b + f"att.{name}.bias"] = bias
    # A tied head is stored as its own copy: safetensors files cannot share
    # tensors, and checkpointing.load_model_weights expects both keys.
    ours["out_head.weight"] = hf["wte.weight"].clone() if cfg.tie_weights else hf["lm_head.weight"]
    return {key: value.contiguous() for key, value in ours.items()}


def gpt2_ours_to_hf(ours, cfg):
    """A Hugging Face GPT2LMHeadModel state dict from ours (`cfg` a ModelConfig)."""
    # transformers' GPT-2 has a bias on every Linear layer (all are in the blocks) and a
    # shift on every LayerNorm, whatever qkv_bias and bias say.
    ours = with_zero_biases(ours, [key for key in ours if key.endswith(".scale")
                                   or (key.startswith("trf_blocks.") and key.endswith(".weight"))])
    hf = {"transformer." + hf_name: ours[name].t() if transposed else ours[name]
          for hf_name, name, transposed in gpt2_name_pairs(cfg.n_layers)}
    for i in range(cfg.n_layers):
        h, b = f"transformer.h.{i}.", f"trf_blocks.{i}."
        hf[h + "attn.c_attn.weight"] = torch.cat([ours[b + f"att.{n}.weight"].t() for n in QKV], dim=1)
        hf[h + "attn.c_attn.bias"] = torch.cat([ours[b + f"att.{n}.bias"] for n in QKV])
    # transformers re-ties lm_head to wte on load, so a tied head is not stored.
    if not cfg.tie_weights:
        hf["lm_head.weight"] = ours["out_head.weight"]
    return {key: value.contiguous() for key, value in hf.items()}


# ---------------------------------------------------------------- key mapping: Llama

# (Hugging Face name without `model.`, our name); every tensor maps one to one, untransposed.
LLAMA_TOP_LEVEL_NAMES = [("embed_tokens.weight", "tok_emb.weight"), ("norm.weight", "final_norm.scale")]
LLAMA_BLOCK_NORMS = [("input_layernorm.weight", "norm1.scale"), ("post_attention_layernorm.weight", "norm2.scale")]
# The block's Linear layers, named without `.weight` / `.bias`.
LLAMA_ATTENTION_LINEARS = [("self_attn.q_proj", "att.W_query"), ("self_attn.k_proj", "att.W_key"),
                           ("self_attn.v_proj", "att.W_value"), ("self_attn.o_proj", "att.out_proj")]
LLAMA_MLP_LINEARS = [("mlp.gate_proj", "ff.gate"), ("mlp.up_proj", "ff.up"), ("mlp.down_proj", "ff.down")]


def llama_name_pairs(n_layers, attention_bias, mlp_bias):
    """(Hugging Face name without `model.`, our name) for every tensor but the output head,
    given LlamaConfig's two bias switches."""
    linears = LLAMA_ATTENTION_LINEARS + LLAMA_MLP_LINEARS
    biased = (LLAMA_ATTENTION_LINEARS if attention_bias else []) + (LLAMA_MLP_LINEARS if mlp_bias else [])
    block = (LLAMA_BLOCK_NORMS + [(f"{hf}.weight", f"{ours}.weight") for hf, ours in linears]
             + [(f"{hf}.bias", f"{ours}.bias") for hf, ours in biased])
    return LLAMA_TOP_LEVEL_NAMES + [(f"layers.{i}.{hf}", f"trf_blocks.{i}.{ours}")
                                    for i in range(n_layers) for hf, ours in block]


def llama_attention_bias(cfg):
    """LlamaConfig's attention_bias, one switch for the q, k, v and o projections, which
    ours splits between qkv_bias and bias (o's, with the MLP's): on when either is, since
    zero biases stand in for the ones we lack."""
    return cfg.qkv_bias or cfg.bias


def llama_hf_to_ours(hf, cfg):
    """Our state dict from a Hugging Face Llama one (keys without `model.`)."""
    ours = {name: hf[hf_name] for hf_name, name in llama_name_pairs(cfg.n_layers, llama_attention_bias(cfg), cfg.bias)}
    ours["out_head.weight"] = hf["embed_tokens.weight"].clone() if cfg.tie_weights else hf["lm_head.weight"]
    return {key: value.contiguous() for key, value in ours.items()}


def llama_ours_to_hf(ours, cfg):
    """A Hugging Face LlamaForCausalLM state dict from ours (`cfg` a ModelConfig)."""
    attention_bias = llama_attention_bias(cfg)
    if attention_bias:
        ours = with_zero_biases(ours, [f"trf_blocks.{i}.att.{name}.weight"
                                       for i in range(cfg.n_layers) for name in (*QKV, "out_proj")])
    hf = {"model." + hf_name: ours[name] for hf_name, name in llama_name_pairs(cfg.n_layers, attention_bias, cfg.bias)}
    if not cfg.tie_weights:  # transformers ties lm_head to embed_tokens on load
        hf["lm_head.weight"] = ours["out_head.weight"]
    return {key: value.contiguous() for key, value in hf.items()}


# ---------------------------------------------------------------- config.json -> model.json

def requirement(source):
    """require(condition, message): a UserError naming `source` unless `condition`."""
    def require(condition, message):
        if not condition:
            raise UserError(f"{source}: {message}")
    return require


def gpt2_model_config(hf_config, source):
    """model.json for a transformers GPT2Config dict; UserError for what gpt.py cannot do."""
    require = requirement(source)
    for key in ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size"):
        require(isinstance(hf_config.get(key), int), f"needs an integer '{key}'")
    activation = hf_config.get("activation_function", "gelu_new")
    require(activation in (*TANH_GELUS, "relu2"), f"activation_function {activation!r}: gpt.py only has "
                                                  f"the tanh-approximated GELU ({', '.join(TANH_GELUS)}) and relu2")
    require(hf_config.get("scale_attn_weights", True)
            and not hf_config.get("scale_attn_by_inverse_layer_idx", False),
            "only standard 1/sqrt(head_dim) attention scaling is supported")
    require(not hf_config.get("add_cross_attention", False), "cross-attention is not supported")
    return ModelConfig.from_dict({
        "vocab_size": hf_config["vocab_size"],
        "context_length": hf_config["n_positions"],
        "emb_dim": hf_config["n_embd"],
        "n_heads": hf_config["n_head"],
        "n_layers": hf_config["n_layer"],
        "drop_rate": hf_config.get("resid_pdrop", 0.1),
        "qkv_bias": True,
        "tie_weights": hf_config.get("tie_word_embeddings", True),
        "norm_eps": hf_config.get("layer_norm_epsilon", 1e-5),  # GPT2Config's default
        "mlp_hidden_dim": hf_config.get("n_inner"),  # None: 4 x n_embd, in both
        "mlp": "relu2" if activation == "relu2" else "gelu",
    }, source=source)


def llama_model_config(hf_config, source):
    """model.json for a transformers LlamaConfig dict; UserError for what gpt.py cannot do.
    Defaults are LlamaConfig's."""
    require = requirement(source)
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "max_position_embeddings",
                "vocab_size", "intermediate_size"):
        require(isinstance(hf_config.get(key), int), f"needs an integer '{key}'")
    emb_dim, n_heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    activation = hf_config.get("hidden_act", "silu")
    require(activation in SILUS, f"hidden_act {json.dumps(activation)}: gpt.py's SwiGLU uses SiLU "
                                 f"({', '.join(SILUS)})")
    head_dim = hf_config.get("head_dim")
    require(head_dim in (None, emb_dim // n_heads),
            f"head_dim {head_dim}: gpt.py's heads are hidden_size / num_attention_heads "
            f"({emb_dim} / {n_heads}) wide")
    attention_bias, mlp_bias = hf_config.get("attention_bias", False), hf_config.get("mlp_bias", False)
    require(attention_bias == mlp_bias,
            f"attention_bias {json.dumps(attention_bias)} with mlp_bias {json.dumps(mlp_bias)}: gpt.py's "
            f"`bias` covers both o_proj and the MLP, so they must be equal")
    return ModelConfig.from_dict({
        "vocab_size": hf_config["vocab_size"],
        "context_length": hf_config["max_position_embeddings"],
        "emb_dim": emb_dim,
        "n_heads": n_heads,
        "n_layers": hf_config["num_hidden_layers"],
        "drop_rate": 0.0,  # as Llama is pre-trained: its one dropout, attention_dropout, is 0
        "qkv_bias": attention_bias,
        "tie_weights": hf_config.get("tie_word_embeddings", False),
        "pos_emb": "rope",
        "rope_theta": llama_rope_theta(hf_config, require),
        "norm": "rmsnorm",
        "norm_eps": hf_config.get("rms_norm_eps", 1e-6),
        "mlp": "swiglu",
        "mlp_hidden_dim": hf_config["intermediate_size"],
        "n_kv_heads": hf_config.get("num_key_value_heads") or n_heads,
        "bias": mlp_bias,
        "init_std": hf_config.get("initializer_range", 0.02),
    }, source=source)


def llama_rope_theta(hf_config, require):
    """RoPE's base, from either spelling: transformers 5's `rope_parameters`, or the
    `rope_theta` and `rope_scaling` of earlier versions (most Hub checkpoints). Any
    scaling (Llama 3.1's "llama3", "linear", "yarn", ...) is refused: gpt.py has none."""
    for key in ("rope_scaling", "rope_parameters"):
        parameters = hf_config.get(key) or {}
        unscaled = isinstance(parameters, dict) and parameters.get("rope_type", parameters.get("type")) in (
            None, "default")
        require(unscaled, f"{key} {json.dumps(parameters)}: gpt.py's RoPE has no scaling "
                          f"(only rope_type \"default\")")
    return (hf_config.get("rope_parameters") or {}).get("rope_theta", hf_config.get("rope_theta", 10000.0))


# ---------------------------------------------------------------- model.json -> config.json

def gpt2_hf_config(cfg, eot_id):
    """transformers' GPT2Config (config.json) for our ModelConfig."""
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_head": cfg.n_heads,
        "n_layer": cfg.n_layers,
        "n_inner": cfg.mlp_hidden_dim,
        "activation_function": GPT2_ACTIVATIONS[cfg.mlp],
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "initializer_range": cfg.init_std or 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_weights,
    }
    if eot_id is not None:
        config["bos_token_id"] = config["eos_token_id"] = eot_id
    return config


def llama_hf_config(cfg, eot_id):
    """transformers' LlamaConfig (config.json) for our ModelConfig. Llama has no residual
    or embedding dropout for our drop_rate, and leaves its attention dropout at 0."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.context_length,
        "hidden_size": cfg.emb_dim,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": cfg.n_layers,
        "intermediate_size": cfg.ff_hidden_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters; transformers 4, which other tools still
        # run, reads rope_theta and rope_scaling.
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": llama_attention_bias(cfg),
        "mlp_bias": cfg.bias,
        "initializer_range": cfg.init_std or 0.02,
        "tie_word_embeddings": cfg.tie_weights,
        # Written even when unknown: LlamaConfig's defaults (1, 2) are Llama's own tokenizer's.
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
    }


# ---------------------------------------------------------------- the two families

@dataclass(frozen=True)
class Family:
    """A transformers model class, and how its checkpoints map to ours."""
    name: str
    hf_class: str
    model_type: str  # config.json's
    shape: dict  # model.json's architecture choices: the values of each that the class has
    grouped_query_attention: bool  # whether n_kv_heads may be below n_heads
    key_prefix: str  # before every Hugging Face key but lm_head's
    buffers: re.Pattern  # what older checkpoints store besides the weights
    model_config: Callable  # (config.json's dict, source) -> ModelConfig
    hf_config: Callable  # (ModelConfig, end-of-text id or None) -> config.json's dict
    hf_to_ours: Callable  # (Hugging Face state dict without key_prefix, ModelConfig) -> ours
    ours_to_hf: Callable  # (our state dict, ModelConfig) -> Hugging Face state dict


GPT2 = Family(name="GPT-2", hf_class="GPT2LMHeadModel", model_type="gpt2",
              shape={"pos_emb": ("learned",), "norm": ("layernorm",), "mlp": tuple(GPT2_ACTIVATIONS)},
              grouped_query_attention=False,
              key_prefix="transformer.", buffers=re.compile(r"(^|\.)attn\.(bias|masked_bias)$"),  # causal masks
              model_config=gpt2_model_config, hf_config=gpt2_hf_config,
              hf_to_ours=gpt2_hf_to_ours, ours_to_hf=gpt2_ours_to_hf)
LLAMA = Family(name="Llama", hf_class="LlamaForCausalLM", model_type="llama",
               shape={"pos_emb": ("rope",), "norm": ("rmsnorm",), "mlp": ("swiglu",)}, grouped_query_attention=True,
               key_prefix="model.", buffers=re.compile(r"\.rotary_emb\.inv_freq$"),  # RoPE's frequencies
               model_config=llama_model_config, hf_config=llama_hf_config,
               hf_to_ours=llama_hf_to_ours, ours_to_hf=llama_ours_to_hf)
FAMILIES = (GPT2, LLAMA)


def hf_family(hf_config, source):
    """The family of a transformers config.json: its model_type or, where it has none,
    its architectures; GPT-2 when it names neither, as convert_gpt2.py always assumed."""
    named = [family for family in FAMILIES if family.hf_class in (hf_config.get("architectures") or [])]
    model_type = hf_config.get("model_type", named[0].model_type if named else GPT2.model_type)
    for family in FAMILIES:
        if family.model_type == model_type:
            return family
    known = ", ".join(f"{json.dumps(f.model_type)} ({f.hf_class})" for f in FAMILIES)
    raise UserError(f"{source}: model_type {json.dumps(model_type)}: convert_gpt2.py converts {known}")


def family_for(cfg, source):
    """The family whose transformers class holds a model of this ModelConfig; UserError
    for the mixtures and switches that neither does."""
    for key, feature in UNCONVERTIBLE_SWITCHES.items():
        value = getattr(cfg, key)
        if value not in (False, None):
            raise UserError(f"{source}: {key} {json.dumps(value)}: neither "
                            f"{' nor '.join(f.hf_class for f in FAMILIES)} has {feature}")
    shape = {key: getattr(cfg, key) for key in ARCHITECTURE_CHOICES}
    family = next((family for family in FAMILIES
                   if all(value in family.shape[key] for key, value in shape.items())), None)
    if family is None:
        known = " nor ".join(f"{f.name} ({spelled(f.shape)})" for f in FAMILIES)
        raise UserError(f"{source}: {spelled(shape)} is neither {known}: no transformers class has it")
    if cfg.kv_heads != cfg.n_heads and not family.grouped_query_attention:
        raise UserError(f"{source}: n_kv_heads {cfg.n_kv_heads} below n_heads {cfg.n_heads}: "
                        f"{family.hf_class} has no grouped-query attention")
    return family


def spelled(choices):
    """model.json keys and values as a message names them: `pos_emb "rope", mlp "gelu" or "relu2"`
    (a tuple of values is the choices allowed)."""
    return ", ".join(f"{key} {' or '.join(json.dumps(v) for v in (value if isinstance(value, tuple) else (value,)))}"
                     for key, value in choices.items())


# ---------------------------------------------------------------- from-hf

def read_hf_weights(hf_dir):
    """The state dict of a transformers checkpoint: model.safetensors, a sharded
    model.safetensors.index.json, or pytorch_model.bin."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(load_json(index).get("weight_map", {}).values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (hf_dir / "pytorch_model.bin").is_file():
        try:
            return torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise UserError(f"{hf_dir / 'pytorch_model.bin'}: not a readable PyTorch state dict ({one_line(e)})")
    else:
        raise UserError(f"{hf_dir}: no model.safetensors or pytorch_model.bin")
    state = {}
    for name in files:
        try:
            state.update(load_file(hf_dir / name))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{hf_dir / name}: not a readable safetensors file ({one_line(e)})")
    return state


def normalize_hf_keys(state, family):
    """Drop the prefix the *LMHeadModel / *ForCausalLM classes add (the bare models, and
    OpenAI's original GPT-2 upload, lack it) and the buffers older files hold."""
    return {key.removeprefix(family.key_prefix): value for key, value in state.items()
            if not family.buffers.search(key)}


def download_hf_checkpoint(repo_id):
    """Download just what from-hf reads: config.json and the safetensors weights,
    or pytorch_model.bin when a repo has no safetensors."""
    try:
        local = Path(snapshot_download(repo_id, allow_patterns=[
            "config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]))
        if not any(local.glob("*.safetensors")):
            local = Path(snapshot_download(repo_id, allow_patterns=["config.json", "pytorch_model.bin"]))
    except OSError as e:  # huggingface_hub's errors (offline, unknown repo, gated) are OSErrors
        raise UserError(f"'{repo_id}' is not a local directory and could not be downloaded "
                        f"from the Hugging Face Hub: {hub_failure_reason(e, 'model')}") from e
    return local


def check_fits(ours, cfg, source):
    """UserError unless every tensor has GPTModel(cfg)'s shape for it (the model is
    built on the meta device, which allocates no memory)."""
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in GPTModel(cfg).state_dict().items()}
    wrong = [f"{key} is {tuple(ours[key].shape)}, expected {shape}"
             for key, shape in expected.items() if tuple(ours[key].shape) != shape]
    if wrong:
        raise UserError(f"{source}: the weights do not fit its config.json: {'; '.join(wrong[:3])}")


def load_hf_checkpoint(source):
    """(ModelConfig, our state dict) for a transformers GPT2LMHeadModel or LlamaForCausalLM
    checkpoint: `source` is its directory or a Hub repo id (downloaded). UserError for
    what gpt.py cannot represent. from-hf is this plus writing the two files."""
    hf_dir = Path(source) if Path(source).is_dir() else download_hf_checkpoint(source)
    config_json = hf_dir / "config.json"
    hf_config = load_json(config_json)
    if not isinstance(hf_config, dict):
        raise UserError(f"{config_json}: expected a JSON object")
    family = hf_family(hf_config, config_json)
    cfg = family.model_config(hf_config, str(config_json))
    hf = normalize_hf_keys(read_hf_weights(hf_dir), family)
    try:
        ours = family.hf_to_ours(hf, cfg)
    except KeyError as e:
        raise UserError(f"{hf_dir}: the weights lack {e.args[0]} for this config")
    check_fits(ours, cfg, hf_dir)
    return cfg, ours


def convert_from_hf(source, out_dir):
    cfg, ours = load_hf_checkpoint(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(ours, out_dir / "model.safetensors")
    (out_dir / "model.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return cfg


# ---------------------------------------------------------------- to-hf

def write_gpt2_tokenizer(out_dir, context_length):
    """vocab.json, merges.txt and their configs, from tiktoken's cache (or its
    download). Returns why not when the files cannot be had."""
    try:
        vocab_json = read_file_cached(GPT2_ENCODER_JSON_URL)
        merges_txt = read_file_cached(GPT2_VOCAB_BPE_URL)
    except OSError as e:  # not cached and no network
        return f"the GPT-2 BPE files are not in tiktoken's cache and could not be downloaded ({one_line(e)})"
    (out_dir / "vocab.json").write_bytes(vocab_json)
    (out_dir / "merges.txt").write_bytes(merges_txt)
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": context_length,
                        "add_prefix_space": False, **special}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return None


def convert_to_hf(source, out_dir, tokenizer_name, datasets_dir, repo_id=None, license_id=None):
    """Write `source` (a model_source.ModelSource) into `out_dir` as a transformers model
    with its tokenizer files (where transformers has its tokenizer) and model card."""
    cfg = source.config  # with its real drop_rate for the HF config
    family = family_for(cfg, source.config_source)
    model = load_model(source, "cpu")
    if tokenizer_name is None:
        tokenizer_name, _ = tokenizer_name_for(source, datasets_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(family.ours_to_hf(model.state_dict(), cfg), out_dir / "model.safetensors",
                     metadata={"format": "pt"})  # transformers requires the format tag
    eot_id = EOT_IDS.get(tokenizer_name)
    if eot_id is not None and eot_id >= cfg.vocab_size:
        missing, eot_id = f"vocab_size {cfg.vocab_size} is too small for tokenizer '{tokenizer_name}'", None
    elif tokenizer_name == "gpt2":
        missing = write_gpt2_tokenizer(out_dir, cfg.context_length)
    else:
        missing = f"transformers has no tokenizer matching '{tokenizer_name}'"
    if missing:
        print(f"note: no tokenizer files written: {missing}")
    (out_dir / "config.json").write_text(json.dumps(family.hf_config(cfg, eot_id), indent=2) + "\n")
    location = repo_id or str(out_dir)
    tokenizer_location = (None if tokenizer_name != "gpt2" else
                          GPT2_HUB_TOKENIZER if missing else location)
    card = model_card(source, family, repo_id or source.name, location, tokenizer_name, tokenizer_location,
                      license_id, datasets_dir)
    card.save(out_dir / "README.md")
