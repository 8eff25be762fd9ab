"""Model FLOPs per token and MFU (model FLOPs utilisation).

FLOP accounting (PaLM paper, appendix B; nanoGPT's `estimate_mfu`): a training
step costs 3x the forward pass (the backward pass computes gradients for both
activations and weights, 2x the forward). The forward pass per token costs

- 2 FLOPs per weight of every matmul: N = per layer the query and output
  projections (2 * emb_dim^2), the key and value projections (2 * emb_dim *
  n_kv_heads * head_dim: smaller under grouped-query attention), the feed-forward
  (2 * emb_dim * hidden for GELU or ReLU^2, 3 * emb_dim * hidden for SwiGLU's gate,
  up and down; hidden = mlp_hidden_dim, 4 * emb_dim by default), plus the output head,
  vocab_size * emb_dim. GPT-2 small's layer is the familiar 12 * emb_dim^2. The
  output head counts whether or not it is
  tied to the token embedding, because it is a matmul either way. The token and
  position embeddings are lookups and count nothing; nor do biases, norms (QK-norm
  too), GELU/SiLU/ReLU^2, RoPE's rotations, softmax, the logit soft cap, U-net skips'
  weighted sums or the loss (elementwise work, a few FLOPs per activation);
- attention: per layer, scores q.k against context_length keys (2 * T * emb)
  and the weighted sum of values (2 * T * emb). As in PaLM and nanoGPT the full
  T x T square is counted although causal masking makes half of it unneeded.

So training FLOPs per token = 6 * N + 12 * n_layers * emb_dim * context_length.
These are *model* FLOPs: work a padded vocabulary, recomputation or a kernel
that skips masked blocks does or avoids is not counted, so MFU compares
implementations on the same footing. Sequences are assumed to be full
context_length long, as ddp_train.py trains them.

Peak throughputs are dense (no 2:4 structured sparsity) tensor-core numbers from
the vendor datasheets and whitepapers named beside each GPU: datasheets print
the sparse figure with an asterisk, which is twice the dense one.
"""

import re
from dataclasses import dataclass

PRECISIONS = ("bfloat16", "float16", "tf32")


def matmul_weights(model_cfg):
    """N above: the weights of every matmul, including the output head."""
    emb, kv_dim = model_cfg.emb_dim, model_cfg.kv_heads * model_cfg.head_dim
    attention = 2 * emb * emb + 2 * emb * kv_dim  # query and output; key and value
    feed_forward = (3 if model_cfg.mlp == "swiglu" else 2) * emb * model_cfg.ff_hidden_dim
    return model_cfg.n_layers * (attention + feed_forward) + model_cfg.vocab_size * emb


def parameter_count(model_cfg):
    """GPTModel's unique parameters from the config alone, without building it: every
    matmul weight (matmul_weights, less the output head when it is tied to the token
    embedding), the token embedding, the position table with learned positions, the
    norms' scales (and LayerNorm's shifts with `bias`), the query/key/value biases with
    qkv_bias, the output projection's and feed-forward's biases with `bias`, and the
    n_layers // 2 skip weights with unet_skips (QK-norm has no parameters)."""
    emb, hidden, kv_dim = model_cfg.emb_dim, model_cfg.ff_hidden_dim, model_cfg.kv_heads * model_cfg.head_dim
    norm = emb * (2 if model_cfg.norm == "layernorm" and model_cfg.bias else 1)
    biases = (emb + 2 * kv_dim if model_cfg.qkv_bias else 0)
    if model_cfg.bias:
        biases += emb + (2 * hidden if model_cfg.mlp == "swiglu" else hidden) + emb  # output projection; ff
    embeddings = model_cfg.vocab_size * emb + (model_cfg.context_length * emb if model_cfg.pos_emb == "learned" else 0)
    tied_head = model_cfg.vocab_size * emb if model_cfg.tie_weights else 0
    skip_weights = model_cfg.n_layers // 2 if model_cfg.unet_skips else 0
    return (matmul_weights(model_cfg) - tied_head + embeddings + model_cfg.n_layers * (2 * norm + biases) + norm
            + skip_weights)


def training_flops_per_token(model_cfg):
    weights = 2 * matmul_weights(model_cfg)
    attention = model_cfg.n_layers * (2 + 2) * model_cfg.context_length * model_cfg.emb_dim
    return 3 * (weights + attention)


