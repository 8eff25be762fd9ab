"""Options that change how, not what, the model computes: `compile` (torch.compile's CPU
backend, a world of one through the same DDP wrapper) and a padded vocabulary train the
same as the plain model, and their checkpoints keep the plain key names and shapes."""

import json

import pytest
from safetensors.torch import load_file

from conftest import make_run, read_rows, run_training


def test_compiled_and_eager_losses_agree(tmp_path, verdict_dataset):
    common = dict(min_train_tokens=4 * 4 * 32, checkpoint_interval=100, gradient_accumulation_steps=2)
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


def test_padded_vocabulary_trains_the_same_and_saves_unpadded_checkpoints(tmp_path, verdict_dataset):
    common = dict(min_train_tokens=3 * 4 * 32, checkpoint_interval=100)
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
