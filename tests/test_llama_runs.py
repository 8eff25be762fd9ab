"""A Llama-style model (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, tied)
through the whole harness in tiny form: it trains, its memory levers train the same,
it resumes exactly, and the evaluation scripts read its checkpoints."""

import math

import pytest
import torch
from safetensors.torch import load_file

import perf
from config import ModelConfig
from conftest import TINY_MODEL, make_run, read_rows, rewind_to_checkpoint, run_training, tokens_for
from evalkit import run_script
from gpt import GPTModel
from plain_gpt import PlainGPT
from token_data import open_split

TINY_LLAMA = {**TINY_MODEL, "n_heads": 4, "pos_emb": "rope", "rope_theta": 500000.0, "norm": "rmsnorm",
              "mlp": "swiglu", "mlp_hidden_dim": 64, "n_kv_heads": 2, "bias": False, "tie_weights": True,
              "drop_rate": 0.1, "init_std": 0.02}


def losses(run_dir):
    return [row["loss"] for row in read_rows(run_dir)]


def test_memory_levers_train_like_the_plain_path(tmp_path, verdict_dataset):
    common = dict(min_train_tokens=tokens_for(4, 1, accumulation=2), gradient_accumulation_steps=2,
                  checkpoint_interval=100)
    plain = make_run(tmp_path / "plain", verdict_dataset, model=TINY_LLAMA, **common)
    levers = make_run(tmp_path / "levers", verdict_dataset, model=TINY_LLAMA, activation_checkpointing=True,
                      loss_chunk_tokens=50, **common)
    run_training([plain, "datasets"])
    run_training([levers, "datasets"])
    assert len(losses(plain)) == 4
    assert losses(levers) == pytest.approx(losses(plain), rel=1e-5)


def test_llama_run_resumes_exactly_and_the_scripts_read_its_checkpoint(tmp_path, verdict_dataset):
    """The two new presets in tiny form at once: the Llama-style model, trained on a fixed
    global batch in tokens for a budget in tokens per parameter."""
    steps, global_batch_tokens = 6, tokens_for(1, 1, accumulation=2)
    parameters = perf.parameter_count(ModelConfig.from_dict(TINY_LLAMA))
    tokens_per_parameter = round((steps - 0.5) * global_batch_tokens / parameters, 6)  # rounds up to 6 steps
    full = make_run(tmp_path / "full", verdict_dataset, model=TINY_LLAMA, global_batch_tokens=global_batch_tokens,
                    train_tokens_per_parameter=tokens_per_parameter, checkpoint_interval=3,
                    schedule_learning_rate=True, warmup_period_percent=20)
    assert f"budget: train_tokens_per_parameter {tokens_per_parameter}" in run_training([full, "datasets"]).stdout
    assert len(losses(full)) == steps
    resumed = rewind_to_checkpoint(full, 3, tmp_path / "resumed")
    checkpoints = resumed / "checkpoints"
    run_training([resumed, "datasets", "latest"])
    assert losses(resumed)[4:] == losses(full)[4:]
    final = full / "checkpoints" / "latest" / "model.safetensors"
    final_full, final_resumed = load_file(final), load_file(checkpoints / "latest" / "model.safetensors")
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)

    # test_loss.py's number equals the plain implementation's on the same batches.
    model = GPTModel(TINY_LLAMA)
    model.load_state_dict(final_full)
    plain = PlainGPT(model.cfg).eval()
    plain.load_state_dict(model.state_dict())
    result = run_script("test_loss.py", "datasets", full / "model.json", final, "--dataset", verdict_dataset,
                        "--start-token", 0, "--batches", 2, "--batch-size", 2, "--no-amp")
    assert result.returncode == 0, result.stderr
    context = TINY_LLAMA["context_length"]
    tokens = torch.from_numpy(open_split(verdict_dataset, "validation")[:2 * 2 * context + 1].astype("int64"))
    with torch.no_grad():
        expected = sum(plain(tokens[i * 2 * context:(i + 1) * 2 * context].view(2, context),
                             tokens[i * 2 * context + 1:(i + 1) * 2 * context + 1].view(2, context)).item()
                       for i in range(2)) / 2
    printed = float(result.stdout.split("Loss against our test dataset:")[1])
    assert printed == pytest.approx(expected, abs=2e-6)
    assert printed < math.log(257)  # below a uniform guess over the bytes: it learned

    smoke = run_script("test_smoke.py", full / "model.json", final, "--temperature", 0, "--max-new-tokens", 5,
                       "--datasets-dir", "datasets")
    assert smoke.returncode == 0, smoke.stderr
    assert smoke.stdout.strip()
