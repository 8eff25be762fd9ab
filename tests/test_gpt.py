"""gpt.py against an independent, deliberately naive implementation of the same
architecture: plain_gpt.PlainGPT, the book's code (explicit mask, hand-written softmax
attention, LayerNorm and GELU)."""

import pytest
import torch
from safetensors.torch import save_file

from plain_gpt import PlainGPT
from checkpointing import load_model_weights
from config import ModelConfig
from errors import UserError
from gpt import GPTModel, generate

SMALL = dict(vocab_size=61, context_length=16, emb_dim=24, n_heads=3, n_layers=2, drop_rate=0.0,
             qkv_bias=True)


def plain_gpt_like(model):
    """The book's implementation (plain_gpt.PlainGPT) holding `model`'s weights."""
    plain = PlainGPT(model.cfg).eval()
    plain.load_state_dict(model.state_dict())
    return plain


def randomized(cfg):
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    # Non-trivial LayerNorm parameters, so a swapped scale/shift would show.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith((".scale", ".shift")):
                param.normal_(mean=1.0 if name.endswith("scale") else 0.0, std=0.2)
    return model


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_logits_match_naive_implementation(qkv_bias):
    cfg = {**SMALL, "qkv_bias": qkv_bias}
    model = randomized(cfg)
    idx = torch.randint(0, cfg["vocab_size"], (3, cfg["context_length"]))
    logits = model(idx)
    assert logits.shape == (3, cfg["context_length"], cfg["vocab_size"])
    expected = plain_gpt_like(model)(idx)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_state_dict_keys_are_the_reference_harness_names():
    keys = set(GPTModel({**SMALL, "n_layers": 1, "qkv_bias": False}).state_dict())
    expected = {
        "tok_emb.weight", "pos_emb.weight",
        "trf_blocks.0.att.W_query.weight", "trf_blocks.0.att.W_key.weight", "trf_blocks.0.att.W_value.weight",
        "trf_blocks.0.att.out_proj.weight", "trf_blocks.0.att.out_proj.bias",
        "trf_blocks.0.ff.layers.0.weight", "trf_blocks.0.ff.layers.0.bias",
        "trf_blocks.0.ff.layers.2.weight", "trf_blocks.0.ff.layers.2.bias",
        "trf_blocks.0.norm1.scale", "trf_blocks.0.norm1.shift",
        "trf_blocks.0.norm2.scale", "trf_blocks.0.norm2.shift",
        "final_norm.scale", "final_norm.shift", "out_head.weight",
    }
    assert keys == expected
    with_bias = set(GPTModel({**SMALL, "n_layers": 1, "qkv_bias": True}).state_dict())
    assert with_bias - keys == {f"trf_blocks.0.att.{n}.bias" for n in ("W_query", "W_key", "W_value")}


def test_changing_a_later_token_never_changes_earlier_logits():
    model = randomized(SMALL)
    idx = torch.randint(0, SMALL["vocab_size"], (1, SMALL["context_length"]))
    for position in (0, 5, SMALL["context_length"] - 1):
        changed = idx.clone()
        changed[0, position] = (changed[0, position] + 1) % SMALL["vocab_size"]
        before, after = model(idx), model(changed)
        torch.testing.assert_close(before[:, :position], after[:, :position], rtol=0, atol=0)
        assert not torch.allclose(before[:, position], after[:, position])


def test_tied_weights_share_one_tensor_and_count_once():
    untied = GPTModel({**SMALL, "tie_weights": False})
    tied = GPTModel({**SMALL, "tie_weights": True})
    assert tied.out_head.weight is tied.tok_emb.weight
    embedding_params = SMALL["vocab_size"] * SMALL["emb_dim"]
    assert untied.num_parameters() - tied.num_parameters() == embedding_params


def test_reference_checkpoint_with_legacy_mask_buffer_loads(tmp_path):
    source = randomized(SMALL)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    ctx = SMALL["context_length"]
    for i in range(SMALL["n_layers"]):
        state[f"trf_blocks.{i}.att.mask"] = torch.triu(torch.ones(ctx, ctx), diagonal=1)
    save_file(state, tmp_path / "model.safetensors")
    loaded = load_model_weights(GPTModel(SMALL).eval(), tmp_path / "model.safetensors")
    idx = torch.randint(0, SMALL["vocab_size"], (2, 8))
    torch.testing.assert_close(loaded(idx), source(idx), rtol=0, atol=0)


