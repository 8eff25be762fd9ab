"""Issue 28: the newer features under hostile input. Each case ends in one clear line (or a
note where what the user did is legitimate), before anything is lost."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from checkpointing import consolidate_weights
from config import load_run
from conftest import (PROJECT_DIR, TINY_MODEL, make_run, read_rows, rewind_to_checkpoint, run_training,
                      tokens_for)
from errors import UserError
from hellaswag_scoring import items_used_note, rank_share
from evalkit import ITEMS, write_items
from gpt import GPTModel
from token_data import open_split


def one_error_line(result):
    """The run failed with exit status 2 and said why in one line of its own, no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def write_checkpoint(checkpoint_dir, weights, model_config=TINY_MODEL):
    """A checkpoint directory as a run writes one, reduced to what init_from reads."""
    checkpoint_dir.mkdir(parents=True)
    save_file(weights, checkpoint_dir / "model.safetensors")
    (checkpoint_dir / "meta.json").write_text(json.dumps({"global_step": 3, "model_config": model_config}))
    return checkpoint_dir


def tiny_weights(**model):
    torch.manual_seed(0)
    return {key: tensor.contiguous() for key, tensor in GPTModel({**TINY_MODEL, **model}).state_dict().items()}


# ---------------------------------------------------------------- 1. init_from that does not exist

def test_1_init_from_a_missing_path_or_a_bad_hub_id_is_one_line(tmp_path, verdict_dataset, monkeypatch):
    import huggingface_hub.constants

    def init_from(value):
        run_dir = make_run(tmp_path / value.replace("/", "_").replace(" ", "_"), verdict_dataset,
                           init_from=value, min_train_tokens=tokens_for(1, 1))
        return one_error_line(run_training([run_dir, "datasets"], check=False))

    line = init_from("runs/base/checkpoints/best")  # that run has not been trained yet
    assert f"init_from 'runs/base/checkpoints/best': no such directory ({PROJECT_DIR}/runs/base/checkpoints/best)" \
        in line
    assert "init_from './mine': no such directory" in init_from("./mine")
    assert "init_from 'demo/checkpoints': no such directory" in init_from("demo/checkpoints")  # a run's name first
    assert "init_from 'gpt2 small': not a directory, nor a valid Hugging Face repo id (Repo id must use " \
           "alphanumeric chars" in init_from("gpt2 small")
    # A well-formed id is asked of the Hub; none can be reached from tests, so offline mode stands in for it.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    line = init_from("nobody/no-such-model")
    assert line.endswith("'nobody/no-such-model' is not a local directory and could not be downloaded from the "
                         "Hugging Face Hub: offline mode (HF_HUB_OFFLINE) is on, and it was never downloaded before")


# ---------------------------------------------------------------- 2. weights that are not the model.json's

def test_2_init_from_weights_of_another_shape_name_the_tensors(tmp_path, verdict_dataset):
    # Weights copied in from a run with a wider model, under a meta.json that says TINY_MODEL.
    source = write_checkpoint(tmp_path / "source", tiny_weights(emb_dim=48, n_layers=1))
    run_dir = make_run(tmp_path / "run", verdict_dataset, init_from=str(source), min_train_tokens=tokens_for(1, 1))
    line = one_error_line(run_training([run_dir, "datasets"], check=False))
    assert line.startswith(f"error: {run_dir / 'train.json'}: init_from '{source}': {source / 'model.safetensors'} "
                           f"does not hold the model {source / 'meta.json'} describes: tok_emb.weight is (257, 48), "
                           "expected (257, 32); pos_emb.weight is (32, 48), expected (32, 32); ")
    assert line.endswith("more)")
    assert not (run_dir / "checkpoints").exists()


# ---------------------------------------------------------------- 3. a sharded checkpoint without model.safetensors

@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, verdict_dataset):
    """A world-of-one FSDP run with checkpoints at steps 0 and 1 (their full model.safetensors
    gathered at save time, the reference for what the shards hold)."""
    run_dir = make_run(tmp_path_factory.mktemp("fsdp") / "run", verdict_dataset, parallelism="fsdp",
                       min_train_tokens=tokens_for(2, 1), checkpoint_interval=1)
    run_training([run_dir, "datasets"])
    return run_dir


