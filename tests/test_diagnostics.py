"""train.json `diagnostics`: per parameter group, the gradient norm before clipping and
||update|| / ||weight|| in every metrics row, and their chart. Checked against a hand
computation: the gradients from an independent backward pass on the same microbatch,
the update from the weights before the step and the checkpoint after it."""

import re

import pytest
import torch
from safetensors.torch import load_file

from batching import Microbatches
from config import ModelConfig
from conftest import TINY_MODEL, make_run, read_rows, run_training, tokens_for
from gpt import GPTModel
from token_data import open_split

# The groups by hand, by parameter name.
GROUPS = {"embeddings": r"(tok|pos)_emb\.weight", "attention": r"trf_blocks\.\d+\.att\..*",
          "mlp": r"trf_blocks\.\d+\.ff\..*", "norms": r".*norm.*\.(scale|shift)", "head": r"out_head\.weight"}


def group_norms(tensors):
    """{group: the 2-norm of its tensors together}, in float64."""
    norms = {}
    for group, pattern in GROUPS.items():
        members = [t.double() for name, t in tensors.items() if re.fullmatch(pattern, name)]
        norms[group] = torch.sqrt(sum((t * t).sum() for t in members)).item()
    return norms


def test_one_step_logs_each_groups_gradient_norm_and_update_ratio_as_computed_by_hand(tmp_path, verdict_dataset):
    run_dir = make_run(tmp_path / "run", verdict_dataset, min_train_tokens=tokens_for(1, 1), clipping_max_norm=0.1,
                       diagnostics=True)
    run_training([run_dir, "datasets"])
    (row,) = read_rows(run_dir)
    assert row["clipped"]  # the norms logged are the gradients' before clipping

    torch.manual_seed(42)  # train.json's random_seed: the trainer's initial weights
    model = GPTModel(ModelConfig(**TINY_MODEL))
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    inputs, targets = Microbatches(open_split(verdict_dataset, "train"), 0, 1, 4, TINY_MODEL["context_length"])[0]
    model(inputs, targets).backward()
    gradients = group_norms({name: p.grad for name, p in model.named_parameters()})
    after = load_file(run_dir / "checkpoints" / "latest" / "model.safetensors")
    updates = group_norms({name: after[name] - initial[name] for name in initial})
    weights = group_norms(initial)

    assert {key for key in row if "/" in key} == {f"{kind}/{group}" for kind in ("grad_norm", "update_ratio")
                                                  for group in GROUPS}
    for group in GROUPS:
        assert row[f"grad_norm/{group}"] == pytest.approx(gradients[group], rel=1e-5), group
        assert row[f"update_ratio/{group}"] == pytest.approx(updates[group] / weights[group], rel=1e-4), group
    assert (run_dir / "diagnostics-chart.png").stat().st_size > 0
    assert 'src="diagnostics-chart.png"' in (run_dir / "charts.html").read_text()


def test_off_by_default(tmp_path, verdict_dataset):
    run_dir = make_run(tmp_path / "run", verdict_dataset, min_train_tokens=tokens_for(1, 1))
    run_training([run_dir, "datasets"])
    assert not [key for key in read_rows(run_dir)[0] if "/" in key]
    assert not (run_dir / "diagnostics-chart.png").exists()
