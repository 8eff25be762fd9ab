"""perf.py's FLOP counts and GPU peaks against hand-computed values, PlainGPT as a
like-for-like baseline, and the output tables of bench.py (on one device, and sharded
under FSDP over a world of one and over two torchrun processes) and bench_generate.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import bench
import bench_generate
from conftest import train_env
from evalkit import assert_one_error_line, one_torch_thread, run_script  # noqa: F401  (one_torch_thread: autouse
# fixture, which also restores what --threads sets)
from plain_gpt import PlainGPT
import perf
from config import ModelConfig
from gpt import GPTModel

PROJECT_DIR = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=100, context_length=16, emb_dim=8, n_heads=2, n_layers=3, drop_rate=0.0)


# ---------------------------------------------------------------- FLOPs

def test_flops_per_token_for_a_small_config_by_hand():
    # Matmul weights per layer: q, k, v, out 4 * 8 * 8 = 256; feed-forward 8*32 + 32*8 = 512.
    # N = 3 layers * 768 + output head 100 * 8 = 2304 + 800 = 3104; 6 * N = 18624.
    # Attention: 12 * 3 layers * 8 emb * 16 context = 4608.
    assert perf.training_flops_per_token(ModelConfig.from_dict(TINY)) == 18624 + 4608


def test_flops_per_token_for_gpt2_small_by_hand():
    cfg = ModelConfig.from_dict(dict(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12,
                                     n_layers=12, qkv_bias=False, tie_weights=False))
    # N = 12 * 12 * 768^2 + 50257 * 768 = 84,934,656 + 38,597,376 = 123,532,032
    # 6 N = 741,192,192; attention 12 * 12 * 768 * 1024 = 113,246,208
    assert perf.training_flops_per_token(cfg) == 854_438_400
    # Neither tying nor biases change the matmuls.
    for change in ({"tie_weights": True}, {"qkv_bias": True}):
        assert perf.training_flops_per_token(ModelConfig.from_dict({**cfg.to_dict(), **change})) == 854_438_400


@pytest.mark.parametrize("tie_weights", [False, True])
def test_matmul_weights_are_the_linear_layer_weights_of_the_model(tie_weights):
    model = GPTModel({**TINY, "tie_weights": tie_weights})
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert perf.matmul_weights(model.cfg) == linear_weights


# ---------------------------------------------------------------- peaks and MFU

@pytest.mark.parametrize("device_name, precision, tflops", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.5),
    ("NVIDIA H100 PCIe", "bfloat16", 756.5),
    ("NVIDIA H100 NVL", "float16", 835.5),
    ("NVIDIA H200", "tf32", 494.5),
    ("NVIDIA B200", "bfloat16", 2250.0),
    ("NVIDIA A100-SXM4-40GB", "bfloat16", 312.0),
    ("NVIDIA A100 80GB PCIe", "tf32", 156.0),
    ("NVIDIA L40S", "bfloat16", 362.05),
    ("NVIDIA L4", "bfloat16", 121.0),
    ("NVIDIA A10G", "bfloat16", 70.0),
    ("NVIDIA A10", "bfloat16", 125.0),
    ("NVIDIA GeForce RTX 3090", "bfloat16", 71.0),
    ("NVIDIA GeForce RTX 4090", "float16", 165.2),
    ("NVIDIA RTX A6000", "bfloat16", 154.8),
    ("Tesla V100-SXM2-16GB", "float16", 125.0),
    ("Tesla V100-PCIE-32GB", "float16", 112.0),
    ("Tesla T4", "float16", 65.0),
])
def test_peak_flops_by_device_name(device_name, precision, tflops):
    assert perf.peak_flops(device_name, precision) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("device_name, precision", [
    ("Tesla T4", "bfloat16"),  # no bf16 tensor cores
    ("NVIDIA GeForce RTX 3090 Ti", "bfloat16"),  # not the 3090
    ("AMD EPYC", "bfloat16"),
    ("", "float16"),
])
def test_peak_flops_unknown_is_none_unless_overridden(device_name, precision):
    assert perf.peak_flops(device_name, precision) is None
    assert perf.peak_flops(device_name, precision, override=5e12) == 5e12


def test_mfu():
    # 1,000 tokens/s * 1e9 FLOPs per token = 1e12 FLOP/s of a 1e13 peak.
    assert perf.mfu(1000, 1e9, 1e13) == pytest.approx(0.1)
    assert perf.mfu(1000, 1e9, None) is None


# ---------------------------------------------------------------- PlainGPT and bench.py

def test_plain_gpt_is_like_for_like_under_bench_precision():
    """bench --compare times PlainGPT against GPTModel with the same weights under
    bf16 autocast; both must compute the same thing there too (in fp32 the logits
    match to 1e-5: tests/test_gpt.py)."""
    cfg = {**TINY, "tie_weights": True, "qkv_bias": True}
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    plain = PlainGPT(model.cfg).eval()
    plain.load_state_dict(model.state_dict())  # strict: the same names, no mask buffer
    assert plain.out_head.weight is plain.tok_emb.weight
    assert sum(p.numel() for p in plain.parameters()) == model.num_parameters()
    idx = torch.randint(0, cfg["vocab_size"], (2, cfg["context_length"]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, plain_logits = model(idx).float(), plain(idx).float()
    torch.testing.assert_close(logits, plain_logits, rtol=0.05, atol=0.05)


def run_bench(*args):
    """`python bench.py ARGS` in this process; the global RNG its seeded model builds move is put back."""
    rng = torch.get_rng_state()
    try:
        return run_script("bench.py", *args)
    finally:
        torch.set_rng_state(rng)


def bench_lines(*args):
    result = run_bench(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def table(lines):
    """The header's words and the rows' words of bench.py's table."""
    header = next(line for line in lines if line.startswith("model "))
    rows = [line.split() for line in lines[lines.index(header) + 1:] if line.startswith(("GPTModel ", "PlainGPT "))]
    return header.split(), rows


