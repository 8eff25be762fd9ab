"""train.json's global_batch_tokens (the accumulation derived for each world size) and its token
budgets (train_tokens_per_parameter, train_flops): the arithmetic by hand, the errors, and what
a run prints."""

import json
from fractions import Fraction
from pathlib import Path

import pytest

from batching import TokenBudget, count_optimizer_steps, gradient_accumulation_for, token_budget
from config import ModelConfig, TrainConfig
from conftest import TINY_MODEL, make_run, read_rows, run_training
from errors import UserError
from gpt import GPTModel

TRAIN_JSON = Path("runs/x/train.json")
TRAIN_FILE = Path("ds/train.safetensors")
TINY = ModelConfig.from_dict(TINY_MODEL)
# TINY's parameters by hand: token and position embeddings (257 + 32) x 32; per layer the four
# attention projections and the feed-forward's two layers, 12 x 32^2, their biases (output
# projection 32, feed-forward 4 x 32 + 32) and two LayerNorms (2 x 2 x 32), 10 x 32 in all; the
# final LayerNorm 2 x 32; the untied output head 257 x 32.
TINY_PARAMETERS = (257 + 32) * 32 + 2 * (12 * 32 * 32 + 10 * 32) + 2 * 32 + 257 * 32
# Training FLOPs per token by hand (perf.py's rule): 6 x matmul weights + 12 x layers x emb x context.
TINY_FLOPS_PER_TOKEN = 6 * (2 * 12 * 32 * 32 + 257 * 32) + 12 * 2 * 32 * 32


def train_cfg(**keys):
    return TrainConfig.from_dict({"dataset": "ds", "microbatch_size": 4, **keys}, source=str(TRAIN_JSON))


# ---------------------------------------------------------------- global_batch_tokens

@pytest.mark.parametrize("world_size, microbatch, accumulation", [(8, 64, 1), (1, 64, 8), (2, 64, 4), (8, 16, 4),
                                                                  (1, 512, 1)])
def test_global_batch_tokens_gives_the_same_tokens_per_step_on_any_world_size(world_size, microbatch, accumulation):
    # docs/configuration.md's example: 524,288 tokens = 8 GPUs x 64 x 1024; on 1 GPU the same file accumulates 8.
    cfg = train_cfg(global_batch_tokens=524_288, microbatch_size=microbatch)
    assert cfg.gradient_accumulation_steps is None  # nothing can read a fixed one by mistake
    assert gradient_accumulation_for(cfg, world_size, 1024, TRAIN_JSON) == accumulation


def test_without_global_batch_tokens_the_accumulation_is_train_jsons():
    assert gradient_accumulation_for(train_cfg(gradient_accumulation_steps=3), 8, 1024, TRAIN_JSON) == 3
    assert gradient_accumulation_for(train_cfg(), 8, 1024, TRAIN_JSON) == 1


@pytest.mark.parametrize("microbatch, global_batch, message", [
    (64, 500_000, "(500000) is not a multiple of world size 8 x context_length 1024 = 8192 tokens, so no "
                  "microbatch_size splits it into whole sequences on every rank; set global_batch_tokens to 499712 "
                  "or 507904"),
    (48, 524_288, "(524288) is not a multiple of world size 8 x microbatch_size 48 x context_length 1024 = 393216 "
                  "tokens, so it gives no whole number of gradient accumulation steps; set global_batch_tokens to "
                  "393216 or 786432, or microbatch_size to 32 or 64"),
    (64, 262_144, "(262144) is not a multiple of world size 8 x microbatch_size 64 x context_length 1024 = 524288 "
                  "tokens, so it gives no whole number of gradient accumulation steps; set global_batch_tokens to "
                  "524288, or microbatch_size to 32"),
], ids=["not-whole-sequences", "not-whole-microbatches", "below-one-microbatch-per-rank"])
def test_a_global_batch_that_does_not_divide_names_the_numbers_and_the_nearest_that_do(microbatch, global_batch,
                                                                                       message):
    cfg = train_cfg(global_batch_tokens=global_batch, microbatch_size=microbatch)
    with pytest.raises(UserError) as error:
        gradient_accumulation_for(cfg, 8, 1024, TRAIN_JSON)
    assert str(error.value) == f"{TRAIN_JSON}: key 'global_batch_tokens' {message}"


