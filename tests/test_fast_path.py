"""gpt.py's fast paths compute the same model as the plain ones: the fused
query/key/value matmul, and the vocabulary padded to a multiple. Checkpoints
stay interchangeable either way."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import gpt
from plain_gpt import PlainGPT, separate_qkv
from checkpointing import load_model_weights
from gpt import GPTModel

CFG = dict(vocab_size=61, context_length=16, emb_dim=24, n_heads=3, n_layers=2, drop_rate=0.0)


def random_model(cfg, seed=0, fused_qkv=True, **options):
    """Every parameter random (biases and LayerNorms too), so a misplaced row shows."""
    torch.manual_seed(seed)
    model = GPTModel(cfg, **options).eval()
    if not fused_qkv:
        separate_qkv(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model


def tokens(cfg, batch=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg["vocab_size"], (batch, cfg["context_length"]), generator=generator)


def shapes(state_dict):
    return {key: tuple(tensor.shape) for key, tensor in state_dict.items()}


# ---------------------------------------------------------------- fused QKV

@pytest.mark.parametrize("qkv_bias", [False, True])
def test_fused_and_separate_qkv_give_the_book_logits_from_one_checkpoint(qkv_bias):
    cfg = {**CFG, "qkv_bias": qkv_bias}
    fused = random_model(cfg, fused_qkv=True)
    separate = separate_qkv(GPTModel(cfg)).eval()
    separate.load_state_dict(fused.state_dict())  # strict: the same keys and shapes
    plain = PlainGPT(fused.cfg).eval()
    plain.load_state_dict(separate.state_dict())
    idx = tokens(cfg)
    expected = plain(idx)
    torch.testing.assert_close(fused(idx), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(separate(idx), expected, rtol=1e-5, atol=1e-5)
    assert shapes(fused.state_dict()) == shapes(separate.state_dict())
    # ...and back the other way.
    fused_again = GPTModel(cfg).eval()
    fused_again.load_state_dict(separate.state_dict())
    torch.testing.assert_close(fused_again(idx), fused(idx), rtol=0, atol=0)


def test_fused_qkv_gives_the_same_gradients_and_keeps_the_parameter_list():
    """Same gradients per projection, and the same parameters in the same order, so an
    optimizer.pt (keyed by parameter position) moves between the two, as does the
    reference harness's."""
    cfg = {**CFG, "qkv_bias": True}
    fused = random_model(cfg, fused_qkv=True).train()
    separate = separate_qkv(GPTModel(cfg)).train()
    separate.load_state_dict(fused.state_dict())
    assert ([(n, p.shape) for n, p in fused.named_parameters()]
            == [(n, p.shape) for n, p in separate.named_parameters()])
    idx = tokens(cfg)
    for model in (fused, separate):
        F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
    for (name, p_fused), p_separate in zip(fused.named_parameters(), separate.parameters()):
        torch.testing.assert_close(p_fused.grad, p_separate.grad, rtol=1e-5, atol=1e-6, msg=name)

    optimizer = torch.optim.AdamW(separate.parameters())
    optimizer.step()
    torch.optim.AdamW(fused.parameters()).load_state_dict(optimizer.state_dict())


# ---------------------------------------------------------------- vocabulary padding

@pytest.mark.parametrize("tie_weights", [False, True])
def test_padded_vocab_gives_the_same_logits_and_loss(tie_weights):
    cfg = {**CFG, "tie_weights": tie_weights}
    unpadded = random_model(cfg)
    padded = GPTModel(cfg, pad_vocab_to_multiple_of=64).eval()
    assert padded.out_head.weight.shape[0] == 64  # 61 rounded up to a multiple of 64
    padded.load_state_dict(unpadded.state_dict())  # strict, real-vocabulary weights
    idx = tokens(cfg)
    logits = padded(idx)
    assert logits.shape == (3, CFG["context_length"], CFG["vocab_size"])
    torch.testing.assert_close(logits, unpadded(idx), rtol=1e-5, atol=1e-5)
    targets = tokens(cfg, seed=2)
    torch.testing.assert_close(F.cross_entropy(logits.flatten(0, 1), targets.flatten()),
                               F.cross_entropy(unpadded(idx).flatten(0, 1), targets.flatten()))
    assert padded.num_parameters() == unpadded.num_parameters()


