"""ddp_train.py run for real: torchrun with 2 CPU processes over gloo, and a plain process."""

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_run, read_rows, rewind_to_checkpoint, run_training, tokens_for
from checkpointing import capture_rng_state, set_rank_rng

STEPS = 8  # optimizer steps in each run below


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, verdict_dataset):
    """8 steps on 2 ranks with dropout, validation, clipping, an LR schedule and the default
    AMP (bf16 autocast on CPU); checkpoints every 3 steps."""
    run_dir = make_run(tmp_path_factory.mktemp("runs") / "two-ranks", verdict_dataset, model={"drop_rate": 0.2},
                       min_train_tokens=tokens_for(STEPS, 2), checkpoint_interval=3, validation_interval=4,
                       validation_batches=3, clipping_max_norm=0.8, schedule_learning_rate=True,
                       warmup_period_percent=25, use_amp=True, peak_tflops=0.001)
    result = run_training([run_dir, "datasets"], nproc=2)
    return run_dir, result


@pytest.mark.e2e
def test_two_ranks_train_and_log_every_step(two_rank_run):
    run_dir, result = two_rank_run
    rows = read_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert [r["tokens"] for r in rows] == [tokens_for(s + 1, 2) for s in range(STEPS)]
    assert all(r["tokens_per_sec"] > 0 and r["elapsed_s"] > 0 and r["grad_norm"] > 0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    # Every validation_interval (4) steps from step 0, and at every checkpoint (0, 3, 6 and the last).
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 3, 4, 6, 7]
    # Warmup is 25% of 8 steps = 2 steps from 1e-5 x learning_rate, then a cosine towards
    # learning_rate / 10 with a period of the 6 remaining steps (the reference harness's schedule).
    assert [r["lr"] for r in rows[:3]] == pytest.approx([0.003e-5, 0.003 * (1e-5 + (1 - 1e-5) / 2), 0.003])
    assert rows[-1]["lr"] == pytest.approx(0.0003 + 0.0027 * (1 + math.cos(math.pi * 5 / 6)) / 2)
    assert any(r["clipped"] for r in rows) and all(r["clipped"] == (r["grad_norm"] > 0.8) for r in rows)
    assert "Training complete" in result.stdout and "final validation loss" in result.stdout


@pytest.mark.e2e
def test_throughput_and_mfu_per_step(two_rank_run):
    run_dir, _ = two_rank_run
    # Training FLOPs per token of the tiny model, by hand: 6 x matmul weights (2 layers x 12 x 32^2,
    # plus the 257 x 32 output head) + 12 x layers x emb x context for attention.
    flops_per_token = 6 * (2 * 12 * 32 * 32 + 257 * 32) + 12 * 2 * 32 * 32
    for row in read_rows(run_dir):
        assert row["tokens_per_sec_per_device"] == pytest.approx(row["tokens_per_sec"] / 2)
        assert row["mfu"] == pytest.approx(row["tokens_per_sec_per_device"] * flops_per_token / 1e9)
        assert row["eta_s"] >= 0
    assert read_rows(run_dir)[-1]["eta_s"] == 0


@pytest.mark.e2e
def test_checkpoints_links_meta_and_charts(two_rank_run):
    run_dir, _ = two_rank_run
    checkpoints = run_dir / "checkpoints"
    names = sorted(p.name for p in checkpoints.iterdir() if not p.is_symlink())
    assert [n.split("-iteration-")[1] for n in names] == ["0", "3", "6", "7"]
    assert all(len(n.split("-")[0]) == len("20261121Z143202") for n in names)
    latest = checkpoints / "latest"
    assert latest.is_symlink() and not latest.readlink().is_absolute() and latest.resolve().name == names[-1]
    assert (checkpoints / "best").is_symlink()
    meta = json.loads((latest / "meta.json").read_text())
    rows = read_rows(run_dir)
    previous = json.loads((checkpoints / names[-2] / "meta.json").read_text())
    window = [r["loss"] for r in rows[4:7]]  # steps 4-6: the ones since the step-3 checkpoint
    assert previous["global_step"] == 6 and previous["tokens_seen"] == tokens_for(7, 2)
    assert previous["min_train_loss"] == min(window) and previous["max_train_loss"] == max(window)
    assert previous["avg_train_loss"] == pytest.approx(sum(window) / 3)
    assert meta["global_step"] == 7 and meta["avg_train_loss"] == rows[7]["loss"]
    assert meta["val_loss"] == rows[7]["val_loss"]
    assert set(meta["files"]) == {"model.safetensors", "optimizer.pt", "scaler.pt", "scheduler.pt",
                                  "training_state.pt"}
    state = load_file(latest / "model.safetensors")
    assert "tok_emb.weight" in state and not any(k.startswith(("module.", "_orig_mod.")) for k in state)
    for chart in ("loss-chart.png", "grad-norm-chart.png", "learning-rate-chart.png"):
        assert (run_dir / chart).read_bytes().startswith(b"\x89PNG")
        assert f'src="{chart}"' in (run_dir / "charts.html").read_text()