CPU_HEADER = ["model", "microbatch", "tokens/s", "step", "mean", "s", "step", "p50", "s", "peak", "RSS", "GB", "MFU"]


def test_bench_prints_a_row_per_model_and_microbatch_and_the_ratio(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({**TINY, "drop_rate": 0.1}))
    lines = bench_lines(tmp_path, "--microbatch-size", "1,2", "--steps", "2", "--warmup-steps", "1", "--compare",
                        "--threads", "1")
    assert lines[0].startswith("machine: CPU ") and "1 threads" in lines[0]
    assert "parallelism: ddp: one device, the step without the gradient all-reduce" in lines
    header, rows = table(lines)
    assert header == CPU_HEADER
    assert [(row[0], row[1]) for row in rows] == [("GPTModel", "1"), ("PlainGPT", "1"),
                                                  ("GPTModel", "2"), ("PlainGPT", "2")]
    assert all(len(row) == 7 and row[-1] == "n/a" for row in rows)  # no peak for a CPU
    ratios = [line.split() for line in lines if line.startswith("ratio at microbatch")]
    assert [(row[3], row[-1][-1]) for row in ratios] == [("1:", "x"), ("2:", "x")]


def test_bench_reports_mfu_given_a_peak(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps(TINY))
    lines = bench_lines(tmp_path / "model.json", "--microbatch", "1", "--steps", "2", "--warmup", "0",
                      "--no-amp", "--separate-qkv", "--pad-vocab", "64", "--peak-tflops", "1", "--threads", "1")
    assert ("GPTModel built with: fused_qkv=False, pad_vocab_to_multiple_of=64, activation_checkpointing=False, "
            "loss_chunk_tokens=None") in lines
    header = next(line for line in lines if line.startswith("model "))
    assert "precision: fp32 (no autocast)" in next(line for line in lines if line.startswith("precision:"))
    row = lines[lines.index(header) + 1].split()
    assert row[0] == "GPTModel" and row[-1].endswith("%")


