"""convert_gpt2.py: round trips through transformers' GPT2LMHeadModel (used here
only, never by the script), compared on logits."""

import json

import pytest
import tiktoken
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from evalkit import one_torch_thread  # noqa: F401  (autouse fixture)
from evalkit import (assert_one_error_line, load_model, random_model, run_script, save_state, tiny_config,
                     write_model)

import convert_gpt2
import hf_convert

TOKENS = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))


def random_hf_model(tie=True, vocab_size=100):
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                        tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # LayerNorms and biases start at 1 and 0: make them matter
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model.eval()


def hf_logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def ours_logits(model):
    with torch.no_grad():
        return model(TOKENS)


def convert(*args):
    result = CliRunner().invoke(convert_gpt2.cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output + result.stderr + repr(result.exception)
    return result


@pytest.mark.parametrize("tie", [True, False])
def test_from_hf_gives_the_same_logits(tmp_path, tie):
    hf = random_hf_model(tie)
    hf.save_pretrained(tmp_path / "hf")
    convert("from-hf", tmp_path / "hf", tmp_path / "ours")

    config = json.loads((tmp_path / "ours" / "model.json").read_text())
    assert config == {"vocab_size": 100, "context_length": 32, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
                      "drop_rate": 0.1, "qkv_bias": True, "tie_weights": tie}
    ours = load_model(tmp_path / "ours" / "model.json", tmp_path / "ours" / "model.safetensors", "cpu")
    torch.testing.assert_close(ours_logits(ours), hf_logits(hf), atol=1e-5, rtol=0)


def test_from_hf_reads_openais_original_layout(tmp_path):
    # openai-community/gpt2's pytorch_model.bin: no `transformer.` prefix, no
    # lm_head (tied), and the old causal-mask buffers.
    hf = random_hf_model()
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "hf").mkdir()
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    hf.config.to_json_file(tmp_path / "hf" / "config.json")
    convert("from-hf", tmp_path / "hf", tmp_path / "ours")
    ours = load_model(tmp_path / "ours" / "model.json", tmp_path / "ours" / "model.safetensors", "cpu")
    torch.testing.assert_close(ours_logits(ours), hf_logits(hf), atol=1e-5, rtol=0)


