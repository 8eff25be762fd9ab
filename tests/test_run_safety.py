"""What must never lose a run: a broken `latest` under `auto`, a second launch on the same
run directory, diverged weights, a streak of skipped steps, a full or read-only disk,
a lost rank. Each test reproduces the accident for real where this machine can (a real
tmpfs that fills up, a real immutable directory, real processes); the few mocks say why."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpointing
import ddp_train
import training
from conftest import (PROJECT_DIR, SHARED_DATA, TINY_MODEL, make_run, read_rows, run_training, start_torchrun,
                      tokens_for, train_env, wait_for, worker_pid, write_byte_dataset)
from config import ModelConfig, load_run
from distributed import init_distributed
from errors import UserError
from gpt import GPTModel
from run_lock import lock_run_dir
from training import check_model_fits


def checkpoint_steps(run_dir):
    return sorted(int(p.name.split("-iteration-")[1]) for p in (run_dir / "checkpoints").iterdir()
                  if not p.is_symlink() and not p.name.startswith("."))


def one_error_line(result):
    """Exit status 2 and one `error:` line, the last on stderr (after the progress bar), no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout + result.stderr
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.stderr
    assert "Traceback" not in result.stderr
    return lines[-1]


# ---------------------------------------------------------------- `auto`

@pytest.mark.e2e
def test_auto_with_a_dangling_latest_resumes_from_the_newest_complete_checkpoint(tmp_path, verdict_dataset):
    run_dir = make_run(tmp_path / "run", verdict_dataset, min_train_tokens=tokens_for(6, 1), checkpoint_interval=2)
    run_training([run_dir, "datasets"])
    assert checkpoint_steps(run_dir) == [0, 2, 4, 5]
    broken = tmp_path / "broken"  # the same run with no complete checkpoint left, for the second half
    shutil.copytree(run_dir, broken, symlinks=True)
    rows_before = read_rows(run_dir)
    (run_dir / "checkpoints" / "latest").unlink()
    (run_dir / "checkpoints" / "latest").symlink_to("nowhere")
    train = json.loads((run_dir / "train.json").read_text())
    (run_dir / "train.json").write_text(json.dumps({**train, "min_train_tokens": tokens_for(8, 1)}))

    result = run_training([run_dir, "datasets", "auto"])
    newest = next((run_dir / "checkpoints").glob("*-iteration-5")).name
    assert f"resuming from the newest complete checkpoint, {newest}" in result.stdout
    assert "global step 6" in result.stdout
    rows = read_rows(run_dir)
    assert rows[:6] == rows_before and [r["step"] for r in rows] == list(range(8))

    for checkpoint in (broken / "checkpoints").glob("*-iteration-*"):
        (checkpoint / "meta.json").unlink()
    (broken / "checkpoints" / "latest").unlink()
    (broken / "checkpoints" / "latest").symlink_to("nowhere")
    line = one_error_line(run_training([broken, "datasets", "auto"], check=False))
    assert "no complete checkpoint" in line and "--force" in line
    assert read_rows(broken) == rows_before