@dataclass(frozen=True)
class GpuPeak:
    """Dense tensor-core TFLOPS; None where the GPU has no tensor-core support for it."""
    name: str
    bfloat16: float | None
    float16: float | None
    tf32: float | None
    source: str


A100 = "NVIDIA A100 datasheet (same for 40/80 GB, SXM and PCIe)"
H100 = "NVIDIA H100 datasheet"
# Most specific first: "H100 NVL" and "H100 PCIe" before the SXM part, whose
# torch.cuda.get_device_name() is just "NVIDIA H100 80GB HBM3".
GPU_PEAKS = [
    (r"\bH100\b.*\bNVL\b", GpuPeak("H100 NVL", 835.5, 835.5, 417.5, H100)),
    (r"\bH100\b.*\bPCIe\b", GpuPeak("H100 PCIe", 756.5, 756.5, 378.0, H100)),
    (r"\bH100\b", GpuPeak("H100 SXM", 989.5, 989.5, 494.5, H100)),
    (r"\bH200\b.*\bNVL\b", GpuPeak("H200 NVL", 835.5, 835.5, 417.5, "NVIDIA H200 datasheet")),
    (r"\bH200\b", GpuPeak("H200 SXM", 989.5, 989.5, 494.5, "NVIDIA H200 datasheet")),
    (r"\bB200\b", GpuPeak("B200", 2250.0, 2250.0, 1100.0, "NVIDIA HGX B200 datasheet, per GPU")),
    (r"\bA100\b", GpuPeak("A100", 312.0, 312.0, 156.0, A100)),
    (r"\bL40S\b", GpuPeak("L40S", 362.05, 362.05, 183.0, "NVIDIA L40S datasheet")),
    (r"\bL4\b", GpuPeak("L4", 121.0, 121.0, 60.0, "NVIDIA L4 datasheet")),
    # AWS's variant of the A10; NVIDIA publishes no datasheet for it.
    (r"\bA10G\b", GpuPeak("A10G", 70.0, 70.0, 35.0, "AWS/third-party A10G specifications")),
    (r"\bA10\b", GpuPeak("A10", 125.0, 125.0, 62.5, "NVIDIA A10 datasheet")),
    # GeForce cards run FP16/BF16 with FP32 accumulate (what PyTorch uses) at half rate.
    (r"\bRTX 3090\b(?! Ti)", GpuPeak("RTX 3090", 71.0, 71.0, 35.6, "NVIDIA Ampere GA102 whitepaper")),
    (r"\bRTX 4090\b", GpuPeak("RTX 4090", 165.2, 165.2, 82.6, "NVIDIA Ada Lovelace whitepaper")),
    (r"\bRTX A6000\b", GpuPeak("RTX A6000", 154.8, 154.8, 77.4, "NVIDIA RTX A6000 datasheet")),
    # Volta and Turing tensor cores do FP16 only: no bf16, no TF32.
    (r"\bV100\b.*\bPCIE\b", GpuPeak("V100 PCIe", None, 112.0, None, "NVIDIA V100 datasheet")),
    (r"\bV100\b", GpuPeak("V100 SXM2", None, 125.0, None, "NVIDIA V100 datasheet")),
    (r"\bT4\b", GpuPeak("T4", None, 65.0, None, "NVIDIA T4 datasheet")),
]


def find_gpu(device_name):
    """The GPU_PEAKS entry for a torch.cuda.get_device_name(), or None."""
    for pattern, gpu in GPU_PEAKS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return gpu
    return None


def peak_flops(device_name, precision, override=None):
    """Dense peak FLOP/s of `device_name` for matmuls in `precision` (one of
    PRECISIONS), `override` (FLOP/s) if given, or None when unknown."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if override is not None:
        return override
    gpu = find_gpu(device_name)
    tflops = getattr(gpu, precision) if gpu else None
    return None if tflops is None else tflops * 1e12


def mfu(tokens_per_sec_per_device, flops_per_token, peak):
    """Model FLOPs utilisation as a fraction, or None when the peak is unknown."""
    if peak is None:
        return None
    return tokens_per_sec_per_device * flops_per_token / peak
