"""The -f search: its arithmetic against brute force, and for real under torchrun with a
test-only memory limit (CPUs have no out-of-memory error to catch)."""

import gc
import json
import math
import weakref
from types import SimpleNamespace

import pytest
import torch

import ddp_train
import microbatch_search
from conftest import TRAINER_WITH_FAULTS, cli_in_process, make_run, run_training, train_env
from training import compute_loss
from gpt import GPTModel
from parallelism import is_sharded
from microbatch_search import largest_passing, make_trial, suggest_batch_split, suggest_dividing_microbatch

CPU = SimpleNamespace(rank=0, device=torch.device("cpu"))
TINY = dict(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0, qkv_bias=False)


@pytest.mark.parametrize("limit", [0, 1, 2, 3, 5, 8, 13, 64, 100, 1000])
def test_search_finds_the_limit_and_asks_few_questions(limit):
    asked = []

    def passes(size):
        asked.append(size)
        return size <= limit

    assert largest_passing(passes) == limit
    assert len(asked) <= 2 * math.ceil(math.log2(limit + 2)) + 1


@pytest.mark.parametrize("largest, world_size, target", [(27, 8, 96), (6, 1, 96), (13, 8, 96), (5, 3, 100),
                                                         (64, 8, 96), (1, 2, 7)])
def test_suggested_split_is_the_fewest_accumulation_steps_that_reach_the_target(largest, world_size, target):
    microbatch, accumulation = suggest_batch_split(largest, world_size, target)
    brute_force = min((a, m) for a in range(1, target + 1) for m in range(1, largest + 1)
                      if m * a * world_size >= target)
    assert (accumulation, microbatch) == brute_force


@pytest.mark.parametrize("largest, sequences_per_rank", [(64, 64), (48, 64), (27, 96), (5, 12), (100, 7), (1, 9),
                                                         (13, 13 * 17)])
def test_with_global_batch_tokens_the_suggestion_is_the_largest_fitting_microbatch_that_divides_it(
        largest, sequences_per_rank):
    microbatch, accumulation = suggest_dividing_microbatch(largest, sequences_per_rank)
    assert microbatch == max(m for m in range(1, largest + 1) if sequences_per_rank % m == 0)
    assert microbatch * accumulation == sequences_per_rank


@pytest.mark.e2e
def test_with_global_batch_tokens_write_sets_the_microbatch_only(tmp_path, verdict_dataset, monkeypatch):
    """In this process (a world of one), with microbatches above 5 failing as if out of memory:
    global_batch_tokens of 12 sequences of 32 tokens split best as microbatch 4 x accumulation 3."""
    run_dir = make_run(tmp_path / "run", verdict_dataset, global_batch_tokens=12 * 32)
    real_make_trial = microbatch_search.make_trial

    def make_trial_up_to_5(*args):
        try_microbatch = real_make_trial(*args)
        return lambda size: None if size > 5 else try_microbatch(size)

    monkeypatch.setattr(microbatch_search, "require_gpu", lambda device: None)
    monkeypatch.setattr(microbatch_search, "make_trial", make_trial_up_to_5)
    result = run_training([run_dir, "datasets", "-f", "--write"])
    assert "Largest microbatch that fits on every rank: 5" in result.stdout
    assert ("For train.json's global_batch_tokens 384 (12 sequences per rank on 1 rank(s)): microbatch_size 4, the "
            "largest that fits and divides it (gradient_accumulation_steps 3, derived at start-up).") in result.stdout
    train = json.loads((run_dir / "train.json").read_text())
    assert (train["microbatch_size"], train["global_batch_tokens"]) == (4, 384)
    assert "gradient_accumulation_steps" not in train


@pytest.mark.e2e
def test_two_ranks_agree_on_the_smaller_limit_and_write_train_json(tmp_path, verdict_dataset):
    run_dir = make_run(tmp_path / "run", verdict_dataset, microbatch_size=2, checkpoint_interval=7)
    env = {**train_env(), "FAULT_MAX_MICROBATCH": "0:11,1:6"}
    result = run_training([run_dir, "datasets", "-f", "--target-global-batch", "24", "--write"], nproc=2, env=env,
                          script=TRAINER_WITH_FAULTS)
    assert "Largest microbatch that fits on every rank: 6" in result.stdout
    assert "microbatch_size 6, gradient_accumulation_steps 2 (global batch 24)" in result.stdout
    train = json.loads((run_dir / "train.json").read_text())
    assert (train["microbatch_size"], train["gradient_accumulation_steps"], train["checkpoint_interval"]) == (6, 2, 7)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


def test_under_fsdp_the_search_trains_the_sharded_model(tmp_path, verdict_dataset, monkeypatch):
    """-f with parallelism "fsdp" tries each size on the model sharded as training shards it
    (a world of one here). CPUs do not run out of memory, so the trial fails above 3
    sequences (a mock of what only a GPU does) and the search that needs CUDA is let run."""
    real_make_trial = microbatch_search.make_trial
    sharded = []

    def make_trial(model, *args):
        sharded.append(is_sharded(model))
        try_microbatch = real_make_trial(model, *args)
        return lambda size: None if size > 3 else try_microbatch(size)

    monkeypatch.setattr(microbatch_search, "make_trial", make_trial)
    monkeypatch.setattr(microbatch_search, "require_gpu", lambda device: None)
    run_dir = make_run(tmp_path / "run", verdict_dataset, parallelism="fsdp", microbatch_size=2)
    result = cli_in_process(ddp_train.main, [run_dir, "datasets", "-f", "--target-global-batch", "6", "--write"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert sharded == [True]
    assert "Largest microbatch that fits on every rank: 3" in result.stdout
    train = json.loads((run_dir / "train.json").read_text())
    assert (train["microbatch_size"], train["gradient_accumulation_steps"], train["parallelism"]) == (3, 2, "fsdp")


@pytest.mark.e2e
def test_refused_on_cpu(tmp_path, verdict_dataset):
    run_dir = make_run(tmp_path / "run", verdict_dataset)
    result = run_training([run_dir, "datasets", "-f"], check=False)
    assert result.returncode == 2 and "no CUDA device" in result.stderr


def tiny_trial(loss_fn):
    model = GPTModel(TINY)
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, make_trial(model, optimizer, scaler, loss_fn, CPU, TINY["context_length"], TINY["vocab_size"])


def test_a_try_that_fits_trains_for_real():
    model, try_microbatch = tiny_trial(lambda m, inputs, targets: compute_loss(m, inputs, targets, None, CPU.device))
    before = [p.detach().clone() for p in model.parameters()]
    assert try_microbatch(3) == 0  # no allocator statistics on CPU
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # optimizer steps ran
    assert all(p.grad is None for p in model.parameters())


def test_a_failed_try_releases_its_tensors_before_memory_is_handed_back(monkeypatch):
    """The try's tensors must be gone by the time the cache is emptied (on CPU, the
    gc.collect just before), or a GPU would keep the failed try's memory."""
    alive = []

    def out_of_memory_in_forward(model, inputs, targets):
        activations = model(inputs)
        alive.extend([weakref.ref(inputs._base), weakref.ref(activations)])  # the batch and the activations
        raise torch.OutOfMemoryError("simulated: CPUs have no out-of-memory error to raise")

    seen_at_collect = []
    real_collect = gc.collect

    def collect(*args):
        seen_at_collect.append([ref() is not None for ref in alive])
        return real_collect(*args)

    monkeypatch.setattr(microbatch_search.gc, "collect", collect)
    _, try_microbatch = tiny_trial(out_of_memory_in_forward)
    assert try_microbatch(2) is None
    assert seen_at_collect == [[False, False]]
