"""model.json's architecture options (RoPE, RMSNorm, SwiGLU, grouped-query attention, no
biases, and the modded-nanogpt switches: tests/test_architecture_switches.py has more on
those) against plain_gpt's independent implementations, the Llama-3-style seed model's
size, and the memory levers (activation checkpointing, chunked loss) against the plain path."""

import json

import pytest
import torch

import perf
from config import ModelConfig
from errors import UserError
from gpt import GPTModel
from plain_gpt import PlainGPT

BASE = dict(vocab_size=61, context_length=16, emb_dim=24, n_heads=4, n_layers=2, drop_rate=0.0)
LLAMA_LIKE = dict(pos_emb="rope", rope_theta=500000.0, norm="rmsnorm", mlp="swiglu", mlp_hidden_dim=40,
                  n_kv_heads=2, bias=False, tie_weights=True)
# The modded-nanogpt switches together, with 4 layers so that a U-net skip to the wrong
# mirror image would show.
SWITCHES = dict(qk_norm=True, mlp="relu2", zero_init_projections=True, logit_softcap=1.0, unet_skips=True,
                n_layers=4, pos_emb="rope", norm="rmsnorm", bias=False)
OPTIONS = [{"pos_emb": "rope"}, {"norm": "rmsnorm"}, {"mlp": "swiglu"}, {"mlp": "gelu", "mlp_hidden_dim": 40},
           {"n_kv_heads": 1}, {"n_kv_heads": 2, "qkv_bias": True}, {"bias": False}, LLAMA_LIKE,
           {"qk_norm": True}, {"qk_norm": True, "pos_emb": "rope", "n_kv_heads": 2}, {"mlp": "relu2"},
           {"mlp": "relu2", "mlp_hidden_dim": 40, "bias": False}, {"zero_init_projections": True},
           {"logit_softcap": 1.0}, {"unet_skips": True, "n_layers": 4}, {"unet_skips": True, "n_layers": 3},
           {**LLAMA_LIKE, "logit_softcap": 1.0, "qk_norm": True}, SWITCHES]

# "How to Train an LLM, part 1": the Llama-3-style 1.2B model, as model.json keys.
SEED_MODEL = dict(vocab_size=2**17, context_length=2048, emb_dim=2048, n_heads=32, n_layers=16, drop_rate=0.0,
                  n_kv_heads=8, mlp="swiglu", mlp_hidden_dim=8192, pos_emb="rope", rope_theta=500000.0,
                  norm="rmsnorm", norm_eps=1e-5, tie_weights=True, bias=False)


def random_model(cfg, seed=0):
    """Every parameter random (norm scales and shifts too), so a misplaced one shows."""
    torch.manual_seed(seed)
    model = GPTModel(cfg)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_logits_match_the_plain_implementation(options):
    model = random_model({**BASE, **options}).eval()
    plain = PlainGPT(model.cfg).eval()
    plain.load_state_dict(model.state_dict())
    idx = torch.randint(0, BASE["vocab_size"], (2, BASE["context_length"]))
    torch.testing.assert_close(model(idx), plain(idx), rtol=1e-5, atol=1e-5)
    # Shorter sequences start at position 0 too.
    torch.testing.assert_close(model(idx[:, :5]), plain(idx[:, :5]), rtol=1e-5, atol=1e-5)


def test_seed_model_has_exactly_the_published_parameter_count():
    with torch.device("meta"):  # no allocation
        model = GPTModel(SEED_MODEL)
    assert model.num_parameters() == 1_241_581_568
    assert sum(p.numel() for p in model.parameters()) == 1_241_581_568
    assert perf.parameter_count(model.cfg) == 1_241_581_568


@pytest.mark.parametrize("options", [{}, *OPTIONS, {"qkv_bias": True, "tie_weights": True}])
def test_parameter_count_formula_counts_the_built_model(options):
    cfg = ModelConfig.from_dict({**BASE, **options})
    assert perf.parameter_count(cfg) == sum(p.numel() for p in GPTModel(cfg).parameters())


def test_seed_model_training_flops_by_hand():
    # Per layer: query + output 2 * 2048^2 = 8,388,608; key + value (8 heads of 64)
    # 2 * 2048 * 512 = 2,097,152; SwiGLU 3 * 2048 * 8192 = 50,331,648: 60,817,408.
    # N = 16 * 60,817,408 + head 131,072 * 2048 = 973,078,528 + 268,435,456 = 1,241,513,984.
    # 6 N = 7,449,083,904; attention 12 * 16 layers * 2048 emb * 2048 context = 805,306,368.
    assert perf.training_flops_per_token(ModelConfig.from_dict(SEED_MODEL)) == 7_449_083_904 + 805_306_368


