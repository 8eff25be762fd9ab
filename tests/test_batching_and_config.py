"""Token slicing arithmetic, the microbatch index, and train.json validation."""

import json
from pathlib import Path

import numpy as np
import pytest

from batching import Microbatches, check_validation_length, count_optimizer_steps, microbatch_index
from config import TrainConfig, load_run
from errors import UserError


TRAIN_JSON = Path("runs/x/train.json")
TRAIN_FILE = Path("ds/train.safetensors")


def train_cfg(start_train_token=0, min_train_tokens=-1, microbatch_size=4, **keys):
    return TrainConfig.from_dict({"dataset": "ds", "microbatch_size": microbatch_size,
                                  "start_train_token": start_train_token, "min_train_tokens": min_train_tokens,
                                  **keys})


def steps_for(available_tokens, global_batch_tokens, **keys):
    return count_optimizer_steps(available_tokens, global_batch_tokens, train_cfg(**keys), TRAIN_FILE, TRAIN_JSON)


def test_worked_example_from_the_reference_harness():
    # 3,260,190,720 tokens at 8 ranks x microbatch 12 x context 1024 (accumulation 1).
    global_batch = 8 * 12 * 1 * 1024
    steps = steps_for(10**10, global_batch, min_train_tokens=3_260_190_720, microbatch_size=12)
    assert steps == 33_165
    assert steps * global_batch == 3_260_252_160


def test_exact_multiple_is_not_rounded_up():
    assert steps_for(10_000, 100, min_train_tokens=4 * 100) == 4


def test_minus_one_takes_every_whole_global_batch_available():
    # 1,000 tokens from token 50: 950 left, one is needed for the last target.
    assert steps_for(1_000, 100, start_train_token=50) == 9
    assert steps_for(1_001, 100) == 10


# Global batches of 100 tokens: microbatch_size 4 x context_length 25 on one rank.
@pytest.mark.parametrize("available, keys, message", [
    (500, {"min_train_tokens": 500},
     "too short: training needs 501 tokens from start_train_token 0 (min_train_tokens 500 in 5 global batches of "
     "100 tokens, plus 1) but the file has 500; in runs/x/train.json set min_train_tokens to at most 400"),
    (900, {"start_train_token": 900},
     "start token 900 is past the end of the file (900 tokens); in runs/x/train.json set start_train_token to at "
     "most 799"),
    (10_000, {"start_train_token": 100_000_000, "min_train_tokens": 1_000},
     "start token 100,000,000 is past the end of the file (10,000 tokens); in runs/x/train.json set "
     "start_train_token to at most 8999"),
    (1_000, {"start_train_token": 950},
     "too short: training needs 101 tokens from start_train_token 950 (one global batch of 100 tokens, plus 1) "
     "but the file has 1,000; in runs/x/train.json set start_train_token to at most 899, or microbatch_size to at "
     "most 1"),
    (90, {"min_train_tokens": 50},
     "too short: training needs 101 tokens from start_train_token 0 (min_train_tokens 50 in 1 global batch of "
     "100 tokens, plus 1) but the file has 90; in runs/x/train.json set microbatch_size to at most 3 with "
     "min_train_tokens -1"),
    (10, {}, "too short: training needs 101 tokens from start_train_token 0 (one global batch of 100 tokens, "
             "plus 1) but the file has 10; use a dataset with more tokens"),
], ids=["min-train-tokens", "start-past-end", "start-past-end-with-min", "start-near-end", "shorter-than-a-batch",
        "nothing-fits"])
def test_a_training_slice_that_does_not_fit_names_the_keys_and_the_values_that_would(available, keys, message):
    with pytest.raises(UserError) as error:
        steps_for(available, 100, **keys)
    assert str(error.value) == f"{TRAIN_FILE}: {message}"


VALIDATION_FILE = Path("ds/validation.safetensors")


# Validation batches of 128 tokens: microbatch_size 4 x context_length 32.
@pytest.mark.parametrize("available, keys, message", [
    (0, {}, "validation_batches 100 x microbatch_size 4 x context_length 32 from start_val_token 0 need 12,801 "
            "tokens but the file has 0; in runs/x/train.json set validation_interval to null to train without "
            "validation; or rebuild ds with prepare_datasets.py from more documents or with a larger "
            "--validation-fraction"),
    (3_000, {"validation_batches": 1_000},
     "validation_batches 1000 x microbatch_size 4 x context_length 32 from start_val_token 0 need 128,001 tokens "
     "but the file has 3,000; in runs/x/train.json set validation_batches to at most 23, or validation_interval "
     "to null to train without validation"),
    (3_000, {"validation_batches": 10, "start_val_token": 2_000},
     "validation_batches 10 x microbatch_size 4 x context_length 32 from start_val_token 2000 need 3,281 tokens "
     "but the file has 3,000; in runs/x/train.json set validation_batches to at most 7, or start_val_token to at "
     "most 1719, or validation_interval to null to train without validation"),
], ids=["empty", "too-many-batches", "start-near-end"])
def test_a_validation_split_too_short_names_the_keys_the_values_that_fit_and_the_dataset(available, keys, message):
    with pytest.raises(UserError) as error:
        check_validation_length(available, 32, train_cfg(validation_interval=10, **keys), VALIDATION_FILE,
                                TRAIN_JSON)
    assert str(error.value) == f"{VALIDATION_FILE}: too short: {message}"


def test_a_validation_split_that_fits_exactly_passes():
    check_validation_length(2 * 128 + 1, 32, train_cfg(validation_batches=2), VALIDATION_FILE, TRAIN_JSON)