@pytest.mark.parametrize("tie_weights", [False, True])
def test_padded_checkpoints_hold_only_real_rows_and_round_trip_both_ways(tmp_path, tie_weights):
    cfg = {**CFG, "tie_weights": tie_weights}
    padded = random_model(cfg, pad_vocab_to_multiple_of=64)
    state = padded.state_dict()
    assert shapes(state) == shapes(GPTModel(cfg).state_dict())
    idx = tokens(cfg)

    # padded -> file -> unpadded, as the project saves and loads checkpoints
    save_file({key: value.contiguous().clone() for key, value in state.items()}, tmp_path / "model.safetensors")
    unpadded = load_model_weights(GPTModel(cfg).eval(), tmp_path / "model.safetensors")
    torch.testing.assert_close(unpadded(idx), padded(idx), rtol=1e-5, atol=1e-5)

    # unpadded -> padded: pad rows come back as zeros
    reloaded = GPTModel(cfg, pad_vocab_to_multiple_of=64).eval()
    reloaded.load_state_dict(unpadded.state_dict())
    torch.testing.assert_close(reloaded(idx), padded(idx), rtol=1e-5, atol=1e-5)
    assert not reloaded.out_head.weight[CFG["vocab_size"]:].any()
    if tie_weights:
        assert reloaded.out_head.weight is reloaded.tok_emb.weight


def test_padding_rows_get_no_gradient():
    cfg = {**CFG, "drop_rate": 0.1}
    model = GPTModel(cfg, pad_vocab_to_multiple_of=64).train()
    idx = tokens(cfg)
    F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
    assert model.out_head.weight.grad[CFG["vocab_size"]:].abs().sum() == 0
    assert model.out_head.weight.grad[:CFG["vocab_size"]].abs().sum() > 0


def test_padding_multiple_must_be_positive():
    with pytest.raises(ValueError, match="pad_vocab_to_multiple_of"):
        GPTModel(CFG, pad_vocab_to_multiple_of=0)


# ---------------------------------------------------------------- attention dropout on CPU

@pytest.mark.parametrize("fused_qkv", [True, False])
def test_training_mode_with_dropout_matches_the_book_mask_for_mask(fused_qkv):
    """With dropout active on CPU, GPTModel writes attention out (gpt.py says why).
    A context within one query block (as here) draws its dropout masks in the
    book's order and shapes, so under the same seed both models drop the same
    units: outputs and gradients must agree. Longer contexts: the tests below."""
    cfg = {**CFG, "drop_rate": 0.2, "qkv_bias": True}
    model = random_model(cfg, fused_qkv=fused_qkv).train()
    plain = PlainGPT(model.cfg).train()
    plain.load_state_dict(model.state_dict())
    idx = tokens(cfg)
    losses = []
    for m in (model, plain):
        torch.manual_seed(5)
        logits = m(idx[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for (name, p_model), p_plain in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p_model.grad, p_plain.grad, rtol=1e-4, atol=1e-5, msg=name)


def recording_dropout(records):
    """torch's own dropout, also noting which entries it kept, so that a reference
    computation can apply the same masks."""
    real_dropout = F.dropout

    def dropout(input, p=0.5, training=True, inplace=False):
        output = real_dropout(input, p, training, inplace)
        records.append((output != 0) | (input == 0))  # kept, or zero anyway (future keys)
        return output
    return dropout


@pytest.mark.parametrize("query_block", [1, 3, 4, 16])
def test_blocked_attention_with_dropout_equals_full_causal_attention(monkeypatch, query_block):
    """The CPU dropout path splits queries into blocks that skip future keys. With
    the dropout masks it drew put together into one T x T mask, the book's full
    masked attention must give the same output and gradients."""
    batch, heads, seq_len, head_dim, dropout_p = 2, 3, 10, 4, 0.3
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    masks = []
    monkeypatch.setattr(gpt.F, "dropout", recording_dropout(masks))
    blocked = gpt._causal_attention_with_dropout(q, k, v, dropout_p, query_block=query_block)
    monkeypatch.undo()
    assert len(masks) == -(-seq_len // query_block)
    keep = torch.zeros(batch, heads, seq_len, seq_len, dtype=torch.float64)
    for start, mask in zip(range(0, seq_len, query_block), masks):
        rows, keys_seen = mask.shape[-2:]
        keep[..., start:start + rows, :keys_seen] = mask.double()
    dropped = 1 - keep.tril().sum() / (batch * heads * seq_len * (seq_len + 1) / 2)
    assert 0.1 < dropped < 0.5  # masks really were drawn, at about dropout_p

    scores = (q @ k.transpose(-2, -1)) / head_dim ** 0.5
    scores = scores.masked_fill(torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1), float("-inf"))
    reference = (torch.softmax(scores, dim=-1) * keep / (1 - dropout_p)) @ v

    torch.testing.assert_close(blocked, reference)
    upstream = torch.randn_like(reference)
    grads = torch.autograd.grad(blocked, (q, k, v), upstream)
    reference_grads = torch.autograd.grad(reference, (q, k, v), upstream)
    for name, grad, reference_grad in zip("qkv", grads, reference_grads):
        torch.testing.assert_close(grad, reference_grad, msg=name)


def test_blocked_attention_without_dropout_equals_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 8) for _ in range(3))
    torch.testing.assert_close(gpt._causal_attention_with_dropout(q, k, v, 0.0, query_block=8),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))
