"""GPT-2 architecture, as in "Build a Large Language Model (from Scratch)" and the
reference harness gpjt/ddp-base-model-from-scratch.

Parameter names match the reference harness exactly, so its `model.safetensors`
(and, because the parameter list and order are unchanged, its `optimizer.pt`)
files load unchanged. The differences are all in how the forward pass computes
the same function:

- no T x T causal-mask buffer: attention uses `scaled_dot_product_attention(is_causal=True)`;
- the query, key and value projections run as one matmul over their
  concatenated weights (see MultiHeadAttention; plain_gpt.separate_qkv
  makes the three-matmul variant, for benchmarks and tests);
- optionally the output head is padded to a multiple of some size
  (`pad_vocab_to_multiple_of`) for faster matmul shapes; checkpoints never see
  the padding.
"""

import math

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
    """The three projections run as one [emb, 3 * emb] matmul over their weights
    concatenated at forward time, instead of three [emb, emb] ones.
    The parameters stay three separate Linear layers, so state dicts and the
    optimizer's parameter list are exactly the reference harness's; the
    concatenation copies 3 * emb^2 weights per layer, which is small next to the
    matmul over every token (docs/performance.md has the measurements)."""

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

    def _project_qkv(self, x):
        projections = (self.W_query, self.W_key, self.W_value)
        weight = torch.cat([p.weight for p in projections])
        bias = torch.cat([p.bias for p in projections]) if self.W_query.bias is not None else None
        return F.linear(x, weight, bias).chunk(3, dim=-1)

    def forward(self, x):
        batch, seq_len, emb_dim = x.shape
        queries, keys, values = (self._split_heads(t) for t in self._project_qkv(x))
        dropout_p = self.drop_rate if self.training else 0.0
        if dropout_p > 0 and x.device.type == "cpu":
            # PyTorch's CPU flash-attention kernel has no dropout, and SDPA's
            # fallback then computes in fp32 even under bf16/fp16 autocast, which
            # made GPTModel slower than the book's code (docs/performance.md).
            context = _causal_attention_with_dropout(queries, keys, values, dropout_p)
        else:
            context = F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p,
                                                     is_causal=True)
        context = context.transpose(1, 2).reshape(batch, seq_len, emb_dim)
        return self.out_proj(context)


# Query rows per block in _causal_attention_with_dropout. Block i needs keys up to
# its own last row only, so with T = 1024 the blocks compute 62.5% of the T x T
# scores, softmax and dropout mask; 128 and 256 measured alike on CPU, 512 slower.
CPU_ATTENTION_QUERY_BLOCK = 256


def _causal_attention_with_dropout(queries, keys, values, dropout_p, query_block=CPU_ATTENTION_QUERY_BLOCK):
    """What scaled_dot_product_attention(is_causal=True) computes, in the book's
    steps (masked scores, softmax, dropout, weighted values), so that autocast
    runs the matmuls in low precision. Queries go in blocks that skip the keys
    after their last row, which a causal mask would zero anyway: a flash kernel
    skips them the same way, and it halves the time on CPU."""
    seq_len = queries.shape[-2]
    queries = queries * queries.shape[-1] ** -0.5
    blocks = []
    for start in range(0, seq_len, query_block):
        end = min(start + query_block, seq_len)
        scores = queries[..., start:end, :] @ keys[..., :end, :].transpose(-2, -1)
        # Only the square on the diagonal holds future keys; in place, because
        # matmul's backward does not need its output.
        future = torch.ones(end - start, end - start, dtype=torch.bool, device=scores.device).triu(diagonal=1)
        scores[..., start:].masked_fill_(future, float("-inf"))
        weights = F.dropout(torch.softmax(scores, dim=-1), dropout_p)
        blocks.append(weights @ values[..., :end, :])
    return torch.cat(blocks, dim=-2)


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


# The tensors whose rows are vocabulary entries, and so carry the padding rows.
VOCAB_ROW_KEYS = ("tok_emb.weight", "out_head.weight")


class GPTModel(nn.Module):
    """`cfg` is a model.json dict or a ModelConfig; it is validated either way.

    `pad_vocab_to_multiple_of`: give the output head `vocab_size` rounded up to
    this multiple (64: 50257 -> 50304), a matmul shape GPUs run faster. The pad
    rows start at zero, `forward` cuts the logits back to `vocab_size` (so the
    loss and sampling never see them and they never get a gradient), and state
    dicts hold only the real rows, so checkpoints are interchangeable between
    padded and unpadded models. With `tie_weights` the token embedding is the
    output head, so it is padded too; its pad rows are never looked up.
    """

    def __init__(self, cfg, pad_vocab_to_multiple_of=1):
        super().__init__()
        cfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig.from_dict(cfg)
        if pad_vocab_to_multiple_of < 1:
            raise ValueError(f"pad_vocab_to_multiple_of must be >= 1, got {pad_vocab_to_multiple_of}")
        self.cfg = cfg
        self.padded_vocab_size = math.ceil(cfg.vocab_size / pad_vocab_to_multiple_of) * pad_vocab_to_multiple_of
        embedding_rows = self.padded_vocab_size if cfg.tie_weights else cfg.vocab_size
        self.tok_emb = nn.Embedding(embedding_rows, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, self.padded_vocab_size, bias=False)
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight
        if self.padded_vocab_size != cfg.vocab_size:
            with torch.no_grad():
                self.out_head.weight[cfg.vocab_size:].zero_()
            self.register_state_dict_post_hook(_drop_vocab_padding)
            self.register_load_state_dict_pre_hook(_add_vocab_padding)

    def forward(self, idx):
        seq_len = idx.shape[1]
        if seq_len > self.cfg.context_length:
            raise ValueError(
                f"sequence length {seq_len} exceeds context_length {self.cfg.context_length}"
            )
        positions = torch.arange(seq_len, device=idx.device)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(positions))
        x = self.trf_blocks(x)
        return self.out_head(self.final_norm(x))[..., :self.cfg.vocab_size]  # without pad columns

    def num_parameters(self):
        """Unique parameters, as a checkpoint holds them: a tied output head is
        counted once, vocabulary pad rows not at all."""
        padding = (self.padded_vocab_size - self.cfg.vocab_size) * self.cfg.emb_dim
        return sum(p.numel() for p in self.parameters()) - padding


def _drop_vocab_padding(model, state_dict, prefix, local_metadata):
    """state_dict post-hook: keep only the real vocabulary rows."""
    for key in VOCAB_ROW_KEYS:
        state_dict[prefix + key] = state_dict[prefix + key][:model.cfg.vocab_size]


def _add_vocab_padding(model, state_dict, prefix, local_metadata, strict, missing_keys,
                       unexpected_keys, error_msgs):
    """load_state_dict pre-hook: zero pad rows under real-vocabulary weights.

    Any other shape is left alone for load_state_dict to report."""
    for key in VOCAB_ROW_KEYS:
        own_rows = getattr(model, key.split(".")[0]).weight.shape[0]
        tensor = state_dict.get(prefix + key)
        if tensor is not None and tensor.dim() == 2 and tensor.shape[0] == model.cfg.vocab_size < own_rows:
            padding = tensor.new_zeros(own_rows - tensor.shape[0], tensor.shape[1])
            state_dict[prefix + key] = torch.cat([tensor, padding])


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
