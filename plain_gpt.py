"""GPT-2 as "Build a Large Language Model (from Scratch)" writes it, eagerly and plainly:
a T x T mask buffer with masked_fill and softmax attention, hand-written GELU and
LayerNorm. It is the independent reference the tests check GPTModel against, and
bench.py's baseline. Parameter names are GPTModel's, so one state dict loads into
either.

model.json's architecture options are written out the same plain way, from their
papers rather than from gpt.py: RMSNorm as its formula, RoPE as complex
multiplication, SwiGLU, and grouped-query attention by copying key/value heads; and
the modded-nanogpt switches: QK-norm as the RMS formula over each head, ReLU squared
as max(x, 0) * max(x, 0), the logit soft cap as its formula, and U-net skips by keeping
every block's output in a list. zero_init_projections changes only the initialisation,
which PlainGPT never does (its weights are always loaded)."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ModelConfig
from gpt import MultiHeadAttention


class PlainLayerNorm(nn.Module):
    def __init__(self, emb_dim, eps, bias):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim)) if bias else None

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        normalized = self.scale * (x - mean) / torch.sqrt(var + self.eps)
        return normalized if self.shift is None else normalized + self.shift


class PlainRMSNorm(nn.Module):
    def __init__(self, emb_dim, eps):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))

    def forward(self, x):
        return self.scale * x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)


def plain_norm(cfg):
    if cfg.norm == "rmsnorm":
        return PlainRMSNorm(cfg.emb_dim, cfg.norm_eps)
    return PlainLayerNorm(cfg.emb_dim, cfg.norm_eps, cfg.bias)


class PlainGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def plain_head_rms_norm(x, eps):
    """Each head's vector over the root mean square of its entries, with no scale."""
    return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def plain_rope(x, theta):
    """RoFormer's rotation as complex multiplication: dimensions i and i + head_dim / 2 of
    the head at position m form the complex number x_i + j x_(i + head_dim/2), turned by
    the angle m x theta^(-2i / head_dim)."""
    seq_len, head_dim = x.shape[-2], x.shape[-1]
    half = head_dim // 2
    frequencies = 1.0 / theta ** (torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * frequencies[None, :]
    pairs = torch.complex(x[..., :half].double(), x[..., half:].double())
    turned = pairs * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([turned.real, turned.imag], dim=-1).to(x.dtype)


class PlainMultiHeadAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.kv_heads
        self.head_dim = cfg.emb_dim // cfg.n_heads
        kv_dim = self.n_kv_heads * self.head_dim
        self.W_query = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias)
        self.W_key = nn.Linear(cfg.emb_dim, kv_dim, bias=cfg.qkv_bias)
        self.W_value = nn.Linear(cfg.emb_dim, kv_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.drop_rate)
        # Not persistent, unlike the book's, so state dicts have GPTModel's keys.
        mask = torch.triu(torch.ones(cfg.context_length, cfg.context_length), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):
        batch, seq_len, emb_dim = x.shape
        queries, keys, values = (
            projection(x).view(batch, seq_len, heads, self.head_dim).transpose(1, 2)
            for projection, heads in ((self.W_query, self.n_heads), (self.W_key, self.n_kv_heads),
                                      (self.W_value, self.n_kv_heads)))
        if self.cfg.qk_norm:
            queries, keys = (plain_head_rms_norm(t, self.cfg.norm_eps) for t in (queries, keys))
        if self.cfg.pos_emb == "rope":
            queries, keys = plain_rope(queries, self.cfg.rope_theta), plain_rope(keys, self.cfg.rope_theta)
        # Query head h reads key/value head h // (n_heads / n_kv_heads).
        kv_head_of = torch.arange(self.n_heads) // (self.n_heads // self.n_kv_heads)
        keys, values = keys[:, kv_head_of], values[:, kv_head_of]
        scores = queries @ keys.transpose(2, 3)
        scores.masked_fill_(self.mask.bool()[:seq_len, :seq_len], -torch.inf)
        weights = self.dropout(torch.softmax(scores / self.head_dim ** 0.5, dim=-1))
        context = (weights @ values).transpose(1, 2).contiguous().view(batch, seq_len, emb_dim)
        return self.out_proj(context)


class PlainReLUSquared(nn.Module):
    def forward(self, x):
        positive = torch.maximum(x, torch.zeros_like(x))
        return positive * positive


class PlainFeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        activation = PlainReLUSquared() if cfg.mlp == "relu2" else PlainGELU()
        self.layers = nn.Sequential(nn.Linear(cfg.emb_dim, cfg.ff_hidden_dim, bias=cfg.bias), activation,
                                    nn.Linear(cfg.ff_hidden_dim, cfg.emb_dim, bias=cfg.bias))

    def forward(self, x):
        return self.layers(x)


class PlainSwiGLU(nn.Module):
    """Shazeer's GLU variant with Swish: (Swish(x W) * x V) W2, Swish(z) = z * sigmoid(z)."""

    def __init__(self, cfg):
        super().__init__()
        self.gate = nn.Linear(cfg.emb_dim, cfg.ff_hidden_dim, bias=cfg.bias)
        self.up = nn.Linear(cfg.emb_dim, cfg.ff_hidden_dim, bias=cfg.bias)
        self.down = nn.Linear(cfg.ff_hidden_dim, cfg.emb_dim, bias=cfg.bias)

    def forward(self, x):
        gate = self.gate(x)
        return self.down(gate * torch.sigmoid(gate) * self.up(x))


class PlainTransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = PlainMultiHeadAttention(cfg)
        self.ff = PlainSwiGLU(cfg) if cfg.mlp == "swiglu" else PlainFeedForward(cfg)
        self.norm1 = plain_norm(cfg)
        self.norm2 = plain_norm(cfg)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class PlainGPT(nn.Module):
    """GPT-2 as the book writes it, eagerly: a T x T mask buffer with masked_fill
    and softmax attention, hand-written GELU and LayerNorm. Parameter names are
    GPTModel's, so the same state dict loads into either."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim) if cfg.pos_emb == "learned" else None
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[PlainTransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = plain_norm(cfg)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight
        if cfg.unet_skips:
            self.skip_weights = nn.Parameter(torch.ones(cfg.n_layers // 2))

    def forward(self, idx, targets=None):
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        logits = self.out_head(self.final_norm(self.blocks(self.drop_emb(x))))
        if self.cfg.logit_softcap is not None:
            logits = self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def blocks(self, x):
        """The blocks in turn; with unet_skips, block j < n_layers // 2's output is also
        added, weighted by skip_weights[j], to the input of block n_layers - 1 - j."""
        if not self.cfg.unet_skips:
            return self.trf_blocks(x)
        n_layers, outputs = len(self.trf_blocks), []
        for i, block in enumerate(self.trf_blocks):
            j = n_layers - 1 - i
            if j < len(self.skip_weights):
                x = x + self.skip_weights[j] * outputs[j]
            x = block(x)
            outputs.append(x)
        return x


class SeparateQKVAttention(MultiHeadAttention):
    """GPTModel's attention with the query, key and value projections as three matmuls,
    as the book computes them: what the fused matmul is measured and tested against."""

    def _project_qkv(self, x):
        return self._project_qkv_separately(x)


def separate_qkv(model):
    """`model` (a GPTModel) with every attention layer computing three projection matmuls
    instead of one; the parameters, their order and the state dict stay the same."""
    for module in model.modules():
        if type(module) is MultiHeadAttention:
            module.__class__ = SeparateQKVAttention
    return model
