"""test_loss.py: the test-set slicing and loss, against a plain per-sequence loop."""

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from evalkit import one_torch_thread  # noqa: F401  (autouse fixture)
from evalkit import assert_one_error_line, run_cli, run_script, tiny_config, write_model

import test_loss
from token_data import TokenFileWriter

CONTEXT = 16
CFG = tiny_config(vocab_size=300, context_length=CONTEXT, emb_dim=16)


def write_dataset(directory, validation_tokens):
    directory.mkdir(parents=True, exist_ok=True)
    # Without meta.json a dataset is GPT-2's, whose ids would not fit the model.
    (directory / "meta.json").write_text(json.dumps({"tokenizer": "test", "vocab_size": 300, "eot_id": 299}))
    for split, tokens in (("train", np.arange(10) % 300), ("validation", validation_tokens)):
        with TokenFileWriter(directory / f"{split}.safetensors") as writer:
            writer.write(tokens)
            writer.commit()
    return directory


def plain_test_loss(model, tokens, start, batches, batch_size):
    """The reference harness's definition written out: batch b holds sequences
    start + (b * batch_size + row) * CONTEXT, targets shifted by one; the loss is the
    mean over batches of the mean over their tokens of -log p(target)."""
    batch_losses = []
    with torch.no_grad():
        for b in range(batches):
            token_losses = []
            for row in range(batch_size):
                begin = start + (b * batch_size + row) * CONTEXT
                x = torch.tensor(tokens[begin:begin + CONTEXT], dtype=torch.long)
                y = tokens[begin + 1:begin + CONTEXT + 1]
                log_probs = torch.log_softmax(model(x[None])[0].double(), dim=-1)
                token_losses += [-float(log_probs[t, int(y[t])]) for t in range(CONTEXT)]
            batch_losses.append(sum(token_losses) / len(token_losses))
    return sum(batch_losses) / len(batch_losses)


def printed_loss(output):
    return float(re.search(r"^Loss against our test dataset: (\d+\.\d{6})$", output, re.M).group(1))


def test_loss_matches_plain_loop_and_json_is_written_only_where_asked(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 300, size=400, dtype=np.uint16)
    dataset_dir = write_dataset(tmp_path / "data", tokens)
    checkpoint = tmp_path / "runs" / "r" / "checkpoints" / "20250101Z000000-iteration-5"
    model_json, _, model = write_model(checkpoint, CFG)
    (checkpoint.parent / "best").symlink_to(checkpoint.name)
    options = ["--dataset", str(dataset_dir), "--start-token", "7", "--batches", "3", "--batch-size", "2"]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    result = run_cli("test_loss.py", [checkpoint.parent / "best", *options], cwd=cwd)
    assert result.returncode == 0, result.stderr
    expected = plain_test_loss(model, tokens, start=7, batches=3, batch_size=2)
    assert printed_loss(result.stdout) == round(expected, 6)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no --json: no file

    for spelling in ("--json", "--json-path"):  # --json-path: the older spelling, hidden
        path = tmp_path / "out" / f"{spelling}.json"
        result = run_cli("test_loss.py", [model_json, checkpoint.parent / "best" / "model.safetensors",
                                          *options, spelling, path], cwd=cwd)
        assert result.returncode == 0, result.stderr
        written = json.loads(path.read_text())
        assert math.isclose(written["loss"], expected, abs_tol=1e-6)
        assert written["tokens"] == 3 * 2 * CONTEXT
        assert written["parameters"] == sum(p.numel() for p in model.parameters())
    assert "--json-path" not in run_cli("test_loss.py", ["--help"], cwd=cwd).stdout


def test_hub_dataset_is_downloaded_into_datasets_dir(tmp_path, monkeypatch):
    # The Hub itself is out of reach in tests: snapshot_download is replaced by a
    # copy from a local directory; the call's arguments are what is checked.
    tokens = np.random.default_rng(1).integers(0, 300, size=200, dtype=np.uint16)
    source = write_dataset(tmp_path / "hub-copy", tokens)
    calls = []

    def fake_snapshot_download(repo_id, repo_type, local_dir, **kwargs):
        calls.append((repo_id, repo_type, local_dir))
        shutil.copytree(source, local_dir, dirs_exist_ok=True)
        return str(local_dir)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    model_json, weights, model = write_model(tmp_path / "model", CFG)
    datasets_dir = tmp_path / "datasets"
    result = CliRunner().invoke(test_loss.main, [
        str(datasets_dir), str(model_json), str(weights), "--dataset", "someone/tokens",
        "--start-token", "0", "--batches", "2", "--batch-size", "3"])
    assert result.exit_code == 0, result.output + result.stderr
    assert calls == [("someone/tokens", "dataset", datasets_dir / "someone/tokens")]
    assert printed_loss(result.stdout) == round(plain_test_loss(model, tokens, 0, 2, 3), 6)


@pytest.mark.e2e
def test_too_short_dataset_is_one_error_line(tmp_path):
    dataset_dir = write_dataset(tmp_path / "data", np.zeros(100, dtype=np.uint16))
    model_json, weights, _ = write_model(tmp_path / "model", CFG)
    # 2 batches of 3 x 16 tokens from token 5 need 5 + 96 + 1 = 102 tokens.
    result = run_script("test_loss.py", tmp_path, model_json, weights, "--dataset", dataset_dir,
                        "--start-token", 5, "--batches", 2, "--batch-size", 3)
    assert_one_error_line(result, "has 100 tokens", "need 102")
