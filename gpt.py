"""GPT-2 architecture, as in "Build a Large Language Model (from Scratch)" and the
reference harness gpjt/ddp-base-model-from-scratch, with Llama-style options.

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

model.json's architecture options (config.ModelConfig) each swap one small module,
and TransformerBlock is the one place a block is assembled from them:
`pos_emb` "rope" (RotaryEmbedding in the attention instead of a position table),
`norm` "rmsnorm" (RMSNorm), `mlp` "swiglu" (SwiGLUFeedForward), `n_kv_heads`
(grouped-query attention) and `bias` false (no biases, LayerNorm without shift).
All of them set as Llama does, it is a Llama-3-style model; their defaults are
GPT-2, bit for bit.

The modded-nanogpt speedruns' interventions are switches of the same kind, all off
by default (docs/architecture-options.md): `qk_norm` (HeadRMSNorm on queries and keys),
`mlp` "relu2" (FeedForward with ReLUSquared), `zero_init_projections` (the blocks'
output projections start at zero), `logit_softcap` (GPTModel._logits) and `unet_skips`
(GPTModel._run_blocks, with GPTModel.skip_weights).

`generate` keeps each layer's keys and values (KVCache) through
GPTModel.next_token_logits, an inference-only pass that leaves `forward` as training uses it.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from config import ModelConfig


class LayerNorm(nn.Module):
    def __init__(self, emb_dim, eps=1e-5, bias=True):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class RMSNorm(nn.Module):
    """Llama's norm: x / sqrt(mean(x^2) + eps) x scale, with no mean subtracted and no shift."""

    def __init__(self, emb_dim, eps):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))

    def forward(self, x):
        return F.rms_norm(x, self.scale.shape, self.scale, self.eps)