def test_bench_takes_the_peak_from_the_gpu_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    bf16 = bench.Precision(torch.bfloat16, autocast_dtype=torch.bfloat16)
    peak, text = bench.device_peak(torch.device("cuda"), bf16, None)
    assert peak == pytest.approx(989.5e12) and "H100 SXM" in text
    assert bench.device_peak(torch.device("cuda"), bf16, 100.0)[0] == 100e12
    assert bench.device_peak(torch.device("cpu"), bf16, None)[0] is None
    # Under FSDP the policy casts instead of autocast: the same bf16 peak.
    fsdp_bf16 = bench.Precision(torch.bfloat16, autocast_dtype=None)
    assert bench.device_peak(torch.device("cuda"), fsdp_bf16, None)[0] == peak


def test_bench_under_fsdp_shards_over_a_world_of_one(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps(TINY))
    lines = bench_lines(tmp_path, "--parallelism", "fsdp", "--microbatch", "1,2", "--steps", "1", "--warmup", "1",
                        "--threads", "1")
    assert lines[0].startswith("machine: CPU ")
    parallelism = next(line for line in lines if line.startswith("parallelism: "))
    assert parallelism.startswith("parallelism: fsdp: sharded over 1 rank (parallelism.shard)")
    assert "precision: bfloat16 (FSDP2 MixedPrecisionPolicy, no autocast)" in next(
        line for line in lines if line.startswith("precision:"))
    header, rows = table(lines)
    assert header == CPU_HEADER
    assert [row[:2] for row in rows] == [["GPTModel", "1"], ["GPTModel", "2"]]
    assert all(len(row) == 7 and float(row[2].replace(",", "")) > 0 for row in rows)  # tokens/s


@pytest.mark.parametrize("options, named", [
    (["--compare"], "--compare"),
    (["--separate-qkv"], "--separate-qkv"),
    (["--pad-vocab", "64"], "--pad-vocab 64"),
    (["--dtype", "float16"], "float16"),  # parallelism.check_supported, as training refuses it
])
def test_bench_under_fsdp_refuses_what_training_does_not_shard(tmp_path, options, named):
    (tmp_path / "model.json").write_text(json.dumps(TINY))
    result = run_bench(tmp_path, "--parallelism", "fsdp", *options)
    assert_one_error_line(result, named, "fsdp")


@pytest.mark.e2e
def test_bench_under_fsdp_on_two_processes_prints_once_from_rank_0(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps(TINY))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(PROJECT_DIR / "bench.py"), tmp_path, "--parallelism", "fsdp", "--microbatch", "1", "--steps", "1",
         "--warmup", "1", "--no-amp"],
        cwd=PROJECT_DIR, env=train_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sum(line.startswith("machine: ") for line in lines) == 1, result.stdout
    assert "sharded over 2 ranks" in next(line for line in lines if line.startswith("parallelism: "))
    assert [row[:2] for row in table(lines)[1]] == [["GPTModel", "1"]]


def test_bench_generate_prints_both_paths_their_ratio_and_that_they_agree(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps(TINY))
    result = CliRunner().invoke(bench_generate.main, [str(tmp_path), "--prompt-tokens", "4", "--new-tokens", "20",
                                                      "--batch", "2", "--repeats", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("machine: CPU ") and "1 threads" in lines[0]
    assert "the window slides from new token 14 on: from there the cache is refilled at every step" in lines
    header = lines.index("path         tokens/s  call p50 s  call mean s")
    assert [line.split()[:2] for line in lines[header + 1:header + 3]] == [["KV", "cache"], ["no", "cache"]]
    assert lines[-1].startswith("KV cache / no cache tokens/s = ")
    assert lines[-1].endswith("x; outputs identical token for token: yes")
