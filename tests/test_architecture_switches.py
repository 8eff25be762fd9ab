"""The modded-nanogpt switches (qk_norm, mlp "relu2", zero_init_projections, logit_softcap,
unet_skips) beyond tests/test_architectures.py's logits against plain_gpt: gradients against
plain_gpt, that they leave the default model and its initialisation untouched, the soft cap
in the chunked loss and the KV-cache path, zero-initialised projections training, their
model.json validation, perf.py's counts and what convert_gpt2.py to-hf does with each.
(tests/test_gpt.py generates with all of them on, cached and uncached, against plain_gpt.)"""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

from conftest import TINY_MODEL, make_run, read_rows, run_training, tokens_for
from evalkit import one_torch_thread  # noqa: F401  (autouse fixture)
from evalkit import assert_one_error_line, run_script, tiny_config, write_model
import perf
from config import ModelConfig
from errors import UserError
from gpt import GPTModel, KVCache
from plain_gpt import PlainGPT
from test_architectures import BASE, SWITCHES, loss_and_gradients, random_model

# Each switch on its own, as model.json sets it.
EACH_SWITCH = [{"qk_norm": True}, {"mlp": "relu2"}, {"zero_init_projections": True}, {"logit_softcap": 1.0},
               {"unet_skips": True}]
OFF = {"qk_norm": False, "mlp": "gelu", "zero_init_projections": False, "logit_softcap": None, "unet_skips": False}


def switch_id(options):
    return ",".join(f"{key}={value}" for key, value in options.items())


def plain_like(model):
    plain = PlainGPT(model.cfg)
    plain.load_state_dict(model.state_dict())
    return plain


# ---------------------------------------------------------------- against plain_gpt

@pytest.mark.parametrize("options", [*EACH_SWITCH, SWITCHES], ids=switch_id)
def test_loss_and_gradients_match_the_plain_implementation(options):
    cfg = {**BASE, **options}
    model = random_model(cfg)
    plain = plain_like(model)
    idx, targets = torch.randint(0, BASE["vocab_size"], (2, 2, BASE["context_length"]))
    loss, grads = loss_and_gradients(model, idx, targets)
    expected_loss, expected_grads = loss_and_gradients(plain, idx, targets)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_unet_skips_with_zero_weights_are_the_model_without_them():
    """An independent reading of the skips: weighted by zero they add nothing."""
    with_skips = random_model({**BASE, "n_layers": 4, "unet_skips": True})
    without = GPTModel({**BASE, "n_layers": 4})
    without.load_state_dict({k: v for k, v in with_skips.state_dict().items() if k != "skip_weights"})
    idx = torch.randint(0, BASE["vocab_size"], (2, BASE["context_length"]))
    assert not torch.allclose(with_skips(idx), without(idx))
    with torch.no_grad():
        with_skips.skip_weights.zero_()
    torch.testing.assert_close(with_skips(idx), without(idx), rtol=0, atol=0)


# ---------------------------------------------------------------- the default model

def built(cfg, seed=0):
    """A GPTModel built from `seed`, and the global RNG state after building it."""
    torch.manual_seed(seed)
    model = GPTModel(cfg)
    return model, torch.get_rng_state()


@pytest.mark.parametrize("init_std", [None, 0.02])
def test_switches_set_off_are_the_default_model_bit_for_bit(init_std):
    default, default_rng = built({**BASE, "init_std": init_std})
    off, off_rng = built({**BASE, "init_std": init_std, **OFF})
    assert torch.equal(default_rng, off_rng)
    assert default.state_dict().keys() == off.state_dict().keys()
    for name, tensor in default.state_dict().items():
        assert torch.equal(tensor, off.state_dict()[name]), name
    idx = torch.randint(0, BASE["vocab_size"], (2, BASE["context_length"]))
    assert torch.equal(default(idx), off(idx))
    # model.json and meta.json written from either read as the reference harness's keys.
    reference_keys = dict(BASE, qkv_bias=False, tie_weights=False)
    expected_keys = {**reference_keys, "init_std": init_std} if init_std else reference_keys
    assert default.cfg.to_dict() == off.cfg.to_dict() == expected_keys