def test_weights_for_another_config_are_refused(tmp_path):
    save_file(GPTModel(SMALL).state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="does not fit this model config"):
        load_model_weights(GPTModel({**SMALL, "emb_dim": 30}), tmp_path / "model.safetensors")


def test_sequence_longer_than_context_is_refused():
    with pytest.raises(ValueError, match="exceeds context_length"):
        GPTModel(SMALL)(torch.zeros(1, SMALL["context_length"] + 1, dtype=torch.long))


# ---------------------------------------------------------------- generate

def test_greedy_generation_is_repeated_argmax_with_context_cropping():
    model = randomized(SMALL)
    prompt = torch.randint(0, SMALL["vocab_size"], (1, 12))
    out = generate(model, prompt, max_new_tokens=10, temperature=0.0)
    plain = plain_gpt_like(model)
    expected = prompt.clone()
    for _ in range(10):
        window = expected[:, -SMALL["context_length"]:]
        next_id = plain(window)[0, -1].argmax()
        expected = torch.cat([expected, next_id.view(1, 1)], dim=1)
    assert torch.equal(out, expected)


def test_generation_stops_at_end_of_text():
    model = randomized(SMALL)
    prompt = torch.randint(0, SMALL["vocab_size"], (1, 4))
    first = generate(model, prompt, max_new_tokens=1)[0, -1].item()
    out = generate(model, prompt, max_new_tokens=10, eos_id=first)
    assert out.shape[1] == prompt.shape[1] + 1 and out[0, -1].item() == first


def test_top_k_sampling_only_draws_from_the_k_most_likely():
    model = randomized(SMALL)
    prompt = torch.randint(0, SMALL["vocab_size"], (1, 4))
    top3 = set(torch.topk(model(prompt)[0, -1], 3).indices.tolist())
    generator = torch.Generator().manual_seed(1)
    draws = {generate(model, prompt, 1, temperature=5.0, top_k=3, generator=generator)[0, -1].item()
             for _ in range(60)}
    assert draws <= top3 and len(draws) > 1
    # top_k=1 at any temperature is greedy.
    assert torch.equal(generate(model, prompt, 5, temperature=2.0, top_k=1, generator=generator),
                       generate(model, prompt, 5))


def test_seeded_sampling_is_reproducible():
    model = randomized(SMALL)
    prompt = torch.randint(0, SMALL["vocab_size"], (1, 4))
    runs = [generate(model, prompt, 8, temperature=1.4, top_k=25, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(*runs)


# ---------------------------------------------------------------- model.json validation

@pytest.mark.parametrize("change, message", [
    ({"emb_dim": 25}, "key 'emb_dim' (25) must be divisible by n_heads (3)"),
    ({"n_layers": 0}, "key 'n_layers' must be positive"),
    ({"vocab_size": "50257"}, "key 'vocab_size' must be an integer, got \"50257\""),
    ({"qkv_bias": 1}, "key 'qkv_bias' must be true or false"),
    ({"n_layer": 2}, "unknown key 'n_layer' (did you mean 'n_layers'?)"),
    ({"drop_rate": 1.5}, "key 'drop_rate' must be in [0, 1)"),
])
def test_model_config_errors_name_the_key(change, message):
    with pytest.raises(UserError) as error:
        ModelConfig.from_dict({**SMALL, **change}, source="runs/x/model.json")
    assert message in str(error.value) and str(error.value).startswith("runs/x/model.json: ")


def test_model_config_missing_key_and_defaults():
    with pytest.raises(UserError, match="missing required key 'n_heads'"):
        ModelConfig.from_dict({k: v for k, v in SMALL.items() if k != "n_heads"})
    minimal = ModelConfig.from_dict({k: SMALL[k] for k in ("vocab_size", "context_length", "emb_dim",
                                                           "n_heads", "n_layers")})
    assert (minimal.drop_rate, minimal.qkv_bias, minimal.tie_weights) == (0.1, False, False)