def without_consolidated_weights(checkpoint_dir, copy_to):
    """A copy of `checkpoint_dir` as a run with consolidated_weights false writes it."""
    copy = Path(shutil.copytree(checkpoint_dir, copy_to))
    (copy / "model.safetensors").unlink()
    meta = json.loads((copy / "meta.json").read_text())
    del meta["files"]["model.safetensors"]
    (copy / "meta.json").write_text(json.dumps(meta))
    return copy


def first_batch_loss(weights, dataset_dir, start, context=TINY_MODEL["context_length"]):
    """The loss of a run's first global batch (4 sequences from `start`), written out plainly."""
    model = GPTModel(TINY_MODEL).eval()
    model.load_state_dict(weights)
    tokens = torch.from_numpy(open_split(dataset_dir, "train")[start:start + 4 * context + 1].astype("int64"))
    inputs, targets = tokens[:-1].view(4, context), tokens[1:].view(4, context)
    with torch.no_grad():
        return F.cross_entropy(model(inputs).flatten(0, 1).double(), targets.flatten()).item()


def test_3_init_from_a_sharded_checkpoint_reads_its_shards(tmp_path, fsdp_run, verdict_dataset):
    gathered = (fsdp_run / "checkpoints" / "latest").resolve()
    source = without_consolidated_weights(gathered, tmp_path / "sharded-only")
    run_dir = make_run(tmp_path / "run", verdict_dataset, init_from=str(source), start_train_token=5000,
                       min_train_tokens=tokens_for(1, 1))
    result = run_training([run_dir, "datasets"])
    assert f"init_from: weights of {source}" in result.stdout
    expected = first_batch_loss(load_file(gathered / "model.safetensors"), verdict_dataset, 5000)
    assert read_rows(run_dir)[0]["loss"] == pytest.approx(expected, rel=1e-5)
    # consolidate_checkpoint.py reads the shards the same way (no process group here either).
    written = load_file(consolidate_weights(source))
    assert all(torch.equal(written[key], tensor) for key, tensor in load_file(gathered / "model.safetensors").items())


# ---------------------------------------------------------------- 9. a wrong run name

def test_9_a_wrong_run_name_suggests_the_closest():
    with pytest.raises(UserError) as error:
        load_run("dmeo")
    assert str(error.value).endswith("(did you mean 'demo'?)")
    assert "runs available" not in str(error.value)


# ---------------------------------------------------------------- 10. initial weights that are not finite

def test_10_non_finite_initial_weights_are_named_before_any_step(tmp_path, verdict_dataset):
    weights = tiny_weights()
    weights["trf_blocks.1.ff.layers.0.weight"][3, 5] = float("nan")
    source = write_checkpoint(tmp_path / "source", weights)
    run_dir = make_run(tmp_path / "run", verdict_dataset, init_from=str(source), min_train_tokens=tokens_for(1, 1))
    line = one_error_line(run_training([run_dir, "datasets"], check=False))
    assert line == (f"error: {run_dir / 'train.json'}: init_from '{source}': the weights hold non-finite values "
                    "(NaN or infinity) in trf_blocks.1.ff.layers.0.weight; training cannot start from them")
    assert not (run_dir / "metrics.jsonl").exists()


# ---------------------------------------------------------------- 8. a local dataset directory that is not there

