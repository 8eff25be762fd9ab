"""Token slicing arithmetic, the microbatch index, and train.json validation."""

import json

import numpy as np
import pytest

from batching import Microbatches, count_optimizer_steps, microbatch_index
from config import TrainConfig, load_run
from errors import UserError
from ddp_train import lr_multiplier


def test_worked_example_from_the_reference_harness():
    # 3,260,190,720 tokens at 8 ranks x microbatch 12 x context 1024 (accumulation 1).
    global_batch = 8 * 12 * 1 * 1024
    steps = count_optimizer_steps(10**10, 0, 3_260_190_720, global_batch, "train")
    assert steps == 33_165
    assert steps * global_batch == 3_260_252_160


def test_exact_multiple_is_not_rounded_up():
    assert count_optimizer_steps(10_000, 0, 4 * 100, 100, "train") == 4


def test_minus_one_takes_every_whole_global_batch_available():
    # 1,000 tokens from token 50: 950 left, one is needed for the last target.
    assert count_optimizer_steps(1_000, 50, -1, 100, "train") == 9
    assert count_optimizer_steps(1_001, 0, -1, 100, "train") == 10


def test_too_short_and_start_past_end_are_clear_errors():
    with pytest.raises(UserError, match="too short: training needs 501 tokens from token 0"):
        count_optimizer_steps(500, 0, 500, 100, "ds/train.safetensors")
    with pytest.raises(UserError, match="start token 900 is past the end of the file"):
        count_optimizer_steps(900, 900, -1, 100, "ds/train.safetensors")


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


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_to_min():
    total, warmup, min_ratio = 100, 10, 0.1
    values = [lr_multiplier(s, total, warmup, min_ratio) for s in range(total)]
    assert values[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert values[10] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(min_ratio)
    midpoint = 10 + (total - warmup - 1) / 2
    assert lr_multiplier(midpoint, total, warmup, min_ratio) == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


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
    with pytest.raises(UserError, match=r"run 'no-such-run': no such directory \(runs available: .*demo"):
        load_run("no-such-run")
