"""Helpers shared by the tests of the evaluation and conversion scripts
(test_smoke_script.py, test_loss_script.py, test_ift_script.py, test_convert_gpt2.py,
test_convert_llama.py)."""

import contextlib
import importlib
import json
import os
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

PROJECT_DIR = Path(__file__).resolve().parents[1]
SHARED_DIR = PROJECT_DIR.parent / "shared"
INSTRUCTION_DATA = SHARED_DIR / "data" / "instruction-data.json"
sys.path.insert(0, str(PROJECT_DIR))
# tiktoken's GPT-2 files, so the gpt2 tokenizer works with no network.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DIR / "tiktoken"))

from gpt import GPTModel  # noqa: E402  (needs the path above)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on shared cores: one thread is many times faster than two
    threads that wait on each other. Test modules import this to enable it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(**overrides):
    return {"vocab_size": 257, "context_length": 64, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
            "drop_rate": 0.1, "qkv_bias": False, "tie_weights": False, **overrides}


def random_model(cfg, seed=0):
    """A GPTModel whose every parameter (LayerNorms and biases too) is random, so a
    key mapped to the wrong place changes the logits."""
    torch.manual_seed(seed)
    model = GPTModel(cfg)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model.eval()


def save_state(state, path):
    """Save a state dict as the project does: tied tensors as separate copies."""
    save_file({key: value.detach().contiguous().clone() for key, value in state.items()}, path)


def write_model(directory, cfg, seed=0):
    """model.json + model.safetensors of a random model in `directory`;
    returns (model.json path, weights path, the model)."""
    directory.mkdir(parents=True, exist_ok=True)
    model = random_model(cfg, seed)
    (directory / "model.json").write_text(json.dumps(cfg))
    save_state(model.state_dict(), directory / "model.safetensors")
    return directory / "model.json", directory / "model.safetensors", model


def run_script(script, *args):
    """A project script's CLI as a user runs it (`python SCRIPT ARGS` from the project
    directory), in this process: the same click entry point and error handling, without
    a new interpreter's torch start-up for every call."""
    return run_cli(script, args, cwd=PROJECT_DIR)


def run_cli(script, args, cwd):
    """Run `script`'s click entry point (`main`, or the `cli` group) on `args` in `cwd`;
    the result has a process's returncode, stdout and stderr (with the traceback a crash
    would print)."""
    module = importlib.import_module(Path(script).stem)
    command = getattr(module, "main", None) or module.cli
    with contextlib.chdir(cwd):
        result = CliRunner().invoke(command, [str(a) for a in args], prog_name=Path(script).name)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=stderr)


def assert_one_error_line(result, *fragments):
    """Bad input: exit status 2 and a single `error: ...` line, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