def make_norm(cfg: ModelConfig):
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.emb_dim, cfg.norm_eps)
    return LayerNorm(cfg.emb_dim, cfg.norm_eps, bias=cfg.bias)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer; Llama) for one attention layer's queries or keys.

    Dimension i of a head is rotated together with dimension i + head_dim / 2 (the layout
    of GPT-NeoX and Hugging Face's Llama, whose checkpoints therefore map with no
    permutation; Meta's original code pairs neighbours 2i, 2i + 1 instead). The angles are
    computed once in float64; the tables are buffers that state dicts never hold.
    """

    def __init__(self, head_dim, context_length, theta):
        super().__init__()
        inverse_frequencies = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(context_length, dtype=torch.float64), inverse_frequencies)
        angles = torch.cat([angles, angles], dim=-1)  # [context_length, head_dim]
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x, start_position=0):
        """x: [batch, heads, seq_len, head_dim] at positions start_position, start_position + 1, ..."""
        positions = slice(start_position, start_position + x.shape[-2])
        cos, sin = self.cos[positions].to(x.dtype), self.sin[positions].to(x.dtype)
        first_half, second_half = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-second_half, first_half], dim=-1) * sin


class HeadRMSNorm(nn.Module):
    """QK-norm: each query and key head scaled to unit root mean square, with no learnable
    scale (as modded-nanogpt), so the attention scores q.k / sqrt(head_dim) lie within
    +-sqrt(head_dim) and cannot grow with the weights. It runs in fp32, as autocast runs
    layer_norm, and returns the projections' dtype, which attention expects of q, k and v alike."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x)


class MultiHeadAttention(nn.Module):
    """The three projections run as one matmul over their weights concatenated at
    forward time, instead of three.
    The parameters stay three separate Linear layers, so state dicts and the
    optimizer's parameter list are exactly the reference harness's; the
    concatenation copies 3 * emb^2 weights per layer, which is small next to the
    matmul over every token (docs/performance.md has the measurements), but not
    next to one token's: generate's cached steps run the three matmuls.

    With `n_kv_heads` below `n_heads` (grouped-query attention) the key and value
    projections have n_kv_heads heads, each shared by n_heads / n_kv_heads
    consecutive query heads, as in Llama. With `qk_norm` queries and keys are normalised
    per head (HeadRMSNorm) before RoPE, which, a rotation, keeps their norm anyway."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        kv_dim = self.n_kv_heads * self.head_dim
        self.W_query = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias)
        self.W_key = nn.Linear(cfg.emb_dim, kv_dim, bias=cfg.qkv_bias)
        self.W_value = nn.Linear(cfg.emb_dim, kv_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.bias)
        self.drop_rate = cfg.drop_rate
        self.rope = (RotaryEmbedding(self.head_dim, cfg.context_length, cfg.rope_theta)
                     if cfg.pos_emb == "rope" else None)
        self.qk_norm = HeadRMSNorm(cfg.norm_eps) if cfg.qk_norm else None

    def _split_heads(self, x, heads):
        batch, seq_len, _ = x.shape
        return x.view(batch, seq_len, heads, self.head_dim).transpose(1, 2)

    def _project_qkv(self, x):
        projections = (self.W_query, self.W_key, self.W_value)
        weight = torch.cat([p.weight for p in projections])
        bias = torch.cat([p.bias for p in projections]) if self.W_query.bias is not None else None
        return F.linear(x, weight, bias).split([p.out_features for p in projections], dim=-1)

    def _project_qkv_separately(self, x):
        return [projection(x) for projection in (self.W_query, self.W_key, self.W_value)]

    def forward(self, x, kv_cache=None):
        """With `kv_cache` (a KVCache; eval mode only, see GPTModel.next_token_logits) `x` holds
        the positions after the cached ones, whose keys and values it attends to and extends."""
        batch, seq_len, emb_dim = x.shape
        start_position = 0 if kv_cache is None else kv_cache.length
        # A cached step runs one token, whose matmul reads each weight once: concatenating
        # them first would copy as much again (22% of a GPT-2 small step on CPU, measured).
        project_qkv = self._project_qkv if kv_cache is None else self._project_qkv_separately
        queries, keys, values = project_qkv(x)
        queries = self._split_heads(queries, self.n_heads)
        keys, values = self._split_heads(keys, self.n_kv_heads), self._split_heads(values, self.n_kv_heads)
        if self.qk_norm is not None:
            queries, keys = self.qk_norm(queries), self.qk_norm(keys)
        if self.rope is not None:
            queries, keys = self.rope(queries, start_position), self.rope(keys, start_position)
        if kv_cache is not None:
            keys, values = kv_cache.extend(keys, values)
        dropout_p = self.drop_rate if self.training else 0.0
        if dropout_p > 0 and x.device.type == "cpu":
            # PyTorch's CPU flash-attention kernel has no dropout, and SDPA's
            # fallback then computes in fp32 even under bf16/fp16 autocast, which
            # made GPTModel slower than the book's code (docs/performance.md).
            group = self.n_heads // self.n_kv_heads
            context = _causal_attention_with_dropout(queries, keys.repeat_interleave(group, dim=1),
                                                     values.repeat_interleave(group, dim=1), dropout_p)
        else:
            attn_mask, is_causal = _causal_mask(seq_len, keys.shape[-2], x.device)
            context = F.scaled_dot_product_attention(queries, keys, values, attn_mask=attn_mask, dropout_p=dropout_p,
                                                     is_causal=is_causal, enable_gqa=self.n_kv_heads != self.n_heads)
        context = context.transpose(1, 2).reshape(batch, seq_len, emb_dim)
        return self.out_proj(context)


def _causal_mask(query_len, key_len, device):
    """scaled_dot_product_attention's (attn_mask, is_causal) for queries at the last `query_len`
    of `key_len` positions, each attending to the keys up to its own position.

    is_causal=True aligns its mask to the top left, which is right only when the lengths are
    equal (no cache, or a prefill into an empty one); a single new token sees every key; a
    chunk of new tokens after cached ones needs the mask aligned to the bottom right."""
    if query_len == key_len:
        return None, True
    if query_len == 1:
        return None, False
    mask = torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril(diagonal=key_len - query_len)
    return mask, False


class KVCache:
    """One attention layer's keys and values for the positions processed so far, for generate.

    Keys are stored normalised (qk_norm) and rotated (RoPE), and with n_kv_heads heads, so
    grouped-query attention's smaller cache is kept. The buffers hold `max_length` positions, allocated on first use
    with the keys' batch size, dtype and device, so that a step writes only its new position
    instead of copying the whole cache."""

    def __init__(self, max_length):
        self.max_length = max_length
        self.length = 0
        self.keys = self.values = None

    def extend(self, keys, values):
        """Append keys and values [batch, kv_heads, new positions, head_dim]; return all held."""
        if self.keys is None:
            shape = (*keys.shape[:2], self.max_length, keys.shape[-1])
            self.keys, self.values = keys.new_empty(shape), values.new_empty(shape)
        start, self.length = self.length, self.length + keys.shape[-2]
        self.keys[:, :, start:self.length] = keys
        self.values[:, :, start:self.length] = values
        return self.keys[:, :, :self.length], self.values[:, :, :self.length]

    def clear(self):
        self.length = 0  # the buffers stay, to be overwritten


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


class ReLUSquared(nn.Module):
    """relu(x)^2 (So et al., "Primer", 2021; the modded-nanogpt MLP)."""

    def forward(self, x):
        return F.relu(x).square()


class FeedForward(nn.Module):
    """GPT-2's feed-forward: Linear, GELU (tanh approximation), Linear; with `mlp` "relu2"
    ReLU squared instead of the GELU."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Index 1 is the (parameter-free) activation, so the Linear layers keep the
        # reference key names `ff.layers.0` and `ff.layers.2`.
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, cfg.ff_hidden_dim, bias=cfg.bias),
            ReLUSquared() if cfg.mlp == "relu2" else nn.GELU(approximate="tanh"),
            nn.Linear(cfg.ff_hidden_dim, cfg.emb_dim, bias=cfg.bias),
        )

    @property
    def output_projection(self):
        return self.layers[2]

    def forward(self, x):
        return self.layers(x)