def test_n_ranks_with_accumulation_1_use_the_microbatches_of_1_rank_with_accumulation_n():
    for step in range(5):
        two_ranks = {microbatch_index(step, 0, 1, 2, rank) for rank in range(2)}
        one_rank = {microbatch_index(step, a, 2, 1, 0) for a in range(2)}
        assert two_ranks == one_rank == {2 * step, 2 * step + 1}
    # 8 ranks, accumulation 4: every microbatch used exactly once, in step order.
    used = [microbatch_index(s, a, 4, 8, r) for s in range(3) for a in range(4) for r in range(8)]
    assert sorted(used) == list(range(96))


def test_microbatches_are_consecutive_windows_with_shifted_targets():
    tokens = np.arange(1_000, dtype=np.uint16)
    batches = Microbatches(tokens, start_token=7, num_microbatches=4, microbatch_size=2, context_length=5)
    inputs, targets = batches[1]
    assert inputs.tolist() == [[17, 18, 19, 20, 21], [22, 23, 24, 25, 26]]
    assert targets.tolist() == [[18, 19, 20, 21, 22], [23, 24, 25, 26, 27]]
    with pytest.raises(IndexError):
        batches[4]


def test_a_token_id_at_or_above_vocab_size_stops_on_the_host_naming_file_offset_and_id():
    tokens = np.arange(1_000, dtype=np.uint16) % 257
    tokens[23] = 257
    batches = Microbatches(tokens, start_token=7, num_microbatches=4, microbatch_size=2, context_length=5,
                           vocab_size=257, path="ds/train.safetensors")
    assert batches[0][0].max() < 257  # tokens 7..17
    with pytest.raises(UserError) as error:
        batches[1]  # tokens 17..27 (inputs and targets)
    assert str(error.value).startswith("ds/train.safetensors: token 23 is id 257, but the model's vocab_size "
                                       "is 257 (model.json key 'vocab_size'; ids must be below it)")


REFERENCE_TRAIN_JSON = {
    "microbatch_size": 12, "gradient_accumulation_steps": 1, "checkpoint_interval": 617,
    "dataset": "gpjt/fineweb-gpt2-tokens", "min_train_tokens": 3260190720, "start_train_token": 0,
    "start_val_token": 0, "validation_interval": 617, "validation_batches": 300,
    "clipping_max_norm": 3.5, "weight_decay": 0.01, "learning_rate": 0.0014,
    "schedule_learning_rate": True, "warmup_period_percent": 5, "use_amp": True, "random_seed": 42,
}


def test_every_reference_key_is_accepted_with_defaults_for_the_rest():
    cfg = TrainConfig.from_dict(REFERENCE_TRAIN_JSON)
    assert cfg.microbatch_size == 12 and cfg.clipping_max_norm == 3.5
    minimal = TrainConfig.from_dict({"dataset": "x/y", "microbatch_size": 2})
    assert (minimal.learning_rate, minimal.weight_decay, minimal.use_amp, minimal.random_seed,
            minimal.gradient_accumulation_steps, minimal.effective_min_lr) == (0.0004, 0.1, True, 42, 1, 0.00004)


def test_legacy_minibatch_size_and_validation_interval_as_checkpoint_interval():
    legacy = TrainConfig.from_dict({"minibatch_size": 64, "validation_interval": 617, "validation_batches": 300,
                                    "dataset": "gpjt/fineweb-gpt2-tokens", "min_train_tokens": 3260190720})
    assert legacy.microbatch_size == 64 and legacy.effective_checkpoint_interval == 617


@pytest.mark.parametrize("change, message", [
    ({"learning_rat": 0.1}, "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
    ({"microbatch_size": 0}, "key 'microbatch_size' must be positive, got 0"),
    ({"microbatch_size": 2.5}, "key 'microbatch_size' must be an integer, got 2.5"),
    ({"use_amp": "yes"}, "key 'use_amp' must be true or false"),
    ({"warmup_period_percent": 150}, "key 'warmup_period_percent' must be between 0 and 100, got 150"),
    ({"min_train_tokens": -5}, "key 'min_train_tokens' must be positive, or -1"),
    ({"amp_dtype": "fp8"}, "key 'amp_dtype' must be \"bfloat16\" or \"float16\", got \"fp8\""),
])
def test_train_config_errors_name_the_key_and_valid_values(change, message):
    with pytest.raises(UserError) as error:
        TrainConfig.from_dict({**REFERENCE_TRAIN_JSON, **change}, source="runs/x/train.json")
    assert message in str(error.value) and str(error.value).startswith("runs/x/train.json: ")


def test_malformed_json_names_the_file_and_position(tmp_path):
    (tmp_path / "model.json").write_text('{"vocab_size": 257,}')
    (tmp_path / "train.json").write_text(json.dumps(REFERENCE_TRAIN_JSON))
    with pytest.raises(UserError, match=r"model.json: malformed JSON at line 1 column 20"):
        load_run(str(tmp_path))


def test_unknown_run_lists_the_available_ones():
    with pytest.raises(UserError, match=r"run 'no-such-run': no such directory, nor a run under .*; "
                                        r"runs available: .*demo"):
        load_run("no-such-run")


def test_evaluation_sources_default_in_config_to_the_public_files():
    """train.json's hellaswag_data and core_bundle, when null, mean HellaSwag's public validation
    file and nanochat's CORE bundle; config.py says so, and a value given is used as it is."""
    defaults = TrainConfig.from_dict({"dataset": "demo", "microbatch_size": 1})
    assert defaults.hellaswag_source == "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
    assert defaults.core_source == "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
    given = TrainConfig.from_dict({"dataset": "demo", "microbatch_size": 1, "hellaswag_data": "h.jsonl",
                                   "core_bundle": "bundle.zip"})
    assert (given.hellaswag_source, given.core_source) == ("h.jsonl", "bundle.zip")