def test_from_hf_downloads_a_repo_id(tmp_path, monkeypatch):
    # The Hub is out of reach in tests: snapshot_download is replaced by a function
    # that checks the request and answers with a local directory.
    hf = random_hf_model()
    hf.save_pretrained(tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(hf_convert, "snapshot_download", fake_snapshot_download)
    convert("from-hf", "openai-community/gpt2", tmp_path / "ours")
    assert len(calls) == 1 and calls[0][0] == "openai-community/gpt2"
    assert {"config.json", "model.safetensors"} <= set(calls[0][1])
    assert "pytorch_model.bin" not in calls[0][1]  # not both copies of the weights
    ours = load_model(tmp_path / "ours" / "model.json", tmp_path / "ours" / "model.safetensors", "cpu")
    torch.testing.assert_close(ours_logits(ours), hf_logits(hf), atol=1e-5, rtol=0)


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_to_hf_gives_the_same_logits(tmp_path, qkv_bias, tie):
    cfg = tiny_config(vocab_size=100, context_length=32, qkv_bias=qkv_bias, tie_weights=tie)
    model_json, weights, ours = write_model(tmp_path / "run", cfg)
    result = convert("to-hf", model_json, weights, tmp_path / "hf")
    assert "vocab_size 100 is too small for tokenizer 'gpt2'" in result.stdout

    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(hf_logits(hf), ours_logits(ours), atol=1e-5, rtol=0)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is tie
    assert (hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()) is tie
    assert (config["model_type"], config["activation_function"], config["layer_norm_epsilon"]) == \
        ("gpt2", "gelu_new", 1e-5)
    assert (config["n_ctx"], config["n_positions"], config["resid_pdrop"]) == (32, 32, 0.1)
    stored = load_file(tmp_path / "hf" / "model.safetensors")
    assert stored["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: in x out
    if not qkv_bias:
        assert not stored["transformer.h.1.attn.c_attn.bias"].any()


def test_gpt2_shaped_options_round_trip(tmp_path):
    # gpt.py's options that GPT2LMHeadModel also has: no biases (zeros there), a LayerNorm
    # epsilon, a feed-forward width, an initialisation scale.
    cfg = tiny_config(vocab_size=100, context_length=32, bias=False, norm_eps=1e-3, mlp_hidden_dim=48, init_std=0.05)
    model_json, weights, ours = write_model(tmp_path / "run", cfg)
    convert("to-hf", model_json, weights, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(hf_logits(hf), ours_logits(ours), atol=1e-5, rtol=0)
    assert not load_file(tmp_path / "hf" / "model.safetensors")["transformer.h.0.ln_1.bias"].any()
    assert hf.config.initializer_range == 0.05

    convert("from-hf", tmp_path / "hf", tmp_path / "back")
    config = json.loads((tmp_path / "back" / "model.json").read_text())
    assert (config["norm_eps"], config["mlp_hidden_dim"]) == (1e-3, 48)
    back = load_model(tmp_path / "back" / "model.json", tmp_path / "back" / "model.safetensors", "cpu")
    torch.testing.assert_close(ours_logits(back), ours_logits(ours), atol=1e-5, rtol=0)


def test_to_hf_writes_gpt2_tokenizer_and_model_card(tmp_path):
    cfg = tiny_config(vocab_size=50257, emb_dim=16, qkv_bias=True, tie_weights=True)
    model_json, weights, _ = write_model(tmp_path / "my-run", cfg)
    (tmp_path / "my-run" / "train.json").write_text(json.dumps({"dataset": "gpjt/fineweb-gpt2-tokens",
                                                                "microbatch_size": 6}))
    convert("to-hf", model_json, weights, tmp_path / "hf", "--datasets-dir", tmp_path / "datasets")

    text = "Every effort moves you, said Mr. Gisburn."
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer(text).input_ids == tiktoken.get_encoding("gpt2").encode(text)
    assert tokenizer.eos_token_id == 50256
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == 50256
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "# my-run" in card and "| emb_dim | 16 |" in card
    assert '| dataset | "gpjt/fineweb-gpt2-tokens" |' in card


def test_to_hf_without_tokenizer_files_says_so(tmp_path, monkeypatch):
    def offline(url):
        raise ConnectionError("no network")  # what tiktoken's download raises offline

    monkeypatch.setattr(hf_convert, "read_file_cached", offline)
    model_json, weights, _ = write_model(tmp_path / "run", tiny_config(vocab_size=50257, emb_dim=16))
    result = convert("to-hf", model_json, weights, tmp_path / "hf", "--tokenizer", "gpt2")
    assert "note: no tokenizer files written" in result.stdout and "no network" in result.stdout
    assert not (tmp_path / "hf" / "vocab.json").exists()
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_push_to_hub_creates_and_uploads(tmp_path, monkeypatch):
    # No Hub in tests: HfApi is replaced by a recorder; the check is on the calls
    # and on what the folder holds when it is uploaded.
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", sorted(p.name for p in kwargs["folder_path"].iterdir()), kwargs))

    monkeypatch.setattr(convert_gpt2, "HfApi", FakeApi)
    model_json, weights, _ = write_model(tmp_path / "run", tiny_config(vocab_size=100, context_length=32))
    convert("to-hf", model_json, weights, tmp_path / "hf", "--push-to-hub", "someone/tiny-gpt")
    (create, repo_id, create_args), (upload, files, upload_args) = calls
    assert (create, repo_id, create_args["exist_ok"]) == ("create_repo", "someone/tiny-gpt", True)
    assert upload == "upload_folder" and upload_args["repo_id"] == "someone/tiny-gpt"
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert 'from_pretrained("someone/tiny-gpt")' in (tmp_path / "hf" / "README.md").read_text()


def test_reference_harness_checkpoint_loads_and_converts(tmp_path):
    # The reference harness stores each layer's T x T causal mask as `att.mask`.
    cfg = tiny_config(vocab_size=100, context_length=32)
    model = random_model(cfg)
    state = dict(model.state_dict())
    for i in range(cfg["n_layers"]):
        state[f"trf_blocks.{i}.att.mask"] = torch.triu(torch.ones(32, 32), diagonal=1)
    (tmp_path / "ref").mkdir()
    save_state(state, tmp_path / "ref" / "model.safetensors")
    (tmp_path / "ref" / "model.json").write_text(json.dumps(cfg))

    loaded = load_model(tmp_path / "ref" / "model.json", tmp_path / "ref" / "model.safetensors", "cpu")
    torch.testing.assert_close(ours_logits(loaded), ours_logits(model), atol=0, rtol=0)
    convert("to-hf", tmp_path / "ref" / "model.json", tmp_path / "ref" / "model.safetensors", tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(hf_logits(hf), ours_logits(model), atol=1e-5, rtol=0)


@pytest.mark.e2e
def test_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_error_line(run_script("convert_gpt2.py", "from-hf", tmp_path / "empty", tmp_path / "out"),
                          "config.json: file not found")

    hf = random_hf_model()
    hf.config.activation_function = "relu"
    hf.save_pretrained(tmp_path / "relu")
    result = CliRunner().invoke(convert_gpt2.cli, ["from-hf", str(tmp_path / "relu"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "activation_function 'relu'" in result.stderr

    hf = random_hf_model()
    hf.save_pretrained(tmp_path / "lying")
    config = json.loads((tmp_path / "lying" / "config.json").read_text())
    (tmp_path / "lying" / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    result = CliRunner().invoke(convert_gpt2.cli, ["from-hf", str(tmp_path / "lying"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "do not fit its config.json" in result.stderr

    save_file({"x": torch.zeros(1)}, tmp_path / "junk.safetensors")
    model_json, _, _ = write_model(tmp_path / "run", tiny_config(vocab_size=100))
    result = CliRunner().invoke(convert_gpt2.cli, ["to-hf", str(model_json), str(tmp_path / "junk.safetensors"),
                                                   str(tmp_path / "hf")])
    assert result.exit_code == 2 and "does not fit this model config" in result.stderr
