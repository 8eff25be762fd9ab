"""convert_gpt2.py's Llama family: round trips through transformers' LlamaForCausalLM
(used here only, never by the script), compared on logits. Grouped-query attention,
a non-default rope_theta and rms_norm_eps throughout, so a wrong mapping shows."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evalkit import one_torch_thread  # noqa: F401  (autouse fixture)
from evalkit import assert_one_error_line, run_script

import convert_gpt2
from eval_common import load_model
from gpt import GPTModel

TOKENS = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))


def llama_config(**overrides):
    return LlamaConfig(**{"vocab_size": 100, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32,
                          "rope_theta": 5000.0, "rms_norm_eps": 1e-3, **overrides})


def random_hf_llama(**overrides):
    torch.manual_seed(1)
    model = LlamaForCausalLM(llama_config(**overrides))
    with torch.no_grad():  # RMSNorm scales and biases start at 1 and 0: make them matter
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model.eval()


def logits(model):
    with torch.no_grad():
        output = model(TOKENS)
    return getattr(output, "logits", output)


def convert(*args):
    result = run_script("convert_gpt2.py", *args)
    assert result.returncode == 0, result.stderr
    return result


def load_ours(directory):
    return load_model(directory / "model.json", directory / "model.safetensors", "cpu")


@pytest.mark.parametrize("tie, biases", [(True, False), (False, True)])
def test_from_hf_gives_the_same_logits(tmp_path, tie, biases):
    hf = random_hf_llama(tie_word_embeddings=tie, attention_bias=biases, mlp_bias=biases)
    hf.save_pretrained(tmp_path / "hf")
    convert("from-hf", tmp_path / "hf", tmp_path / "ours")

    config = json.loads((tmp_path / "ours" / "model.json").read_text())
    assert config == {"vocab_size": 100, "context_length": 32, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
                      "drop_rate": 0.0, "qkv_bias": biases, "tie_weights": tie, "pos_emb": "rope",
                      "rope_theta": 5000.0, "norm": "rmsnorm", "norm_eps": 1e-3, "mlp": "swiglu",
                      "mlp_hidden_dim": 48, "n_kv_heads": 2, "init_std": 0.02,
                      **({} if biases else {"bias": False})}  # model.json leaves out bias at its default
    torch.testing.assert_close(logits(load_ours(tmp_path / "ours")), logits(hf), atol=1e-4, rtol=0)


def test_load_hf_checkpoint_reads_older_files(tmp_path):
    # What transformers 4 wrote and most Hub checkpoints hold: rope_theta and rope_scaling
    # instead of rope_parameters, and (before 4.31) pytorch_model.bin with RoPE's buffers.
    hf = random_hf_llama()
    (tmp_path / "hf").mkdir()
    state = dict(hf.state_dict())
    for i in range(2):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = hf.model.rotary_emb.inv_freq
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    config = hf.config.to_dict()
    del config["rope_parameters"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "rope_theta": 5000.0, "rope_scaling": None}))

    cfg, state_dict = convert_gpt2.load_hf_checkpoint(str(tmp_path / "hf"))
    ours = GPTModel(cfg).eval()
    ours.load_state_dict(state_dict)
    torch.testing.assert_close(logits(ours), logits(hf), atol=1e-4, rtol=0)


LLAMA_31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("key, value, fragment", [
    ("rope_scaling", LLAMA_31_SCALING, 'rope_scaling {"rope_type": "llama3"'),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
     'rope_parameters {"rope_type": "linear"'),
    ("head_dim", 16, "head_dim 16"),
    ("hidden_act", "gelu", 'hidden_act "gelu"'),
    ("mlp_bias", True, "attention_bias false with mlp_bias true"),
    ("model_type", "mistral", 'model_type "mistral"'),
])
def test_from_hf_refuses_what_gpt_py_cannot_represent(tmp_path, key, value, fragment):
    (tmp_path / "hf").mkdir()
    config = {**llama_config().to_dict(), key: value}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    result = run_script("convert_gpt2.py", "from-hf", tmp_path / "hf", tmp_path / "out")
    assert_one_error_line(result, "config.json: ", fragment)