def test_init_std_draws_weights_from_a_normal_and_zeroes_biases():
    torch.manual_seed(0)
    model = GPTModel({**BASE, "emb_dim": 64, "n_heads": 2, "vocab_size": 500, "qkv_bias": True, "init_std": 0.02})
    for name, parameter in model.named_parameters():
        if name.endswith("weight"):
            assert abs(parameter.std().item() - 0.02) < 0.002, name  # >= 4,096 draws each
            assert abs(parameter.mean().item()) < 0.002, name
        elif name.endswith(("bias", "shift")):
            assert torch.count_nonzero(parameter) == 0, name
        else:
            assert torch.all(parameter == 1), name  # norm scales


def test_gpt2_model_json_is_unchanged_by_the_new_keys():
    raw = dict(BASE, qkv_bias=False, tie_weights=False)
    assert ModelConfig.from_dict(raw).to_dict() == raw
    assert ModelConfig.from_dict({**raw, "bias": True, "norm": "layernorm"}).to_dict() == raw
    assert ModelConfig.from_dict({**raw, "pos_emb": "rope"}).to_dict() == {**raw, "pos_emb": "rope"}


@pytest.mark.parametrize("change, fragments", [
    ({"pos_emb": "alibi"}, ["'pos_emb'", '"learned", "rope"', '"alibi"']),
    ({"norm": "batchnorm"}, ["'norm'", '"layernorm", "rmsnorm"']),
    ({"mlp": "relu"}, ["'mlp'", '"gelu", "swiglu", "relu2"']),
    ({"n_kv_heads": 3}, ["'n_kv_heads'", "(3) must divide n_heads (4)"]),
    ({"n_kv_heads": 0}, ["'n_kv_heads'", "positive"]),
    ({"emb_dim": 20, "n_heads": 4, "pos_emb": "rope"}, ["'pos_emb'", "(5) must be even"]),
    ({"rope_theta": -1}, ["'rope_theta'", "positive"]),
])
def test_bad_architecture_options_name_the_key_and_the_valid_values(change, fragments):
    with pytest.raises(UserError) as error:
        ModelConfig.from_dict({**BASE, **change}, source="runs/x/model.json")
    assert str(error.value).startswith("runs/x/model.json: key ")
    for fragment in fragments:
        assert fragment in str(error.value)


def loss_and_gradients(model, idx, targets, seed=1):
    torch.manual_seed(seed)  # the same dropout masks for every variant
    loss = model(idx, targets)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("options", [{}, LLAMA_LIKE, SWITCHES])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(options):
    cfg = {**BASE, **options, "drop_rate": 0.2}  # dropout on: the recomputation must replay its masks
    plain = random_model(cfg).train()
    checkpointed = GPTModel(cfg, activation_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    idx, targets = torch.randint(0, BASE["vocab_size"], (2, 2, BASE["context_length"]))
    expected_loss, expected_grads = loss_and_gradients(plain, idx, targets)
    loss, grads = loss_and_gradients(checkpointed, idx, targets)
    assert loss.item() == expected_loss.item()
    for name in expected_grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=0, atol=0)


@pytest.mark.parametrize("padding, chunk", [(1, 7), (64, 5), (1, 1000)])
def test_chunked_loss_gives_the_same_loss_and_gradients(padding, chunk):
    cfg = {**BASE, **LLAMA_LIKE}  # tied: the chunks' gradients reach the embedding too
    whole = GPTModel(cfg, pad_vocab_to_multiple_of=padding)
    whole.load_state_dict(random_model(cfg).state_dict())
    chunked = GPTModel(cfg, pad_vocab_to_multiple_of=padding, loss_chunk_tokens=chunk)
    chunked.load_state_dict(whole.state_dict())
    idx, targets = torch.randint(0, BASE["vocab_size"], (2, 3, BASE["context_length"]))
    expected_loss, expected_grads = loss_and_gradients(whole, idx, targets)
    loss, grads = loss_and_gradients(chunked, idx, targets)
    # And both equal cross-entropy written out on the logits.
    logits = whole(idx).double()
    by_hand = -(logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1))).mean()
    torch.testing.assert_close(expected_loss.double(), by_hand, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    for name in expected_grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-5, atol=1e-7)


def test_model_json_written_from_a_config_reads_back_the_same_config():
    cfg = ModelConfig.from_dict(SEED_MODEL)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