# ---------------------------------------------------------------- token budgets

@pytest.mark.parametrize("model", [{}, {"tie_weights": True}, {"qkv_bias": True}])
def test_a_budget_per_parameter_counts_every_unique_parameter_of_the_model_as_built(model):
    built = GPTModel({**TINY_MODEL, **model})
    parameters = sum(p.numel() for p in built.parameters())  # torch yields a tied weight once
    assert parameters == TINY_PARAMETERS - (257 * 32 if model.get("tie_weights") else 0) + (
        3 * 2 * 32 if model.get("qkv_bias") else 0)
    budget = token_budget(train_cfg(train_tokens_per_parameter=20), ModelConfig.from_dict({**TINY_MODEL, **model}))
    assert budget.tokens == 20 * parameters


def steps(available_tokens, batch_tokens, **keys):
    return count_optimizer_steps(available_tokens, batch_tokens, train_cfg(**keys), TRAIN_FILE, TRAIN_JSON, TINY)


def test_budgets_become_whole_global_batches_as_min_train_tokens_does():
    assert TINY_PARAMETERS == 42_752 and TINY_FLOPS_PER_TOKEN == 221_376
    # 20 x 42,752 = 855,040 tokens = 3,340 global batches of 256 exactly: not rounded up.
    assert steps(10**7, 256, train_tokens_per_parameter=20) == 3_340
    # 0.1 x 42,752 = 4,275.2, so 4,276 tokens: 16.7 global batches, rounded up to 17.
    assert token_budget(train_cfg(train_tokens_per_parameter=0.1), TINY).tokens == 4_276
    assert steps(10**7, 256, train_tokens_per_parameter=0.1) == 17
    # 1e9 FLOPs / 221,376 per token = 4,517.3, so 4,518 tokens: 17.6 global batches, 18.
    assert token_budget(train_cfg(train_flops=1e9), TINY).tokens == 4_518
    assert steps(10**7, 256, train_flops=1e9) == 18
    assert steps(10**7, 256, train_flops=5 * 256 * TINY_FLOPS_PER_TOKEN) == 5
    assert steps(10**7, 256, min_train_tokens=4_276) == 17


def test_a_ratio_counts_as_the_decimal_written_not_its_float():
    # 0.3 x 10 is 3.0000000000000004 in floats, which would round up to 4 tokens.
    assert TokenBudget("train_tokens_per_parameter", 0.3, Fraction(10)).tokens == 3


# Global batches of 100 tokens; 42,752 parameters and 221,376 FLOPs per token (above).
@pytest.mark.parametrize("available, keys, message", [
    (1_000, {"train_tokens_per_parameter": 0.1},
     "too short: training needs 4,301 tokens from start_train_token 0 (train_tokens_per_parameter 0.1 x 42,752 "
     "parameters = 4,276 tokens in 43 global batches of 100 tokens, plus 1) but the file has 1,000; in "
     "runs/x/train.json set train_tokens_per_parameter to at most 0.02105"),
    (1_000, {"train_flops": 1e9},
     "too short: training needs 4,601 tokens from start_train_token 0 (train_flops 1000000000 / 221,376 FLOPs per "
     "token = 4,518 tokens in 46 global batches of 100 tokens, plus 1) but the file has 1,000; in runs/x/train.json "
     "set train_flops to at most 1.992e+8"),
    (90, {"train_tokens_per_parameter": 0.001},
     "too short: training needs 101 tokens from start_train_token 0 (train_tokens_per_parameter 0.001 x 42,752 "
     "parameters = 43 tokens in 1 global batch of 100 tokens, plus 1) but the file has 90; in runs/x/train.json "
     "set microbatch_size to at most 3 without train_tokens_per_parameter"),
    (90, {"global_batch_tokens": 100},
     "too short: training needs 101 tokens from start_train_token 0 (one global batch of 100 tokens, plus 1) but "
     "the file has 90; in runs/x/train.json set global_batch_tokens to at most 89 (a multiple of world size x "
     "microbatch_size x context_length)"),
], ids=["per-parameter", "flops", "shorter-than-a-batch", "global-batch-tokens"])
def test_a_budget_the_dataset_cannot_hold_names_its_key_and_the_largest_value_that_fits(available, keys, message):
    with pytest.raises(UserError) as error:
        steps(available, 100, **keys)
    assert str(error.value) == f"{TRAIN_FILE}: {message}"


