"""GPT-2 as "Build a Large Language Model (from Scratch)" writes it, eagerly and plainly:
a T x T mask buffer with masked_fill and softmax attention, hand-written GELU and
LayerNorm. It is the independent reference the tests check GPTModel against, and
bench.py's baseline. Parameter names are GPTModel's, so one state dict loads into
either."""

import math

import torch
import torch.nn as nn

from config import ModelConfig
from gpt import MultiHeadAttention


class PlainLayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class PlainGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


class PlainMultiHeadAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.emb_dim // cfg.n_heads
        self.W_query = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias)
        self.W_key = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias)
        self.W_value = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.dropout = nn.Dropout(cfg.drop_rate)
        # Not persistent, unlike the book's, so state dicts have GPTModel's keys.
        mask = torch.triu(torch.ones(cfg.context_length, cfg.context_length), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):
        batch, seq_len, emb_dim = x.shape
        queries, keys, values = (
            projection(x).view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
            for projection in (self.W_query, self.W_key, self.W_value))
        scores = queries @ keys.transpose(2, 3)
        scores.masked_fill_(self.mask.bool()[:seq_len, :seq_len], -torch.inf)
        weights = self.dropout(torch.softmax(scores / self.head_dim ** 0.5, dim=-1))
        context = (weights @ values).transpose(1, 2).contiguous().view(batch, seq_len, emb_dim)
        return self.out_proj(context)


class PlainFeedForward(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(emb_dim, 4 * emb_dim), PlainGELU(), nn.Linear(4 * emb_dim, emb_dim))

    def forward(self, x):
        return self.layers(x)


class PlainTransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = PlainMultiHeadAttention(cfg)
        self.ff = PlainFeedForward(cfg.emb_dim)
        self.norm1 = PlainLayerNorm(cfg.emb_dim)
        self.norm2 = PlainLayerNorm(cfg.emb_dim)
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
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[PlainTransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = PlainLayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight

    def forward(self, idx):
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(positions))
        return self.out_head(self.final_norm(self.trf_blocks(x)))


class SeparateQKVAttention(MultiHeadAttention):
    """GPTModel's attention with the query, key and value projections as three matmuls,
    as the book computes them: what the fused matmul is measured and tested against."""

    def _project_qkv(self, x):
        return [projection(x) for projection in (self.W_query, self.W_key, self.W_value)]


def separate_qkv(model):
    """`model` (a GPTModel) with every attention layer computing three projection matmuls
    instead of one; the parameters, their order and the state dict stay the same."""
    for module in model.modules():
        if type(module) is MultiHeadAttention:
            module.__class__ = SeparateQKVAttention
    return model
