"""GPT-2 architecture, as in "Build a Large Language Model (from Scratch)" and the
reference harness gpjt/ddp-base-model-from-scratch.

Parameter names match the reference harness exactly, so its `model.safetensors`
files load unchanged. The one difference is that no T x T causal-mask buffer is
stored: attention uses `scaled_dot_product_attention(is_causal=True)`.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ModelConfig


class LayerNorm(nn.Module):
    def __init__(self, emb_dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class MultiHeadAttention(nn.Module):
    def __init__(self, emb_dim, n_heads, drop_rate, qkv_bias):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = emb_dim // n_heads
        self.W_query = nn.Linear(emb_dim, emb_dim, bias=qkv_bias)
        self.W_key = nn.Linear(emb_dim, emb_dim, bias=qkv_bias)
        self.W_value = nn.Linear(emb_dim, emb_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(emb_dim, emb_dim)
        self.drop_rate = drop_rate

    def _split_heads(self, x):
        batch, seq_len, _ = x.shape
        return x.view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        batch, seq_len, emb_dim = x.shape
        queries = self._split_heads(self.W_query(x))
        keys = self._split_heads(self.W_key(x))
        values = self._split_heads(self.W_value(x))
        context = F.scaled_dot_product_attention(
            queries, keys, values,
            dropout_p=self.drop_rate if self.training else 0.0,
            is_causal=True,
        )
        context = context.transpose(1, 2).reshape(batch, seq_len, emb_dim)
        return self.out_proj(context)


class FeedForward(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        # Index 1 is the (parameter-free) GELU, so the Linear layers keep the
        # reference key names `ff.layers.0` and `ff.layers.2`.
        self.layers = nn.Sequential(
            nn.Linear(emb_dim, 4 * emb_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * emb_dim, emb_dim),
        )

    def forward(self, x):
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.att = MultiHeadAttention(cfg.emb_dim, cfg.n_heads, cfg.drop_rate, cfg.qkv_bias)
        self.ff = FeedForward(cfg.emb_dim)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    """`cfg` is a model.json dict or a ModelConfig; it is validated either way."""

    def __init__(self, cfg):
        super().__init__()
        cfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig.from_dict(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight

    def forward(self, idx):
        seq_len = idx.shape[1]
        if seq_len > self.cfg.context_length:
            raise ValueError(
                f"sequence length {seq_len} exceeds context_length {self.cfg.context_length}"
            )
        positions = torch.arange(seq_len, device=idx.device)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(positions))
        x = self.trf_blocks(x)
        return self.out_head(self.final_norm(x))

    def num_parameters(self):
        """Unique parameters: a tied output head is counted once."""
        return sum(p.numel() for p in self.parameters())


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=0.0, top_k=None, eos_id=None,
             generator=None):
    """Extend `idx` ([batch, T] token ids) by up to `max_new_tokens` tokens.

    temperature 0 is greedy decoding. The context is cropped to the model's
    context_length. Generation stops once every row has produced `eos_id`
    (which is kept in the output); rows that finished early are padded with it.
    """
    context_length = model.cfg.context_length
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_length:])[:, -1, :].float()
        if temperature > 0:
            if top_k is not None:
                kth_largest = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth_largest, float("-inf"))
            probs = torch.softmax(logits / temperature, dim=-1)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)
        else:
            next_id = logits.argmax(dim=-1, keepdim=True)
        if eos_id is not None:
            next_id = next_id.masked_fill(finished.unsqueeze(1), eos_id)
            finished |= next_id.squeeze(1) == eos_id
        idx = torch.cat([idx, next_id], dim=1)
        if eos_id is not None and bool(finished.all()):
            break
    return idx
