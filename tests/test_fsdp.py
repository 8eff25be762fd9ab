"""parallelism "fsdp" (FSDP2) for real: torchrun with 2 CPU processes over gloo, and a
world of one in this process. It must train as DDP does, and its sharded checkpoints
must resume exactly, on another number of ranks, and across DDP and FSDP."""

import json
import os
import signal
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import (SHARED_DATA, TRAINER_WITH_FAULTS, make_run, read_rows, rewind_to_checkpoint, run_training,
                      start_torchrun, train_env, wait_for, worker_pid, write_byte_dataset)
from checkpointing import verify_checkpoint
from evalkit import run_script, write_items
from gpt import GPTModel

STEPS = 6
GLOBAL_BATCH_TOKENS = 2 * 2 * 4 * 32  # 2 ranks x accumulation 2 x microbatch 4 x context 32; 1 rank: accumulation 4
# No dropout: a checkpoint holds each rank's RNG state, which another world size cannot
# continue, so only without dropout can a run resumed on 1 rank match 2 (tests/test_ddp_train.py
# checks the RNG states resume on the same world size).
MODEL = {"drop_rate": 0.0, "tie_weights": True, "init_std": 0.02}
TRAIN = dict(global_batch_tokens=GLOBAL_BATCH_TOKENS, min_train_tokens=STEPS * GLOBAL_BATCH_TOKENS,
             checkpoint_interval=3, clipping_max_norm=0.5, validation_interval=3, validation_batches=3,
             schedule_learning_rate=True, warmup_period_percent=20)


def losses(run_dir):
    return [row["loss"] for row in read_rows(run_dir)]


def final_weights_path(run_dir):
    return run_dir / "checkpoints" / "latest" / "model.safetensors"


def final_weights(run_dir):
    return load_file(final_weights_path(run_dir))


def assert_weights_close(actual, expected, exact=False):
    assert actual.keys() == expected.keys()
    for key in expected:
        if exact:
            assert torch.equal(actual[key], expected[key]), key
        else:
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-6)


def with_parallelism(run_dir, parallelism):
    train_json = run_dir / "train.json"
    train_json.write_text(json.dumps({**json.loads(train_json.read_text()), "parallelism": parallelism}))
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, verdict_dataset):
    """One train.json trained three ways: FSDP on 2 ranks, and FSDP and DDP in a world of
    one (accumulation 4 instead of 2, the same tokens per step), checkpointed at steps 0, 3, 5.
    The 2-rank run also scores 7 HellaSwag items (an odd count) at the same steps."""
    base = tmp_path_factory.mktemp("runs")
    fsdp = make_run(base / "fsdp", verdict_dataset, model=MODEL, parallelism="fsdp", hellaswag_interval=3,
                    hellaswag_data=str(write_items(base / "hellaswag_val.jsonl")), **TRAIN)
    fsdp_one = make_run(base / "fsdp-one-rank", verdict_dataset, model=MODEL, parallelism="fsdp", **TRAIN)
    ddp_one = make_run(base / "ddp-one-rank", verdict_dataset, model=MODEL, **TRAIN)
    run_training([fsdp, "datasets"], nproc=2)
    run_training([fsdp_one, "datasets"])
    run_training([ddp_one, "datasets"])
    return SimpleNamespace(fsdp=fsdp, fsdp_one=fsdp_one, ddp_one=ddp_one)


@pytest.mark.e2e
def test_fsdp_trains_as_ddp_does(runs):
    for other in (runs.ddp_one, runs.fsdp_one):
        assert len(losses(runs.fsdp)) == STEPS
        assert losses(runs.fsdp) == pytest.approx(losses(other), rel=1e-4), other.name
        validation = [[r["val_loss"] for r in read_rows(run) if r.get("val_loss") is not None]
                      for run in (runs.fsdp, other)]
        assert len(validation[0]) == 3 and validation[0] == pytest.approx(validation[1], rel=1e-4)
        assert_weights_close(final_weights(runs.fsdp), final_weights(other))
    latest = runs.fsdp / "checkpoints" / "latest"
    meta = json.loads((latest / "meta.json").read_text())
    assert meta["parallelism"] == "fsdp" and meta["world_size"] == 2
    assert {"sharded/__0_0.distcp", "sharded/__1_0.distcp", "model.safetensors"} <= meta["files"].keys()
    assert "optimizer.pt" not in meta["files"]


@pytest.mark.e2e
def test_hellaswag_under_fsdp_counts_as_the_script_does_on_one_rank(runs, tmp_path):
    """Rank 1 scores one item again without counting it, so both ranks run as many forward
    passes (all-gathers): the run did not hang, and its counts are the script's."""
    fsdp = runs.fsdp
    evaluated = {row["step"]: row for row in read_rows(fsdp) if "hellaswag_acc" in row}
    assert sorted(evaluated) == [0, 3, 5]
    items = json.loads((fsdp / "train.json").read_text())["hellaswag_data"]
    result = run_script("eval_hellaswag.py", fsdp, final_weights_path(fsdp), "--data", items, "--json",
                        tmp_path / "hellaswag.json")
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "hellaswag.json").read_text())
    assert written["items"] == 7 and written["tokenizer"] == "bytes"
    assert (evaluated[5]["hellaswag_acc"], evaluated[5]["hellaswag_acc_norm"]) == (written["acc"], written["acc_norm"])


