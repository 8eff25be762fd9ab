"""The presets under runs/: every one loads and validates, and the modern recipe's preset
trains on one third of the tokens of the reference's best cloud run."""

import pytest

from config import RUNS_DIR, load_run

PRESETS = sorted(path.parent.name for path in RUNS_DIR.glob("*/train.json"))


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_validates(name):
    run = load_run(name)
    assert run.model.vocab_size > 0 and run.train.dataset


def test_the_modern_preset_reads_a_third_of_the_best_reference_runs_tokens_with_its_model():
    """`8xa100m40-stacked-interventions-1` (test loss 3.577761, the reference's best cloud run)
    trained 3,260,190,720 tokens; the modern preset asks for a third of that (rounded down to a
    whole token) with the same GPT-2 small shape, untied head and vocabulary."""
    best, modern = load_run("8xa100m40-stacked-interventions-1"), load_run("gpt2-small-modern-8xh100")
    assert best.train.min_train_tokens == 3_260_190_720
    assert modern.train.min_train_tokens == best.train.min_train_tokens // 3
    shape = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "tie_weights")
    assert [getattr(modern.model, key) for key in shape] == [getattr(best.model, key) for key in shape]
    assert modern.train.optimizer == "muon" and modern.train.dataset == best.train.dataset
