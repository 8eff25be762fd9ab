"""One way to name a model in every script that reads weights (model_source.py): RUN,
RUN CHECKPOINT, a checkpoint directory and the older MODEL_JSON WEIGHTS give the same
results, checked against PlainGPT (plain_gpt.py) loaded from the checkpoint's files by
hand; the config comes from meta.json; bad names are one error line; nothing is written
where it was not asked for; and convert_gpt2.py to-hf's model card."""

import contextlib
import io
import json
import re
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from conftest import TINY_MODEL, make_run, run_training, tokens_for
from evalkit import one_torch_thread  # noqa: F401  (autouse fixture)
from evalkit import assert_one_error_line, run_cli, write_items

from config import ModelConfig
from plain_gpt import PlainGPT
from token_data import open_split

CONTEXT = 64  # room for the card's prompt and 20 new tokens in transformers' learned positions
PROMPT = "Every effort moves you"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, verdict_dataset):
    """A byte-level run trained for 4 steps with checkpoints after 2 (`best`) and 4 (`latest`),
    whose model.json was then changed: its checkpoints' meta.json keeps the config they were
    trained with. Returns (run directory, a copy of the original model.json, beside train.json)."""
    root = tmp_path_factory.mktemp("model-source")
    run_dir = make_run(root / "runs" / "tiny", verdict_dataset, model={"context_length": CONTEXT},
                       min_train_tokens=tokens_for(4, 1, context=CONTEXT), checkpoint_interval=2,
                       validation_interval=2, validation_batches=2)
    run_training([run_dir, root / "datasets"])
    # `best` on the first checkpoint, whatever the losses were, so that it is not `latest`.
    first = min((run_dir / "checkpoints").glob("*-iteration-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    (run_dir / "checkpoints" / "best").unlink()
    (run_dir / "checkpoints" / "best").symlink_to(first.name)
    # The older form's model.json, beside the run's train.json (which names the dataset and tokenizer).
    (root / "original").mkdir()
    original = root / "original" / "model.json"
    shutil.copy(run_dir / "model.json", original)
    shutil.copy(run_dir / "train.json", root / "original" / "train.json")
    (run_dir / "model.json").write_text(json.dumps({**TINY_MODEL, "context_length": CONTEXT, "emb_dim": 64}))
    return run_dir, original


def checkpoint(run_dir, name):
    return (run_dir / "checkpoints" / name).resolve()


def plain_model(checkpoint_dir):
    """PlainGPT with the checkpoint's weights, read with safetensors and meta.json directly."""
    meta = json.loads((checkpoint_dir / "meta.json").read_text())
    model = PlainGPT(ModelConfig.from_dict(meta["model_config"])).eval()
    model.load_state_dict(load_file(checkpoint_dir / "model.safetensors"))
    return model


def greedy_text(model, prompt, steps):
    ids = list(prompt.encode())
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids[-CONTEXT:]]))[0, -1].argmax()))
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def plain_loss(model, tokens, batches, batch_size):
    """test_loss.py's definition written out: the mean over batches of the mean token loss."""
    losses = []
    with torch.no_grad():
        for b in range(batches):
            rows = torch.tensor(tokens[b * batch_size * CONTEXT:(b + 1) * batch_size * CONTEXT + 1].astype("int64"))
            x, y = rows[:-1].view(batch_size, CONTEXT), rows[1:].view(batch_size, CONTEXT)
            losses.append(torch.nn.functional.cross_entropy(model(x).flatten(0, 1).double(), y.flatten()).item())
    return sum(losses) / len(losses)


def forms(run_dir, original, name):
    """Every way to name checkpoint `name` of the run (`best` is the default)."""
    checkpoint_dir = checkpoint(run_dir, name)
    named = [[run_dir, name], [checkpoint_dir], [run_dir / "checkpoints" / name / "model.safetensors"],
             [original, checkpoint_dir / "model.safetensors"]]
    return named + ([[run_dir]] if name == "best" else [])


