"""The masked loss: with a dataset's loss_mask, the loss of an optimizer step is the mean over
the masked-in targets of the whole global batch (not a mean of per-microbatch means), on one
rank with accumulation and on two ranks (torchrun, gloo), checked against a hand computation
with plain torch over the global batch; and validation's masked mean likewise."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from config import ModelConfig
from conftest import MICROBATCH_SIZE, SHARED_DATA, TINY_MODEL, make_run, read_rows, run_training, tokens_for
from gpt import GPTModel
from token_data import ByteTokenizer, TokenFileWriter, write_meta

CONTEXT = TINY_MODEL["context_length"]
MICROBATCH_TOKENS = MICROBATCH_SIZE * CONTEXT
SEED = 42  # train.json's default random_seed: the initial weights


def write_masked_dataset(dataset_dir):
    """The verdict's bytes with a loss mask of runs of ones and zeros whose density differs from
    microbatch to microbatch (so a mean of microbatch means is not the global mean)."""
    dataset_dir.mkdir(parents=True)
    data = np.frombuffer((SHARED_DATA / "the-verdict.txt").read_bytes(), dtype=np.uint8)
    rng = np.random.default_rng(0)
    density = np.repeat(rng.uniform(0.05, 0.9, len(data) // MICROBATCH_TOKENS + 1), MICROBATCH_TOKENS)
    mask = (rng.random(len(data)) < density[:len(data)]).astype(np.uint8)
    splits = {"train": slice(0, len(data) - 4000), "validation": slice(len(data) - 4000, None)}
    for split, part in splits.items():
        with TokenFileWriter(dataset_dir / f"{split}.safetensors", loss_mask=True) as writer:
            writer.write(data[part], mask[part])
            writer.commit()
    write_meta(dataset_dir, ByteTokenizer())
    return dataset_dir, torch.from_numpy(data.astype(np.int64)), torch.from_numpy(mask.astype(np.float32)), splits


@pytest.fixture(scope="module")
def masked_dataset(tmp_path_factory):
    return write_masked_dataset(tmp_path_factory.mktemp("datasets") / "masked")


def microbatch(tokens, mask, index):
    """(inputs, targets, targets' mask) of microbatch `index` of a token stream, by slicing."""
    begin = index * MICROBATCH_TOKENS
    window, window_mask = tokens[begin:begin + MICROBATCH_TOKENS + 1], mask[begin:begin + MICROBATCH_TOKENS + 1]
    return (window[:-1].view(MICROBATCH_SIZE, CONTEXT), window[1:].view(MICROBATCH_SIZE, CONTEXT),
            window_mask[1:].view(MICROBATCH_SIZE, CONTEXT))


def microbatches(tokens, mask, first, count):
    return [microbatch(tokens, mask, index) for index in range(first, first + count)]


def token_losses(model, inputs, targets):
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def hand_first_step_over(global_batch):
    """The loss and gradient norm of step 0, by hand, over `global_batch` ((token stream, its mask),
    microbatch index) for each microbatch: the initial model (seeded as training seeds it), the
    cross-entropy of every target, averaged over the masked-in ones; and the mean of the
    microbatches' means (what a wrong implementation would give)."""
    torch.manual_seed(SEED)
    model = GPTModel(ModelConfig.from_dict(TINY_MODEL))
    batches = [microbatch(tokens, mask, index) for (tokens, mask), index in global_batch]
    loss_sum = sum((token_losses(model, inputs, targets) * m).sum() for inputs, targets, m in batches)
    loss = loss_sum / sum(m.sum() for _, _, m in batches)
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    with torch.no_grad():
        mean_of_means = sum((token_losses(model, i, t) * m).sum() / m.sum() for i, t, m in batches) / len(batches)
    return loss.item(), grad_norm.item(), mean_of_means.item()


def hand_validation_loss(weights, tokens, mask, splits, batches):
    model = GPTModel(ModelConfig.from_dict(TINY_MODEL))
    model.load_state_dict(weights)
    validation = splits["validation"]
    with torch.no_grad():
        parts = [(token_losses(model, i, t) * m).sum().item() for i, t, m in
                 microbatches(tokens[validation], mask[validation], 0, batches)]
        counts = [m.sum().item() for _, _, m in microbatches(tokens[validation], mask[validation], 0, batches)]
    return sum(parts) / sum(counts)


def first_step_run(run_dir, dataset_dir, world_size, accumulation, parallelism="ddp"):
    return make_run(run_dir, dataset_dir, min_train_tokens=tokens_for(1, world_size, accumulation),
                    gradient_accumulation_steps=accumulation, validation_interval=1, validation_batches=3,
                    parallelism=parallelism)


def check_first_step(run_dir, masked_dataset):
    _, tokens, mask, splits = masked_dataset
    loss, grad_norm, mean_of_means = hand_first_step_over([((tokens, mask), index) for index in range(2)])
    assert abs(mean_of_means - loss) > 1e-3  # the test tells the two averages apart
    (row,) = read_rows(run_dir)
    assert row["loss"] == pytest.approx(loss, rel=1e-5)
    assert row["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    weights = load_file(run_dir / "checkpoints" / "latest" / "model.safetensors")
    assert row["val_loss"] == pytest.approx(hand_validation_loss(weights, tokens, mask, splits, 3), rel=1e-5)


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_accumulated_masked_loss_is_the_global_batch_mean(tmp_path, masked_dataset, parallelism):
    """One rank, two microbatches accumulated: loss, gradient and validation as by hand, with the
    model wrapped by DDP or sharded by FSDP2."""
    run_dir = first_step_run(tmp_path / "run", masked_dataset[0], world_size=1, accumulation=2,
                             parallelism=parallelism)
    run_training([run_dir, tmp_path / "datasets"])
    check_first_step(run_dir, masked_dataset)


@pytest.mark.e2e
def test_two_rank_masked_loss_is_the_global_batch_mean(tmp_path, masked_dataset):
    """Two ranks (gloo), one microbatch each: the same global batch, the same hand values."""
    run_dir = first_step_run(tmp_path / "run", masked_dataset[0], world_size=2, accumulation=1)
    run_training([run_dir, tmp_path / "datasets"], nproc=2)
    check_first_step(run_dir, masked_dataset)


def test_loss_mask_round_trips_through_safetensors(masked_dataset):
    """The writer's two tensors read back with safetensors' own loader."""
    dataset_dir, tokens, mask, splits = masked_dataset
    stored = load_file(dataset_dir / "train.safetensors")
    assert set(stored) == {"tokens", "loss_mask"} and stored["loss_mask"].dtype == torch.uint8
    assert torch.equal(stored["tokens"].long(), tokens[splits["train"]])
    assert torch.equal(stored["loss_mask"].float(), mask[splits["train"]])
    assert json.loads((dataset_dir / "meta.json").read_text())["tokenizer"] == "bytes"


def test_weighted_loss_in_chunks_is_the_same_sum(masked_dataset):
    """loss_chunk_tokens splits the weighted sum as it splits the mean: the same value and gradients
    as the plain per-token cross-entropy times the weights."""
    _, tokens, mask, _ = masked_dataset
    inputs, targets, target_mask = microbatch(tokens, mask, 3)
    weights = target_mask * 0.37
    torch.manual_seed(SEED)
    chunked = GPTModel(ModelConfig.from_dict(TINY_MODEL), loss_chunk_tokens=50)
    plain = GPTModel(ModelConfig.from_dict(TINY_MODEL))
    plain.load_state_dict(chunked.state_dict())
    by_chunks = chunked(inputs, targets, weights)
    by_hand = (token_losses(plain, inputs, targets) * weights).sum()
    by_chunks.backward()
    by_hand.backward()
    assert by_chunks.item() == pytest.approx(by_hand.item(), rel=1e-6)
    for mine, reference in zip(chunked.parameters(), plain.parameters()):
        torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-5, atol=1e-7)