class SwiGLUFeedForward(nn.Module):
    """Llama's feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.emb_dim, cfg.ff_hidden_dim, bias=cfg.bias)
        self.up = nn.Linear(cfg.emb_dim, cfg.ff_hidden_dim, bias=cfg.bias)
        self.down = nn.Linear(cfg.ff_hidden_dim, cfg.emb_dim, bias=cfg.bias)

    @property
    def output_projection(self):
        return self.down

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block. With `activation_checkpointing` it keeps only its input
    for the backward pass and recomputes the rest there (non-reentrant checkpointing,
    which also replays the dropout masks)."""

    def __init__(self, cfg: ModelConfig, activation_checkpointing=False):
        super().__init__()
        self.att = MultiHeadAttention(cfg)
        self.ff = SwiGLUFeedForward(cfg) if cfg.mlp == "swiglu" else FeedForward(cfg)
        self.norm1 = make_norm(cfg)
        self.norm2 = make_norm(cfg)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)
        self.activation_checkpointing = activation_checkpointing

    def forward(self, x, kv_cache=None):
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._residual_layers, x, use_reentrant=False)
        return self._residual_layers(x, kv_cache)

    def _residual_layers(self, x, kv_cache=None):
        x = x + self.drop_shortcut(self.att(self.norm1(x), kv_cache))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x

    def zero_output_projections(self):
        """Make both residual branches output zero, so the block starts as the identity
        (zero_init_projections). Gradients still reach these weights, from the first step."""
        with torch.no_grad():
            for projection in (self.att.out_proj, self.ff.output_projection):
                projection.weight.zero_()
                if projection.bias is not None:
                    projection.bias.zero_()


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

    `activation_checkpointing` and `loss_chunk_tokens` trade compute for memory
    (train.json's keys of the same names); neither changes what is computed.

    With `unet_skips` the model has one more parameter, `skip_weights` (n_layers // 2
    scalars, starting at 1): see _run_blocks.
    """

    def __init__(self, cfg, pad_vocab_to_multiple_of=1, activation_checkpointing=False, loss_chunk_tokens=None):
        super().__init__()
        cfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig.from_dict(cfg)
        if pad_vocab_to_multiple_of < 1:
            raise ValueError(f"pad_vocab_to_multiple_of must be >= 1, got {pad_vocab_to_multiple_of}")
        self.cfg = cfg
        self.loss_chunk_tokens = loss_chunk_tokens
        self.padded_vocab_size = math.ceil(cfg.vocab_size / pad_vocab_to_multiple_of) * pad_vocab_to_multiple_of
        embedding_rows = self.padded_vocab_size if cfg.tie_weights else cfg.vocab_size
        self.tok_emb = nn.Embedding(embedding_rows, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim) if cfg.pos_emb == "learned" else None
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg, activation_checkpointing)
                                          for _ in range(cfg.n_layers)])
        self.final_norm = make_norm(cfg)
        self.out_head = nn.Linear(cfg.emb_dim, self.padded_vocab_size, bias=False)
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight
        self.skip_weights = nn.Parameter(torch.ones(cfg.n_layers // 2)) if cfg.unet_skips else None
        if cfg.init_std is not None:
            self.apply(lambda module: _init_normal(module, cfg.init_std))
        if cfg.zero_init_projections:
            # After the usual draws, so that every other weight is what it would be without.
            for block in self.trf_blocks:
                block.zero_output_projections()
        if self.padded_vocab_size != cfg.vocab_size:
            with torch.no_grad():
                self.out_head.weight[cfg.vocab_size:].zero_()
            self.register_state_dict_post_hook(_drop_vocab_padding)
            self.register_load_state_dict_pre_hook(_add_vocab_padding)

    def forward(self, idx, targets=None, target_weights=None):
        """The logits [batch, seq_len, vocab_size] for token ids `idx`; or, given `targets`,
        the mean cross-entropy loss (computed in fp32) without keeping all the logits; or,
        given `target_weights` too (shaped like targets), the sum of each target's loss
        times its weight (a masked loss: training.compute_loss)."""
        seq_len = idx.shape[1]
        if seq_len > self.cfg.context_length:
            raise ValueError(
                f"sequence length {seq_len} exceeds context_length {self.cfg.context_length}"
            )
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(seq_len, device=idx.device))
        x = self.final_norm(self._run_blocks(self.drop_emb(x)))
        if targets is None:
            return self._logits(x)
        weights = None if target_weights is None else target_weights.flatten()
        return self._loss(x.flatten(0, 1), targets.flatten(), weights)

    @torch.no_grad()
    def next_token_logits(self, idx, kv_caches):
        """Inference only (generate): the logits [batch, vocab_size] for the token after `idx`,
        the positions that follow those held in `kv_caches` (one KVCache per layer), which
        take their keys and values.

        Only the last position goes through the output head: it is all sampling needs, and at
        a vocabulary of 50,257 the head is a prompt's biggest matmul. Eval mode only, so that
        no dropout mask is drawn once and then kept in the cache; without gradients, because
        activation checkpointing would recompute a block and extend its cache twice."""
        if self.training:
            raise RuntimeError("next_token_logits needs eval mode (model.eval())")
        start = kv_caches[0].length
        end = start + idx.shape[1]
        if end > self.cfg.context_length:
            raise ValueError(f"sequence length {end} exceeds context_length {self.cfg.context_length}")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, end, device=idx.device))
        return self._logits(self.final_norm(self._run_blocks(x, kv_caches)[:, -1]))

    def _run_blocks(self, x, kv_caches=None):
        """The blocks in turn, each with its KVCache when `kv_caches` is given.

        With `unet_skips` (modded-nanogpt's U-net), the output of block i in the first half
        is also added, times the learnable skip_weights[i], to the input of its mirror image
        n_layers - 1 - i in the second half; with an odd n_layers the middle block has none."""
        n_layers = len(self.trf_blocks)
        n_skips = 0 if self.skip_weights is None else len(self.skip_weights)
        first_half_outputs = []
        for i, block in enumerate(self.trf_blocks):
            mirror = n_layers - 1 - i
            if mirror < n_skips:
                x = x + self.skip_weights[mirror] * first_half_outputs.pop()
            x = block(x, None if kv_caches is None else kv_caches[i])
            if i < n_skips:
                first_half_outputs.append(x)
        return x

    def _logits(self, x):
        logits = self.out_head(x)[..., :self.cfg.vocab_size]  # without pad columns
        if self.cfg.logit_softcap is None:
            return logits
        # In fp32, which the loss is computed in anyway.
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits.float() / cap)

    def _loss(self, x, targets, weights=None):
        if self.loss_chunk_tokens is None or self.loss_chunk_tokens >= len(targets):
            if weights is None:
                return F.cross_entropy(self._logits(x).float(), targets)
            return self._summed_loss(x, targets, weights)
        # One chunk's logits at a time: each chunk's are freed after its loss and
        # recomputed in the backward pass, which matters at a vocabulary of 131,072.
        splits = [t.split(self.loss_chunk_tokens) for t in (x, targets, weights) if t is not None]
        chunk_losses = [checkpoint(self._summed_loss, *chunk, use_reentrant=False) for chunk in zip(*splits)]
        total = torch.stack(chunk_losses).sum()
        return total if weights is not None else total / len(targets)

    def _summed_loss(self, x, targets, weights=None):
        if weights is None:
            return F.cross_entropy(self._logits(x).float(), targets, reduction="sum")
        return (F.cross_entropy(self._logits(x).float(), targets, reduction="none") * weights).sum()

    def num_parameters(self):
        """Unique parameters, as a checkpoint holds them: a tied output head is
        counted once, vocabulary pad rows not at all."""
        padding = (self.padded_vocab_size - self.cfg.vocab_size) * self.cfg.emb_dim
        return sum(p.numel() for p in self.parameters()) - padding


def _init_normal(module, std):
    """GPT-2's and Llama's initialisation: matmul weights and embeddings from N(0, std),
    biases zero (norms keep their ones and zeros). PyTorch's default instead draws
    Linear weights uniformly with a bound of 1 / sqrt(fan_in) and embeddings from
    N(0, 1), which is what the book's model, and so the reference harness, trains from;
    N(0, 1) makes a tied output head's first logits far too large."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


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
             generator=None, use_cache=True, top_p=None):
    """Extend `idx` ([batch, T] token ids) by up to `max_new_tokens` tokens.

    temperature 0 is greedy decoding. The context is cropped to the model's
    context_length. Generation stops once every row has produced `eos_id`
    (which is kept in the output); rows that finished early are padded with it.

    With `use_cache` (in eval mode) each layer keeps its keys and values in a KVCache:
    the prompt goes through the model once, then each step only the new token. Without
    it every step recomputes every position (bench_generate.py measures both). Both give
    the same tokens, to floating-point rounding: see _next_logits_with_cache for the
    context window. In train mode the cache is never used: recomputing every position
    draws new dropout masks for all of them at each step, and a cache would instead keep
    each position's first mask, a different distribution of samples.
    """
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for next_id in generate_tokens(model, idx, max_new_tokens, temperature, top_k, top_p,
                                   generator, use_cache):
        if eos_id is not None:
            next_id = next_id.masked_fill(finished.unsqueeze(1), eos_id)
            finished |= next_id.squeeze(1) == eos_id
        idx = torch.cat([idx, next_id], dim=1)
        if eos_id is not None and bool(finished.all()):
            break
    return idx


@torch.no_grad()
def generate_tokens(model, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                    generator=None, use_cache=True):
    """generate's steps as an iterator: yields each new token, [batch, 1] ids, as soon as it
    is picked, so that a caller can stream it or stop early (chat.py and serve.py do)."""
    context_length = model.cfg.context_length
    kv_caches = ([KVCache(context_length) for _ in model.trf_blocks]
                 if use_cache and not model.training else None)
    for _ in range(max_new_tokens):
        if kv_caches is None:
            logits = model(idx[:, -context_length:])[:, -1, :]
        else:
            logits = _next_logits_with_cache(model, idx, kv_caches)
        next_id = _pick_next_token(logits.float(), temperature, top_k, top_p, generator)
        idx = torch.cat([idx, next_id], dim=1)
        yield next_id


def _next_logits_with_cache(model, idx, kv_caches):
    """The next-token logits for `idx`, running only the tokens `kv_caches` does not hold.

    Past context_length the cache-free path crops `idx` to its last context_length
    tokens, which then sit at positions 0, 1, ...: every cached key was computed at
    another position, attending to a token now cropped. So, to stay identical, the
    cache is refilled from the cropped window: once the window slides, each step is a
    full pass over context_length tokens, as without the cache."""
    if idx.shape[1] > model.cfg.context_length:
        for kv_cache in kv_caches:
            kv_cache.clear()
        idx = idx[:, -model.cfg.context_length:]
    return model.next_token_logits(idx[:, kv_caches[0].length:], kv_caches)


def _pick_next_token(logits, temperature, top_k, top_p, generator):
    """[batch, 1] token ids: the argmax at temperature 0, else a sample from the top_k most
    likely tokens, then from the fewest whose probabilities sum to top_p (nucleus sampling,
    after the temperature: the most likely token is always kept)."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        beyond_p = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        beyond_p[:, 0] = False
        sorted_probs = sorted_probs.masked_fill(beyond_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, num_samples=1, generator=generator)
