"""Fidelity to the reference harness gpjt/ddp-base-model-from-scratch: its learning-rate
schedule (checked against torch's own LinearLR + CosineAnnealingLR in a SequentialLR,
which is what the reference builds, and against hand-computed values), its checkpoint
steps, resuming its checkpoints of scheduled runs, and its tied-weight checkpoints,
which hold only one of the two tied tensors."""

import json
import math
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file, save_model

from checkpointing import TIED_KEYS, load_model_weights
from conftest import TINY_MODEL, make_run, read_rows, run_training, tokens_for
from config import TrainConfig
from evalkit import run_script
from gpt import GPTModel
from training import lr_factor, make_lr_scheduler, move_lr_scheduler_to, warmup_steps_for


def reference_scheduler(optimizer, total_steps, warmup_percent, learning_rate, min_lr):
    """The reference harness's scheduler, built from torch's schedulers as it builds it."""
    warmup_steps = total_steps * warmup_percent // 100
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.00001, end_factor=1.0,
                                               total_iters=warmup_steps)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps,
                                                        eta_min=min_lr)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, schedulers=[warmup, cosine],
                                                 milestones=[warmup_steps])


def reference_learning_rates(total_steps, warmup_percent, learning_rate, min_lr):
    """The learning rate of each optimizer step under the reference's scheduler, stepped
    once after each optimizer step."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=learning_rate)
    scheduler = reference_scheduler(optimizer, total_steps, warmup_percent, learning_rate, min_lr)
    return stepped_rates(scheduler, total_steps)


def stepped_rates(scheduler, total_steps):
    """The rate of each step, stepping the scheduler after each. The optimizer never
    steps (it has nothing to learn here): torch warns about that, and only that."""
    rates = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        for _ in range(total_steps):
            rates.append(scheduler.get_last_lr()[0])
            scheduler.step()
    return rates


def our_learning_rates(total_steps, **train):
    cfg = TrainConfig.from_dict({"dataset": "x", "microbatch_size": 1, "schedule_learning_rate": True, **train})
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    return stepped_rates(make_lr_scheduler(optimizer, cfg, total_steps), total_steps)


@pytest.mark.parametrize("total_steps, warmup_percent", [(12, 5), (12, 25), (40, 5), (100, 10), (7, 0),
                                                         (20, 50), (617, 5)])
def test_schedule_equals_the_references_sequential_lr_at_every_step(total_steps, warmup_percent):
    ours = our_learning_rates(total_steps, learning_rate=0.0014, warmup_period_percent=warmup_percent)
    reference = reference_learning_rates(total_steps, warmup_percent, 0.0014, 0.00014)
    assert ours == pytest.approx(reference, rel=1e-12, abs=1e-18)


def test_best_recipe_schedule_over_its_33165_steps():
    """8 ranks x 12 x 1024 tokens for 3,260,190,720 tokens: 33,165 steps, 1,658 of warmup."""
    total, lr, min_lr = 33_165, 0.0014, 0.00014
    assert warmup_steps_for(total, 5) == 1_658
    ours = our_learning_rates(total, learning_rate=lr, warmup_period_percent=5)
    assert ours == pytest.approx(reference_learning_rates(total, 5, lr, min_lr), rel=1e-9)
    # By hand: the warmup starts at lr x 1e-5 and is linear; the cosine starts at lr,
    # is halfway down after half its 31,507-step period, and never quite reaches min_lr.
    assert ours[0] == pytest.approx(lr * 1e-5, rel=1e-12)
    assert ours[829] == pytest.approx(lr * (1e-5 + (1 - 1e-5) * 829 / 1658), rel=1e-12)
    assert ours[1658] == pytest.approx(lr, rel=1e-12)
    assert ours[1658 + 31_506 // 2] == pytest.approx(
        min_lr + (lr - min_lr) * (1 + math.cos(math.pi * 15_753 / 31_507)) / 2, rel=1e-12)
    assert ours[-1] > min_lr and ours[-1] == pytest.approx(min_lr, rel=1e-6)


def test_min_lr_moves_only_the_floor():
    default = our_learning_rates(50, learning_rate=0.001, warmup_period_percent=10)
    floor = our_learning_rates(50, learning_rate=0.001, warmup_period_percent=10, min_lr=0.0)
    assert floor[:5] == default[:5]  # the warmup
    assert floor[-1] < default[-1] and floor == pytest.approx(reference_learning_rates(50, 10, 0.001, 0.0))


def test_no_schedule_is_a_constant_rate():
    cfg = TrainConfig.from_dict({"dataset": "x", "microbatch_size": 1, "learning_rate": 0.002})
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    scheduler = make_lr_scheduler(optimizer, cfg, 10)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        move_lr_scheduler_to(scheduler, 7)
    assert scheduler.get_last_lr() == [0.002]


def test_lr_factor_is_continuous_where_warmup_meets_cosine():
    assert lr_factor(9, 100, 10, 0.1) < lr_factor(10, 100, 10, 0.1) == 1.0


# ---------------------------------------------------------------- runs

def checkpoint_steps(run_dir):
    return sorted(int(p.name.split("-iteration-")[1]) for p in (run_dir / "checkpoints").iterdir()
                  if not p.is_symlink() and not p.name.startswith("."))


STEPS = 12
SCHEDULED = dict(min_train_tokens=tokens_for(STEPS, 1), checkpoint_interval=4, schedule_learning_rate=True,
                 warmup_period_percent=25, learning_rate=0.003)


@pytest.fixture(scope="module")
def scheduled_run(tmp_path_factory, verdict_dataset):
    """A 12-step scheduled run (3 warmup steps), checkpointing every 4 steps, dropout off
    (a reference checkpoint has no RNG state to continue dropout masks from)."""
    run_dir = make_run(tmp_path_factory.mktemp("runs") / "scheduled", verdict_dataset, **SCHEDULED)
    run_training([run_dir, "datasets"])
    return run_dir


@pytest.mark.e2e
def test_checkpoints_at_the_reference_steps(scheduled_run):
    """After step 0, every checkpoint_interval steps, and after the last step."""
    assert checkpoint_steps(scheduled_run) == [0, 4, 8, 11]


@pytest.mark.e2e
def test_logged_learning_rates_are_the_references(scheduled_run):
    logged = [row["lr"] for row in read_rows(scheduled_run)]
    assert logged == pytest.approx(reference_learning_rates(STEPS, 25, 0.003, 0.0003), rel=1e-12)


def reference_style_copy(run_dir, destination, step, scheduler_state):
    """The run as the reference harness would have left it after `step`: a checkpoint with
    model.safetensors, optimizer.pt, scaler.pt, the given scheduler.pt, a meta.json of the
    reference's keys only, no RNG state, and `latest`/`best` links to it."""
    shutil.copytree(run_dir, destination, symlinks=True)
    checkpoints = destination / "checkpoints"
    for path in checkpoints.iterdir():
        if path.is_symlink() or f"iteration-{step}" not in path.name:
            path.unlink() if path.is_symlink() else shutil.rmtree(path)
    (destination / "metrics.jsonl").unlink()
    checkpoint = next(checkpoints.iterdir())
    (checkpoint / "training_state.pt").unlink()
    if scheduler_state is None:
        (checkpoint / "scheduler.pt").unlink()
    else:
        torch.save(scheduler_state, checkpoint / "scheduler.pt")
    meta = json.loads((checkpoint / "meta.json").read_text())
    reference_keys = ("global_step", "min_train_loss", "max_train_loss", "avg_train_loss", "max_grad_norms",
                      "avg_grad_norms", "frac_clipped", "is_best")
    (checkpoint / "meta.json").write_text(json.dumps({key: meta[key] for key in reference_keys}))
    for link in ("latest", "best"):
        (checkpoints / link).symlink_to(checkpoint.name)
    return destination


