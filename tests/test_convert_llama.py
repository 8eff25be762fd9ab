"""convert_gpt2.py's Llama family: round trips through transformers' LlamaForCausalLM
(used here only, never by the script), compared on logits. Grouped-query attention,
a non-default rope_theta and rms_norm_eps throughout, so a wrong mapping shows."""

import json

import pytest
import tiktoken
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from evalkit import one_torch_thread  # noqa: F401  (autouse fixture)
from evalkit import assert_one_error_line, load_model, run_script, tiny_config, write_model

import hf_convert
from gpt import GPTModel

TOKENS = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))


def llama_config(**overrides):
    return LlamaConfig(**{"vocab_size": 100, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32,
                          "rope_theta": 5000.0, "rms_norm_eps": 1e-3, **overrides})


# model.json for the same architecture as llama_config()
LLAMA_SHAPED = {"vocab_size": 100, "context_length": 32, "emb_dim": 32, "n_heads": 4, "n_kv_heads": 2,
                "pos_emb": "rope", "rope_theta": 5000.0, "norm": "rmsnorm", "norm_eps": 1e-3, "mlp": "swiglu",
                "mlp_hidden_dim": 48}


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

    cfg, state_dict = hf_convert.load_hf_checkpoint(str(tmp_path / "hf"))
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


@pytest.mark.parametrize("tie, qkv_bias, bias", [(True, False, False), (False, False, True), (True, True, False)])
def test_to_hf_gives_the_same_logits(tmp_path, tie, qkv_bias, bias):
    cfg = tiny_config(**LLAMA_SHAPED, tie_weights=tie, qkv_bias=qkv_bias, bias=bias)
    model_json, weights, ours = write_model(tmp_path / "run", cfg)
    convert("to-hf", model_json, weights, tmp_path / "hf")

    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(logits(hf), logits(ours), atol=1e-4, rtol=0)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["architectures"], config["tie_word_embeddings"]) == (["LlamaForCausalLM"], tie)
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) is tie
    # LlamaConfig's one attention_bias covers q, k, v and o: zeros fill in for the ones we lack.
    assert (config["attention_bias"], config["mlp_bias"]) == (qkv_bias or bias, bias)
    stored = load_file(tmp_path / "hf" / "model.safetensors")
    if bias and not qkv_bias:
        assert not stored["model.layers.1.self_attn.k_proj.bias"].any()
    if qkv_bias and not bias:
        assert not stored["model.layers.1.self_attn.o_proj.bias"].any()


def test_to_hf_writes_gpt2_tokenizer_and_model_card(tmp_path):
    cfg = tiny_config(**{**LLAMA_SHAPED, "vocab_size": 50257, "emb_dim": 16})
    model_json, weights, _ = write_model(tmp_path / "my-run", cfg)
    convert("to-hf", model_json, weights, tmp_path / "hf", "--tokenizer", "gpt2")

    text = "Every effort moves you, said Mr. Gisburn."
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")(text).input_ids == tiktoken.get_encoding("gpt2").encode(text)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == 50256  # not LlamaConfig's 1 and 2
    assert "LlamaForCausalLM.from_pretrained" in (tmp_path / "hf" / "README.md").read_text()


@pytest.mark.parametrize("overrides, fragment", [
    ({"pos_emb": "rope"}, 'pos_emb "rope", norm "layernorm", mlp "gelu" is neither GPT-2'),
    ({"mlp": "swiglu"}, 'pos_emb "learned", norm "layernorm", mlp "swiglu" is neither GPT-2'),
    ({"n_kv_heads": 1}, "n_kv_heads 1 below n_heads 2: GPT2LMHeadModel has no grouped-query attention"),
])
def test_to_hf_refuses_what_no_transformers_class_holds(tmp_path, overrides, fragment):
    model_json, weights, _ = write_model(tmp_path / "run", tiny_config(**overrides))
    result = run_script("convert_gpt2.py", "to-hf", model_json, weights, tmp_path / "hf")
    assert_one_error_line(result, "model.json: ", fragment)
    assert not (tmp_path / "hf").exists()