@pytest.mark.parametrize("options", EACH_SWITCH, ids=switch_id)
@pytest.mark.parametrize("init_std", [None, 0.02])
def test_each_switch_draws_the_same_initial_weights(options, init_std):
    """Switching one on uses the random generator exactly as the default model does: every
    parameter both have is the same (but the projections zero_init_projections zeroes)."""
    default, default_rng = built({**BASE, "init_std": init_std})
    switched, switched_rng = built({**BASE, "init_std": init_std, **options})
    assert torch.equal(default_rng, switched_rng)
    extra = {"skip_weights"} if options.get("unet_skips") else set()
    assert switched.state_dict().keys() == default.state_dict().keys() | extra
    for name, tensor in default.state_dict().items():
        if not (options.get("zero_init_projections") and is_output_projection(name)):
            assert torch.equal(tensor, switched.state_dict()[name]), name
    assert perf.parameter_count(switched.cfg) == sum(p.numel() for p in switched.parameters())


def test_new_keys_appear_in_model_json_only_when_set():
    cfg = ModelConfig.from_dict({**BASE, **SWITCHES})
    written = cfg.to_dict()
    for key in ("qk_norm", "mlp", "zero_init_projections", "logit_softcap", "unet_skips"):
        assert written[key] == SWITCHES[key]
    assert ModelConfig.from_dict(json.loads(json.dumps(written))) == cfg


# ---------------------------------------------------------------- zero_init_projections

def is_output_projection(name):
    return name.endswith((".att.out_proj.weight", ".att.out_proj.bias", ".ff.layers.2.weight", ".ff.layers.2.bias",
                          ".ff.down.weight", ".ff.down.bias"))


@pytest.mark.parametrize("options", [{}, {"mlp": "swiglu", "init_std": 0.02}, {"mlp": "relu2", "bias": False}],
                         ids=["gelu", "swiglu", "relu2"])
def test_zero_init_projections_start_every_block_as_the_identity(options):
    torch.manual_seed(0)
    model = GPTModel({**BASE, **options, "zero_init_projections": True})
    # (test_each_switch_draws_the_same_initial_weights: the other parameters are the default model's.)
    zeroed = [name for name, p in model.named_parameters() if is_output_projection(name)]
    assert len(zeroed) == BASE["n_layers"] * 2 * (2 if model.cfg.bias else 1)  # weights and biases
    for name in zeroed:
        assert torch.count_nonzero(model.get_parameter(name)) == 0, name
    # So the logits are the embeddings, normalised, through the head, as if there were no blocks.
    idx = torch.randint(0, BASE["vocab_size"], (2, BASE["context_length"]))
    x = model.tok_emb.weight[idx] + model.pos_emb.weight[:BASE["context_length"]]
    by_hand = F.layer_norm(x, (BASE["emb_dim"],), model.final_norm.scale, model.final_norm.shift) @ \
        model.out_head.weight.T
    torch.testing.assert_close(model(idx), by_hand, rtol=1e-5, atol=1e-6)


def test_zero_initialised_projections_train():
    torch.manual_seed(0)
    model = GPTModel({**BASE, "zero_init_projections": True, "init_std": 0.02})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx, targets = torch.randint(0, BASE["vocab_size"], (2, 4, BASE["context_length"]))
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = model(idx, targets)
        loss.backward()
        if not losses:  # the first step: the zero projections get gradients
            for block in model.trf_blocks:
                assert block.att.out_proj.weight.grad.abs().sum() > 0
                assert block.ff.layers[2].weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
        if len(losses) == 1:
            for block in model.trf_blocks:
                assert torch.count_nonzero(block.att.out_proj.weight) > 0
                assert torch.count_nonzero(block.ff.layers[2].weight) > 0
    assert losses[-1] < losses[0] - 0.1


# ---------------------------------------------------------------- logit_softcap

def test_softcap_is_the_formula_on_the_uncapped_logits():
    capped = random_model({**BASE, "logit_softcap": 0.5})
    uncapped = GPTModel(BASE)
    uncapped.load_state_dict(capped.state_dict())
    idx, targets = torch.randint(0, BASE["vocab_size"], (2, 2, BASE["context_length"]))
    raw = uncapped(idx).double()
    assert raw.abs().max() > 1  # the cap matters here
    expected = 0.5 * torch.tanh(raw / 0.5)
    logits = capped(idx)
    assert logits.abs().max() < 0.5
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-6)
    by_hand = -(expected.log_softmax(-1).gather(-1, targets.unsqueeze(-1))).mean()
    torch.testing.assert_close(capped(idx, targets).double(), by_hand, rtol=1e-5, atol=0)


