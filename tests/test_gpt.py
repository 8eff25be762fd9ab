"""gpt.py against an independent, deliberately naive implementation of the same
architecture: plain_gpt.PlainGPT, the book's code (explicit mask, hand-written softmax
attention, LayerNorm and GELU)."""

import pytest
import torch
from safetensors.torch import save_file

from evalkit import one_torch_thread  # noqa: F401  (autouse fixture: tiny models run fastest on one thread)
from plain_gpt import PlainGPT
from checkpointing import load_model_weights
from config import ModelConfig
from errors import UserError
from gpt import GPTModel, KVCache, generate

SMALL = dict(vocab_size=61, context_length=16, emb_dim=24, n_heads=3, n_layers=2, drop_rate=0.0,
             qkv_bias=True)
LLAMA_SMALL = dict(vocab_size=61, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                   pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, bias=False, tie_weights=True)
# The modded-nanogpt switches on (docs/architecture-options.md), with a soft cap well inside
# these models' logit range, so that generating without it would pick other tokens.
SWITCHES_SMALL = dict(LLAMA_SMALL, n_layers=3, qk_norm=True, mlp="relu2", logit_softcap=1.0, unet_skips=True)
GENERATION_CONFIGS = {"gpt2": SMALL, "llama": LLAMA_SMALL, "switches": SWITCHES_SMALL}


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

def reference_generate(plain, context_length, prompt, steps, temperature=0.0, top_k=None, eos_id=None,
                       generator=None):
    """generate's loop without a cache, written plainly: every step runs PlainGPT over the whole
    window (the last context_length tokens, at positions from 0)."""
    ids, finished = prompt.clone(), torch.zeros(len(prompt), dtype=torch.bool)
    for _ in range(steps):
        logits = plain(ids[:, -context_length:])[:, -1]
        if temperature == 0:
            next_ids = logits.argmax(dim=-1)
        else:
            threshold = torch.topk(logits, top_k).values[:, -1:]
            probs = torch.softmax(torch.where(logits < threshold, float("-inf"), logits) / temperature, dim=-1)
            next_ids = torch.multinomial(probs, 1, generator=generator)[:, 0]
        if eos_id is not None:
            next_ids = torch.where(finished, eos_id, next_ids)
            finished |= next_ids == eos_id
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        if finished.all():
            break
    return ids


def generated_both_ways(model, prompt, steps, **sampling):
    """(generate's output with the KV cache, without it, the plain reference's), each sampling
    from its own generator with the same seed."""
    def generator():
        return torch.Generator().manual_seed(7)
    cached = generate(model, prompt, steps, generator=generator(), **sampling)
    uncached = generate(model, prompt, steps, generator=generator(), use_cache=False, **sampling)
    reference = reference_generate(plain_gpt_like(model), model.cfg.context_length, prompt, steps,
                                   generator=generator(), **sampling)
    return cached, uncached, reference


# Past context_length (16) the window slides: 5 prompt tokens + 20 new ones.
@pytest.mark.parametrize("cfg", GENERATION_CONFIGS.values(), ids=GENERATION_CONFIGS.keys())
@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.4, "top_k": 25}], ids=["greedy", "top-k"])
def test_cached_generation_is_token_for_token_the_full_recomputation(cfg, sampling):
    model = randomized(cfg)
    prompts = torch.randint(0, cfg["vocab_size"], (2, 5))
    cached, uncached, reference = generated_both_ways(model, prompts, 20, **sampling)
    assert cached.shape == (2, 25)
    assert torch.equal(cached, uncached) and torch.equal(cached, reference)


@pytest.mark.parametrize("cfg", GENERATION_CONFIGS.values(), ids=GENERATION_CONFIGS.keys())
def test_cached_generation_stops_at_end_of_text_as_the_full_recomputation(cfg):
    model = randomized(cfg)
    prompts = torch.randint(0, cfg["vocab_size"], (2, 5))
    eos_id = generate(model, prompts, 3)[0, -1].item()  # row 0's third token
    cached, uncached, reference = generated_both_ways(model, prompts, 10, eos_id=eos_id)
    assert cached[0, -1] == eos_id
    assert torch.equal(cached, uncached) and torch.equal(cached, reference)


@pytest.mark.parametrize("cfg", GENERATION_CONFIGS.values(), ids=GENERATION_CONFIGS.keys())
def test_chunks_after_cached_positions_attend_causally(cfg):
    """Prefill, a chunk of 3 tokens (each must see the cache and its own predecessors only),
    then one token: each time the logits of a full forward pass over everything so far."""
    model = randomized(cfg)
    idx = torch.randint(0, cfg["vocab_size"], (2, 9))
    kv_caches = [KVCache(cfg["context_length"]) for _ in range(cfg["n_layers"])]
    for start, end in ((0, 5), (5, 8), (8, 9)):
        logits = model.next_token_logits(idx[:, start:end], kv_caches)
        torch.testing.assert_close(logits, model(idx[:, :end])[:, -1], rtol=1e-5, atol=1e-5)
    # Grouped-query attention caches its n_kv_heads heads, not n_heads copies.
    assert kv_caches[0].keys.shape == (2, model.cfg.kv_heads, cfg["context_length"], model.cfg.head_dim)


def test_train_mode_generates_without_the_cache():
    """In train mode each step recomputes every position under fresh dropout masks."""
    model = randomized({**SMALL, "drop_rate": 0.5}).train()
    prompt = torch.randint(0, SMALL["vocab_size"], (1, 4))
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(3)  # dropout masks come from the global generator
        outputs.append(generate(model, prompt, 8, temperature=1.0, use_cache=use_cache,
                                generator=torch.Generator().manual_seed(7)))
    assert torch.equal(*outputs)
    with pytest.raises(RuntimeError, match="eval mode"):
        model.next_token_logits(prompt, [KVCache(SMALL["context_length"]) for _ in range(SMALL["n_layers"])])


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
