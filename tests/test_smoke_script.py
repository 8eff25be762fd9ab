"""test_smoke.py: prompt continuation, checked against plain decoding loops."""

import json

import pytest
import tiktoken
import torch
from click.testing import CliRunner

from evalkit import one_torch_thread  # noqa: F401  (autouse fixture)
from evalkit import assert_one_error_line, run_script, tiny_config, write_model

import test_smoke
from token_data import ByteTokenizer, write_meta


def greedy_loop(model, ids, steps):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


def sampling_loop(model, ids, steps, temperature, top_k, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]))[0, -1]
            threshold = torch.topk(logits, top_k).values[-1]
            logits = torch.where(logits < threshold, float("-inf"), logits)
            probs = torch.softmax(logits / temperature, dim=-1)
            ids.append(int(torch.multinomial(probs, 1, generator=generator)))
    return ids


def smoke(*args):
    result = CliRunner().invoke(test_smoke.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + str(result.exception)
    return result.stdout.rstrip("\n")


def test_greedy_and_seeded_sampling_match_plain_loops(tmp_path):
    # A GPT-2-vocabulary model: the default tokenizer is GPT-2's. drop_rate is 0.1
    # in model.json; the script must still decode with dropout off.
    model_json, weights, model = write_model(tmp_path, tiny_config(vocab_size=50257))
    gpt2 = tiktoken.get_encoding("gpt2")
    prompt_ids = gpt2.encode("Every effort moves you")

    greedy = smoke(model_json, weights, "--temperature", 0, "--max-new-tokens", 8)
    assert greedy == gpt2.decode(greedy_loop(model, prompt_ids, 8))

    sampled = smoke(model_json, weights, "--seed", 7)
    assert sampled == gpt2.decode(sampling_loop(model, prompt_ids, 20, 1.4, 25, seed=7))
    assert smoke(model_json, weights, "--seed", 7) == sampled
    assert smoke(model_json, weights, "--seed", 8) != sampled


def test_tokenizer_comes_from_the_run_dataset(tmp_path):
    dataset_dir = tmp_path / "datasets" / "someone" / "bytes-corpus"
    dataset_dir.mkdir(parents=True)
    write_meta(dataset_dir, ByteTokenizer())
    run_dir = tmp_path / "runs" / "bytes-run"
    model_json, _, model = write_model(run_dir, tiny_config())
    (run_dir / "train.json").write_text(json.dumps({"dataset": "someone/bytes-corpus", "microbatch_size": 2}))
    weights = run_dir / "model.safetensors"

    text = smoke(model_json, weights, "--prompt", "def f(", "--temperature", 0, "--max-new-tokens", 6,
                 "--datasets-dir", tmp_path / "datasets")
    expected = greedy_loop(model, list(b"def f("), 6)
    assert text == ByteTokenizer().decode(expected)

    # Without the dataset the default is GPT-2, which this 257-token model cannot take.
    result = CliRunner().invoke(test_smoke.main, [str(model_json), str(weights),
                                                  "--datasets-dir", str(tmp_path / "elsewhere")])
    assert result.exit_code == 2
    assert "tokenizer 'gpt2' has 50257 tokens but the model's vocab_size is 257" in result.stderr


@pytest.mark.e2e
def test_bad_input_is_one_error_line(tmp_path):
    _, weights, _ = write_model(tmp_path / "model", tiny_config())
    assert_one_error_line(run_script("test_smoke.py", tmp_path / "missing.json", weights),
                          "missing.json: file not found")
    bigger = tmp_path / "bigger.json"
    bigger.write_text(json.dumps(tiny_config(emb_dim=64)))
    # One line naming the first tensors whose shapes differ, not torch's size-mismatch text.
    assert_one_error_line(run_script("test_smoke.py", bigger, weights),
                          f"{weights}: its tensors do not fit the model config of {bigger}: "
                          "tok_emb.weight is [257, 32], the config gives [257, 64]; ", "(and ")
