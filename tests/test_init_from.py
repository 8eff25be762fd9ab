"""train.json's init_from: a fresh run from another run's checkpoint or from a Hugging Face
model starts where that model is (its loss on the same data), with the config checked."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from config import ModelConfig, TrainConfig
from conftest import TINY_MODEL, make_run, read_rows, run_training, tokens_for
from errors import UserError
from gpt import GPTModel
from initial_weights import InitialWeights, apply_initial_weights, check_same_network
from token_data import open_split

START = 5000  # the second run trains on tokens the first never saw


def first_global_batch_loss(model, dataset_dir, start, microbatches, context):
    """The mean loss of `model` over the first global batch from `start`, written out plainly."""
    tokens = torch.from_numpy(open_split(dataset_dir, "train")[start:start + microbatches * 4 * context + 1]
                              .astype("int64"))
    inputs, targets = tokens[:-1].view(-1, context), tokens[1:].view(-1, context)
    with torch.no_grad():
        log_probs = F.log_softmax(model(inputs).double(), dim=-1)
    return -log_probs.gather(-1, targets.unsqueeze(-1)).mean().item()


def test_a_run_from_another_runs_checkpoint_starts_at_that_runs_loss(tmp_path, verdict_dataset):
    first = make_run(tmp_path / "first", verdict_dataset, min_train_tokens=tokens_for(4, 1), checkpoint_interval=100)
    run_training([first, "datasets"])
    source = (first / "checkpoints" / "latest").resolve()
    second = make_run(tmp_path / "second", verdict_dataset, init_from=str(source),
                      start_train_token=START, min_train_tokens=tokens_for(2, 1, accumulation=2),
                      gradient_accumulation_steps=2, learning_rate=0.001, checkpoint_interval=100)
    result = run_training([second, "datasets"])
    assert f"init_from: weights of {source}" in result.stdout

    trained = GPTModel(TINY_MODEL).eval()
    trained.load_state_dict(load_file(source / "model.safetensors"))
    expected = first_global_batch_loss(trained, verdict_dataset, START, 2, TINY_MODEL["context_length"])
    assert read_rows(second)[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert read_rows(second)[0]["lr"] == 0.001  # a fresh schedule, not the first run's
    meta = json.loads((second / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["init_from"] == {"kind": "checkpoint", "source": str(source), "global_step": 3}


def test_a_run_from_a_hugging_face_model_starts_at_its_loss(tmp_path, verdict_dataset):
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(vocab_size=257, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                                        attn_pdrop=0.0, bos_token_id=256, eos_token_id=256)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    run_dir = make_run(tmp_path / "run", verdict_dataset, model={"qkv_bias": True, "tie_weights": True},
                       init_from=str(tmp_path / "hf"), start_train_token=START,
                       min_train_tokens=tokens_for(1, 1), checkpoint_interval=100)
    run_training([run_dir, "datasets"])
    tokens = torch.from_numpy(open_split(verdict_dataset, "train")[START:START + 4 * 32 + 1].astype("int64"))
    inputs, targets = tokens[:-1].view(4, 32), tokens[1:].view(4, 32)
    with torch.no_grad():
        expected = F.cross_entropy(hf_model(inputs).logits.flatten(0, 1), targets.flatten()).item()
    assert read_rows(run_dir)[0]["loss"] == pytest.approx(expected, rel=1e-5)
    meta = json.loads((run_dir / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["init_from"] == {"kind": "huggingface", "source": str(tmp_path / "hf")}


def train_cfg(**keys):
    return TrainConfig.from_dict({"dataset": "d", "microbatch_size": 1, "init_from": "runs/a/checkpoints/best",
                                  **keys})


def test_a_different_model_is_refused_naming_the_keys():
    source = ModelConfig.from_dict(TINY_MODEL)
    with pytest.raises(UserError, match=r"train.json: init_from runs/a/checkpoints/best holds a different model "
                                        r"\(emb_dim 32 -> 48, n_layers 2 -> 3\)"):
        check_same_network(source, ModelConfig.from_dict({**TINY_MODEL, "emb_dim": 48, "n_layers": 3}),
                           train_cfg(), "train.json")
    # Training settings may differ.
    check_same_network(source, ModelConfig.from_dict({**TINY_MODEL, "drop_rate": 0.5, "init_std": 0.02}),
                       train_cfg(), "train.json")


def test_a_longer_context_needs_extend_positions_with_learned_positions_only():
    longer = {**TINY_MODEL, "context_length": 64}
    with pytest.raises(UserError, match="extend_positions"):
        check_same_network(ModelConfig.from_dict(TINY_MODEL), ModelConfig.from_dict(longer), train_cfg(), "t.json")
    check_same_network(ModelConfig.from_dict(TINY_MODEL), ModelConfig.from_dict(longer),
                       train_cfg(extend_positions=True), "t.json")
    rope = {"pos_emb": "rope"}
    check_same_network(ModelConfig.from_dict({**TINY_MODEL, **rope}), ModelConfig.from_dict({**longer, **rope}),
                       train_cfg(), "t.json")


def test_extended_positions_copy_the_source_rows_and_keep_the_new_rows_initialisation():
    torch.manual_seed(1)
    source = GPTModel(TINY_MODEL)
    initial = InitialWeights(source.state_dict(), source.cfg, {"kind": "checkpoint"})
    torch.manual_seed(2)
    longer = GPTModel({**TINY_MODEL, "context_length": 48})
    fresh_rows = longer.pos_emb.weight[32:].detach().clone()
    note = apply_initial_weights(longer, initial)
    assert torch.equal(longer.pos_emb.weight[:32], source.pos_emb.weight)
    assert torch.equal(longer.pos_emb.weight[32:], fresh_rows)
    assert torch.equal(longer.trf_blocks[1].ff.layers[0].weight, source.trf_blocks[1].ff.layers[0].weight)
    assert note == "position rows 0-31 come from init_from; rows 32-47 start from this run's initialisation"