def test_a_checkpoint_without_meta_json_is_named_as_such(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "20260101Z000000-iteration-3"
    checkpoint.mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").symlink_to(checkpoint.name)
    with pytest.raises(UserError, match=r"iteration-3/meta\.json is missing"):
        checkpointing.resolve_checkpoint(tmp_path / "checkpoints", "latest")


# ---------------------------------------------------------------- one writer per run directory

@pytest.mark.e2e
def test_a_second_launch_on_a_run_directory_is_refused_naming_the_holder(tmp_path, verdict_dataset):
    run_dir = make_run(tmp_path / "run", verdict_dataset, min_train_tokens=tokens_for(2, 1))
    held = lock_run_dir(run_dir)
    try:
        line = one_error_line(run_training([run_dir, "datasets"], check=False))
    finally:
        held.close()
    assert f"pid {os.getpid()}" in line and "in use by another training run" in line
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


@pytest.mark.e2e
def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from pathlib import Path
sys.path.insert(0, {str(PROJECT_DIR)!r})
from run_lock import lock_run_dir
lock = lock_run_dir(Path({str(tmp_path)!r}))
print("locked", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match=f"pid {holder.pid}"):
        lock_run_dir(tmp_path)
    holder.kill()
    holder.wait()
    lock_run_dir(tmp_path).close()


# ---------------------------------------------------------------- bad numbers

FLOAT_KEYS = {"train.json": ["clipping_max_norm", "weight_decay", "learning_rate", "warmup_period_percent",
                             "min_lr", "dist_timeout_minutes", "peak_tflops"],
              "model.json": ["drop_rate"]}


@pytest.mark.parametrize("file, key", [(f, k) for f, keys in FLOAT_KEYS.items() for k in keys])
@pytest.mark.parametrize("text", ["1e309", "NaN", "-Infinity"])
def test_non_finite_numbers_are_refused_for_every_float_key(tmp_path, file, key, text):
    run_dir = make_run(tmp_path / "run", tmp_path / "data")
    path = run_dir / file
    path.write_text(path.read_text()[:-1] + f', "{key}": {text}}}')
    with pytest.raises(UserError, match=rf"{file}: key '{key}' must be a finite number"):
        load_run(run_dir)


@pytest.mark.parametrize("change, message", [
    ({"random_seed": 2**70}, "key 'random_seed' must be between 0 and 2**62 - 1"),
    ({"dist_timeout_minutes": 1e6}, "key 'dist_timeout_minutes' must be between 0 and 10080 (one week)"),
    ({"weight_decay": 1000.0, "learning_rate": 0.01}, "key 'weight_decay' times learning_rate must be below 1"),
])
def test_numbers_that_overflow_what_they_feed_are_refused(tmp_path, change, message):
    run_dir = make_run(tmp_path / "run", tmp_path / "data", **change)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        load_run(run_dir)


@pytest.mark.parametrize("change", [{"n_layers": 10_000_000}, {"vocab_size": 10**15}, {"emb_dim": 2**20}])
def test_a_model_too_big_for_memory_is_refused_before_allocating(change):
    cfg = ModelConfig.from_dict({**TINY_MODEL, **change})
    with pytest.raises(UserError, match=r"runs/x/model.json: this model has [\d,]+ parameters, .* GiB"):
        check_model_fits(cfg, torch.device("cpu"), "runs/x/model.json")


@pytest.mark.e2e
def test_the_trainer_refuses_a_model_too_big_for_memory_at_once(tmp_path, verdict_dataset):
    run_dir = make_run(tmp_path / "run", verdict_dataset, model={"n_layers": 10_000_000})
    started = time.time()
    line = one_error_line(run_training([run_dir, "datasets"], check=False))
    assert "model.json: this model has" in line and "parameters" in line and "GiB" in line
    assert time.time() - started < 60


# ---------------------------------------------------------------- in-process runs

@pytest.fixture
def one_process_world():
    """The trainer's own world of one process (as when it runs without torchrun)."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        assert name not in os.environ
    ctx = init_distributed(timeout_minutes=1)
    yield ctx
    torch.distributed.destroy_process_group()


def poison_loss_at(monkeypatch, steps):
    """The training loss of these optimizer steps is NaN (accumulation 1, no validation:
    one training compute_loss call per step)."""
    calls = iter(range(10**6))
    real_compute_loss = training.compute_loss

    def compute_loss(model, *args):
        loss = real_compute_loss(model, *args)
        return loss * float("nan") if model.training and next(calls) in steps else loss

    monkeypatch.setattr(training, "compute_loss", compute_loss)


def test_a_skip_streak_that_ends_inside_a_log_window_stops_the_run(tmp_path, verdict_dataset, one_process_world,
                                                                    monkeypatch):
    """Five bad steps (3-7) within one 10-step log window, max_skipped_steps 3."""
    run_dir = make_run(tmp_path / "run", verdict_dataset, min_train_tokens=tokens_for(12, 1), log_interval=10,
                       checkpoint_interval=100, max_skipped_steps=3)
    poison_loss_at(monkeypatch, {3, 4, 5, 6, 7})
    with pytest.raises(UserError, match=r"3 optimizer steps in a row .*\(the last at global step 5\)"):
        ddp_train.train(load_run(run_dir), one_process_world, tmp_path, None)


def diverge_weights_at(monkeypatch, step):
    """The weights turn NaN in optimizer step `step` (what `weight_decay` 1e309 did)."""
    steps = iter(range(10**6))
    real_train_step = training.train_step

    def train_step(setup, *args):
        statistics = real_train_step(setup, *args)
        if next(steps) == step:
            with torch.no_grad():
                setup.state.model.tok_emb.weight[0, 0] = float("nan")
        return statistics

    monkeypatch.setattr(training, "train_step", train_step)


@pytest.mark.parametrize("diverged_at, expected", [(0, "this run has no checkpoint yet"),
                                                    (3, "the last good checkpoint is .*-iteration-2")])
def test_non_finite_weights_are_never_checkpointed(tmp_path, verdict_dataset, one_process_world, monkeypatch,
                                                   diverged_at, expected):
    run_dir = make_run(tmp_path / "run", verdict_dataset, min_train_tokens=tokens_for(6, 1), checkpoint_interval=2,
                       validation_interval=2, validation_batches=2)
    diverge_weights_at(monkeypatch, diverged_at)
    with pytest.raises(UserError, match=f"the weights are not finite after global step .*{expected}"):
        ddp_train.train(load_run(run_dir), one_process_world, tmp_path, None)
    saved = checkpoint_steps(run_dir) if (run_dir / "checkpoints").exists() else []
    assert saved == ([] if diverged_at == 0 else [0, 2])
    for step in saved:
        weights = checkpointing.load_file(next((run_dir / "checkpoints").glob(f"*-iteration-{step}"))
                                          / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())


# ---------------------------------------------------------------- full and read-only disks

@pytest.fixture
def small_disk(tmp_path):
    """A real 2.5 MB filesystem (tmpfs), room for two checkpoints of the tiny model."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", str(mount_point)], check=True)
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.e2e
def test_a_full_disk_stops_the_run_cleanly_keeping_its_checkpoints(small_disk, verdict_dataset):
    run_dir = make_run(small_disk / "run", verdict_dataset, min_train_tokens=tokens_for(6, 1), checkpoint_interval=1)
    line = one_error_line(run_training([run_dir, "datasets"], check=False))
    assert "not enough free disk space for a checkpoint" in line and "MiB are free" in line
    kept = checkpoint_steps(run_dir)
    assert kept and kept == list(range(len(kept)))
    latest = run_dir / "checkpoints" / "latest"
    checkpointing.verify_checkpoint(latest)
    assert latest.resolve().name.endswith(f"-iteration-{kept[-1]}")
    assert not list((run_dir / "checkpoints").glob(".partial-*"))