@pytest.mark.e2e
def test_resume_from_latest_continues_bit_for_bit_with_dropout_and_schedule(two_rank_run, tmp_path):
    """The 2-rank run stopped after its step-3 checkpoint and resumed from `latest`:
    identical losses for steps 4-7 (dropout masks from the saved RNG states, the schedule
    from the step) and identical final weights."""
    full, _ = two_rank_run
    resumed = rewind_to_checkpoint(full, 3, tmp_path / "resumed")
    result = run_training([resumed, "datasets", "latest"], nproc=2)
    assert "Resuming from" in result.stdout and "global step 4" in result.stdout
    full_rows, resumed_rows = read_rows(full), read_rows(resumed)
    assert [r["step"] for r in resumed_rows] == list(range(STEPS))  # appended after step 3, no duplicates
    assert [r["loss"] for r in resumed_rows[4:]] == [r["loss"] for r in full_rows[4:]]
    assert [r["lr"] for r in resumed_rows] == [r["lr"] for r in full_rows]
    final_full = load_file(full / "checkpoints" / "latest" / "model.safetensors")
    final_resumed = load_file(resumed / "checkpoints" / "latest" / "model.safetensors")
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)


@pytest.mark.e2e
def test_global_batch_tokens_trains_alike_on_two_ranks_and_one_and_resumes_across_them(tmp_path, verdict_dataset):
    """One train.json with global_batch_tokens: 2 ranks derive accumulation 1, one process 2, so
    both see the same tokens per step and give the same losses step by step (fp32). A 2-rank
    checkpoint then resumes in one process with the same file."""
    train = dict(global_batch_tokens=tokens_for(1, 2), min_train_tokens=tokens_for(STEPS, 2), checkpoint_interval=3)
    ranks = make_run(tmp_path / "ranks", verdict_dataset, **train)
    one = make_run(tmp_path / "one", verdict_dataset, **train)
    assert (one / "train.json").read_text() == (ranks / "train.json").read_text()
    run_training([ranks, "datasets"], nproc=2)
    result = run_training([one, "datasets"])  # plain process, no torchrun: world size 1
    assert "world size 1 x microbatch_size 4 x gradient_accumulation_steps 2 (derived)" in result.stdout
    ranks_rows, one_rows = read_rows(ranks), read_rows(one)
    assert len(ranks_rows) == STEPS and [r["tokens"] for r in one_rows] == [r["tokens"] for r in ranks_rows]
    assert [r["loss"] for r in one_rows] == pytest.approx([r["loss"] for r in ranks_rows], rel=1e-5)
    for run_dir, split in ((ranks, (2, 4, 1)), (one, (1, 4, 2))):
        meta = json.loads((run_dir / "checkpoints" / "latest" / "meta.json").read_text())
        assert (meta["world_size"], meta["microbatch_size"], meta["gradient_accumulation_steps"]) == split

    resumed = tmp_path / "resumed"
    shutil.copytree(ranks, resumed, symlinks=True)
    step_3 = next(p.name for p in (resumed / "checkpoints").iterdir() if "iteration-3" in p.name)
    result = run_training([resumed, "datasets", step_3])
    assert "note: resuming with world_size 2 -> 1, gradient_accumulation_steps 1 -> 2" in result.stdout
    assert [r["loss"] for r in read_rows(resumed)] == pytest.approx([r["loss"] for r in ranks_rows], rel=1e-5)

    # Another global batch (1 rank x 4 x 3 sequences instead of 8) is refused.
    explicit = {**json.loads((resumed / "train.json").read_text()), "gradient_accumulation_steps": 3}
    del explicit["global_batch_tokens"]
    (resumed / "train.json").write_text(json.dumps(explicit))
    refused = run_training([resumed, "datasets", step_3], check=False)
    assert refused.returncode == 2 and "global batch of 8 sequences" in refused.stderr


