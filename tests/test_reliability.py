"""Faults provoked for real: signals to torchrun, SIGKILL in the middle of a save,
NaN losses on one rank, a failing rank-0 download, and restart policies."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import (PROJECT_DIR, SHARED_DATA, TRAINER_WITH_FAULTS, make_run, read_rows, run_training,
                      start_torchrun, tokens_for, train_env, wait_for, worker_pid, write_byte_dataset)

STEPS = 8


def checkpoint_steps(run_dir):
    return sorted(int(p.name.split("-iteration-")[1]) for p in (run_dir / "checkpoints").iterdir()
                  if not p.is_symlink() and not p.name.startswith("."))


def latest_step(run_dir):
    return json.loads((run_dir / "checkpoints" / "latest" / "meta.json").read_text())["global_step"]


# ---------------------------------------------------------------- restart policies

@pytest.mark.e2e
def test_fresh_start_over_existing_checkpoints_is_refused_and_auto_resumes(tmp_path, verdict_dataset):
    run_dir = make_run(tmp_path / "run", verdict_dataset, min_train_tokens=tokens_for(4, 1), checkpoint_interval=2)
    run_training([run_dir, "datasets"])
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())

    refused = run_training([run_dir, "datasets"], check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().startswith("error:") and "--force" in refused.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before

    finished = run_training([run_dir, "datasets", "auto"])  # latest is the last step: nothing left to train
    assert "Resuming from" in finished.stdout and len(read_rows(run_dir)) == 4

    fresh = make_run(tmp_path / "fresh", verdict_dataset, min_train_tokens=tokens_for(2, 1))
    assert "Resuming" not in run_training([fresh, "datasets", "auto"]).stdout
    assert checkpoint_steps(fresh) == [0, 1]


@pytest.mark.e2e
def test_keep_last_checkpoints_never_prunes_best_or_latest(tmp_path, verdict_dataset):
    # A learning rate this high makes the loss rise after the first steps, so `best` stays early.
    run_dir = make_run(tmp_path / "run", verdict_dataset, min_train_tokens=tokens_for(STEPS, 1),
                       checkpoint_interval=1, keep_last_checkpoints=2, learning_rate=0.003)
    run_training([run_dir, "datasets"])
    best = json.loads((run_dir / "checkpoints" / "best" / "meta.json").read_text())["global_step"]
    assert set(checkpoint_steps(run_dir)) == {best, STEPS - 2, STEPS - 1}


# ---------------------------------------------------------------- preemption

@pytest.mark.e2e
def test_sigterm_to_torchrun_checkpoints_and_exits_then_resume_finishes(tmp_path):
    steps = 400  # far more than will run before the signal
    dataset = write_byte_dataset(tmp_path / "dataset", (SHARED_DATA / "the-verdict.txt").read_text() * 12)
    run_dir = make_run(tmp_path / "run", dataset, min_train_tokens=tokens_for(steps, 2),
                       checkpoint_interval=1000)
    job = start_torchrun([run_dir, "datasets"], train_env())
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(read_rows(run_dir)) >= 3, job)
    job.send_signal(signal.SIGTERM)
    output, _ = job.communicate(timeout=120)
    assert "Stopped by SIGTERM" in output and "Resume with" in output
    stopped_at = latest_step(run_dir)
    assert 2 <= stopped_at < steps - 1 and checkpoint_steps(run_dir) == [0, stopped_at]
    assert read_rows(run_dir)[-1]["step"] == stopped_at
    assert not list((run_dir / "checkpoints").glob(".partial-*"))

    # Resume, then SIGINT to rank 1 alone: rank 0 learns of it through the step's all-reduce.
    job = start_torchrun([run_dir, "datasets", "latest"], train_env())
    wait_for(lambda: read_rows(run_dir)[-1]["step"] >= stopped_at + 2, job)
    os.kill(worker_pid(job.pid, rank=1), signal.SIGINT)
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 0
    assert f"global step {stopped_at + 1}" in output and "Stopped by a signal to another rank" in output
    assert [r["step"] for r in read_rows(run_dir)] == list(range(latest_step(run_dir) + 1))


@pytest.mark.e2e
def test_sigkill_during_a_save_leaves_latest_on_a_complete_checkpoint(tmp_path, verdict_dataset):
    run_dir = make_run(tmp_path / "run", verdict_dataset, min_train_tokens=tokens_for(STEPS, 1),
                       checkpoint_interval=2)
    env = {**train_env(), "FAULT_SAVE_DELAY_S": "3"}
    job = subprocess.Popen([sys.executable, str(TRAINER_WITH_FAULTS), str(run_dir), "datasets"],
                           cwd=PROJECT_DIR, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = run_dir / "checkpoints"
    # The second save (step 2) is under way once its partial directory exists.
    wait_for(lambda: (checkpoints / "latest").exists() and any(
        "iteration-2" in p.name for p in checkpoints.glob(".partial-*")), job)
    job.kill()
    job.wait()
    assert latest_step(run_dir) == 0 and checkpoint_steps(run_dir) == [0]
    latest = checkpoints / "latest"
    assert set(json.loads((latest / "meta.json").read_text())["files"]) <= {p.name for p in latest.iterdir()}

    result = run_training([run_dir, "datasets", "auto"])
    assert "global step 1" in result.stdout and latest_step(run_dir) == STEPS - 1
    assert not list(checkpoints.glob(".partial-*"))


@pytest.mark.e2e
def test_a_damaged_checkpoint_is_named_on_load(tmp_path, verdict_dataset):
    run_dir = make_run(tmp_path / "run", verdict_dataset, min_train_tokens=tokens_for(2, 1))
    run_training([run_dir, "datasets"])
    weights = run_dir / "checkpoints" / "latest" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = run_training([run_dir, "datasets", "latest"], check=False)
    assert result.returncode == 2 and "incomplete or damaged: model.safetensors has 1000 bytes" in result.stderr


# ---------------------------------------------------------------- non-finite values

def reject_constant(name):
    raise ValueError(f"not strict JSON: {name}")


@pytest.mark.e2e
def test_non_finite_steps_are_skipped_on_every_rank_and_a_streak_stops_the_run(tmp_path, verdict_dataset):
    """A NaN loss on rank 1 at step 3 skips that step on both ranks; NaNs on rank 0 at steps
    5, 6 and 7 make three skipped steps in a row (max_skipped_steps), which stop the run."""
    run_dir = make_run(tmp_path / "run", verdict_dataset, min_train_tokens=tokens_for(12, 2), checkpoint_interval=1,
                       max_skipped_steps=3)
    result = run_training([run_dir, "datasets"], nproc=2, check=False,
                          env={**train_env(), "FAULT_NAN_LOSS": "1:3;0:5,6,7"}, script=TRAINER_WITH_FAULTS)
    assert result.returncode != 0
    assert ("error: 3 optimizer steps in a row had a non-finite loss or gradient (the last at global step 7)"
            in result.stderr)
    # Step 7 ended the run before its checkpoint: step 6's is the last, and it is named.
    checkpoint = sorted((run_dir / "checkpoints").glob("*-iteration-6"))[0].name
    assert f"the last good checkpoint is {checkpoint}" in result.stderr
    assert latest_step(run_dir) == 6 and checkpoint_steps(run_dir) == list(range(7))

    rows = read_rows(run_dir)
    # Strict JSON: a skipped step's loss and gradient norm are null, never a bare NaN.
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=reject_constant)
    assert [r["skipped"] for r in rows] == [s in (3, 5, 6, 7) for s in range(8)]
    assert rows[3]["loss"] is None and all(r["loss"] > 0 for r in rows if not r["skipped"])
    weights = {int(p.name.split("-iteration-")[1]): load_file(p / "model.safetensors")
               for p in (run_dir / "checkpoints").iterdir() if not p.is_symlink()}
    unchanged = [all(torch.equal(weights[s][k], weights[s - 1][k]) for k in weights[s]) for s in range(1, 7)]
    assert unchanged == [False, False, True, False, True, True]  # only the skipped steps left the weights alone
    assert all(torch.isfinite(t).all() for t in weights[6].values())


# ---------------------------------------------------------------- no hangs

@pytest.mark.e2e
def test_a_failed_download_on_rank_0_ends_every_rank(tmp_path):
    """No hub is reachable from here: the real snapshot_download fails on the local ranks 0,
    and every rank must exit with that error instead of waiting."""
    run_dir = make_run(tmp_path / "run", "no-such-user/no-such-dataset", min_train_tokens=1000)
    env = {**train_env(), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    started = time.time()
    result = run_training([run_dir, tmp_path / "datasets"], nproc=2, check=False, env=env)
    assert result.returncode != 0 and time.time() - started < 100
    assert ("error: dataset 'no-such-user/no-such-dataset': no such directory (looked for "
            in result.stderr and "as a Hugging Face Hub dataset repo id it failed: offline mode" in result.stderr)
    # Rank 1 ends with rank 0's error as its own (or is stopped by torchrun once rank 0 has
    # exited, whichever comes first), long before the 60-minute process-group timeout; no worker
    # prints a traceback (torchrun itself prints one of its own when a worker fails).
    assert "exitcode  : 2" in result.stderr
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.e2e
def test_a_failed_checkpoint_save_on_rank_0_ends_every_rank(tmp_path, verdict_dataset):
    """Rank 0 cannot write its checkpoint (a file sits where the checkpoints directory
    should be); rank 1, waiting for it, must exit too instead of hanging."""
    run_dir = make_run(tmp_path / "run", verdict_dataset, min_train_tokens=tokens_for(4, 2), checkpoint_interval=2)
    (run_dir / "checkpoints").write_text("in the way")
    started = time.time()
    result = run_training([run_dir, "datasets"], nproc=2, check=False)
    assert result.returncode != 0 and time.time() - started < 100
    assert "could not write checkpoint" in result.stderr and "File exists" in result.stderr
    assert (run_dir / "checkpoints").read_text() == "in the way"


def test_connectivity_failure_suggests_the_nccl_settings(monkeypatch):
    """A broken interconnect cannot be made here, so the start-up all-reduce is made to fail."""
    import distributed

    def broken_all_reduce(tensor, async_op=False):
        raise RuntimeError("NCCL error: unhandled system error")

    monkeypatch.setattr(distributed.dist, "all_reduce", broken_all_reduce)
    ctx = distributed.DistContext(rank=3, local_rank=3, world_size=8, device=torch.device("cpu"))
    expected = "rank 3: the ranks cannot communicate .*NCCL_P2P_DISABLE=1.*NCCL_IB_DISABLE=1"
    with pytest.raises(RuntimeError, match=expected):
        distributed.check_connectivity(ctx)


@pytest.mark.e2e
def test_connectivity_check_times_out_instead_of_hanging(tmp_path):
    """Rank 1 never joins the first all-reduce (it sleeps instead): rank 0's check gives up
    after its timeout with the NCCL advice, long before the process-group timeout."""
    script = tmp_path / "stuck.py"
    script.write_text(f"""
import datetime, os, sys, time
sys.path.insert(0, {str(PROJECT_DIR)!r})
import torch.distributed as dist
from distributed import check_connectivity, init_distributed
ctx = init_distributed(timeout_minutes=60)
if ctx.rank == 1:
    time.sleep(10)
else:
    try:
        check_connectivity(ctx, timeout=datetime.timedelta(seconds=3))
    except RuntimeError as e:
        print("CHECK FAILED:", e, flush=True)
    os._exit(0)
""")
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], env=train_env(), capture_output=True, text=True, timeout=120)
    assert "CHECK FAILED: rank 0: the ranks cannot communicate" in result.stdout
    assert "NCCL_P2P_DISABLE=1" in result.stdout and time.time() - started < 60