@pytest.mark.parametrize("padding, chunk", [(1, 7), (64, 5)])
def test_chunked_loss_with_softcap_is_the_whole_loss(padding, chunk):
    cfg = {**BASE, **SWITCHES, "tie_weights": True}
    whole = GPTModel(cfg, pad_vocab_to_multiple_of=padding)
    whole.load_state_dict(random_model(cfg).state_dict())
    chunked = GPTModel(cfg, pad_vocab_to_multiple_of=padding, loss_chunk_tokens=chunk)
    chunked.load_state_dict(whole.state_dict())
    idx, targets = torch.randint(0, BASE["vocab_size"], (2, 3, BASE["context_length"]))
    expected_loss, expected_grads = loss_and_gradients(plain_like(whole), idx, targets)
    whole_loss, whole_grads = loss_and_gradients(whole, idx, targets)
    loss, grads = loss_and_gradients(chunked, idx, targets)
    torch.testing.assert_close(whole_loss, expected_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=0)
    for name in whole_grads:
        torch.testing.assert_close(grads[name], whole_grads[name], rtol=1e-5, atol=1e-7, msg=name)
        real_rows = grads[name][:len(expected_grads[name])]  # without the vocabulary padding, if any
        torch.testing.assert_close(real_rows, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_cached_next_token_logits_are_capped_as_the_plain_models():
    """The KV-cache path (generate's) with every switch: prefill, a chunk, one token, each
    time the plain model's logits for the whole sequence so far."""
    cfg = {**BASE, **SWITCHES, "n_kv_heads": 2}
    model = random_model(cfg).eval()
    plain = plain_like(model).eval()
    idx = torch.randint(0, BASE["vocab_size"], (2, 9))
    kv_caches = [KVCache(BASE["context_length"]) for _ in range(cfg["n_layers"])]
    for start, end in ((0, 5), (5, 8), (8, 9)):
        logits = model.next_token_logits(idx[:, start:end], kv_caches)
        assert logits.abs().max() < cfg["logit_softcap"]
        torch.testing.assert_close(logits, plain(idx[:, :end])[:, -1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- mixed precision

def test_switches_run_under_bfloat16_autocast():
    """QK-norm returns the projections' dtype (attention needs q, k and v in one), on both
    CPU attention paths: SDPA, and with dropout the blocked one."""
    for drop_rate in (0.0, 0.1):
        model = random_model({**BASE, **SWITCHES, "drop_rate": drop_rate}).eval()
        idx, targets = torch.randint(0, BASE["vocab_size"], (2, 2, BASE["context_length"]))
        expected = model(idx, targets)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(idx, targets)
        torch.testing.assert_close(loss, expected, rtol=0.05, atol=0)


# ---------------------------------------------------------------- model.json validation

@pytest.mark.parametrize("change, fragments", [
    ({"qk_norm": "yes"}, ["'qk_norm'", "true or false", '"yes"']),
    ({"unet_skips": 1}, ["'unet_skips'", "true or false"]),
    ({"zero_init_projections": None}, ["'zero_init_projections'", "true or false", "null"]),
    ({"logit_softcap": 0}, ["'logit_softcap'", "positive"]),
    ({"logit_softcap": "30"}, ["'logit_softcap'", "a number or null"]),
    ({"mlp": "relu^2"}, ["'mlp'", '"gelu", "swiglu", "relu2"']),
    ({"unet_skips": True, "n_layers": 1}, ["'unet_skips'", "n_layers >= 2, got 1"]),
])
def test_bad_switches_name_the_key_and_the_valid_values(change, fragments):
    with pytest.raises(UserError) as error:
        ModelConfig.from_dict({**BASE, **change}, source="runs/x/model.json")
    assert str(error.value).startswith("runs/x/model.json: key ")
    for fragment in fragments:
        assert fragment in str(error.value)


# ---------------------------------------------------------------- perf.py

@pytest.mark.parametrize("options", [*EACH_SWITCH, SWITCHES], ids=switch_id)
def test_matmul_weights_are_the_linear_layer_weights_with_the_switches(options):
    model = GPTModel({**BASE, **options})
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert perf.matmul_weights(model.cfg) == linear_weights


# ---------------------------------------------------------------- convert_gpt2.py to-hf

@pytest.mark.parametrize("switch, value, feature", [
    ("qk_norm", True, "QK-norm"), ("logit_softcap", 30.0, "logit soft-capping"),
    ("unet_skips", True, "U-net skip connections")])
@pytest.mark.parametrize("shape", [{}, {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu"}],
                         ids=["gpt2", "llama"])
def test_to_hf_refuses_switches_no_transformers_class_has(tmp_path, switch, value, feature, shape):
    model_json, weights, _ = write_model(tmp_path / "run", tiny_config(**shape, **{switch: value}))
    result = run_script("convert_gpt2.py", "to-hf", model_json, weights, tmp_path / "hf")
    assert_one_error_line(result, f"model.json: {switch} {json.dumps(value)}: neither GPT2LMHeadModel nor "
                                  f"LlamaForCausalLM has {feature}")
    assert not (tmp_path / "hf").exists()


def test_to_hf_refuses_relu2_in_a_llama_shaped_model(tmp_path):
    """LlamaForCausalLM's MLP is gated: relu2 there would be another function."""
    cfg = tiny_config(pos_emb="rope", norm="rmsnorm", mlp="relu2")
    model_json, weights, _ = write_model(tmp_path / "run", cfg)
    result = run_script("convert_gpt2.py", "to-hf", model_json, weights, tmp_path / "hf")
    assert_one_error_line(result, 'pos_emb "rope", norm "rmsnorm", mlp "relu2" is neither GPT-2',
                          'mlp "gelu" or "relu2"')


@pytest.mark.parametrize("options", [{"mlp": "relu2"}, {"mlp": "relu2", "zero_init_projections": True}])
def test_relu2_and_zero_init_models_convert_to_gpt2_and_back(tmp_path, options):
    """transformers' GPT-2 with activation_function "relu2" is this model; zero-initialised
    projections only set where training starts, so the trained model converts as any other."""
    cfg = tiny_config(vocab_size=100, context_length=32, qkv_bias=True, **options)
    model_json, weights, ours = write_model(tmp_path / "run", cfg)
    result = run_script("convert_gpt2.py", "to-hf", model_json, weights, tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["activation_function"] == "relu2"
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours.eval()(tokens), atol=1e-5, rtol=0)

    result = run_script("convert_gpt2.py", "from-hf", tmp_path / "hf", tmp_path / "back")
    assert result.returncode == 0, result.stderr
    back = json.loads((tmp_path / "back" / "model.json").read_text())
    assert back["mlp"] == "relu2" and "zero_init_projections" not in back


# ---------------------------------------------------------------- through the trainer

def test_a_model_with_every_switch_trains_the_same_under_ddp_and_fsdp(tmp_path, verdict_dataset):
    """ddp_train.py in a world of one: the skip weights live in FSDP's root unit, the rest
    in the blocks'; both ways give the same losses, which fall, and the checkpoint loads."""
    model_json = {"n_layers": 4, "qk_norm": True, "mlp": "relu2", "zero_init_projections": True,
                  "logit_softcap": 15.0, "unet_skips": True, "init_std": 0.02}
    train = dict(min_train_tokens=tokens_for(4, 1), checkpoint_interval=100)
    ddp = make_run(tmp_path / "ddp", verdict_dataset, model=model_json, **train)
    fsdp = make_run(tmp_path / "fsdp", verdict_dataset, model=model_json, parallelism="fsdp", **train)
    run_training([ddp, "datasets"])
    run_training([fsdp, "datasets"])
    ddp_losses, fsdp_losses = ([row["loss"] for row in read_rows(run)] for run in (ddp, fsdp))
    assert len(ddp_losses) == 4 and ddp_losses[-1] < ddp_losses[0]
    assert fsdp_losses == pytest.approx(ddp_losses, rel=1e-4)
    weights = load_file(ddp / "checkpoints" / "latest" / "model.safetensors")
    assert weights["skip_weights"].shape == (2,) and not torch.equal(weights["skip_weights"], torch.ones(2))
    GPTModel({**TINY_MODEL, **model_json}).load_state_dict(weights)