def sequential_lr_state_after(steps):
    """scheduler.pt of a reference run after `steps` optimizer steps."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=SCHEDULED["learning_rate"])
    scheduler = reference_scheduler(optimizer, STEPS, 25, SCHEDULED["learning_rate"],
                                    SCHEDULED["learning_rate"] / 10)
    stepped_rates(scheduler, steps)
    return scheduler.state_dict()


@pytest.mark.e2e
@pytest.mark.parametrize("scheduler_state", ["sequential_lr", None], ids=["SequentialLR state", "no scheduler.pt"])
def test_reference_checkpoint_of_a_scheduled_run_resumes_on_its_schedule(scheduled_run, tmp_path, scheduler_state):
    state = sequential_lr_state_after(5) if scheduler_state == "sequential_lr" else None
    resumed = reference_style_copy(scheduled_run, tmp_path / "resumed", 4, state)
    result = run_training([resumed, "datasets", "latest"])
    assert "global step 5" in result.stdout
    full_rows, resumed_rows = read_rows(scheduled_run), read_rows(resumed)
    assert [r["step"] for r in resumed_rows] == list(range(5, STEPS))
    assert [r["lr"] for r in resumed_rows] == pytest.approx([r["lr"] for r in full_rows[5:]], rel=1e-12)
    assert [r["loss"] for r in resumed_rows] == pytest.approx([r["loss"] for r in full_rows[5:]], rel=1e-6)


@pytest.mark.e2e
def test_unreadable_scheduler_state_is_one_error_line(scheduled_run, tmp_path):
    resumed = reference_style_copy(scheduled_run, tmp_path / "resumed", 4, ["not", "a", "scheduler"])
    result = run_training([resumed, "datasets", "latest"], check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("error: ") and "scheduler.pt" in lines[0] and "SequentialLR" in lines[0]


# ---------------------------------------------------------------- tied weights

@pytest.mark.parametrize("kept_key", ["tok_emb.weight", "out_head.weight"])
def test_either_tied_key_alone_loads_into_both(tmp_path, kept_key):
    torch.manual_seed(0)
    source = GPTModel({**TINY_MODEL, "tie_weights": True})
    save_file({key: value.clone() for key, value in source.state_dict().items()
               if key not in TIED_KEYS or key == kept_key}, tmp_path / "model.safetensors")
    torch.manual_seed(1)
    loaded = load_model_weights(GPTModel({**TINY_MODEL, "tie_weights": True}), tmp_path / "model.safetensors")
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert loaded.out_head.weight is loaded.tok_emb.weight


@pytest.mark.e2e
def test_a_tied_checkpoint_saved_as_the_reference_saves_it_works_everywhere(tmp_path, verdict_dataset):
    """safetensors' save_model, which the reference uses, keeps one of the two tied tensors.
    The checkpoint resumes, and test_smoke.py, test_loss.py and convert_gpt2.py read it."""
    run_dir = make_run(tmp_path / "tied", verdict_dataset, model={"tie_weights": True},
                       min_train_tokens=tokens_for(6, 1), checkpoint_interval=3)
    run_training([run_dir, "datasets"])
    checkpoint = (run_dir / "checkpoints" / "latest").resolve()
    weights = checkpoint / "model.safetensors"
    full = load_file(weights)
    model = GPTModel({**TINY_MODEL, "tie_weights": True})
    model.load_state_dict(full)
    save_model(model, weights)  # as the reference harness saves it
    assert len([key for key in TIED_KEYS if key in load_file(weights)]) == 1
    meta = json.loads((checkpoint / "meta.json").read_text())
    del meta["files"]  # the reference writes no manifest
    (checkpoint / "meta.json").write_text(json.dumps(meta))

    # Training resumes from it (the run is complete, so extend it by three steps).
    train = json.loads((run_dir / "train.json").read_text())
    (run_dir / "train.json").write_text(json.dumps({**train, "min_train_tokens": tokens_for(9, 1)}))
    assert "global step 6" in run_training([run_dir, "datasets", "latest"]).stdout

    model_json = run_dir / "model.json"
    smoke = run_script("test_smoke.py", model_json, weights, "--tokenizer", "bytes", "--max-new-tokens", "5")
    assert smoke.returncode == 0, smoke.stderr
    loss = run_script("test_loss.py", tmp_path, model_json, weights, "--dataset", verdict_dataset,
                      "--start-token", 0, "--batches", 2, "--batch-size", 2)
    assert loss.returncode == 0, loss.stderr
    to_hf = run_script("convert_gpt2.py", "to-hf", model_json, weights, tmp_path / "hf")
    assert to_hf.returncode == 0, to_hf.stderr
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(hf["transformer.wte.weight"], full["tok_emb.weight"])
    # Written with the mode every other file gets (safetensors alone writes 0600).
    modes = {(tmp_path / "hf" / name).stat().st_mode & 0o777 for name in ("model.safetensors", "config.json")}
    assert len(modes) == 1