def test_the_largest_values_suggested_fit():
    assert steps(1_000, 100, train_tokens_per_parameter=0.02105) == 9
    assert steps(1_000, 100, train_flops=1.992e+8) == 9


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("keys, message", [
    ({"global_batch_tokens": 524_288, "gradient_accumulation_steps": 1},
     "keys 'gradient_accumulation_steps' and 'global_batch_tokens' are alternatives (global_batch_tokens derives "
     "the accumulation from the world size); give one of them"),
    ({"min_train_tokens": 1_000, "train_flops": 1e18},
     "keys 'min_train_tokens' and 'train_flops' are alternatives; give at most one of min_train_tokens, "
     "train_tokens_per_parameter, train_flops"),
    ({"train_tokens_per_parameter": 20, "train_flops": 1e18}, "keys 'train_tokens_per_parameter' and 'train_flops' "
                                                              "are alternatives"),
    ({"global_batch_tokens": 0}, "key 'global_batch_tokens' must be positive, got 0"),
    ({"global_batch_tokens": 5e5}, "key 'global_batch_tokens' must be an integer or null, got 500000.0"),
    ({"train_tokens_per_parameter": -20}, "key 'train_tokens_per_parameter' must be positive, got -20.0"),
    ({"train_flops": "1e18"}, "key 'train_flops' must be a number or null, got \"1e18\""),
    ({"gradient_accumulation_steps": 0}, "key 'gradient_accumulation_steps' must be positive, got 0"),
])
def test_either_or_keys_and_their_values_are_checked(keys, message):
    with pytest.raises(UserError) as error:
        train_cfg(**keys)
    assert str(error.value).startswith(f"{TRAIN_JSON}: {message}")


def test_without_the_new_keys_nothing_changes():
    cfg = train_cfg()
    assert (cfg.gradient_accumulation_steps, cfg.min_train_tokens) == (1, -1)
    assert (cfg.global_batch_tokens, cfg.train_tokens_per_parameter, cfg.train_flops) == (None, None, None)
    assert token_budget(cfg).tokens is None
    assert train_cfg(min_train_tokens=-1, train_flops=1e18).train_flops == 1e18  # -1 is min_train_tokens' "none"


# ---------------------------------------------------------------- a run

@pytest.mark.e2e
def test_a_run_prints_its_derived_accumulation_and_budget(tmp_path, verdict_dataset):
    run_dir = make_run(tmp_path / "run", verdict_dataset, global_batch_tokens=256, train_tokens_per_parameter=0.02)
    result = run_training([run_dir, "datasets"])  # one process: 256 tokens = 1 x 4 x 2 x 32
    # 0.02 x 42,752 parameters = 855.04, so 856 tokens: 3.3 global batches of 256, rounded up to 4.
    assert ("global batch: global_batch_tokens 256 = world size 1 x microbatch_size 4 x gradient_accumulation_steps 2 "
            "(derived) x context_length 32") in result.stdout
    assert "budget: train_tokens_per_parameter 0.02 x 42,752 parameters = 856 tokens -> 4 steps of 256 tokens" \
        in result.stdout
    assert [r["tokens"] for r in read_rows(run_dir)] == [256, 512, 768, 1024]
    meta = json.loads((run_dir / "checkpoints" / "latest" / "meta.json").read_text())
    assert (meta["world_size"], meta["microbatch_size"], meta["gradient_accumulation_steps"]) == (1, 4, 2)
