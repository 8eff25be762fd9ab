"""Helpers shared by the tests of the evaluation and conversion scripts
(test_smoke_script.py, test_loss_script.py, test_ift_script.py, test_convert_gpt2.py,
test_convert_llama.py, the HellaSwag tests)."""

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
from model_source import load_model as load_model_source, resolve_model  # noqa: E402


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


def load_model(model_json, weights, device="cpu", drop_rate=0.0):
    """The model of a model.json and its weights, loaded as the scripts load it."""
    return load_model_source(resolve_model([model_json, weights]), device, drop_rate)


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


# Items in the real file's format (hellaswag_val.jsonl), with text of the same kind.
ITEMS = [
    {"ind": 4, "activity_label": "Washing dishes", "ctx_a": "A woman stands at a kitchen sink full of plates.",
     "ctx_b": "she", "ctx": "A woman stands at a kitchen sink full of plates. she",
     "endings": ["turns on the tap and scrubs a plate with a yellow sponge.", "rides a horse across the field.",
                 "throws the plates onto the roof of the house.", "sings into a microphone on a stage."],
     "label": 0},
    {"ind": 17, "activity_label": "Playing guitar", "ctx_a": "A young man sits on a couch holding an acoustic guitar.",
     "ctx_b": "he", "ctx": "A young man sits on a couch holding an acoustic guitar. he",
     "endings": ["eats a sandwich while walking the dog.", "strums the strings and sings along to the tune.",
                 "paints the guitar bright red.", "dives into a swimming pool."],
     "label": 1},
    {"ind": 23, "activity_label": "Home and Garden",
     "ctx_a": "[header] How to repot a houseplant [title] Choose a slightly larger pot. [step] The new pot "
              "should be one or two inches wider than the old one, with a hole in the bottom so that "
              "water can drain away from the roots.",
     "ctx_b": "",
     "ctx": "[header] How to repot a houseplant [title] Choose a slightly larger pot. [step] The new pot "
            "should be one or two inches wider than the old one, with a hole in the bottom so that water "
            "can drain away from the roots.",
     "endings": ["[title] Water the plant a day before you repot it. [step] Moist soil holds together and "
                 "slides out of the old pot more easily.",
                 "[title] Paint the pot with nail polish. [step] The plant will enjoy the colour.",
                 "[title] Put the plant in the freezer. [step] Cold roots are easier to move.",
                 "[title] Read the plant a story. [step] Plants like to be spoken to."],
     "label": 0},
    {"ind": 31, "activity_label": "Shoveling snow", "ctx_a": "A man in a red coat walks out of his house.",
     "ctx_b": "he", "ctx": "A man in a red coat walks out of his house. he",
     "endings": ["picks up a shovel and clears the snow from the driveway.", "starts swimming in the snow.",
                 "bakes a cake on the porch.", "climbs into the chimney."],
     "label": 0},
    {"ind": 40, "activity_label": "Making a sandwich", "ctx_a": "A girl lays two slices of bread on a board.",
     "ctx_b": "she", "ctx": "A girl lays two slices of bread on a board. she",
     "endings": ["plays tennis with the bread.", "mails the bread to a friend.",
                 "spreads peanut butter on one slice and jam on the other.", "wears the bread as a hat."],
     "label": 2},
    {"ind": 52, "activity_label": "Walking the dog",
     "ctx_a": "A dog waits by the front door with a leash in its mouth.",
     "ctx_b": "the owner", "ctx": "A dog waits by the front door with a leash in its mouth. the owner",
     "endings": ["drives away in a car.", "reads a newspaper upside down.", "teaches the dog to fly.",
                 "clips the leash to its collar and opens the door."],
     "label": 3},
    {"ind": 66, "activity_label": "Brushing teeth", "ctx_a": "A boy stands in front of a bathroom mirror.",
     "ctx_b": "he", "ctx": "A boy stands in front of a bathroom mirror. he",
     "endings": ["squeezes toothpaste onto a brush and brushes his teeth.", "mows the lawn in the mirror.",
                 "sleeps in the bathtub.", "throws the mirror out of the window."],
     "label": 0},
]


def write_items(path, items=ITEMS):
    path.write_text("".join(json.dumps({**item, "split": "val", "split_type": "indomain",
                                        "source_id": f"activitynet~v_{item['ind']}"}) + "\n" for item in items))
    return path