def test_a_write_that_fails_mid_checkpoint_removes_the_partial_directory(tmp_path, monkeypatch):
    """ENOSPC in the middle of a write is mocked: a real one would need a disk that fills up
    exactly there. The free-space check passes; the weights' write then fails."""
    model = GPTModel(TINY_MODEL)
    optimizer = torch.optim.AdamW(model.parameters())
    state = checkpointing.TrainingState(model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                                        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
    first = checkpointing.write_unsharded_checkpoint(tmp_path, state, [None], {"global_step": 0}, is_best=True)

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing, "save_safetensors", full_disk)
    with pytest.raises(UserError, match="could not write checkpoint .*-iteration-1 .*No space left on device"):
        checkpointing.write_unsharded_checkpoint(tmp_path, state, [None], {"global_step": 1}, is_best=True)
    assert [p.name for p in tmp_path.iterdir() if not p.is_symlink()] == [first.name]
    assert (tmp_path / "latest").resolve() == (tmp_path / "best").resolve() == first


@pytest.mark.e2e
def test_a_read_only_run_directory_is_one_error_line(tmp_path, verdict_dataset):
    """An immutable directory (chattr +i): not even root can create files in it."""
    run_dir = make_run(tmp_path / "run", verdict_dataset, min_train_tokens=tokens_for(2, 1))
    subprocess.run(["chattr", "+i", str(run_dir)], check=True)
    try:
        line = one_error_line(run_training([run_dir, "datasets"], check=False))
    finally:
        subprocess.run(["chattr", "-i", str(run_dir)], check=True)
    assert f"{run_dir}: the run directory is not writable" in line


def test_checkpoint_files_get_the_usual_file_mode(tmp_path):
    model = GPTModel(TINY_MODEL)
    optimizer = torch.optim.AdamW(model.parameters())
    state = checkpointing.TrainingState(model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                                        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
    checkpoint = checkpointing.write_unsharded_checkpoint(tmp_path, state, [None],
                                                          {"global_step": 0, "val_loss": float("nan")}, is_best=False)
    modes = {p.name: p.stat().st_mode & 0o777 for p in checkpoint.iterdir()}
    assert modes["model.safetensors"] == modes["meta.json"] == modes["optimizer.pt"]
    meta = json.loads((checkpoint / "meta.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert meta["val_loss"] is None


# ---------------------------------------------------------------- torchrun

@pytest.mark.e2e
def test_torchruns_failure_summary_carries_the_error_line(tmp_path, verdict_dataset):
    run_dir = make_run(tmp_path / "run", verdict_dataset, min_train_tokens=10**9)
    result = run_training([run_dir, "datasets"], nproc=2, check=False)
    root_cause = result.stderr[result.stderr.index("Root Cause"):]
    assert "error_file: <N/A>" not in root_cause
    assert "error: " in root_cause and "too short" in root_cause


@pytest.mark.e2e
def test_survivors_of_a_lost_rank_say_so_and_name_the_checkpoint_a_restart_uses(tmp_path):
    dataset = write_byte_dataset(tmp_path / "dataset", (SHARED_DATA / "the-verdict.txt").read_text() * 12)
    run_dir = make_run(tmp_path / "run", dataset, min_train_tokens=tokens_for(400, 2), checkpoint_interval=1000)
    job = start_torchrun([run_dir, "datasets"], train_env())
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(read_rows(run_dir)) >= 3, job)
    os.kill(worker_pid(job.pid, rank=1), signal.SIGKILL)
    output, _ = job.communicate(timeout=120)
    assert job.returncode != 0
    checkpoint = next((run_dir / "checkpoints").glob("*-iteration-0")).name
    assert "another rank was lost" in output and f"resumes from {checkpoint}" in output