def test_8_a_missing_dataset_directory_says_so_and_how_to_build_one(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # "datasets/my-corpus" also has the form of a Hub repo id, so the Hub is asked; it cannot be
    # reached from tests, and offline mode stands in for that.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    run_dir = make_run(tmp_path / "run", "datasets/my-corpus", min_train_tokens=tokens_for(1, 1))
    line = one_error_line(run_training([run_dir, "datasets"], check=False))
    assert line == (f"error: dataset 'datasets/my-corpus': no such directory (looked for "
                    f"{run_dir / 'datasets/my-corpus'} and {PROJECT_DIR / 'datasets/my-corpus'}); as a Hugging Face "
                    "Hub dataset repo id it failed: offline mode (HF_HUB_OFFLINE) is on, and it was never downloaded "
                    "before. To build a dataset from text files: uv run prepare_datasets.py datasets/my-corpus "
                    "FILE_OR_DIR...")
    assert "datasets/datasets" not in line


# ---------------------------------------------------------------- 4. HellaSwag item counts

def test_4_hellaswag_says_how_many_items_it_scores_and_refuses_none(tmp_path, verdict_dataset):
    items = write_items(tmp_path / "three.jsonl", ITEMS[:3])
    run_dir = make_run(tmp_path / "run", verdict_dataset, hellaswag_interval=1, hellaswag_items=1000,
                       hellaswag_data=str(items), min_train_tokens=tokens_for(1, 1))
    result = run_training([run_dir, "datasets"])
    assert f"note: hellaswag_items is 1000 but {items} has 3; HellaSwag scores those 3" in result.stdout
    # The logged accuracy is over those 3 items: a multiple of 1/3.
    assert round(read_rows(run_dir)[0]["hellaswag_acc"] * 3, 9) in (0, 1, 2, 3)

    (tmp_path / "blank.jsonl").write_text("\n\n")
    run_dir = make_run(tmp_path / "empty", verdict_dataset, hellaswag_interval=1, min_train_tokens=tokens_for(1, 1),
                       hellaswag_data=str(tmp_path / "blank.jsonl"))
    line = one_error_line(run_training([run_dir, "datasets"], check=False))
    assert line.endswith(f"train.json key 'hellaswag_data' ({tmp_path / 'blank.jsonl'}): no items")
    # Fewer items than ranks (decided in docs/decisions.md): scored, the count said. rank_share gives
    # the second rank a repeat of the one item that its count leaves out.
    assert items_used_note(1, None, 2, "one.jsonl") == \
        "HellaSwag: 1 item of one.jsonl (fewer than the 2 ranks: ranks 1 to 1 score no item of their own)"
    assert rank_share(["item"], 1, 2) == (["item"], 0)


# ---------------------------------------------------------------- 6. a damaged sharded checkpoint

def test_6_damaged_shard_metadata_is_said_in_the_users_terms(tmp_path, fsdp_run, monkeypatch):
    run_dir = Path(shutil.copytree(fsdp_run, tmp_path / "run", symlinks=True))
    checkpoints = run_dir / "checkpoints"
    latest, first = (checkpoints / "latest").resolve(), min(checkpoints.glob("*-iteration-0"))
    metadata = latest / "sharded" / ".metadata"
    metadata.write_bytes(bytes(metadata.stat().st_size))  # zeroed, its size intact
    line = one_error_line(run_training([run_dir, "datasets", "latest"], check=False))
    assert line == (f"error: checkpoint {latest} is incomplete or damaged: sharded/.metadata is not readable; "
                    f"`auto` resumes from {first.name} instead")

    monkeypatch.setenv("DEBUG", "1")
    debug = run_training([run_dir, "datasets", "latest"], check=False)
    assert "sharded/.metadata is not readable (UnpicklingError: invalid load key" in debug.stderr
    monkeypatch.delenv("DEBUG")

    resumed = run_training([run_dir, "datasets", "auto"])
    assert f"resuming from the newest complete checkpoint, {first.name}" in resumed.stdout
    assert f"Resuming from {first.name} at global step 1" in resumed.stdout


# ---------------------------------------------------------------- 5. resuming with a changed schedule

def test_5_resuming_with_a_changed_schedule_says_so(tmp_path, verdict_dataset):
    schedule = dict(schedule_learning_rate=True, warmup_period_percent=25, checkpoint_interval=2)
    full = make_run(tmp_path / "full", verdict_dataset, min_train_tokens=tokens_for(4, 1), **schedule)
    run_training([full, "datasets"])
    resumed = rewind_to_checkpoint(full, 2, tmp_path / "resumed")
    train_json = resumed / "train.json"
    train_json.write_text(json.dumps({**json.loads(train_json.read_text()), "min_train_tokens": tokens_for(8, 1)}))
    result = run_training([resumed, "datasets", "latest"])
    # The rate step 3 had in the uninterrupted run, and the one it has now (both logged).
    before, after = read_rows(full)[3]["lr"], read_rows(resumed)[3]["lr"]
    assert after > before
    assert (f"note: the learning-rate schedule differs from checkpoint "
            f"{min((resumed / 'checkpoints').glob('*-iteration-2')).name}'s (min_train_tokens {tokens_for(4, 1)} -> "
            f"{tokens_for(8, 1)}): total steps 4 -> 8; the learning rate at global step 3 is {after:.6g} (it would "
            f"have been {before:.6g})") in result.stdout
    assert len(read_rows(resumed)) == 8

    # Unchanged: no note. A checkpoint from before meta.json recorded the schedule: it cannot be compared.
    assert "learning-rate schedule" not in run_training([resumed, "datasets", "latest"]).stdout
    checkpoint = (resumed / "checkpoints" / "latest").resolve().name
    meta_json = resumed / "checkpoints" / checkpoint / "meta.json"
    meta = json.loads(meta_json.read_text())
    del meta["schedule"]
    meta_json.write_text(json.dumps(meta))
    assert (f"note: checkpoint {checkpoint} does not record its learning-rate schedule (an older checkpoint); this "
            "run's schedule cannot be compared") in run_training([resumed, "datasets", "latest"]).stdout


# ---------------------------------------------------------------- 7. one error, printed once, under torchrun

@pytest.mark.e2e
def test_7_a_train_json_typo_under_torchrun_is_one_line_in_the_root_cause(tmp_path, verdict_dataset):
    run_dir = make_run(tmp_path / "run", verdict_dataset, learning_rat=0.001)
    result = run_training([run_dir, "datasets"], nproc=2, check=False)
    output = result.stdout + result.stderr
    line = f"error: {run_dir / 'train.json'}: unknown key 'learning_rat' (did you mean 'learning_rate'?)"
    assert result.returncode != 0
    assert output.count(line) == 2, output  # printed by rank 0, and in torchrun's summary
    assert output.count("unknown key") == 2 and "valid keys" not in output
    root_cause = output.split("Root Cause (first observed failure):")[1]
    assert "rank      : 0 (local_rank: 0)" in root_cause and f"traceback : {line}" in root_cause


# ---------------------------------------------------------------- 11. memory levers, threads and timing

def loss_and_gradients(levers, threads, weights, idx, targets):
    """One forward and backward pass of a model big enough that 2 threads split its
    reductions (more elements than ATen's grain size of 32,768), dropout on."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = GPTModel(LEVERS_MODEL, activation_checkpointing=levers, loss_chunk_tokens=100 if levers else None)
        model.load_state_dict(weights)
        torch.manual_seed(1)  # the same dropout masks in every pass
        loss = model.train()(idx, targets)
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters()}
    finally:
        torch.set_num_threads(previous)


LEVERS_MODEL = {**TINY_MODEL, "context_length": 64, "emb_dim": 64, "n_heads": 4, "drop_rate": 0.1}


def test_11_memory_levers_depend_on_the_thread_count_as_the_plain_path_does_and_never_on_timing():
    """What decides the last bits on CPU (docs/decisions.md): the thread count changes how
    reductions are split, in both paths alike; nothing depends on timing (the same thread
    count gives the same bits, repeated, under any load). Activation checkpointing is exact;
    loss chunking sums the loss chunk by chunk, a different order than one mean: the levers
    differ from the plain path by float32 rounding only, and by the same amount at any
    thread count. So runs compared for equal losses must use one thread count."""
    torch.manual_seed(0)
    weights = GPTModel(LEVERS_MODEL).state_dict()
    idx, targets = torch.randint(0, LEVERS_MODEL["vocab_size"], (2, 16, LEVERS_MODEL["context_length"]))
    passes = {(levers, threads): [loss_and_gradients(levers, threads, weights, idx, targets) for _ in range(2)]
              for levers in (False, True) for threads in (1, 2)}
    for (first_loss, first_grads), (loss, grads) in passes.values():
        assert torch.equal(loss, first_loss) and all(torch.equal(grads[k], first_grads[k]) for k in grads)
    for threads in (1, 2):
        (plain_loss, plain_grads), (levers_loss, levers_grads) = passes[(False, threads)][0], passes[(True, threads)][0]
        torch.testing.assert_close(levers_loss, plain_loss, rtol=1e-6, atol=0)
        for key in plain_grads:
            torch.testing.assert_close(levers_grads[key], plain_grads[key], rtol=1e-5, atol=1e-7)
    # The levers' own rounding is the same at 1 and 2 threads.
    difference = {threads: passes[(True, threads)][0][0] - passes[(False, threads)][0][0] for threads in (1, 2)}
    assert torch.equal(difference[1], difference[2])