def run_ok(script, args, cwd):
    result = run_cli(script, args, cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("name", ["best", "latest"])
def test_every_form_samples_the_same_text_as_plain_gpt(trained, tmp_path, name):
    run_dir, original = trained
    assert checkpoint(run_dir, "best") != checkpoint(run_dir, "latest")
    expected = greedy_text(plain_model(checkpoint(run_dir, name)), PROMPT, 30)
    for form in forms(run_dir, original, name):
        text = run_ok("test_smoke.py", [*form, "--temperature", 0, "--max-new-tokens", 30], tmp_path)
        assert text.rstrip("\n") == expected, form


def test_every_form_gives_the_same_test_loss_on_the_runs_own_dataset(trained, verdict_dataset, tmp_path):
    run_dir, original = trained
    tokens = open_split(verdict_dataset, "validation")
    expected = plain_loss(plain_model(checkpoint(run_dir, "best")), tokens, batches=3, batch_size=2)
    # No --dataset: the run's own (train.json's), here the byte-level verdict dataset.
    printed = set()
    for form in forms(run_dir, original, "best"):
        form = [tmp_path / "datasets", *form] if str(form[0]).endswith(".json") else form  # older form
        out = run_ok("test_loss.py", [*form, "--start-token", 0, "--batches", 3, "--batch-size", 2], tmp_path)
        printed.add(re.search(r"Loss against our test dataset: (\S+)", out).group(1))
    assert len(printed) == 1 and float(printed.pop()) == pytest.approx(expected, abs=1e-6)


def test_every_form_scores_hellaswag_and_converts_alike(trained, tmp_path):
    run_dir, original = trained
    items = write_items(tmp_path / "items.jsonl")
    scores, converted = set(), set()
    for index, form in enumerate(forms(run_dir, original, "best")):
        scores.add(run_ok("eval_hellaswag.py", [*form, "--data", items], tmp_path).splitlines()[0])
        out_dir = tmp_path / f"hf-{index}"
        run_ok("convert_gpt2.py", ["to-hf", *form, out_dir], tmp_path)
        converted.add((out_dir / "model.safetensors").read_bytes())
    assert len(scores) == 1 and len(converted) == 1
    # The older eval_hellaswag form: RUN and the weights' path.
    best_weights = checkpoint(run_dir, "best") / "model.safetensors"
    assert run_ok("eval_hellaswag.py", [run_dir, best_weights, "--data", items], tmp_path).splitlines()[0] in scores


def test_test_ift_reads_every_form(trained, tmp_path):
    run_dir, original = trained
    data = tmp_path / "instructions.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(20)]))
    results = []
    for index, form in enumerate([[run_dir], [original, checkpoint(run_dir, "best") / "model.safetensors"]]):
        run_ok("test_ift.py", ["generate", f"r{index}", *form, "--data", data, "--epochs", 1,
                               "--out-dir", tmp_path], tmp_path)
        results.append(json.loads((tmp_path / f"r{index}-ift-test-results.json").read_text()))
    assert results[0]["test_loss"] == results[1]["test_loss"]
    assert [item["model_response"] for item in results[0]["items"]] == [
        item["model_response"] for item in results[1]["items"]]


def test_a_reference_checkpoint_without_model_config_takes_the_runs_model_json(trained, tmp_path):
    run_dir, original = trained
    copy = tmp_path / "runs" / "ref"
    shutil.copytree(run_dir, copy, symlinks=True)
    shutil.copy(original, copy / "model.json")
    meta_path = checkpoint(copy, "latest") / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["model_config"]
    meta_path.write_text(json.dumps(meta))
    args = ["--temperature", 0, "--max-new-tokens", 10]
    assert (run_ok("test_smoke.py", [copy, "latest", *args], tmp_path)
            == run_ok("test_smoke.py", [run_dir, "latest", *args], tmp_path))


def test_a_model_json_that_does_not_fit_is_one_line_naming_the_tensors(trained, tmp_path):
    run_dir, _ = trained
    weights = checkpoint(run_dir, "best") / "model.safetensors"
    result = run_cli("test_smoke.py", [run_dir / "model.json", weights], tmp_path)
    assert_one_error_line(result, f"{weights}: its tensors do not fit the model config of {run_dir / 'model.json'}",
                          "tok_emb.weight is [257, 32], the config gives [257, 64]", "(and ")


@pytest.mark.parametrize("args, fragment", [
    (["no-such-run"], "run 'no-such-run': no such directory"),
    (["RUN", "no-such-checkpoint"], "checkpoint 'no-such-checkpoint' not found in"),
    (["model.json"], "model.json: a model.json needs its weights after it (MODEL_JSON WEIGHTS)"),
    (["a", "b", "c"], "expected the model as RUN [CHECKPOINT], CHECKPOINT_DIR or MODEL_JSON WEIGHTS"),
])
def test_bad_model_names_are_one_error_line(trained, tmp_path, args, fragment):
    run_dir, _ = trained
    args = [run_dir if arg == "RUN" else arg for arg in args]
    assert_one_error_line(run_cli("test_smoke.py", args, tmp_path), fragment)


def test_a_sharded_checkpoint_without_full_weights_names_consolidate_checkpoint(trained, tmp_path):
    run_dir, _ = trained
    sharded = tmp_path / "checkpoint"
    shutil.copytree(checkpoint(run_dir, "best"), sharded)
    (sharded / "model.safetensors").unlink()
    (sharded / "sharded").mkdir()  # where a sharded checkpoint's DCP files are (checkpointing.SHARDED_DIR)
    result = run_cli("eval_hellaswag.py", [sharded, "--data", write_items(tmp_path / "items.jsonl")], tmp_path)
    assert_one_error_line(result, f"{sharded}: a sharded checkpoint without model.safetensors",
                          f"uv run consolidate_checkpoint.py {sharded}")


def test_nothing_is_written_into_the_working_or_run_directory_unless_asked(trained, tmp_path):
    run_dir, _ = trained
    items = write_items(tmp_path / "items.jsonl")
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    def listing():
        return sorted(map(str, [*cwd.rglob("*"), *run_dir.rglob("*")]))

    before = listing()
    run_ok("test_smoke.py", [run_dir, "--max-new-tokens", 5], cwd)
    run_ok("test_loss.py", [run_dir, "--start-token", 0, "--batches", 1, "--batch-size", 1], cwd)
    run_ok("eval_hellaswag.py", [run_dir, "--data", items, "--limit", 2], cwd)
    assert listing() == before


# ---------------------------------------------------------------- the model card

def card_of(out_dir):
    return ModelCard.load(out_dir / "README.md")


def test_the_model_card_carries_the_checkpoints_training_facts(trained, tmp_path):
    run_dir, _ = trained
    run_ok("convert_gpt2.py", ["to-hf", run_dir, "latest", tmp_path / "hf", "--license", "mit"], tmp_path)
    meta = json.loads((checkpoint(run_dir, "latest") / "meta.json").read_text())
    data = card_of(tmp_path / "hf").data
    assert data.license == "mit" and data.library_name == "transformers"
    # 4 steps of 4 sequences; global_step counts from 0.
    assert (data.tokens_trained, data.global_step) == (meta["tokens_seen"], meta["global_step"]) == (4 * 4 * CONTEXT, 3)
    assert (data.final_train_loss, data.final_val_loss) == (meta["avg_train_loss"], meta["val_loss"])
    assert (data.parallelism, data.world_size) == (meta["parallelism"], meta["world_size"]) == ("ddp", 1)
    # A local dataset and no init_from: neither is a Hub name.
    assert data.datasets is None and data.base_model is None


def test_the_model_card_names_the_base_model_and_hub_dataset(trained, tmp_path):
    run_dir, _ = trained
    copy = tmp_path / "runs" / "from-gpt2"
    shutil.copytree(run_dir, copy, symlinks=True)
    train = json.loads((copy / "train.json").read_text())
    (copy / "train.json").write_text(json.dumps({**train, "dataset": "gpjt/fineweb-gpt2-tokens"}))
    meta_path = checkpoint(copy, "latest") / "meta.json"
    # What initial_weights.py records for train.json "init_from": "openai-community/gpt2".
    init_from = {"kind": "huggingface", "source": "openai-community/gpt2"}
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "init_from": init_from}))
    run_ok("convert_gpt2.py", ["to-hf", copy, "latest", tmp_path / "hf", "--tokenizer", "bytes"], tmp_path)
    data = card_of(tmp_path / "hf").data
    assert data.base_model == "openai-community/gpt2" and data.datasets == ["gpjt/fineweb-gpt2-tokens"]