@pytest.mark.e2e
def test_fsdp_resumes_exactly_after_a_checkpoint(runs, tmp_path):
    resumed = rewind_to_checkpoint(runs.fsdp_one, 3, tmp_path / "resumed")
    result = run_training([resumed, "datasets", "latest"])
    assert "global step 4" in result.stdout
    assert losses(resumed) == losses(runs.fsdp_one)
    assert_weights_close(final_weights(resumed), final_weights(runs.fsdp_one), exact=True)


@pytest.mark.e2e
def test_a_two_rank_checkpoint_resumes_on_one_rank_and_across_ddp_and_fsdp(runs, tmp_path):
    for source, parallelism in ((runs.fsdp, "fsdp"), (runs.fsdp, "ddp"), (runs.ddp_one, "fsdp")):
        resumed = with_parallelism(rewind_to_checkpoint(source, 3, tmp_path / f"{source.name}-as-{parallelism}"),
                                   parallelism)
        run_training([resumed, "datasets", "latest"])  # a world of one, accumulation 4
        assert losses(resumed) == pytest.approx(losses(source), rel=1e-4), (source.name, parallelism)
        assert_weights_close(final_weights(resumed), final_weights(source))


@pytest.mark.e2e
def test_a_one_rank_checkpoint_resumes_on_two_ranks(runs, tmp_path):
    resumed = rewind_to_checkpoint(runs.fsdp_one, 3, tmp_path / "resumed")
    run_training([resumed, "datasets", "latest"], nproc=2)
    assert losses(resumed) == pytest.approx(losses(runs.fsdp), rel=1e-4)
    assert_weights_close(final_weights(resumed), final_weights(runs.fsdp))


@pytest.mark.e2e
def test_consolidated_weights_are_the_sharded_model(runs, tmp_path):
    """The model.safetensors rank 0 gathered equals what consolidate_checkpoint.py reads
    from the shards alone (no process group), and gives the same logits."""
    copy = rewind_to_checkpoint(runs.fsdp, 5, tmp_path / "copy") / "checkpoints" / "latest"
    gathered = load_file(copy / "model.safetensors")
    (copy / "model.safetensors").unlink()
    meta = json.loads((copy / "meta.json").read_text())
    del meta["files"]["model.safetensors"]  # as a run with consolidated_weights false writes it
    (copy / "meta.json").write_text(json.dumps(meta))

    result = run_script("consolidate_checkpoint.py", copy)
    assert result.returncode == 0, result.stderr
    from_shards = load_file(copy / "model.safetensors")
    assert_weights_close(from_shards, gathered, exact=True)
    assert json.loads((copy / "meta.json").read_text())["files"]["model.safetensors"] == \
        (copy / "model.safetensors").stat().st_size
    models = []
    for weights in (gathered, from_shards):
        model = GPTModel(meta["model_config"]).eval()
        model.load_state_dict(weights)
        models.append(model)
    idx = torch.randint(0, 257, (2, 32))
    torch.testing.assert_close(models[0](idx), models[1](idx), rtol=0, atol=0)


@pytest.mark.e2e
def test_a_shard_write_failing_on_one_rank_stops_every_rank_and_keeps_the_checkpoints(tmp_path,
                                                                                        verdict_dataset):
    run_dir = make_run(tmp_path / "run", verdict_dataset, model=MODEL, parallelism="fsdp", **TRAIN)
    env = {**train_env(), "FAULT_SHARD_WRITE": "1:3"}
    result = run_training([run_dir, "datasets"], nproc=2, env=env, script=TRAINER_WITH_FAULTS, check=False)
    assert result.returncode != 0
    assert "could not write checkpoint" in result.stderr and "rank 1: OSError" in result.stderr
    assert "earlier checkpoints are untouched" in result.stderr
    checkpoints = run_dir / "checkpoints"
    assert [p.name.split("-", 1)[1] for p in checkpoints.iterdir() if not p.is_symlink()] == ["iteration-0"]
    assert (checkpoints / "latest").resolve().name.endswith("iteration-0")
    verify_checkpoint(checkpoints / "latest")  # every file its manifest lists, at its size


@pytest.mark.e2e
def test_a_killed_rank_ends_the_others_under_fsdp(tmp_path):
    """Rank 0, inside an all-gather when rank 1 dies, must not wait forever. (A SIGTERM's
    stop-and-checkpoint path is the same code under DDP and FSDP: test_reliability.py.)"""
    dataset = write_byte_dataset(tmp_path / "dataset", (SHARED_DATA / "the-verdict.txt").read_text() * 12)
    run_dir = make_run(tmp_path / "run", dataset, model=MODEL, parallelism="fsdp",
                       **{**TRAIN, "min_train_tokens": 400 * GLOBAL_BATCH_TOKENS, "checkpoint_interval": 1000,
                          "validation_interval": None})
    job = start_torchrun([run_dir, "datasets"], train_env())
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(read_rows(run_dir)) >= 3, job)
    os.kill(worker_pid(job.pid, rank=1), signal.SIGKILL)
    output, _ = job.communicate(timeout=120)
    assert job.returncode != 0
    step_0 = (run_dir / "checkpoints" / "latest").resolve()
    assert "another rank was lost" in output and f"resumes from {step_0.name}" in output
    assert (step_0 / "sharded" / "__1_0.distcp").is_file()
