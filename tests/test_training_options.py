"""Options that change how, not what, the model computes: `compile` (torch.compile's CPU
backend, a world of one through the same DDP wrapper) and a padded vocabulary train the
same as the plain model, and their checkpoints keep the plain key names and shapes."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from config import TrainConfig
from conftest import make_run, read_rows, run_training, tokens_for
from training import amp_dtype_for


@pytest.mark.e2e
def test_compiled_and_eager_losses_agree(tmp_path, verdict_dataset):
    common = dict(min_train_tokens=tokens_for(4, 1), checkpoint_interval=100, gradient_accumulation_steps=2)
    eager = make_run(tmp_path / "eager", verdict_dataset, **common)
    compiled = make_run(tmp_path / "compiled", verdict_dataset, compile=True, **common)
    run_training([eager, "datasets"])
    assert ", compiled" in run_training([compiled, "datasets"]).stdout
    eager_losses = [r["loss"] for r in read_rows(eager)]
    assert len(eager_losses) == 2
    assert [r["loss"] for r in read_rows(compiled)] == pytest.approx(eager_losses, rel=1e-5)
    keys = set(load_file(compiled / "checkpoints" / "latest" / "model.safetensors"))
    assert "tok_emb.weight" in keys and len(keys) == len(set(load_file(eager / "checkpoints" / "latest" /
                                                                         "model.safetensors")))
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in keys)


@pytest.mark.e2e
def test_padded_vocabulary_trains_the_same_and_saves_unpadded_checkpoints(tmp_path, verdict_dataset):
    common = dict(min_train_tokens=tokens_for(3, 1), checkpoint_interval=100)
    plain = make_run(tmp_path / "plain", verdict_dataset, **common)
    padded = make_run(tmp_path / "padded", verdict_dataset, pad_vocab_to_multiple_of=64, **common)
    run_training([plain, "datasets"])
    run_training([padded, "datasets"])
    # The real rows of the padded head are initialised from the same random stream.
    assert [r["loss"] for r in read_rows(padded)] == pytest.approx([r["loss"] for r in read_rows(plain)], rel=1e-5)
    weights = load_file(padded / "checkpoints" / "latest" / "model.safetensors")
    assert weights["out_head.weight"].shape == (257, 32)

    train = json.loads((padded / "train.json").read_text())
    (padded / "train.json").write_text(json.dumps({**train, "pad_vocab_to_multiple_of": 1}))
    refused = run_training([padded, "datasets", "latest"], check=False)
    assert refused.returncode == 2 and "was trained with pad_vocab_to_multiple_of 64" in refused.stderr


@pytest.mark.parametrize("compute_capability_major, expected", [
    (7, torch.float16),  # V100, T4: no bf16 tensor cores
    (8, torch.bfloat16),  # A100, RTX 3090
    (9, torch.bfloat16),  # H100
])
def test_default_autocast_dtype_is_bf16_only_where_the_gpu_runs_it_natively(monkeypatch, compute_capability_major,
                                                                            expected):
    """There is no GPU here, so torch's view of one is replaced: its compute capability,
    and the probe that creates a bf16 tensor, which succeeds on every CUDA GPU, including
    those that only emulate bf16. The decision itself is torch.cuda.is_bf16_supported's."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(major=compute_capability_major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    train_cfg = TrainConfig.from_dict({"dataset": "x/y", "microbatch_size": 1})
    assert amp_dtype_for(train_cfg, torch.device("cuda", 0)) is expected
    chosen = TrainConfig.from_dict({"dataset": "x/y", "microbatch_size": 1, "amp_dtype": "bfloat16"})
    assert amp_dtype_for(chosen, torch.device("cuda", 0)) is torch.bfloat16  # an explicit choice wins
    assert amp_dtype_for(train_cfg, torch.device("cpu")) is torch.bfloat16
    no_amp = TrainConfig.from_dict({"dataset": "x/y", "microbatch_size": 1, "use_amp": False})
    assert amp_dtype_for(no_amp, torch.device("cuda", 0)) is None