def usage_code(out_dir):
    return re.search(r"```python\n(.*?)```", card_of(out_dir).text, re.S).group(1)


def test_a_byte_level_models_usage_snippet_prints_its_greedy_continuation(trained, tmp_path):
    run_dir, _ = trained
    out_dir = tmp_path / "hf"
    run_ok("convert_gpt2.py", ["to-hf", run_dir, out_dir], tmp_path)
    code = usage_code(out_dir)
    assert "AutoTokenizer" not in code
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code, {})  # the card's snippet as a user pastes it, with transformers
    expected = run_ok("test_smoke.py", [run_dir, "--temperature", 0, "--max-new-tokens", 20], tmp_path)
    assert printed.getvalue() == expected


# ---------------------------------------------------------------- option names

def test_old_option_spellings_still_parse_but_help_shows_only_the_new_ones(tmp_path):
    import bench
    from cli_aliases import respelled

    renamed = {"--microbatch": "--microbatch-size", "--warmup": "--warmup-steps"}
    assert respelled(["m.json", "--microbatch", "2", "--warmup=1", "--steps", "--", "--warmup"], renamed) == [
        "m.json", "--microbatch-size", "2", "--warmup-steps=1", "--steps", "--", "--warmup"]
    with bench.main.make_context("bench.py", ["m.json", "--microbatch", "1,2", "--warmup", "3"]) as context:
        assert (context.params["microbatch_text"], context.params["warmup"]) == ("1,2", 3)
    help_text = run_ok("bench.py", ["--help"], tmp_path)
    assert "--microbatch-size" in help_text and "--warmup-steps" in help_text
    assert not re.search(r"--microbatch\b(?!-)|--warmup\b(?!-)", help_text)


@pytest.mark.parametrize("script", ["test_smoke.py", "test_loss.py", "eval_hellaswag.py", "test_ift.py",
                                    "convert_gpt2.py", "ddp_train.py", "preflight.py", "bench.py",
                                    "bench_generate.py", "bench_prepare.py", "compare_runs.py",
                                    "consolidate_checkpoint.py"])
def test_every_help_has_a_description_and_an_example(script, tmp_path):
    text = run_ok(script, ["--help"], tmp_path)
    description = text.split("\n\n")[1].strip()
    assert description and not description.startswith("Options:")
    assert re.search(r"^\s+(uv run |OPENAI_API_KEY=\S+ uv run )", text, re.M)
    if script == "ddp_train.py":
        assert "torchrun --nproc_per_node" in text