@pytest.mark.e2e
def test_resume_after_switching_autocast_between_bf16_and_fp16(tmp_path, verdict_dataset):
    """A bf16 run saves an empty GradScaler state (the scaler is off); resumed in fp16 the
    scaler starts fresh, and back in bf16 the fp16 scaler state is not needed."""
    run_dir = make_run(tmp_path / "run", verdict_dataset, min_train_tokens=tokens_for(6, 1),
                       checkpoint_interval=2, use_amp=True, amp_dtype="bfloat16")
    run_training([run_dir, "datasets"])
    train = json.loads((run_dir / "train.json").read_text())
    for amp_dtype, checkpoint_step in (("float16", 2), ("bfloat16", 4)):
        checkpoint = next(p.name for p in (run_dir / "checkpoints").iterdir()
                          if f"iteration-{checkpoint_step}" in p.name)
        (run_dir / "train.json").write_text(json.dumps({**train, "amp_dtype": amp_dtype}))
        result = run_training([run_dir, "datasets", checkpoint])
        assert f"global step {checkpoint_step + 1}" in result.stdout and "autocast torch." + amp_dtype in result.stdout
    assert [r["step"] for r in read_rows(run_dir)] == list(range(6))
    assert all(r["loss"] < 10 for r in read_rows(run_dir))  # finite, and no worse than ln(vocab) = 5.5 by much


def test_every_rank_draws_its_own_dropout_masks_fresh_or_resumed():
    """From the seed random_seed + rank on a fresh start or when the checkpoint has no RNG
    state for this world size (a reference checkpoint, another world size); from the
    saved state otherwise."""
    ranks = [SimpleNamespace(rank=rank, world_size=2, device=torch.device("cpu")) for rank in range(2)]

    def seeded(seed):
        return torch.rand(4, generator=torch.Generator().manual_seed(seed))

    for saved in (None, [capture_rng_state(torch.device("cpu"))]):  # none, or one rank's of a 1-rank run
        for ctx, seed in zip(ranks, (42, 43)):
            assert set_rank_rng(ctx, 42, saved) is False
            assert torch.equal(torch.rand(4), seeded(seed))

    torch.manual_seed(7)
    saved_states = [capture_rng_state(torch.device("cpu")) for _ in range(2)]
    expected = torch.rand(4)
    for ctx in ranks:
        assert set_rank_rng(ctx, 42, saved_states) is True
        assert torch.equal(torch.rand(4), expected)


@pytest.mark.e2e
def test_resumes_a_reference_harness_checkpoint(tmp_path, verdict_dataset):
    """A checkpoint as the reference harness writes it: legacy mask buffers in
    model.safetensors, optimizer.pt, scaler.pt, and a meta.json without our extra keys."""
    run_dir = make_run(tmp_path / "reference", verdict_dataset, min_train_tokens=tokens_for(STEPS, 1),
                       checkpoint_interval=100)
    from gpt import GPTModel
    from conftest import TINY_MODEL

    torch.manual_seed(3)
    model = GPTModel(TINY_MODEL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    checkpoint = run_dir / "checkpoints" / "20250101Z000000-iteration-2"
    checkpoint.mkdir(parents=True)
    state = dict(model.state_dict())
    for i in range(TINY_MODEL["n_layers"]):
        state[f"trf_blocks.{i}.att.mask"] = torch.triu(torch.ones(32, 32), diagonal=1)
    save_file(state, checkpoint / "model.safetensors")
    torch.save(optimizer.state_dict(), checkpoint / "optimizer.pt")
    torch.save(torch.amp.GradScaler("cpu").state_dict(), checkpoint / "scaler.pt")
    (checkpoint / "meta.json").write_text(json.dumps({
        "min_train_loss": 3.0, "max_train_loss": 4.0, "avg_train_loss": 3.5, "max_grad_norms": 1.0,
        "avg_grad_norms": 0.5, "frac_clipped": 0.0, "global_step": 2, "is_best": True}))
    (run_dir / "checkpoints" / "best").symlink_to(checkpoint.name)
    (run_dir / "checkpoints" / "latest").symlink_to(checkpoint.name)

    result = run_training([run_dir, "datasets", "latest"])
    assert "global step 3" in result.stdout
    assert [r["step"] for r in read_rows(run_dir)] == list(range(3, STEPS))
