"""The worked pipeline's tiny CPU form: runs/chat-tiny-pretrain -> chat-tiny-midtrain (a mixture of
text and conversations, from the pre-training's best) -> chat-tiny-sft (conversations, masked loss,
from the mid-training's best), trained end to end on datasets this test writes with
prepare_datasets.py from the shared text and instruction data."""

import json
import shutil

import pytest
from click.testing import CliRunner

import prepare_datasets
from conftest import PROJECT_DIR, SHARED_DATA, read_rows, run_training
from test_conversations import alpaca_conversations

STAGES = ("chat-tiny-pretrain", "chat-tiny-midtrain", "chat-tiny-sft")


def prepare(*args):
    result = CliRunner().invoke(prepare_datasets.main, [str(a) for a in args] + ["--workers", "1"])
    assert result.exit_code == 0, result.output


def write_datasets(datasets):
    """The presets' datasets: the verdict's paragraphs as documents (GPT-2 tokens), and the first
    300 instruction-data entries as conversations."""
    paragraphs = [p for p in (SHARED_DATA / "the-verdict.txt").read_text().split("\n\n") if p.strip()]
    text = datasets.parent / "verdict.jsonl"
    text.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    prepare(datasets / "chat-tiny-text", text, "--validation-fraction", "0.2")
    conversations = datasets.parent / "alpaca.jsonl"
    conversations.write_text("".join(json.dumps({"messages": m}) + "\n" for m in alpaca_conversations(300)))
    prepare(datasets / "chat-tiny-conversations", conversations, "--conversations", "--context-length", "64",
            "--validation-fraction", "0.1")


@pytest.mark.e2e  # prepare_datasets.py's worker processes, and three runs
def test_pretrain_midtrain_sft_chain(tmp_path):
    write_datasets(tmp_path / "datasets")
    runs = tmp_path / "runs"
    for stage in STAGES:
        shutil.copytree(PROJECT_DIR / "runs" / stage, runs / stage)
        # The presets name datasets/ and runs/ relative to the project directory; here both are in tmp_path.
        (runs / stage / "datasets").symlink_to(tmp_path / "datasets")
        train_json = runs / stage / "train.json"
        train = json.loads(train_json.read_text())
        if "init_from" in train:
            train["init_from"] = str(tmp_path / train["init_from"])
            train_json.write_text(json.dumps(train))
    for stage in STAGES:
        run_training([runs / stage, tmp_path / "cache"])

    pretrain, midtrain, sft = (read_rows(runs / stage) for stage in STAGES)
    # Each later stage starts from the earlier one's weights, not from scratch (a fresh model's loss
    # is about ln 50264 = 10.8).
    assert midtrain[0]["loss"] < pretrain[0]["loss"] - 1 and sft[0]["loss"] < pretrain[0]["loss"] - 1
    assert {"val_loss/text", "val_loss/chat"} <= set(midtrain[-1]) and "val_loss/chat" not in sft[-1]
    sft_meta = json.loads((runs / "chat-tiny-sft" / "checkpoints" / "latest" / "meta.json").read_text())
    assert sft_meta["init_from"]["source"] == str((runs / "chat-tiny-midtrain" / "checkpoints" / "best").resolve())
