"""`compile: true` trains the same as eager (torch.compile's CPU backend, a world of one
through the same DDP wrapper), and its checkpoints keep the plain key names."""

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
